"""The CLIPN decision math: the one reference definition (pure numpy).

Everything that scores an image in clipn-ood — the fused ONNX head, the PyTorch reference used by the
export parity gate, ``clipn-detect`` and ``clipn-eval`` — is checked against this module.

Notation (docs/math.md; CLIPN, Wang et al., ICCV 2023, official code at commit e465074):

* ``f``: the image feature, L2-normalised; ``W`` and ``W_no``: the C×D "yes" and "no" class banks, rows
  L2-normalised; ``s``: the logit scale (``exp(logit_scale)`` of the base CLIP, 100 for the released CLIPN
  weights, which the official inference hard-codes).
* ``l = s·f·Wᵀ`` and ``l_no = s·f·W_noᵀ``: the yes / no logits per class.
* ``p = softmax(l)``: the ID class posterior.
* ``p_no_c = exp(l_no_c) / (exp(l_c) + exp(l_no_c)) = sigmoid(l_no_c − l_c)``: "this is *not* class c".
* ``ĉ = argmax_c l_c``.
* CTW (competing-to-win): ID-score ``1 − p_no_ĉ``; OOD iff ``p_no_ĉ > 0.5``.
* ATD (agent-to-decide): ID-score ``Σ_c (1 − p_no_c)·p_c``; ``p_ood = 1 − ATD``; OOD iff
  ``p_ood > max_c (1 − p_no_c)·p_c`` — the (C+1)-way argmax lands on "unknown".
* Baselines from the same pass: MSP ``= max softmax(100·cos)`` (the official code's scale), MCM
  ``= max softmax(cos / T)`` with ``T = 1`` (Ming et al., NeurIPS 2022), MaxLogit ``= max l``,
  Energy ``= logsumexp(l)`` — all on the yes bank ``W`` (CLIPN's prompt ensemble).
* MCM as its paper defines it (``mcm_single``, method ``mcm-single``): ``max softmax(cos_1 / T)`` with
  ``cos_1 = f·W_1ᵀ`` against a bank ``W_1`` of one prompt per class, ``"a photo of a <label>."``, through the
  yes (plain CLIP) text tower — comparable with published MCM numbers. Only engines whose bundle carries that
  bank emit it (:data:`BASELINE_OUTPUTS`).

All outputs are ID-scores (higher = more in-distribution) except ``p_no`` and ``p_ood``. The arithmetic is
done in at least fp32 (fp16 inputs are upcast) with log-sum-exp softmaxes and sigmoids of differences, so it
never overflows, even for huge logits.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields, replace

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]

#: The logit scale the released CLIPN weights were evaluated with (exp(logit_scale) of the base CLIP).
DEFAULT_SCALE = 100.0
#: MSP is computed at the official code's fixed scale, whatever scale the CLIPN scores use.
MSP_SCALE = 100.0
#: MCM temperature on cosine similarities, as in the MCM paper.
MCM_TEMPERATURE = 1.0
#: The MCM paper's one prompt per class (Ming et al., NeurIPS 2022, §4; its code fills "a photo of a {}.").
MCM_PROMPT = "a photo of a {}."


@dataclass(frozen=True)
class Scores:
    """Per-image CLIPN outputs for a batch of N images over C classes (every field has leading dim N)."""

    pred: npt.NDArray[np.int64]  # ĉ = argmax_c l_c
    prob: FloatArray  # p_ĉ, the class posterior of the prediction
    p_no: FloatArray  # p_no_ĉ
    ctw: FloatArray  # 1 − p_no_ĉ
    atd: FloatArray  # Σ_c (1 − p_no_c) p_c
    p_ood: FloatArray  # 1 − atd
    ood_ctw: npt.NDArray[np.bool_]  # p_no_ĉ > 0.5
    ood_atd: npt.NDArray[np.bool_]  # p_ood > max_c (1 − p_no_c) p_c
    msp: FloatArray  # max softmax(100 · cos)
    mcm: FloatArray  # max softmax(cos / T)
    max_logit: FloatArray  # max_c l_c
    energy: FloatArray  # logsumexp_c l_c
    # Per-class (N×C) tensors, kept for callers that want them (``--full-outputs``).
    logits: FloatArray
    logits_no: FloatArray
    probs: FloatArray
    p_no_all: FloatArray
    # MCM on the one-prompt bank: only when that bank was given.
    mcm_single: FloatArray | None = None

    def row(self, i: int) -> dict[str, float | int | bool]:
        """The scalar outputs of image ``i`` as plain Python values (JSON-ready)."""
        out: dict[str, float | int | bool] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and v.ndim == 1:
                out[f.name] = v[i].item()
        return out


#: The per-image scalar outputs, in the order the exported graph emits them.
SCALAR_OUTPUTS: tuple[str, ...] = (
    "pred",
    "prob",
    "p_no",
    "ctw",
    "atd",
    "p_ood",
    "ood_ctw",
    "ood_atd",
    "msp",
    "mcm",
    "max_logit",
    "energy",
)
#: Baseline outputs an engine emits when its bundle carries their bank (after the scalars, in this order).
BASELINE_OUTPUTS: tuple[str, ...] = ("mcm_single",)
#: The per-class outputs added by ``--full-outputs``.
FULL_OUTPUTS: tuple[str, ...] = ("logits", "logits_no", "probs", "p_no_all")


def _float(x: npt.ArrayLike) -> FloatArray:
    """Upcast to at least fp32 (fp16 inputs lose too much at scale 100); keep fp64 as fp64."""
    a = np.asarray(x)
    return a.astype(np.result_type(a.dtype, np.float32), copy=False)


def l2_normalize(x: npt.ArrayLike, axis: int = -1) -> FloatArray:
    """``x / ‖x‖`` along ``axis``; an all-zero row stays zero instead of becoming NaN."""
    a = _float(x)
    norm = np.sqrt(np.sum(a * a, axis=axis, keepdims=True))
    return a / np.maximum(norm, np.finfo(a.dtype).tiny)


def sigmoid(x: npt.ArrayLike) -> FloatArray:
    """Logistic function computed from ``exp(−|x|)`` so it never overflows."""
    a = _float(x)
    e = np.exp(-np.abs(a))
    return np.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(a.dtype, copy=False)


def logsumexp(x: npt.ArrayLike, axis: int = -1) -> FloatArray:
    """``log Σ exp(x)`` along ``axis``, shifted by the max so it never overflows."""
    a = _float(x)
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def softmax(x: npt.ArrayLike, axis: int = -1) -> FloatArray:
    """``softmax(x)`` along ``axis`` (max-shifted)."""
    a = _float(x)
    e = np.exp(a - np.max(a, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def class_logits(features: npt.ArrayLike, bank: npt.ArrayLike, scale: float = DEFAULT_SCALE) -> FloatArray:
    """``l = s · normalize(f) · normalize(W)ᵀ`` for features (N×D) and a class bank (C×D) → N×C."""
    return scale * (l2_normalize(features) @ l2_normalize(bank).T)


def score_logits(
    logits: npt.ArrayLike,
    logits_no: npt.ArrayLike,
    scale: float = DEFAULT_SCALE,
    *,
    msp_scale: float = MSP_SCALE,
    mcm_temperature: float = MCM_TEMPERATURE,
) -> Scores:
    """All CLIPN outputs from the yes/no logits (N×C each) computed at logit scale ``scale``.

    ``scale`` is needed to recover the cosines for MSP (at ``msp_scale``) and MCM (``cos / T``).
    """
    l_ = _float(logits)
    l_no = _float(logits_no)
    if l_.ndim != 2 or l_.shape != l_no.shape:
        raise ValueError(f"logits and logits_no must both be N×C; got {l_.shape} and {l_no.shape}")
    if l_.shape[1] < 1:
        raise ValueError("need at least one class")
    n = l_.shape[0]
    rows = np.arange(n)

    probs = softmax(l_)
    # sigmoid of the difference: exp(l_no) / (exp(l) + exp(l_no)) without ever forming exp(l).
    p_no_all = sigmoid(l_no - l_)
    p_yes_all = sigmoid(l_ - l_no)  # 1 − p_no, computed directly to avoid cancellation near p_no ≈ 1
    pred = np.argmax(l_, axis=1).astype(np.int64)
    p_no = p_no_all[rows, pred]
    agree = p_yes_all * probs  # (1 − p_no_c) p_c
    atd = np.sum(agree, axis=1)
    p_ood = 1.0 - atd

    cos = l_ / scale
    return Scores(
        pred=pred,
        prob=probs[rows, pred],
        p_no=p_no,
        ctw=p_yes_all[rows, pred],
        atd=atd,
        p_ood=p_ood,
        ood_ctw=p_no > 0.5,
        ood_atd=p_ood > np.max(agree, axis=1),
        msp=np.max(softmax(cos * msp_scale), axis=1),
        mcm=mcm(cos, mcm_temperature),
        max_logit=np.max(l_, axis=1),
        energy=logsumexp(l_),
        logits=l_,
        logits_no=l_no,
        probs=probs,
        p_no_all=p_no_all,
    )


def mcm(cosines: npt.ArrayLike, temperature: float = MCM_TEMPERATURE) -> FloatArray:
    """MCM's ID-score ``max_c softmax(cos / T)`` from the cosines (N×C) of the features to a class bank."""
    return np.max(softmax(_float(cosines) / temperature), axis=1)


def score_features(
    features: npt.ArrayLike,
    bank: npt.ArrayLike,
    bank_no: npt.ArrayLike,
    scale: float = DEFAULT_SCALE,
    *,
    msp_scale: float = MSP_SCALE,
    mcm_temperature: float = MCM_TEMPERATURE,
    bank_single: npt.ArrayLike | None = None,
) -> Scores:
    """All CLIPN outputs for image features (N×D, any norm) against yes/no class banks (C×D each), and
    ``mcm_single`` against the one-prompt bank ``bank_single`` (C×D) when given."""
    f = np.asarray(features)
    if f.ndim == 1:
        f = f[None, :]
    w, w_no = np.asarray(bank), np.asarray(bank_no)
    if w.shape != w_no.shape or w.ndim != 2:
        raise ValueError(f"bank and bank_no must both be C×D; got {w.shape} and {w_no.shape}")
    if f.shape[1] != w.shape[1]:
        raise ValueError(f"feature dim {f.shape[1]} does not match bank dim {w.shape[1]}")
    scores = score_logits(
        class_logits(f, w, scale),
        class_logits(f, w_no, scale),
        scale,
        msp_scale=msp_scale,
        mcm_temperature=mcm_temperature,
    )
    if bank_single is None:
        return scores
    w_1 = np.asarray(bank_single)
    if w_1.shape != w.shape:
        raise ValueError(f"bank_single must be C×D like bank {w.shape}; got {w_1.shape}")
    return replace(scores, mcm_single=mcm(class_logits(f, w_1, 1.0), mcm_temperature))


#: Method name → (ID-score field, OOD-decision field or None when the method has no threshold-free rule).
METHODS: dict[str, tuple[str, str | None]] = {
    "atd": ("atd", "ood_atd"),
    "ctw": ("ctw", "ood_ctw"),
    "msp": ("msp", None),
    "mcm": ("mcm", None),
    "maxlogit": ("max_logit", None),
    "energy": ("energy", None),
    "mcm-single": ("mcm_single", None),
}
#: The methods with a threshold-free decision rule (CLIPN's two).
DECISION_METHODS: tuple[str, ...] = tuple(m for m, (_, d) in METHODS.items() if d is not None)


def methods_of(outputs: Collection[str]) -> tuple[str, ...]:
    """The methods an engine with these scalar outputs can score (``mcm-single`` needs its bank's output)."""
    return tuple(m for m, (field_name, _) in METHODS.items() if field_name in outputs)


def _method(method: str) -> tuple[str, str | None]:
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}") from None


def id_score(scores: Scores, method: str) -> FloatArray:
    """The ID-score (higher = more in-distribution) of ``method``."""
    result: FloatArray | None = getattr(scores, _method(method)[0])
    if result is None:
        raise ValueError(f"method {method!r} needs the one-prompt bank (bank_single), which these scores lack")
    return result


def is_ood(scores: Scores, method: str) -> npt.NDArray[np.bool_]:
    """The threshold-free OOD decision of ``method`` (``atd`` or ``ctw``)."""
    decision = _method(method)[1]
    if decision is None:
        raise ValueError(
            f"method {method!r} has no threshold-free decision; use one of {', '.join(DECISION_METHODS)}"
        )
    result: npt.NDArray[np.bool_] = getattr(scores, decision)
    return result
