"""Image-caption training data: webdataset shards or a CSV/TSV file, streamed as deterministic, resumable batches.

Every rank × dataloader-worker ("part") reads its own slice of the data in an order fixed by (seed, epoch), and
each sample's augmentation is seeded by its position in that order. A batch carries how many raw samples its
worker has consumed so far, so resuming mid-epoch skips exactly those samples (cheaply, before decoding) and
the run continues as if it had never stopped. Corrupt or unreadable samples are skipped and counted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from clipn_runtime.errors import InputFileError, UserError
from clipn_runtime.prompts import load_prompts

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
DATASET_TYPES: tuple[str, ...] = ("auto", "webdataset", "csv", "cache")
#: Shuffle buffer per part for webdataset streams (open_clip uses 5000 samples; a smaller default keeps the
#: per-worker memory moderate, the shard-order shuffle does the rest).
SHUFFLE_BUFFER = 2000
#: How many skipped samples each worker names in the log before it only counts them.
MAX_LOGGED_CORRUPT = 5


class CorruptSample(Exception):
    """A sample that cannot be used (unreadable image, missing or empty caption)."""


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several values (stable across processes and runs, unlike ``hash`` of a str)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_identity(key: str) -> int:
    """A stable 63-bit id of a sample from where it came from (shard/key or csv:line)."""
    return mix_seed("id", key)


def sample_draw(seed: int, epoch: int, pass_index: int, identity: int) -> int:
    """The random number behind a sample's augmentation, template pair and "no" prompt in one epoch.

    It depends on the sample, not on which rank or worker reads it, so a run is the same whatever the number
    of GPUs and workers (given the same global batches) and a resumed run redraws exactly the same values.
    """
    return mix_seed("draw", seed, epoch, pass_index, identity)


@dataclass
class Batch:
    """One batch for one rank. Raw data has ``images`` (+ ``tokens``); a feature cache has the features.

    ``ids`` are the samples' identities, ``draws`` their per-epoch random numbers (see :func:`sample_draw`).
    """

    tokens_no: Tensor
    images: Tensor | None = None
    tokens: Tensor | None = None
    image_features: Tensor | None = None
    text_features: Tensor | None = None
    ids: Tensor | None = None
    draws: Tensor | None = None
    worker: int = 0
    consumed: int = 0  # raw samples this worker has read this epoch, including skipped ones
    corrupt: int = 0  # samples this worker has skipped this epoch

    def __len__(self) -> int:
        return int(self.tokens_no.shape[0])

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        def f(t: Tensor | None) -> Tensor | None:
            return None if t is None else fn(t)

        return replace(
            self,
            tokens_no=fn(self.tokens_no),
            images=f(self.images),
            tokens=f(self.tokens),
            image_features=f(self.image_features),
            text_features=f(self.text_features),
            ids=self.ids,
            draws=self.draws,
        )

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))


@dataclass(frozen=True)
class RawSample:
    key: str  # where it came from, for messages (shard/key or csv:line)
    image: bytes | Path | None
    caption: bytes | str | None
    pass_index: int = 0
    error: str | None = None  # set when the sample could not even be read from its shard


# --------------------------------------------------------------------------------------------------------------
# Sources: the raw, undecoded sample stream of one part
# --------------------------------------------------------------------------------------------------------------


def permutation(n: int, seed: int, epoch: int, pass_index: int) -> list[int]:
    order = list(range(n))
    random.Random(mix_seed("order", seed, epoch, pass_index)).shuffle(order)
    return order


class CsvSource:
    """Rows of a CSV/TSV file with an image-path column and a caption column (header row required).

    Relative image paths are resolved against the CSV file's folder.
    """

    def __init__(self, path: str | Path, img_key: str, caption_key: str, separator: str) -> None:
        self.path = Path(path)
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputFileError(self.path, None, f"cannot read the CSV file: {e}") from None
        reader = csv.reader(io.StringIO(text), delimiter=separator)
        header = next(reader, None)
        if header is None:
            raise InputFileError(self.path, 1, "empty file; expected a header row")
        for key, flag in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
            if key not in header:
                sep = {"\t": "TAB", ",": "comma"}.get(separator, repr(separator))
                raise InputFileError(
                    self.path,
                    1,
                    f"no column {key!r} in the header {header} (split on {sep}); set {flag} or --csv-separator",
                )
        i_img, i_cap = header.index(img_key), header.index(caption_key)
        self.rows: list[tuple[int, str, str]] = []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            img = row[i_img] if i_img < len(row) else ""
            cap = row[i_cap] if i_cap < len(row) else ""
            self.rows.append((line, img, cap))
        if not self.rows:
            raise InputFileError(self.path, None, "no data rows after the header")

    def __len__(self) -> int:
        return len(self.rows)

    def stream(
        self, *, epoch: int, part: int, parts: int, seed: int, shuffle: bool, once: bool
    ) -> Iterator[RawSample]:
        root = self.path.parent
        for pass_index in itertools.count():
            order = permutation(len(self.rows), seed, epoch, pass_index) if shuffle else range(len(self.rows))
            for i in itertools.islice(order, part, None, parts):
                line, img, cap = self.rows[i]
                image_path = Path(img) if Path(img).is_absolute() else root / img
                yield RawSample(f"{self.path.name}:{line}", image_path if img else None, cap, pass_index)
            if once:
                return


class WebDatasetSource:
    """Tar shards in webdataset layout (``key.jpg``/``key.png`` + ``key.txt``), brace notation allowed."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.shards: list[str] = list(wds.shardlists.expand_urls(pattern))
        local = [s for s in self.shards if "://" not in s and not s.startswith("pipe:")]
        missing = [s for s in local if not Path(s).is_file()]
        if missing:
            raise UserError(
                f"--train-data {pattern}: {len(missing)} of {len(self.shards)} shard(s) do not exist, "
                f"e.g. {missing[0]}"
            )

    def size(self) -> int | None:
        """The sample count from a ``sizes.json`` or ``__len__`` file beside the shards (open_clip's convention)."""
        folder = Path(self.shards[0]).parent
        sizes, length = folder / "sizes.json", folder / "__len__"
        try:
            if sizes.is_file():
                table = json.loads(sizes.read_text())
                return sum(int(table[Path(s).name]) for s in self.shards)
            if length.is_file():
                return int(length.read_text().strip())
        except (KeyError, ValueError, OSError) as e:
            log.warning("ignoring %s: %s", sizes if sizes.is_file() else length, e)
        return None

    def stream(
        self, *, epoch: int, part: int, parts: int, seed: int, shuffle: bool, once: bool
    ) -> Iterator[RawSample]:
        for pass_index in itertools.count():
            shards = list(self.shards)
            if shuffle:
                random.Random(mix_seed("shards", seed, epoch, pass_index)).shuffle(shards)
            # Whole shards per part when there are enough of them, else every parts-th sample of all shards.
            by_shard = len(shards) >= parts
            mine = shards[part::parts] if by_shard else shards
            errors: list[tuple[str, str]] = []

            def keep_going(exn: Exception, errors: list[tuple[str, str]] = errors) -> bool:
                # webdataset appends the shard's url to the exception's args
                url = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else "?"
                errors.append((Path(url).name, f"shard read error, rest of the shard skipped ({exn.args[0]!r})"))
                return True

            samples: Iterator[dict[str, Any]] = iter(
                wds.tarfile_samples(iter([{"url": s} for s in mine]), handler=keep_going)
            )
            if not by_shard:
                samples = itertools.islice(samples, part, None, parts)
            if shuffle:
                rng = random.Random(mix_seed("samples", seed, epoch, pass_index, part))
                samples = wds.filters.shuffle(bufsize=SHUFFLE_BUFFER, initial=min(500, SHUFFLE_BUFFER), rng=rng)(
                    samples
                )
            for s in samples:
                # A broken shard is reported where it was met, as one skipped sample, so counts stay exact.
                while errors:
                    where, error = errors.pop(0)
                    yield RawSample(where, None, None, pass_index, error=error)
                ext = next((e for e in IMAGE_EXTENSIONS if e in s), None)
                where = f"{Path(str(s.get('__url__', '?'))).name}/{s.get('__key__', '?')}"
                yield RawSample(where, s[ext] if ext else None, s.get("txt"), pass_index)
            while errors:
                where, error = errors.pop(0)
                yield RawSample(where, None, None, pass_index, error=error)
            if once:
                return


Source = CsvSource | WebDatasetSource


@dataclass(frozen=True)
class DataSpec:
    """What to read: ``path`` is a brace pattern of .tar shards, a .csv/.tsv file, or a feature-cache folder."""

    path: str
    dataset_type: str = "auto"
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "\t"

    def kind(self) -> str:
        if self.dataset_type != "auto":
            return self.dataset_type
        p = Path(self.path)
        if p.is_dir() and (p / "manifest.json").is_file():
            return "cache"
        suffix = self.path.rsplit(".", 1)[-1].lower().rstrip("}")
        if suffix in ("csv", "tsv"):
            return "csv"
        if suffix == "tar" or self.path.endswith(".tar}") or ".tar" in self.path:
            return "webdataset"
        raise UserError(
            f"--train-data {self.path}: cannot tell the data type from the name; expected .tar shards "
            "(brace notation allowed), a .csv/.tsv file or a feature-cache folder, or pass --dataset-type"
        )

    def open_source(self) -> Source:
        kind = self.kind()
        if kind == "csv":
            return CsvSource(self.path, self.csv_img_key, self.csv_caption_key, self.csv_separator)
        if kind == "webdataset":
            return WebDatasetSource(self.path)
        raise ValueError(f"{kind} data has no raw sample source")


# --------------------------------------------------------------------------------------------------------------
# From raw samples to tensors
# --------------------------------------------------------------------------------------------------------------


def decode_sample(sample: RawSample) -> tuple[Image.Image, str]:
    """The RGB image and caption of a raw sample, or :class:`CorruptSample` saying what is wrong."""
    if sample.error is not None:
        raise CorruptSample(sample.error)
    if sample.image is None:
        raise CorruptSample("no image (.jpg/.jpeg/.png/.webp) in the sample")
    if sample.caption is None:
        raise CorruptSample("no caption (.txt) in the sample")
    try:
        caption = sample.caption.decode("utf-8") if isinstance(sample.caption, bytes) else sample.caption
    except UnicodeDecodeError:
        raise CorruptSample("caption is not UTF-8") from None
    caption = caption.strip()
    if not caption:
        raise CorruptSample("empty caption")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            src = io.BytesIO(sample.image) if isinstance(sample.image, bytes) else sample.image
            with Image.open(src) as im:
                image = im.convert("RGB")  # forces the full decode, so truncated files fail here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptSample(f"unreadable image ({type(e).__name__}: {e})") from None
    return image, caption


def caption_pairs(variant: str, prompts: str) -> list[tuple[str, str]] | None:
    """The (yes, no) template pairs that wrap captions in the hand-crafted variant; None for learnable."""
    if variant != "handcrafted":
        return None
    prompt_set = load_prompts(prompts)
    return list(zip(prompt_set.yes, prompt_set.templates_for("no", "handcrafted"), strict=True))


class CaptionTexts:
    """Captions → (yes tokens, no tokens). Learnable variant: the same tokens for both towers. Hand-crafted
    variant: each caption wrapped in one (yes, no) template pair drawn per sample."""

    def __init__(self, tokenizer: Callable[[list[str]], Tensor], pairs: Sequence[tuple[str, str]] | None) -> None:
        self.tokenizer = tokenizer
        self.pairs = list(pairs) if pairs else None

    def __call__(self, captions: list[str], rngs: list[random.Random]) -> tuple[Tensor, Tensor]:
        if self.pairs is None:
            tokens = self.tokenizer(captions)
            return tokens, tokens
        chosen = [rng.choice(self.pairs) for rng in rngs]
        yes = self.tokenizer([y.format(c) for (y, _), c in zip(chosen, captions, strict=True)])
        no = self.tokenizer([n.format(c) for (_, n), c in zip(chosen, captions, strict=True)])
        return yes, no


def _seeded(transform: Callable[[Image.Image], Tensor], image: Image.Image, seed: int) -> Tensor:
    # Augmentation uses the global torch RNG; seeding it per sample makes a batch a pure function of its
    # position in the epoch, whatever the worker count, and lets a resumed run redo exactly the same crops.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


@dataclass
class StreamConfig:
    batch_size: int
    num_batches: int | None  # per rank and epoch; None: one pass over the data (feature caching)
    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    start_batch: int = 0
    progress: dict[int, tuple[int, int]] = field(default_factory=dict)  # worker -> (consumed, corrupt)


class CaptionBatches(IterableDataset):  # type: ignore[type-arg]
    """The batches of one rank for one epoch (iterate it through a DataLoader with ``batch_size=None``)."""

    def __init__(
        self,
        source: Source,
        transform: Callable[[Image.Image], Tensor],
        texts: CaptionTexts,
        config: StreamConfig,
    ) -> None:
        super().__init__()
        self.source, self.transform, self.texts, self.cfg = source, transform, texts, config

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cfg = self.cfg
        once = cfg.num_batches is None
        # A DataLoader takes batch k of an epoch from worker k % workers. A loader restarted at batch b starts
        # again at worker 0, so worker w plays the role (w + b) % workers that it had in the uninterrupted run.
        role = (worker + cfg.start_batch) % workers
        quota = None if once else len(range(cfg.start_batch + worker, cfg.num_batches or 0, workers))
        consumed, corrupt = cfg.progress.get(role, (0, 0))
        part, parts = cfg.rank * workers + role, cfg.world_size * workers
        raw = self.source.stream(
            epoch=cfg.epoch, part=part, parts=parts, seed=cfg.seed, shuffle=cfg.shuffle, once=once
        )
        raw = itertools.islice(raw, consumed, None)
        produced, good_in_pass, current_pass, reported = 0, 0, None, corrupt
        while quota is None or produced < quota:
            images: list[Tensor] = []
            captions: list[str] = []
            rngs: list[random.Random] = []
            ids: list[int] = []
            draws: list[int] = []
            for sample in raw:
                if sample.pass_index != current_pass:
                    if current_pass is not None and good_in_pass == 0:
                        raise UserError(f"no readable sample in a whole pass over the data of part {part}/{parts}")
                    current_pass, good_in_pass = sample.pass_index, 0
                consumed += 1
                try:
                    image, caption = decode_sample(sample)
                except CorruptSample as e:
                    corrupt += 1
                    if corrupt <= MAX_LOGGED_CORRUPT:
                        log.warning("skipping %s: %s", sample.key, e)
                    continue
                good_in_pass += 1
                identity = sample_identity(sample.key)
                draw = sample_draw(cfg.seed, cfg.epoch, sample.pass_index, identity)
                images.append(_seeded(self.transform, image, draw))
                captions.append(caption)
                rngs.append(random.Random(draw))
                ids.append(identity)
                draws.append(draw)
                if len(images) == cfg.batch_size:
                    break
            if not images or (not once and len(images) < cfg.batch_size):
                if once:
                    if corrupt > reported:  # an empty batch that only reports the last skipped samples
                        yield Batch(
                            tokens_no=torch.zeros(0, 0, dtype=torch.long),
                            worker=role,
                            consumed=consumed,
                            corrupt=corrupt,
                        )
                    return
                raise UserError(f"part {part}/{parts} of the data holds no samples; use fewer --workers or ranks")
            tokens, tokens_no = self.texts(captions, rngs)
            produced += 1
            reported = corrupt
            yield Batch(
                tokens_no=tokens_no,
                images=torch.stack(images),
                tokens=tokens,
                ids=torch.tensor(ids, dtype=torch.int64),
                draws=torch.tensor(draws, dtype=torch.int64),
                worker=role,
                consumed=consumed,
                corrupt=corrupt,
            )
            if once and len(images) < cfg.batch_size:
                return


def worker_init(_: int) -> None:
    # Ctrl-C reaches the whole process group; workers leave it to the main process, which saves and exits.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
