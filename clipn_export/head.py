"""The fused scoring head: the torch twin of :mod:`clipn_runtime.scoring`, baked into the exported engine.

It takes raw image features (N×D, any norm, any float dtype) and the two class banks (stored as buffers, so
they become ONNX initialisers) and emits the outputs of :data:`clipn_runtime.scoring.SCALAR_OUTPUTS` (+
``mcm_single`` with the one-prompt bank, + :data:`~clipn_runtime.scoring.FULL_OUTPUTS`, + ``embedding``), in
that order. Everything here runs in fp32
whatever the encoder's precision: at scale 100 an fp16 rounding of a cosine (≈5e-4) moves a logit by 0.05.

The formulation mirrors scoring.py operation for operation — L2-normalise by ``max(‖x‖, tiny)``, logits
``s·f·Wᵀ``, cosines recovered as ``l / s`` (as the reference does), max-shifted softmax and log-sum-exp, sigmoids
of logit *differences*, ``1 − p_no`` computed as its own sigmoid — so that the two agree to float rounding
(tests/test_export_head.py checks it, including for huge logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from clipn_runtime.scoring import BASELINE_OUTPUTS, FULL_OUTPUTS, MCM_TEMPERATURE, MSP_SCALE, SCALAR_OUTPUTS

#: The extra output of ``--embeddings``: the L2-normalised image feature the scores were computed from.
EMBEDDING_OUTPUT = "embedding"

_TINY = float(np.finfo(np.float32).tiny)


def output_names(
    full_outputs: bool = False, embeddings: bool = False, single_bank: bool = False
) -> tuple[str, ...]:
    """The engine's output names, in graph order."""
    names = SCALAR_OUTPUTS
    if single_bank:
        names += BASELINE_OUTPUTS
    if full_outputs:
        names += FULL_OUTPUTS
    if embeddings:
        names += (EMBEDDING_OUTPUT,)
    return names


def _l2_normalize(x: Tensor) -> Tensor:
    return x / torch.sqrt(torch.sum(x * x, dim=-1, keepdim=True)).clamp(min=_TINY)


def _softmax(x: Tensor) -> Tensor:
    e = torch.exp(x - torch.amax(x, dim=1, keepdim=True))
    return e / torch.sum(e, dim=1, keepdim=True)


def _logsumexp(x: Tensor) -> Tensor:
    m = torch.amax(x, dim=1, keepdim=True)
    return m.squeeze(1) + torch.log(torch.sum(torch.exp(x - m), dim=1))


class ScoringHead(nn.Module):
    """CLIPN's CTW/ATD scores and the baselines from image features against frozen yes/no class banks.

    ``bank`` and ``bank_no`` are C×D, L2-normalised here (in fp32, as the reference does) and stored as
    buffers, which the exporter turns into initialisers. ``scale`` is the ``s`` of docs/math.md.
    """

    bank: Tensor
    bank_no: Tensor
    bank_single: Tensor | None

    def __init__(
        self,
        bank: npt.ArrayLike | Tensor,
        bank_no: npt.ArrayLike | Tensor,
        scale: float,
        *,
        msp_scale: float = MSP_SCALE,
        mcm_temperature: float = MCM_TEMPERATURE,
        full_outputs: bool = False,
        embeddings: bool = False,
        bank_single: npt.ArrayLike | Tensor | None = None,
    ) -> None:
        super().__init__()
        w = torch.as_tensor(np.asarray(bank, dtype=np.float32))
        w_no = torch.as_tensor(np.asarray(bank_no, dtype=np.float32))
        if w.ndim != 2 or w.shape != w_no.shape:
            raise ValueError(f"bank and bank_no must both be C×D; got {tuple(w.shape)} and {tuple(w_no.shape)}")
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        self.register_buffer("bank", _l2_normalize(w))
        self.register_buffer("bank_no", _l2_normalize(w_no))
        if bank_single is None:
            self.bank_single = None
        else:
            w_1 = torch.as_tensor(np.asarray(bank_single, dtype=np.float32))
            if w_1.shape != w.shape:
                raise ValueError(f"bank_single must be C×D like bank {tuple(w.shape)}; got {tuple(w_1.shape)}")
            self.register_buffer("bank_single", _l2_normalize(w_1))
        self.scale = float(scale)
        self.msp_scale = float(msp_scale)
        self.mcm_temperature = float(mcm_temperature)
        self.full_outputs = full_outputs
        self.embeddings = embeddings

    @property
    def num_classes(self) -> int:
        return int(self.bank.shape[0])

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    @property
    def output_names(self) -> tuple[str, ...]:
        return output_names(self.full_outputs, self.embeddings, self.bank_single is not None)

    def forward(
        self, features: Tensor, bank: Tensor | None = None, bank_no: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """Scores of ``features`` against the stored banks, or against ``bank``/``bank_no`` (C×D, any C) when
        given — the open-vocabulary engine takes them as graph inputs. Given banks are used as they are: their
        rows must be L2-normalised (the runtime's banks are). Normalising them here would cost every batch
        C×D work the stored banks never pay (benchmarks/bench_openvocab.py)."""
        if bank is not None and self.bank_single is not None:
            raise ValueError("a head with a stored one-prompt bank takes no class banks as inputs")
        w = self.bank if bank is None else bank.float()
        w_no = self.bank_no if bank_no is None else bank_no.float()
        f = _l2_normalize(features.float())
        logits = self.scale * (f @ w.T)
        logits_no = self.scale * (f @ w_no.T)
        probs = _softmax(logits)
        p_no_all = torch.sigmoid(logits_no - logits)
        p_yes_all = torch.sigmoid(logits - logits_no)  # 1 − p_no without cancellation near p_no ≈ 1
        pred = torch.argmax(logits, dim=1)
        idx = pred.unsqueeze(1)
        p_no = torch.gather(p_no_all, 1, idx).squeeze(1)
        agree = p_yes_all * probs  # (1 − p_no_c) p_c: the C "known class" entries of the (C+1)-way vote
        atd = torch.sum(agree, dim=1)
        p_ood = 1.0 - atd
        cos = logits / self.scale
        max_logit = torch.amax(logits, dim=1)
        scalars: dict[str, Tensor] = {
            "pred": pred,
            "prob": torch.gather(probs, 1, idx).squeeze(1),
            "p_no": p_no,
            "ctw": torch.gather(p_yes_all, 1, idx).squeeze(1),
            "atd": atd,
            "p_ood": p_ood,
            "ood_ctw": p_no > 0.5,
            "ood_atd": p_ood > torch.amax(agree, dim=1),
            "msp": torch.amax(_softmax(cos * self.msp_scale), dim=1),
            "mcm": self._mcm(cos),
            "max_logit": max_logit,
            "energy": _logsumexp(logits),
        }
        out = [scalars[name] for name in SCALAR_OUTPUTS]
        if self.bank_single is not None:  # MCM as its paper defines it: cosines to the one-prompt bank
            out.append(self._mcm(f @ self.bank_single.T))
        if self.full_outputs:
            out += [logits, logits_no, probs, p_no_all]
        if self.embeddings:
            out.append(f)
        return tuple(out)

    def _mcm(self, cosines: Tensor) -> Tensor:
        """MCM's ID-score from the cosines to a class bank (scoring.mcm's twin)."""
        return torch.amax(_softmax(cosines / self.mcm_temperature), dim=1)

    def score(self, features: Tensor) -> dict[str, Tensor]:
        """``forward`` as a name → tensor mapping (for tests and callers that prefer names)."""
        return dict(zip(self.output_names, self.forward(features), strict=True))


class Uint8Preprocess(nn.Module):
    """``--uint8-input``: raw NHWC uint8 crops → normalised NCHW float32, inside the graph.

    ``(x / 255 − mean) / std`` folded into one multiply-add per channel (``x·a + b``), done in fp32.
    """

    mul: Tensor
    add: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        m = torch.tensor(mean, dtype=torch.float64).reshape(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float64).reshape(1, 3, 1, 1)
        self.register_buffer("mul", (1.0 / (255.0 * s)).float())
        self.register_buffer("add", (-m / s).float())

    def forward(self, image: Tensor) -> Tensor:
        x = image.permute(0, 3, 1, 2).float()
        return x * self.mul + self.add


def normalize_uint8(
    images: npt.NDArray[np.uint8], mean: Sequence[float], std: Sequence[float]
) -> npt.NDArray[np.float32]:
    """The float input equivalent to ``images`` (N×H×W×3 uint8): NCHW, ``(x/255 − mean)/std``, float32.

    Computed with the same folded constants as :class:`Uint8Preprocess`, so both paths see identical pixels.
    """
    pre = Uint8Preprocess(mean, std)
    with torch.inference_mode():
        return pre(torch.from_numpy(np.ascontiguousarray(images))).numpy()
