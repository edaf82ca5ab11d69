"""The calibration set of a static int8 engine: the user's own in-distribution images, read as the runtime reads them.

``clipn-export --int8 --calibration DIR|@list|FILE`` (repeatable) names the images; they are found the way
``clipn-detect`` finds its INPUTS (:mod:`clipn_runtime.inputs`: image files, folders — always with their
subfolders here, since ID sets usually come one folder per class — and ``@list.txt`` files), decoded and
preprocessed by the runtime's own code (:mod:`clipn_runtime.preprocess`), so that the activations the
quantiser measures are the ones the engine will see. Videos and webdataset shards among them are skipped
(counted): extract frames first.

Two steps, so that a mistake costs nothing: :func:`find_calibration_images` only lists files (before the model
loads: a missing folder or too few images is one line, exit 2) and picks at most ``size`` of them, spread
evenly over the sorted list (a folder per class must not calibrate on its first classes only);
:func:`load_calibration` reads and decodes the picked files once the model's preprocessing is known. Files that
cannot be decoded are skipped and counted, as ``clipn-detect`` does; fewer than :data:`MIN_CALIBRATION_IMAGES`
readable ones is refused.

The fingerprint identifies the images by content only (sha256 of the sorted per-file sha256s), so the same
images calibrate to the same record wherever they live on disk.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from clipn_runtime.bundle import Preprocess
from clipn_runtime.errors import UserError
from clipn_runtime.inputs import check_list_files, expand_inputs, is_url, printable
from clipn_runtime.preprocess import ImageDecodeError, Preprocessor, open_image

log = logging.getLogger(__name__)

#: Images the quantiser measures by default: NNCF's own default ``subset_size`` (nncf.quantize).
DEFAULT_CALIBRATION_SIZE = 300
#: Fewer readable images than this is refused: per-tensor activation ranges from a handful of images are
#: ranges of those images, not of the ID distribution. 16 is what the ViT-B-16 speed measurement calibrated on;
#: docs/export.md has the accuracy measured with it and with more.
MIN_CALIBRATION_IMAGES = 16
#: Held out for the parity gate by default: a quarter of the images found, within these bounds. On 16 images
#: Spearman's ρ moves in steps of 0.003 (one swapped neighbouring pair); on 64, 64× finer.
HOLD_OUT_BOUNDS = (16, 64)
#: How many unreadable files the warning names.
_NAMED = 3


@dataclass(frozen=True)
class CalibrationFiles:
    """The files picked to calibrate on (at most ``size``, in list order), those held out for the parity gate,
    and how many were found."""

    files: tuple[str, ...]
    #: images found in the inputs (before picking)
    found: int
    #: videos and shards skipped
    not_images: int
    #: images kept out of the calibration, for the parity gate (empty when there are too few images)
    held_out: tuple[str, ...] = ()


@dataclass(frozen=True)
class CalibrationSet:
    """Decoded calibration images as the engine's encoder takes them, and what identifies them."""

    #: H×W×3 uint8 crops (the runtime's resize + centre crop); :meth:`batches` normalises them
    crops: tuple[npt.NDArray[np.uint8], ...]
    preprocess: Preprocess
    #: sha256 of the sorted sha256s of the images used
    fingerprint: str
    found: int
    unreadable: int
    not_images: int
    #: crops of the held-out images (not calibrated on), for the parity gate
    held_out: tuple[npt.NDArray[np.uint8], ...] = ()

    def __len__(self) -> int:
        return len(self.crops)

    def batches(self) -> Iterator[npt.NDArray[np.float32]]:
        """One 1×3×S×S float32 batch per image: the encoder's input, normalised as the runtime normalises."""
        pre = Preprocessor(self.preprocess)
        for crop in self.crops:
            yield pre.normalize(crop)[None]

    def record(self) -> dict[str, object]:
        """What the manifest records about the calibration data."""
        return {
            "images": len(self.crops),
            "found": self.found,
            "unreadable": self.unreadable,
            "not_images": self.not_images,
            "held_out_for_parity": len(self.held_out),
            "fingerprint": f"sha256:{self.fingerprint}",
            "fingerprint_of": "sorted sha256 of each image file used (content only, not paths)",
            "preprocess": "clipn_runtime.preprocess (the bundle's resize, centre crop and normalisation)",
        }


def check_calibration_options(specs: Sequence[str], size: int, int8: bool) -> None:
    """The options alone, before anything is read."""
    if not specs:
        return
    if not int8:
        raise UserError("--calibration calibrates the int8 engine; add --int8 (or drop --calibration)")
    if size < MIN_CALIBRATION_IMAGES:
        raise UserError(f"--calibration-size must be ≥ {MIN_CALIBRATION_IMAGES}, got {size}")


def require_nncf() -> None:
    """NNCF (the `export` extra) must be importable: checked before any work, as a missing extra."""
    import importlib.util

    if importlib.util.find_spec("nncf") is None:
        from clipn_runtime.clikit import MissingExtra

        raise MissingExtra("nncf", "export", "static int8 with --calibration uses NNCF")


def default_hold_out(found: int) -> int:
    """How many of ``found`` images the parity gate takes by default: a quarter, within :data:`HOLD_OUT_BOUNDS`."""
    low, high = HOLD_OUT_BOUNDS
    return min(high, max(low, found // 4))


def find_calibration_images(
    specs: Sequence[str], size: int = DEFAULT_CALIBRATION_SIZE, hold_out: int | None = 0
) -> CalibrationFiles:
    """List the images of ``specs`` (files, folders with subfolders, ``@lists``) and pick at most ``size``;
    first set aside ``hold_out`` of them for the parity gate (``None``: :func:`default_hold_out`), when that
    leaves :data:`MIN_CALIBRATION_IMAGES`.

    Raises :class:`UserError` for a missing path, an unreadable list, or fewer than
    :data:`MIN_CALIBRATION_IMAGES` images.
    """
    specs = [str(s) for s in specs]
    for spec in specs:
        if is_url(spec):
            raise UserError(f"--calibration {spec}: a stream URL; calibration takes image files, folders, @lists")
        if not spec.startswith("@") and not os.path.exists(spec):
            raise UserError(f"--calibration {printable(spec)}: no such file or folder")
    check_list_files(specs)
    images: list[str] = []
    not_images = 0
    quiet = _Held()  # "FOLDER: no images found": said once below, or by the error when there are too few
    inputs_log = logging.getLogger(expand_inputs.__module__)
    inputs_log.addFilter(quiet)
    try:
        for item in expand_inputs(specs, recursive=True):
            if item.kind == "image":
                images.append(item.path)
            else:
                not_images += 1
    finally:
        inputs_log.removeFilter(quiet)
    skipped = f"{not_images} videos/shards skipped (calibration takes images; extract frames)"
    if len(images) < MIN_CALIBRATION_IMAGES:
        where = " ".join(printable(s) for s in specs)
        raise UserError(
            f"--calibration {where}: {len(images)} images found, at least {MIN_CALIBRATION_IMAGES} are needed "
            f"(a few hundred of your own in-distribution images is right; at most {DEFAULT_CALIBRATION_SIZE} are "
            f"calibrated on by default){'; ' + skipped if not_images else ''}"
        )
    for message in quiet.messages:
        log.warning("calibration: %s", message)
    if not_images:
        log.warning("calibration: %s", skipped)
    if hold_out is None:
        hold_out = default_hold_out(len(images))
    held: tuple[str, ...] = ()
    if hold_out and len(images) - hold_out >= MIN_CALIBRATION_IMAGES:
        held = _spread(images, hold_out)
        kept = set(held)
        images_left = [f for f in images if f not in kept]
    else:
        images_left = images
    return CalibrationFiles(_spread(images_left, size), len(images), not_images, held)


class _Held(logging.Filter):
    """Holds back the warnings of the input listing (kept in ``messages``)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())
            return False
        return True


def _spread(items: list[str], k: int) -> tuple[str, ...]:
    """``k`` items spread evenly over ``items`` (all of them when there are no more than ``k``), in order."""
    if len(items) <= k:
        return tuple(items)
    idx = np.linspace(0, len(items) - 1, k).round().astype(int)
    return tuple(items[i] for i in idx)


def load_calibration(found: CalibrationFiles, preprocess: Preprocess) -> CalibrationSet:
    """Read, hash, decode and crop the picked files with the bundle's preprocessing; skip (and count) the ones
    that cannot be decoded. Raises :class:`UserError` when fewer than :data:`MIN_CALIBRATION_IMAGES` remain."""
    # The encoder always takes normalised float NCHW pixels (a --uint8-input engine normalises in front of it).
    spec = replace(preprocess, input_layout="NCHW", input_dtype="float32")
    pre = Preprocessor(spec)
    crops: list[npt.NDArray[np.uint8]] = []
    digests: list[str] = []
    bad: list[str] = []
    for path in found.files:
        got = _read(path, pre, bad)
        if got is not None:
            crops.append(got[0])
            digests.append(got[1])
    held_read = [got for path in found.held_out if (got := _read(path, pre, bad)) is not None]
    if len(crops) < MIN_CALIBRATION_IMAGES <= len(crops) + len(held_read):
        # Files were held out by count, before decoding: calibrate on all readable ones rather than refuse.
        log.warning(
            "calibration: too few decodable images to hold any out; the parity gate checks calibration ones"
        )
        crops += [c for c, _ in held_read]
        digests += [d for _, d in held_read]
        held_read = []
    held = [c for c, _ in held_read]
    if bad:
        total = len(found.files) + len(found.held_out)
        log.warning(
            "calibration: %d of %d images skipped (cannot be decoded): %s%s",
            len(bad), total, "; ".join(bad[:_NAMED]), " …" if len(bad) > _NAMED else "",
        )  # fmt: skip
    if len(crops) < MIN_CALIBRATION_IMAGES:
        raise UserError(
            f"--calibration: only {len(crops)} of {len(found.files)} images could be decoded, at least "
            f"{MIN_CALIBRATION_IMAGES} are needed"
        )
    fingerprint = hashlib.sha256("\n".join(sorted(digests)).encode("ascii")).hexdigest()
    return CalibrationSet(tuple(crops), spec, fingerprint, found.found, len(bad), found.not_images, tuple(held))


def _read(path: str, pre: Preprocessor, bad: list[str]) -> tuple[npt.NDArray[np.uint8], str] | None:
    """The crop and sha256 of one file, or None (and why, appended to ``bad``)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        return pre.crop(open_image(io.BytesIO(data))), hashlib.sha256(data).hexdigest()
    except OSError as e:
        bad.append(f"{printable(path)}: cannot read file: {e.strerror or e}")
    except ImageDecodeError as e:
        bad.append(f"{printable(path)}: {e}")
    return None
