"""--tensorrt: what can be checked without TensorRT here, and the real build where TensorRT and a GPU exist."""

from __future__ import annotations

import builtins
import importlib.util
from pathlib import Path
from typing import Any

import onnx
import pytest

from clipn_export import onnx_export as ox
from clipn_export import tensorrt as trt_mod
from clipn_export.exporter import export_bundle
from clipn_runtime.errors import UserError

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def test_profile_shapes() -> None:
    assert trt_mod.profile_shapes((3, 224, 224), 32) == ((1, 3, 224, 224), (16, 3, 224, 224), (32, 3, 224, 224))
    assert trt_mod.profile_shapes((224, 224, 3), 1) == ((1, 224, 224, 3),) * 3
    assert trt_mod.profile_shapes((3, 8, 8), 8, opt_batch=4)[1] == (4, 3, 8, 8)
    with pytest.raises(UserError, match="opt-batch"):
        trt_mod.profile_shapes((3, 8, 8), 8, opt_batch=9)
    with pytest.raises(UserError, match="max-batch"):
        trt_mod.profile_shapes((3, 8, 8), 0)


def test_fp32_pinning_selects_exactly_the_head_and_preprocessing(tiny_bundle_factory: Any) -> None:
    """TensorRT names layers after ONNX nodes; the prefixes must separate the parts of the merged graph."""
    bundle = tiny_bundle_factory(uint8_input=True)
    model = onnx.load(str(bundle / "model.onnx"))
    names = [n.name for n in model.graph.node]
    pinned = [n for n in names if trt_mod.pinned_to_fp32(n)]
    free = [n for n in names if not trt_mod.pinned_to_fp32(n)]
    assert pinned and free
    assert all(n.startswith(ox.PREFIX_ENCODER) for n in free)
    ops = {n.op_type for n in model.graph.node if trt_mod.pinned_to_fp32(n.name)}
    assert {"MatMul", "Sigmoid", "ArgMax"} <= ops  # the scoring head is among the pinned layers
    assert not any(n.op_type == "LayerNormalization" for n in model.graph.node if trt_mod.pinned_to_fp32(n.name))


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
    from clipn_runtime.bundle import load_manifest

    cache = tmp_path / "timing.cache"
    export_bundle(
        tiny_clipn, ["cat", "dog"], tmp_path / "b", fp16=True, tensorrt=True, max_batch=8, timing_cache=cache,
        progress=False,
    )  # fmt: skip
    manifest = load_manifest(tmp_path / "b")
    assert manifest.tensorrt is not None
    assert {"version", "gpu", "compute_capability"} <= set(manifest.tensorrt)
    assert manifest.tensorrt["profile"]["max"][0] == 8 and manifest.tensorrt["fp32_layers"] > 0
    plan = manifest.file("tensorrt_engine")
    assert plan is not None and (tmp_path / "b" / plan.path).stat().st_size > 0
    assert cache.stat().st_size > 0
