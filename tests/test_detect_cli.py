"""`clipn-detect`: records, formats, bad inputs, exit codes, --classes, --resume, Ctrl-C, video, torch blocked."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from helpers import BLOCK_TORCH, SyntheticBundle, SyntheticBundleFactory, make_clip, make_images, png_header_only
from PIL import Image

from clipn_runtime.cli import main
from clipn_runtime.detector import RECORD_FIELDS, Detector
from clipn_runtime.output import CSV_FIELDS


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_help_teaches() -> None:
    r = run("--help")
    assert r.exit_code == 0
    for part in ("Examples:", "clipn-detect images/ --engine bundle/", "Exit codes", "--resume", "CLIPN_ENGINE"):
        assert part in r.output


def test_folder_to_jsonl_equals_the_api(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    paths = make_images(tmp_path / "imgs", 9)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(synthetic_bundle.classes) + "\n", encoding="utf-8")
    r = run(str(tmp_path / "imgs"), "--engine", str(synthetic_bundle.root), "--classes", str(classes), "-b", "4")
    assert r.exit_code == 0, r.stderr
    recs = records(r.stdout)
    assert [tuple(rec) for rec in recs] == [RECORD_FIELDS] * 9
    # The same batches (-b 4) through the same engine settings: bit-identical. Other batch sizes may round
    # differently (onnxruntime does not promise batch-invariant sums), so equality is asked only here.
    api = Detector(synthetic_bundle.root, batch_size=4).detect(paths)
    assert recs == [d.to_dict() for d in api]
    assert "9 scored (ID" in r.stderr and "images/s" in r.stderr and "CPUExecutionProvider" in r.stderr


def test_engine_from_environment_and_missing_engine(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    make_images(tmp_path, 1)
    r = run(str(tmp_path / "img0000.png"), env={"CLIPN_ENGINE": str(synthetic_bundle.root)})
    assert r.exit_code == 0 and len(records(r.stdout)) == 1
    r = run(str(tmp_path / "img0000.png"), env={"CLIPN_ENGINE": ""})
    assert r.exit_code == 2 and "pass --engine DIR" in r.stderr and "Traceback" not in r.output
    r = run(str(tmp_path / "img0000.png"), "--engine", str(tmp_path))
    assert r.exit_code == 2 and "no clipn.json" in r.stderr


def test_classes_mismatch_exits_2_with_the_export_command(
    synthetic_bundle: SyntheticBundle, tmp_path: Path
) -> None:
    make_images(tmp_path, 1)
    other = tmp_path / "other.txt"
    other.write_text("cat\nzebra\n")
    r = run(str(tmp_path / "img0000.png"), "-e", str(synthetic_bundle.root), "--classes", str(other))
    assert r.exit_code == 2 and r.stdout == ""
    assert "not the classes this bundle was exported for" in r.stderr
    assert f"clipn-export --checkpoint <CHECKPOINT> --classes {other} -o " in r.stderr
    dup = tmp_path / "dup.txt"
    dup.write_text("cat\ncat\n")
    r = run(str(tmp_path / "img0000.png"), "-e", str(synthetic_bundle.root), "--classes", str(dup))
    assert r.exit_code == 2 and f"{dup}:2: duplicate class 'cat'" in r.stderr


def test_every_bad_input_kind_gets_an_error_record(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    d = tmp_path / "in"
    good = make_images(d, 2)
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[:300])
    (d / "zero.png").write_bytes(b"")
    (d / "notes.jpg").write_text("not an image at all")
    (d / "bomb.png").write_bytes(png_header_only(20000, 20000))  # 400 Mpx claimed in a 60-byte file
    (d / "huge.png").write_bytes(png_header_only(10000, 10000))  # over PIL's default limit, under 2×
    (d / "dangling.png").symlink_to(d / "deleted.png")
    expected = {
        "truncated.jpg": "truncated image file",
        "zero.png": "empty file (0 bytes)",
        "notes.jpg": "not an image",
        "bomb.png": "decompression bomb",
        "huge.png": "decompression-bomb guard",
        "dangling.png": "broken symbolic link",
        "missing.png": "no such file",
    }
    if Path("/proc/self/mem").exists():  # reading it at offset 0 fails with EIO: a file that cannot be read
        (d / "unreadable.png").symlink_to("/proc/self/mem")
        expected["unreadable.png"] = "cannot read file: Input/output error"
    if os.geteuid() != 0:  # root reads anything; the EIO file above covers unreadable inputs then
        (d / "secret.png").write_bytes(good[0].read_bytes())
        (d / "secret.png").chmod(0)
        expected["secret.png"] = "permission denied"
    args = [str(d / n) for n in expected] + [str(p) for p in good]
    r = run(*args, "-e", str(synthetic_bundle.root), "-b", "3")
    assert r.exit_code == 1
    recs = {Path(rec["path"]).name: rec for rec in records(r.stdout)}
    assert len(recs) == len(expected) + 2
    for name, fragment in expected.items():
        rec = recs[name]
        assert fragment in rec["error"], (name, rec["error"])
        assert all(rec[k] is None for k in ("pred", "pred_index", "prob", "p_no", "ctw", "atd", "p_ood", "ood"))
    assert all(recs[p.name]["error"] is None for p in good)
    assert "2 scored (ID" in r.stderr and f"{len(expected)} errors" in r.stderr
    assert "DecompressionBombWarning" not in r.stderr
    # --max-pixels can lower the limit (and raising it is what lets a trusted big image through)
    r = run(str(good[0]), "-e", str(synthetic_bundle.root), "--max-pixels", "100")
    assert r.exit_code == 1 and "over the limit of 100" in records(r.stdout)[0]["error"]


def test_csv_quoting(synthetic_bundle_factory: SyntheticBundleFactory, tmp_path: Path) -> None:
    classes = ["plain", "with, comma", 'with "quotes"', "semi;colon 'single'"]
    b = synthetic_bundle_factory(classes, seed=3)
    d = tmp_path / "in"
    base = make_images(d, 6)
    names = ["a,b.png", 'say "hi".png', "two\nlines.png", "tab\there.png", "ünï cødé.png", "plain.png"]
    for p, name in zip(base, names, strict=True):
        p.rename(d / name)
    out = tmp_path / "out.csv"
    r = run(str(d), "-e", str(b.root), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    text = out.read_text(encoding="utf-8")
    assert text.startswith(",".join(CSV_FIELDS) + "\n")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    r2 = run(str(d), "-e", str(b.root), "--format", "jsonl")
    recs = records(r2.stdout)
    assert {row["path"] for row in rows} == {str(d / n) for n in names}
    assert len(rows) == len(recs) == 6
    for row, rec in zip(rows, recs, strict=True):
        assert row["path"] == rec["path"] and row["pred"] == rec["pred"] and row["pred"] in classes
        assert float(row["p_ood"]) == rec["p_ood"] and row["ood"] == ("true" if rec["ood"] else "false")
        assert row["error"] == "" and row["frame"] == ""
    assert {row["pred"] for row in rows} & {"with, comma", 'with "quotes"'}, "no quoted class was predicted"


def test_table_format(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    good = make_images(tmp_path, 2)
    (tmp_path / "bad.png").write_text("x")
    r = run(str(good[0]), str(tmp_path / "bad.png"), "-e", str(synthetic_bundle.root), "--format", "table")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["path", "pred", "prob", "p_ood", "decision"]
    assert lines[1].endswith(("ID", "OOD")) and "ERROR: not an image" in lines[2]
    r = run(str(good[0]), "-e", str(synthetic_bundle.root), "-o", str(tmp_path / "out.csv"), "--resume")
    assert r.exit_code == 0
    r = run(
        str(good[0]), "-e", str(synthetic_bundle.root), "--format", "table", "--resume", "-o", str(tmp_path / "t")
    )
    assert r.exit_code == 2 and "needs --format jsonl or csv" in r.stderr


def test_list_files_and_recursion(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    top = make_images(tmp_path / "root", 2)
    sub = make_images(tmp_path / "root" / "sub", 2, seed=1)
    (tmp_path / "root" / "readme.txt").write_text("ignored: not an image extension")
    os.mkfifo(tmp_path / "root" / "pipe.png")  # skipped: not a file (reading it would block)
    r = run(str(tmp_path / "root"), "-e", str(synthetic_bundle.root))
    assert [rec["path"] for rec in records(r.stdout)] == [str(p) for p in top]
    r = run(str(tmp_path / "root"), "-r", "-e", str(synthetic_bundle.root))
    assert [rec["path"] for rec in records(r.stdout)] == [str(p) for p in top + sub]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# my images\n{sub[1]}\n\n{top[0]}\n", encoding="utf-8")
    r = run(f"@{lst}", "-e", str(synthetic_bundle.root))
    assert [rec["path"] for rec in records(r.stdout)] == [str(sub[1]), str(top[0])]
    r = run(f"@{tmp_path / 'nope.txt'}", "-e", str(synthetic_bundle.root))
    assert r.exit_code == 2 and "nope.txt: cannot read this list" in r.stderr


def test_resume_and_output_protection(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    paths = make_images(tmp_path / "imgs", 8)
    out = tmp_path / "out.jsonl"
    first = tmp_path / "first.txt"
    first.write_text("\n".join(str(p) for p in paths[:3]))
    assert run(f"@{first}", "-e", str(synthetic_bundle.root), "-o", str(out)).exit_code == 0
    r = run(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(out))
    assert r.exit_code == 2 and "add --resume" in r.stderr  # never clobber results silently
    with open(out, "a", encoding="utf-8") as fh:
        fh.write('{"path": "half-writ')  # a run killed mid-write
    r = run(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(out), "--resume")
    assert r.exit_code == 0, r.stderr
    assert "3 already done" in r.stderr and "5 scored" in r.stderr
    recs = records(out.read_text())
    assert sorted(rec["path"] for rec in recs) == sorted(str(p) for p in paths)
    assert (
        run(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(out), "--overwrite").exit_code == 0
    )
    assert len(records(out.read_text())) == 8
    r = run(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "--resume")
    assert r.exit_code == 2 and "--resume continues an earlier -o FILE" in r.stderr


def test_resume_csv_with_a_cut_quoted_record(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    d = tmp_path / "in"
    paths = make_images(d, 4)
    (d / "img0003.png").rename(d / "z,\nlast.png")
    out = tmp_path / "out.csv"
    assert run(str(d), "-e", str(synthetic_bundle.root), "-o", str(out)).exit_code == 0
    data = out.read_bytes()
    cut = data.index(b"z,\nlast") + 3  # inside the quoted path of the last record, after its embedded newline
    out.write_bytes(data[:cut])
    r = run(str(d), "-e", str(synthetic_bundle.root), "-o", str(out), "--resume")
    assert r.exit_code == 0 and "1 scored" in r.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"), newline="")))
    assert sorted(row["path"] for row in rows) == sorted([*(str(p) for p in paths[:3]), str(d / "z,\nlast.png")])


# A shell without job control starts background commands with SIGINT ignored, and Python keeps an inherited
# SIG_IGN; the child gets Python's own handler back so that SIGINT acts like Ctrl-C in a terminal whatever
# launched the test run.
_TERMINAL_SIGINT = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"


def _cli(*args: str, blocked: bool = False, **kw: Any) -> subprocess.Popen[str]:
    code = (
        _TERMINAL_SIGINT
        + (BLOCK_TORCH if blocked else "")
        + "import sys\nfrom clipn_runtime.cli import main\nmain(prog_name='clipn-detect')\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


@pytest.mark.slow
def test_ctrl_c_then_resume_gives_every_image_exactly_once(
    synthetic_bundle: SyntheticBundle, tmp_path: Path
) -> None:
    seeds = make_images(tmp_path / "imgs", 4, size=(96, 96))
    paths = [tmp_path / "imgs" / f"copy{i:04d}.png" for i in range(1500)]
    for i, p in enumerate(paths):
        p.write_bytes(seeds[i % 4].read_bytes())
    paths += seeds
    out = tmp_path / "out.jsonl"
    proc = _cli(
        str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(out), "-b", "2", "--workers", "1"
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 20:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    done = records(out.read_text())  # every line is a whole record
    assert 20 <= len(done) < len(paths)
    proc = _cli(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(out), "--resume")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    got = [rec["path"] for rec in records(out.read_text())]
    assert len(got) == len(paths) and set(got) == {str(p) for p in paths}


def test_cli_runs_with_torch_blocked(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 3)
    proc = _cli(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), blocked=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert len(records(out)) == 3
    assert records(out) == records(run(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root)).stdout)


def test_python_dash_m(synthetic_bundle: SyntheticBundle) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "clipn_runtime", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "Usage: clipn-detect" in r.stdout


def test_video_inputs(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    pytest.importorskip("av", reason="PyAV (the `video` extra) is not installed")

    clip = make_clip(tmp_path / "clip.mp4")
    img = make_images(tmp_path, 1)[0]
    (tmp_path / "broken.mkv").write_bytes(b"\0" * 100)
    r = run(
        str(img),
        str(clip),
        str(tmp_path / "broken.mkv"),
        "-e",
        str(synthetic_bundle.root),
        "--every",
        "4",
        "--smoothing",
        "0.5",
    )
    assert r.exit_code == 1
    recs = records(r.stdout)
    assert recs[0]["path"] == str(img) and "frame" not in recs[0]
    frames = [rec for rec in recs if rec["path"] == str(clip)]
    assert [f["frame"] for f in frames] == [0, 4, 8]
    assert [f["time"] for f in frames] == pytest.approx([0.0, 0.4, 0.8])
    assert all(isinstance(f["ood_score_smooth"], float) for f in frames)
    assert recs[-1]["path"] == str(tmp_path / "broken.mkv") and "cannot open video" in recs[-1]["error"]
    # resume skips the frames already written
    out = tmp_path / "v.jsonl"
    assert run(str(clip), "-e", str(synthetic_bundle.root), "--every", "4", "-o", str(out)).exit_code == 0
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n")
    r = run(str(clip), "-e", str(synthetic_bundle.root), "--every", "4", "-o", str(out), "--resume")
    assert r.exit_code == 0 and "1 scored" in r.stderr
    assert [json.loads(x)["frame"] for x in out.read_text().splitlines()] == [0, 4, 8]
