"""Expanding ``clipn-detect`` INPUTS into a lazy stream of images and videos.

An input is an image file, a folder (its images and videos; subfolders with ``recursive``, symbolic links to
folders included, each real folder listed once so link loops end), ``@list.txt`` (one path per line, relative to
the current directory; blank lines and ``#`` comments skipped), a video file or stream URL, or webdataset tar
shards (``x.tar``, ``shards/{00000..00099}.tar``, ``pipe:cmd``; see :mod:`clipn_runtime.shards`). Nothing is read
ahead: folders are listed one directory at a time (sorted by name, so runs and ``--resume`` are reproducible),
list files line by line, so memory stays flat over any number of inputs.

A path that does not exist is still yielded (as an image): the detector turns it into an error record rather
than stopping the run.

File names are bytes on POSIX and need not be valid UTF-8 (scraped data often has Latin-1 names); Python hands
them over as strings with "surrogate escapes", which open() takes back exactly but which cannot be written as
UTF-8 text. :func:`printable` and :func:`path_fields` give every record a valid-UTF-8 name plus, only for
such names, the exact bytes (``path_b64``); :func:`path_from_fields` turns a record back into the path.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO

from PIL import Image

from clipn_runtime.errors import InputFileError, UserError

log = logging.getLogger(__name__)

#: Extensions taken as video (PyAV/FFmpeg decodes them).
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".flv", ".wmv"}
)
_URL = re.compile(r"^(rtsp|rtsps|rtmp|rtmps|http|https|udp|tcp|srt|file)://", re.IGNORECASE)


@dataclass(frozen=True)
class InputItem:
    """One input: ``kind`` is ``"image"``, ``"video"`` or ``"shard"`` (one webdataset tar shard, its samples
    scored as images)."""

    path: str
    kind: str


@cache
def image_extensions() -> frozenset[str]:
    """Every file extension Pillow can open (``.jpg``, ``.png``, ``.webp``, ``.tif``, …), lower case."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


#: The record field holding a path's exact bytes (base64) when the path is not valid UTF-8.
PATH_BYTES_FIELD = "path_b64"


def printable(text: str) -> str:
    """``text`` (a path, or a message quoting one) as valid UTF-8: unchanged when it is, else its undecodable
    bytes as ``\\xNN`` escapes.

    Readable, but not unique on its own (a file may really be named ``caf\\xe9.png``): records pair a path with
    :func:`path_fields`' exact form.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
            return text.encode("utf-8", "backslashreplace").decode("utf-8")


def path_fields(path: str) -> dict[str, str]:
    """The record fields naming ``path``: ``path`` (printable), and ``path_b64`` (the exact bytes, base64) only
    when the name is not valid UTF-8."""
    shown = printable(path)
    if shown == path:
        return {"path": path}
    try:
        exact = os.fsencode(path)
    except UnicodeEncodeError:  # not a name the file system can hold either: nothing exact to record
        return {"path": shown}
    return {"path": shown, PATH_BYTES_FIELD: base64.b64encode(exact).decode("ascii")}


def path_from_fields(record: Mapping[str, object]) -> str:
    """The exact path a record names (inverse of :func:`path_fields`); ValueError when it is malformed."""
    exact = record.get(PATH_BYTES_FIELD)
    if exact:
        try:
            return os.fsdecode(base64.b64decode(str(exact), validate=True))
        except (binascii.Error, ValueError):
            raise ValueError(f"{PATH_BYTES_FIELD} is not base64") from None
    path = record.get("path")
    if not isinstance(path, str):
        raise ValueError("no 'path'")
    return path


def is_url(spec: str) -> bool:
    return bool(_URL.match(spec))


def kind_of(path: str) -> str:
    """``"video"`` for a stream URL or a video extension, else ``"image"``."""
    if is_url(path) or os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS:
        return "video"
    return "image"


#: How much of an ``@list`` is looked at to tell a text list from a binary file (an image given with an @).
_SNIFF_BYTES = 1 << 16
#: C0 control bytes other than tab, CR and LF: file names have none, binary data has many.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def check_list_files(specs: Iterable[str]) -> None:
    """Fail early (before any work) on an ``@list`` input that cannot be read or is not a text list."""
    for spec in specs:
        if spec.startswith("@"):
            p = Path(spec[1:])
            if not p.is_file() or not os.access(p, os.R_OK):
                raise InputFileError(p, None, "cannot read this list of inputs (@FILE: one path per line)")
            why = _not_text(p)
            if why is not None:
                raise InputFileError(
                    p,
                    None,
                    f"not a text list ({why}); @FILE takes a text file with one path per line — to score this "
                    f"file itself, drop the @: {spec[1:]}",
                )


def _not_text(p: Path) -> str | None:
    """Why the start of ``p`` is binary data rather than a list of paths, or None. Names that are not UTF-8
    (Latin-1 lists from `find`) are text; NUL bytes, or control bytes on most lines, are not."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError as e:
        raise InputFileError(p, None, f"cannot read: {e.strerror or e}") from None
    if b"\0" in head:
        return "it holds NUL bytes"
    lines = [line for line in head.splitlines() if line.strip()]
    garbled = sum(1 for line in lines if _CONTROL.search(line))
    if lines and 2 * garbled > len(lines):
        return f"{garbled} of its first {len(lines)} lines hold control bytes"
    return None


def expand_inputs(specs: Iterable[str], *, recursive: bool = False) -> Iterator[InputItem]:
    """Lazily expand INPUTS into images and videos, in order."""
    for spec in specs:
        if spec.startswith("@"):
            yield from _from_list(Path(spec[1:]), recursive)
        else:
            yield from _expand_one(spec, recursive)


def require_inputs(items: Iterator[InputItem], *, recursive: bool = False) -> Iterator[InputItem]:
    """``items``, after checking that there is at least one: running on nothing is a mistake (a wrong folder, a
    missing ``--recursive``), not a success. Reads only up to the first input."""
    first = next(items, None)
    if first is None:
        hint = "" if recursive else "; add --recursive for subfolders"
        raise UserError(f"no images or videos found in INPUTS (folders are searched by file extension{hint})")
    return itertools.chain([first], items)


def _open_list(list_file: Path) -> IO[str]:
    try:
        # surrogateescape: a listed name that is not valid UTF-8 (from `find > list.txt` over scraped files)
        # reaches the file system as the same bytes, as a name typed on the command line does.
        return open(list_file, encoding="utf-8-sig", errors="surrogateescape")
    except OSError as e:
        raise InputFileError(list_file, None, f"cannot read: {e.strerror or e}") from None


def _from_list(list_file: Path, recursive: bool) -> Iterator[InputItem]:
    with _open_list(list_file) as fh:
        for raw in fh:
            line = raw.rstrip("\r\n").strip()
            if line and not line.startswith("#"):
                yield from _expand_one(line, recursive)


def _expand_one(spec: str, recursive: bool) -> Iterator[InputItem]:
    if is_url(spec):
        yield InputItem(spec, "video")
    elif os.path.isdir(spec):
        found = False
        for item in _walk(spec, recursive, set()):
            found = True
            yield item
        if not found:
            log.warning(
                "%s: no images or videos found%s", spec, "" if recursive else " (use --recursive for subfolders)"
            )
    else:
        from clipn_runtime.shards import expand_shards, is_shard_spec  # shards.py uses this module

        if is_shard_spec(spec):
            for shard in expand_shards(spec):
                yield InputItem(shard, "shard")
        else:
            yield InputItem(spec, kind_of(spec))


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows symbolic links: a linked folder is a folder
    except OSError:
        return False


def _walk(folder: str, recursive: bool, seen: set[str]) -> Iterator[InputItem]:
    """``folder``'s images and videos; ``seen`` holds the real paths of the folders already listed, so that a
    link loop (or two links to one folder) lists each real folder once."""
    real = os.path.realpath(folder)
    if real in seen:
        log.info("%s: skipped, already listed (it is %s)", folder, real)
        return
    seen.add(real)
    wanted = image_extensions() | VIDEO_EXTENSIONS
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        log.warning("%s: cannot list folder: %s", folder, e.strerror or e)
        return
    subdirs = []
    for entry in entries:
        # File symlinks are followed, broken ones become error records; pipes, sockets and devices are skipped
        # (opening a pipe would block).
        if _is_dir(entry):
            subdirs.append(entry.path)
        elif os.path.splitext(entry.name)[1].lower() in wanted and (entry.is_file() or entry.is_symlink()):
            yield InputItem(entry.path, kind_of(entry.name))
    if recursive:
        for d in subdirs:
            yield from _walk(d, recursive, seen)
