"""`clipn-detect` on webdataset tar shards: same scores as files, brace patterns, pipe: URLs, bad samples,
truncated shards, --resume by sample and by whole shard, torch-free reading."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from helpers import BLOCK_TORCH, SyntheticBundle, make_images

from clipn_runtime.cli import main
from clipn_runtime.output import CSV_FIELDS
from clipn_runtime.results import shards_file

pytest.importorskip("webdataset", reason="shard inputs need the `shards` extra (webdataset)")


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A webdataset shard: ``key.ext`` members, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def shards_of(images: list[Path], folder: Path, per_shard: int) -> list[Path]:
    """``images`` packed ``per_shard`` at a time into ``folder/000NN.tar`` (key = file stem, plus a caption)."""
    out = []
    for n, i in enumerate(range(0, len(images), per_shard)):
        members = []
        for p in images[i : i + per_shard]:
            members += [(f"{p.stem}.png", p.read_bytes()), (f"{p.stem}.txt", b"a caption")]
        out.append(write_shard(folder / f"{n:05d}.tar", members))
    return out


def by_key(recs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Records by sample key (``shard#key`` → key; a file path → its stem)."""
    return {rec["path"].rsplit("#", 1)[-1] if "#" in rec["path"] else Path(rec["path"]).stem: rec for rec in recs}


def test_shard_samples_score_as_the_same_files(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    images = make_images(tmp_path / "imgs", 7)
    shards = shards_of(images, tmp_path / "shards", 3)
    bundle = str(synthetic_bundle.root)
    files = run(str(tmp_path / "imgs"), "-e", bundle, "-b", "4")
    from_shards = run(*(str(s) for s in shards), "-e", bundle, "-b", "4")
    assert files.exit_code == 0 and from_shards.exit_code == 0, from_shards.stderr
    want, got = by_key(records(files.stdout)), by_key(records(from_shards.stdout))
    assert sorted(want) == sorted(got) and len(got) == 7
    assert [r["path"] for r in records(from_shards.stdout)][:2] == [f"{shards[0]}#img0000", f"{shards[0]}#img0001"]
    for key, rec in want.items():
        # The same pixels through the same engine; shard batches split at other places than the folder's, and
        # onnxruntime's sums are not batch-invariant, hence a float32-rounding tolerance, not equality.
        for f in ("prob", "p_no", "ctw", "atd", "p_ood"):
            assert abs(rec[f] - got[key][f]) <= 1e-6, (key, f)
        assert (rec["pred"], rec["ood"], rec["error"]) == (got[key]["pred"], got[key]["ood"], got[key]["error"])


def test_brace_pattern_and_pipe_url(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    shards = shards_of(make_images(tmp_path / "imgs", 6), tmp_path / "shards", 2)
    bundle = str(synthetic_bundle.root)
    r = run(str(tmp_path / "shards" / "{00000..00002}.tar"), "-e", bundle)
    assert r.exit_code == 0, r.stderr
    assert [rec["path"].split("#")[0] for rec in records(r.stdout)] == [str(s) for s in shards for _ in range(2)]
    pipe = f"pipe:cat {shards[1]}"
    r = run(pipe, "-e", bundle)
    assert r.exit_code == 0, r.stderr
    assert [rec["path"] for rec in records(r.stdout)] == [f"{pipe}#img0002", f"{pipe}#img0003"]


def test_bad_samples_and_a_truncated_shard_are_error_records(
    synthetic_bundle: SyntheticBundle, tmp_path: Path
) -> None:
    good = make_images(tmp_path / "imgs", 3)
    bad = write_shard(
        tmp_path / "bad.tar",
        [
            ("a.png", good[0].read_bytes()),
            ("b.png", b"not an image at all"),
            ("c.txt", b"a caption, no image"),
            ("d.png", good[1].read_bytes()),
        ],
    )
    whole = write_shard(
        tmp_path / "t.tar", [(f"k{i}.png", good[i % 3].read_bytes()) for i in range(6)]
    ).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2 + 100])  # mid-member: a shard whose copy broke off
    with tarfile.open(tmp_path / "t.tar") as tar:
        last_header = tar.getmembers()[-1].offset
    # Cut between two members: Python's tarfile alone takes this for a whole (5-sample) archive.
    at_boundary = tmp_path / "boundary.tar"
    at_boundary.write_bytes(whole[:last_header])
    after = write_shard(tmp_path / "after.tar", [("z.png", good[2].read_bytes())])
    r = run(
        *(str(p) for p in (bad, cut, at_boundary, tmp_path / "missing.tar", after)),
        "-e",
        str(synthetic_bundle.root),
    )
    assert r.exit_code == 1, r.stderr
    recs = {rec["path"]: rec for rec in records(r.stdout)}
    assert recs[f"{bad}#a"]["error"] is None and recs[f"{bad}#d"]["error"] is None
    assert "not an image" in recs[f"{bad}#b"]["error"] and recs[f"{bad}#b"]["pred"] is None
    assert "no image member" in recs[f"{bad}#c"]["error"]
    assert "cannot read shard" in recs[str(cut)]["error"] and recs[str(cut)]["ood"] is None
    assert "cannot read shard" in recs[str(tmp_path / "missing.tar")]["error"]
    assert "no end-of-archive marker" in recs[str(at_boundary)]["error"]
    assert [f"{at_boundary}#k{i}" in recs for i in range(6)] == [True] * 5 + [False]
    assert recs[f"{after}#z"]["error"] is None  # the run went on


def test_resume_skips_finished_samples_and_whole_shards(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    shards = shards_of(make_images(tmp_path / "imgs", 8), tmp_path / "shards", 4)
    pattern = str(tmp_path / "shards" / "{00000..00001}.tar")
    out = tmp_path / "out.jsonl"
    bundle = str(synthetic_bundle.root)
    assert run(pattern, "-e", bundle, "-o", str(out), "-b", "2").exit_code == 0
    assert shards_file(out).read_text().splitlines() == [str(s) for s in shards]
    # As a run killed in shard 1 leaves it: shard 0 finished, 2 samples of shard 1 written, one cut mid-record.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:6]) + lines[6][:20])
    shards_file(out).write_text(f"{shards[0]}\n{shards[1]}")  # shard 1's line cut before its newline
    shards[0].write_bytes(b"garbage")  # a finished shard is not opened again: this would be an error record
    r = run(pattern, "-e", bundle, "-o", str(out), "--resume")
    assert r.exit_code == 0, r.stderr
    assert "2 scored" in r.stderr and "2 already done" in r.stderr
    names = [rec["path"] for rec in records(out.read_text())]
    assert sorted(names) == sorted(f"{s}#img{i:04d}" for i, s in enumerate([shards[0]] * 4 + [shards[1]] * 4))
    assert shards_file(out).read_text().splitlines()[-1] == str(shards[1])
    # --overwrite starts over: no shard counts as finished any more.
    r = run(pattern, "-e", bundle, "-o", str(out), "--overwrite")
    assert r.exit_code == 1 and "cannot read shard" in out.read_text()


def _detect_one_shard_in_a_process(prelude: str, check: str, bundle: SyntheticBundle, tmp_path: Path) -> None:
    """clipn-detect on a 2-sample shard in a fresh interpreter: ``prelude`` runs first, ``check`` (an assert on
    ``sys.modules``) after the run; both samples must be scored."""
    shard = shards_of(make_images(tmp_path / "imgs", 2), tmp_path / "shards", 2)[0]
    code = (
        prelude
        + "import sys\nfrom clipn_runtime.cli import main\n"
        + "try:\n    main(prog_name='clipn-detect')\nexcept SystemExit:\n"
        + f"    assert {check}\n    raise\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(shard), "-e", str(bundle.root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert len(records(p.stdout)) == 2


def test_shard_path_is_torch_free(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    torch_free = "'webdataset' in sys.modules and not [m for m in sys.modules if m.split('.')[0] == 'torch']"
    _detect_one_shard_in_a_process(BLOCK_TORCH, torch_free, synthetic_bundle, tmp_path)


def test_parquet_round_trip_equals_jsonl(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    images = make_images(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")  # an error record: nulls in the score columns
    bundle = str(synthetic_bundle.root)
    jsonl, parquet = tmp_path / "out.jsonl", tmp_path / "out.parquet"
    assert run(str(tmp_path / "imgs"), "-e", bundle, "-o", str(jsonl), "-b", "2").exit_code == 1
    r = run(str(tmp_path / "imgs"), "-e", bundle, "-o", str(parquet), "-b", "2")
    assert r.exit_code == 1, r.stderr
    f = pq.ParquetFile(parquet)
    assert f.metadata.num_row_groups == 3  # one per batch of 2
    assert tuple(f.schema_arrow.names) == CSV_FIELDS
    rows = f.read().to_pylist()
    want = records(jsonl.read_text())
    assert len(rows) == len(images) + 1
    for row, rec in zip(rows, want, strict=True):
        assert {k: v for k, v in row.items() if k in rec} == rec  # same batches, same engine: equal values
        assert all(row[k] is None for k in row if k not in rec)
    r = run(str(tmp_path / "imgs"), "-e", bundle, "-o", str(parquet), "--resume")
    assert r.exit_code == 2 and "--resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run(str(tmp_path / "imgs"), "-e", bundle, "-o", str(parquet))
    assert r.exit_code == 2 and "already has results; add --overwrite" in r.stderr  # resuming it is no way out
    r = run(str(tmp_path / "imgs"), "-e", bundle, "--format", "parquet")
    assert r.exit_code == 2 and "-o FILE.parquet" in r.stderr


def test_a_batch_spans_two_shards(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    shards = shards_of(make_images(tmp_path / "imgs", 6), tmp_path / "shards", 3)
    out = tmp_path / "out.parquet"
    r = run(*(str(s) for s in shards), "-e", str(synthetic_bundle.root), "-o", str(out), "-b", "4")
    assert r.exit_code == 0, r.stderr
    f = pq.ParquetFile(out)  # one row group per batch written
    assert [f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups)] == [4, 2]
    assert f.read().column("path").to_pylist()[2:4] == [f"{shards[0]}#img0002", f"{shards[1]}#img0003"]
    assert shards_file(out).read_text().splitlines() == [str(s) for s in shards]


def test_a_shard_is_finished_only_when_its_last_sample_is_written(tmp_path: Path) -> None:
    from clipn_runtime.shards import ShardStream

    shards = [str(s) for s in shards_of(make_images(tmp_path / "imgs", 5), tmp_path / "shards", 2)]
    stream = ShardStream(shards, skip=lambda s: s == shards[2], claim=lambda name: not name.endswith("img0000"))
    names = [s.name for s in stream]
    assert names == [f"{shards[0]}#img0001", f"{shards[1]}#img0002", f"{shards[1]}#img0003"]
    assert stream.written(0) == []
    assert stream.written(1) == [shards[0]]  # its unclaimed sample was written by an earlier run
    assert stream.written(1) == []  # shard 1 is half written
    assert stream.written(1) == [shards[1]]
    assert stream.written(0) == []  # a skipped shard is already noted as finished


def test_reading_shards_does_not_import_an_installed_torch(
    synthetic_bundle: SyntheticBundle, tmp_path: Path
) -> None:
    """webdataset imports torch when it is installed (seconds of start-up per run): the runtime keeps it out."""
    pytest.importorskip("torch", reason="torch is not installed: nothing to keep out")
    check = "'webdataset' in sys.modules and 'torch' not in sys.modules, 'torch imported'"
    _detect_one_shard_in_a_process("", check, synthetic_bundle, tmp_path)
