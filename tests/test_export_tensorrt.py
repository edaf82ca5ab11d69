"""--tensorrt: the build through fake TensorRT 10/11 and pycuda modules (tests/fake_gpu.py), what can be checked
without TensorRT, and the real build where TensorRT and a GPU exist."""

from __future__ import annotations

import builtins
import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_gpu import COMPUTE_CAPABILITY, GPU_NAME, install_fake_gpu

from clipn_export import tensorrt as trt_mod
from clipn_export.exporter import export_bundle
from clipn_runtime.bundle import load_manifest
from clipn_runtime.detector import Detector
from clipn_runtime.errors import UserError

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
TRT_VERSIONS = ["10.13.3", "11.1.0"]


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.fixture
def fake_gpu_info(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch sees no GPU here; the exporter reads the GPU a plan is for from the fake one."""
    cc = "{}.{}".format(*COMPUTE_CAPABILITY)
    monkeypatch.setattr(trt_mod, "gpu_info", lambda: {"gpu": GPU_NAME, "compute_capability": cc})


def test_profile_shapes() -> None:
    assert trt_mod.profile_shapes((3, 224, 224), 32) == ((1, 3, 224, 224), (16, 3, 224, 224), (32, 3, 224, 224))
    assert trt_mod.profile_shapes((224, 224, 3), 1) == ((1, 224, 224, 3),) * 3
    assert trt_mod.profile_shapes((3, 8, 8), 8, opt_batch=4)[1] == (4, 3, 8, 8)
    with pytest.raises(UserError, match="opt-batch"):
        trt_mod.profile_shapes((3, 8, 8), 8, opt_batch=9)
    with pytest.raises(UserError, match="max-batch"):
        trt_mod.profile_shapes((3, 8, 8), 0)


@pytest.mark.parametrize("version", TRT_VERSIONS)
@pytest.mark.parametrize("fp16", [True, False], ids=["fp16", "fp32"])
def test_plan_is_a_strongly_typed_build_of_the_engines_own_onnx_and_runs(
    tiny_clipn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gpu_info: None, version: str, fp16: bool
) -> None:
    """TensorRT 11 has no FP16 flag or layer precisions; 10 accepts them only for weak typing. The plan is built
    strongly typed from model.fp16.onnx (fp16 encoder, fp32 head in the graph) or model.onnx, and the runtime
    runs it natively with the results of that ONNX engine."""
    gpu = install_fake_gpu(monkeypatch, version)
    out = tmp_path / "b"
    export_bundle(tiny_clipn, ["cat", "dog"], out, fp16=fp16, tensorrt=True, max_batch=4, progress=False)
    source = "model.fp16.onnx" if fp16 else "model.onnx"
    log = gpu.build
    assert [Path(p).name for p in log.parsed] == [source]
    assert log.strongly_typed == [True] and log.builds == 1 and log.errors == []
    assert log.layer_precisions_set == 0 and not log.flags_set
    info = load_manifest(out).tensorrt
    assert info is not None
    assert info["version"] == version and info["typing"] == "strong" and info["source"] == source
    assert info["precision"] == ("fp16" if fp16 else "fp32") and info["profile"]["max"][0] == 4

    native = Detector(out, device="tensorrt")
    onnx = Detector(out, device="cpu", precision="fp16" if fp16 else "fp32")
    assert native.engine_file == "model.plan" and native.batch_size == 4
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    got, ref = native.run(x), onnx.run(x)
    for name in ("pred", "ood_ctw", "ood_atd"):
        np.testing.assert_array_equal(got[name], ref[name])
    # the same ONNX graph in onnxruntime CPU behind the fake, other session options
    assert np.abs(got["atd"] - ref["atd"]).max() < 1e-5
    native.close()


def test_a_timing_cache_tensorrt_rejects_is_replaced(
    synthetic_bundle: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gpu_info: None,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """set_timing_cache returns False for a cache from another TensorRT or GPU: warn and start a new one."""
    gpu = install_fake_gpu(monkeypatch, TRT_VERSIONS[1])
    stale = tmp_path / "timing.cache"
    stale.write_bytes(b"FAKE-TRT-TIMING-CACHE 10.0.1 sm80")
    with caplog.at_level(logging.WARNING, logger="clipn_export"):
        trt_mod.build_engine(
            synthetic_bundle.root / "model.onnx", tmp_path / "model.plan", input_name="image",
            sample_shape=(3, 16, 16), max_batch=2, timing_cache=stale,
        )  # fmt: skip
    assert "TensorRT rejected this timing cache" in caplog.text
    assert stale.read_bytes() == f"FAKE-TRT-TIMING-CACHE {gpu.trt.__version__} sm89".encode()
    assert (tmp_path / "model.plan").stat().st_size > 0


def test_missing_tensorrt_is_a_clear_error_before_any_work(
    tiny_clipn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_tensorrt(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "tensorrt" or name.startswith("tensorrt."):
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    with pytest.raises(UserError, match="TensorRT is not installed") as info:
        export_bundle(tiny_clipn, ["cat"], tmp_path / "b", tensorrt=True, progress=False)
    assert "clipn-ood[tensorrt]" in str(info.value)
    assert not (tmp_path / "b").exists()


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TENSORRT, reason="TensorRT is not installed (it needs an NVIDIA GPU machine)")
@pytest.mark.skipif(HAVE_TENSORRT and not _cuda(), reason="no CUDA GPU visible")
def test_tensorrt_plan_is_built_and_recorded(tiny_clipn: Any, tmp_path: Path) -> None:  # pragma: no cover
    cache = tmp_path / "timing.cache"
    export_bundle(
        tiny_clipn, ["cat", "dog"], tmp_path / "b", fp16=True, tensorrt=True, max_batch=8, timing_cache=cache,
        progress=False,
    )  # fmt: skip
    manifest = load_manifest(tmp_path / "b")
    assert manifest.tensorrt is not None
    assert {"version", "gpu", "compute_capability"} <= set(manifest.tensorrt)
    assert manifest.tensorrt["profile"]["max"][0] == 8 and manifest.tensorrt["source"] == "model.fp16.onnx"
    plan = manifest.file("tensorrt_engine")
    assert plan is not None and (tmp_path / "b" / plan.path).stat().st_size > 0
    assert cache.stat().st_size > 0
