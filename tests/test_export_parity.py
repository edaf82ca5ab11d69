"""The parity gate measures, decides and fails loudly (exit 3 in the CLI; ParityGateError in the API)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipn_export.exporter import ParityGateError, export_bundle
from clipn_export.parity import ParityOptions, compare, parity_images, rank_corr
from clipn_runtime.bundle import load_manifest
from clipn_runtime.scoring import SCALAR_OUTPUTS, Scores, score_features


def _ref(seed: int = 0, n: int = 12, c: int = 5) -> Scores:
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, 16)).astype(np.float32)
    w = rng.standard_normal((c, 16)).astype(np.float32)
    return score_features(f, w, w + rng.standard_normal((c, 16)).astype(np.float32), 100.0)


def _outputs(ref: Scores) -> dict[str, np.ndarray]:
    return {name: np.array(getattr(ref, name)) for name in SCALAR_OUTPUTS}


def test_parity_images_are_deterministic_and_varied() -> None:
    a, b = parity_images(10, 24, seed=0), parity_images(10, 24, seed=0)
    assert a.shape == (10, 24, 24, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, parity_images(10, 24, seed=1))
    flat = a.reshape(10, -1).astype(np.float64)
    assert len({tuple(np.round(r[:50])) for r in flat}) == 10  # all different
    assert flat.std(axis=1).min() > 1.0  # none is a flat colour


def test_rank_corr() -> None:
    assert rank_corr([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_corr([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_corr([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)
    assert rank_corr([1, 1, 1], [1, 2, 3]) is None
    # Ties get average ranks (Spearman): [1, 2.5, 2.5, 4] vs [1, 2, 3, 4].
    assert rank_corr([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)


def test_identical_outputs_pass() -> None:
    ref = _ref()
    r = compare("fp32", _outputs(ref), ref, ParityOptions())
    assert (
        r.passed and r.failures == [] and max(r.max_abs.values()) == 0.0 and r.atd_rank_corr == pytest.approx(1.0)
    )


def test_fp32_gate_fails_on_a_score_difference() -> None:
    ref = _ref()
    out = _outputs(ref)
    out["energy"] = out["energy"] + 2e-4
    r = compare("fp32", out, ref, ParityOptions(atol=1e-4))
    assert not r.passed
    assert any("energy" in f for f in r.failures)
    assert r.max_abs["energy"] == pytest.approx(2e-4, rel=1e-2)


def test_fp32_gate_fails_on_a_decision_flip_away_from_the_boundary() -> None:
    ref = _ref()
    out = _outputs(ref)
    i = int(np.argmax(np.abs(ref.p_no - 0.5)))  # the image farthest from the CTW boundary
    out["ood_ctw"] = out["ood_ctw"].copy()
    out["ood_ctw"][i] = ~out["ood_ctw"][i]
    r = compare("fp32", out, ref, ParityOptions())
    assert not r.passed and r.flips["ood_ctw"] == 1 and r.borderline["ood_ctw"] == 0


def test_borderline_flip_is_reported_not_failed() -> None:
    ref = _ref()
    i = 0
    p_no = ref.p_no.copy()
    p_no[i] = 0.5 + 1e-6 if ref.ood_ctw[i] else 0.5 - 1e-6  # the reference sits on the boundary
    ref = replace(ref, p_no=p_no)
    out = _outputs(ref)
    out["ood_ctw"] = out["ood_ctw"].copy()
    out["ood_ctw"][i] = ~out["ood_ctw"][i]
    r = compare("fp32", out, ref, ParityOptions())
    assert r.passed and r.flips["ood_ctw"] == 1 and r.borderline["ood_ctw"] == 1


def test_lowp_gate_uses_rank_correlation_and_optional_max_abs() -> None:
    ref = _ref()
    out = _outputs(ref)
    out["atd"] = out["atd"] + 0.01  # a constant shift keeps the ranking
    opts = ParityOptions(min_rank_corr={"fp16": 0.99}, max_abs={"fp16": None})
    assert compare("fp16", out, ref, opts).passed
    assert not compare("fp16", out, ref, replace(opts, max_abs={"fp16": 1e-3})).passed
    out["atd"] = out["atd"][::-1].copy()  # scrambled ranking
    assert np.ptp(ref.atd) > opts.min_atd_range
    r = compare("fp16", out, ref, opts)
    assert not r.passed and any("rank correlation" in f for f in r.failures)


def test_rank_gate_is_not_applied_when_the_reference_does_not_separate_the_images() -> None:
    ref = _ref()
    flat = np.full_like(ref.atd, 0.25) + np.linspace(0, 1e-6, len(ref.atd))  # a saturated model: ATD ≈ constant
    ref = replace(ref, atd=flat)
    out = _outputs(ref)
    out["atd"] = out["atd"][::-1].copy()
    r = compare("fp16", out, ref, ParityOptions())
    assert r.atd_rank_corr == pytest.approx(-1.0)
    assert r.passed and r.notes and "not applied" in r.notes[0]
    assert r.atd_range == pytest.approx(1e-6, rel=1e-3)


def test_failed_gate_raises_after_writing_a_marked_bundle(tiny_clipn: Any, tmp_path: Path) -> None:
    # ρ ≤ 1 always, so a required 1.01 must fail: the gate can fail.
    opts = ParityOptions(images=8, min_rank_corr={"fp16": 1.01})
    with pytest.raises(ParityGateError) as info:
        export_bundle(tiny_clipn, ["cat", "dog"], tmp_path / "b", fp16=True, parity=opts, progress=False)
    table = str(info.value)
    assert "FAIL" in table and "ATD rank correlation" in table and "max |Δ| atd" in table
    manifest = load_manifest(tmp_path / "b")
    assert manifest.parity["passed"] is False
    assert manifest.parity["engines"]["fp32"]["passed"] is True
    assert manifest.parity["engines"]["fp16"]["passed"] is False


def test_parity_can_be_skipped(tiny_clipn: Any, tmp_path: Path) -> None:
    result = export_bundle(
        tiny_clipn, ["cat"], tmp_path / "b", parity=ParityOptions(enabled=False), progress=False
    )
    assert result.parity is None
    assert load_manifest(tmp_path / "b").parity == {"passed": None, "skipped": True}
