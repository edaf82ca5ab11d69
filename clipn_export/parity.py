"""The export parity gate: does the ONNX engine compute what the PyTorch model + the reference scoring do?

After export, a few generated images go through (a) the PyTorch CLIPN image tower followed by the numpy
reference :func:`clipn_runtime.scoring.score_features` on the banks that were baked in, and (b) each exported
engine in onnxruntime (CPU). Per engine and output the max |Δ| is measured, decision flips are counted and
the Spearman rank correlation of the ATD score is computed.

Every *numeric path* the runtime may run is measured (:class:`clipn_runtime.engine_choice.NumericPath`): each
engine on onnxruntime's CPU provider, and — where OpenVINO is installed — on OpenVINO's CPU plugin with the f32
hint and, on CPUs that run bf16, the bf16 hint. A path is gated by the precision its numbers have (the fp32 file
in bf16 is gated as bf16). The onnxruntime paths must pass for the export to succeed; an OpenVINO path that
fails is recorded as failed, and the runtime never picks it.

Gate (thresholds in :class:`ParityOptions`):

* fp32: every float output within ``atol`` (1e-4) and identical decisions (``pred``, ``ood_ctw``,
  ``ood_atd``). A flip where the reference itself sits within ``2·atol`` of the decision boundary (top-2 logit
  gap, ``|p_no − 0.5|``, ``|p_ood − max_c (1 − p_no_c) p_c|``) is counted as *borderline* and reported, not
  failed: the sign of a difference smaller than the tolerance is not determined by the arithmetic.
* fp16 / bf16 / int8: report max |Δ| and decision flips; gate on the ATD rank correlation (``min_rank_corr``)
  and, when set, on a max |Δ| of the ATD/CTW scores (``max_abs``). The rank correlation is gated only when the
  reference ATD scores of the test images spread over at least ``min_atd_range``: when they all but coincide
  (a saturated or untrained model) their order is float noise, so ρ is reported but says nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from clipn_runtime.engine_choice import ONNXRUNTIME, NumericPath
from clipn_runtime.scoring import Scores

log = logging.getLogger(__name__)

#: Boolean/integer outputs compared for identity rather than closeness.
DECISIONS: tuple[str, ...] = ("pred", "ood_ctw", "ood_atd")
#: The scores the low-precision ``max_abs`` threshold applies to (probabilities, unit-free).
LOWP_GATED: tuple[str, ...] = ("atd", "ctw", "p_ood", "p_no")


@dataclass(frozen=True)
class ParityOptions:
    """What the gate runs and its thresholds."""

    enabled: bool = True
    #: generated images (without --calibration; with it, ``held_out`` counts the images, not this)
    images: int = 16
    #: with --calibration: the user's images held out of it for the gate; None = a quarter of those found,
    #: 16 to 64 (:func:`clipn_export.int8_calibration.default_hold_out`)
    held_out: int | None = None
    seed: int = 0
    #: fp32: max |Δ| allowed for every float output.
    atol: float = 1e-4
    #: fp16/int8: minimum Spearman ρ of the ATD score over the images.
    min_rank_corr: Mapping[str, float] = field(default_factory=lambda: {"fp16": 0.99, "bf16": 0.99, "int8": 0.95})
    #: fp16/bf16/int8: maximum |Δ| of atd/ctw/p_ood/p_no; ``None`` = report only.
    max_abs: Mapping[str, float | None] = field(default_factory=lambda: {"fp16": None, "bf16": None, "int8": None})
    #: The rank gate needs the reference ATD scores to span at least this much (max − min).
    min_atd_range: float = 1e-3


@dataclass
class PrecisionParity:
    """The measurements for one engine."""

    precision: str
    images: int
    max_abs: dict[str, float]
    flips: dict[str, int]
    borderline: dict[str, int]
    atd_rank_corr: float | None
    #: max − min of the reference ATD over the test images (how meaningful ``atd_rank_corr`` is).
    atd_range: float
    passed: bool
    failures: list[str]
    notes: list[str] = field(default_factory=list)
    #: The numeric path measured (``precision`` is the precision its numbers have, the gate's class).
    path: str = ""

    @property
    def numeric_path(self) -> NumericPath:
        return NumericPath.parse(self.path) if self.path else NumericPath(self.precision)

    @property
    def label(self) -> str:
        """A column heading: the engine's precision, and the backend when it is not onnxruntime."""
        p = self.numeric_path
        return p.precision if p.backend == ONNXRUNTIME else f"{p.precision} ov-{p.hint}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_abs"] = {k: float(f"{v:.3g}") for k, v in self.max_abs.items()}
        if self.atd_rank_corr is not None:
            d["atd_rank_corr"] = round(self.atd_rank_corr, 6)
        d["atd_range"] = float(f"{self.atd_range:.3g}")
        return d


@dataclass
class ParityReport:
    results: list[PrecisionParity]
    options: ParityOptions
    #: Paths the gate could not run here (path key → why); the runtime treats them as unchecked.
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """The engines' own gate (onnxruntime, what every install runs); OpenVINO paths are recorded apart."""
        return all(r.passed for r in self.results if r.numeric_path.backend == ONNXRUNTIME)

    def to_dict(self) -> dict[str, Any]:
        """What goes into the manifest's ``parity``."""
        o = self.options
        return {
            "passed": self.passed,
            "images": o.images,
            "seed": o.seed,
            "reference": "PyTorch image tower (fp32) + clipn_runtime.scoring on the baked banks",
            "runner": "onnxruntime CPUExecutionProvider; OpenVINO CPU where installed (paths)",
            "thresholds": {
                "atol_fp32": o.atol,
                "min_rank_corr": dict(o.min_rank_corr),
                "max_abs": dict(o.max_abs),
                "min_atd_range": o.min_atd_range,
            },
            "engines": {
                r.numeric_path.precision: r.to_dict()
                for r in self.results
                if r.numeric_path.backend == ONNXRUNTIME
            },
            "paths": {
                **{k: {"passed": None, "skipped": why} for k, why in self.skipped.items()},
                **{r.numeric_path.key: r.to_dict() for r in self.results},
            },
        }

    def table(self) -> str:
        """A plain-text table for people (the CLI prints it)."""
        if not self.results:
            return "parity: not run"
        outputs = list(self.results[0].max_abs)
        w0 = max(len("ATD range (reference)"), *(len(f"max |Δ| {n}") for n in outputs))
        cols = [r.label for r in self.results]
        lines = [
            f"parity: {self.options.images} generated images, each engine (CPU) vs PyTorch + reference scoring",
            f"{'':<{w0}}  " + "  ".join(f"{c:>12}" for c in cols),
        ]
        for name in outputs:
            lines.append(
                f"{'max |Δ| ' + name:<{w0}}  " + "  ".join(f"{r.max_abs[name]:>12.2e}" for r in self.results)
            )
        for name in DECISIONS:
            cells = []
            for r in self.results:
                b = r.borderline.get(name, 0)
                cells.append(f"{r.flips[name]}" + (f" ({b} bdl)" if b else ""))
            lines.append(f"{'flips ' + name:<{w0}}  " + "  ".join(f"{c:>12}" for c in cells))
        lines.append(
            f"{'ATD rank corr ρ':<{w0}}  "
            + "  ".join(
                f"{'n/a' if r.atd_rank_corr is None else f'{r.atd_rank_corr:.4f}':>12}" for r in self.results
            )
        )
        lines.append(
            f"{'ATD range (reference)':<{w0}}  " + "  ".join(f"{r.atd_range:>12.2e}" for r in self.results)
        )
        lines.append(
            f"{'gate':<{w0}}  " + "  ".join(f"{'PASS' if r.passed else 'FAIL':>12}" for r in self.results)
        )
        for r in self.results:
            for f in r.failures:
                lines.append(f"  {r.label}: {f}")
            for note in r.notes:
                lines.append(f"  {r.label}: note: {note}")
        for key, why in self.skipped.items():
            lines.append(f"  {key}: not checked: {why}")
        if any(r.borderline.get(n, 0) for r in self.results for n in DECISIONS):
            lines.append("  (bdl = borderline: the reference is within 2·atol of that decision's boundary)")
        return "\n".join(lines)


def parity_images(n: int, size: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """``n`` deterministic, varied test crops (N×S×S×3 uint8): gradients, stripes, checkerboards, blobs, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        kind = i % 5
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if kind == 0:  # linear gradient between two colours at a random angle
            a = rng.uniform(0, np.pi)
            t = (np.cos(a) * xx + np.sin(a) * yy - min(0, np.cos(a))) / (abs(np.cos(a)) + np.sin(a))
        elif kind == 1:  # stripes
            t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 8) * (xx if rng.random() < 0.5 else yy))
        elif kind == 2:  # checkerboard
            k = int(rng.integers(2, 9))
            t = ((np.floor(xx * k) + np.floor(yy * k)) % 2).astype(np.float64)
        elif kind == 3:  # a soft disc
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4)
            t = 1.0 / (1.0 + np.exp(((xx - cx) ** 2 + (yy - cy) ** 2 - r * r) * 60))
        else:  # coloured noise
            t = rng.uniform(0, 1, (size, size))
        img = (1 - t)[..., None] * c0 + t[..., None] * c1
        img += rng.normal(0, 0.02, img.shape)
        out[i] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return out


def rank_corr(a: npt.ArrayLike, b: npt.ArrayLike) -> float | None:
    """Spearman ρ (ties get average ranks); ``None`` when either side is constant (ρ undefined)."""
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return np.asarray(sums[inverse] / counts[inverse], np.float64)


def _margins(ref: Scores) -> dict[str, npt.NDArray[np.float64]]:
    """How far the reference is from each decision's boundary, per image."""
    top2 = np.sort(ref.logits, axis=1)[:, -2:] if ref.logits.shape[1] > 1 else np.full((len(ref.pred), 2), np.inf)
    agree = (1.0 - ref.p_no_all) * ref.probs
    return {
        "pred": np.asarray(top2[:, 1] - top2[:, 0], np.float64),
        "ood_ctw": np.abs(np.asarray(ref.p_no, np.float64) - 0.5),
        "ood_atd": np.abs(np.asarray(ref.p_ood, np.float64) - agree.max(axis=1)),
    }


def compare(
    precision: str, outputs: Mapping[str, npt.NDArray[Any]], ref: Scores, options: ParityOptions
) -> PrecisionParity:
    """Measure one engine's ``outputs`` (name → array) against the reference and apply the gate."""
    max_abs: dict[str, float] = {}
    for name, got in outputs.items():
        if name in DECISIONS:
            continue
        want = getattr(ref, name, None)
        if want is None:  # "embedding": compared by the caller against the normalised reference feature
            continue
        max_abs[name] = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    margins = _margins(ref)
    flips, borderline = {}, {}
    for name in DECISIONS:
        diff = np.asarray(outputs[name]) != np.asarray(getattr(ref, name))
        flips[name] = int(diff.sum())
        borderline[name] = int((diff & (margins[name] <= 2 * options.atol)).sum())
    rho = rank_corr(ref.atd, outputs["atd"])
    atd_range = float(np.ptp(np.asarray(ref.atd, np.float64)))
    failures: list[str] = []
    notes: list[str] = []
    if precision == "fp32":
        for name, v in max_abs.items():
            if not v <= options.atol:
                failures.append(f"max |Δ| {name} = {v:.3g} > atol {options.atol:g}")
        for name in DECISIONS:
            hard = flips[name] - borderline[name]
            if hard:
                failures.append(f"{hard} {name} decision(s) differ away from the boundary")
    else:
        need = options.min_rank_corr.get(precision)
        if need is not None and rho is not None and atd_range >= options.min_atd_range and rho < need:
            failures.append(f"ATD rank correlation {rho:.4f} < {need:g}")
        if need is not None and (rho is None or atd_range < options.min_atd_range):
            notes.append(
                f"rank gate not applied: the reference ATD spans only {atd_range:.2g} over the test images "
                f"(< {options.min_atd_range:g}), so their order is float noise"
            )
            log.warning("parity %s: %s", precision, notes[-1])
        limit = options.max_abs.get(precision)
        if limit is not None:
            for name in LOWP_GATED:
                if name in max_abs and not max_abs[name] <= limit:
                    failures.append(f"max |Δ| {name} = {max_abs[name]:.3g} > {limit:g}")
    return PrecisionParity(
        precision=precision,
        images=len(ref.pred),
        max_abs=max_abs,
        flips=flips,
        borderline=borderline,
        atd_rank_corr=rho,
        atd_range=atd_range,
        passed=not failures,
        failures=failures,
        notes=notes,
    )


def run_parity(
    engines: Sequence[tuple[str | NumericPath, Callable[[npt.NDArray[Any]], dict[str, npt.NDArray[Any]]]]],
    engine_input: npt.NDArray[Any],
    reference: Scores,
    reference_embedding: npt.NDArray[np.float32] | None,
    options: ParityOptions,
    *,
    errors: tuple[type[Exception], ...] = (),
) -> ParityReport:
    """Run each ``(path, run)`` engine on ``engine_input`` and compare it with ``reference``; ``path`` is a
    :class:`NumericPath` or an engine precision (onnxruntime). A path other than onnxruntime whose run raises one
    of ``errors`` (its backend cannot start here) is recorded as skipped with the reason."""
    results = []
    skipped: dict[str, str] = {}
    for which, run in engines:
        path = which if isinstance(which, NumericPath) else NumericPath(which)
        precision = path.numeric
        try:
            outputs = run(engine_input)
        except errors as e:
            if path.backend == ONNXRUNTIME:
                raise
            skipped[path.key] = f"could not run at export: {e}"
            log.warning("parity: %s not checked: %s", path.describe(), e)
            continue
        r = compare(precision, outputs, reference, options)
        r.path = path.key
        if reference_embedding is not None and "embedding" in outputs:
            d = float(np.max(np.abs(outputs["embedding"].astype(np.float64) - reference_embedding)))
            r.max_abs["embedding"] = d
            if precision == "fp32" and not d <= options.atol:
                r.failures.append(f"max |Δ| embedding = {d:.3g} > atol {options.atol:g}")
                r.passed = False
        results.append(r)
        if not math.isfinite(sum(r.max_abs.values())):
            r.failures.append("non-finite outputs")
            r.passed = False
    return ParityReport(results, options, skipped)
