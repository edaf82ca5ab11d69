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

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from clipn_runtime.errors import UserError
from clipn_runtime.fileio import atomic_write, atomic_writer
from clipn_train.data import (
    Batch,
    CaptionBatches,
    CaptionTexts,
    DataSpec,
    Source,
    StreamConfig,
    caption_pairs,
    permutation,
    sample_draw,
    worker_init,
)
from clipn_train.distributed import DistInfo
from clipn_train.factory import LoadedCLIPN, ModelInfo, create_clipn
from clipn_train.model import CLIPN
from clipn_train.precision import autocast_for

log = logging.getLogger(__name__)

FORMAT = "clipn-ood/feature-cache"
FORMAT_VERSION = 1
DTYPES: dict[str, Any] = {"float16": np.float16, "float32": np.float32}
PARTS: tuple[str, ...] = ("image", "text", "tokens_no", "ids")


def model_identity(info: ModelInfo) -> dict[str, Any]:
    """The facts a cache must share with the model that trains on it."""
    return {
        "model_name": info.model_name,
        "model_config": info.model_config,
        "pretrained": info.pretrained,
        "weights_sha256": info.weights_sha256,
        "variant": info.variant,
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_writer(path) as fh:
        np.save(fh, array, allow_pickle=False)


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
    atomic_write(Path(folder) / "manifest.json", json.dumps(body, indent=2, sort_keys=True))


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

    def check_model(self, identity: dict[str, Any], prompts: str | None = None) -> None:
        """A UserError when the cache was made with another base model, weights or variant, or (hand-crafted
        variant, ``prompts`` given) with other template pairs: its no-tower tokens hold the wrapped captions."""
        made = self.manifest.get("model", {})
        for key, value in identity.items():
            if json.dumps(made.get(key), sort_keys=True) != json.dumps(value, sort_keys=True):
                raise UserError(
                    f"{self.folder}: the cache was made with {key} = {made.get(key)!r}, but training uses "
                    f"{value!r}; re-create the cache with the same --model/--pretrained/--variant"
                )
        cached = self.manifest.get("prompts")
        if prompts is not None and identity.get("variant") == "handcrafted" and cached != prompts:
            raise UserError(
                f"{self.folder}: the cache was made with --prompts {cached}, but training uses --prompts {prompts}; "
                f"pass --prompts {cached} or re-create the cache"
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
    """The batches of one rank for one epoch from a cache, in the same order rule as a CSV source.

    ``order`` is the description a raw stream gets; its ``progress`` is not needed here: a cache holds no corrupt
    samples, so ``start_batch`` alone says where a resumed epoch goes on.
    """

    def __init__(self, cache: FeatureCache, order: StreamConfig) -> None:
        if order.num_batches is None:
            raise ValueError("a feature cache is read for a given number of batches, not once through")
        self.cache, self.order, self.num_batches = cache, order, order.num_batches

    def _indices(self) -> Iterator[tuple[int, int]]:
        """(pass, sample index) in the CSV source's order rule, cycling over the data."""
        n, o = len(self.cache), self.order
        pass_index = 0
        while True:
            order = permutation(n, o.seed, o.epoch, pass_index) if o.shuffle else range(n)
            for i in order[o.rank :: o.world_size]:
                yield pass_index, i
            pass_index += 1

    def __iter__(self) -> Iterator[Batch]:
        o = self.order
        stream = self._indices()
        for _ in range(o.start_batch * o.batch_size):
            next(stream)
        for b in range(o.start_batch, self.num_batches):
            picked = [next(stream) for _ in range(o.batch_size)]
            image, text, tokens, ids = self.cache.gather(np.array([i for _, i in picked], dtype=np.int64))
            draws = [sample_draw(o.seed, o.epoch, p, int(i)) for (p, _), i in zip(picked, ids, strict=True)]
            yield Batch(
                tokens_no=tokens,
                image_features=image,
                text_features=text,
                ids=ids,
                draws=torch.tensor(draws, dtype=torch.int64),
                consumed=(b + 1) * o.batch_size,
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


def _eval_batches(
    source: Source, loaded: LoadedCLIPN, texts: CaptionTexts, batch_size: int, seed: int, workers: int, d: DistInfo
) -> Iterable[Batch]:
    """This rank's part of the data, once through, in order, with the evaluation transform."""
    stream = CaptionBatches(
        source,
        loaded.preprocess_val,
        texts,
        StreamConfig(
            batch_size=batch_size, num_batches=None, seed=seed, rank=d.rank, world_size=d.world_size, shuffle=False
        ),
    )
    if workers == 0:
        return stream
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=d.device.type == "cuda",
        worker_init_fn=worker_init,
    )


def _encode_all(
    core: CLIPN,
    batches: Iterable[Batch],
    writer: CacheWriter,
    autocast: Callable[[], Any],
    d: DistInfo,
    known: int | None,
) -> int:
    """Encode and write every batch of this rank; returns how many samples it skipped as corrupt."""
    corrupt: dict[int, int] = {}
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
    return sum(corrupt.values())


def _all_ranks(shards: list[dict[str, Any]], skipped: int, d: DistInfo) -> tuple[list[dict[str, Any]], int]:
    """Every rank's shards (in rank order) and their total of skipped samples (collective under torchrun)."""
    counts: list[Any] = [(shards, skipped)]
    if d.distributed:
        counts = [None] * d.world_size
        dist.all_gather_object(counts, (shards, skipped))
    return [s for rank_shards, _ in counts for s in rank_shards], sum(c for _, c in counts)


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
    dist_info: DistInfo | None = None,
) -> CacheSummary:
    """Run the frozen towers once over ``data`` (eval transform, no augmentation) and write a cache folder.

    Under torchrun every rank encodes its own part of the data and writes its own shards; rank 0 writes the
    manifest once all are done. In the hand-crafted variant the (yes, no) template pair of each caption is
    drawn once here and fixed for all epochs.
    """
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
    batches = _eval_batches(source, loaded, texts, batch_size, seed, workers, d)
    known = len(source) if hasattr(source, "__len__") else source.size()
    writer = CacheWriter(out, rank=d.rank, dtype=dtype, shard_size=shard_size)
    started = time.perf_counter()
    skipped_here = _encode_all(core, batches, writer, autocast, d, known)
    shards, skipped = _all_ranks(writer.close(), skipped_here, d)
    samples = sum(s["count"] for s in shards)
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
                "shards": shards,
            },
        )
        log.info("cached %d samples (%d skipped as corrupt/unreadable) in %s", samples, skipped, out)
    if d.distributed:
        dist.barrier()
    return CacheSummary(out, samples, skipped, len(shards), time.perf_counter() - started)
