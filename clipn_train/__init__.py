"""clipn_train: the CLIPN model, its ITBO/TSO losses and the ``clipn-train`` trainer (torch + open_clip).

Importing this package stays light (no torch) so ``clipn-train --help`` is fast; import the submodules for the
real work. Each module depends only on those above it (a test checks that there is no import cycle)::

    config       TrainConfig: every clipn-train option
    distributed  torchrun ranks and devices; precision: autocast per --precision
    model        the nn.Module: a frozen CLIP plus the trainable no tower
    checkpoint   reads and writes the weights of a model (ours and the official CLIPN file)
    factory      --model/--pretrained/--checkpoint -> LoadedCLIPN (model, tokenizer, transforms)
    losses       ITBO + TSO, on one GPU or many
    data         raw image-caption streams (webdataset shards, CSV/TSV)
    cache        the frozen-feature cache (built from raw streams)
    train_data   what a run reads: raw data or a cache, and the held-out batch
    schedule     AdamW and the cosine learning rate
    resume       saving, finding, checking and restoring exact resume state
    trainer      the loop (Trainer, train)
    cli          the clipn-train command
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clipn-ood")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
