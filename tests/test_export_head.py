"""The torch scoring head is a twin of clipn_runtime.scoring (the one reference of the CLIPN math)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipn_export.head import EMBEDDING_OUTPUT, ScoringHead, Uint8Preprocess, normalize_uint8, output_names
from clipn_runtime.scoring import BASELINE_OUTPUTS, FULL_OUTPUTS, SCALAR_OUTPUTS, l2_normalize, score_features

DECISIONS = ("pred", "ood_ctw", "ood_atd")


def _case(n: int, c: int, d: int, seed: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = (rng.standard_normal((n, d)) * spread).astype(np.float32)
    w = rng.standard_normal((c, d)).astype(np.float32)
    w_no = (w + 0.7 * rng.standard_normal((c, d))).astype(np.float32)
    return f, w, w_no


@pytest.mark.parametrize(
    ("n", "c", "d", "scale", "seed"),
    [
        (5, 3, 8, 100.0, 0),
        (7, 1, 16, 100.0, 1),
        (4, 50, 32, 14.285714, 2),
        (3, 10, 8, 1.0, 3),
        (6, 200, 64, 100.0, 4),
    ],
)
def test_head_matches_reference_scoring(n: int, c: int, d: int, scale: float, seed: int) -> None:
    f, w, w_no = _case(n, c, d, seed)
    head = ScoringHead(w, w_no, scale, full_outputs=True, embeddings=True)
    with torch.no_grad():
        got = head.score(torch.from_numpy(f))
    ref = score_features(f, w, w_no, scale)
    assert tuple(got) == SCALAR_OUTPUTS + FULL_OUTPUTS + (EMBEDDING_OUTPUT,)
    for name in SCALAR_OUTPUTS + FULL_OUTPUTS:
        want = getattr(ref, name)
        g = got[name].numpy()
        assert g.shape == want.shape, name
        if name in DECISIONS:
            np.testing.assert_array_equal(g, want, err_msg=name)
        else:
            # Logit-valued outputs scale with s; everything else is a probability.
            tol = 1e-6 * max(1.0, scale)
            np.testing.assert_allclose(g, want, rtol=0, atol=tol, err_msg=name)
    # Unit vectors normalised twice in fp32, summing the squares in other orders (numpy pairwise, torch
    # vectorised): the norms may differ by ~sqrt(D) ulps (D ≤ 64), so 8 ulps of 1 (measured ≤ 1 ulp).
    np.testing.assert_allclose(got[EMBEDDING_OUTPUT].numpy(), l2_normalize(f), rtol=0, atol=1e-6)


def test_head_with_the_one_prompt_bank_matches_the_reference() -> None:
    f, w, w_no = _case(6, 5, 16, 7)
    w_1 = np.random.default_rng(8).normal(size=w.shape)
    head = ScoringHead(w, w_no, 100.0, full_outputs=True, bank_single=w_1)
    with torch.no_grad():
        got = head.score(torch.from_numpy(f))
    assert tuple(got) == SCALAR_OUTPUTS + BASELINE_OUTPUTS + FULL_OUTPUTS == head.output_names
    ref = score_features(f, w, w_no, 100.0, bank_single=w_1)
    assert ref.mcm_single is not None
    np.testing.assert_allclose(got["mcm_single"].numpy(), ref.mcm_single, rtol=0, atol=1e-6)  # a probability
    np.testing.assert_allclose(got["mcm"].numpy(), ref.mcm, rtol=0, atol=1e-6)  # the other banks untouched
    with pytest.raises(ValueError, match="bank_single must be C×D"):
        ScoringHead(w, w_no, 100.0, bank_single=w_1[:3])
    with pytest.raises(ValueError, match="no class banks as inputs"), torch.no_grad():
        head(torch.from_numpy(f), torch.from_numpy(w).float(), torch.from_numpy(w_no).float())


def test_head_dtypes_and_default_outputs() -> None:
    f, w, w_no = _case(4, 3, 8, 0)
    head = ScoringHead(w, w_no, 100.0)
    with torch.no_grad():
        out = head.score(torch.from_numpy(f))
    assert tuple(out) == SCALAR_OUTPUTS == head.output_names
    assert out["pred"].dtype == torch.int64
    assert out["ood_ctw"].dtype == out["ood_atd"].dtype == torch.bool
    assert all(out[k].dtype == torch.float32 for k in SCALAR_OUTPUTS if k not in DECISIONS)
    assert output_names(True, True)[-1] == EMBEDDING_OUTPUT


def test_head_is_stable_for_huge_logits() -> None:
    # Features aligned with one class at scale 1e4: naive exp() would overflow in fp32; the twin must not.
    w = np.eye(4, dtype=np.float32)
    w_no = np.roll(np.eye(4, dtype=np.float32), 1, axis=1)
    f = np.array([[1, 0, 0, 0], [0.0, 1, 1e-3, 0], [-1, 0, 0, 0]], dtype=np.float32)
    head = ScoringHead(w, w_no, 1e4, full_outputs=True)
    with torch.no_grad():
        got = head.score(torch.from_numpy(f))
    ref = score_features(f, w, w_no, 1e4)
    for name in SCALAR_OUTPUTS + FULL_OUTPUTS:
        g = got[name].numpy()
        assert np.all(np.isfinite(g.astype(np.float64))), name
        np.testing.assert_allclose(g.astype(np.float64), getattr(ref, name), atol=1e-2, rtol=1e-6, err_msg=name)


def test_head_accepts_fp16_features_and_computes_in_fp32() -> None:
    f, w, w_no = _case(5, 6, 16, 7)
    head = ScoringHead(w, w_no, 100.0)
    with torch.no_grad():
        got = head.score(torch.from_numpy(f).half())
    ref = score_features(f.astype(np.float16), w, w_no, 100.0)
    assert got["atd"].dtype == torch.float32
    np.testing.assert_allclose(got["atd"].numpy(), ref.atd, atol=1e-6)


def test_head_rejects_bad_banks() -> None:
    with pytest.raises(ValueError, match="C×D"):
        ScoringHead(np.zeros((3, 4)), np.zeros((3, 5)), 100.0)
    with pytest.raises(ValueError, match="scale"):
        ScoringHead(np.ones((3, 4)), np.ones((3, 4)), 0.0)


def test_uint8_preprocess_equals_float_normalisation() -> None:
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    with torch.no_grad():
        got = Uint8Preprocess(mean, std)(torch.from_numpy(img)).numpy()
    want = (img.transpose(0, 3, 1, 2) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    assert got.shape == (2, 3, 5, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_array_equal(normalize_uint8(img, mean, std), got)
