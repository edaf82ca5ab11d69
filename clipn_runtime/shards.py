"""Webdataset tar shards as ``clipn-detect`` inputs: local ``.tar`` files, brace patterns and ``pipe:`` URLs.

Shards are read with the ``webdataset`` library (the ``shards`` extra), imported only when a shard is given.
Each sample becomes one :class:`ShardSample` named ``shard#key``; its image member (the first member whose
extension Pillow opens) is decoded by the detector exactly as a file with the same bytes would be. A sample
without an image member, and a shard that cannot be opened or breaks part way (truncated, a failing pipe),
become error samples: the run goes on, and :attr:`ShardReader.complete` stays False so ``--resume`` reads that
shard again (skipping the samples already written). :class:`ShardStream` chains consecutive shards into one
stream for the detector, and tells when a shard's last sample has been written.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from clipn_runtime.inputs import image_extensions

log = logging.getLogger(__name__)

#: Local shard files are recognised by these endings (webdataset reads compressed tars as well).
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PIPE_PREFIX = "pipe:"
#: Separates a shard from a sample key in record names.
SEP = "#"


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard: ``data`` is its image member's bytes, or ``error`` says why there is none."""

    name: str
    data: bytes | None = None
    error: str | None = None


def is_shard_spec(spec: str) -> bool:
    """Whether an input names shards: a ``pipe:`` URL or a tar file name (brace patterns included)."""
    return spec.startswith(PIPE_PREFIX) or spec.lower().endswith(SHARD_SUFFIXES)


def is_pipe(spec: str) -> bool:
    return spec.startswith(PIPE_PREFIX)


def _webdataset() -> Any:
    # webdataset imports torch when it is installed (about 2 s of start-up per clipn-detect run, measured by
    # benchmarks/bench_scale.py, and the runtime stays torch-free); its torch-less fallbacks are all tar reading
    # needs. A process that already has torch keeps webdataset's torch classes.
    block = "torch" not in sys.modules and "webdataset" not in sys.modules
    if block:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import webdataset
    except ImportError as e:
        from clipn_runtime.clikit import MissingExtra

        raise MissingExtra("webdataset", "shards", "" if e.name == "webdataset" else str(e)) from None
    finally:
        if block:
            del sys.modules["torch"]
    return webdataset


def expand_shards(spec: str) -> list[str]:
    """The shards a pattern names (``shards/{00000..00009}.tar`` → ten names), in order, as webdataset expands
    them for ``clipn-train``."""
    return list(_webdataset().shardlists.expand_urls(spec))


def _image_member(sample: dict[str, Any]) -> bytes | None:
    exts = image_extensions()
    for member in sorted(k for k in sample if not k.startswith("__")):
        if "." + member.rsplit(".", 1)[-1].lower() in exts and isinstance(sample[member], bytes):
            return bytes(sample[member])
    return None


class ShardReader:
    """The samples of one shard, in order; :attr:`complete` is True once the shard was read to its end."""

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.complete = False

    def name(self, key: str) -> str:
        return f"{self.shard}{SEP}{key}"

    def __iter__(self) -> Iterator[ShardSample]:
        tar = _webdataset().tariterators
        read = 0
        tail = _Tail()
        try:
            opened = (
                {**src, "stream": tail.track(src["stream"])} for src in tar.url_opener([{"url": self.shard}])
            )
            for sample in tar.group_by_keys(tar.tar_file_expander(opened)):
                read += 1
                name = self.name(str(sample.get("__key__")))
                data = _image_member(sample)
                if data is None:
                    members = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"
                    yield ShardSample(name, error=f"no image member in this sample (members: {members})")
                else:
                    yield ShardSample(name, data)
            tail.check_end()
        except Exception as e:  # truncated tar, missing file, failing pipe: every shard reports alike
            log.debug("%s: reading failed", self.shard, exc_info=True)
            yield ShardSample(self.shard, error=_shard_failure(e, read))
            return
        finally:
            tail.close()
        self.complete = True


class ShardStream:
    """The samples of consecutive shards as one stream, so that the detector's batches span shards (no decode
    pipeline restart and no partial batch per shard).

    ``skip(shard)``: a shard an earlier run finished, not opened. ``claim(name)``: whether a sample is still to be
    scored. A shard's failure record is named by the shard itself and never claimed, so ``--resume`` reports it
    again. Feed :meth:`written` the number of samples written after each batch: it answers the shards whose
    every sample is now written (in the results), so they can be noted as finished.
    """

    def __init__(
        self, shards: Iterable[str], *, skip: Callable[[str], bool], claim: Callable[[str], bool]
    ) -> None:
        self._shards = shards
        self._skip = skip
        self._claim = claim
        self._given = 0
        self._written = 0
        #: (samples of the stream given out when the shard ended, shard) for shards read to their end.
        self._ends: deque[tuple[int, str]] = deque()

    def __iter__(self) -> Iterator[ShardSample]:
        for shard in self._shards:
            if self._skip(shard):
                continue
            reader = ShardReader(shard)
            for sample in reader:
                if sample.name == shard or self._claim(sample.name):
                    self._given += 1
                    yield sample
            if reader.complete:
                self._ends.append((self._given, shard))

    def written(self, n: int) -> list[str]:
        """Note ``n`` more samples of the stream written; the shards finished by them (in order)."""
        self._written += n
        done = []
        while self._ends and self._ends[0][0] <= self._written:
            done.append(self._ends.popleft()[1])
        return done


#: A tar archive ends with two zero blocks (then zero padding): without them, it was cut between members.
_END_MARKER = bytes(1024)


class TruncatedShard(Exception):
    pass


class _Tail:
    """Keeps the last bytes read from a shard's stream. Python's tarfile takes a stream that stops between two
    members as a complete archive, so the end-of-archive marker is checked here: a shard cut at a member
    boundary is reported, not taken as finished."""

    def __init__(self) -> None:
        self.stream: Any = None
        self.last = b""

    def track(self, stream: Any) -> _Tail:
        self.stream = stream
        return self

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.stream.read(n)
        self.last = (self.last + data)[-len(_END_MARKER) :]
        return data

    def check_end(self) -> None:
        """After the last member: read the rest (the marker and padding; a pipe's exit status is checked at its
        end) and require the archive's end marker."""
        if self.stream is None:
            return
        while self.read(1 << 16):
            pass
        if self.last != _END_MARKER:
            raise TruncatedShard("no end-of-archive marker: the shard is cut off after its last whole sample")
        stream, self.stream = self.stream, None
        stream.close()  # a pipe: raises when its command failed

    def close(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            with contextlib.suppress(Exception):  # a failure to read it is what the error record reports
                stream.close()


def _shard_failure(e: Exception, read: int) -> str:
    first = str(e.args[0]) if e.args else type(e).__name__
    return (
        f"cannot read shard ({type(e).__name__}: {first}); {read} sample(s) read before that are in the results"
        " — --resume reads this shard again and skips them"
    )
