"""The frozen-feature cache: image and yes-text features computed once, read back memory-mapped.

The image tower and the yes tower never change during CLIPN training, so their outputs can be computed once
(with the evaluation transform: no augmentation) and stored; training from the cache then runs only the no tower.
Layout of a cache folder::

    manifest.json                 what made it (model, weights, variant, dtype) and its shards
    r0-00000.image.npy            (n, D) image features, L2-normalised
    r0-00000.text.npy             (n, D) yes-tower text features, L2-normalised
    r0-00000.tokens_no.npy        (n, context) int32 tokens for the no tower
    r0-00000.ids.npy              (n,) int64 sample identities (seed the per-epoch "no" prompt draws)

Each file is written to a temporary name and renamed; the manifest is written last, so a folder without a
manifest is an unfinished cache.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clipn_runtime.errors import UserError
from clipn_train.checkpoint import atomic_write_bytes
from clipn_train.data import Batch, permutation, sample_draw

log = logging.getLogger(__name__)

FORMAT = "clipn-ood/feature-cache"
FORMAT_VERSION = 1
DTYPES: dict[str, Any] = {"float16": np.float16, "float32": np.float32}
PARTS: tuple[str, ...] = ("image", "text", "tokens_no", "ids")


def model_identity(info: Any) -> dict[str, Any]:
    """The facts a cache must share with the model that trains on it (from a :class:`ModelInfo`)."""
    return {
        "model_name": info.model_name,
        "model_config": info.model_config,
        "pretrained": info.pretrained,
        "weights_sha256": info.weights_sha256,
        "variant": info.variant,
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


class CacheWriter:
    """Appends batches of features for one rank and flushes them as shards of ``shard_size`` samples."""

    def __init__(self, folder: str | Path, *, rank: int, dtype: str, shard_size: int) -> None:
        if dtype not in DTYPES:
            raise UserError(f"--cache-dtype {dtype}: choose one of {', '.join(DTYPES)}")
        self.folder, self.rank, self.dtype, self.shard_size = Path(folder), rank, dtype, shard_size
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        self._pending: dict[str, list[np.ndarray]] = {k: [] for k in PARTS}
        self._count = 0

    def add(self, image_features: Tensor, text_features: Tensor, tokens_no: Tensor, ids: Tensor) -> None:
        np_dtype = DTYPES[self.dtype]
        self._pending["image"].append(image_features.float().cpu().numpy().astype(np_dtype))
        self._pending["text"].append(text_features.float().cpu().numpy().astype(np_dtype))
        self._pending["tokens_no"].append(tokens_no.cpu().numpy().astype(np.int32))
        self._pending["ids"].append(ids.cpu().numpy().astype(np.int64))
        self._count += int(tokens_no.shape[0])
        while self._count >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        name = f"r{self.rank}-{len(self.shards):05d}"
        for part in PARTS:
            rows = np.concatenate(self._pending[part])
            _save_npy(self.folder / f"{name}.{part}.npy", rows[:n])
            self._pending[part] = [rows[n:]] if len(rows) > n else []
        self._count -= n
        self.shards.append({"name": name, "count": n})

    def close(self) -> list[dict[str, Any]]:
        if self._count:
            self._flush(self._count)
        return self.shards


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> None:
    body = {"format": FORMAT, "version": FORMAT_VERSION, **manifest}
    atomic_write_bytes(Path(folder) / "manifest.json", json.dumps(body, indent=2, sort_keys=True).encode())


class FeatureCache:
    """A finished cache folder, memory-mapped."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.is_file():
            raise UserError(
                f"{self.folder}: no manifest.json, so not a finished feature cache; (re)run clipn-train cache-features"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{manifest_path}: unreadable cache manifest ({e})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != FORMAT_VERSION:
            raise UserError(f"{manifest_path}: not a clipn-ood feature cache of version {FORMAT_VERSION}")
        self.arrays: list[dict[str, np.ndarray]] = []
        counts = []
        for shard in self.manifest["shards"]:
            arrays = {}
            for part in PARTS:
                path = self.folder / f"{shard['name']}.{part}.npy"
                try:
                    arrays[part] = np.load(path, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise UserError(f"{path}: cannot read cache shard ({e}); re-create the cache") from None
                if arrays[part].shape[0] != shard["count"]:
                    raise UserError(
                        f"{path}: holds {arrays[part].shape[0]} rows, the manifest says {shard['count']}"
                    )
            self.arrays.append(arrays)
            counts.append(shard["count"])
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if len(self) == 0:
            raise UserError(f"{self.folder}: the cache holds no samples")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def check_model(self, identity: dict[str, Any]) -> None:
        """A UserError when the cache was made with another base model, weights or variant."""
        made = self.manifest.get("model", {})
        for key, value in identity.items():
            if json.dumps(made.get(key), sort_keys=True) != json.dumps(value, sort_keys=True):
                raise UserError(
                    f"{self.folder}: the cache was made with {key} = {made.get(key)!r}, but training uses "
                    f"{value!r}; re-create the cache with the same --model/--pretrained/--variant"
                )

    def gather(self, indices: np.ndarray) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(image features, text features, no-tower tokens, ids) of the given global sample indices, in order."""
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        out = {part: [] for part in PARTS}  # type: dict[str, list[np.ndarray]]
        order = []
        for s in np.unique(shard_of):
            rows = np.nonzero(shard_of == s)[0]
            local = indices[rows] - self.starts[s]
            for part in PARTS:
                out[part].append(np.asarray(self.arrays[s][part][local]))
            order.append(rows)
        inverse = np.argsort(np.concatenate(order), kind="stable")
        image, text, tokens, ids = (np.concatenate(out[p])[inverse] for p in PARTS)
        return (
            torch.from_numpy(image.astype(np.float32)),
            torch.from_numpy(text.astype(np.float32)),
            torch.from_numpy(tokens.astype(np.int64)),
            torch.from_numpy(ids.astype(np.int64)),
        )


class CachedBatches:
    """The batches of one rank for one epoch from a cache, in the same order rule as a CSV source."""

    def __init__(
        self,
        cache: FeatureCache,
        *,
        batch_size: int,
        num_batches: int,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        shuffle: bool = True,
        start_batch: int = 0,
    ) -> None:
        self.cache, self.batch_size, self.num_batches = cache, batch_size, num_batches
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.shuffle, self.start_batch = shuffle, start_batch

    def _indices(self) -> Iterator[tuple[int, int]]:
        """(pass, sample index) in the CSV source's order rule, cycling over the data."""
        n = len(self.cache)
        pass_index = 0
        while True:
            order = permutation(n, self.seed, self.epoch, pass_index) if self.shuffle else range(n)
            for i in order[self.rank :: self.world_size]:
                yield pass_index, i
            pass_index += 1

    def __iter__(self) -> Iterator[Batch]:
        stream = self._indices()
        skip = self.start_batch * self.batch_size
        for _ in range(skip):
            next(stream)
        for b in range(self.start_batch, self.num_batches):
            picked = [next(stream) for _ in range(self.batch_size)]
            image, text, tokens, ids = self.cache.gather(np.array([i for _, i in picked], dtype=np.int64))
            draws = [sample_draw(self.seed, self.epoch, p, int(i)) for (p, _), i in zip(picked, ids, strict=True)]
            yield Batch(
                tokens_no=tokens,
                image_features=image,
                text_features=text,
                ids=ids,
                draws=torch.tensor(draws, dtype=torch.int64),
                consumed=(b + 1) * self.batch_size,
            )


@dataclass
class CacheSummary:
    folder: Path
    samples: int
    corrupt: int
    shards: int
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.inf


def encode_batch(
    model: Any, batch: Batch, autocast: Callable[[], Any], trim: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Frozen features of a raw batch (image features, yes-text features) and its no-tower tokens."""
    tokens = batch.tokens if batch.tokens is not None else batch.tokens_no
    with torch.no_grad(), autocast():
        cut = model.needed_context(tokens) if trim else tokens.shape[1]
        image = model.encode_image(batch.images)
        text = model.encode_text(tokens[:, :cut])
    return image.float(), text.float(), batch.tokens_no


def build_feature_cache(
    *,
    data: str,
    output: str | Path,
    model: str,
    pretrained: str | None,
    variant: str,
    prompts: str,
    dataset_type: str = "auto",
    csv_img_key: str = "filepath",
    csv_caption_key: str = "title",
    csv_separator: str = "\t",
    batch_size: int = 256,
    workers: int = 4,
    precision: str = "amp",
    dtype: str = "float16",
    shard_size: int = 100_000,
    seed: int = 0,
    dist_info: Any = None,
) -> CacheSummary:
    """Run the frozen towers once over ``data`` (eval transform, no augmentation) and write a cache folder.

    Under torchrun every rank encodes its own part of the data and writes its own shards; rank 0 writes the
    manifest once all are done. In the hand-crafted variant the (yes, no) template pair of each caption is
    drawn once here and fixed for all epochs.
    """
    import time

    import torch.distributed as dist
    from tqdm import tqdm

    from clipn_train.data import CaptionBatches, CaptionTexts, DataSpec, StreamConfig, caption_pairs, worker_init
    from clipn_train.distributed import DistInfo
    from clipn_train.model import create_clipn
    from clipn_train.precision import autocast_for

    d = dist_info or DistInfo()
    out = Path(output)
    if d.is_main and (out / "manifest.json").exists():
        raise UserError(f"{out} already holds a feature cache; remove it or pick another --output")
    spec = DataSpec(data, dataset_type, csv_img_key, csv_caption_key, csv_separator)
    if spec.kind() == "cache":
        raise UserError(f"{data} is already a feature cache")
    source = spec.open_source()
    loaded = create_clipn(model, pretrained, variant=variant)
    core = loaded.model.to(d.device).eval()
    autocast, _ = autocast_for(precision, d.device)
    texts = CaptionTexts(loaded.tokenizer, caption_pairs(variant, prompts))
    stream = CaptionBatches(
        source,
        loaded.preprocess_val,
        texts,
        StreamConfig(
            batch_size=batch_size, num_batches=None, seed=seed, rank=d.rank, world_size=d.world_size, shuffle=False
        ),
    )
    batches: Any = stream
    if workers > 0:
        batches = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            pin_memory=d.device.type == "cuda",
            worker_init_fn=worker_init,
        )
    known = len(source) if hasattr(source, "__len__") else source.size()
    writer = CacheWriter(out, rank=d.rank, dtype=dtype, shard_size=shard_size)
    corrupt: dict[int, int] = {}
    started = time.perf_counter()
    total = None if known is None else math.ceil(known / d.world_size)
    with tqdm(
        total=total,
        unit="sample",
        desc="caching features",
        dynamic_ncols=True,
        disable=None if d.is_main else True,
    ) as bar:
        for batch in batches:
            corrupt[batch.worker] = batch.corrupt
            if len(batch) == 0:  # only reports skipped samples
                continue
            image, text, tokens_no = encode_batch(core, batch.to(d.device), autocast)
            assert batch.ids is not None
            writer.add(image, text, tokens_no, batch.ids)
            bar.update(len(batch))
    shards = writer.close()
    counts: list[Any] = [(shards, sum(corrupt.values()))]
    if d.distributed:
        counts = [None] * d.world_size
        dist.all_gather_object(counts, (shards, sum(corrupt.values())))
    all_shards = [s for rank_shards, _ in counts for s in rank_shards]
    skipped = sum(c for _, c in counts)
    samples = sum(s["count"] for s in all_shards)
    if d.is_main:
        if samples == 0:
            raise UserError(f"{data}: no readable sample to cache")
        write_manifest(
            out,
            {
                "model": model_identity(loaded.info),
                "prompts": prompts if variant == "handcrafted" else None,
                "dtype": dtype,
                "embed_dim": core.embed_dim,
                "context_length": core.context_length,
                "num_samples": samples,
                "skipped_samples": skipped,
                "source": data,
                "transform": "eval (no augmentation)",
                "shards": all_shards,
            },
        )
        log.info("cached %d samples (%d skipped as corrupt/unreadable) in %s", samples, skipped, out)
    if d.distributed:
        dist.barrier()
    return CacheSummary(out, samples, skipped, len(all_shards), time.perf_counter() - started)
