"""OOD metrics against hand-computed ROC cases and both FPR95 definitions."""

from __future__ import annotations

import numpy as np
import pytest

from clipn_eval.metrics import auroc, fpr95_interp, fpr95_nearest, ood_metrics


def test_perfect_and_inverted_separation() -> None:
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auroc([0.1, 0.2], [0.9, 0.8]) == 0.0
    assert fpr95_interp([0.9, 0.8], [0.1, 0.2]) == 0.0
    assert fpr95_nearest([0.9, 0.8], [0.1, 0.2]) == 0.0
    assert fpr95_interp([0.1, 0.2], [0.9, 0.8]) == 1.0


def test_hand_computed_auroc() -> None:
    # Pairs (id, ood) ranked correctly: 3 of 4 → 0.75; a tie counts 1/2.
    assert auroc([3.0, 1.0], [2.0, 0.0]) == pytest.approx(0.75)
    assert auroc([1.0], [1.0]) == pytest.approx(0.5)


def test_fpr95_definitions_by_hand() -> None:
    # 25 ID scores 1..25 (TPR steps of .04, so no ROC point sits at exactly .95) and 4 OOD scores.
    # Sweeping the threshold down: ID 25..3 → (fpr 0, tpr .92); OOD 2.5 → (.25, .92); ID 2 → (.25, .96);
    # OOD 1.5 → (.50, .96); ID 1 → (.50, 1.0); OOD −1, −2 → (.75, 1.0), (1, 1).
    s_id = np.arange(1, 26, dtype=float)
    s_ood = np.array([2.5, 1.5, -1.0, -2.0])
    # official: interpolate between (.25, .92) and (.25, .96) → .25
    assert fpr95_interp(s_id, s_ood) == pytest.approx(0.25)
    # nearest: TPR .96 is nearest (|.01| < |.03|); of its two points the lower threshold → .50
    assert fpr95_nearest(s_id, s_ood) == pytest.approx(0.50)


def test_fpr95_on_a_tied_diagonal() -> None:
    # ID 1..10 and two OOD scores tied with the lowest ID score: the ROC goes (0, .9) → (1, 1) in one
    # diagonal step. Interpolation reads .5 at TPR .95; nearest picks the point at TPR .9 (in floating point
    # |.9 − .95| < |1 − .95|, as in Hendrycks et al.'s code) → FPR 0.
    s_id = np.arange(1, 11, dtype=float)
    s_ood = np.array([1.0, 1.0])
    assert fpr95_interp(s_id, s_ood) == pytest.approx(0.5)
    assert fpr95_nearest(s_id, s_ood) == pytest.approx(0.0)


def test_ood_metrics_record_and_errors() -> None:
    rng = np.random.default_rng(0)
    m = ood_metrics(rng.normal(1, 1, 500), rng.normal(0, 1, 400))
    assert 0.7 < m.auroc < 0.85 and m.n_id == 500 and m.n_ood == 400
    assert 0 < m.fpr95_nearest <= 1 and 0 < m.fpr95_interp <= 1
    with pytest.raises(ValueError, match="need ID and OOD"):
        ood_metrics([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        ood_metrics([np.nan], [1.0])
