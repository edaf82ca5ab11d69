"""OOD detection metrics over ID-scores (higher = more in-distribution; ID is the positive class).

Curves come from scikit-learn's ``roc_curve``; only the read-out at TPR = 95 % is ours, in the two
definitions found in the literature, both reported and named:

* ``fpr95_interp`` — the official CLIPN evaluation (``zero_shot_infer.py``, commit e465074): scikit-learn's
  default ROC curve, linearly interpolated at TPR = 0.95 with ``scipy.interpolate.interp1d``.
* ``fpr95_nearest`` — Hendrycks et al.'s ``fpr_and_fdr_at_recall``, used by MCM (Ming et al., NeurIPS 2022)
  and many OOD papers: over the ROC points up to the first that reaches TPR = 1, the FPR of the point whose TPR
  is nearest to 0.95; ties go to the point with the lowest threshold (the higher TPR, then the higher FPR).

They differ most when few scores sit near the 95 % threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

TPR_LEVEL = 0.95


@dataclass(frozen=True)
class OODMetrics:
    auroc: float
    fpr95_interp: float
    fpr95_nearest: float
    n_id: int
    n_ood: int


def _labelled(id_scores: npt.ArrayLike, ood_scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s_id = np.asarray(id_scores, dtype=np.float64).ravel()
    s_ood = np.asarray(ood_scores, dtype=np.float64).ravel()
    if s_id.size == 0 or s_ood.size == 0:
        raise ValueError(f"need ID and OOD scores; got {s_id.size} ID and {s_ood.size} OOD")
    if not (np.all(np.isfinite(s_id)) and np.all(np.isfinite(s_ood))):
        raise ValueError("scores must be finite")
    return np.concatenate([np.ones_like(s_id), np.zeros_like(s_ood)]), np.concatenate([s_id, s_ood])


def auroc(id_scores: npt.ArrayLike, ood_scores: npt.ArrayLike) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(*_labelled(id_scores, ood_scores)))


def fpr95_interp(id_scores: npt.ArrayLike, ood_scores: npt.ArrayLike, level: float = TPR_LEVEL) -> float:
    """FPR at TPR = ``level`` on the linearly interpolated ROC curve (official CLIPN)."""
    from scipy.interpolate import interp1d
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(*_labelled(id_scores, ood_scores))
    return float(interp1d(tpr, fpr)(level))


def fpr95_nearest(id_scores: npt.ArrayLike, ood_scores: npt.ArrayLike, level: float = TPR_LEVEL) -> float:
    """FPR of the ROC point with TPR nearest to ``level`` (Hendrycks et al. / MCM)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(*_labelled(id_scores, ood_scores), drop_intermediate=False)
    first_full = int(np.argmax(tpr >= 1.0))  # roc_curve always ends at TPR = 1
    fpr, tpr = fpr[1 : first_full + 1], tpr[1 : first_full + 1]  # without the (0, 0) point at threshold +inf
    dist = np.abs(tpr - level)
    return float(fpr[np.flatnonzero(dist == dist.min())[-1]])  # the lowest threshold among the nearest


def ood_metrics(id_scores: npt.ArrayLike, ood_scores: npt.ArrayLike) -> OODMetrics:
    s_id, s_ood = np.asarray(id_scores), np.asarray(ood_scores)
    return OODMetrics(
        auroc=auroc(s_id, s_ood),
        fpr95_interp=fpr95_interp(s_id, s_ood),
        fpr95_nearest=fpr95_nearest(s_id, s_ood),
        n_id=int(s_id.size),
        n_ood=int(s_ood.size),
    )


def roc_points(id_scores: npt.ArrayLike, ood_scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the ROC curve, for plotting."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(*_labelled(id_scores, ood_scores))
    return fpr, tpr
