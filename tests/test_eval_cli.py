"""clipn-eval end to end on tiny generated folders: every report file, resume from the score cache, the
PyTorch reference path agreeing with the engine."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clipn_eval.cli import main
from clipn_runtime.scoring import METHODS

CLASSES = ["cat", "dog", "car"]


def _folders(root: Path) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(0)
    id_dir, ood_a, ood_b = root / "id", root / "ood_a", root / "ood_b"
    for i in range(12):
        d = id_dir / CLASSES[i % 3]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    for folder, lo in ((ood_a, 0), (ood_b, 100)):
        folder.mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(lo, lo + 150, (36, 36, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    (ood_b / "broken.jpg").write_bytes(b"not an image")
    return id_dir, ood_a, ood_b


def test_eval_writes_every_file_and_resumes(tiny_bundle: Path, tmp_path: Path) -> None:
    id_dir, ood_a, ood_b = _folders(tmp_path)
    out = tmp_path / "report"
    args = ["--engine", str(tiny_bundle), "--id", str(id_dir), "--ood", f"A={ood_a}", "--ood", f"B={ood_b}"]
    r = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert r.exit_code == 1, r.output  # one unreadable OOD image → exit 1, still a full report
    assert "| CLIPN-ATD |" in r.output and "broken.jpg" in r.output
    for name in (
        "metrics.csv",
        "metrics.json",
        "metrics.md",
        "roc_A.png",
        "hist_A.png",
        "roc_B.png",
        "hist_B.png",
    ):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "metrics.json").read_text())
    methods = {r["method"] for r in doc["rows"]}
    assert methods == set(METHODS)  # mcm-single too: the bundle carries MCM's one-prompt bank
    assert {r["ood_set"] for r in doc["rows"]} == {"A", "B", "average"}
    assert doc["id_accuracy"] is not None and 0 <= doc["id_accuracy"] <= 1
    assert [e["path"] for e in doc["meta"]["errors"]] == [str(ood_b / "broken.jpg")]
    b_rows = [r for r in doc["rows"] if r["ood_set"] == "B"]
    assert all(r["n_ood"] == 8 and r["n_id"] == 12 for r in b_rows)

    # Second run: everything comes from the per-image cache and the metrics are identical.
    (cache_file,) = [p for p in (out / "scores").rglob("*.jsonl") if "ID" in p.name]
    before = cache_file.read_text()
    r2 = CliRunner().invoke(main, [*args, "-o", str(out), "--no-plots"])
    assert r2.exit_code == 1
    assert cache_file.read_text() == before  # nothing re-scored
    assert json.loads((out / "metrics.json").read_text())["rows"] == doc["rows"]


def test_library_evaluate_returns_the_report_and_prints_nothing(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clipn_eval.evaluate import EngineScorer, evaluate

    id_dir, ood_a, ood_b = _folders(tmp_path)
    out = tmp_path / "report"
    scorer = EngineScorer(tiny_bundle, device="cpu", threads=1)
    capsys.readouterr()
    res = evaluate(scorer, id_dir, [("A", ood_a), ("B", ood_b)], ["atd", "msp"], out, plots=False, progress=False)
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == ""  # the CLI prints; a library caller gets the result
    doc = json.loads((out / "metrics.json").read_text())
    assert [asdict(r) for r in res.rows] == doc["rows"]
    assert res.id_accuracy == doc["id_accuracy"] and res.out_dir == out
    assert res.errors == doc["meta"]["errors"]
    assert [e["path"] for e in res.errors] == [str(ood_b / "broken.jpg")]
    assert len(res.id_scores["atd"]) == 12 and len(res.ood_scores["B"]["msp"]) == 8


def test_eval_continues_after_a_crash(tiny_bundle: Path, tmp_path: Path) -> None:
    id_dir, ood_a, _ = _folders(tmp_path)
    out = tmp_path / "report"
    args = ["--engine", str(tiny_bundle), "--id", str(id_dir), "--ood", f"A={ood_a}", "-o", str(out), "--no-plots"]
    assert CliRunner().invoke(main, args).exit_code == 0
    full = json.loads((out / "metrics.json").read_text())["rows"]
    # Simulate a crash part-way: keep half the ID cache plus a torn last line.
    (cache_file,) = [p for p in (out / "scores").rglob("*.jsonl") if "ID" in p.name]
    lines = cache_file.read_text().splitlines(keepends=True)
    cache_file.write_text("".join(lines[:5]) + lines[5][:10])
    assert CliRunner().invoke(main, args).exit_code == 0
    rescored = json.loads((out / "metrics.json").read_text())["rows"]
    for a, b in zip(full, rescored, strict=True):
        assert a["auroc"] == pytest.approx(b["auroc"], abs=1e-9)


def test_class_map_and_usage_errors(tiny_bundle: Path, tmp_path: Path) -> None:
    id_dir, ood_a, _ = _folders(tmp_path)
    for c in CLASSES:  # rename class folders to wnid-like ids
        (id_dir / c).rename(id_dir / f"n0{CLASSES.index(c)}")
    cmap = tmp_path / "map.tsv"
    cmap.write_text("".join(f"n0{i}\t{c}\n" for i, c in enumerate(CLASSES)), encoding="utf-8")
    out = tmp_path / "r"
    base = ["--engine", str(tiny_bundle), "--id", str(id_dir), "--ood", f"A={ood_a}", "-o", str(out), "--no-plots"]
    r = CliRunner().invoke(main, base)
    assert r.exit_code == 0 and json.loads((out / "metrics.json").read_text())["id_accuracy"] is None
    r = CliRunner().invoke(main, [*base, "--class-map", str(cmap)])
    acc = json.loads((out / "metrics.json").read_text())["id_accuracy"]
    assert r.exit_code == 0 and acc is not None
    # wnid-style folders in sorted order are the class order, as with ImageNet and --classes imagenet
    r = CliRunner().invoke(main, [*base, "--class-map", "sorted"])
    assert r.exit_code == 0 and json.loads((out / "metrics.json").read_text())["id_accuracy"] == acc

    r = CliRunner().invoke(main, [*base[:-3], "--ood", "noequals"])
    assert r.exit_code == 2 and "NAME=DIR" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, [*base, "--methods", "atd,bogus"])
    assert r.exit_code == 2 and "bogus" in r.output
    r = CliRunner().invoke(main, ["--id", str(id_dir), "--ood", f"A={ood_a}"])
    assert r.exit_code == 2 and "--engine" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, ["--engine", str(tiny_bundle), "--id", str(empty), "--ood", f"A={ood_a}"])
    assert r.exit_code == 2 and "no images found" in r.output


def test_torch_reference_matches_engine(
    tiny_bundle: Path, tiny_official_checkpoint: Path, tiny_config: Path, tmp_path: Path
) -> None:
    id_dir, ood_a, _ = _folders(tmp_path)
    common = ["--id", str(id_dir), "--ood", f"A={ood_a}", "--no-plots"]
    r = CliRunner().invoke(main, ["--engine", str(tiny_bundle), *common, "-o", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        main,
        [
            "--torch",
            "--checkpoint",
            str(tiny_official_checkpoint),
            "--model",
            str(tiny_config),
            "--engine",
            str(tiny_bundle),
            *common,
            "-o",
            str(tmp_path / "t"),
        ],
    )
    assert r.exit_code == 0, r.output
    eng = json.loads((tmp_path / "e" / "metrics.json").read_text())
    ref = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert eng["id_accuracy"] == ref["id_accuracy"]

    def per_image(report: Path) -> dict[str, dict[str, Any]]:
        rows = {}
        for f in (report / "scores").rglob("*.jsonl"):
            rows.update({r["path"]: r for r in map(json.loads, f.read_text().splitlines())})
        return rows

    e, t = per_image(tmp_path / "e"), per_image(tmp_path / "t")
    assert set(e) == set(t) and len(e) == 20
    for path, a in e.items():
        assert a["pred_index"] == t[path]["pred_index"]
        for m, v in a["scores"].items():
            assert v == pytest.approx(t[path]["scores"][m], rel=1e-4, abs=1e-5), (path, m)
    # Methods whose scores are not saturated by this random tiny model rank the images identically.
    for a, b in zip(eng["rows"], ref["rows"], strict=True):
        if a["method"] in ("msp", "mcm", "maxlogit", "energy", "mcm-single"):
            assert a["auroc"] == pytest.approx(b["auroc"], abs=1e-6)


def test_eval_rerun_from_another_folder_and_thread_count_uses_the_cache(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The score cache is keyed by what changes the numbers and matched by resolved file: neither the folder
    the command runs from (relative --id/--ood paths) nor --threads makes it score the images again."""
    id_dir, ood_a, _ = _folders(tmp_path)
    out = tmp_path / "report"
    common = ["--engine", str(tiny_bundle), "-o", str(out), "--no-plots"]
    monkeypatch.chdir(tmp_path)
    first = [*common, "--id", id_dir.name, "--ood", f"A={ood_a.name}", "--threads", "1"]
    assert CliRunner().invoke(main, first).exit_code == 0
    caches = sorted((out / "scores").rglob("*.jsonl"))
    before = [c.read_text() for c in caches]
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    second = [*common, "--id", f"../{id_dir.name}", "--ood", f"A=../{ood_a.name}", "--threads", "2"]
    assert CliRunner().invoke(main, second).exit_code == 0
    assert sorted((out / "scores").rglob("*.jsonl")) == caches
    assert [c.read_text() for c in caches] == before  # nothing re-scored
    assert json.loads((out / "metrics.json").read_text())["rows"] == rows
