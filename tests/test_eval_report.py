"""The report folder: every file, consistent numbers, a table a person can read."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from clipn_eval.metrics import auroc
from clipn_eval.report import AVERAGE, markdown_table, metric_rows, write_report


def _scores() -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    id_s = {"atd": rng.normal(1, 1, 60), "msp": rng.normal(0.5, 1, 60)}
    ood = {
        "far": {"atd": rng.normal(-2, 1, 40), "msp": rng.normal(-1, 1, 40)},
        'near, "quoted"': {"atd": rng.normal(0.5, 1, 30), "msp": rng.normal(0.4, 1, 30)},
    }
    return id_s, ood


def test_rows_and_average() -> None:
    id_s, ood = _scores()
    rows = metric_rows(id_s, ood, ["atd", "msp"])
    assert len(rows) == 6
    far_atd = next(r for r in rows if r.ood_set == "far" and r.method == "atd")
    assert far_atd.auroc == pytest.approx(auroc(id_s["atd"], ood["far"]["atd"]))
    avg = next(r for r in rows if r.ood_set == AVERAGE and r.method == "atd")
    sets = [r for r in rows if r.method == "atd" and r.ood_set != AVERAGE]
    assert avg.auroc == pytest.approx(np.mean([r.auroc for r in sets]))
    assert avg.n_ood == 70


def test_write_report_every_file(tmp_path: Path) -> None:
    id_s, ood = _scores()
    rows = metric_rows(id_s, ood, ["atd", "msp"])
    paths = write_report(tmp_path, rows, id_s, ood, ["atd", "msp"], id_accuracy=0.5, meta={"engine": "b/"})
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [
            "metrics.csv",
            "metrics.json",
            "metrics.md",
            "roc_far.png",
            "hist_far.png",
            "roc_near___quoted_.png",
            "hist_near___quoted_.png",
        ]
    )
    for p in paths:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "metrics.csv", newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert {r["ood_set"] for r in table} == {"far", 'near, "quoted"', AVERAGE}
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["id_accuracy"] == 0.5 and len(doc["rows"]) == 6 and doc["meta"]["engine"] == "b/"
    md = (tmp_path / "metrics.md").read_text()
    assert "| CLIPN-ATD **(best)** |" in md and "| MSP |" in md and "ID top-1 accuracy: 50.00 %" in md
    assert doc["best"]["method"] == "atd" and "highest AUROC" in doc["best"]["why"]


def test_decisions_at_the_calibrated_threshold(tmp_path: Path) -> None:
    """Achieved TPR and FPR at a calibrated threshold, counted by hand; the best method is the lowest FPR."""
    id_s = {"atd": np.array([0.9, 0.8, 0.7, 0.2]), "msp": np.array([0.9, 0.8, 0.7, 0.6])}
    ood = {"x": {"atd": np.array([0.1, 0.75, 0.3]), "msp": np.array([0.65, 0.75, 0.3])}}
    # OOD when -score > t: t = -0.65 keeps scores ≥ 0.65.
    rows = metric_rows(id_s, ood, ["atd", "msp"], {"atd": -0.65, "msp": -0.65})
    by = {r.method: r for r in rows}
    assert by["atd"].calibrated_tpr == 0.75 and by["atd"].calibrated_fpr == pytest.approx(1 / 3)
    assert by["msp"].calibrated_tpr == 0.75 and by["msp"].calibrated_fpr == pytest.approx(2 / 3)
    md = markdown_table(rows)
    assert "ID kept (TPR)" in md and "| CLIPN-ATD **(best)** |" in md and "lowest FPR at the calibrated" in md
    assert "| 75.00 | 33.33 |" in md
    uncalibrated = metric_rows(id_s, ood, ["atd", "msp"])
    assert all(r.calibrated_fpr is None for r in uncalibrated) and "ID kept" not in markdown_table(uncalibrated)


def test_markdown_percentages() -> None:
    id_s = {"atd": np.array([3.0, 2.0])}
    ood = {"x": {"atd": np.array([1.0, 0.0])}}
    md = markdown_table(metric_rows(id_s, ood, ["atd"]))
    assert "| CLIPN-ATD **(best)** | 100.00 / 0.00 |" in md
