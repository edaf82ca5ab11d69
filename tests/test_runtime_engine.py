"""Engines: provider selection and its logged fallback, fp16 sessions, threads, TensorRT plan compatibility."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipn_runtime import engine as eng
from clipn_runtime.detector import Detector
from clipn_runtime.engine import (
    CPU_EP,
    CUDA_EP,
    TRT_EP,
    EngineError,
    OrtEngine,
    plan_problems,
    plan_providers,
    tensorrt_importable,
)

ALL = [TRT_EP, CUDA_EP, CPU_EP]


def test_plan_providers() -> None:
    assert plan_providers("auto", ALL).providers == ALL
    assert plan_providers("auto", ALL).notes == []
    cpu_only = plan_providers("auto", ["AzureExecutionProvider", CPU_EP])
    assert cpu_only.providers == [CPU_EP]
    assert "CUDAExecutionProvider not in this onnxruntime build" in cpu_only.notes[0]
    assert "install onnxruntime-gpu" in cpu_only.notes[0]
    no_trt = plan_providers("auto", [CUDA_EP, CPU_EP])
    assert no_trt.providers == [CUDA_EP, CPU_EP] and "TensorrtExecutionProvider" in no_trt.notes[0]
    assert plan_providers("cpu", ALL).providers == [CPU_EP]
    assert plan_providers("cuda", ALL).providers == [CUDA_EP, CPU_EP]
    assert plan_providers("tensorrt", ALL).providers == ALL
    with pytest.raises(
        EngineError, match="--device cuda: this onnxruntime has no CUDAExecutionProvider.*onnxruntime-gpu"
    ):
        plan_providers("cuda", [CPU_EP])
    with pytest.raises(EngineError, match="unknown device"):
        plan_providers("npu", ALL)


def test_cpu_only_build_logs_why(synthetic_bundle: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="clipn_runtime"):
        det = Detector(synthetic_bundle.root)
    assert det.provider == CPU_EP
    text = caplog.text
    assert "engine: onnxruntime CPUExecutionProvider (model.onnx, fp32) — TensorrtExecutionProvider and " in text
    assert "CUDAExecutionProvider not in this onnxruntime build" in text


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_gpu_providers_that_fail_fall_back_to_cpu_with_a_logged_reason(
    synthetic_bundle: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # What onnxruntime-gpu does on a machine without usable CUDA libraries: it lists the GPU providers, then
    # cannot initialise them and runs on CPU. Simulated here with the CPU build, which drops unknown providers.
    monkeypatch.setattr(eng, "available_providers", lambda: list(ALL))
    with caplog.at_level(logging.INFO, logger="clipn_runtime"):
        det = Detector(synthetic_bundle.root, device="auto")
    assert det.provider == CPU_EP
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning and "falling back to CPUExecutionProvider" in warning[0].getMessage()
    assert "could not initialise TensorrtExecutionProvider, CUDAExecutionProvider" in warning[0].getMessage()
    assert isinstance(det.engine, OrtEngine) and det.engine.fallback_notes
    # The same, asked for explicitly, is an error instead of a silent slow run.
    with pytest.raises(EngineError, match="--device cuda: onnxruntime could not initialise CUDAExecutionProvider"):
        Detector(synthetic_bundle.root, device="cuda")


def test_explicit_gpu_device_without_gpu_build_is_a_clear_error(synthetic_bundle: Any) -> None:
    with pytest.raises(EngineError, match="pip uninstall -y onnxruntime"):
        Detector(synthetic_bundle.root, device="cuda")
    with pytest.raises(EngineError, match="TensorrtExecutionProvider"):
        Detector(synthetic_bundle.root, device="tensorrt")


def test_threads_map_to_intra_op_threads(synthetic_bundle: Any) -> None:
    e = OrtEngine(synthetic_bundle.root / "model.onnx", threads=1)
    assert e.session.get_session_options().intra_op_num_threads == 1
    assert "1 threads" in e.describe()


def test_fp16_session_disables_nchwc_and_matches(
    synthetic_bundle_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort

    seen: dict[str, Any] = {}
    real = ort.InferenceSession

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    b = synthetic_bundle_factory(["a", "b", "c"], input_dtype="float16", scale=10.0)
    det = Detector(b.root)
    assert seen["disabled_optimizers"] == ["NchwcTransformer"]
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float16)
    out = det.run(x)
    ref = b.reference(x.astype(np.float32))
    assert np.abs(out["atd"] - ref.atd).max() < 5e-3
    seen.clear()
    OrtEngine(b.root / "model.onnx", precision="fp32")
    assert seen["disabled_optimizers"] is None


def test_plan_problems() -> None:
    built = {"version": "10.3.0", "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    assert plan_problems(built, "10.3.0", "NVIDIA A100 80GB PCIe", "8.0") == []  # same arch, other board: fine
    p = plan_problems(built, "10.5.0", "NVIDIA H100 80GB HBM3", "9.0")
    assert len(p) == 2
    assert "built with TensorRT 10.3.0, this machine has TensorRT 10.5.0" in p[0]
    assert "compute capability 8.0 (NVIDIA A100-SXM4-80GB)" in p[1] and "9.0" in p[1]
    assert plan_problems({"tensorrt_version": "10.3.0", "compute_capability": [8, 0]}, "10.3.0", "x", "8.0") == []
    assert "does not say" in plan_problems(None, "10.3.0", "x", "8.0")[0]


def test_native_tensorrt_plan_refused_for_another_gpu(
    synthetic_bundle_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle with a plan from another machine: --device tensorrt refuses with the reason; auto falls back."""
    import json

    from clipn_runtime.bundle import MANIFEST_NAME, hash_entry

    b = synthetic_bundle_factory(["a", "b"])
    (b.root / "model.plan").write_bytes(b"serialized engine from elsewhere")
    raw = json.loads((b.root / MANIFEST_NAME).read_text())
    entry = hash_entry(b.root, "model.plan", "tensorrt_engine", precision="fp16")
    raw["files"].append({**entry.__dict__, "inputs": [], "outputs": []})
    raw["tensorrt"] = {"version": "0.0.1", "gpu": "Imaginary GPU", "compute_capability": "1.0"}
    (b.root / MANIFEST_NAME).write_text(json.dumps(raw))

    class FakeTRT:
        def __init__(self, path: Path, built_for: Any) -> None:
            problems = plan_problems(built_for, "10.3.0", "NVIDIA L4", "8.9")
            raise EngineError(f"{Path(path).name} cannot run here: " + "; ".join(problems))

    import clipn_runtime.detector as detector_mod

    monkeypatch.setattr(detector_mod, "tensorrt_importable", lambda: True)
    monkeypatch.setattr(detector_mod, "TensorRTEngine", FakeTRT)
    with pytest.raises(EngineError, match="built with TensorRT 0.0.1, this machine has TensorRT 10.3.0"):
        Detector(b.root, device="tensorrt")
    assert Detector(b.root, device="auto").provider == CPU_EP


@pytest.mark.tensorrt
@pytest.mark.skipif(
    not tensorrt_importable(), reason="tensorrt and pycuda are not installed (needs an NVIDIA GPU)"
)
def test_native_tensorrt_engine_matches_onnxruntime(synthetic_bundle_factory: Any) -> None:  # pragma: no cover
    """GPU machines only: build a plan from the synthetic ONNX here, run it natively, compare with ORT CPU."""
    import json

    import pycuda.driver as cuda
    import tensorrt as trt

    from clipn_runtime.bundle import MANIFEST_NAME, hash_entry

    b = synthetic_bundle_factory(["a", "b", "c"], scale=10.0)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(b.root / "model.onnx"))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))
    config.add_optimization_profile(profile)
    (b.root / "model.plan").write_bytes(bytes(builder.build_serialized_network(network, config)))
    cuda.init()
    dev = cuda.Device(0)
    raw = json.loads((b.root / MANIFEST_NAME).read_text())
    raw["files"].append({**hash_entry(b.root, "model.plan", "tensorrt_engine", precision="fp32").__dict__})
    raw["tensorrt"] = {
        "version": trt.__version__,
        "gpu": dev.name(),
        "compute_capability": "{}.{}".format(*dev.compute_capability()),
    }
    (b.root / MANIFEST_NAME).write_text(json.dumps(raw))
    native = Detector(b.root, device="tensorrt")
    assert native.engine.backend == "tensorrt" and native.batch_size == 8
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    got, ref = native.run(x), Detector(b.root, device="cpu").run(x)
    for name in ("pred", "ood_atd", "ood_ctw"):
        np.testing.assert_array_equal(got[name], ref[name])
    assert np.abs(got["atd"] - ref["atd"]).max() < 1e-4
    raw["tensorrt"]["version"] = "0.0.0"
    (b.root / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(EngineError, match="built with TensorRT 0.0.0"):
        Detector(b.root, device="tensorrt")
