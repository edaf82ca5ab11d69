"""Image preprocessing: open_clip's eval transform, re-done with PIL and numpy (no torch).

open_clip (3.x) builds its eval transform as ``Resize(size, bicubic) → CenterCrop(size) → convert("RGB") →
ToTensor → Normalize`` — note that the resize and crop run on the image *in its original mode* and the RGB
conversion comes after them. That order matters for palette images (PIL resizes ``P`` with nearest neighbour),
for images with alpha (PIL resizes ``LA``/``RGBA`` premultiplied) and for 16-bit images, so this module keeps it.
torchvision's ``Resize`` on a PIL image computes the output size as ``(size, int(size·long/short))`` and returns
the image untouched when the size already matches; ``CenterCrop`` offsets by ``int(round((h − size) / 2))``;
``ToTensor`` divides by 255 in fp32; ``Normalize`` subtracts and divides in fp32. The parity test compares this
module with open_clip's own transform over many sizes and modes.

Like open_clip, EXIF orientation is *not* applied (``PIL.Image.open`` does not rotate).
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from clipn_runtime.bundle import CROPS, RESIZE_MODES, Preprocess

UInt8Array = npt.NDArray[np.uint8]

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class ImageDecodeError(Exception):
    """An input that cannot be turned into pixels; ``str(e)`` is the message for the error record."""


def default_max_pixels() -> int:
    """PIL's decompression-bomb limit (about 89 Mpx by default, read now so an app's override is honoured)."""
    return int(Image.MAX_IMAGE_PIXELS or 0) or 2**63 - 1


def open_image(path: str | os.PathLike[str] | io.BytesIO, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode ``path``; every failure becomes an :class:`ImageDecodeError` with a clear message.
    A file's content already in memory (a shard member, a Ray column) comes as a ``BytesIO`` and is decoded and
    reported exactly as the same file would be.

    ``max_pixels`` refuses images larger than that many pixels *before* decoding them (decompression bombs);
    ``None`` means PIL's limit. PIL itself raises for images over twice its limit, reported the same way.
    """
    limit = default_max_pixels() if max_pixels is None else max_pixels
    p = path if isinstance(path, io.BytesIO) else Path(path)
    try:
        if isinstance(p, Path) and not (stat.S_ISREG(mode := p.stat().st_mode) or stat.S_ISDIR(mode)):
            raise ImageDecodeError("not a regular file (a pipe, socket or device)")
        with Image.open(p) as im:
            w, h = im.size
            if w * h > limit:
                raise ImageDecodeError(
                    f"image is {w}×{h} = {w * h} pixels, over the limit of {limit} (decompression-bomb guard); "
                    "raise it with --max-pixels if the file is trusted"
                )
            im.load()
            # ``load`` keeps the file handle for some formats; a detached copy lets the ``with`` close it.
            return im.copy()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        # Pillow's own hard limit (twice its MAX_IMAGE_PIXELS) stops it before the header is ours to read.
        raise ImageDecodeError(
            f"refused as a decompression bomb ({e}); raise the limit with --max-pixels if the file is trusted"
        ) from None
    except FileNotFoundError:
        what = "broken symbolic link" if isinstance(p, Path) and p.is_symlink() else "no such file"
        raise ImageDecodeError(what) from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory, not an image file") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except UnidentifiedImageError:
        size = _size_or_none(p)
        if size == 0:
            raise ImageDecodeError("empty file (0 bytes)") from None
        raise ImageDecodeError("not an image (PIL cannot identify the file format)") from None
    except OSError as e:
        if e.errno is not None:  # the OS failed to read the file (EIO, ...), as opposed to bad image data
            raise ImageDecodeError(f"cannot read file: {e.strerror or e}") from None
        if "truncated" in str(e).lower():
            raise ImageDecodeError(f"truncated image file ({e})") from None
        raise ImageDecodeError(f"cannot decode image: {e}") from None
    except (SyntaxError, ValueError, EOFError, MemoryError) as e:
        # PIL reports truncated and corrupt data as OSError ("image file is truncated"), SyntaxError (broken
        # headers in some plugins) or ValueError/EOFError.
        raise ImageDecodeError(f"cannot decode image: {e}") from None


def _size_or_none(p: Path | io.BytesIO) -> int | None:
    if isinstance(p, io.BytesIO):
        return p.getbuffer().nbytes
    try:
        return p.stat().st_size
    except OSError:
        return None


@dataclass(frozen=True)
class Preprocessor:
    """The bundle's eval transform: PIL image → the engine's per-image input (CHW float32 or HWC uint8)."""

    spec: Preprocess

    def __post_init__(self) -> None:
        if self.spec.resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.spec.resize!r}; expected one of {RESIZE_MODES}")
        if self.spec.crop not in CROPS:
            raise ValueError(f"unknown crop {self.spec.crop!r}; only centre cropping is supported")

    @property
    def resample(self) -> Image.Resampling:
        # open_clip maps 'random' (train-time) and anything but 'bilinear' to bicubic for eval.
        return _RESAMPLE.get(self.spec.interpolation, Image.Resampling.BICUBIC)

    def crop(self, img: Image.Image) -> UInt8Array:
        """Resize, crop and convert to RGB exactly as open_clip does: an HWC uint8 array of ``image_size``²."""
        size = self.spec.image_size
        if self.spec.resize == "shortest":
            img = _resize(img, _shortest_side_size(img.size, size), self.resample)
            img = _center_crop(img, size)
        elif self.spec.resize == "squash":
            img = _resize(img, (size, size), self.resample)
        else:  # longest: fit inside, then pad to the square (open_clip's ResizeKeepRatio + CenterCropOrPad)
            w, h = img.size
            ratio = max(h / size, w / size)
            img = _resize(img, (round(w / ratio), round(h / ratio)), self.resample)
            img = _center_crop(img, size)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8)

    def normalize(self, crop: UInt8Array) -> npt.NDArray[np.float32]:
        """HWC uint8 → CHW float32: ``/255`` then ``(x − mean) / std``, in fp32 as torchvision does."""
        x = crop.astype(np.float32) / np.float32(255.0)
        x -= np.asarray(self.spec.mean, dtype=np.float32)
        x /= np.asarray(self.spec.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def __call__(self, img: Image.Image) -> np.ndarray:
        """The engine's input for one image (no batch axis), in its layout and dtype."""
        crop = self.crop(img)
        if self.spec.input_dtype == "uint8":
            return crop if self.spec.input_layout == "NHWC" else np.ascontiguousarray(crop.transpose(2, 0, 1))
        x = self.normalize(crop)
        if self.spec.input_layout == "NHWC":
            x = np.ascontiguousarray(x.transpose(1, 2, 0))
        return x.astype(np.float16) if self.spec.input_dtype == "float16" else x

    def batch(self, items: list[np.ndarray]) -> np.ndarray:
        """Stack per-image inputs into the engine's batch."""
        return np.stack(items, axis=0)

    def from_array(self, array: npt.ArrayLike) -> Image.Image:
        """An HWC uint8 RGB array (a video frame, a camera buffer) as a PIL image for :meth:`__call__`."""
        a = np.asarray(array)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"expected an H×W×3 uint8 RGB array, got shape {a.shape} and dtype {a.dtype}")
        return Image.fromarray(np.ascontiguousarray(a))  # H×W×3 uint8 is RGB


def _shortest_side_size(wh: tuple[int, int], size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` output (w, h): the short side becomes ``size``, the long one is truncated."""
    w, h = wh
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (size, new_long) if w <= h else (new_long, size)


def _resize(img: Image.Image, wh: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    if img.size == wh:  # torchvision returns the image untouched when the size already matches
        return img
    return img.resize(wh, resample)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if size > w or size > h:
        # torchvision pads with 0 (then crops) when the image is smaller than the crop: only reachable in the
        # 'longest' mode. Palette images are padded on their indices, as torchvision does.
        ltrb = (
            (size - w) // 2 if size > w else 0,
            (size - h) // 2 if size > h else 0,
            (size - w + 1) // 2 if size > w else 0,
            (size - h + 1) // 2 if size > h else 0,
        )
        if img.mode == "P":
            palette = img.getpalette()
            idx = np.pad(np.asarray(img), ((ltrb[1], ltrb[3]), (ltrb[0], ltrb[2])), constant_values=0)
            padded = Image.fromarray(idx)
            if palette is not None:
                padded.putpalette(palette)
            img = padded
        else:
            img = ImageOps.expand(img, border=ltrb, fill=0)
        w, h = img.size
        if (w, h) == (size, size):
            return img
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))
