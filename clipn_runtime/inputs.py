"""Expanding ``clipn-detect`` INPUTS into a lazy stream of images and videos.

An input is an image file, a folder (its images and videos; subfolders with ``recursive``), ``@list.txt`` (one
path per line, relative to the current directory; blank lines and ``#`` comments skipped) or a video file or
stream URL. Nothing is read ahead: folders are listed one directory at a time (sorted by name, so runs and
``--resume`` are reproducible), list files line by line, so memory stays flat over any number of inputs.

A path that does not exist is still yielded (as an image): the detector turns it into an error record rather
than stopping the run.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO

from PIL import Image

from clipn_runtime.errors import InputFileError

log = logging.getLogger(__name__)

#: Extensions taken as video (PyAV/FFmpeg decodes them).
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".flv", ".wmv"}
)
_URL = re.compile(r"^(rtsp|rtsps|rtmp|rtmps|http|https|udp|tcp|srt|file)://", re.IGNORECASE)


@dataclass(frozen=True)
class InputItem:
    """One input: ``kind`` is ``"image"`` or ``"video"``."""

    path: str
    kind: str


@cache
def image_extensions() -> frozenset[str]:
    """Every file extension Pillow can open (``.jpg``, ``.png``, ``.webp``, ``.tif``, …), lower case."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_url(spec: str) -> bool:
    return bool(_URL.match(spec))


def kind_of(path: str) -> str:
    """``"video"`` for a stream URL or a video extension, else ``"image"``."""
    if is_url(path) or os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS:
        return "video"
    return "image"


def check_list_files(specs: Iterable[str]) -> None:
    """Fail early (before any work) on an ``@list`` input that cannot be read."""
    for spec in specs:
        if spec.startswith("@"):
            p = Path(spec[1:])
            if not p.is_file() or not os.access(p, os.R_OK):
                raise InputFileError(p, None, "cannot read this list of inputs (@FILE: one path per line)")


def expand_inputs(specs: Iterable[str], *, recursive: bool = False) -> Iterator[InputItem]:
    """Lazily expand INPUTS into images and videos, in order."""
    for spec in specs:
        if spec.startswith("@"):
            yield from _from_list(Path(spec[1:]), recursive)
        else:
            yield from _expand_one(spec, recursive)


def _open_list(list_file: Path) -> IO[str]:
    try:
        return open(list_file, encoding="utf-8-sig")
    except OSError as e:
        raise InputFileError(list_file, None, f"cannot read: {e.strerror or e}") from None


def _from_list(list_file: Path, recursive: bool) -> Iterator[InputItem]:
    with _open_list(list_file) as fh:
        lineno = 0
        try:
            for lineno, raw in enumerate(fh, 1):  # noqa: B007 (lineno is used in the error below)
                line = raw.rstrip("\r\n").strip()
                if line and not line.startswith("#"):
                    yield from _expand_one(line, recursive)
        except UnicodeDecodeError:
            raise InputFileError(list_file, lineno + 1, "not valid UTF-8; save the list as UTF-8") from None


def _expand_one(spec: str, recursive: bool) -> Iterator[InputItem]:
    if is_url(spec):
        yield InputItem(spec, "video")
    elif os.path.isdir(spec):
        found = False
        for item in _walk(spec, recursive):
            found = True
            yield item
        if not found:
            log.warning(
                "%s: no images or videos found%s", spec, "" if recursive else " (use --recursive for subfolders)"
            )
    else:
        yield InputItem(spec, kind_of(spec))


def _walk(folder: str, recursive: bool) -> Iterator[InputItem]:
    wanted = image_extensions() | VIDEO_EXTENSIONS
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        log.warning("%s: cannot list folder: %s", folder, e.strerror or e)
        return
    subdirs = []
    for entry in entries:
        # Directory symlinks are not followed (no loops); file symlinks are, broken ones become error records;
        # pipes, sockets and devices are skipped (opening a pipe would block).
        if entry.is_dir(follow_symlinks=False):
            subdirs.append(entry.path)
        elif os.path.splitext(entry.name)[1].lower() in wanted and (entry.is_file() or entry.is_symlink()):
            yield InputItem(entry.path, kind_of(entry.name))
    if recursive:
        for d in subdirs:
            yield from _walk(d, recursive)
