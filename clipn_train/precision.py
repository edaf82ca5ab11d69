"""Mixed precision: which autocast a ``--precision`` value means on a given device."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from clipn_runtime.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("amp", "amp_bf16", "fp32")


def autocast_for(
    precision: str, device: torch.device
) -> tuple[Callable[[], contextlib.AbstractContextManager[Any]], bool]:
    """(autocast context factory, whether a GradScaler is needed).

    ``amp`` is fp16 autocast with loss scaling on CUDA; CPUs gain little from fp16, so there ``amp`` runs
    bf16 autocast (said once in the log). ``amp_bf16`` is bf16 autocast anywhere, ``fp32`` none.
    """
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext, False
    dtype = torch.bfloat16
    if precision == "amp" and device.type == "cuda":
        dtype = torch.float16
    elif precision == "amp":
        log.info("--precision amp on %s: using bf16 autocast (fp16 autocast needs a CUDA GPU)", device.type)

    def factory() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(device_type=device.type, dtype=dtype)

    return factory, dtype == torch.float16
