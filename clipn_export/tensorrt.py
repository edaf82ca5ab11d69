"""``--tensorrt``: a serialized TensorRT engine (``model.plan``) built from the bundle's own ONNX engine.

TensorRT 10 and 11 (named I/O tensors, explicit batch only). The network is **strongly typed**: every tensor
keeps the type the ONNX graph gives it, so the plan computes what the ONNX engine it was built from computes.
With ``--fp16`` that graph is ``model.fp16.onnx`` (fp16 encoder, fp32 preprocessing and scoring head; the casts
are in the graph), otherwise ``model.onnx``. TensorRT 11 has no other mode (its precision builder flags and
per-layer precisions are gone; they were deprecated in 10.12); TensorRT 10 needs the creation flag. The int8
engine is onnxruntime's dynamic quantisation, which TensorRT does not take: a TensorRT int8 plan needs an
explicitly quantised (Q/DQ) graph.

One optimisation profile on the image input (min 1, opt, max ``--max-batch``). A timing cache makes rebuilds
fast; one TensorRT rejects (another version or GPU) is replaced, with a warning. The manifest records the
TensorRT version, the GPU and its compute capability, because a plan only runs where it was built.

TensorRT cannot be installed everywhere (not on CPU-only machines): it is imported lazily and its absence is a
clear :class:`~clipn_runtime.errors.UserError` raised *before* any other export work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipn_runtime.bundle import TensorSpec
from clipn_runtime.errors import UserError
from clipn_runtime.fileio import atomic_write

log = logging.getLogger(__name__)

PLAN_FILE = "model.plan"
#: TensorRT major versions this builder and the runtime's native engine are written for.
SUPPORTED_MAJORS: tuple[int, ...] = (10, 11)

INSTALL_HINT = (
    "--tensorrt needs TensorRT 10 or 11 (Python package `tensorrt`) and an NVIDIA GPU with CUDA: run the export "
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
    if major < min(SUPPORTED_MAJORS):
        raise UserError(f"TensorRT {trt.__version__} is too old. {INSTALL_HINT}")
    if major > max(SUPPORTED_MAJORS):
        log.warning("TensorRT %s is newer than the versions this exporter knows (10, 11)", trt.__version__)
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


def strongly_typed_flags(trt: Any) -> int:
    """``create_network`` flags of a strongly typed network (the flag's bit differs between 10 and 11)."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


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


def _use_timing_cache(config: Any, path: Path | None) -> None:
    """Give the build a timing cache: the one in ``path`` when TensorRT accepts it, else a new one."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, False):
        return
    if data:
        log.warning(
            "%s: TensorRT rejected this timing cache (made by another TensorRT version or GPU?); building with "
            "a new one, which replaces it",
            path,
        )
        cache = config.create_timing_cache(b"")
        if cache is not None and config.set_timing_cache(cache, False):
            return
    raise RuntimeError("TensorRT could not set up a timing cache (see the TensorRT log above)")


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    input_name: str,
    sample_shape: tuple[int, ...],
    max_batch: int,
    opt_batch: int | None = None,
    precision: str = "fp32",
    timing_cache: str | Path | None = None,
    workspace_gib: float = 4.0,
) -> TensorRTBuild:
    """Build ``plan_path`` from ``onnx_path`` (the bundle's engine of ``precision``) as a strongly typed network;
    returns the plan, its manifest record and I/O."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
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
    cache_path = Path(timing_cache) if timing_cache is not None else None
    _use_timing_cache(config, cache_path)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    plan = bytes(serialized)
    plan_path = Path(plan_path)
    plan_path.write_bytes(plan)
    if cache_path is not None:
        atomic_write(cache_path, bytes(config.get_timing_cache().serialize()))

    inputs, outputs = _io_specs(trt, plan)
    info = {
        "version": str(trt.__version__),
        **gpu_info(),
        "precision": precision,
        "typing": "strong",
        "source": Path(onnx_path).name,
        "profile": {"input": input_name, "min": list(lo), "opt": list(opt), "max": list(hi)},
        "plan": plan_path.name,
    }
    log.info("TensorRT %s plan built from %s: %s", precision, info["source"], plan_path)
    return TensorRTBuild(plan_path, info, inputs, outputs)
