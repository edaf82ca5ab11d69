"""--device under torchrun: each rank takes the GPU of its LOCAL_RANK; one GPU index cannot apply to all ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from clipn_runtime.errors import UserError
from clipn_train import distributed as d


@pytest.fixture
def two_gpus_rank_1(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Rank 1 of ``torchrun --nproc_per_node 2`` on a machine with two GPUs (CUDA and NCCL calls recorded)."""
    calls: list[tuple[str, Any]] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(("set_device", dev)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw["backend"])))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    return calls


@pytest.mark.parametrize("spec", ["cuda", "auto"])
def test_each_rank_takes_its_local_rank_gpu(two_gpus_rank_1: list[tuple[str, Any]], spec: str) -> None:
    info = d.init_distributed(spec)
    assert info.device == torch.device("cuda", 1) and info.rank == 1 and info.world_size == 2
    assert two_gpus_rank_1 == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]


def test_a_gpu_index_is_refused_under_torchrun(two_gpus_rank_1: list[tuple[str, Any]]) -> None:
    with pytest.raises(UserError, match=r"--device cuda:0: torchrun started 2 processes.*CUDA_VISIBLE_DEVICES"):
        d.init_distributed("cuda:0")
    assert two_gpus_rank_1 == []  # refused before joining the process group


def test_a_gpu_index_picks_that_gpu_in_a_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert d.init_distributed("cuda:1").device == torch.device("cuda", 1)
    with pytest.raises(UserError, match="this machine has 2 CUDA GPU"):
        d.pick_device("cuda:2")
