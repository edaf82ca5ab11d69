"""What a training run reads: each rank's batches per epoch, from raw data or a feature cache, and the held-out
batch of the per-epoch p_no report.

This sits above :mod:`clipn_train.data` (raw streams) and :mod:`clipn_train.cache` (which itself builds on the
raw streams) because it chooses between the two; in ``data.py`` it would make a data ↔ cache import cycle.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from clipn_runtime.errors import UserError
from clipn_train.cache import CachedBatches, FeatureCache, model_identity
from clipn_train.config import TrainConfig
from clipn_train.data import (
    Batch,
    CaptionBatches,
    CaptionTexts,
    CsvSource,
    DataSpec,
    StreamConfig,
    caption_pairs,
    worker_init,
)
from clipn_train.distributed import DistInfo
from clipn_train.factory import LoadedCLIPN


def _data_spec(cfg: TrainConfig, data: str, dataset_type: str) -> DataSpec:
    return DataSpec(data, dataset_type, cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator)


class TrainData:
    """Batches for one rank per epoch, from raw data (streamed) or from a feature cache."""

    def __init__(self, cfg: TrainConfig, loaded: LoadedCLIPN, dist_info: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist_info
        spec = _data_spec(cfg, cfg.train_data, cfg.dataset_type)
        self.kind = spec.kind()
        self.cache: FeatureCache | None = None
        if self.kind == "cache":
            self.cache = FeatureCache(cfg.train_data)
            self.cache.check_model(model_identity(loaded.info), cfg.prompts)
            available: int | None = len(self.cache)
            self.workers = 0
        else:
            self.source = spec.open_source()
            available = len(self.source) if isinstance(self.source, CsvSource) else self.source.size()
            self.workers = cfg.workers
            self.texts = CaptionTexts(loaded.tokenizer, caption_pairs(cfg.variant, cfg.prompts))
            self.transform = loaded.preprocess_train if cfg.augment else loaded.preprocess_val
        num_samples = cfg.train_num_samples or available
        if not num_samples:
            raise UserError(
                f"--train-data {cfg.train_data}: the number of samples is unknown (no sizes.json or __len__ "
                "beside the shards); pass --train-num-samples (CC3M train: 2905954 before filtering)"
            )
        global_batch = cfg.batch_size * dist_info.world_size
        self.num_samples = num_samples
        self.num_batches = num_samples // global_batch
        if self.num_batches == 0:
            raise UserError(
                f"{num_samples} training samples are fewer than one global batch ({cfg.batch_size} × "
                f"{dist_info.world_size} ranks); lower --batch-size"
            )

    def batches(self, epoch: int, start_batch: int, progress: dict[int, tuple[int, int]]) -> Iterable[Batch]:
        """This rank's batches of ``epoch`` from ``start_batch`` on (``progress``: per-worker data position)."""
        cfg, d = self.cfg, self.dist
        order = StreamConfig(
            batch_size=cfg.batch_size,
            num_batches=self.num_batches,
            seed=cfg.seed,
            epoch=epoch,
            rank=d.rank,
            world_size=d.world_size,
            start_batch=start_batch,
            progress=dict(progress),
        )
        if self.cache is not None:
            return CachedBatches(self.cache, order)
        stream = CaptionBatches(self.source, self.transform, self.texts, order)
        if self.workers == 0:
            return stream
        return torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=d.device.type == "cuda",
            worker_init_fn=worker_init,
        )


def first_cached_batch(cache: FeatureCache, size: int) -> Batch:
    """The first ``size`` samples of a feature cache (all of it if smaller), in order."""
    order = StreamConfig(batch_size=min(size, len(cache)), num_batches=1, shuffle=False)
    return next(iter(CachedBatches(cache, order)))


def heldout_batch(cfg: TrainConfig, loaded: LoadedCLIPN, data: TrainData) -> tuple[Batch, str]:
    """The fixed batch whose p_no is reported each epoch: from --val-data, else the first training samples."""
    size = cfg.val_batch_size
    if cfg.val_data:
        spec = _data_spec(cfg, cfg.val_data, "auto")
        label = "val"
        if spec.kind() == "cache":
            cache = FeatureCache(cfg.val_data)
            cache.check_model(model_identity(loaded.info), cfg.prompts)
            return first_cached_batch(cache, size), label
        source = spec.open_source()
        texts = CaptionTexts(loaded.tokenizer, caption_pairs(cfg.variant, cfg.prompts))
    else:
        label = "train (no --val-data given, so not held out)"
        if data.cache is not None:
            return first_cached_batch(data.cache, size), label
        source, texts = data.source, data.texts
    stream = CaptionBatches(
        source,
        loaded.preprocess_val,
        texts,
        StreamConfig(batch_size=size, num_batches=None, seed=cfg.seed, shuffle=False),
    )
    batch = next(iter(stream), None)
    if batch is None:
        raise UserError(f"no readable sample for the held-out batch in {cfg.val_data or cfg.train_data}")
    return batch, label
