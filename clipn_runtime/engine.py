"""Engines: run a bundle's image graph (image → CLIPN scores) with onnxruntime or a native TensorRT plan.

An :class:`Engine` is constructed once and called many times with a feed dict (``{"image": batch}``, plus the
class banks as extra inputs for open-vocabulary bundles later); it returns every graph output by name.

Provider choice for onnxruntime is data (an ordered list, like onnxruntime's own API): ``auto`` takes
TensorRT → CUDA → CPU, keeping those this onnxruntime build offers; ``cpu``/``cuda``/``tensorrt`` ask for one.
onnxruntime silently drops a provider it cannot initialise (missing CUDA/cuDNN/TensorRT libraries), so after
creating the session we compare what it *uses* with what we asked for and log the reason for any fallback —
or refuse, when the user named the device explicitly.

The native TensorRT backend (``model.plan`` + tensorrt + pycuda, both optional and imported lazily) uses the
TensorRT 10 named-tensor API. A plan only runs with the TensorRT version and GPU architecture it was built for;
the manifest records both and :func:`plan_problems` refuses a mismatch before TensorRT does something obscure.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clipn_runtime.cache import cache_root
from clipn_runtime.errors import UserError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
_DEVICE_EP = {"cpu": CPU_EP, "cuda": CUDA_EP, "tensorrt": TRT_EP}
GPU_INSTALL_HINT = "install onnxruntime-gpu, which replaces onnxruntime: pip uninstall -y onnxruntime && pip install 'clipn-ood[gpu]'"


class EngineError(UserError):
    """The engine cannot run here as asked; the message says why and what to do."""


class Engine(Protocol):
    """What the detector needs from a backend."""

    backend: str  # "onnxruntime" or "tensorrt"
    providers: tuple[str, ...]  # what actually runs the graph, best first
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    max_batch: int | None  # None: any batch size

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ProviderPlan:
    """The onnxruntime providers to ask for, in order, and why the better ones were left out."""

    providers: list[str]
    notes: list[str] = field(default_factory=list)


def available_providers() -> list[str]:
    """The execution providers of the installed onnxruntime build."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def plan_providers(device: str, available: Sequence[str]) -> ProviderPlan:
    """Which providers to request for ``device`` given what onnxruntime offers.

    ``auto`` keeps TensorRT → CUDA → CPU in that order where available and notes each one missing; an explicit
    device that this build lacks is an :class:`EngineError` naming the fix.
    """
    if device not in DEVICES:
        raise EngineError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    have = ", ".join(available) or "none"
    if device == "cpu":
        return ProviderPlan([CPU_EP])
    if device != "auto":
        ep = _DEVICE_EP[device]
        if ep not in available:
            raise EngineError(
                f"--device {device}: this onnxruntime has no {ep} (it has: {have}); {GPU_INSTALL_HINT} "
                "— or use --device auto/cpu"
            )
        # TensorRT EP hands the layers it cannot take to CUDA, CUDA hands the rest to CPU.
        chain = [TRT_EP, CUDA_EP, CPU_EP] if device == "tensorrt" else [CUDA_EP, CPU_EP]
        return ProviderPlan([p for p in chain if p in available or p == CPU_EP])
    providers = [ep for ep in (TRT_EP, CUDA_EP) if ep in available] + [CPU_EP]
    missing = [ep for ep in (TRT_EP, CUDA_EP) if ep not in available]
    notes = []
    if missing:
        hint = "; for a GPU install onnxruntime-gpu, which replaces onnxruntime" if CUDA_EP in missing else ""
        notes.append(f"{' and '.join(missing)} not in this onnxruntime build (it has {have}){hint}")
    return ProviderPlan(providers, notes)


class OrtEngine:
    """An onnxruntime session over one ONNX file, with providers chosen by :func:`plan_providers`."""

    backend = "onnxruntime"
    max_batch: int | None = None

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        threads: int | None = None,
        precision: str | None = None,
        cache_dir: str | Path | None = None,
        log_severity: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.precision = precision
        plan = plan_providers(device, available_providers())
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if log_severity is not None:  # onnxruntime's own log: 0 verbose … 2 warning (its default) … 4 fatal
            so.log_severity_level = log_severity
        if threads:
            so.intra_op_num_threads = int(threads)
        # ORT's CPU NchwcTransformer crashes (segfault) on fp16 graphs at full optimisation: skip that one pass.
        disabled = ["NchwcTransformer"] if precision == "fp16" else None
        options: list[dict[str, Any]] = []
        for ep in plan.providers:
            if ep == TRT_EP:
                cache = Path(cache_dir) if cache_dir is not None else cache_root() / "tensorrt"
                options.append(
                    {
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": str(cache),
                        "trt_fp16_enable": precision == "fp16",
                    }
                )
            else:
                options.append({})
        try:
            self.session = ort.InferenceSession(
                str(self.path),
                sess_options=so,
                providers=plan.providers,
                provider_options=options,
                disabled_optimizers=disabled,
            )
        except Exception as e:  # onnxruntime raises its own exception types for bad models
            raise EngineError(f"{self.path}: onnxruntime cannot load the engine: {e}") from None
        used = list(self.session.get_providers())
        self.providers = tuple(used)
        self.fallback_notes = list(plan.notes)
        dropped = [p for p in plan.providers if p not in used]
        if dropped:
            reason = (
                f"onnxruntime could not initialise {', '.join(dropped)} (usually missing CUDA, cuDNN or TensorRT "
                "libraries, or no GPU visible; onnxruntime's own log above says which)"
            )
            if device != "auto":
                raise EngineError(f"--device {device}: {reason}; fix that or use --device auto/cpu")
            self.fallback_notes.append(reason)
            log.warning("falling back to %s: %s", used[0], reason)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        #: Inputs with a default value (initialisers that are also graph inputs, e.g. the class banks of an
        #: open-vocabulary engine): feeding them is optional.
        self.optional_input_names = tuple(i.name for i in self.session.get_overridable_initializers())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.threads = threads

    def input_specs(self) -> dict[str, tuple[list[int | str | None], str]]:
        """Graph inputs: name → (shape with symbolic dims as strings, onnxruntime type string)."""
        return {i.name: (list(i.shape), i.type) for i in self.session.get_inputs()}

    def output_specs(self) -> dict[str, tuple[list[int | str | None], str]]:
        return {o.name: (list(o.shape), o.type) for o in self.session.get_outputs()}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(None, dict(feeds))
        return dict(zip(self.output_names, outs, strict=True))

    def describe(self) -> str:
        threads = f", {self.threads} threads" if self.threads else ""
        return f"onnxruntime {self.providers[0]} ({self.path.name}, {self.precision or 'fp32'}{threads})"

    def close(self) -> None:
        # Dropping the session frees its memory (and GPU memory) deterministically.
        self.__dict__.pop("session", None)


# ---- native TensorRT ------------------------------------------------------------------------------------


def _first(info: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if info.get(k) not in (None, ""):
            return info[k]
    return None


def _norm_cc(cc: Any) -> str | None:
    """Compute capability as "8.9" whether recorded as "8.9", [8, 9], (8, 9) or 89/"sm_89"."""
    if cc is None:
        return None
    if isinstance(cc, (list, tuple)):
        return ".".join(str(int(x)) for x in cc[:2])
    s = str(cc).lower().removeprefix("sm_").removeprefix("sm")
    if "." not in s and s.isdigit() and len(s) >= 2:
        s = f"{s[:-1]}.{s[-1]}"
    return s


def plan_problems(
    built_for: Mapping[str, Any] | None, trt_version: str, gpu_name: str, compute_capability: str
) -> list[str]:
    """Why a TensorRT plan built for ``built_for`` (the manifest's ``tensorrt`` block) cannot run here.

    A plan is tied to the exact TensorRT version and to the GPU architecture (compute capability); the GPU
    model name alone may differ within an architecture (TensorRT then only warns), so that is not a problem.
    """
    if not built_for:
        return ["the manifest does not say which TensorRT version and GPU the plan was built for"]
    problems = []
    want_v = _first(built_for, "tensorrt_version", "version")
    want_cc = _norm_cc(_first(built_for, "compute_capability", "cc"))
    want_gpu = _first(built_for, "gpu_name", "gpu", "device")
    if want_v is None:
        problems.append("the manifest does not record the TensorRT version of the plan")
    elif str(want_v) != str(trt_version):
        problems.append(f"it was built with TensorRT {want_v}, this machine has TensorRT {trt_version}")
    if want_cc is None:
        problems.append("the manifest does not record the GPU compute capability of the plan")
    elif want_cc != _norm_cc(compute_capability):
        problems.append(
            f"it was built for compute capability {want_cc} ({want_gpu or 'unknown GPU'}), this GPU is "
            f"{gpu_name} with compute capability {_norm_cc(compute_capability)}"
        )
    return problems


def tensorrt_importable() -> bool:
    """True when tensorrt and pycuda can be imported (without importing them now)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "pycuda"))


class TensorRTEngine:
    """A serialized TensorRT engine (``model.plan``) run through TensorRT 10's named-tensor API and pycuda."""

    backend = "tensorrt"
    providers: tuple[str, ...]
    max_batch: int | None

    def __init__(self, plan_path: str | Path, built_for: Mapping[str, Any] | None, *, device_index: int = 0):
        try:
            import pycuda.driver as cuda
            import tensorrt as trt
        except ImportError as e:
            raise EngineError(
                f"the native TensorRT engine needs tensorrt and pycuda ({e}); pip install 'clipn-ood[tensorrt]' "
                "on a machine with an NVIDIA GPU, or use --device cuda/cpu (the ONNX engine)"
            ) from None
        self.path = Path(plan_path)
        cuda.init()
        dev = cuda.Device(device_index)
        cc = "{}.{}".format(*dev.compute_capability())
        problems = plan_problems(built_for, trt.__version__, dev.name(), cc)
        if problems:
            raise EngineError(
                f"{self.path.name} cannot run here: "
                + "; ".join(problems)
                + ". Rebuild it on this machine (clipn-export ... --tensorrt) or use --device cuda/cpu, which "
                "runs the bundle's ONNX engine"
            )
        self._cuda = cuda
        self._ctx = dev.make_context()
        try:
            self._trt_logger = trt.Logger(trt.Logger.WARNING)
            runtime = trt.Runtime(self._trt_logger)
            self._engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise EngineError(
                    f"{self.path.name}: TensorRT {trt.__version__} could not deserialize the plan (see the "
                    "TensorRT log above); rebuild it with clipn-export --tensorrt on this machine"
                )
            self._context = self._engine.create_execution_context()
            self._stream = cuda.Stream()
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            is_in = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
            self.input_names = tuple(n for n in names if is_in[n])
            self.output_names = tuple(n for n in names if not is_in[n])
            self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
            # The optimisation profile's max batch (profile 0, first input) bounds the batch size.
            shapes = self._engine.get_tensor_profile_shape(self.input_names[0], 0)
            self.max_batch = int(shapes[2][0])
            self._buffers: dict[str, tuple[int, Any]] = {}
            self.providers = (f"TensorRT {trt.__version__} on {dev.name()}",)
        finally:
            self._ctx.pop()

    def _device_buffer(self, name: str, nbytes: int) -> Any:
        have = self._buffers.get(name)
        if have is None or have[0] < nbytes:
            self._buffers[name] = (nbytes, self._cuda.mem_alloc(max(nbytes, 1)))
        return self._buffers[name][1]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda = self._cuda
        self._ctx.push()
        try:
            for name in self.input_names:
                host = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
                self._context.set_input_shape(name, host.shape)
                buf = self._device_buffer(name, host.nbytes)
                cuda.memcpy_htod_async(buf, host, self._stream)
                self._context.set_tensor_address(name, int(buf))
            outs: dict[str, np.ndarray] = {}
            for name in self.output_names:
                shape = tuple(self._context.get_tensor_shape(name))
                outs[name] = cuda.pagelocked_empty(shape, self._dtypes[name])
                buf = self._device_buffer(name, outs[name].nbytes)
                self._context.set_tensor_address(name, int(buf))
            if not self._context.execute_async_v3(self._stream.handle):
                raise RuntimeError(f"{self.path.name}: TensorRT execution failed (see the TensorRT log)")
            for name in self.output_names:
                cuda.memcpy_dtoh_async(outs[name], self._buffers[name][1], self._stream)
            self._stream.synchronize()
            return {k: np.array(v) for k, v in outs.items()}
        finally:
            self._ctx.pop()

    def describe(self) -> str:
        return f"native {self.providers[0]} ({self.path.name}, max batch {self.max_batch})"

    def close(self) -> None:
        ctx = self.__dict__.pop("_ctx", None)
        if ctx is not None:
            ctx.push()
            self._buffers.clear()
            self.__dict__.pop("_context", None)
            self.__dict__.pop("_engine", None)
            ctx.pop()
            ctx.detach()
