"""The results file of one ``clipn-detect`` run: where it writes, what produced it, and how a run continues it.

:class:`Results` is stdout, or ``-o FILE`` plus its provenance ``FILE.run.json`` (:class:`RunInfo`: the
bundle's manifest hash, classes, method, precision, engine file, prompts, smoothing, ``--every``, format and the
folder relative paths are relative to). The provenance lives beside the results rather than inside them so that
every format keeps its shape (a JSONL header line would break "one record per line" readers; CSV and the table
have no place for one); it is written atomically before the first record. ``--resume`` refuses a file whose
provenance differs (it would mix results) or is missing (an older clipn-detect wrote it), and skips the inputs
already there by their resolved file, so a run continued from another folder, or through another symlink, does
not score them twice. :func:`read_done` reads an earlier output (cutting off a half-written last record if the
process was killed mid-write). One writer at a time: ``FILE.lock`` (an advisory ``flock``, held from the
``--resume`` check to :meth:`Results.close`) refuses a second clipn-detect on the same ``-o``, which would
interleave records under one provenance. Tar shards whose every sample is written are listed in ``FILE.shards``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import os
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from clipn_runtime.bundle import MANIFEST_NAME, Manifest
from clipn_runtime.detector import Detection
from clipn_runtime.errors import UserError
from clipn_runtime.fileio import atomic_write, sha256_file
from clipn_runtime.inputs import is_url, kind_of, path_fields, path_from_fields, printable
from clipn_runtime.output import ParquetWriter, Writer, make_writer
from clipn_runtime.prompts import PromptSet

log = logging.getLogger(__name__)

#: The provenance beside ``-o FILE``.
RUN_SUFFIX = ".run.json"
#: Version 2 added ``every``.
RUN_FORMAT, RUN_VERSION = "clipn-detect-run", 2
#: Beside ``-o FILE``: the tar shards whose every sample is in it, which ``--resume`` does not open again.
SHARDS_SUFFIX = ".shards"
#: The lock beside ``-o FILE`` while a run writes it.
LOCK_SUFFIX = ".lock"
RESUME_FORMATS = ("jsonl", "csv")


# ---- resume ---------------------------------------------------------------------------------------------------


class _Resolver:
    """The real file a path names (symlinks and ``..`` resolved, relative to ``base``): what ``--resume``
    compares. Folders are resolved once each (cached), so each path costs one ``lstat``."""

    def __init__(self, base: str) -> None:
        self.base = base
        self._real_dir = functools.lru_cache(maxsize=65536)(os.path.realpath)

    def __call__(self, path: str) -> str:
        if _is_stream(path):
            return path
        full = os.path.join(self.base, path)
        folder, name = os.path.split(full)
        if name in ("", ".", ".."):
            return os.path.realpath(full)
        resolved = os.path.join(self._real_dir(folder), name)
        return os.path.realpath(resolved) if os.path.islink(resolved) else resolved


@dataclass
class Done:
    """What an earlier output already holds, by resolved file: image paths, per video the frame indices written
    and its last smoothed score (frame, ``ood_score_smooth``), from which a resumed video continues the average.

    A video whose record says it failed (to open, or mid-decode) is not done: ``--resume`` tries it again and
    scores only the frames not yet written.
    """

    paths: set[str] = field(default_factory=set)
    frames: dict[str, set[int]] = field(default_factory=dict)
    smoothed: dict[str, tuple[int, float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths) + sum(len(f) for f in self.frames.values())


_CHUNK = 1 << 20  # read size when scanning a results file: memory stays flat for any file size


def _last_line_end(fh: IO[bytes], size: int) -> int:
    """Offset just past the last newline of the file (0 if none), reading backwards one chunk at a time."""
    pos = size
    while pos > 0:
        start = max(0, pos - _CHUNK)
        fh.seek(start)
        i = fh.read(pos - start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def _last_csv_record_end(fh: IO[bytes]) -> int:
    """Offset just past the last newline outside quotes: whether a newline ends a record depends on every
    quote before it, so the file is streamed from the start (in chunks; an escaped "" toggles twice)."""
    fh.seek(0)
    end = offset = 0
    in_quotes = False
    while chunk := fh.read(_CHUNK):
        for m in re.finditer(rb'["\n]', chunk):
            if m.group() == b'"':
                in_quotes = not in_quotes
            elif not in_quotes:
                end = offset + m.end()
        offset += len(chunk)
    return end


def repair_tail(path: str | Path, fmt: str) -> int:
    """Cut a half-written last record (a run killed mid-write) off ``path``; returns the bytes removed."""
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        return 0
    with open(p, "rb+") as fh:
        if fmt == "csv":
            keep = _last_csv_record_end(fh)
        else:
            fh.seek(size - 1)
            keep = size if fh.read(1) == b"\n" else _last_line_end(fh, size)
        if keep != size:
            fh.truncate(keep)
            log.warning("%s: removed a half-written last record (%d bytes) before resuming", p, size - keep)
        return size - keep


def resume_format_error(fmt: str) -> UserError:
    return UserError(
        f"--resume reads the earlier output, which needs --format {' or '.join(RESUME_FORMATS)} (not {fmt})"
    )


def read_done(path: str | Path, fmt: str, base: str | None = None) -> Done:
    """The inputs already present in an earlier ``jsonl`` or ``csv`` output (for ``--resume``), keyed by the
    file they resolve to; relative paths in it are relative to ``base`` (default: the current folder)."""
    if fmt not in RESUME_FORMATS:
        raise resume_format_error(fmt)
    done = Done()
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return done
    repair_tail(p, fmt)
    resolve = _Resolver(base if base is not None else os.getcwd())
    try:
        with open(p, encoding="utf-8", newline="") as fh:
            records = _jsonl_records(fh) if fmt == "jsonl" else _csv_records(fh, p)
            for lineno, rec in records:
                try:
                    _add(done, resolve(path_from_fields(rec)), rec)
                except (ValueError, TypeError):
                    raise UserError(
                        f"{p}:{lineno}: not a clipn-detect {fmt.upper()} record; --resume needs the file an "
                        "earlier clipn-detect run wrote (or drop --resume and choose another -o)"
                    ) from None
    except UnicodeDecodeError as e:
        raise UserError(
            f"{p}: not UTF-8 ({e.reason}: byte 0x{e.object[e.start]:02x}), so not as clipn-detect wrote it — "
            "was it re-saved in another encoding (a spreadsheet's cp1252)? --resume needs the original file: "
            "restore it, or drop --resume and write to another -o FILE"
        ) from None
    return done


def _jsonl_records(fh: IO[str]) -> Any:
    for lineno, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        yield lineno, rec if isinstance(rec, dict) else {}


def _csv_records(fh: IO[str], p: Path) -> Any:
    reader = csv.DictReader(fh)
    if reader.fieldnames is None or "path" not in reader.fieldnames:
        raise UserError(f"{p}:1: no 'path' column; --resume needs a CSV written by clipn-detect")
    for row in reader:
        yield reader.line_num, row


def _field_text(rec: Mapping[str, Any], name: str) -> str | None:
    """A record's field as CSV or JSON holds it; None when absent or empty (CSV writes None as "")."""
    value = rec.get(name)
    return None if value in (None, "") else str(value)


def _add(done: Done, key: str, rec: Mapping[str, Any]) -> None:
    """Count record ``rec`` of the file ``key``; ValueError/TypeError when its fields are not a record's."""
    frame_text = _field_text(rec, "frame")
    if frame_text is None:
        if _field_text(rec, "error") is not None and kind_of(key) == "video":
            return  # a video that failed is tried again; its frames already written stay skipped
        done.paths.add(key)
        return
    frame = int(frame_text)
    done.frames.setdefault(key, set()).add(frame)
    smooth = _field_text(rec, "ood_score_smooth")
    if smooth is not None and frame >= done.smoothed.get(key, (-1, 0.0))[0]:
        done.smoothed[key] = (frame, float(smooth))


# ---- provenance -------------------------------------------------------------------------------------------------


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class RunInfo:
    """What produced a results file. Two runs may write into one file only when all of this is equal: their
    records are then comparable (the same model, classes, decision rule, engine and templates)."""

    output_format: str
    bundle_manifest_sha256: str
    classes: tuple[str, ...]
    method: str
    precision: str | None
    prompts: Mapping[str, str]
    smoothing: float | None
    #: --every: which frames of a video are scored (a resume with another step would leave gaps and doubles).
    every: int
    #: The engine file that runs (model.onnx, model.fp16.onnx, model.plan): known once it is open.
    engine: str | None = None
    #: How ``ood`` is decided: ``threshold-free``, or ``calibrated@0.95 <sha256[:12] of the calibration>`` (a run
    #: with other thresholds would mix decisions). Optional in the file: written by newer versions only.
    decision: str | None = None

    @classmethod
    def create(
        cls,
        bundle_dir: str | os.PathLike[str],
        manifest: Manifest,
        classes: Sequence[str],
        *,
        output_format: str,
        method: str,
        precision: str | None,
        prompts: PromptSet | None,
        smoothing: float | None,
        every: int = 1,
    ) -> RunInfo:
        """``prompts``: the templates of the class banks (None: the bundle's own)."""
        name = prompts.name if prompts is not None else str(manifest.prompts.get("name", "bundle"))
        templates = (
            [list(prompts.yes), list(prompts.no) if prompts.no is not None else None]
            if prompts is not None
            else [manifest.prompts.get("yes"), manifest.prompts.get("no")]
        )
        return cls(
            output_format=output_format,
            bundle_manifest_sha256=sha256_file(Path(bundle_dir) / MANIFEST_NAME),
            classes=tuple(classes),
            method=method,
            # The precision asked for (None: the default choice); the one that runs is known once the engine is
            # open (:meth:`with_engine`).
            precision=precision,
            prompts={"name": name, "sha256": _digest(templates)},
            smoothing=smoothing,
            every=every,
        )

    def with_engine(self, engine: str, precision: str | None = None, decision: str | None = None) -> RunInfo:
        """The run with the engine file that opened, the precision it computes in (fp32, bf16, fp16, int8) and
        its decision rule."""
        return dataclasses.replace(self, engine=engine, precision=precision or self.precision, decision=decision)

    def differences(self, earlier: RunInfo) -> list[str]:
        """What differs from the ``earlier`` run, one line each (the engine only when both are known)."""
        out = []
        for f in dataclasses.fields(self):
            now, was = getattr(self, f.name), getattr(earlier, f.name)
            if f.name in ("engine", "precision", "decision") and (now is None or was is None):
                continue
            if f.name == "prompts":
                now, was = dict(now), dict(was)
                if now.get("sha256") != was.get("sha256"):
                    out.append(f"prompts: earlier {was.get('name')!r}, now {now.get('name')!r} (other templates)")
            elif f.name == "classes" and now != was:
                out.append(f"classes: {_class_difference(was, now)}")
            elif now != was:
                what = "bundle (sha256 of its clipn.json)" if f.name == "bundle_manifest_sha256" else f.name
                out.append(f"{what}: earlier {was}, now {now}")
        return out

    def to_json(self, *, base_dir: str, bundle_dir: str, runner: str) -> str:
        doc = {
            "format": RUN_FORMAT,
            "version": RUN_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "note": "written by clipn-detect beside its results: what produced them (checked by --resume)",
            **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)},
            # informational: not compared
            "base_dir": path_fields(base_dir),
            "bundle_dir": printable(bundle_dir),
            "runner": printable(runner),
        }
        return json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, doc: Any) -> tuple[RunInfo, str]:
        """The run and its base folder from a parsed ``.run.json``; ValueError when it is not one."""
        if not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT:
            raise ValueError("not a clipn-detect provenance file")
        if doc.get("version") != RUN_VERSION:
            raise ValueError(f"version {doc.get('version')!r}; this clipn-detect reads version {RUN_VERSION}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in doc and f.name not in _OPTIONAL]
        if missing:
            raise ValueError(f"malformed (no {', '.join(map(repr, missing))})")
        kw = {f.name: _checked(f.name, doc[f.name]) for f in dataclasses.fields(cls) if f.name in doc}
        if not isinstance(doc.get("base_dir"), Mapping):
            raise ValueError("malformed ('base_dir' is not an object)")
        return cls(**kw), path_from_fields(doc["base_dir"])


_NONE = type(None)
#: The JSON type of each RunInfo field, and of the items of its lists and objects.
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], tuple[type, ...]]] = {
    "output_format": ((str,), ()),
    "bundle_manifest_sha256": ((str,), ()),
    "classes": ((list,), (str,)),
    "method": ((str,), ()),
    "precision": ((str, _NONE), ()),
    "prompts": ((dict,), (str, _NONE)),
    "smoothing": ((float, int, _NONE), ()),
    "every": ((int,), ()),
    "engine": ((str, _NONE), ()),
    "decision": ((str, _NONE), ()),
}
#: Fields a provenance file of an earlier version may lack.
_OPTIONAL = frozenset({"decision"})


def _checked(name: str, value: Any) -> Any:
    """``value`` of field ``name`` in the form RunInfo holds; ValueError naming the field when it has the wrong
    JSON type (a hand-edited file: ``"prompts": null``)."""
    if not _has_type(value, *_FIELD_TYPES[name]):
        raise ValueError(f"malformed ({name!r} is {json.dumps(value)[:60]})")
    if name == "classes":
        return tuple(value)
    return float(value) if name == "smoothing" and value is not None else value


def _has_type(value: object, kinds: tuple[type, ...], items: tuple[type, ...]) -> bool:
    contents = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    # JSON true/false are Python bools, which are ints too: never a count or a weight here
    return not isinstance(value, bool) and isinstance(value, kinds) and all(isinstance(v, items) for v in contents)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, Mapping) else value


def _class_difference(was: Sequence[str], now: Sequence[str]) -> str:
    if len(was) != len(now):
        return f"earlier {len(was)} classes, now {len(now)}"
    i = next(i for i, (a, b) in enumerate(zip(was, now, strict=True)) if a != b)
    return f"class {i} was {was[i]!r}, now {now[i]!r}"


def _is_stream(path: str) -> bool:
    """A stream URL or a ``pipe:`` shard (and its ``pipe:…#key`` samples): a name, not a file to resolve."""
    return is_url(path) or path.startswith("pipe:")


def shards_file(output: str | os.PathLike[str]) -> Path:
    """Where the shards finished in ``output`` are listed, one per line: ``output`` + ``.shards``."""
    return Path(os.fspath(output) + SHARDS_SUFFIX)


def _read_shards(output: str, resolve: _Resolver) -> set[str]:
    """The finished shards listed beside ``output``; a last line without its newline was cut by a kill
    mid-write: it is dropped from the file (the next finished shard goes on a line of its own) and that shard is
    read again."""
    try:
        with open(shards_file(output), "r+b") as fh:
            end = _last_line_end(fh, os.fstat(fh.fileno()).st_size)
            fh.truncate(end)
            fh.seek(0)
            text = fh.read(end).decode("utf-8", "surrogateescape")
        return {resolve(line) for line in text.splitlines()}
    except FileNotFoundError:
        return set()
    except OSError as e:
        raise UserError(f"cannot read {shards_file(output)}: {e.strerror or e}") from None


def run_file(output: str | os.PathLike[str]) -> Path:
    """Where the provenance of ``output`` lives: ``output`` + ``.run.json``."""
    return Path(os.fspath(output) + RUN_SUFFIX)


def _load_run(output: str) -> tuple[RunInfo, str]:
    rf = run_file(output)
    if not rf.exists():
        raise UserError(
            f"{output} has results but no {rf.name}, which records the bundle, classes and settings that made "
            "them (an older clipn-detect or another program wrote it), so --resume cannot check it would not "
            "mix results; rerun with --overwrite to start over, or write to another -o FILE"
        )
    try:
        return RunInfo.from_json(json.loads(rf.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(
            f"{rf}: cannot read the provenance of {output} ({e}); rerun with --overwrite to start over"
        ) from None


# ---- where results go -------------------------------------------------------------------------------------------


class Results:
    """Where one run writes: stdout, or ``output`` with its provenance (``output.run.json``) and, for
    ``--resume``, what that file already holds.

    Order of use: construct (checks the options), :meth:`check` (``--resume``: refuses other settings, reads the
    earlier records; before the engine loads), :meth:`open` (with the engine file known: checks it too, writes
    the provenance), then :meth:`has`/:meth:`frames` to skip and :meth:`write` per batch, :meth:`close`.
    """

    def __init__(self, output: str | None, fmt: str, *, resume: bool = False, overwrite: bool = False) -> None:
        self.output, self.fmt, self.resume, self.overwrite = output, fmt, resume, overwrite
        self.cwd = os.getcwd()
        #: The folder relative paths in the file are relative to: where the file was started.
        self.base = self.cwd
        self.done = Done()
        self.fh: IO[str] | None = None
        self.writer: Writer | None = None
        self._earlier: RunInfo | None = None
        self._resolve = _Resolver(self.cwd)
        #: The files this run has taken on (resolved): a file reached twice (a folder and a link to it) is
        #: scored once.
        self._claimed: set[str] = set()
        self._lock: _Lock | None = None
        #: Tar shards (resolved) whose every sample an earlier run wrote.
        self._shards_done: set[str] = set()
        self._check_options()

    def _check_options(self) -> None:
        out = self.output
        if out is None:
            if self.resume:
                raise UserError("--resume continues an earlier -o FILE; pass the same -o FILE as that run")
            if self.fmt == "parquet":
                raise UserError("Parquet goes to a file, not stdout: pass -o FILE.parquet")
            if sys.stdout is None:
                raise UserError("stdout is closed; write the results to a file with -o FILE")
            return
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")
        if self.resume and self.fmt not in RESUME_FORMATS:
            raise resume_format_error(self.fmt)
        if os.path.isdir(out):
            raise UserError(
                f"-o {out} is a folder; -o takes a file name, e.g. -o {os.path.join(out, 'results.jsonl')}"
            )
        if self.resume and self.special:
            raise UserError(
                f"-o {out} is not a regular file (a pipe or a device), so there are no earlier results to "
                "resume; drop --resume, or write to a file"
            )
        if not self.resume and not self.overwrite and is_nonempty_file(out):
            fix = "add --resume to continue that run or" if self.fmt in RESUME_FORMATS else "add"
            raise UserError(f"{out} already has results; {fix} --overwrite to replace it")

    @property
    def special(self) -> bool:
        """``-o`` names a pipe or a device (a FIFO, /dev/null): written as a stream, without a provenance file
        or lock beside it, and never resumed."""
        return self.output is not None and _is_special(self.output)

    @property
    def appending(self) -> bool:
        return self.output is not None and self.resume and is_nonempty_file(self.output)

    def check(self, run: RunInfo) -> None:
        """Take the output (one writer at a time); ``--resume`` onto a file with results: refuse unless ``run``
        equals what made them, then read them."""
        if self.output is not None and self._lock is None and not self.special:
            self._lock = _Lock.take(self.output)
        try:
            self._check_earlier(run)
        except BaseException:
            self.close()
            raise

    def _check_earlier(self, run: RunInfo) -> None:
        if not self.appending:
            return
        assert self.output is not None
        if self._earlier is None:
            self._earlier, self.base = _load_run(self.output)
        diffs = run.differences(self._earlier)
        if diffs:
            raise UserError(
                f"{self.output} holds results of another setup, and --resume would mix them:\n  - "
                + "\n  - ".join(diffs)
                + "\nrerun with the earlier settings, write to another -o FILE, or replace it with --overwrite"
            )
        if not len(self.done):
            self.done = read_done(self.output, self.fmt, self.base)
            self._shards_done = _read_shards(self.output, _Resolver(self.base))
            log.info("resuming %s: %d records already there", self.output, len(self.done))
            if self.base != self.cwd:
                log.info(
                    "%s was started in %s; relative paths of this run are written as absolute paths",
                    self.output,
                    printable(self.base),
                )

    def open(self, run: RunInfo, *, bundle_dir: str | os.PathLike[str], runner: str) -> None:
        """Check ``run`` (now with its engine file) and open the output; a new file gets its provenance first."""
        self.check(run)
        if self.output is None:
            self.fh = sys.stdout
            self.writer = make_writer(self.fmt, self.fh)
            return
        if self.fmt == "parquet":
            self._open_parquet(run, bundle_dir=bundle_dir, runner=runner)
            return
        appending = self.appending
        try:
            Path(self.output).parent.mkdir(parents=True, exist_ok=True)
            # The old results go before the new provenance is written: a crash in between leaves an empty file
            # (which any setup may resume), never old results under a new provenance.
            self.fh = open(self.output, "a" if appending else "w", encoding="utf-8", newline="")  # noqa: SIM115
            if not appending and not self.special:
                shards_file(self.output).unlink(missing_ok=True)  # an overwritten run's shards are not done
                doc = run.to_json(base_dir=self.base, bundle_dir=os.path.abspath(bundle_dir), runner=runner)
                atomic_write(run_file(self.output), doc)
        except OSError as e:
            raise UserError(f"cannot write {self.output}: {e.strerror or e}") from None
        self.writer = make_writer(self.fmt, self.fh, csv_header=not appending)

    def _open_parquet(self, run: RunInfo, *, bundle_dir: str | os.PathLike[str], runner: str) -> None:
        assert self.output is not None
        try:
            Path(self.output).parent.mkdir(parents=True, exist_ok=True)
            self.writer = ParquetWriter(self.output)
            if not self.special:
                doc = run.to_json(base_dir=self.base, bundle_dir=os.path.abspath(bundle_dir), runner=runner)
                atomic_write(run_file(self.output), doc)
        except OSError as e:
            raise UserError(f"cannot write {self.output}: {e.strerror or e}") from None

    def claim(self, path: str) -> bool:
        """Take on ``path`` (as given in this run): False when it already has a whole-input record, or when this
        run took on the same file before (through another folder or link)."""
        key = self._resolve(path)
        if key in self.done.paths or key in self._claimed:
            return False
        self._claimed.add(key)
        return True

    def shard_done(self, shard: str) -> bool:
        """Whether an earlier run wrote every sample of ``shard`` (then it is not opened at all)."""
        return self._resolve(shard) in self._shards_done

    def finish_shard(self, shard: str) -> None:
        """Note that every sample of ``shard`` is written (call after its last batch): ``--resume`` skips it."""
        if self.output is None or self.special:
            return
        name = shard if _is_stream(shard) or os.path.isabs(shard) else _absolute(self.cwd, shard)
        try:
            with open(shards_file(self.output), "a", encoding="utf-8", errors="surrogateescape") as fh:
                fh.write(name + "\n")
        except OSError as e:
            raise self._write_failed(e) from None

    def frames(self, path: str) -> set[int]:
        """The frames of video ``path`` already written."""
        return self.done.frames.get(self._resolve(path), set()) if self.done.frames else set()

    def smoothed(self, path: str) -> float | None:
        """The last ``ood_score_smooth`` written for video ``path`` (where a resumed average continues)."""
        last = self.done.smoothed.get(self._resolve(path)) if self.done.smoothed else None
        return None if last is None else last[1]

    def write(self, batch: Sequence[Detection]) -> None:
        assert self.writer is not None, "open() first"
        if self.base != self.cwd:
            batch = [self._rebased(d) for d in batch]
        try:
            self.writer.write_batch(batch)
        except OSError as e:  # a full disk, a quota, a vanished network share: stop, keep what is written
            if self.output is not None:
                fh, self.fh = self.fh, None
                with contextlib.suppress(OSError):
                    fh.close()  # type: ignore[union-attr]
            if isinstance(e, BrokenPipeError):  # the reader of stdout or of a -o pipe left: the CLI stops quietly
                raise
            raise self._write_failed(e) from None

    def _write_failed(self, e: OSError) -> UserError:
        why = e.strerror or str(e)
        if self.output is None:
            from clipn_runtime.clikit import discard_stdout

            discard_stdout()  # what is still buffered would fail again at exit, with a traceback
            return UserError(f"cannot write results to stdout: {why}; write them to a file with -o FILE")
        then = "" if self.special else " — fix that, then rerun the same command with --resume"
        return UserError(
            f"cannot write results to {self.output}: {why}; every record before this batch is kept{then}"
        )

    def _rebased(self, d: Detection) -> Detection:
        """Relative paths in the file are relative to where it was started; this run's, from elsewhere, are
        written absolute, so that every record of the file names its file."""
        if d.path is None or _is_stream(d.path) or os.path.isabs(d.path):
            return d
        return dataclasses.replace(d, path=_absolute(self.cwd, d.path))

    def close(self) -> None:
        """Close the output (stdout: flush it) and let another run write it; safe to call more than once."""
        fh, self.fh = self.fh, None
        writer, self.writer = self.writer, None
        try:
            if isinstance(writer, ParquetWriter):
                writer.close()  # the footer: without it the file is unreadable
            if fh is not None and self.output is not None:
                fh.close()
            elif fh is not None:
                fh.flush()
        finally:
            lock, self._lock = self._lock, None
            if lock is not None:
                lock.release()


def _absolute(cwd: str, path: str) -> str:
    """``path`` (relative to ``cwd``) made absolute and normalised (``./a`` → ``cwd/a``); a path through
    ``..`` is only joined, since ``link/..`` is not always the folder the text suggests."""
    full = os.path.join(cwd, path)
    return full if ".." in Path(path).parts else os.path.abspath(full)


def _is_special(path: str) -> bool:
    """Whether ``path`` exists and is not a regular file or folder (a FIFO, a socket, a device)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


class _Lock:
    """An exclusive ``flock`` on ``FILE.lock`` (holding the writer's pid), so that two runs never write one
    ``-o FILE``. Advisory: it stops clipn-detect, not other programs. Without ``fcntl`` (Windows) there is no
    lock: two runs on one output are then the user's to avoid."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def take(cls, output: str) -> _Lock | None:
        """The lock of ``output``; UserError naming the holder when another run has it."""
        if sys.platform == "win32":
            return None
        import fcntl

        path = Path(output + LOCK_SUFFIX)
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise UserError(f"cannot write {path}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise UserError(
                    f"another clipn-detect is writing {output} (pid {holder}); wait for it to finish, or write "
                    "to another -o FILE"
                ) from None
            except OSError as e:  # a file system without locks (some network mounts): go on, as Windows does
                log.warning("%s: cannot lock (%s); make sure no other clipn-detect writes it", output, e)
                os.close(fd)
                return None
            if _same_file(fd, path):
                break
            os.close(fd)  # the holder removed the file between our open and flock: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        # Removed while still held: a run that opened it meanwhile finds it gone (see take) and retries.
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def is_nonempty_file(path: str | os.PathLike[str]) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False
