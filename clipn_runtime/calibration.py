"""Calibrated OOD decisions: a threshold per method from the user's own ID images, with a stated guarantee.

Split conformal prediction: score n held-out ID images, take each method's OOD-ness score s = −(ID-score) and
set the threshold t to the k-th smallest of them, k = ⌈(n + 1)·(1 − α)⌉ with α = 1 − target TPR. An image is OOD
when s > t. If a new ID image and the n calibration images are exchangeable (drawn the same way from the same
distribution), then P(s_new ≤ t) ≥ k / (n + 1) ≥ 1 − α, so a new ID image is flagged OOD with probability at most
α — for any score function and any n, ties included (Vovk et al., "Algorithmic Learning in a Random World",
2005; Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction", 2021, §1). It says nothing about
how many OOD images are caught: that is what ``clipn-eval`` measures.

k is computed in exact rational arithmetic: the target comes in as decimal text ("0.95") and becomes a
:class:`fractions.Fraction`, because in floating point ``(n + 1) * (1 - 0.95)`` lands one image off for some n.
With fewer than ⌈(1 − α)/α⌉ images no threshold gives the guarantee (k would exceed n): that is refused with
the number needed.

A calibration is tied to what computed the scores: the engine file (sha256), the numeric path (file × backend ×
precision hint, :mod:`clipn_runtime.engine_choice`), the class list and the class banks. It lives in the bundle
(role ``calibration``, listed in the manifest with its sha256) or in a sidecar file, which carries a checksum of
its own content. Loading refuses a tampered file, and using it refuses one measured on another engine,
precision or class list, with the reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from clipn_runtime.bundle import ROLE_CALIBRATION, Manifest, hash_entry, load_manifest, write_manifest
from clipn_runtime.errors import UserError
from clipn_runtime.fileio import atomic_write
from clipn_runtime.scoring import METHODS

log = logging.getLogger("clipn_runtime")

CALIBRATION_FORMAT = "clipn-calibration"
CALIBRATION_VERSION = 1
DEFAULT_TPR = "0.95"


class CalibrationError(UserError):
    """A calibration that cannot be made or used; the message says why and what to do."""


def parse_tpr(text: str | float | Fraction) -> Fraction:
    """The target share of ID images kept, exactly: "0.95" → 19/20 (strictly between 0 and 1)."""
    try:
        tpr = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise CalibrationError(f"--tpr {text!r} is not a number; give e.g. 0.95") from None
    if not 0 < tpr < 1:
        raise CalibrationError(f"--tpr {text} must lie strictly between 0 and 1 (e.g. 0.95)")
    return tpr


def min_images(tpr: Fraction) -> int:
    """The fewest calibration images for which ⌈(n + 1)·tpr⌉ ≤ n, i.e. n ≥ tpr / (1 − tpr)."""
    return math.ceil(tpr / (1 - tpr))


def conformal_rank(n: int, tpr: Fraction) -> int:
    """k = ⌈(n + 1)·tpr⌉, the rank (1-based, ascending OOD-ness) of the threshold; refuses when k > n."""
    k = math.ceil((n + 1) * tpr)  # Fraction: exact
    if k > n:
        raise CalibrationError(
            f"{n} calibration image{'s' if n != 1 else ''} cannot guarantee a TPR of {float(tpr):g}: it needs at "
            f"least {min_images(tpr)} ID images (more give a tighter threshold; a few hundred is typical)"
        )
    return k


def ood_score(id_score: float) -> float:
    """The OOD-ness the threshold applies to: higher = more out-of-distribution."""
    return -float(id_score)


@dataclass(frozen=True)
class Threshold:
    """One method's calibrated rule: OOD when ``ood_score > threshold``; ``rank`` = k of n."""

    threshold: float
    rank: int


def conformal_threshold(ood_scores: Sequence[float], tpr: Fraction) -> Threshold:
    """The split-conformal threshold of ``ood_scores`` (one per calibration image) for ``tpr``."""
    values = sorted(float(s) for s in ood_scores)
    if any(not math.isfinite(v) for v in values):
        raise CalibrationError("a calibration score is not finite: the engine or the image is broken")
    k = conformal_rank(len(values), tpr)
    return Threshold(values[k - 1], k)


def acceptance_floor(n: int, m: int, tpr: Fraction, p: float = 1e-3) -> float:
    """The lowest share of ``m`` new ID images that a threshold calibrated on ``n`` keeps, except with
    probability at most ``p``: ``tpr`` minus this is the sampling slack of one calibration checked on m images.

    The guarantee is on average over calibration sets. For one calibration set, the probability C that a new ID
    image is kept is Beta(k, n + 1 − k)-distributed for continuous scores (ties only raise it; Angelopoulos &
    Bates 2021, §3.2), so the number kept of m is Beta-Binomial(m, k, n + 1 − k): its left tail is summed
    exactly here (a normal approximation is too light on it at small n)."""
    if m < 1:
        raise ValueError(f"the share kept of m images needs m ≥ 1, got {m}")
    k = conformal_rank(n, tpr)
    a, b = k, n + 1 - k

    def log_beta(x: float, y: float) -> float:
        return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)

    base = log_beta(a, b)
    below = 0.0
    for j in range(m + 1):
        log_choose = math.lgamma(m + 1) - math.lgamma(j + 1) - math.lgamma(m - j + 1)
        mass = math.exp(log_choose + log_beta(j + a, m - j + b) - base)
        if below + mass > p:
            return j / m
        below += mass
    return 1.0


def fingerprint(items: Iterable[tuple[str, str]]) -> str:
    """sha256 over the sorted (name, content sha256) pairs of the calibration set."""
    h = hashlib.sha256()
    for name, digest in sorted(items):
        h.update(f"{name}\0{digest}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def classes_digest(classes: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(classes), ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class MeasuredOn:
    """What computed the calibration scores; a calibration is only used with the same."""

    engine_file: str
    engine_sha256: str
    numeric_path: str  # e.g. "int8:onnxruntime", "fp32:openvino:bf16", "plan" for a native TensorRT plan
    precision: str
    classes_sha256: str
    banks_sha256: str

    def differences(self, now: MeasuredOn) -> list[str]:
        out = []
        if now.classes_sha256 != self.classes_sha256:
            out.append("another class list")
        if now.banks_sha256 != self.banks_sha256:
            out.append("other class banks (prompts)")
        if (now.engine_file, now.engine_sha256) != (self.engine_file, self.engine_sha256):
            out.append(f"engine {self.engine_file}, this run uses {now.engine_file}")
        elif now.numeric_path != self.numeric_path:
            out.append(f"numeric path {self.numeric_path}, this run uses {now.numeric_path}")
        return out


@dataclass(frozen=True)
class Calibration:
    """Thresholds per method at one target TPR, and what they were measured on."""

    tpr: Fraction
    n: int
    thresholds: dict[str, Threshold]
    measured_on: MeasuredOn
    calibration_set: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    @property
    def rule(self) -> str:
        """The record's ``rule`` value for a calibrated decision: ``calibrated@0.95``."""
        return f"calibrated@{_decimal(self.tpr)}"

    def is_ood(self, method: str, id_score: float) -> bool:
        return ood_score(id_score) > self.thresholds[method].threshold

    def check(self, now: MeasuredOn, where: str) -> None:
        """Refuse to use this calibration for scores computed by ``now``."""
        diff = self.measured_on.differences(now)
        if diff:
            raise CalibrationError(
                f"{where} was measured on {'; '.join(diff)}: its thresholds do not hold here. Recalibrate with "
                "clipn-calibrate for this engine and class list, run with the engine it names (--device, "
                "--precision), or pass --no-calibration for ATD/CTW's threshold-free rule"
            )

    # -- JSON ----------------------------------------------------------------------------------------------------
    def body(self) -> dict[str, Any]:
        return {
            "format": CALIBRATION_FORMAT,
            "version": CALIBRATION_VERSION,
            "created": self.created or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "method": "split conformal: OOD when -(ID-score) > the k-th smallest of n calibration values, "
            "k = ceil((n + 1) * tpr)",
            "guarantee": "P(a new ID image is flagged OOD) <= 1 - tpr if it is exchangeable with the calibration "
            "images; nothing about OOD recall",
            "target_tpr": _decimal(self.tpr),
            "n": self.n,
            "thresholds": {
                m: {"ood_score": f"-{METHODS[m][0]}", "threshold": t.threshold, "rank": t.rank}
                for m, t in self.thresholds.items()
            },
            "measured_on": vars(self.measured_on),
            "calibration_set": self.calibration_set,
        }

    def to_json(self) -> str:
        body = self.body()
        body["checksum"] = _checksum(body)
        return json.dumps(body, indent=1, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Calibration:
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise CalibrationError(f"{where} is not a calibration file ({e}); run clipn-calibrate again") from None
        if not isinstance(doc, dict) or doc.get("format") != CALIBRATION_FORMAT:
            raise CalibrationError(f"{where} is not a clipn-calibrate file")
        if doc.get("version") != CALIBRATION_VERSION:
            raise CalibrationError(
                f"{where} has calibration version {doc.get('version')!r}; this clipn-ood reads version "
                f"{CALIBRATION_VERSION}: run clipn-calibrate again"
            )
        claimed = doc.pop("checksum", None)
        if claimed != _checksum(doc):
            raise CalibrationError(f"{where} was modified after clipn-calibrate wrote it (checksum mismatch)")
        try:
            thresholds = {
                str(m): Threshold(float(t["threshold"]), int(t["rank"]))
                for m, t in dict(doc["thresholds"]).items()
            }
            calib = cls(
                tpr=parse_tpr(doc["target_tpr"]),
                n=int(doc["n"]),
                thresholds=thresholds,
                measured_on=MeasuredOn(**{k: str(v) for k, v in dict(doc["measured_on"]).items()}),
                calibration_set=dict(doc.get("calibration_set") or {}),
                created=str(doc.get("created", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CalibrationError(
                f"{where} is malformed ({type(e).__name__}: {e}); run clipn-calibrate again"
            ) from None
        unknown = sorted(set(thresholds) - set(METHODS))
        if unknown or not all(math.isfinite(t.threshold) and 1 <= t.rank <= calib.n for t in thresholds.values()):
            raise CalibrationError(f"{where} is malformed (methods {unknown or 'ok'}, thresholds); recalibrate")
        return calib

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise CalibrationError(f"cannot read the calibration {path}: {e.strerror or e}") from None
        return cls.from_json(data, str(path))


def calibrate(
    id_scores: Mapping[str, Sequence[float]],
    tpr: Fraction,
    measured_on: MeasuredOn,
    calibration_set: Mapping[str, Any],
) -> Calibration:
    """A :class:`Calibration` from each method's ID-scores of the same n calibration images."""
    sizes = {len(v) for v in id_scores.values()}
    if len(sizes) != 1:
        raise ValueError(f"every method needs the same images, got sizes {sorted(sizes)}")
    thresholds = {m: conformal_threshold([ood_score(s) for s in v], tpr) for m, v in id_scores.items()}
    return Calibration(tpr, sizes.pop(), thresholds, measured_on, dict(calibration_set))


def calibrate_detector(
    detector: Any,
    paths: Sequence[str],
    tpr: Fraction,
    *,
    on_image: Callable[[], object] | None = None,
) -> tuple[Calibration, int]:
    """Score the held-out ID images ``paths`` with ``detector`` (a :class:`clipn_runtime.Detector` opened with
    ``use_calibration=False``) and calibrate every method on them; returns the calibration and how many images
    could not be read (left out, counted in its record). ``on_image`` is called once per image (a progress bar).

    Raises :class:`CalibrationError` when no image could be read or too few were for ``tpr``."""
    scores: dict[str, list[float]] = {m: [] for m in detector.methods}  # those this engine scores
    digests: list[tuple[str, str]] = []
    errors = 0
    for d in detector.iter_detect(list(paths)):
        if on_image is not None:
            on_image()
        if d.error is not None:
            errors += 1
            log.warning("%s: %s (left out)", d.path, d.error)
            continue
        for m, values in scores.items():
            values.append(float(d.scores[METHODS[m][0]]))
        digests.append((os.path.basename(str(d.path)), _sha256(str(d.path))))
    if not digests:
        raise CalibrationError("no calibration image could be read")
    if len(digests) < min_images(tpr):
        raise CalibrationError(
            f"{len(digests)} of {len(paths)} image(s) could be read; a TPR of {_decimal(tpr)} needs at least "
            f"{min_images(tpr)} held-out ID images"
        )
    record = {"images": len(digests), "errors": errors, "fingerprint": fingerprint(digests)}
    return calibrate(scores, tpr, detector.measured_on(), record), errors


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checksum(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _decimal(x: Fraction) -> str:
    """0.95 for 19/20 (exact where the fraction has a finite decimal form, else the fraction)."""
    den = x.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den != 1:
        return f"{x.numerator}/{x.denominator}"
    digits = 0
    while (x * 10**digits).denominator != 1:
        digits += 1
    text = str(x.numerator * 10**digits // x.denominator).rjust(digits + 1, "0")
    return f"{text[:-digits]}.{text[-digits:]}" if digits else text


# ---- where a calibration lives -----------------------------------------------------------------------------------


def bundle_calibration(bundle_dir: str | Path, manifest: Manifest) -> Calibration | None:
    """The calibration listed in the bundle's manifest (its sha256 was checked with the manifest), if any."""
    entry = manifest.file(ROLE_CALIBRATION)
    return None if entry is None else Calibration.load(Path(bundle_dir) / entry.path)


def write_to_bundle(bundle_dir: str | Path, calibration: Calibration) -> Path:
    """List ``calibration`` in the bundle, replacing any earlier one, so that a crash at any point leaves a
    consistent bundle: the file is content-addressed (``calibration-<sha256[:12]>.json``) and written first,
    then the manifest is replaced atomically, then the earlier file is removed."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    text = calibration.to_json()
    name = f"calibration-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    try:
        atomic_write(bundle_dir / name, text)
    except OSError as e:
        raise CalibrationError(
            f"cannot write into the bundle {bundle_dir} ({e.strerror or e}); give -o FILE for a sidecar file and "
            "pass it to clipn-detect --calibration FILE"
        ) from None
    meta = {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "target_tpr": _decimal(calibration.tpr)}
    old = [f for f in manifest.files if f.role == ROLE_CALIBRATION]
    files = [f for f in manifest.files if f.role != ROLE_CALIBRATION]
    files.append(hash_entry(bundle_dir, name, ROLE_CALIBRATION, meta=meta))
    write_manifest(bundle_dir, replace(manifest, files=files))
    for f in old:
        if f.path != name:
            (bundle_dir / f.path).unlink(missing_ok=True)
    return bundle_dir / name
