"""The one way clipn-ood writes a file (atomically) and hashes one (sha256); torch-free, used by every package.

``atomic_write``/``atomic_writer``: the new content goes to a unique hidden temporary file in the target's own
directory, is flushed and fsynced, then renamed over the target (``os.replace``, atomic on POSIX and Windows),
and the directory is fsynced where the platform allows, so after a crash ``path`` holds the old or the new
content, never a torn file.

File mode: the temporary file is created with ``os.open(..., 0o666)``, so the kernel applies the process umask
(or the directory's default ACL) exactly as for any ordinary ``open()``: ``0o644`` under umask 022, ``0o600``
under 077. This is why the temporary file is not made with :func:`tempfile.mkstemp`, which always creates
``0o600``, and why the umask is never read: reading it portably means ``os.umask`` twice, which briefly
changes it for every thread of the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

#: Read size when hashing; large enough that hashing a multi-GB engine is bound by the disk, not by calls.
CHUNK = 1 << 20
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty, uniquely named file beside ``path``, created with mode 0o666 & ~umask."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:  # a name collision (or a leftover of a crash): draw another
            continue


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; skipped where directories cannot be opened or synced (Windows, some FUSE)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces ``path`` atomically when the ``with`` block ends.

    If the block raises, ``path`` is left untouched and the temporary file is removed. Missing parent
    directories are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (``str`` as UTF-8) to ``path`` atomically (see the module docstring); returns the path."""
    with atomic_writer(path) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in chunks (constant memory for any file size)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def replace_dir(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Put the finished folder ``staging`` (a sibling of ``target``, on the same file system) at ``target``.

    An old ``target`` is moved aside first and removed only after the new one is in place, so a reader (or a
    crash) sees the old folder or the new one, never a half-written one — except for the instant between the
    two renames, where ``target`` is briefly absent."""
    staging, target = Path(staging), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)  # the new folder could not be put in place: the old one goes back
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
