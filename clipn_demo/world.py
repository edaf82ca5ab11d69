"""The toy world: procedurally drawn coloured shapes with captions, small enough to train a CLIP on a CPU.

No pretrained CLIP can be downloaded on the machines this project is tested on, so the end-to-end demo trains a
tiny CLIP from scratch on this world and runs the real chain (pretraining → CLIPN → export → eval) on it.

Each image shows one shape in one colour — a *concept* such as "red circle" — drawn at ``supersample`` × the
output size and box-filtered down (antialiasing), at a random size (circumradius ≥ ``min_radius`` output pixels:
smaller shapes lose their identity at 32 px), position and rotation, on a textured background, with colour
jitter and pixel noise. Captions come from varied templates and mention the concept; a few mention only the
shape or only the colour, as real captions often leave things out.

Everything is a pure function of a seed: each image draws from its own ``numpy`` generator seeded with
(seed, stream, index), so a shard set or an evaluation folder is byte-identical across runs and independent of
how many images were made before it. Training data goes to webdataset tar shards (``{key}.png``, ``{key}.txt``
— one caption —, ``{key}.json`` — the labels and all captions —, ``{key}.cls`` — the concept index) so a trainer
reads it like real image-text data; evaluation data goes to ImageFolder-style directories
(``root/<class name>/<i>.png``) with class names like "red circle".
"""

from __future__ import annotations

import colorsys
import contextlib
import io
import json
import logging
import math
import multiprocessing
import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

#: Shapes chosen to stay distinguishable at 32 px under any rotation (no square/diamond or circle/hexagon pairs).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "ring", "crescent")
#: Six well-separated hues plus the two achromatic colours; backgrounds are desaturated mid-tones so all eight
#: stand out from them.
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "checkered", "mottled", "gradient")
SIZE_WORDS: tuple[str, ...] = ("small", "medium-sized", "large")

#: Seed streams: the same user seed gives unrelated images for training shards and for evaluation splits.
STREAM_SHARDS = 0
STREAM_SPLIT = 1

#: Fixed tar member time, so equal seeds give byte-identical shards.
_TAR_MTIME = 946684800  # 2000-01-01; an int: a float mtime makes tarfile add a PAX header to every member

# (hue, saturation, value) centres in [0, 1]; None hue = achromatic.
_COLOUR_HSV: dict[str, tuple[float | None, float, float]] = {
    "red": (0.0, 0.85, 0.9),
    "orange": (0.078, 0.9, 0.97),
    "yellow": (0.153, 0.85, 0.95),
    "green": (0.333, 0.75, 0.72),
    "blue": (0.611, 0.8, 0.9),
    "purple": (0.778, 0.65, 0.75),
    "white": (None, 0.0, 0.96),
    "black": (None, 0.0, 0.06),
}

_PHOTO_PREFIXES: tuple[str, ...] = (
    "a photo of",
    "a picture of",
    "a drawing of",
    "a rendering of",
    "an image of",
    "a close-up photo of",
    "a bad photo of",
    "a low resolution photo of",
)

# Caption templates and their weights. Placeholders: {prefix}, {a_obj} ("a red circle"), {a_sized_obj}
# ("a small red circle"), {a_shape} ("a circle"), {shape}, {colour}, {bg}, {pos}. The shape-only and
# colour-only templates are rarer: they make single-attribute prompts meaningful without blurring the pairs.
_TEMPLATES: tuple[tuple[str, float], ...] = (
    ("{prefix} {a_obj}.", 1.5),
    ("{a_obj}.", 1.0),
    ("{a_sized_obj} on a {bg} background.", 1.0),
    ("{a_obj} on a {bg} background.", 1.0),
    ("{prefix} {a_sized_obj}.", 1.0),
    ("{a_obj} in the {pos} of the picture.", 1.0),
    ("there is {a_obj} in this image.", 1.0),
    ("{a_shape} in {colour}.", 0.75),
    ("{a_shape} that is {colour}.", 0.75),
    ("{prefix} {a_sized_obj} on a {bg} background.", 1.0),
    ("{prefix} {a_shape}.", 0.75),
    ("something {colour}.", 0.75),
)

_INV_TEMPLATE_WEIGHTS = 1.0 / np.array([w for _, w in _TEMPLATES])

#: Zero-shot prompt templates in the captions' own wording: for "<colour> <shape>" concepts, for shapes alone
#: and for colours alone (the CLIP's zero-shot check and the demo's bundles use them).
CONCEPT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a {}.", "a picture of a {}.", "a drawing of a {}.")
SHAPE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture of a {}.")
COLOUR_TEMPLATES: tuple[str, ...] = ("something {}.",)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass(frozen=True, order=True)
class Concept:
    """One class of the toy world: a shape in a colour."""

    shape: str
    colour: str

    @property
    def name(self) -> str:
        """The class name, e.g. "red circle"."""
        return f"{self.colour} {self.shape}"

    @classmethod
    def parse(cls, name: str) -> Concept:
        """ "red circle" → Concept("circle", "red")."""
        parts = name.strip().split()
        if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in SHAPES:
            raise ValueError(
                f"{name!r} is not a toy-world class: expected '<colour> <shape>' with a colour in "
                f"{', '.join(COLOURS)} and a shape in {', '.join(SHAPES)}"
            )
        return cls(parts[1], parts[0])


def all_concepts(shapes: Sequence[str] = SHAPES, colours: Sequence[str] = COLOURS) -> list[Concept]:
    """Every (shape, colour) combination, shape-major: circles in all colours first."""
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown shape {s!r}; the toy world has {', '.join(SHAPES)}")
    for c in colours:
        if c not in COLOURS:
            raise ValueError(f"unknown colour {c!r}; the toy world has {', '.join(COLOURS)}")
    return [Concept(s, c) for s in shapes for c in colours]


def concept_index(concept: Concept) -> int:
    """Position of a concept in the full 8 × 8 world (stable whatever subset a split uses)."""
    return SHAPES.index(concept.shape) * len(COLOURS) + COLOURS.index(concept.colour)


@dataclass(frozen=True)
class ToyLabels:
    """What was drawn. Geometry is in output pixels (radius is the circumradius)."""

    shape: str
    colour: str
    class_name: str
    concept_index: int
    radius: float
    size: str
    x: float
    y: float
    angle: float
    position: str
    background: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ToySample:
    """One rendered image with its labels and captions (the first caption is the primary one)."""

    image: Image.Image
    labels: ToyLabels
    captions: tuple[str, ...]


def _regular_polygon(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _star() -> np.ndarray:
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    t = -np.pi / 2 + 2 * np.pi * np.arange(10) / 10
    return radii[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)


def _cross(w: float = 0.32) -> np.ndarray:
    return np.array(
        [
            (w, 1),
            (w, w),
            (1, w),
            (1, -w),
            (w, -w),
            (w, -1),
            (-w, -1),
            (-w, -w),
            (-1, -w),
            (-1, w),
            (-w, w),
            (-w, 1),
        ],
        dtype=np.float64,
    )


def _heart() -> np.ndarray:
    # The classic parametric heart, y flipped for image coordinates and centred on its bounding box.
    t = 2 * np.pi * np.arange(48) / 48
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    y = y - (y.max() + y.min()) / 2
    pts = np.stack([x, y], axis=1)
    return pts / np.abs(pts).max()


# Each shape is a list of (unit polygon, centre offset, fill): filled in order, so a 0 fill cuts a hole.
_CIRCLE = _regular_polygon(48)
_SHAPE_PARTS: dict[str, tuple[tuple[np.ndarray, tuple[float, float], int], ...]] = {
    "circle": ((_CIRCLE, (0.0, 0.0), 255),),
    "square": ((_regular_polygon(4, phase=np.pi / 4), (0.0, 0.0), 255),),
    "triangle": ((_regular_polygon(3, phase=-np.pi / 2), (0.0, 0.0), 255),),
    "star": ((_star(), (0.0, 0.0), 255),),
    "cross": ((_cross(), (0.0, 0.0), 255),),
    "heart": ((_heart(), (0.0, 0.0), 255),),
    "ring": ((_CIRCLE, (0.0, 0.0), 255), (_CIRCLE * 0.55, (0.0, 0.0), 0)),
    "crescent": ((_CIRCLE, (0.0, 0.0), 255), (_CIRCLE * 0.82, (0.45, 0.0), 0)),
}


def _position_word(x: float, y: float, size: int) -> str:
    col = ("left", "centre", "right")[min(2, int(3 * x / size))]
    row = ("top", "middle", "bottom")[min(2, int(3 * y / size))]
    if row == "middle":
        return col
    return row if col == "centre" else f"{row} {col}"


@dataclass(frozen=True)
class ToyWorld:
    """How images are drawn. The defaults are the world the demo and its measurements use."""

    image_size: int = 32
    supersample: int = 2
    min_radius: float = 5.0
    max_radius: float = 13.0
    captions_per_image: int = 5
    max_pixel_noise: float = 0.04
    shapes: tuple[str, ...] = field(default=SHAPES)
    colours: tuple[str, ...] = field(default=COLOURS)

    def __post_init__(self) -> None:
        if not 0 < self.min_radius <= self.max_radius <= self.image_size / 2:
            raise ValueError(
                f"need 0 < min_radius ({self.min_radius}) ≤ max_radius ({self.max_radius}) ≤ image_size / 2"
            )
        if not 1 <= self.captions_per_image <= len(_TEMPLATES):
            raise ValueError(f"captions_per_image must be in 1..{len(_TEMPLATES)}")
        all_concepts(self.shapes, self.colours)  # validates the names

    def concepts(self) -> list[Concept]:
        return all_concepts(self.shapes, self.colours)

    def _shape_colour(self, rng: np.random.Generator, colour: str) -> np.ndarray:
        hue, sat, val = _COLOUR_HSV[colour]
        if hue is None:
            if colour == "white":
                rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.08), rng.uniform(0.88, 1.0))
            else:
                rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.0, 0.12))
        else:
            rgb = colorsys.hsv_to_rgb(
                (hue + rng.uniform(-0.02, 0.02)) % 1.0,
                min(1.0, sat * rng.uniform(0.85, 1.12)),
                min(1.0, val * rng.uniform(0.85, 1.05)),
            )
        return np.asarray(rgb, dtype=np.float32)

    def _background(self, rng: np.random.Generator, kind: str, side: int) -> np.ndarray:
        hue = rng.uniform()
        a = np.asarray(colorsys.hsv_to_rgb(hue, rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.7)), dtype=np.float32)
        b_val = float(np.clip(rng.uniform(0.3, 0.7) + rng.choice((-1, 1)) * rng.uniform(0.1, 0.25), 0.2, 0.8))
        b = np.asarray(colorsys.hsv_to_rgb((hue + rng.uniform(-0.15, 0.15)) % 1.0, rng.uniform(0.0, 0.3), b_val))
        b = b.astype(np.float32)
        if kind == "plain":
            return np.broadcast_to(a, (side, side, 3))
        axis = np.arange(side, dtype=np.float32)
        xx, yy = axis[None, :], axis[:, None]
        t: np.ndarray  # where the background is colour b (0 → a, 1 → b)
        if kind == "striped":
            theta = rng.uniform(0, np.pi)
            period = rng.uniform(6, 16) * self.supersample / 2
            t = ((xx * math.cos(theta) + yy * math.sin(theta) + rng.uniform(0, period)) % period) < period / 2
        elif kind == "checkered":
            cell = int(rng.integers(4, 9)) * self.supersample
            t = ((xx + int(rng.integers(cell))) // cell + (yy + int(rng.integers(cell))) // cell) % 2 == 1
        elif kind == "mottled":
            coarse = rng.uniform(size=(int(rng.integers(3, 7)),) * 2).astype(np.float32)
            t = np.asarray(
                Image.fromarray(coarse, mode="F").resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32
            )
        else:  # gradient
            theta = rng.uniform(0, 2 * np.pi)
            proj = xx * math.cos(theta) + yy * math.sin(theta)
            t = (proj - proj.min()) / max(1e-6, float(proj.max() - proj.min()))
        weight = t.astype(np.float32)[..., None]
        return a + (b - a) * weight

    def render(self, rng: np.random.Generator, concept: Concept) -> ToySample:
        """Draw one image of ``concept`` from ``rng`` (the whole draw order is fixed, so rng → same bytes)."""
        side, ss = self.image_size * self.supersample, self.supersample
        radius = float(rng.uniform(self.min_radius, self.max_radius))
        # Keep the shape's circumcircle inside the image.
        x = float(rng.uniform(radius, self.image_size - radius))
        y = float(rng.uniform(radius, self.image_size - radius))
        angle = float(rng.uniform(0.0, 360.0))
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        canvas = self._background(rng, background, side)
        colour = self._shape_colour(rng, concept.colour)

        # Compose and box-filter in PIL (uint8, C speed); 1/255 quantisation before the 2× reduce is invisible.
        bg = Image.fromarray(np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8), mode="RGB")
        fg = Image.new("RGB", (side, side), tuple(round(float(v) * 255.0) for v in colour))
        mask = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(mask)
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        rot = np.array([[c, s], [-s, c]])
        for poly, offset, fill in _SHAPE_PARTS[concept.shape]:
            pts = ((poly + np.asarray(offset)) @ rot) * radius * ss + np.array([x * ss, y * ss])
            draw.polygon(pts.ravel().tolist(), fill=fill)
        small = np.asarray(Image.composite(fg, bg, mask).reduce(ss), dtype=np.float32)

        n = self.image_size
        noise_std = rng.uniform(0.0, self.max_pixel_noise) * 255.0
        small = small + rng.normal(0.0, noise_std, size=small.shape).astype(np.float32)
        image = Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8), mode="RGB")

        size_word = SIZE_WORDS[min(2, int(3 * (radius - self.min_radius) / (self.max_radius - self.min_radius)))]
        labels = ToyLabels(
            shape=concept.shape,
            colour=concept.colour,
            class_name=concept.name,
            concept_index=concept_index(concept),
            radius=round(radius, 3),
            size=size_word,
            x=round(x, 3),
            y=round(y, 3),
            angle=round(angle, 2),
            position=_position_word(x, y, n),
            background=background,
        )
        return ToySample(image=image, labels=labels, captions=self._captions(rng, labels))

    def _captions(self, rng: np.random.Generator, labels: ToyLabels) -> tuple[str, ...]:
        # Weighted sampling without replacement (Efraimidis–Spirakis keys u^(1/w)): much cheaper than rng.choice.
        keys = rng.random(len(_TEMPLATES)) ** _INV_TEMPLATE_WEIGHTS
        picks = np.argsort(-keys)[: self.captions_per_image]
        obj = f"{labels.colour} {labels.shape}"
        out = []
        for i in picks:
            out.append(
                _TEMPLATES[int(i)][0].format(
                    prefix=_PHOTO_PREFIXES[int(rng.integers(len(_PHOTO_PREFIXES)))],
                    a_obj=_article(obj),
                    a_sized_obj=_article(f"{labels.size} {obj}"),
                    a_shape=_article(labels.shape),
                    shape=labels.shape,
                    colour=labels.colour,
                    bg=labels.background,
                    pos=labels.position,
                )
            )
        return tuple(out)

    def sample(self, seed: int, stream: int, index: int, concept: Concept) -> ToySample:
        """The image ``index`` of ``stream`` for ``seed``: each has its own generator, so order never matters."""
        rng = np.random.default_rng(np.random.SeedSequence([seed, stream, index]))
        return self.render(rng, concept)


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar (a context manager); a disabled one ignores updates."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled)


@dataclass(frozen=True)
class ShardSet:
    """Shards written by :func:`write_shards`."""

    paths: tuple[Path, ...]
    count: int
    seed: int

    @property
    def url(self) -> str:
        """The webdataset brace pattern for all shards, e.g. ``dir/toy-{00000..00005}.tar``."""
        first = self.paths[0]
        if len(self.paths) == 1:
            return str(first)
        stem = first.name[: first.name.rindex("-") + 1]
        digits = len(first.stem) - len(stem)
        return str(first.parent / f"{stem}{{{0:0{digits}d}..{len(self.paths) - 1:0{digits}d}}}.tar")


@contextlib.contextmanager
def _sigint_ignored_while_spawning() -> Iterator[None]:
    """Spawned workers inherit an ignored SIGINT, so a Ctrl-C while they start cannot hit their imports."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be changed from the main thread; the initializer still applies
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _leave_sigint_to_parent() -> None:
    """Ctrl-C reaches the whole process group; the parent alone handles it (and cancels the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _shard_records(world: ToyWorld, seed: int, start: int, stop: int) -> list[dict[str, Any]]:
    """Encoded webdataset records for training images ``start..stop-1`` (runs in worker processes too)."""
    concepts = world.concepts()
    records = []
    for i in range(start, stop):
        sample = world.sample(seed, STREAM_SHARDS, i, concepts[i % len(concepts)])
        meta = {**sample.labels.to_dict(), "captions": list(sample.captions)}
        records.append(
            {
                "__key__": f"{i:08d}",
                "png": encode_png(sample.image),
                "txt": sample.captions[0],
                "json": json.dumps(meta, sort_keys=True),
                "cls": str(sample.labels.concept_index),
            }
        )
    return records


def write_shards(
    out_dir: str | Path,
    count: int,
    seed: int = 0,
    world: ToyWorld | None = None,
    shard_size: int = 5000,
    prefix: str = "toy",
    progress: bool = False,
    workers: int = 1,
) -> ShardSet:
    """Write ``count`` training images as webdataset shards ``out_dir/{prefix}-NNNNN.tar``.

    Image ``i`` shows concept ``concepts[i % len(concepts)]`` (every window of 64 images is balanced) and draws
    everything else from its own seeded generator. Each sample has ``png``, ``txt`` (the primary caption),
    ``json`` (labels plus ``captions``, all of them) and ``cls`` (the concept index in the full 8 × 8 world).
    Existing shards with the same names are overwritten; ``{prefix}.json`` beside them records the recipe and
    ``sizes.json`` the sample count per shard (open_clip's convention).

    ``workers`` > 1 renders in that many spawned processes (so a calling script needs the usual
    ``if __name__ == "__main__":`` guard); the bytes written are the same for any ``workers``.
    """
    import webdataset as wds

    if count < 1:
        raise ValueError("count must be at least 1")
    if workers < 1:
        raise ValueError("workers must be at least 1")
    world = world or ToyWorld()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chunk = 250
    bounds = [(start, min(start + chunk, count)) for start in range(0, count, chunk)]
    written: list[Path] = []
    workers = min(workers, len(bounds))
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(_bar(count, "toy world", progress))
        sink = stack.enter_context(
            wds.ShardWriter(
                str(out / f"{prefix}-%05d.tar"),
                maxcount=shard_size,
                verbose=0,
                mtime=_TAR_MTIME,
                post=lambda name: written.append(Path(name)),
            )
        )
        if workers == 1:
            batches: Iterator[list[dict[str, Any]]] = (_shard_records(world, seed, a, b) for a, b in bounds)
        else:
            # spawn, not fork: the parent may hold torch/OpenMP state that does not survive a fork.
            pool = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=_leave_sigint_to_parent
            )
            # On an error or Ctrl-C, drop the chunks not started yet rather than render them all first.
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            with _sigint_ignored_while_spawning():  # map() submits every chunk, so the workers start in here
                batches = pool.map(
                    _shard_records, *zip(*((world, seed, a, b) for a, b in bounds), strict=True)
                )  # ordered results, so the shards do not depend on scheduling
        for records in batches:
            for record in records:
                sink.write(record)
            bar.update(len(records))
    recipe = {"seed": seed, "count": count, "shards": [p.name for p in written], "world": asdict(world)}
    (out / f"{prefix}.json").write_text(json.dumps(recipe, indent=1) + "\n", encoding="utf-8")
    # open_clip's convention for the sample count of a shard set (readers use it for epoch sizes).
    sizes = {p.name: min(shard_size, count - k * shard_size) for k, p in enumerate(written)}
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n", encoding="utf-8")
    log.info("wrote %d toy images to %d shard(s) in %s", count, len(written), out)
    return ShardSet(paths=tuple(written), count=count, seed=seed)


def iter_split(
    seed: int, n_per_class: int, concepts: Sequence[Concept] | None = None, world: ToyWorld | None = None
) -> Iterator[ToySample]:
    """``n_per_class`` held-out images of each concept, class-major, drawn lazily.

    Image ``i`` of a concept depends only on (seed, concept, i) — not on which other concepts are in the
    split — and never coincides with a training shard image (a different seed stream).
    """
    world = world or ToyWorld()
    chosen = list(concepts) if concepts is not None else world.concepts()
    for concept in chosen:
        base = concept_index(concept) * 1_000_000
        for i in range(n_per_class):
            yield world.sample(seed, STREAM_SPLIT, base + i, concept)


def generate_split(
    seed: int, n_per_class: int, concepts: Sequence[Concept] | None = None, world: ToyWorld | None = None
) -> list[ToySample]:
    """:func:`iter_split` as a list."""
    return list(iter_split(seed, n_per_class, concepts, world))


@dataclass(frozen=True)
class ImageFolderSplit:
    """An evaluation folder written by :func:`write_image_folder`."""

    root: Path
    class_names: tuple[str, ...]
    count: int


def write_image_folder(
    root: str | Path,
    seed: int,
    n_per_class: int,
    concepts: Sequence[Concept | str] | None = None,
    world: ToyWorld | None = None,
    progress: bool = False,
) -> ImageFolderSplit:
    """Write ``root/<class name>/<i>.png`` for each concept (ImageFolder layout) plus ``root/labels.jsonl``.

    ``concepts`` are :class:`Concept` objects or class names like "red circle"; default: the whole world.
    """
    world = world or ToyWorld()
    chosen = [Concept.parse(c) if isinstance(c, str) else c for c in (concepts or world.concepts())]
    if len(set(chosen)) != len(chosen):
        raise ValueError("concepts contain duplicates")
    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    total = len(chosen) * n_per_class
    lines = []
    with _bar(total, f"split {root_path.name}", progress) as bar:
        for k, sample in enumerate(iter_split(seed, n_per_class, chosen, world)):
            concept = chosen[k // n_per_class]
            folder = root_path / concept.name
            folder.mkdir(exist_ok=True)
            rel = f"{concept.name}/{k % n_per_class:05d}.png"
            (root_path / rel).write_bytes(encode_png(sample.image))
            lines.append(json.dumps({"path": rel, **sample.labels.to_dict()}, sort_keys=True))
            bar.update(1)
    (root_path / "labels.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ImageFolderSplit(root=root_path, class_names=tuple(c.name for c in chosen), count=total)
