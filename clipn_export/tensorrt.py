"""``--tensorrt``: a serialized TensorRT engine (``model.plan``) built from the bundle's fp32 ONNX graph.

TensorRT 10 API (named I/O tensors, explicit batch only). One optimisation profile on the image input (min 1,
opt, max ``--max-batch``); with fp16 the builder may run the encoder in fp16 while every layer of the
preprocessing and the scoring head (node names ``preprocess/…``, ``head/…``) is pinned to fp32 under
``OBEY_PRECISION_CONSTRAINTS``. A timing cache makes rebuilds fast. The manifest records the TensorRT version,
the GPU and its compute capability, because a plan only runs where it was built.

TensorRT cannot be installed everywhere (not on CPU-only machines): it is imported lazily and its absence is a
clear :class:`~clipn_runtime.errors.UserError` raised *before* any other export work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipn_export.onnx_export import PREFIX_HEAD, PREFIX_PREPROCESS
from clipn_runtime.bundle import TensorSpec
from clipn_runtime.errors import UserError

log = logging.getLogger(__name__)

PLAN_FILE = "model.plan"
#: Node-name prefixes of the layers that must stay fp32 in an fp16 engine.
FP32_PREFIXES: tuple[str, ...] = (PREFIX_PREPROCESS, PREFIX_HEAD)

INSTALL_HINT = (
    "--tensorrt needs TensorRT ≥ 10 (Python package `tensorrt`) and an NVIDIA GPU with CUDA: run the export "
    'on the GPU machine that will serve the engine, after `pip install "clipn-ood[tensorrt]"`. '
    "The ONNX engines in the bundle work without it."
)


@dataclass(frozen=True)
class TensorRTBuild:
    """A built plan: its path, the manifest's ``tensorrt`` record and the engine's I/O tensors."""

    plan: Path
    info: dict[str, Any]
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)


def require_tensorrt() -> Any:
    """The ``tensorrt`` module (version ≥ 10) and a visible CUDA GPU, or a UserError saying what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(f"TensorRT is not installed here. {INSTALL_HINT}") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise UserError(f"TensorRT {trt.__version__} is too old. {INSTALL_HINT}")
    gpu_info()
    return trt


def gpu_info() -> dict[str, str]:
    """Name and compute capability of CUDA device 0 (what a plan is tied to)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"no CUDA GPU is visible. {INSTALL_HINT}")
    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def profile_shapes(
    sample_shape: tuple[int, ...], max_batch: int, opt_batch: int | None = None
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) input shapes for one profile over the batch axis; opt defaults to ``max_batch // 2``."""
    if max_batch < 1:
        raise UserError(f"--max-batch must be ≥ 1, got {max_batch}")
    opt = opt_batch if opt_batch is not None else max(1, max_batch // 2)
    if not 1 <= opt <= max_batch:
        raise UserError(f"--opt-batch {opt} must lie in [1, --max-batch {max_batch}]")
    return (1, *sample_shape), (opt, *sample_shape), (max_batch, *sample_shape)


def pinned_to_fp32(layer_name: str) -> bool:
    """Whether a layer (named after its ONNX node by TensorRT's parser) belongs to the fp32 part of the graph."""
    return layer_name.startswith(FP32_PREFIXES)


def _dtype_name(trt: Any, dtype: Any) -> str:
    import numpy as np

    return str(np.dtype(trt.nptype(dtype)).name)


def _io_specs(trt: Any, plan: bytes) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The engine's own I/O tensors (TensorRT may differ from the ONNX graph, e.g. in integer widths)."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = [("batch" if d < 0 and j == 0 else int(d)) for j, d in enumerate(engine.get_tensor_shape(name))]
        spec = TensorSpec(name=name, shape=shape, dtype=_dtype_name(trt, engine.get_tensor_dtype(name)))
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
    return inputs, outputs


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    input_name: str,
    sample_shape: tuple[int, ...],
    max_batch: int,
    opt_batch: int | None = None,
    fp16: bool = False,
    timing_cache: str | Path | None = None,
    workspace_gib: float = 4.0,
) -> TensorRTBuild:
    """Build ``plan_path`` from ``onnx_path`` (fp32 graph); returns the plan, its manifest record and I/O."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    lo, opt, hi = profile_shapes(sample_shape, max_batch, opt_batch)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, lo, opt, hi)
    config.add_optimization_profile(profile)

    pinned = 0
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        floats = (trt.float32, trt.float16)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if not pinned_to_fp32(layer.name):
                continue
            # Only layers that compute on floats take a precision; shape/index layers keep their int types.
            outs = [layer.get_output(j) for j in range(layer.num_outputs)]
            if not any(t is not None and t.dtype in floats for t in outs):
                continue
            layer.precision = trt.float32
            for j, t in enumerate(outs):
                if t is not None and t.dtype in floats:
                    layer.set_output_type(j, trt.float32)
            pinned += 1

    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    plan = bytes(serialized)
    plan_path = Path(plan_path)
    plan_path.write_bytes(plan)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))

    inputs, outputs = _io_specs(trt, plan)
    info = {
        "version": str(trt.__version__),
        **gpu_info(),
        "precision": "fp16" if fp16 else "fp32",
        "fp32_layers": pinned,
        "profile": {"input": input_name, "min": list(lo), "opt": list(opt), "max": list(hi)},
        "plan": plan_path.name,
    }
    log.info("TensorRT %s engine built: %s (%d layers pinned to fp32)", info["precision"], plan_path, pinned)
    return TensorRTBuild(plan_path, info, inputs, outputs)
