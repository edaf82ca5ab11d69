"""clipn-ood evaluation: OOD metrics, ``clipn-eval`` and (later) the toy-world demo.

Depends on the torch-free runtime for scoring and on scikit-learn/matplotlib (the ``eval`` extra); the
``--torch`` reference path imports clipn_train/clipn_export lazily.
"""
