"""The official CLIPN optimiser and learning-rate schedule.

The recipe (the official code, xmed-lab/CLIPN commit e465074): AdamW lr 3e-4, betas (0.9, 0.98), eps 1e-6,
weight decay 0.2 on ≥2-D tensors only, cosine schedule without warmup (open_clip's ``cosine_lr``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from clipn_train.config import TrainConfig
from clipn_train.model import CLIPN


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total`` (open_clip's schedule)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


def param_groups(model: CLIPN, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on ≥2-D tensors only (matrices, embeddings, prompts); none on gains and biases."""
    params = model.trainable_parameters()
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def make_optimizer(model: CLIPN, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the no tower with ``cfg``'s lr, betas, eps and weight decay."""
    return torch.optim.AdamW(param_groups(model, cfg.wd), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def apply_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Set the learning rate of ``step`` (0-based) on every parameter group; returns it."""
    lr = cosine_lr(step, cfg.lr, cfg.warmup, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
