"""Calibrated decisions: the split-conformal threshold, its guarantee, the calibration file, and its use by
clipn-calibrate, clipn-detect and the Detector (clipn_runtime.calibration)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import SyntheticBundle, SyntheticBundleFactory, make_images

from clipn_runtime import clikit
from clipn_runtime import detector as detector_module
from clipn_runtime.bundle import BundleError, load_manifest
from clipn_runtime.calibrate_cli import main as calibrate_main
from clipn_runtime.calibration import (
    Calibration,
    CalibrationError,
    MeasuredOn,
    acceptance_floor,
    calibrate,
    conformal_rank,
    conformal_threshold,
    min_images,
    parse_tpr,
)
from clipn_runtime.cli import main as detect_main
from clipn_runtime.detector import Detector

MEASURED = MeasuredOn("model.onnx", "e" * 64, "fp32:onnxruntime", "fp32", "c" * 64, "b" * 64)


# ---- the order statistic ----------------------------------------------------------------------------------------


def test_rank_is_exact_where_floating_point_is_one_off() -> None:
    # (n + 1)(1 - α) with α = 0.7 in floats: 10 * 0.30000000000000004 → ceil 4; the exact rank is 3.
    assert math.ceil(10 * (1 - 0.7)) == 4
    assert conformal_rank(9, parse_tpr("0.3")) == 3
    for n in range(19, 400):
        assert conformal_rank(n, Fraction(19, 20)) == -(-(n + 1) * 19 // 20)  # integer ceiling


def test_small_n_order_statistic_and_refusal() -> None:
    tpr = parse_tpr("0.95")
    assert min_images(tpr) == 19
    scores = list(np.random.default_rng(0).permutation(19).astype(float))
    assert conformal_threshold(scores, tpr) == conformal_threshold(sorted(scores), tpr)
    t = conformal_threshold(scores, tpr)
    assert (t.rank, t.threshold) == (19, 18.0)  # k = ceil(20 · 0.95) = 19: the largest of 19
    t = conformal_threshold(list(range(39)), tpr)
    assert (t.rank, t.threshold) == (38, 37.0)  # ceil(40 · 0.95) = 38
    with pytest.raises(CalibrationError, match="needs at least 19 ID images"):
        conformal_threshold(list(range(18)), tpr)
    with pytest.raises(CalibrationError, match="not finite"):
        conformal_threshold([0.0] * 30 + [float("nan")], tpr)
    for bad in ("1", "0", "1.2", "abc"):
        with pytest.raises(CalibrationError):
            parse_tpr(bad)


@pytest.mark.parametrize(("tpr", "n"), [("0.95", 19), ("0.95", 100), ("0.9", 50), ("0.99", 300)])
def test_conformal_coverage_holds_empirically(tpr: str, n: int) -> None:
    """Over many random calibration sets, a fresh ID score exceeds the threshold with probability ≤ α, and not
    much less: for continuous scores the miss rate lies in [α − 1/(n + 1), α] (exactly 1 − k/(n + 1))."""
    rng = np.random.default_rng(n)
    target = parse_tpr(tpr)
    trials, fresh = 4000, 50
    misses = np.empty(trials)
    for i in range(trials):
        calib = rng.standard_normal(n)
        t = conformal_threshold(list(calib), target).threshold
        misses[i] = np.mean(rng.standard_normal(fresh) > t)
    alpha = 1 - float(target)
    expected = 1 - conformal_rank(n, target) / (n + 1)
    se = misses.std(ddof=1) / math.sqrt(trials)
    assert misses.mean() <= alpha + 4 * se
    assert abs(misses.mean() - expected) <= 4 * se
    assert expected >= alpha - 1 / (n + 1) - 1e-12


@pytest.mark.parametrize(("n", "m"), [(40, 200), (256, 256), (768, 768)])
def test_acceptance_floor_bounds_the_share_kept(n: int, m: int) -> None:
    """The demo guard's floor: over many calibration sets, the share of m new ID images kept falls below
    acceptance_floor(p) with probability about p — at most p, and not far less (the floor is the tail's edge)."""
    rng = np.random.default_rng(n + m)
    target = parse_tpr("0.95")
    trials = 6000
    kept = np.empty(trials)
    for i in range(trials):
        t = conformal_threshold(list(rng.standard_normal(n)), target).threshold
        kept[i] = np.mean(rng.standard_normal(m) <= t)
    p = 0.05  # large enough for 6000 trials to measure
    floor = acceptance_floor(n, m, target, p)
    below, below_next = np.mean(kept < floor - 1e-12), np.mean(kept < floor + 1 / m - 1e-12)
    se = math.sqrt(p * (1 - p) / trials)  # 0.0028
    assert below <= p + 4 * se and below_next >= p - 4 * se
    assert acceptance_floor(n, m, target, 1e-3) < floor < float(target)


# ---- the file -----------------------------------------------------------------------------------------------------


def _calibration() -> Calibration:
    rng = np.random.default_rng(1)
    scores = {m: list(rng.standard_normal(40)) for m in ("atd", "ctw", "energy")}
    return calibrate(scores, parse_tpr("0.95"), MEASURED, {"images": 40, "errors": 0, "fingerprint": "f" * 64})


def test_file_round_trip_and_tampering(tmp_path: Path) -> None:
    c = _calibration()
    p = tmp_path / "c.json"
    p.write_text(c.to_json())
    back = Calibration.load(p)
    assert back.thresholds == c.thresholds and back.tpr == Fraction(19, 20) and back.rule == "calibrated@0.95"
    assert back.measured_on == MEASURED
    doc = json.loads(p.read_text())
    doc["thresholds"]["atd"]["threshold"] += 0.01
    p.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError, match="modified after clipn-calibrate wrote it"):
        Calibration.load(p)
    doc = json.loads(c.to_json())
    doc["version"] = 99
    p.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError, match="version 99"):
        Calibration.load(p)
    p.write_text("{not json")
    with pytest.raises(CalibrationError, match="not a calibration file"):
        Calibration.load(p)


def test_mismatch_is_refused_with_the_reason() -> None:
    c = _calibration()
    c.check(MEASURED, "c.json")
    for change, why in (
        ({"classes_sha256": "x"}, "another class list"),
        ({"engine_file": "model.int8.onnx", "engine_sha256": "y"}, "engine model.onnx, this run uses model.int8"),
        (
            {"numeric_path": "fp32:openvino:bf16"},
            "numeric path fp32:onnxruntime, this run uses fp32:openvino:bf16",
        ),
        ({"banks_sha256": "z"}, "other class banks"),
    ):
        with pytest.raises(CalibrationError, match=why):
            c.check(replace(MEASURED, **change), "c.json")


# ---- in a bundle, through the CLIs and the Detector ----------------------------------------------------------------


@pytest.fixture()
def calibrated(synthetic_bundle_factory: SyntheticBundleFactory, tmp_path: Path) -> tuple[SyntheticBundle, Path]:
    sb = synthetic_bundle_factory(["a", "b", "c"])
    make_images(tmp_path / "holdout", 24, seed=5)
    r = CliRunner().invoke(calibrate_main, [str(tmp_path / "holdout"), "-e", str(sb.root), "-q"])
    assert r.exit_code == 0, r.output
    return sb, tmp_path / "holdout"


def test_calibrate_writes_into_the_bundle_and_detect_uses_it(
    calibrated: tuple[SyntheticBundle, Path], tmp_path: Path
) -> None:
    sb, holdout = calibrated
    entry = load_manifest(sb.root).file("calibration")
    assert entry is not None and entry.path.startswith("calibration-")
    calib = Calibration.load(sb.root / entry.path)
    assert calib.n == 24 and calib.thresholds["energy"].rank == 24  # ceil(25 · 0.95) = 24
    # The decision is the threshold: recompute it from the records' scores.
    det = Detector(sb.root, method="energy")
    assert det.rule == "calibrated@0.95"
    ds = det.detect([str(p) for p in sorted(holdout.iterdir())])
    assert all(d.ood == (-float(d.scores["energy"]) > calib.thresholds["energy"].threshold) for d in ds)
    # On its own calibration images at most n − k exceed the k-th smallest (the same engine, the same batches).
    assert sum(bool(d.ood) for d in ds) <= calib.n - calib.thresholds["energy"].rank
    images = make_images(tmp_path / "imgs", 4, seed=9)
    r = CliRunner().invoke(detect_main, [str(images[0].parent), "-e", str(sb.root), "--method", "msp"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert {x["rule"] for x in recs} == {"calibrated@0.95"} and {x["method"] for x in recs} == {"msp"}
    assert "msp calibrated@0.95" in r.output  # the summary line says which rule decided
    # ATD uses the calibration too, unless told not to.
    assert Detector(sb.root).rule == "calibrated@0.95"
    assert Detector(sb.root, use_calibration=False).rule == "threshold-free"


def test_recalibrating_replaces_the_file_and_tampering_is_caught(calibrated: tuple[SyntheticBundle, Path]) -> None:
    sb, holdout = calibrated
    first = load_manifest(sb.root).file("calibration")
    assert first is not None
    r = CliRunner().invoke(calibrate_main, [str(holdout), "-e", str(sb.root), "--tpr", "0.9", "-q"])
    assert r.exit_code == 0, r.output
    second = load_manifest(sb.root).file("calibration")
    assert second is not None and second.path != first.path
    assert not (sb.root / first.path).exists()
    assert [f.role for f in load_manifest(sb.root).files].count("calibration") == 1
    with open(sb.root / second.path, "a") as fh:
        fh.write(" ")
    with pytest.raises(BundleError, match=second.path):
        load_manifest(sb.root)


def test_mistakes_are_one_line_errors_and_nothing_is_lost(
    synthetic_bundle_factory: SyntheticBundleFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = synthetic_bundle_factory(["a", "b"])
    imgs = make_images(tmp_path / "few", 10)
    r = CliRunner().invoke(calibrate_main, [str(imgs[0].parent), "-e", str(sb.root)])
    assert r.exit_code == 2 and "needs at least 19 held-out ID images" in r.output
    r = CliRunner().invoke(detect_main, [str(imgs[0].parent), "-e", str(sb.root), "--method", "energy"])
    assert r.exit_code == 2 and "clipn-calibrate ID_IMAGES/" in r.output and "Traceback" not in r.output
    # A bundle that cannot be written (read-only mount; faked: root writes anywhere): refused before any
    # scoring, with the way out.
    make_images(tmp_path / "holdout", 20, seed=2)
    monkeypatch.setattr(clikit, "output_problem", lambda path, kind: f"{path} is not writable (read-only)")
    monkeypatch.setattr(detector_module, "Detector", None)  # scoring would fail loudly
    r = CliRunner().invoke(calibrate_main, [str(tmp_path / "holdout"), "-e", str(sb.root)])
    assert r.exit_code == 2 and "not writable (read-only): give -o FILE" in r.output


def test_sidecar_calibration(synthetic_bundle_factory: SyntheticBundleFactory, tmp_path: Path) -> None:
    sb = synthetic_bundle_factory(["a", "b"])
    make_images(tmp_path / "holdout", 20, seed=2)
    side = tmp_path / "side.json"
    r = CliRunner().invoke(calibrate_main, [str(tmp_path / "holdout"), "-e", str(sb.root), "-o", str(side), "-q"])
    assert r.exit_code == 0, r.output
    assert load_manifest(sb.root).file("calibration") is None  # the bundle is untouched
    det = Detector(sb.root, method="mcm", calibration=side)
    assert det.rule == "calibrated@0.95"
    other = synthetic_bundle_factory(["a", "b"], seed=7)  # another engine: its thresholds do not hold
    with pytest.raises(CalibrationError, match="engine model.onnx"):
        Detector(other.root, method="mcm", calibration=side)


def test_eval_reports_the_decision_at_the_calibrated_threshold(
    calibrated: tuple[SyntheticBundle, Path], tmp_path: Path
) -> None:
    pytest.importorskip("sklearn", reason="clipn-eval needs the `eval` extra")
    from clipn_eval.evaluate import EngineScorer, evaluate

    sb, _ = calibrated
    make_images(tmp_path / "id", 10, seed=11)
    make_images(tmp_path / "ood", 10, seed=12)
    ev = evaluate(
        EngineScorer(sb.root),
        tmp_path / "id",
        [("o", tmp_path / "ood")],
        ["atd", "energy"],
        tmp_path / "report",
        plots=False,
        progress=False,
    )
    entry = load_manifest(sb.root).file("calibration")
    assert entry is not None
    t = Calibration.load(sb.root / entry.path).thresholds["energy"].threshold
    row = next(r for r in ev.rows if r.method == "energy")
    assert row.calibrated_tpr == pytest.approx(np.mean(-ev.id_scores["energy"] <= t))
    assert row.calibrated_fpr == pytest.approx(np.mean(-ev.ood_scores["o"]["energy"] <= t))
    doc = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert doc["meta"]["calibration"]["target_tpr"] == "0.95" and doc["best"]["method"] in ("atd", "energy")


def test_resume_refuses_another_decision_rule(calibrated: tuple[SyntheticBundle, Path], tmp_path: Path) -> None:
    sb, _ = calibrated
    images = make_images(tmp_path / "imgs", 3, seed=9)
    out = tmp_path / "r.jsonl"
    args = [str(images[0].parent), "-e", str(sb.root), "-o", str(out)]
    assert CliRunner().invoke(detect_main, [*args, "--no-calibration"]).exit_code == 0
    r = CliRunner().invoke(detect_main, [*args, "--resume"])
    assert r.exit_code == 2 and "decision: earlier threshold-free, now calibrated@0.95" in r.output
    assert CliRunner().invoke(detect_main, [*args, "--resume", "--no-calibration"]).exit_code == 0
