"""The CLIPN scoring core against hand-computed values and its defining properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clipn_runtime import scoring
from clipn_runtime.scoring import score_features, score_logits


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_two_class_by_hand() -> None:
    # Cosines picked so every quantity is easy to write down; s = 100.
    cos = np.array([[0.30, 0.28]])
    cos_no = np.array([[0.29, 0.31]])
    s = 100.0
    out = score_logits(cos * s, cos_no * s, s)
    l0, l1 = 30.0, 28.0
    p0 = math.exp(l0) / (math.exp(l0) + math.exp(l1))
    p1 = 1 - p0
    pno0 = _sig(29.0 - 30.0)
    pno1 = _sig(31.0 - 28.0)
    atd = (1 - pno0) * p0 + (1 - pno1) * p1
    assert out.pred.tolist() == [0]
    assert out.prob[0] == pytest.approx(p0, rel=1e-6)
    assert out.p_no[0] == pytest.approx(pno0, rel=1e-6)
    assert out.ctw[0] == pytest.approx(1 - pno0, rel=1e-6)
    assert out.atd[0] == pytest.approx(atd, rel=1e-6)
    assert out.p_ood[0] == pytest.approx(1 - atd, rel=1e-5)
    assert not out.ood_ctw[0]  # p_no of the prediction is 0.269 < 0.5
    assert bool(out.ood_atd[0]) == (1 - atd > max((1 - pno0) * p0, (1 - pno1) * p1))
    assert out.msp[0] == pytest.approx(p0, rel=1e-6)  # s = 100 here, so MSP = prob
    mcm = math.exp(0.30) / (math.exp(0.30) + math.exp(0.28))
    assert out.mcm[0] == pytest.approx(mcm, rel=1e-6)
    assert out.max_logit[0] == pytest.approx(30.0)
    assert out.energy[0] == pytest.approx(math.log(math.exp(30.0) + math.exp(28.0)), rel=1e-6)
    np.testing.assert_allclose(out.p_no_all[0], [pno0, pno1], rtol=1e-6)
    np.testing.assert_allclose(out.probs[0], [p0, p1], rtol=1e-6)


def test_three_class_by_hand_ood_by_both_rules() -> None:
    # Every class says "no" more strongly than "yes": OOD for CTW and ATD.
    l_ = np.array([[2.0, 1.0, 0.0]])
    l_no = np.array([[4.0, 3.0, 3.0]])
    out = score_logits(l_, l_no, scale=10.0)
    e = np.exp([2.0, 1.0, 0.0])
    p = e / e.sum()
    pno = np.array([_sig(2.0), _sig(2.0), _sig(3.0)])
    agree = (1 - pno) * p
    assert out.pred[0] == 0
    assert out.p_no[0] == pytest.approx(pno[0], rel=1e-6)
    assert out.atd[0] == pytest.approx(agree.sum(), rel=1e-6)
    assert out.ood_ctw[0] and out.ood_atd[0]
    assert 1 - agree.sum() > agree.max()
    # MSP uses s = 100 on the cosines (logits / 10), MCM uses T = 1 on the cosines.
    cos = np.array([0.2, 0.1, 0.0])
    msp = np.exp(100 * cos) / np.exp(100 * cos).sum()
    assert out.msp[0] == pytest.approx(msp.max(), rel=1e-6)
    assert out.mcm[0] == pytest.approx((np.exp(cos) / np.exp(cos).sum()).max(), rel=1e-6)


def test_three_class_id_example() -> None:
    l_ = np.array([[5.0, 0.0, 0.0]])
    l_no = np.array([[0.0, 5.0, 5.0]])
    out = score_logits(l_, l_no, scale=100.0)
    assert not out.ood_ctw[0] and not out.ood_atd[0]
    assert out.ctw[0] == pytest.approx(_sig(5.0), rel=1e-6)


def test_score_features_normalises_and_matches_logits() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(4, 8))
    w = scoring.l2_normalize(rng.normal(size=(3, 8)))
    w_no = scoring.l2_normalize(rng.normal(size=(3, 8)))
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    a = score_features(f, w, w_no, 100.0)
    b = score_logits(100 * fn @ w.T, 100 * fn @ w_no.T, 100.0)
    np.testing.assert_allclose(a.atd, b.atd, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(a.pred, b.pred)


def test_single_class_is_sensible() -> None:
    out = score_logits(np.array([[3.0], [-1.0]]), np.array([[1.0], [2.0]]), scale=100.0)
    np.testing.assert_allclose(out.probs, 1.0)
    np.testing.assert_allclose(out.atd, out.ctw, rtol=1e-6)  # one class: ATD = 1 − p_no
    np.testing.assert_array_equal(out.ood_atd, out.ood_ctw)
    assert out.ood_ctw.tolist() == [False, True]
    assert np.all(out.msp == 1.0) and np.all(out.mcm == 1.0)


def test_extreme_logits_stay_finite() -> None:
    l_ = np.array([[1e4, -1e4, 0.0], [-1e30, 1e30, 0.0]], dtype=np.float32)
    l_no = np.array([[-1e4, 1e4, 0.0], [1e30, -1e30, 0.0]], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise"):
        out = score_logits(l_, l_no, scale=100.0)
    for name in scoring.SCALAR_OUTPUTS:
        assert np.all(np.isfinite(getattr(out, name))), name
    assert out.atd[0] == pytest.approx(1.0) and not out.ood_atd[0]
    assert out.atd[1] == pytest.approx(1.0) and out.pred[1] == 1
    # At the edge of fp32 the differences overflow to ±inf, which must still give no NaN.
    with np.errstate(over="ignore"):
        edge = score_logits(np.array([[-3e38, 3e38]], np.float32), np.array([[3e38, -3e38]], np.float32), 100.0)
    for name in ("prob", "p_no", "ctw", "atd", "p_ood", "msp", "mcm"):
        assert not np.any(np.isnan(getattr(edge, name))), name


def test_fp16_inputs_are_upcast() -> None:
    rng = np.random.default_rng(1)
    f = rng.normal(size=(5, 16)).astype(np.float16)
    w = scoring.l2_normalize(rng.normal(size=(7, 16))).astype(np.float16)
    w_no = scoring.l2_normalize(rng.normal(size=(7, 16))).astype(np.float16)
    out = score_features(f, w, w_no)
    assert out.atd.dtype == np.float32 and out.logits.dtype == np.float32
    ref = score_features(f.astype(np.float64), w.astype(np.float64), w_no.astype(np.float64))
    np.testing.assert_allclose(out.atd, ref.atd, atol=1e-5)


def test_method_registry() -> None:
    out = score_logits(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]]), 100.0)
    assert scoring.id_score(out, "maxlogit")[0] == out.max_logit[0]
    assert scoring.is_ood(out, "ctw")[0] == out.ood_ctw[0]
    with pytest.raises(ValueError, match="no threshold-free decision"):
        scoring.is_ood(out, "msp")
    with pytest.raises(ValueError, match="unknown method"):
        scoring.id_score(out, "nope")


def test_mcm_with_one_prompt_by_hand() -> None:
    """mcm_single = max softmax(cos₁ / T) against the one-prompt bank, independent of the logit scale; only
    with that bank (and so only methods_of outputs that include it offer mcm-single)."""
    f = np.array([[3.0, 4.0]])  # cosines are taken of the normalised feature (0.6, 0.8)
    w, w_no = np.eye(2), np.eye(2)[::-1]
    w_1 = np.array([[1.0, 0.0], [0.0, 2.0]])  # rows are normalised too: cos₁ = (0.6, 0.8)
    out = score_features(f, w, w_no, 37.0, bank_single=w_1)
    want = np.exp(0.8) / (np.exp(0.6) + np.exp(0.8))  # T = 1, the MCM paper's
    assert out.mcm_single is not None
    np.testing.assert_allclose(out.mcm_single, [want], rtol=1e-6)
    assert scoring.id_score(out, "mcm-single")[0] == out.mcm_single[0]
    assert out.row(0)["mcm_single"] == pytest.approx(want)
    plain = score_features(f, w, w_no, 37.0)
    assert plain.mcm_single is None and "mcm_single" not in plain.row(0)
    with pytest.raises(ValueError, match="one-prompt bank"):
        scoring.id_score(plain, "mcm-single")
    with pytest.raises(ValueError, match="bank_single must be C×D"):
        score_features(f, w, w_no, 37.0, bank_single=np.eye(3)[:, :2])
    assert "mcm-single" not in scoring.methods_of(scoring.SCALAR_OUTPUTS)
    assert scoring.methods_of(scoring.SCALAR_OUTPUTS + scoring.BASELINE_OUTPUTS) == tuple(scoring.METHODS)


def test_row_is_json_ready() -> None:
    out = score_logits(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]]), 100.0)
    row = out.row(0)
    assert set(row) == set(scoring.SCALAR_OUTPUTS)
    assert isinstance(row["pred"], int) and isinstance(row["ood_atd"], bool) and isinstance(row["atd"], float)


logit_arrays = st.integers(1, 6).flatmap(
    lambda c: st.tuples(
        arrays(np.float32, (3, c), elements=st.floats(-1e4, 1e4, width=32)),
        arrays(np.float32, (3, c), elements=st.floats(-1e4, 1e4, width=32)),
    )
)


@settings(max_examples=200, deadline=None)
@given(logit_arrays)
def test_properties(pair: tuple[np.ndarray, np.ndarray]) -> None:
    l_, l_no = pair
    out = score_logits(l_, l_no, scale=100.0)
    for name in ("prob", "p_no", "ctw", "atd", "p_ood", "msp", "mcm"):
        v = getattr(out, name)
        assert np.all(np.isfinite(v)), name
        assert np.all((v >= -1e-6) & (v <= 1 + 1e-6)), name
    assert np.all(np.isfinite(out.energy)) and np.all(np.isfinite(out.max_logit))
    agree = (1 - out.p_no_all) * out.probs
    np.testing.assert_allclose(out.atd, agree.sum(axis=1), atol=1e-6)
    np.testing.assert_allclose(out.p_ood + out.atd, 1.0, atol=1e-6)
    # decision rules agree with their definitions
    rows = np.arange(3)
    np.testing.assert_array_equal(out.pred, np.argmax(l_, axis=1))
    np.testing.assert_array_equal(out.ood_ctw, out.p_no_all[rows, out.pred] > 0.5)
    # ATD's rule, away from exact ties at fp32 resolution (there 1 − p_no and sigmoid(l − l_no) round apart)
    margin = out.p_ood - agree.max(axis=1)
    clear = np.abs(margin) > 1e-6
    np.testing.assert_array_equal(out.ood_atd[clear], margin[clear] > 0)
    assert np.all(out.energy >= out.max_logit - 1e-3)


@settings(max_examples=100, deadline=None)
@given(
    arrays(np.float64, (4, 8), elements=st.floats(-10, 10)).filter(
        lambda a: bool(np.all(np.linalg.norm(a, axis=1) > 1e-3))
    ),
    st.floats(1e-2, 1e3),
)
def test_invariant_to_feature_rescaling(f: np.ndarray, k: float) -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(size=(5, 8))
    w_no = rng.normal(size=(5, 8))
    a = score_features(f, w, w_no)
    b = score_features(f * k, w, w_no)
    np.testing.assert_allclose(a.atd, b.atd, atol=1e-9)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-9)
