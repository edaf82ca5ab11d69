"""Metrics tables and the report folder: metrics.csv / metrics.json / metrics.md, ROC curves, histograms."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from clipn_eval.metrics import ood_metrics, roc_points
from clipn_runtime.fileio import atomic_write

AVERAGE = "average"
#: How methods are named for people (the keys are clipn_runtime.scoring.METHODS).
METHOD_TITLES = {
    "atd": "CLIPN-ATD",
    "ctw": "CLIPN-CTW",
    "msp": "MSP",
    "mcm": "MCM",
    "maxlogit": "MaxLogit",
    "energy": "Energy",
    "mcm-single": "MCM (one prompt)",
}

ScoreTable = Mapping[str, npt.ArrayLike]  # method → ID-scores of one image set


@dataclass(frozen=True)
class MetricRow:
    """One (OOD set, method) result; ``ood_set == "average"`` rows average the sets' metrics."""

    ood_set: str
    method: str
    auroc: float
    fpr95_interp: float
    fpr95_nearest: float
    n_id: int
    n_ood: int
    #: At the calibrated threshold (clipn-calibrate), when there is one: the share of this evaluation's ID images
    #: kept (the achieved TPR; the calibration targets it) and the share of OOD images kept (the FPR).
    calibrated_tpr: float | None = None
    calibrated_fpr: float | None = None


def _kept(id_scores: npt.ArrayLike, threshold: float) -> float:
    """The share of images a calibrated threshold keeps as ID: OOD-ness −s not above it."""
    s = np.asarray(id_scores, np.float64)
    return float(np.mean(-s <= threshold))


def metric_rows(
    id_scores: ScoreTable,
    ood_scores: Mapping[str, ScoreTable],
    methods: Sequence[str],
    thresholds: Mapping[str, float] | None = None,
) -> list[MetricRow]:
    """AUROC and both FPR95s for every OOD set × method, then the per-method average over the sets; with
    ``thresholds`` (method → calibrated OOD-ness threshold) also the achieved TPR and the FPR there."""
    rows: list[MetricRow] = []
    thresholds = thresholds or {}
    for name, table in ood_scores.items():
        for m in methods:
            r = ood_metrics(id_scores[m], table[m])
            t = thresholds.get(m)
            decision = (_kept(id_scores[m], t), _kept(table[m], t)) if t is not None else (None, None)
            rows.append(MetricRow(name, m, r.auroc, r.fpr95_interp, r.fpr95_nearest, r.n_id, r.n_ood, *decision))
    if len(ood_scores) > 1:
        for m in methods:
            mine = [r for r in rows if r.method == m]
            fprs = [r.calibrated_fpr for r in mine if r.calibrated_fpr is not None]
            rows.append(
                MetricRow(
                    AVERAGE,
                    m,
                    float(np.mean([r.auroc for r in mine])),
                    float(np.mean([r.fpr95_interp for r in mine])),
                    float(np.mean([r.fpr95_nearest for r in mine])),
                    mine[0].n_id,
                    int(sum(r.n_ood for r in mine)),
                    mine[0].calibrated_tpr,
                    float(np.mean(fprs)) if fprs else None,
                )
            )
    return rows


def best_method(rows: Sequence[MetricRow]) -> tuple[str, str]:
    """The method to deploy on this data, and why: the lowest FPR at the calibrated threshold (averaged over the
    OOD sets) when calibrated, else the highest AUROC; ties go to the higher AUROC."""
    sets = list(dict.fromkeys(r.ood_set for r in rows))
    final = [r for r in rows if r.ood_set == (AVERAGE if AVERAGE in sets else sets[0])]
    if all(r.calibrated_fpr is not None for r in final):
        best = min(final, key=lambda r: (r.calibrated_fpr, -r.auroc))
        tpr = f"{100 * best.calibrated_tpr:.1f} % of ID kept" if best.calibrated_tpr is not None else ""
        return (
            best.method,
            f"lowest FPR at the calibrated threshold ({100 * (best.calibrated_fpr or 0):.2f} %; {tpr})",
        )
    best = max(final, key=lambda r: r.auroc)
    return best.method, f"highest AUROC ({100 * best.auroc:.2f} %); calibrate the bundle to compare decisions"


def markdown_table(rows: Sequence[MetricRow], id_accuracy: float | None = None) -> str:
    """Methods × OOD sets: ``AUROC / FPR95`` in percent (FPR95 = the official CLIPN interpolated one)."""
    sets = list(dict.fromkeys(r.ood_set for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    by = {(r.ood_set, r.method): r for r in rows}
    calibrated = all(r.calibrated_fpr is not None for r in rows)
    head = "| method | " + " | ".join(f"{s} AUROC↑ / FPR95↓" for s in sets) + " |"
    if calibrated:
        head += " ID kept (TPR) | " + " | ".join(f"{s} FPR↓ at threshold" for s in sets) + " |"
    lines = [head, "|---|" + "---|" * (len(sets) * (2 if calibrated else 1) + (1 if calibrated else 0))]
    best, why = best_method(rows)
    for m in methods:
        cells = [f"{100 * by[s, m].auroc:.2f} / {100 * by[s, m].fpr95_interp:.2f}" for s in sets]
        if calibrated:
            cells.append(f"{100 * (by[sets[0], m].calibrated_tpr or 0):.2f}")
            cells += [f"{100 * (by[s, m].calibrated_fpr or 0):.2f}" for s in sets]
        title = METHOD_TITLES.get(m, m) + (" **(best)**" if m == best else "")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    notes = [
        "",
        "AUROC and FPR at 95 % TPR in percent, ID = positive. FPR95 here is the official CLIPN read-out "
        "(ROC linearly interpolated at TPR 0.95); metrics.csv also has the nearest-point one (MCM / Hendrycks).",
    ]
    if calibrated:
        notes.append(
            "At the threshold: the decision clipn-detect makes with the bundle's calibration (clipn-calibrate); "
            "ID kept is the achieved TPR on these ID images (the calibration targets it on average), FPR the "
            "share of OOD images kept as ID."
        )
    notes.append(f"Best on this data: {METHOD_TITLES.get(best, best)} — {why}.")
    if id_accuracy is not None:
        notes.append(f"ID top-1 accuracy: {100 * id_accuracy:.2f} %")
    return "\n".join(lines + notes) + "\n"


def _plot_set(
    out_dir: Path, name: str, id_scores: ScoreTable, ood: ScoreTable, methods: Sequence[str]
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # headless: reports are written on servers and CI
    import matplotlib.pyplot as plt

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    fig, ax = plt.subplots(figsize=(5, 5))
    for m in methods:
        fpr, tpr = roc_points(id_scores[m], ood[m])
        ax.plot(fpr, tpr, label=METHOD_TITLES.get(m, m))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    ax.axhline(0.95, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="FPR (OOD accepted as ID)", ylabel="TPR (ID kept)", title=f"ROC: ID vs {name}")
    ax.legend(loc="lower right", fontsize=8)
    roc = out_dir / f"roc_{safe}.png"
    fig.savefig(roc, dpi=110, bbox_inches="tight")
    plt.close(fig)

    cols = min(3, len(methods))
    rows_n = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False)
    for ax, m in zip(axes.ravel(), methods, strict=False):
        a, b = np.asarray(id_scores[m], float), np.asarray(ood[m], float)
        bins = np.histogram_bin_edges(np.concatenate([a, b]), bins=40)
        ax.hist(a, bins=bins, alpha=0.6, label="ID", density=True)
        ax.hist(b, bins=bins, alpha=0.6, label=name, density=True)
        ax.set_title(METHOD_TITLES.get(m, m), fontsize=9)
    for ax in axes.ravel()[len(methods) :]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"ID-score histograms: ID vs {name}")
    hist = out_dir / f"hist_{safe}.png"
    fig.savefig(hist, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [roc, hist]


def write_report(
    out_dir: str | Path,
    rows: Sequence[MetricRow],
    id_scores: ScoreTable,
    ood_scores: Mapping[str, ScoreTable],
    methods: Sequence[str],
    *,
    id_accuracy: float | None = None,
    meta: Mapping[str, Any] | None = None,
    plots: bool = True,
) -> list[Path]:
    """Write metrics.csv, metrics.json, metrics.md and (with ``plots``) ROC/histogram PNGs; return the paths.

    Each file is replaced atomically and is strict JSON / valid UTF-8, or not written at all: a rerun never
    finds a half-written report. Strings must be valid UTF-8 (pass file names through
    :func:`clipn_runtime.inputs.printable`); one that is not raises UnicodeEncodeError before anything changes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*MetricRow.__dataclass_fields__])
    for r in rows:
        w.writerow([*asdict(r).values()])
    best, why = best_method(rows)
    doc = {
        "rows": [asdict(r) for r in rows],
        "best": {"method": best, "why": why},
        "id_accuracy": id_accuracy,
        "meta": dict(meta or {}),
    }
    texts = {
        "metrics.csv": buf.getvalue(),
        "metrics.json": json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        "metrics.md": markdown_table(rows, id_accuracy),
    }
    encoded = {name: text.encode("utf-8") for name, text in texts.items()}  # every check before any write
    written = [atomic_write(out / name, data) for name, data in encoded.items()]
    if plots:
        for name, table in ood_scores.items():
            written += _plot_set(out, name, id_scores, table, methods)
    return written
