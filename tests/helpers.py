"""Helpers shared by several test modules (fixtures live in conftest.py; tests never import each other)."""

from __future__ import annotations

import csv
import io
import random
import struct
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

if TYPE_CHECKING:
    from clipn_runtime.bundle import Manifest, Preprocess
    from clipn_runtime.scoring import Scores
    from clipn_train.factory import LoadedCLIPN

#: What a runtime-only (edge) install does not have.
NOT_IN_THE_RUNTIME = ("torch", "torchvision", "open_clip", "clipn_train", "clipn_export")


def import_blocker(modules: tuple[str, ...] = NOT_IN_THE_RUNTIME) -> str:
    """Python source that makes importing ``modules`` fail as a missing install does (ModuleNotFoundError with
    ``.name`` set); prepend it to a ``python -c`` program."""
    return textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {modules!r}:
                    raise ModuleNotFoundError(f"blocked for this test: {{name}}", name=name)
        sys.meta_path.insert(0, Block())
        """
    )


BLOCK_TORCH = import_blocker()


def make_images(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (40, 30)) -> list[Path]:
    """``n`` PNG colour ramps with noise (distinct images, so their scores differ) named img0000.png …"""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = ((xx / w) if i % 2 else (yy / h))[..., None]
        a = (c0 * (1 - t) + c1 * t + rng.normal(0, 10, (h, w, 3))).clip(0, 255).astype(np.uint8)
        p = folder / f"img{i:04d}.png"
        Image.fromarray(a).save(p)
        out.append(p)
    return out


def png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG that claims ``w``×``h`` pixels: a decompression bomb's header without its data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


CLIP_FPS, CLIP_FRAMES, CLIP_W, CLIP_H = 10, 12, 64, 48


def _codec() -> str:
    import av

    for name in ("mpeg4", "libx264", "h264", "mjpeg"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    pytest.skip("this FFmpeg build has no usable video encoder")


def make_clip(path: Path, n: int = CLIP_FRAMES) -> Path:
    """A clip whose frames differ strongly (colour ramps), so their scores differ too (needs PyAV)."""
    av = pytest.importorskip("av", reason="PyAV (the `video` extra) is not installed")
    codec = _codec()
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=CLIP_FPS)
        stream.width, stream.height = CLIP_W, CLIP_H
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        yy, xx = np.mgrid[0:CLIP_H, 0:CLIP_W]
        for i in range(n):
            c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            t = ((xx / CLIP_W) if i % 2 else (yy / CLIP_H))[..., None]
            img = (c0 * (1 - t) + c1 * t).clip(0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def hashed_bundle(tmp_path: Path) -> Manifest:
    """A minimal bundle directory whose files are not real engines, but hashed and listed as a bundle's are."""
    from clipn_runtime.bundle import (
        Manifest,
        ModelIdentity,
        Preprocess,
        Scoring,
        TensorSpec,
        hash_entry,
        write_manifest,
    )

    (tmp_path / "model.onnx").write_bytes(b"not really onnx, but hashed all the same")
    (tmp_path / "text_bank.npz").write_bytes(b"bank")
    m = Manifest(
        model=ModelIdentity("ViT-B-16", checkpoint_sha256="ab" * 32),
        preprocess=Preprocess(224, (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)),
        classes=["cat", 'hot dog, "chili"', "日本"],
        prompts={"name": "clipn", "yes": ["a {}"], "no": ["no {}"]},
        scoring=Scoring(scale=100.0),
        files=[
            hash_entry(
                tmp_path,
                "model.onnx",
                "image_engine",
                precision="fp32",
                inputs=[TensorSpec("image", ["batch", 3, 224, 224], "float32")],
                outputs=[TensorSpec("pred", ["batch"], "int64")],
            ),
            hash_entry(tmp_path, "text_bank.npz", "text_bank"),
        ],
        versions={"clipn-ood": "0.1.0", "opset": 17},
    )
    write_manifest(tmp_path, m)
    return m


# ---- training data ------------------------------------------------------------------------------------------

CAPTION_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 36)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def caption_pairs(n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """``n`` (PNG bytes of a flat random colour, caption) pairs."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rgb = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        out.append((_png(rgb), f"a {CAPTION_COLOURS[i % len(CAPTION_COLOURS)]} picture number {i}"))
    return out


def make_csv(folder: Path, n: int = 16, seed: int = 0, missing: int = 0) -> Path:
    """A TSV of ``n`` images (+ ``missing`` rows naming files that do not exist)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (png, caption) in enumerate(caption_pairs(n, seed)):
        (folder / f"img{i}.png").write_bytes(png)
        rows.append((f"img{i}.png", caption))
    rows += [(f"gone{i}.png", f"a lost picture {i}") for i in range(missing)]
    path = folder / "pairs.tsv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        w.writerows(rows)
    return path


def tiny_weights(loaded: LoadedCLIPN, folder: Path) -> Path:
    """The base CLIP of ``loaded`` as a local .safetensors weights file (what ``--pretrained FILE`` takes)."""
    from safetensors.torch import save_file

    path = folder / "tiny-base.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.model.clip.state_dict().items()}, str(path))
    return path


# ---- what conftest's fixtures return (the fixtures themselves live there) -----------------------------------


@dataclass(frozen=True, eq=False)
class SyntheticBundle:
    """A synthetic bundle written by conftest (a fixed random linear "image tower", then the CLIPN scoring
    ops) and the numpy twin of its engine."""

    root: Path
    classes: list[str]
    encoder: npt.NDArray[np.float32]  # (3·S·S)×D
    bank: npt.NDArray[np.float32]  # C×D, unit rows
    bank_no: npt.NDArray[np.float32]
    scale: float
    preprocess: Preprocess

    def reference(self, batch: npt.ArrayLike) -> Scores:
        """clipn_runtime.scoring applied to the encoder's features of ``batch`` (N×3×S×S normalised fp32)."""
        from clipn_runtime.scoring import score_features

        x = np.asarray(batch, dtype=np.float64)
        x = x.reshape(len(x), -1)
        return score_features(x @ self.encoder.astype(np.float64), self.bank, self.bank_no, self.scale)


class SyntheticBundleFactory(Protocol):
    """conftest's ``synthetic_bundle_factory``: a fresh :class:`SyntheticBundle` in its own temp folder."""

    def __call__(
        self,
        classes: list[str],
        *,
        image_size: int = ...,
        dim: int = ...,
        scale: float = ...,
        input_dtype: str = ...,
        input_layout: str = ...,
        full_outputs: bool = ...,
        seed: int = ...,
    ) -> SyntheticBundle: ...


class TinyBundleFactory(Protocol):
    """conftest's ``tiny_bundle_factory``: a fresh bundle folder of ``tiny_clipn``; ``options`` are
    :class:`clipn_export.options.ExportOptions` fields (``fp16=True``, ``uint8_input=True`` …)."""

    def __call__(self, classes: list[str] | None = None, **options: Any) -> Path: ...
