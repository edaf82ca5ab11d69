"""The runtime's preprocessing equals open_clip's own eval transform, pixel for pixel, over many sizes and modes."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from clipn_runtime.bundle import Preprocess
from clipn_runtime.preprocess import ImageDecodeError, Preprocessor, open_image

if TYPE_CHECKING:
    import torch

# OpenAI CLIP's normalisation (open_clip.OPENAI_DATASET_MEAN/STD), as numbers so that the tests below that do not
# compare with open_clip also run on a runtime-only install.
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# Sizes around the crop size (smaller, equal, larger), odd sizes, extreme aspect ratios, a 1-pixel side.
SIZES = [
    (32, 32),
    (33, 31),
    (31, 33),
    (64, 65),
    (300, 200),
    (200, 300),
    (7, 100),
    (100, 7),
    (1, 5),
    (5, 1),
    (24, 24),
]
MODES = ["RGB", "L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "I", "F", "1", "YCbCr", "RGBa"]


def _image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        # 16-bit greyscale: full range (open_clip's convert("RGB") clips values above 255)
        return Image.frombytes("I;16", (w, h), rng.integers(0, 65535, (h, w), dtype=np.uint16).tobytes())
    if mode == "P":
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        im = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=37)
        im.info["transparency"] = 3  # a transparent palette entry, as GIFs and PNGs have
        return im
    return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)


def _pair(
    resize: str, size: int = 32, interpolation: str = "bicubic"
) -> tuple[Callable[[Image.Image], torch.Tensor], Preprocessor]:
    """open_clip's eval transform (the reference; skips on a runtime-only install) and ours."""
    open_clip = pytest.importorskip("open_clip", reason="the parity reference is open_clip (the `train` extra)")
    assert (tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)) == (MEAN, STD)
    ref = open_clip.image_transform(
        size, is_train=False, mean=MEAN, std=STD, resize_mode=resize, interpolation=interpolation
    )
    ours = Preprocessor(Preprocess(size, MEAN, STD, interpolation=interpolation, resize=resize))
    return ref, ours


@pytest.mark.parametrize("resize", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("mode", MODES)
def test_parity_with_open_clip(mode: str, resize: str) -> None:
    ref, ours = _pair(resize)
    worst = 0.0
    for i, (w, h) in enumerate(SIZES):
        im = _image(mode, w, h, seed=i)
        expected = ref(im.copy()).numpy()
        got = ours(im.copy())
        assert got.shape == expected.shape == (3, 32, 32) and got.dtype == np.float32
        worst = max(worst, float(np.abs(got - expected).max()))
    assert worst <= 1e-6, f"{mode}/{resize}: max |Δ| = {worst}"


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_parity_real_size_and_interpolation(interpolation: str) -> None:
    ref, ours = _pair("shortest", size=224, interpolation=interpolation)
    for i, (w, h) in enumerate([(640, 480), (480, 640), (224, 224), (1000, 225), (150, 150)]):
        im = _image("RGB", w, h, seed=100 + i)
        assert np.abs(ours(im) - ref(im).numpy()).max() <= 1e-6


@pytest.mark.parametrize(
    ("fmt", "mode", "kw"),
    [
        ("PNG", "I;16", {}),  # 16-bit PNG
        ("PNG", "P", {"transparency": 0}),  # palette PNG with a transparent index
        ("PNG", "LA", {}),
        ("GIF", "P", {}),
        ("JPEG", "CMYK", {"quality": 90}),  # CMYK JPEGs (Adobe) decode inverted in some readers
        ("JPEG", "L", {"quality": 90}),
        ("TIFF", "RGBA", {}),
        ("WEBP", "RGB", {"quality": 80}),
        ("BMP", "RGB", {}),
    ],
)
def test_parity_on_encoded_files(tmp_path: Path, fmt: str, mode: str, kw: dict[str, object]) -> None:
    """Decoded files (what clipn-detect sees) go through the same transform as open_clip's dataloaders."""
    src = _image(mode if mode != "P" else "P", 57, 41, seed=7)
    if fmt == "GIF":
        src = src.convert("RGB").convert("P")
    path = tmp_path / f"x.{fmt.lower()}"
    src.save(path, format=fmt, **kw)
    ref, ours = _pair("shortest")
    got = ours(open_image(path))
    with Image.open(path) as im:
        expected = ref(im).numpy()
    assert np.abs(got - expected).max() <= 1e-6


def test_input_layouts_and_dtypes() -> None:
    im = _image("RGB", 50, 40, seed=3)
    base = Preprocessor(Preprocess(32, MEAN, STD))
    x = base(im)
    crop = base.crop(im)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    nhwc = Preprocessor(Preprocess(32, MEAN, STD, input_layout="NHWC"))(im)
    np.testing.assert_array_equal(nhwc, x.transpose(1, 2, 0))
    half = Preprocessor(Preprocess(32, MEAN, STD, input_dtype="float16"))(im)
    assert half.dtype == np.float16 and np.abs(half.astype(np.float32) - x).max() < 1e-2
    raw = Preprocessor(Preprocess(32, MEAN, STD, input_layout="NHWC", input_dtype="uint8"))(im)
    np.testing.assert_array_equal(raw, crop)
    # the uint8 crop normalised elsewhere (inside the graph) gives back the float input exactly
    np.testing.assert_array_equal(base.normalize(raw), x)


def test_from_array_round_trip() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    pre = Preprocessor(Preprocess(32, MEAN, STD))
    np.testing.assert_array_equal(pre(pre.from_array(arr)), pre(Image.fromarray(arr)))
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        pre.from_array(arr.astype(np.float32))
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        pre.from_array(arr[..., 0])


def test_unknown_resize_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown resize mode"):
        Preprocessor(Preprocess(32, MEAN, STD, resize="fill"))


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w×h pixels (a decompression bomb needs no pixel data to be refused)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_open_image_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    _image("RGB", 20, 20, 0).save(good)
    buf = io.BytesIO()
    _image("RGB", 64, 64, 1).save(buf, format="JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, I am not an image")
    (tmp_path / "dir.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would block forever
    if Path("/proc/self/mem").exists():
        (tmp_path / "eio.png").symlink_to("/proc/self/mem")
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "bomb.png").write_bytes(_png_header_only(30000, 30000))  # over 2× PIL's limit: PIL refuses
    (tmp_path / "big.png").write_bytes(_png_header_only(10000, 10000))  # between 1× and 2×: PIL only warns
    expected = {
        "trunc.jpg": "truncated image file",
        "empty.png": "empty file",
        "text.jpg": "not an image",
        "dir.png": "is a directory",
        "pipe.png": "not a regular file",
        **({"eio.png": "cannot read file: Input/output error"} if Path("/proc/self/mem").exists() else {}),
        "link.png": "broken symbolic link",
        "missing.png": "no such file",
        "bomb.png": "decompression bomb",
        "big.png": "decompression-bomb guard",
    }
    assert open_image(good).size == (20, 20)
    for name, fragment in expected.items():
        warns = pytest.warns(Image.DecompressionBombWarning) if name == "big.png" else contextlib.nullcontext()
        with warns, pytest.raises(ImageDecodeError, match=fragment):
            open_image(tmp_path / name)
    # A lower limit of the caller's applies before PIL's.
    with pytest.raises(ImageDecodeError, match="over the limit of 100"):
        open_image(good, max_pixels=100)
