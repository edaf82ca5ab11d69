"""ITBO/TSO losses: closed forms, hand-computed values, stability, and the distributed gather (2 gloo ranks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipn_train.losses import PARTS, TSO_EPS, clipn_loss, distributed_clipn_loss, p_no

F32_EPS = torch.finfo(torch.float32).eps


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_step0_identity_no_tower_equals_yes_tower() -> None:
    f, g = _unit(6, 8, 0), _unit(6, 8, 1)
    parts = clipn_loss(f, g, g.clone(), 100.0)
    assert torch.allclose(p_no(f, g, g, 100.0), torch.full((6, 6), 0.5))
    ln2 = math.log(2)
    assert parts["itbo_yes"].item() == pytest.approx(ln2, abs=1e-6)
    assert parts["itbo_no"].item() == pytest.approx(ln2, abs=1e-6)
    assert parts["tso"].item() == pytest.approx(2 - math.sqrt(TSO_EPS), abs=1e-4)
    assert parts["total"].item() == pytest.approx(0.5 * (ln2 + ln2 + (2 - math.sqrt(1e-4))), abs=1e-4)


def _official_by_hand(
    f: list[list[float]], g: list[list[float]], g_no: list[list[float]], s: float
) -> dict[str, float]:
    """The official softmax-then-log formulation, written out with plain floats."""
    n = len(f)

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    yes = no = tso = 0.0
    for i in range(n):
        for j in range(n):
            ly, ln = s * dot(f[i], g[j]), s * dot(f[i], g_no[j])
            softmax_yes = math.exp(ly) / (math.exp(ly) + math.exp(ln))
            softmax_no = math.exp(ln) / (math.exp(ly) + math.exp(ln))
            if i == j:
                yes += -math.log(softmax_yes)
            else:
                no += -math.log(softmax_no)
        tso += 2 - math.sqrt(2 - 2 * dot(g[i], g_no[i]) + 1e-4)
    out = {"itbo_yes": yes / n, "itbo_no": no / (n * n - n), "tso": tso / n}
    out["total"] = 0.5 * (out["itbo_yes"] + out["itbo_no"] + out["tso"])
    return out


@pytest.mark.parametrize("scale", [1.0, 14.3, 40.0])
def test_losses_match_hand_computed_values(scale: float) -> None:
    f, g, g_no = _unit(4, 3, 2), _unit(4, 3, 3), _unit(4, 3, 4)
    expected = _official_by_hand(f.double().tolist(), g.double().tolist(), g_no.double().tolist(), scale)
    got = clipn_loss(f.double(), g.double(), g_no.double(), scale)
    # clipn_loss computes in fp32 (exact on these fp32-born inputs): each logit s·(c_no - c) carries up to ~4 eps·s
    # of rounding from its length-3 dots, and log-sigmoid has slope ≤ 1 (measured ≤ 1.2e-7 relative).
    for k in PARTS:
        assert got[k].item() == pytest.approx(expected[k], rel=1e-6, abs=4 * scale * F32_EPS), k


def test_loss_and_gradient_stay_finite_at_huge_gaps() -> None:
    # f matches g exactly and is opposite to g_no: gap s·2 = 200 nats, where softmax-then-log gives inf in fp32.
    f = _unit(3, 4, 5)
    g = f.clone().requires_grad_(True)
    g_no = (-f).clone().requires_grad_(True)
    # Off-diagonal pairs that are perfectly "yes": log p_no = -200 + tiny, so the no term ≈ 200·(share).
    parts = clipn_loss(f, g, g_no, 100.0)
    parts["total"].backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
    assert all(torch.isfinite(parts[k]) for k in PARTS)
    assert g.grad is not None and g_no.grad is not None
    assert torch.isfinite(g.grad).all() and torch.isfinite(g_no.grad).all()
    official = torch.log(torch.softmax(torch.tensor([[0.0, 200.0]]), dim=-1))  # what the official code takes
    assert torch.isinf(official).any()
    # The diagonal term: -log(1 - sigmoid(-200)) ≈ 0; exact closed form of the no term from the cosines.
    cos = f @ f.T
    gap = 100.0 * (-cos - cos)
    off = ~torch.eye(3, dtype=torch.bool)
    assert parts["itbo_no"].item() == pytest.approx((-F.logsigmoid(gap[off])).mean().item(), rel=1e-6)
    assert parts["itbo_yes"].item() < 1e-30


def test_fp16_inputs_are_computed_in_fp32() -> None:
    f, g, g_no = _unit(5, 8, 6), _unit(5, 8, 7), _unit(5, 8, 8)
    a = clipn_loss(f.half(), g.half(), g_no.half(), 100.0)
    assert a["total"].dtype == torch.float32
    b = clipn_loss(f.half().float(), g.half().float(), g_no.half().float(), 100.0)
    assert torch.equal(a["total"], b["total"])


def test_bad_shapes_and_single_pair_are_errors() -> None:
    f = _unit(3, 4, 0)
    with pytest.raises(ValueError, match="must all be"):
        clipn_loss(f, f[:2], f, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        clipn_loss(f[:1], f[:1], f[:1], 1.0)


def test_without_process_group_distributed_equals_plain() -> None:
    f, g, g_no = _unit(4, 8, 1), _unit(4, 8, 2), _unit(4, 8, 3)
    a = distributed_clipn_loss(f, g, g_no, 30.0, local_loss=True)
    b = clipn_loss(f, g, g_no, 30.0)
    assert all(torch.equal(a[k], b[k]) for k in PARTS)
