"""clipn_demo: the toy world and ``clipn-demo``, the whole CLIPN chain on a CPU in minutes.

No pretrained CLIP can be downloaded on the machines this project is built on, so the demo makes its own data
and its own CLIP, then runs the real trainer, exporter and evaluator on them. Nothing else in clipn-ood imports
this package: it uses ``clipn_train``, ``clipn_export`` and ``clipn_eval`` like any other client (the ``demo``
extra installs what they need).

* :mod:`clipn_demo.world`: the toy world (coloured shapes with captions → webdataset shards, image folders);
* :mod:`clipn_demo.pretrain`: contrastive pretraining of a tiny open_clip CLIP on it, and zero-shot accuracy;
* :mod:`clipn_demo.demo`: the five stages (data, clip, clipn, export, eval) and the combined table;
* :mod:`clipn_demo.cli`: the ``clipn-demo`` command.

Importing this package or :mod:`clipn_demo.cli` stays light (no torch), so ``clipn-demo --help`` is fast.
"""
