"""The extra CI passes (.ci/run) really run where they say: the capped kernel ISA, or one thread.

Each test checks one variable and skips when it is unset, so in the main pass they skip; in the pass that sets
the variable they fail if the library ignored it (and the numerics tests would silently re-run the default path).
oneDNN and MKL report their choice only through their verbose logs, printed once per process: a subprocess
with the same environment runs a convolution (oneDNN) and a matrix product (MKL) and the logs are read back.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

HAVE_MKL = torch.backends.mkl.is_available()  # type: ignore[no-untyped-call]  # torch leaves it unannotated

_PROBE = """
import torch
torch.nn.functional.conv2d(torch.randn(1, 3, 16, 16), torch.randn(8, 3, 4, 4), stride=4)
torch.randn(64, 64) @ torch.randn(64, 64)
"""


@pytest.fixture(scope="module")
def verbose_log() -> list[str]:
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1"}
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def _first(log: list[str], prefix: str, part: str) -> str:
    lines = [line for line in log if line.startswith(prefix) and part in line]
    assert lines, f"no {prefix} line with {part!r}: {log[:5]}"
    return lines[0]


def _onednn_runs(log: list[str]) -> list[str]:
    """One line per oneDNN primitive that ran; it names the implementation (e.g. 'jit:avx2', 'jit:avx512_core')."""
    return [line.lower() for line in log if line.startswith("onednn_verbose") and ",exec," in line]


@pytest.mark.skipif("ATEN_CPU_CAPABILITY" not in os.environ, reason="set only in the kernel-path CI pass")
def test_aten_runs_at_the_requested_capability() -> None:
    assert torch.backends.cpu.get_cpu_capability().lower() == os.environ["ATEN_CPU_CAPABILITY"].lower()


@pytest.mark.skipif(os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() != "AVX2", reason="set to AVX2 only in CI")
def test_onednn_is_capped_at_avx2(verbose_log: list[str]) -> None:
    isa = _first(verbose_log, "onednn_verbose", ",info,cpu,isa:")
    assert "AVX2" in isa and "512" not in isa and "AMX" not in isa, isa
    runs = _onednn_runs(verbose_log)
    assert any(",convolution," in r and ":avx2" in r for r in runs), runs  # the convolution ran in oneDNN, at AVX2
    assert not any("avx512" in r or "amx" in r for r in runs), runs


@pytest.mark.skipif(
    "MKL_ENABLE_INSTRUCTIONS" not in os.environ or not HAVE_MKL,
    reason="set only in the kernel-path CI pass, and only matters to a torch built with MKL",
)
def test_mkl_takes_no_avx512_path(verbose_log: list[str]) -> None:
    # On Intel CPUs MKL's banner names the ISA it dispatches to; on other CPUs it names none (MKL never takes
    # its AVX-512 code paths there, so the variable changes nothing: the assertion holds either way).
    banner = _first(verbose_log, "MKL_VERBOSE", " for Intel(R) 64 architecture")
    assert "AVX-512" not in banner and "Extensions 512" not in banner, banner


@pytest.mark.skipif(os.environ.get("OMP_NUM_THREADS") != "1", reason="set to 1 only in the one-thread CI pass")
def test_one_thread_everywhere_torch_computes(verbose_log: list[str]) -> None:
    assert torch.get_num_threads() == 1
    assert any(",info,cpu,runtime:OpenMP,nthr:1" in line for line in verbose_log)  # oneDNN
    sgemm = [line for line in verbose_log if line.startswith("MKL_VERBOSE SGEMM")]
    assert not HAVE_MKL or (sgemm and all("NThr:1" in line for line in sgemm))
