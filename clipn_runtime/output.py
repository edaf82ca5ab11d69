"""Writing detections: JSONL, CSV, Parquet and a table for people, and the run summary (:class:`Tally`).

Writers take a whole batch and write it with one call then flush, so an interrupted run leaves only complete
records behind. Every record is valid UTF-8 and strict JSON (no bare NaN). Where one run writes, and how a run
continues an earlier output, is :mod:`clipn_runtime.results`.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from clipn_runtime.detector import RECORD_FIELDS, SMOOTH_FIELDS, VIDEO_FIELDS, Detection
from clipn_runtime.inputs import PATH_BYTES_FIELD, printable

FORMATS = ("jsonl", "csv", "table", "parquet")
#: CSV columns: the JSONL fields, then the video and smoothing fields (empty for images), then the exact bytes of
#: a file name that is not valid UTF-8 (empty for every other; last, so that no other column moves).
CSV_FIELDS: tuple[str, ...] = RECORD_FIELDS + VIDEO_FIELDS + SMOOTH_FIELDS + (PATH_BYTES_FIELD,)
_EXT_FORMAT = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".txt": "table",
    ".parquet": "parquet",
}


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


def stdout_is_tty() -> bool:
    """Whether stdout is a terminal; False when it is closed (``clipn-detect … >&-``: sys.stdout is None)."""
    return sys.stdout is not None and sys.stdout.isatty()


class JsonlWriter:
    """One JSON object per line (UTF-8, not ASCII-escaped)."""

    def __init__(self, fh: IO[str]) -> None:
        self.fh = fh

    def write_batch(self, detections: Sequence[Detection]) -> None:
        self.fh.write(
            "".join(json.dumps(d.to_dict(), ensure_ascii=False, allow_nan=False) + "\n" for d in detections)
        )
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
            rec = d.to_dict()
            w.writerow([_csv_value(rec.get(k)) for k in CSV_FIELDS])
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
            name = printable(d.path) if d.path is not None else "<in-memory>"
            if d.frame is not None:
                name += f" @{d.time:.2f}s" if d.time is not None else f" #{d.frame}"
            path = self._clip(name, self.PATH_W, left=True)
            if not d.ok:
                lines.append(f"{path:<{self.PATH_W}}  ERROR: {printable(d.error or '')}")
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


def _parquet_schema(pa: Any) -> Any:
    """The CSV columns, typed: what a data lake reads without guessing (None is a null in every column)."""
    types = {"pred_index": pa.int64(), "ood": pa.bool_(), "frame": pa.int64(), "ood_smooth": pa.bool_()}
    floats = {"prob", "p_no", "ctw", "atd", "p_ood", "time", "ood_score_smooth"}
    return pa.schema([(k, types.get(k, pa.float64() if k in floats else pa.string())) for k in CSV_FIELDS])


class ParquetWriter:
    """Parquet with the CSV columns (pyarrow, the ``parquet`` extra): one row group per batch. The file is
    readable once closed (Parquet's footer comes last): a run killed hard leaves a file no reader opens, and
    ``--resume`` does not take Parquet."""

    def __init__(self, path: str) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            from clipn_runtime.clikit import MissingExtra

            raise MissingExtra("pyarrow", "parquet", "" if e.name == "pyarrow" else str(e)) from None
        self._pa = pa
        self.schema = _parquet_schema(pa)
        self.writer = pq.ParquetWriter(path, self.schema)

    def write_batch(self, detections: Sequence[Detection]) -> None:
        recs = [d.to_dict() for d in detections]
        columns = {k: [rec.get(k) for rec in recs] for k in CSV_FIELDS}
        self.writer.write_table(self._pa.table(columns, schema=self.schema))

    def close(self) -> None:
        self.writer.close()


def make_writer(fmt: str, fh: IO[str], *, csv_header: bool = True) -> Writer:
    if fmt == "jsonl":
        return JsonlWriter(fh)
    if fmt == "csv":
        return CsvWriter(fh, header=csv_header)
    if fmt == "table":
        return TableWriter(fh)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


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
        skipped = f", {self.skipped} already done" if self.skipped else ""
        return (
            f"{self.scored} scored (ID {self.id}, OOD {self.ood}), {self.errors} error{'' if self.errors == 1 else 's'}"
            f"{skipped} in {seconds:.1f} s "
            f"— {rate:.1f} images/s [{engine}]"
        )
