"""Writing detections (JSONL, CSV, a table for people), resuming from an earlier output, and the run summary.

Writers take a whole batch and write it with one call then flush, so an interrupted run leaves only complete
records behind. :func:`read_done` reads an earlier output for ``--resume`` (cutting off a half-written last
record if the process was killed mid-write) and returns what is already done.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from clipn_runtime.detector import RECORD_FIELDS, SMOOTH_FIELDS, VIDEO_FIELDS, Detection
from clipn_runtime.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv", "table")
#: CSV columns: the JSONL fields, then the video and smoothing fields (empty for images).
CSV_FIELDS: tuple[str, ...] = RECORD_FIELDS + VIDEO_FIELDS + SMOOTH_FIELDS
_EXT_FORMAT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".txt": "table"}


class Writer(Protocol):
    def write_batch(self, detections: Sequence[Detection]) -> None: ...


def choose_format(fmt: str | None, output: str | None, stdout_is_tty: bool) -> str:
    """``--format`` if given; else from ``-o``'s extension (.jsonl/.csv/.txt); else a table on a terminal and
    JSONL when piped."""
    if fmt:
        return fmt
    if output:
        return _EXT_FORMAT.get(Path(output).suffix.lower(), "jsonl")
    return "table" if stdout_is_tty else "jsonl"


class JsonlWriter:
    """One JSON object per line (UTF-8, not ASCII-escaped)."""

    def __init__(self, fh: IO[str]) -> None:
        self.fh = fh

    def write_batch(self, detections: Sequence[Detection]) -> None:
        self.fh.write("".join(json.dumps(d.to_dict(), ensure_ascii=False) + "\n" for d in detections))
        self.fh.flush()


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)  # floats print their shortest round-trip repr


class CsvWriter:
    """RFC 4180 CSV with a header; fields with commas, quotes or newlines are quoted."""

    def __init__(self, fh: IO[str], *, header: bool = True) -> None:
        self.fh = fh
        self.header = header

    def write_batch(self, detections: Sequence[Detection]) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if self.header:
            w.writerow(CSV_FIELDS)
            self.header = False
        for d in detections:
            w.writerow([_csv_value(getattr(d, k)) for k in CSV_FIELDS])
        self.fh.write(buf.getvalue())
        self.fh.flush()


class TableWriter:
    """Aligned columns for people: path, predicted class, prob, p_ood, the decision — or the error."""

    PATH_W, PRED_W = 44, 24

    def __init__(self, fh: IO[str]) -> None:
        self.fh = fh
        self.header = True

    @staticmethod
    def _clip(s: str, width: int, left: bool = False) -> str:
        s = s.replace("\n", "\\n").replace("\r", "\\r")
        if len(s) <= width:
            return s
        return "…" + s[-(width - 1) :] if left else s[: width - 1] + "…"

    def write_batch(self, detections: Sequence[Detection]) -> None:
        lines = []
        if self.header:
            lines.append(f"{'path':<{self.PATH_W}}  {'pred':<{self.PRED_W}}  {'prob':>5}  {'p_ood':>5}  decision")
            self.header = False
        for d in detections:
            name = d.path or "<in-memory>"
            if d.frame is not None:
                name += f" @{d.time:.2f}s" if d.time is not None else f" #{d.frame}"
            path = self._clip(name, self.PATH_W, left=True)
            if not d.ok:
                lines.append(f"{path:<{self.PATH_W}}  ERROR: {d.error}")
                continue
            decision = "OOD" if d.ood else "ID"
            if d.ood_smooth is not None:
                decision += f"  (smoothed: {'OOD' if d.ood_smooth else 'ID'})"
            lines.append(
                f"{path:<{self.PATH_W}}  {self._clip(d.pred or '', self.PRED_W):<{self.PRED_W}}  "
                f"{d.prob:5.3f}  {d.p_ood:5.3f}  {decision}"
            )
        self.fh.write("".join(line + "\n" for line in lines))
        self.fh.flush()


def make_writer(fmt: str, fh: IO[str], *, csv_header: bool = True) -> Writer:
    if fmt == "jsonl":
        return JsonlWriter(fh)
    if fmt == "csv":
        return CsvWriter(fh, header=csv_header)
    if fmt == "table":
        return TableWriter(fh)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


# ---- resume ---------------------------------------------------------------------------------------------------


@dataclass
class Done:
    """What an earlier output already holds: image paths, and per video the frame indices written."""

    paths: set[str] = field(default_factory=set)
    frames: dict[str, set[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths) + sum(len(f) for f in self.frames.values())

    def has(self, path: str) -> bool:
        """True when ``path`` has a whole-input record (an image, or a video that failed to open)."""
        return path in self.paths


def _complete_end(data: bytes, quoted: bool) -> int:
    """Length of the prefix of ``data`` that ends with a complete record (a newline outside CSV quotes)."""
    if not quoted:
        return data.rfind(b"\n") + 1
    end, in_quotes = 0, False
    for m in re.finditer(rb'["\n]', data):
        if m.group() == b'"':
            in_quotes = not in_quotes  # an escaped "" toggles twice
        elif not in_quotes:
            end = m.end()
    return end


def repair_tail(path: str | Path, fmt: str) -> int:
    """Cut a half-written last record (a run killed mid-write) off ``path``; returns the bytes removed."""
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        return 0
    with open(p, "rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n" and fmt == "jsonl":
            return 0
        fh.seek(0)
        data = fh.read()
        keep = _complete_end(data, quoted=fmt == "csv")
        if keep != size:
            fh.truncate(keep)
            log.warning("%s: removed a half-written last record (%d bytes) before resuming", p, size - keep)
        return size - keep


def read_done(path: str | Path, fmt: str) -> Done:
    """The inputs already present in an earlier ``jsonl`` or ``csv`` output (for ``--resume``)."""
    if fmt not in ("jsonl", "csv"):
        raise UserError(f"--resume reads the earlier output, which needs --format jsonl or csv (not {fmt})")
    done = Done()
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return done
    repair_tail(p, fmt)
    with open(p, encoding="utf-8", newline="") as fh:
        if fmt == "jsonl":
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    _add(done, rec["path"], rec.get("frame"))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(
                        f"{p}:{lineno}: not a clipn-detect JSONL record; --resume needs the file an earlier "
                        "clipn-detect run wrote (or drop --resume and choose another -o)"
                    ) from None
        else:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise UserError(f"{p}:1: no 'path' column; --resume needs a CSV written by clipn-detect")
            for row in reader:
                frame = row.get("frame") or None
                _add(done, row["path"], int(frame) if frame is not None else None)
    return done


def _add(done: Done, path: Any, frame: Any) -> None:
    if frame is None:
        done.paths.add(str(path))
    else:
        done.frames.setdefault(str(path), set()).add(int(frame))


# ---- summary ---------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Running counts for the summary line."""

    scored: int = 0
    id: int = 0
    ood: int = 0
    errors: int = 0
    skipped: int = 0

    def add(self, d: Detection) -> None:
        if d.ok:
            self.scored += 1
            if d.ood:
                self.ood += 1
            else:
                self.id += 1
        else:
            self.errors += 1

    def line(self, seconds: float, engine: str) -> str:
        rate = self.scored / seconds if seconds > 0 else 0.0
        skipped = f", {self.skipped} already done (--resume)" if self.skipped else ""
        return (
            f"{self.scored} scored (ID {self.id}, OOD {self.ood}), {self.errors} error{'' if self.errors == 1 else 's'}"
            f"{skipped} in {seconds:.1f} s "
            f"— {rate:.1f} images/s [{engine}]"
        )


def is_nonempty_file(path: str | os.PathLike[str]) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False
