"""clipn-ood evaluation: OOD metrics, the report folder and ``clipn-eval``.

Depends on the torch-free runtime for scoring and on scikit-learn/matplotlib (the ``eval`` extra); the
``--torch`` reference path imports clipn_train/clipn_export lazily.
"""
