"""Engines: provider selection and fallback, the TensorRT EP's options, fp16 sessions, threads, and the native
TensorRT backend — through fake TensorRT 10/11 and pycuda modules (tests/fake_gpu.py) where no GPU exists."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_gpu import COMPUTE_CAPABILITY, GPU_NAME, FakeOrt, install_fake_gpu
from helpers import SyntheticBundle, SyntheticBundleFactory

from clipn_runtime import engine as eng
from clipn_runtime.bundle import MANIFEST_NAME, BundleError, hash_entry
from clipn_runtime.detector import Detector
from clipn_runtime.engine import (
    CPU_EP,
    CUDA_EP,
    TRT_EP,
    EngineError,
    EngineSpec,
    OrtEngine,
    open_engine,
    plan_problems,
    plan_providers,
    tensorrt_importable,
)

ALL = [TRT_EP, CUDA_EP, CPU_EP]
TRT_VERSIONS = ["10.13.3", "11.1.0"]


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
    # graphs that run once per class list leave the TensorRT EP out, without a note about it
    assert plan_providers("auto", ALL, tensorrt_ep=False) == eng.ProviderPlan([CUDA_EP, CPU_EP])
    assert plan_providers("tensorrt", ALL, tensorrt_ep=False).providers == [CUDA_EP, CPU_EP]
    with pytest.raises(
        EngineError, match="--device cuda: this onnxruntime has no CUDAExecutionProvider.*onnxruntime-gpu"
    ):
        plan_providers("cuda", [CPU_EP])
    with pytest.raises(EngineError, match="unknown device"):
        plan_providers("npu", ALL)


def test_cpu_only_build_logs_why(synthetic_bundle: SyntheticBundle, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="clipn_runtime"):
        det = Detector(synthetic_bundle.root)
    assert det.provider == CPU_EP
    text = caplog.text
    assert "engine: onnxruntime CPUExecutionProvider (model.onnx, fp32) — TensorrtExecutionProvider and " in text
    assert "CUDAExecutionProvider not in this onnxruntime build" in text


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_gpu_providers_that_fail_fall_back_to_cpu_with_a_logged_reason(
    synthetic_bundle: SyntheticBundle, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
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
    assert det.engine.fallback_notes
    # The same, asked for explicitly, is an error instead of a silent slow run.
    with pytest.raises(EngineError, match="--device cuda: onnxruntime could not initialise CUDAExecutionProvider"):
        Detector(synthetic_bundle.root, device="cuda")


def test_explicit_gpu_device_without_gpu_build_is_a_clear_error(synthetic_bundle: SyntheticBundle) -> None:
    with pytest.raises(EngineError, match="pip uninstall -y onnxruntime"):
        Detector(synthetic_bundle.root, device="cuda")
    with pytest.raises(EngineError, match="TensorrtExecutionProvider"):
        Detector(synthetic_bundle.root, device="tensorrt")


def test_threads_map_to_intra_op_threads(synthetic_bundle: SyntheticBundle) -> None:
    e = open_engine(synthetic_bundle.root / "model.onnx", threads=1)
    assert isinstance(e, OrtEngine)
    assert e.session.get_session_options().intra_op_num_threads == 1
    assert "1 threads" in e.describe()


def test_fp16_session_disables_nchwc_and_matches(
    synthetic_bundle_factory: SyntheticBundleFactory, monkeypatch: pytest.MonkeyPatch
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
    open_engine(EngineSpec(b.root / "model.onnx", precision="fp32"))
    assert seen["disabled_optimizers"] is None


def test_the_manifest_record_of_disabled_optimizers_wins(
    synthetic_bundle_factory: SyntheticBundleFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exporter records the passes an engine must skip; the runtime uses that record, not its own guess."""
    fake = FakeOrt()
    monkeypatch.setattr("onnxruntime.InferenceSession", fake.InferenceSession)
    b = synthetic_bundle_factory(["a", "b"])
    _set_engine_meta(b.root, onnxruntime_disabled_optimizers=["ConstantFolding"])
    Detector(b.root, device="cpu")
    assert fake.calls[-1].disabled_optimizers == ["ConstantFolding"]


# ---- the TensorRT execution provider's options, and our own fallback --------------------------------------


def _set_engine_meta(root: Path, **meta: Any) -> None:
    """Edit the image engine's ``meta`` in a bundle's manifest (None removes a key)."""
    mf = root / MANIFEST_NAME
    raw = json.loads(mf.read_text())
    entry = next(f for f in raw["files"] if f["role"] == "image_engine")
    entry.setdefault("meta", {}).update(meta)
    entry["meta"] = {k: v for k, v in entry["meta"].items() if v is not None}
    mf.write_text(json.dumps(raw))


def _gpu_onnxruntime(monkeypatch: pytest.MonkeyPatch, fake: FakeOrt, tmp_path: Path) -> None:
    monkeypatch.setattr(eng, "available_providers", lambda: list(ALL))
    monkeypatch.setattr("onnxruntime.InferenceSession", fake.InferenceSession)
    monkeypatch.setenv("CLIPN_CACHE", str(tmp_path / "fresh-machine" / "cache"))  # nothing exists yet


def test_tensorrt_ep_gets_one_existing_cache_folder_per_engine_fp16_off_and_profiles(
    synthetic_bundle_factory: SyntheticBundleFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two bundles of one backbone (same file name, other banks): each engine gets its own TensorRT EP cache
    folder named by its sha256, made before the session starts; fp16 stays off (the graph holds the types);
    the profile covers batch 1 … the bundle's max batch."""
    fake = FakeOrt()
    _gpu_onnxruntime(monkeypatch, fake, tmp_path)
    bundles = [
        synthetic_bundle_factory(["a", "b"], input_dtype="float16"),
        synthetic_bundle_factory(["c", "d", "e"], input_dtype="float16"),
    ]
    for b in bundles:
        _set_engine_meta(b.root, max_batch=8)
    dets = [Detector(b.root, device="tensorrt", batch_size=32) for b in bundles]
    options = [c.provider_options[0] for c in fake.calls]
    assert [c.providers for c in fake.calls] == [ALL, ALL]
    folders = [Path(o["trt_engine_cache_path"]) for o in options]
    for det, folder in zip(dets, folders, strict=True):
        assert folder.name == det.manifest.engine().sha256
    assert folders[0] != folders[1]
    assert all(c.cache_dir_existed for c in fake.calls)
    for o in options:
        assert o["trt_engine_cache_enable"] is True and o["trt_fp16_enable"] is False
        assert o["trt_profile_min_shapes"] == "image:1x3x16x16"
        assert o["trt_profile_opt_shapes"] == "image:4x3x16x16"
        assert o["trt_profile_max_shapes"] == "image:8x3x16x16"
    assert dets[0].batch_size == 8  # the profile bounds the batch


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_gpu_provider_that_cannot_start_falls_back_with_our_options_and_the_real_reason(
    synthetic_bundle_factory: SyntheticBundleFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    device: str,
) -> None:
    """onnxruntime's own fallback would drop the fp16 engine's disabled optimiser (a segfault on CPU) and the
    thread count; ours keeps them and says why. An explicit device is refused with onnxruntime's error."""
    fake = FakeOrt(fail="create")
    _gpu_onnxruntime(monkeypatch, fake, tmp_path)
    b = synthetic_bundle_factory(["a", "b"], input_dtype="float16")
    if device == "cuda":
        with pytest.raises(
            EngineError, match="--device cuda: onnxruntime could not start .*no CUDA-capable device"
        ):
            Detector(b.root, device="cuda", threads=2)
        return
    with caplog.at_level(logging.WARNING, logger="clipn_runtime"):
        det = Detector(b.root, device="auto", threads=2)
    assert det.provider == CPU_EP
    assert not any(c.by_onnxruntime for c in fake.calls)
    last = fake.calls[-1]
    assert last.providers == [CPU_EP] and last.disabled_optimizers == ["NchwcTransformer"] and last.threads == 2
    assert "no CUDA-capable device is detected" in caplog.text
    assert "no CUDA-capable device is detected" in det.engine.fallback_notes[-1]


def test_a_gpu_provider_that_fails_while_running_falls_back_with_our_options(
    synthetic_bundle_factory: SyntheticBundleFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeOrt(fail="run", error="TensorRT EP failed to build the engine: out of memory")
    _gpu_onnxruntime(monkeypatch, fake, tmp_path)
    b = synthetic_bundle_factory(["a", "b", "c"], input_dtype="float16", scale=10.0)
    det = Detector(b.root, device="auto", threads=2)
    assert det.provider == TRT_EP
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float16)
    out = det.run(x)
    assert np.abs(out["atd"] - b.reference(x.astype(np.float32)).atd).max() < 5e-3
    assert det.provider == CPU_EP and "out of memory" in det.engine.fallback_notes[-1]
    assert not any(c.by_onnxruntime for c in fake.calls)
    assert fake.calls[-1].disabled_optimizers == ["NchwcTransformer"] and fake.calls[-1].threads == 2


# ---- native TensorRT (fake TensorRT 10 / 11 and pycuda) ----------------------------------------------------


def _add_plan(root: Path, trt: Any, *, source: Path | None = None, max_batch: int = 8) -> None:
    """Build ``model.plan`` from the bundle's ONNX (or ``source``) with ``trt``'s builder and list it."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(network, logger).parse_from_file(str(source or root / "model.onnx"))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    sample = network.get_input(0).shape[1:]
    profile.set_shape("image", (1, *sample), (max_batch // 2, *sample), (max_batch, *sample))
    config.add_optimization_profile(profile)
    (root / "model.plan").write_bytes(bytes(builder.build_serialized_network(network, config)))
    mf = root / MANIFEST_NAME
    raw = json.loads(mf.read_text())
    entry = hash_entry(root, "model.plan", "tensorrt_engine", precision="fp32")
    raw["files"].append({**entry.__dict__, "inputs": [], "outputs": []})
    cc = "{}.{}".format(*COMPUTE_CAPABILITY)
    raw["tensorrt"] = {"version": trt.__version__, "gpu": GPU_NAME, "compute_capability": cc}
    mf.write_text(json.dumps(raw))


@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_native_plan_runs_through_persistent_pinned_buffers(
    synthetic_bundle_factory: SyntheticBundleFactory, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    """Async copies only from/to page-locked memory (pycuda's contract), buffers allocated once, results equal
    to onnxruntime's on the same graph."""
    gpu = install_fake_gpu(monkeypatch, version)
    b = synthetic_bundle_factory(["a", "b", "c"], scale=10.0, full_outputs=True)
    _add_plan(b.root, gpu.trt)
    assert tensorrt_importable()
    native = Detector(b.root, device="tensorrt")
    assert native.engine.backend == "tensorrt" and native.batch_size == 8
    cpu = Detector(b.root, device="cpu")
    rng = np.random.default_rng(0)
    for n in (5, 3, 5):
        x = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
        got, ref = native.run(x), cpu.run(x)
        assert set(got) == set(ref)
        for name in ref:
            if ref[name].dtype.kind == "f":
                # the same graph in onnxruntime CPU behind the fake; only the session options differ
                np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-6, err_msg=name)
            else:
                np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    io = len(native.engine.input_names) + len(native.engine.output_names)
    assert gpu.state.pinned_allocations == io and gpu.state.device_allocations == io


@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_native_plan_refuses_a_batch_outside_its_profile(
    synthetic_bundle_factory: SyntheticBundleFactory, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    gpu = install_fake_gpu(monkeypatch, version)
    b = synthetic_bundle_factory(["a", "b"])
    _add_plan(b.root, gpu.trt, max_batch=4)
    e = Detector(b.root, device="tensorrt").engine
    with pytest.raises(EngineError, match=r"TensorRT refused input 'image' of shape \[6, 3, 16, 16\].*1 to 4"):
        e.run({"image": np.zeros((6, 3, 16, 16), np.float32)})


def test_native_plan_close_releases_the_stream_inside_its_context(
    synthetic_bundle_factory: SyntheticBundleFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = install_fake_gpu(monkeypatch, TRT_VERSIONS[-1])
    b = synthetic_bundle_factory(["a", "b"])
    _add_plan(b.root, gpu.trt)
    Detector(b.root, device="tensorrt").close()
    assert gpu.state.events == ["stream released (context current)", "context detached"]
    det = Detector(b.root, device="tensorrt")
    det.run(np.zeros((2, 3, 16, 16), np.float32))
    det.close()
    det.close()  # twice is harmless
    assert gpu.state.memory == {}  # every device buffer freed


def test_native_plan_is_validated_like_an_onnx_engine(
    synthetic_bundle_factory: SyntheticBundleFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan whose input disagrees with the manifest (uint8 crops in a float32 bundle) is refused."""
    gpu = install_fake_gpu(monkeypatch, TRT_VERSIONS[0])
    b = synthetic_bundle_factory(["a", "b"])
    other = synthetic_bundle_factory(["a", "b"], input_dtype="uint8", input_layout="NHWC")
    _add_plan(b.root, gpu.trt, source=other.root / "model.onnx")
    with pytest.raises(BundleError, match="input 'image' is uint8, the manifest says float32"):
        Detector(b.root, device="tensorrt")


def test_plan_problems() -> None:
    built = {"version": "10.3.0", "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    assert plan_problems(built, "10.3.0", "NVIDIA A100 80GB PCIe", "8.0") == []  # same arch, other board: fine
    p = plan_problems(built, "10.5.0", "NVIDIA H100 80GB HBM3", "9.0")
    assert len(p) == 2
    assert "built with TensorRT 10.3.0, this machine has TensorRT 10.5.0" in p[0]
    assert "compute capability 8.0 (NVIDIA A100-SXM4-80GB)" in p[1] and "9.0" in p[1]
    assert plan_problems({"tensorrt_version": "10.3.0", "compute_capability": [8, 0]}, "10.3.0", "x", "8.0") == []
    assert "does not say" in plan_problems(None, "10.3.0", "x", "8.0")[0]


def test_native_tensorrt_plan_refused_for_another_tensorrt(
    synthetic_bundle_factory: SyntheticBundleFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan from another TensorRT: --device tensorrt refuses with the reason; auto falls back to ONNX."""
    gpu = install_fake_gpu(monkeypatch, TRT_VERSIONS[1])
    b = synthetic_bundle_factory(["a", "b"])
    _add_plan(b.root, gpu.trt)
    install_fake_gpu(monkeypatch, TRT_VERSIONS[0])  # the serving machine has another TensorRT
    with pytest.raises(EngineError, match=f"built with TensorRT {TRT_VERSIONS[1]}, this machine has TensorRT 10"):
        Detector(b.root, device="tensorrt")
    assert Detector(b.root, device="auto").provider == CPU_EP


@pytest.mark.parametrize("broken", ["init", "make_context"])
def test_native_plan_that_cannot_start_cuda_falls_back_under_auto(
    synthetic_bundle_factory: SyntheticBundleFactory, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    """pycuda's own errors (no GPU or driver: cuInit fails; no memory: the context fails) are EngineErrors: auto
    runs the ONNX engine, --device tensorrt says why in one line."""
    from fake_gpu import FakeCudaError

    gpu = install_fake_gpu(monkeypatch, TRT_VERSIONS[0])
    b = synthetic_bundle_factory(["a", "b"])
    _add_plan(b.root, gpu.trt)

    def fail(*args: Any) -> None:
        raise FakeCudaError("cuInit failed: no CUDA-capable device is detected")

    if broken == "init":
        monkeypatch.setattr(gpu.cuda, "init", fail)
    else:
        monkeypatch.setattr(gpu.cuda.Device, "make_context", fail)
    assert Detector(b.root, device="auto").provider == CPU_EP
    with pytest.raises(
        EngineError, match="model.plan: .*native TensorRT plan.*no CUDA-capable device.*--device cuda"
    ):
        Detector(b.root, device="tensorrt")


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(
    not tensorrt_importable(), reason="tensorrt and pycuda are not installed (needs an NVIDIA GPU)"
)
def test_native_tensorrt_engine_matches_onnxruntime(
    synthetic_bundle_factory: SyntheticBundleFactory,
) -> None:  # pragma: no cover
    """GPU machines only: build a plan from the synthetic ONNX here, run it natively, compare with ORT CPU."""
    import pycuda.driver as cuda
    import tensorrt as trt

    b = synthetic_bundle_factory(["a", "b", "c"], scale=10.0)
    cuda.init()
    dev = cuda.Device(0)
    _add_plan(b.root, trt)
    raw = json.loads((b.root / MANIFEST_NAME).read_text())
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
    # TensorRT's fp32 kernels (TF32 allowed by default on Ampere+) vs onnxruntime's CPU ones at scale 10
    assert np.abs(got["atd"] - ref["atd"]).max() < 1e-3
    native.close()
