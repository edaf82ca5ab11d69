"""Bad input never gives a silent wrong answer: file names that are not UTF-8, linked folders, no
inputs, --resume across folders and setups, a manifest with impossible values, non-finite engine scores, -o a
folder, decompression bombs, truncated videos, a closed stdout."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from helpers import (
    SyntheticBundle,
    SyntheticBundleFactory,
    hashed_bundle,
    import_blocker,
    make_clip,
    make_images,
    png_header_only,
)
from PIL import Image

from clipn_runtime.bundle import MANIFEST_NAME, BundleError, Manifest, load_manifest
from clipn_runtime.cli import main
from clipn_runtime.detector import Detector
from clipn_runtime.inputs import path_fields, path_from_fields
from clipn_runtime.results import RUN_SUFFIX

LATIN1_NAME = b"caf\xe9.png"  # "café.png" in Latin-1: not valid UTF-8


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def strict_records(data: bytes) -> list[dict[str, Any]]:
    """JSONL as a strict reader sees it: UTF-8 that decodes without errors, no NaN/Infinity literals."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON number {token}")

    text = data.decode("utf-8")  # strict: raises on invalid UTF-8
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line.strip()]


def cli(*args: str | bytes, cwd: Path | None = None, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    """The real command in a child process: stdout is a byte pipe (as in `clipn-detect … | jq`)."""
    code = "import sys\nfrom clipn_runtime.cli import main\nmain(prog_name='clipn-detect')\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, check=False, **{"capture_output": True, "timeout": 120, **kw}
    )


def latin1_folder(tmp_path: Path) -> tuple[Path, bytes, list[Path]]:
    """A folder with two good images and a copy of the first under a Latin-1 name; returns its bytes path."""
    d = tmp_path / "d"
    good = make_images(d, 2)
    raw = os.fsencode(d) + b"/" + LATIN1_NAME
    try:
        with open(raw, "wb") as fh:
            fh.write(good[0].read_bytes())
    except OSError as e:  # some file systems (APFS, most on Windows) refuse names that are not UTF-8
        pytest.skip(f"this file system refuses non-UTF-8 names: {e}")
    return d, raw, good


# ---- 1. file names that are not valid UTF-8 ----------------------------------------------------------------


def test_path_fields_round_trip() -> None:
    for raw in (b"plain.png", "ünï cødé.png".encode(), LATIN1_NAME, b"a\xff\xfe/b\x80.jpg", b"caf\\xe9.png"):
        path = os.fsdecode(raw)
        fields = path_fields(path)
        json.dumps(fields, allow_nan=False).encode("utf-8")  # always strict JSON, valid UTF-8
        assert path_from_fields(json.loads(json.dumps(fields))) == path
    # the printable form of a Latin-1 name equals a real file named with a backslash; path_b64 tells them apart
    latin, literal = path_fields(os.fsdecode(LATIN1_NAME)), path_fields("caf\\xe9.png")
    assert latin["path"] == literal["path"] == "caf\\xe9.png"
    assert base64.b64decode(latin["path_b64"]) == LATIN1_NAME and "path_b64" not in literal


def test_non_utf8_name_every_format_and_resume(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    d, raw, good = latin1_folder(tmp_path)
    out = tmp_path / "r.jsonl"
    r = run(str(d), "-e", str(synthetic_bundle.root), "-o", str(out))
    assert r.exit_code == 0, r.output
    recs = strict_records(out.read_bytes())
    assert len(recs) == 3 and all(rec["error"] is None for rec in recs)
    (latin,) = [rec for rec in recs if "path_b64" in rec]
    assert latin["path"] == str(d) + "/caf\\xe9.png" and base64.b64decode(latin["path_b64"]) == raw
    twin = next(rec for rec in recs if rec["path"] == str(good[0]))  # same pixels, so the same scores
    assert {k: latin[k] for k in ("pred", "p_ood", "ood")} == {k: twin[k] for k in ("pred", "p_ood", "ood")}
    # --resume finds it again: nothing is scored twice
    r = run(str(d), "-e", str(synthetic_bundle.root), "-o", str(out), "--resume")
    assert r.exit_code == 0 and "0 scored" in r.stderr and "3 already done" in r.stderr
    assert len(strict_records(out.read_bytes())) == 3

    # JSONL piped to stdout is valid UTF-8 too (not the raw Latin-1 byte)
    proc = cli(str(d), "-e", str(synthetic_bundle.root))
    assert proc.returncode == 0, proc.stderr
    assert strict_records(proc.stdout) == recs

    # CSV: the exact bytes in the last column, and --resume reads them back
    out_csv = tmp_path / "r.csv"
    assert run(str(d), "-e", str(synthetic_bundle.root), "-o", str(out_csv)).exit_code == 0
    rows = list(csv.DictReader(io.StringIO(out_csv.read_bytes().decode("utf-8"), newline="")))
    (row,) = [row for row in rows if row["path_b64"]]
    assert base64.b64decode(row["path_b64"]) == raw
    r = run(str(d), "-e", str(synthetic_bundle.root), "-o", str(out_csv), "--resume")
    assert r.exit_code == 0 and "0 scored" in r.stderr

    # the table for people
    proc = cli(str(d), "-e", str(synthetic_bundle.root), "--format", "table")
    assert proc.returncode == 0 and "caf\\xe9.png" in proc.stdout.decode("utf-8")


def test_non_utf8_name_in_a_list_file_and_in_an_error_record(
    synthetic_bundle: SyntheticBundle, tmp_path: Path
) -> None:
    d, raw, good = latin1_folder(tmp_path)
    bad = os.fsencode(d) + b"/br\xf6ken.png"
    with open(bad, "wb") as fh:
        fh.write(b"not an image")
    lst = tmp_path / "list.txt"  # written by `find`: raw bytes, CRLF line ends, a blank line
    lst.write_bytes(raw + b"\r\n\r\n" + bad + b"\r\n" + os.fsencode(good[1]) + b"\r\n")
    proc = cli(f"@{lst}", "-e", str(synthetic_bundle.root))
    assert proc.returncode == 1, proc.stderr
    recs = strict_records(proc.stdout)
    assert [base64.b64decode(rec["path_b64"]) if "path_b64" in rec else rec["path"] for rec in recs] == [
        raw,
        bad,
        str(good[1]),
    ]
    assert recs[0]["error"] is None and "not an image" in recs[1]["error"] and recs[2]["error"] is None


def test_clipn_eval_non_utf8_names_and_rerun(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="clipn-eval needs the `eval` extra")
    from clipn_eval.cli import main as eval_main

    id_dir, _, _ = latin1_folder(tmp_path)
    with open(os.fsencode(id_dir) + b"/bro\xefken.png", "wb") as fh:
        fh.write(b"not an image")
    ood = tmp_path / "ood"
    make_images(ood, 3, seed=5)
    args = ["-e", str(synthetic_bundle.root), "--id", str(id_dir), "--ood", f"X={ood}", "--no-plots"]
    for attempt in range(2):  # the second run reads every score from the per-image cache
        r = CliRunner().invoke(eval_main, [*args, "-o", str(tmp_path / "rep")], catch_exceptions=False)
        assert r.exit_code == 1, (attempt, r.output)
    doc = json.loads((tmp_path / "rep" / "metrics.json").read_bytes().decode("utf-8"))
    (err,) = doc["meta"]["errors"]
    assert err["path"].endswith("bro\\xefken.png") and base64.b64decode(err["path_b64"]).endswith(
        b"bro\xefken.png"
    )
    for cache in (tmp_path / "rep" / "scores").rglob("*.jsonl"):
        strict_records(cache.read_bytes())
    (id_cache,) = [p for p in (tmp_path / "rep" / "scores").rglob("ID-*.jsonl")]
    assert len(strict_records(id_cache.read_bytes())) == 4  # 3 images + the broken one, none twice


# ---- 4. linked folders, no inputs ------------------------------------------------------------------------------


def test_recursive_follows_linked_folders_without_looping(
    synthetic_bundle: SyntheticBundle, tmp_path: Path
) -> None:
    real = make_images(tmp_path / "store" / "real", 2)
    top = tmp_path / "imgs"
    top.mkdir()
    (top / "linked").symlink_to(tmp_path / "store" / "real", target_is_directory=True)
    (top / "again").symlink_to(tmp_path / "store" / "real", target_is_directory=True)  # listed once
    (tmp_path / "store" / "real" / "up").symlink_to(tmp_path / "store", target_is_directory=True)  # a loop
    r = run(str(top), "-r", "-e", str(synthetic_bundle.root))
    assert r.exit_code == 0, r.output
    assert [rec["path"] for rec in strict_records(r.stdout_bytes)] == [str(top / "again" / p.name) for p in real]


def test_no_inputs_is_an_error(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    r = run(str(tmp_path / "empty"), "-e", str(synthetic_bundle.root))
    assert r.exit_code == 2 and "no images or videos found in INPUTS" in r.stderr and "--recursive" in r.stderr
    lst = tmp_path / "list.txt"
    lst.write_text("# nothing yet\n\n")
    r = run(f"@{lst}", "-e", str(synthetic_bundle.root))
    assert r.exit_code == 2 and "no images or videos found" in r.stderr and "Traceback" not in r.output


# ---- 5. --resume: by resolved file, and only onto the same setup -----------------------------------------------


def test_resume_from_another_folder_matches_the_files(
    synthetic_bundle: SyntheticBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = make_images(tmp_path / "data" / "imgs", 4)
    out = tmp_path / "r.jsonl"
    monkeypatch.chdir(tmp_path / "data")
    assert (
        run("imgs/img0000.png", "imgs/img0001.png", "-e", str(synthetic_bundle.root), "-o", str(out)).exit_code
        == 0
    )
    monkeypatch.chdir(tmp_path / "data" / "imgs")
    r = run(".", "-e", str(synthetic_bundle.root), "-o", str(out), "--resume")
    assert r.exit_code == 0, r.output
    assert "2 scored" in r.stderr and "2 already done" in r.stderr
    recs = strict_records(out.read_bytes())
    # every record names its file: relative to where the file was started, or absolute
    named = [
        Path(rec["path"]) if Path(rec["path"]).is_absolute() else tmp_path / "data" / rec["path"] for rec in recs
    ]
    assert sorted(p.resolve() for p in named) == sorted(p.resolve() for p in paths)
    # a symlink to an image already scored is that image
    (tmp_path / "alias.png").symlink_to(paths[0])
    r = run(str(tmp_path / "alias.png"), "-e", str(synthetic_bundle.root), "-o", str(out), "--resume")
    assert r.exit_code == 0 and "1 already done" in r.stderr and "0 scored" in r.stderr


def test_resume_refuses_another_setup(
    synthetic_bundle: SyntheticBundle, synthetic_bundle_factory: SyntheticBundleFactory, tmp_path: Path
) -> None:
    make_images(tmp_path / "imgs", 3)
    out = tmp_path / "r.jsonl"
    bundle = str(synthetic_bundle.root)
    assert run(str(tmp_path / "imgs"), "-e", bundle, "-o", str(out)).exit_code == 0
    before = out.read_bytes()
    provenance = json.loads((tmp_path / ("r.jsonl" + RUN_SUFFIX)).read_text(encoding="utf-8"))
    assert provenance["method"] == "atd" and provenance["engine"] == "model.onnx"
    assert provenance["classes"] == synthetic_bundle.classes

    r = run(
        str(tmp_path / "imgs"), "-e", bundle, "-o", str(out), "--resume", "--method", "ctw", "--smoothing", "0.5"
    )
    assert r.exit_code == 2 and "method: earlier atd, now ctw" in r.stderr and "smoothing" in r.stderr
    other = synthetic_bundle_factory(["x", "y"], seed=7)
    r = run(str(tmp_path / "imgs"), "-e", str(other.root), "-o", str(out), "--resume")
    assert r.exit_code == 2 and "bundle" in r.stderr and "classes: earlier 5 classes, now 2" in r.stderr
    r = run(str(tmp_path / "imgs"), "-e", bundle, "-o", str(out), "--resume", "--format", "csv")
    assert r.exit_code == 2 and "output_format: earlier jsonl, now csv" in r.stderr
    assert out.read_bytes() == before  # nothing appended by any refused run
    assert "Traceback" not in r.output


def test_resume_refuses_a_file_without_provenance(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 2)
    out = tmp_path / "old.jsonl"
    out.write_text('{"path": "somewhere/else.png", "pred": "cat", "error": null}\n', encoding="utf-8")
    r = run(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(out), "--resume")
    assert r.exit_code == 2 and "old.jsonl.run.json" in r.stderr and "--overwrite" in r.stderr
    r = run(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(out), "--overwrite")
    assert r.exit_code == 0 and len(strict_records(out.read_bytes())) == 2
    assert (tmp_path / ("old.jsonl" + RUN_SUFFIX)).is_file()


# ---- 6. the manifest's values; non-finite scores ----------------------------------------------------------------


def _edit_manifest(root: Path, edit: Any) -> None:
    raw = json.loads((root / MANIFEST_NAME).read_text())
    edit(raw)
    (root / MANIFEST_NAME).write_text(json.dumps(raw))


def test_manifest_values_are_validated(synthetic_bundle_factory: SyntheticBundleFactory, tmp_path: Path) -> None:
    b = synthetic_bundle_factory(["a", "b", "c"], full_outputs=True)
    make_images(tmp_path / "imgs", 2)

    def zero_std(raw: dict[str, Any]) -> None:
        raw["preprocess"]["std"] = [0, 0.26, 0.27]

    _edit_manifest(b.root, zero_std)
    r = run(str(tmp_path / "imgs"), "-e", str(b.root))
    assert r.exit_code == 2 and "'preprocess.std'" in r.stderr and "> 0" in r.stderr and r.stdout == ""

    def many(raw: dict[str, Any]) -> None:
        pre = raw["preprocess"]
        pre.update(mean=[0.5, float("nan"), 0.5], std=[0.2, 0.2, float("inf")], image_size=True)
        pre.update(interpolation="lanczos", resize="fill", crop="random")
        raw["scoring"]["scale"] = float("nan")
        engine = raw["files"][0]
        engine["outputs"][-1]["shape"] = ["batch", 7]  # p_no_all over 7 classes, the list has 3
        raw["files"][1]["inputs"] = [{"name": "x"}]  # a tensor spec without shape/dtype

    _edit_manifest(b.root, many)
    with pytest.raises(BundleError) as e:
        load_manifest(b.root)
    msg = str(e.value)
    for part in (
        "'preprocess.mean'",
        "'preprocess.std'",
        "'preprocess.image_size' is True",
        "'preprocess.interpolation' is 'lanczos'",
        "'preprocess.resize' is 'fill'",
        "'preprocess.crop' is 'random'",
        "'scoring.scale' is nan",
        "output 'p_no_all' has 7 classes, 'classes' lists 3",
        "(text_bank.npz) 'inputs'[0]",
    ):
        assert part in msg, (part, msg)
    assert str(b.root) in msg and "re-export" in msg

    def bad_shape(raw: dict[str, Any]) -> None:
        raw["preprocess"].update(image_size=24, mean=[0.5] * 3, std=[0.2] * 3, interpolation="bicubic")
        raw["preprocess"].update(resize="shortest", crop="center")
        raw["scoring"]["scale"] = 100.0
        raw["files"][0]["outputs"][-1]["shape"] = ["batch", 3]
        raw["files"][1].pop("inputs")

    _edit_manifest(b.root, bad_shape)
    with pytest.raises(
        BundleError, match=r"input 'image' has shape \['batch', 3, 16, 16\], but 'preprocess' makes"
    ):
        load_manifest(b.root)


def test_manifest_is_written_as_strict_json(tmp_path: Path) -> None:
    m = hashed_bundle(tmp_path)
    m = Manifest(**{**m.__dict__, "parity": {"passed": False, "max_abs": float("nan"), "x": [float("inf")]}})
    doc = json.loads(m.to_json(), parse_constant=lambda t: pytest.fail(f"bare {t} in clipn.json"))
    assert doc["parity"] == {"passed": False, "max_abs": None, "x": [None]}


def test_non_finite_engine_scores_become_error_records(
    synthetic_bundle: SyntheticBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipn_runtime.engine import OrtEngine

    paths = make_images(tmp_path / "imgs", 3)
    real_run = OrtEngine.run

    def nan_for_the_second(self: OrtEngine, feeds: Any) -> dict[str, np.ndarray]:
        out = real_run(self, feeds)
        if len(out["p_ood"]) > 1:
            for k in ("p_ood", "atd"):
                out[k] = out[k].copy()
                out[k][1] = np.nan
        return out

    monkeypatch.setattr(OrtEngine, "run", nan_for_the_second)
    r = run(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-b", "3")
    assert r.exit_code == 1, r.output
    recs = strict_records(r.stdout_bytes)  # no bare NaN anywhere
    assert [rec["path"] for rec in recs] == [str(p) for p in paths]
    assert recs[0]["error"] is None and recs[2]["error"] is None
    assert "non-finite" in recs[1]["error"] and recs[1]["ood"] is None and recs[1]["p_ood"] is None
    assert "1 error" in r.stderr

    det = Detector(synthetic_bundle.root)
    (d,) = [d for d in det.detect([str(p) for p in paths]) if not d.ok]
    assert d.path == str(paths[1]) and d.ood is None and "non-finite scores (atd=nan, p_ood=nan)" in str(d.error)


# ---- 10. -o a folder, decompression bombs, truncated videos, a closed stdout -----------------------------------


def test_output_that_is_a_folder(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 1)
    (tmp_path / "outdir").mkdir()
    for flag in ("--overwrite", "--resume", None):
        args = [str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(tmp_path / "outdir")]
        r = run(*args, *([flag] if flag else []))
        assert r.exit_code == 2, (flag, r.output)
        assert "outdir" in r.stderr and "folder" in r.stderr and "Traceback" not in r.output
        assert len(r.stderr.strip().splitlines()) == 1


def test_decompression_bomb_names_max_pixels(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    pil_limit = Image.MAX_IMAGE_PIXELS
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(30000, 30000))  # 900 Mpx claimed: over twice Pillow's limit
    r = run(str(bomb), "-e", str(synthetic_bundle.root))
    (rec,) = strict_records(r.stdout_bytes)
    assert r.exit_code == 1 and "decompression bomb" in rec["error"] and "--max-pixels" in rec["error"]
    r = run(str(bomb), "-e", str(synthetic_bundle.root), "--max-pixels", str(30000 * 30000))
    (rec,) = strict_records(r.stdout_bytes)  # let through: now it fails as what it is, a header without data
    assert "bomb" not in rec["error"]
    # Pillow's limit is process-wide: an app that called main() in-process gets its own limit back.
    assert pil_limit == Image.MAX_IMAGE_PIXELS


def test_truncated_and_empty_videos_say_why(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    pytest.importorskip("av", reason="PyAV (the `video` extra) is not installed")

    data = make_clip(tmp_path / "clip.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    (tmp_path / "empty.mkv").write_bytes(b"")
    r = run(str(tmp_path / "cut.mp4"), str(tmp_path / "empty.mkv"), "-e", str(synthetic_bundle.root))
    assert r.exit_code == 1
    cut, empty = strict_records(r.stdout_bytes)
    assert "truncated or corrupt video" in cut["error"] and "Errno" not in cut["error"]
    assert "empty file (0 bytes)" in empty["error"] and "Errno" not in empty["error"]


def test_closed_stdout_is_a_usage_error(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 1)
    proc = subprocess.run(
        [sys.executable, "-m", "clipn_runtime", str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root)],
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.close(1),  # `clipn-detect … >&-`
        timeout=120,
        check=False,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "stdout is closed" in err and "-o FILE" in err and "Traceback" not in err


def test_a_full_disk_stops_cleanly_and_resume_finishes(
    synthetic_bundle: SyntheticBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing: one line and exit 2 (no traceback), the records already written are kept, and
    --resume (once there is room) finishes with every image exactly once."""
    import errno

    from clipn_runtime.output import JsonlWriter

    make_images(tmp_path / "imgs", 7)
    out = tmp_path / "r.jsonl"
    args = [str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(out), "-b", "2"]
    real = JsonlWriter.write_batch
    calls = {"n": 0}

    def filling_up(self: JsonlWriter, detections: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # the disk fills half-way through the third batch
            self.fh.write('{"path": "cut')
            self.fh.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, detections)

    monkeypatch.setattr(JsonlWriter, "write_batch", filling_up)
    r = run(*args)
    assert r.exit_code == 2 and "Traceback" not in r.output
    (error,) = [line for line in r.stderr.splitlines() if "error" in line]  # the engine line comes first
    assert "No space left on device" in error and "--resume" in error
    assert out.read_text().count("\n") == 4  # two whole batches kept
    monkeypatch.setattr(JsonlWriter, "write_batch", real)
    r = run(*args, "--resume")
    assert r.exit_code == 0, r.stderr
    paths = [rec["path"] for rec in strict_records(out.read_bytes())]
    assert sorted(paths) == sorted(str(p) for p in (tmp_path / "imgs").iterdir()) and len(paths) == 7


# ---- review fixes: videos that break, concurrent writers, resume, user errors ----------------------------------


def _pixels(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)


def fake_video(monkeypatch: pytest.MonkeyPatch, frames: int, *, fails: bool) -> None:
    """Replace PyAV's decoding with ``frames`` random frames at 10 fps, then (``fails``) a decoding error, as a
    file cut short or a stream that drops does."""
    from clipn_runtime import video

    def iter_frames(source: str, *, every: int = 1, options: Any = None) -> Any:
        for i in range(0, frames, every):
            yield video.VideoFrame(i, i / 10, _pixels(i))
        if fails:
            raise video.VideoError(f"{source}: decoding failed after {frames} frames: truncated or corrupt video")

    monkeypatch.setattr(video, "iter_frames", iter_frames)


def test_a_video_that_breaks_mid_decode_keeps_its_frames_and_resume_retries_the_rest(
    synthetic_bundle: SyntheticBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipn_runtime.video import VideoError

    fake_video(monkeypatch, 20, fails=True)
    det = Detector(synthetic_bundle.root, batch_size=4, decode_workers=2)
    got: list[int | None] = []
    with pytest.raises(VideoError, match="after 20 frames"):
        got.extend(d.frame for d in det.detect_video("cam.mp4"))
    assert got == list(range(20))  # every decoded frame, also those still in flight when decoding broke

    clip = str(tmp_path / "cam.mp4")
    out = tmp_path / "r.jsonl"
    args = [clip, "-e", str(synthetic_bundle.root), "-o", str(out), "-b", "4"]
    r = run(*args)
    assert r.exit_code == 1, r.output
    recs = strict_records(out.read_bytes())
    assert [rec.get("frame") for rec in recs] == [*range(20), None]
    assert "after 20 frames" in recs[-1]["error"] and "--resume" in recs[-1]["error"]
    fake_video(monkeypatch, 30, fails=False)  # the file was repaired / the stream is back
    r = run(*args, "--resume")
    assert r.exit_code == 0 and "10 scored" in r.stderr, r.output
    frames = [rec["frame"] for rec in strict_records(out.read_bytes()) if rec["error"] is None]
    assert frames == list(range(30))  # each frame exactly once


def test_resume_continues_the_smoothed_average_and_checks_every(
    synthetic_bundle: SyntheticBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_video(monkeypatch, 16, fails=False)
    clip = str(tmp_path / "cam.mp4")

    def args(out: Path) -> list[str]:
        return [clip, "-e", str(synthetic_bundle.root), "-o", str(out), "-b", "4", "--smoothing", "0.3"]

    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    assert run(*args(full)).exit_code == 0
    whole = strict_records(full.read_bytes())
    # a run killed after 7 frames: its records and provenance
    part.write_text("".join(line + "\n" for line in full.read_text().splitlines()[:7]))
    (tmp_path / ("part.jsonl" + RUN_SUFFIX)).write_bytes((tmp_path / ("full.jsonl" + RUN_SUFFIX)).read_bytes())
    r = run(*args(part), "--resume")
    assert r.exit_code == 0 and "9 scored" in r.stderr, r.output
    resumed = strict_records(part.read_bytes())
    assert [rec["frame"] for rec in resumed] == list(range(16))
    # Restarting the average at frame 7 would be off by 0.7·|p_ood(7) − average(6)|; the frames differ enough
    # for that to show.
    assert abs(whole[7]["p_ood"] - whole[6]["ood_score_smooth"]) > 1e-3
    for a, b in zip(whole, resumed, strict=True):
        # 1e-6: the same engine on other batch splits may differ in the last float32 bits (≈1e-7) of p_ood,
        # and an average of such values differs no more than they do
        assert b["ood_score_smooth"] == pytest.approx(a["ood_score_smooth"], abs=1e-6), a["frame"]
        assert b["ood_smooth"] == a["ood_smooth"]
    r = run(*args(part), "--resume", "--every", "2")
    assert r.exit_code == 2 and "every: earlier 1, now 2" in r.stderr


def test_two_runs_on_one_output_refused(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    from clipn_runtime.results import LOCK_SUFFIX, Results, RunInfo

    make_images(tmp_path / "imgs", 2)
    out = tmp_path / "r.jsonl"
    info = RunInfo.create(
        synthetic_bundle.root,
        load_manifest(synthetic_bundle.root),
        synthetic_bundle.classes,
        output_format="jsonl",
        method="atd",
        precision=None,
        prompts=None,
        smoothing=None,
    )
    first = Results(str(out), "jsonl")
    first.check(info)  # a run that is writing out
    for extra in ((), ("--overwrite",), ("--resume",)):
        proc = cli(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(out), *extra)
        err = proc.stderr.decode()
        assert proc.returncode == 2, (extra, err)
        assert f"another clipn-detect is writing {out} (pid {os.getpid()})" in err and "Traceback" not in err
    assert not out.exists()
    first.close()
    assert not (tmp_path / ("r.jsonl" + LOCK_SUFFIX)).exists()
    assert run(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(out)).exit_code == 0
    assert len(strict_records(out.read_bytes())) == 2 and not (tmp_path / ("r.jsonl" + LOCK_SUFFIX)).exists()


def test_full_stdout_is_one_line(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    make_images(tmp_path / "imgs", 2)
    with open("/dev/full", "wb") as full:
        args = (str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root))
        proc = cli(*args, capture_output=False, stdout=full, stderr=subprocess.PIPE)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err and "Exception ignored" not in err, err
    (line,) = [x for x in err.splitlines() if "error" in x]
    assert "cannot write results to stdout: No space left on device" in line and "-o FILE" in line


def test_resume_on_a_csv_resaved_in_cp1252(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    (p,) = make_images(tmp_path / "imgs", 1)
    p.rename(p.with_name("café.png"))
    out = tmp_path / "r.csv"
    assert run(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(out)).exit_code == 0
    out.write_bytes(out.read_bytes().decode("utf-8").encode("cp1252"))  # a spreadsheet's "Save"
    r = run(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(out), "--resume")
    assert r.exit_code == 2 and f"{out}: not UTF-8" in r.stderr and "drop --resume" in r.stderr


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [("prompts", None, "'prompts' is null"), ("classes", ["a", 1], "'classes' is"), ("every", True, "'every'")],
)
def test_a_damaged_provenance_is_one_line(
    synthetic_bundle: SyntheticBundle, tmp_path: Path, field: str, value: Any, says: str
) -> None:
    make_images(tmp_path / "imgs", 1)
    out = tmp_path / "r.jsonl"
    args = [str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(out)]
    assert run(*args).exit_code == 0
    side = tmp_path / ("r.jsonl" + RUN_SUFFIX)
    side.write_text(json.dumps({**json.loads(side.read_text()), field: value}))
    r = run(*args, "--resume")
    assert r.exit_code == 2 and says in r.stderr and "--overwrite" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1


def test_clipn_eval_folder_and_set_names_that_are_not_utf8(
    synthetic_bundle: SyntheticBundle, tmp_path: Path
) -> None:
    pytest.importorskip("sklearn", reason="clipn-eval needs the `eval` extra")
    from clipn_eval.cli import main as eval_main

    id_dir, _, _ = latin1_folder(tmp_path)
    odd = os.fsencode(tmp_path) + b"/id\xe9"
    os.rename(id_dir, odd)
    ood = tmp_path / "ood"
    make_images(ood, 3, seed=5)
    args = ["-e", str(synthetic_bundle.root), "--id", os.fsdecode(odd), "--no-plots", "-o", str(tmp_path / "rep")]
    name = os.fsdecode(b"x\xe9")
    r = CliRunner().invoke(eval_main, [*args, "--ood", f"{name}={ood}"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = strict_records((tmp_path / "rep" / "metrics.json").read_bytes().replace(b"\n", b" "))[0]
    assert doc["meta"]["id"].endswith("/id\\xe9") and doc["rows"][0]["ood_set"] == "x\\xe9"
    (tmp_path / "rep" / "metrics.md").read_bytes().decode("utf-8")


def test_output_fifo_is_streamed_without_provenance(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    import threading

    make_images(tmp_path / "imgs", 2)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as fh:
            received.append(fh.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc = cli(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(fifo), timeout=60)
    finally:
        if reader.is_alive():  # unblock the reader whatever happened
            with open(fifo, "wb"):
                pass
        reader.join(10)
    assert proc.returncode == 0, proc.stderr
    assert len(strict_records(received[0])) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "pipe"]  # no pipe.run.json, no lock left
    r = run(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(fifo), "--resume")
    assert r.exit_code == 2 and "not a regular file" in r.stderr


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_run_releases_everything_when_it_stops_midway(
    synthetic_bundle: SyntheticBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: type[BaseException]
) -> None:
    import errno

    from clipn_runtime.output import JsonlWriter
    from clipn_runtime.results import LOCK_SUFFIX

    make_images(tmp_path / "imgs", 4)
    closed = []
    real_close = Detector.close

    def counted_close(self: Detector) -> None:
        closed.append(1)
        real_close(self)

    monkeypatch.setattr(Detector, "close", counted_close)

    def stopping(self: JsonlWriter, detections: Any) -> None:
        raise stop() if stop is KeyboardInterrupt else OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(JsonlWriter, "write_batch", stopping)
    r = run(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(tmp_path / "r.jsonl"))
    assert r.exit_code == (130 if stop is KeyboardInterrupt else 2), r.output
    assert closed == [1] and not (tmp_path / ("r.jsonl" + LOCK_SUFFIX)).exists()


def test_a_file_reached_twice_in_one_run_is_scored_once(
    synthetic_bundle: SyntheticBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    imgs = make_images(tmp_path / "imgs", 20)
    (tmp_path / "link").symlink_to(tmp_path / "imgs", target_is_directory=True)
    r = run(str(tmp_path / "imgs"), str(tmp_path / "link"), str(imgs[3]), "-e", str(synthetic_bundle.root))
    assert r.exit_code == 0 and "21 already done" in r.stderr, r.output
    assert [rec["path"] for rec in strict_records(r.stdout_bytes)] == [str(p) for p in imgs]
    # resumed from another folder: this run's relative paths are written absolute and normalised
    out = tmp_path / "r.jsonl"
    monkeypatch.chdir(tmp_path / "imgs")
    assert run("img0000.png", "-e", str(synthetic_bundle.root), "-o", str(out)).exit_code == 0
    monkeypatch.chdir(tmp_path)
    assert run("./imgs/img0001.png", "-e", str(synthetic_bundle.root), "-o", str(out), "--resume").exit_code == 0
    assert [rec["path"] for rec in strict_records(out.read_bytes())] == ["img0000.png", str(imgs[1])]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_repair_tail_reads_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    from clipn_runtime import results

    records = [f'"x{i}","quoted\nnewline"\n' if fmt == "csv" else f'{{"path": "x{i}"}}\n' for i in range(50)]
    whole = "".join(records).encode()
    p = tmp_path / f"r.{fmt}"
    p.write_bytes(whole + (b'"cut","half\nwri' if fmt == "csv" else b'{"path": "cu'))  # cut inside quotes
    reads: list[int | None] = []
    real_open = open

    class Recording:
        def __init__(self, fh: Any) -> None:
            self.fh = fh

        def __enter__(self) -> Recording:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

        def read(self, n: int | None = None) -> bytes:
            reads.append(n)
            return self.fh.read() if n is None else self.fh.read(n)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.fh, name)

    monkeypatch.setattr(results, "_CHUNK", 64)
    monkeypatch.setattr(results, "open", lambda *a, **kw: Recording(real_open(*a, **kw)), raising=False)
    assert results.repair_tail(p, fmt) > 0
    assert p.read_bytes() == whole
    assert reads and all(n is not None and 0 <= n <= 64 for n in reads), reads  # never the whole file


def test_error_messages_show_undecodable_bytes_as_records_do(
    synthetic_bundle: SyntheticBundle, tmp_path: Path
) -> None:
    make_images(tmp_path / "imgs", 1)
    out = os.fsencode(tmp_path) + b"/r\xff.jsonl"
    with open(out, "wb") as fh:
        fh.write(b'{"path": "a.png"}\n')
    proc = cli(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", out, "--resume")
    assert proc.returncode == 2 and b"r\\xff.jsonl" in proc.stderr and b"\\udcff" not in proc.stderr


def test_output_with_a_trailing_separator_is_refused_at_once(
    synthetic_bundle: SyntheticBundle, tmp_path: Path
) -> None:
    make_images(tmp_path / "imgs", 1)
    r = run(str(tmp_path / "imgs"), "-e", str(synthetic_bundle.root), "-o", str(tmp_path / "newdir") + os.sep)
    assert r.exit_code == 2 and "ends with a path separator" in r.stderr and "newdir/results.jsonl" in r.stderr
    assert "engine:" not in r.stderr and not (tmp_path / "newdir").exists()


def test_a_binary_list_file_is_refused(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    (img,) = make_images(tmp_path / "imgs", 1)
    r = run(f"@{img}", "-e", str(synthetic_bundle.root))
    assert r.exit_code == 2 and "not a text list (it holds NUL bytes)" in r.stderr and r.stdout == ""
    noisy = tmp_path / "noise.txt"  # binary without NUL bytes: control bytes on most lines
    noisy.write_bytes(b"\x01\x02abc\n\x1b\x7fdef\nok.png\n\x03x\n")
    r = run(f"@{noisy}", "-e", str(synthetic_bundle.root))
    assert r.exit_code == 2 and "3 of its first 4 lines hold control bytes" in r.stderr
    latin = tmp_path / "latin.txt"  # names that are not UTF-8 are still a text list
    latin.write_bytes(os.fsencode(img) + b"\n" + b"caf\xe9.png\n")
    r = run(f"@{latin}", "-e", str(synthetic_bundle.root))
    assert r.exit_code == 1 and len(strict_records(r.stdout_bytes)) == 2


def test_a_shard_without_the_shards_extra_names_it(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    """Shard inputs need webdataset (the `shards` extra); without it: one line naming the extra, exit 2."""
    (tmp_path / "s.tar").write_bytes(b"")
    code = import_blocker(("webdataset",)) + textwrap.dedent(
        f"""
        import sys
        from clipn_runtime.cli import main
        sys.argv = ["clipn-detect", {str(tmp_path / "s.tar")!r}, "-e", {str(synthetic_bundle.root)!r}]
        main()
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stderr
    assert "pip install 'clipn-ood[shards]'" in r.stderr and "Traceback" not in r.stderr
