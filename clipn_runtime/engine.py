"""Engines: every onnxruntime session, OpenVINO compiled model and native TensorRT plan is opened here.

:func:`open_engine` is the one constructor. It takes an :class:`EngineSpec` (what to open: a file or serialized
bytes, and what the bundle's manifest says about it) and :class:`EngineOptions` (how to run it: device, threads)
and returns an :class:`Engine`: a small backend class chosen by ``spec.backend`` from :data:`BACKENDS`. The
detector, the class-bank builder, the exporter's parity gate and the benchmarks all go through it, so the gate
checks the session that ``clipn-detect`` runs.

Provider choice for onnxruntime is data (an ordered list, like onnxruntime's own API): ``auto`` takes
TensorRT → CUDA → CPU, keeping those this onnxruntime build offers; ``cpu``/``cuda``/``tensorrt`` ask for one.
Sessions are created with onnxruntime's own fallback off: its fallback retries with bare provider names and
drops our session options (the fp16 engines' disabled optimiser pass among them). A GPU provider that cannot
start is handled here instead: ``auto`` falls back to CPU with the same options and logs onnxruntime's real
error; an explicit device is refused with it.

The TensorRT execution provider gets one engine-cache folder per engine file, keyed by the file's sha256:
the provider's cache key hashes the file name, graph names and library versions but not the weights, so two
``model.onnx`` of the same backbone (other class lists, other banks baked in) would share engines otherwise.
It also gets ``trt_fp16_enable`` off (an fp16 engine already says in its graph which parts are fp16) and, where
only the batch axis is dynamic, one optimisation profile up to the bundle's max batch (built once, not again
as batches grow).

The OpenVINO backend (:mod:`clipn_runtime.ov_engine`, ``--device openvino``) compiles the same ONNX files with
an explicit inference precision; which engine and precision run is decided from the parity gate's records by
:mod:`clipn_runtime.engine_choice`.

The native TensorRT backend (``model.plan`` + tensorrt + pycuda, both optional and imported lazily) uses the
named-tensor API of TensorRT 10 and 11 with persistent page-locked host buffers. A plan only runs with the
TensorRT version and GPU architecture it was built for; the manifest records both and :func:`plan_problems`
refuses a mismatch before TensorRT does something obscure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from clipn_runtime.bundle import ROLE_TENSORRT, BundleFile, TensorSpec
from clipn_runtime.cache import cache_root
from clipn_runtime.errors import UserError
from clipn_runtime.fileio import sha256_file

log = logging.getLogger(__name__)
T = TypeVar("T")

DEVICES = ("auto", "cpu", "cuda", "tensorrt", "openvino")
#: ``openvino:X``: OpenVINO's device X (GPU, NPU, ...); plain ``openvino`` is its CPU plugin.
OPENVINO_DEVICE_PREFIX = "openvino:"
CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
_DEVICE_EP = {"cpu": CPU_EP, "cuda": CUDA_EP, "tensorrt": TRT_EP}
GPU_INSTALL_HINT = "install onnxruntime-gpu, which replaces onnxruntime: pip uninstall -y onnxruntime && pip install 'clipn-ood[gpu]'"

#: onnxruntime's CPU NCHWc layout pass crashes (segfault) on fp16 graphs at full optimisation (onnxruntime
#: 1.32); sessions for fp16 engines skip it. The exporter records this list in the manifest
#: (``onnxruntime_disabled_optimizers``); bundles without the record get it from :func:`disabled_optimizers_for`.
FP16_DISABLED_OPTIMIZERS: tuple[str, ...] = ("NchwcTransformer",)
#: Bundle-file meta key of the disabled onnxruntime optimisers.
DISABLED_OPTIMIZERS_KEY = "onnxruntime_disabled_optimizers"
#: The image engine's batch axis (the only dynamic axis of a closed-vocabulary engine).
BATCH_DIM = "batch"
#: onnxruntime's type strings for the dtypes the graphs use.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


class EngineError(UserError):
    """The engine cannot run here as asked; the message says why and what to do."""


class Engine(Protocol):
    """What every backend offers; the detector asks nothing else of it."""

    backend: str  # a key of BACKENDS: "onnxruntime", "tensorrt" or "openvino"
    path: Path | None  # the engine file (None: built from bytes)
    providers: tuple[str, ...]  # what actually runs the graph, best first
    fallback_notes: list[str]  # why a better provider is not running it (empty: none was left out)
    input_names: tuple[str, ...]  # inputs that must be fed
    optional_input_names: tuple[str, ...]  # inputs with a default value (an open-vocabulary engine's banks)
    output_names: tuple[str, ...]
    max_batch: int | None  # None: any batch size

    def input_specs(self) -> dict[str, TensorSpec]: ...

    def output_specs(self) -> dict[str, TensorSpec]: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


def is_openvino_device(device: str) -> bool:
    """``openvino`` or ``openvino:X``: the OpenVINO backend runs the engine."""
    return device == "openvino" or (device.startswith(OPENVINO_DEVICE_PREFIX) and len(device) > 9)


def check_device(device: str) -> None:
    """Refuse a device outside the runtime's vocabulary (:data:`DEVICES` and ``openvino:X``)."""
    if device not in DEVICES and not is_openvino_device(device):
        raise EngineError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)} or openvino:<device>")


def disabled_optimizers_for(precision: str | None) -> tuple[str, ...]:
    """The onnxruntime optimiser passes an engine of ``precision`` must skip (what the manifest records)."""
    return FP16_DISABLED_OPTIMIZERS if precision == "fp16" else ()


@dataclass(frozen=True)
class EngineSpec:
    """What to open: an engine file (or a serialized model) and what the bundle says about it.

    ``backend`` picks the class in :data:`BACKENDS`. ``disabled_optimizers`` ``None`` means what ``precision``
    needs. ``sha256`` identifies the engine (TensorRT EP cache folder; computed from the file when missing).
    ``max_batch``/``opt_batch`` bound the TensorRT EP's profile; ``inputs`` are the graph inputs the profile
    covers. ``tensorrt_ep=False`` leaves the TensorRT EP out (graphs run once per class list, for which a
    TensorRT build costs more than it saves). ``built_for``: a native plan's TensorRT version and GPU.
    ``inference_precision``: the OpenVINO backend's ``INFERENCE_PRECISION_HINT`` (``f32``/``bf16``; ``None``
    is f32, never OpenVINO's own default).
    """

    source: str | Path | bytes
    backend: str = "onnxruntime"
    precision: str | None = None
    disabled_optimizers: tuple[str, ...] | None = None
    sha256: str | None = None
    max_batch: int | None = None
    opt_batch: int | None = None
    inputs: tuple[TensorSpec, ...] = ()
    tensorrt_ep: bool = True
    built_for: Mapping[str, Any] | None = None
    inference_precision: str | None = None

    @classmethod
    def from_bundle(
        cls, bundle_dir: str | Path, entry: BundleFile, *, built_for: Mapping[str, Any] | None = None
    ) -> EngineSpec:
        """The spec of one manifest file entry (an ONNX engine, a text encoder or the TensorRT plan)."""
        meta = entry.meta
        disabled = meta.get(DISABLED_OPTIMIZERS_KEY)
        inputs = list(entry.inputs)
        # An open-vocabulary engine's banks are graph inputs with defaults (not in the manifest's signature)
        # whose class count is chosen at run time.
        inputs += [
            TensorSpec(name, ["classes", "dim"], "float32") for name in (meta.get("bank_inputs") or {}).values()
        ]
        profile = meta.get("profile") or {}
        return cls(
            source=Path(bundle_dir) / entry.path,
            backend="tensorrt" if entry.role == ROLE_TENSORRT else "onnxruntime",
            precision=entry.precision,
            disabled_optimizers=tuple(disabled) if disabled is not None else None,
            sha256=entry.sha256 or None,
            max_batch=meta.get("max_batch") or (profile.get("max") or [None])[0],
            opt_batch=(profile.get("opt") or [None])[0],
            inputs=tuple(inputs),
            built_for=built_for,
        )

    @property
    def path(self) -> Path | None:
        return None if isinstance(self.source, bytes) else Path(self.source)

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "<in-memory model>"

    def optimizers_off(self) -> tuple[str, ...]:
        if self.disabled_optimizers is not None:
            return self.disabled_optimizers
        return disabled_optimizers_for(self.precision)

    def identity(self) -> str:
        """The engine's sha256 (from the manifest, else computed)."""
        if self.sha256:
            return self.sha256
        if isinstance(self.source, bytes):
            import hashlib

            return hashlib.sha256(self.source).hexdigest()
        return sha256_file(self.source)


@dataclass(frozen=True)
class EngineOptions:
    """How to run an engine: ``device`` (:data:`DEVICES`), onnxruntime intra-op ``threads``, onnxruntime's own
    ``log_severity`` (0 verbose … 2 warning, its default … 4 fatal) and the root of the TensorRT EP engine
    caches (default ``<cache_root>/tensorrt``). The GPU is the first one the process sees: choose it with
    ``CUDA_VISIBLE_DEVICES``."""

    device: str = "auto"
    threads: int | None = None
    log_severity: int | None = None
    cache_dir: Path | None = None


# ---- onnxruntime -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderPlan:
    """The onnxruntime providers to ask for, in order, and why the better ones were left out."""

    providers: list[str]
    notes: list[str] = field(default_factory=list)


def available_providers() -> list[str]:
    """The execution providers of the installed onnxruntime build."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def plan_providers(device: str, available: Sequence[str], *, tensorrt_ep: bool = True) -> ProviderPlan:
    """Which providers to request for ``device`` given what onnxruntime offers.

    ``auto`` keeps TensorRT → CUDA → CPU in that order where available and notes each one missing; an explicit
    device that this build lacks is an :class:`EngineError` naming the fix. ``tensorrt_ep=False`` leaves the
    TensorRT EP out (``tensorrt`` then means CUDA).
    """
    check_device(device)
    if is_openvino_device(device):
        raise EngineError(f"--device {device} runs OpenVINO, not onnxruntime")
    if not tensorrt_ep:
        available = [p for p in available if p != TRT_EP]
        device = "cuda" if device == "tensorrt" else device
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
    gpu = (TRT_EP, CUDA_EP) if tensorrt_ep else (CUDA_EP,)
    providers = [ep for ep in gpu if ep in available] + [CPU_EP]
    missing = [ep for ep in gpu if ep not in available]
    notes = []
    if missing:
        hint = "; for a GPU install onnxruntime-gpu, which replaces onnxruntime" if CUDA_EP in missing else ""
        notes.append(f"{' and '.join(missing)} not in this onnxruntime build (it has {have}){hint}")
    return ProviderPlan(providers, notes)


def profile_options(spec: EngineSpec) -> dict[str, str]:
    """``trt_profile_min/opt/max_shapes`` for the TensorRT EP: batch 1 … ``spec.max_batch`` on each input.

    Empty when there is no max batch or an input has a dynamic axis other than the batch (the bank inputs of an
    open-vocabulary engine): the EP wants a profile for every dynamic input or none.
    """
    if not spec.max_batch or not spec.inputs:
        return {}
    hi = int(spec.max_batch)
    opt = int(spec.opt_batch) if spec.opt_batch else max(1, hi // 2)
    shapes: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for t in spec.inputs:
        rest = t.shape[1:]
        if not t.shape or t.shape[0] != BATCH_DIM or not all(isinstance(d, int) and d > 0 for d in rest):
            return {}
        for key, n in (("min", 1), ("opt", opt), ("max", hi)):
            shapes[key].append(f"{t.name}:" + "x".join(str(d) for d in (n, *rest)))
    return {f"trt_profile_{k}_shapes": ",".join(v) for k, v in shapes.items()}


def _tensorrt_ep_options(spec: EngineSpec, options: EngineOptions) -> dict[str, Any]:
    root = options.cache_dir if options.cache_dir is not None else cache_root() / "tensorrt"
    folder = Path(root) / spec.identity()
    ep: dict[str, Any] = {"trt_fp16_enable": False, **profile_options(spec)}
    try:
        # The EP creates at most one missing level of its cache path, so the whole path must exist first.
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("TensorRT engine cache off: cannot create %s (%s); engines are rebuilt each start", folder, e)
        return {**ep, "trt_engine_cache_enable": False}
    return {**ep, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder)}


def _spec_from_ort(arg: Any) -> TensorSpec:
    shape = [d if isinstance(d, (int, str)) else "?" for d in arg.shape]
    return TensorSpec(arg.name, shape, _ORT_TYPES.get(arg.type, arg.type))


class OrtEngine:
    """An onnxruntime session over one ONNX graph, with providers chosen by :func:`plan_providers`."""

    backend = "onnxruntime"

    def __init__(self, spec: EngineSpec, options: EngineOptions | None = None) -> None:
        self.spec = spec
        self.options = options or EngineOptions()
        self.path = spec.path
        self.precision = spec.precision
        self.threads = self.options.threads
        plan = plan_providers(self.options.device, available_providers(), tensorrt_ep=spec.tensorrt_ep)
        self.fallback_notes = list(plan.notes)
        self._trt_options = _tensorrt_ep_options(spec, self.options) if TRT_EP in plan.providers else {}
        self.session = self._start(plan.providers)
        self._note_dropped()
        inputs = self.session.get_inputs()
        self.input_names = tuple(i.name for i in inputs)
        #: Initialisers that are also graph inputs (the banks of an open-vocabulary engine): feeding is optional.
        self.optional_input_names = tuple(i.name for i in self.session.get_overridable_initializers())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        profiled = TRT_EP in self.providers and "trt_profile_max_shapes" in self._trt_options
        #: The TensorRT EP's profile bounds the batch; other providers take any batch.
        self.max_batch: int | None = spec.max_batch if profiled else None

    # -- session -------------------------------------------------------------------------------------------
    def _session_options(self) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.options.log_severity is not None:
            so.log_severity_level = self.options.log_severity
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        return so

    def _create(self, providers: list[str]) -> Any:
        import onnxruntime as ort

        source = self.spec.source if isinstance(self.spec.source, bytes) else str(self.spec.source)
        session = ort.InferenceSession(
            source,
            sess_options=self._session_options(),
            providers=providers,
            provider_options=[self._trt_options if p == TRT_EP else {} for p in providers],
            disabled_optimizers=list(self.spec.optimizers_off()) or None,
            enable_fallback=0,  # onnxruntime's fallback would drop the options above; ours keeps them
        )
        session.disable_fallback()  # builds whose constructor ignores enable_fallback: at least no run-time retry
        self._requested = list(providers)
        return session

    def _start(self, providers: list[str]) -> Any:
        try:
            return self._create(providers)
        except Exception as e:  # onnxruntime raises its own exception types (bad model, provider failure)
            if providers == [CPU_EP]:
                raise EngineError(f"{self.spec.name}: onnxruntime cannot load the engine: {e}") from None
            reason = f"onnxruntime could not start {', '.join(p for p in providers if p != CPU_EP)}: {e}"
            self._fall_back(reason)
            return self._start([CPU_EP])

    def _fall_back(self, reason: str, to: str = CPU_EP) -> None:
        """``auto``: note and log the reason, the caller continues on ``to``; an explicit device: refuse."""
        device = self.options.device
        if device not in ("auto", "cpu"):
            raise EngineError(f"--device {device}: {reason}; fix that or use --device auto/cpu")
        self.fallback_notes.append(reason)
        log.warning("falling back to %s: %s", to, reason)

    def _note_dropped(self) -> None:
        """onnxruntime silently leaves out a provider it cannot initialise (missing libraries): say so."""
        used = list(self.session.get_providers())
        self.providers = tuple(used)
        dropped = [p for p in self._requested if p not in used]
        if dropped:
            self._fall_back(
                f"onnxruntime could not initialise {', '.join(dropped)} (usually missing CUDA, cuDNN or TensorRT "
                "libraries, or no GPU visible; onnxruntime's own log above says which)",
                to=used[0],
            )

    # -- Engine ----------------------------------------------------------------------------------------------
    def input_specs(self) -> dict[str, TensorSpec]:
        """Graph inputs (symbolic dims as strings, dtypes as numpy names)."""
        return {i.name: _spec_from_ort(i) for i in self.session.get_inputs()}

    def output_specs(self) -> dict[str, TensorSpec]:
        return {o.name: _spec_from_ort(o) for o in self.session.get_outputs()}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

        try:
            outs = self.session.run(None, dict(feeds))
        except EPFail as e:  # a GPU provider failed on first use (e.g. out of memory while building)
            if self.providers == (CPU_EP,):
                raise
            self._fall_back(f"{self.providers[0]} failed while running: {e}")
            self.session = self._start([CPU_EP])
            self.providers = (CPU_EP,)
            self.max_batch = None
            outs = self.session.run(None, dict(feeds))
        return dict(zip(self.output_names, outs, strict=True))

    def describe(self) -> str:
        threads = f", {self.threads} threads" if self.threads else ""
        return f"onnxruntime {self.providers[0]} ({self.spec.name}, {self.precision or 'fp32'}{threads})"

    def close(self) -> None:
        # Dropping the session frees its memory (and GPU memory) deterministically.
        self.__dict__.pop("session", None)


def _source_bytes(spec: EngineSpec) -> bytes:
    return spec.source if isinstance(spec.source, bytes) else Path(spec.source).read_bytes()


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


class _Buffer:
    """One I/O tensor's persistent page-locked host buffer and device buffer, sized for the max batch.

    Async copies need page-locked host memory (pycuda's ``memcpy_*_async``), and the memory must stay valid
    until the stream is synchronised: both hold for buffers that live as long as the engine.
    """

    def __init__(self, cuda: Any, dtype: np.dtype[Any], count: int) -> None:
        self.dtype = dtype
        self.capacity = max(int(count), 1)
        self.host = cuda.pagelocked_empty(self.capacity, dtype)
        self.device = cuda.mem_alloc(self.capacity * dtype.itemsize)

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        return self.host[:n].reshape(shape)  # type: ignore[no-any-return]

    def free(self) -> None:
        self.device.free()
        del self.host


class TensorRTEngine:
    """A serialized TensorRT engine (``model.plan``) run through the named-tensor API and pycuda."""

    backend = "tensorrt"
    optional_input_names: tuple[str, ...] = ()

    def __init__(self, spec: EngineSpec, options: EngineOptions | None = None) -> None:
        try:
            import pycuda.driver as cuda
            import tensorrt as trt
        except ImportError as e:
            raise EngineError(
                f"the native TensorRT engine needs tensorrt and pycuda ({e}); pip install 'clipn-ood[tensorrt]' "
                "on a machine with an NVIDIA GPU, or use --device cuda/cpu (the ONNX engine)"
            ) from None
        self.spec = spec
        self.path: Path | None = spec.path
        self.fallback_notes: list[str] = []
        self._cuda, self._trt = cuda, trt
        dev, gpu_name, cc = self._gpu(cuda)
        problems = plan_problems(spec.built_for, trt.__version__, gpu_name, cc)
        if problems:
            raise EngineError(
                f"{self.spec.name} cannot run here: "
                + "; ".join(problems)
                + ". Rebuild it on this machine (clipn-export ... --tensorrt) or use --device cuda/cpu, which "
                "runs the bundle's ONNX engine"
            )
        self._buffers: dict[str, _Buffer] = {}
        self._ctx = self._cuda_call("cannot create a CUDA context", dev.make_context)
        try:
            self._load(trt, cuda)
            self.providers: tuple[str, ...] = (f"TensorRT {trt.__version__} on {gpu_name}",)
        except BaseException:
            self._ctx.pop()
            self.close()
            raise
        self._ctx.pop()

    def _gpu(self, cuda: Any) -> tuple[Any, str, str]:
        """The first visible GPU, its name and compute capability; EngineError when CUDA cannot start."""

        def probe() -> tuple[Any, str, str]:
            cuda.init()
            dev = cuda.Device(0)
            return dev, str(dev.name()), "{}.{}".format(*dev.compute_capability())

        return self._cuda_call("CUDA cannot start", probe)

    def _cuda_call(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, with pycuda's own errors (no GPU, no driver, out of memory) as an EngineError, so that
        ``--device auto`` falls back to the ONNX engine and ``--device tensorrt`` says why in one line."""
        try:
            return call()
        except Exception as e:
            raise EngineError(
                f"{self.spec.name}: {what} for the native TensorRT plan ({type(e).__name__}: {e}); check the GPU "
                "and its driver (nvidia-smi), or use --device cuda/cpu, which runs the bundle's ONNX engine"
            ) from None

    def _load(self, trt: Any, cuda: Any) -> None:
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._engine = trt.Runtime(self._trt_logger).deserialize_cuda_engine(_source_bytes(self.spec))
        if self._engine is None:
            raise EngineError(
                f"{self.spec.name}: TensorRT {trt.__version__} could not deserialize the plan (see the "
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
        self.max_batch: int | None = int(shapes[2][0])

    def _spec(self, name: str) -> TensorSpec:
        dims = [int(d) for d in self._engine.get_tensor_shape(name)]
        shape: list[int | str] = [d if d >= 0 else (BATCH_DIM if i == 0 else "?") for i, d in enumerate(dims)]
        return TensorSpec(name, shape, self._dtypes[name].name)

    def input_specs(self) -> dict[str, TensorSpec]:
        return {n: self._spec(n) for n in self.input_names}

    def output_specs(self) -> dict[str, TensorSpec]:
        return {n: self._spec(n) for n in self.output_names}

    def _buffer(self, name: str, shape: tuple[int, ...]) -> _Buffer:
        """The persistent buffer of ``name``, allocated once for the max batch (again only if a tensor outgrows
        it, which a per-sample size fixed by the plan rules out)."""
        count = int(np.prod(shape, dtype=np.int64))
        buf = self._buffers.get(name)
        if buf is None or buf.capacity < count:
            if buf is not None:
                buf.free()
            per_sample = count // shape[0] if shape and shape[0] else count
            buf = _Buffer(self._cuda, self._dtypes[name], max(count, per_sample * (self.max_batch or 1)))
            self._buffers[name] = buf
        return buf

    def _bind(self, name: str, buf: _Buffer) -> None:
        if not self._context.set_tensor_address(name, int(buf.device)):
            raise EngineError(f"{self.spec.name}: TensorRT refused the buffer of {name!r} (see the TensorRT log)")

    def _feed(self, name: str, value: np.ndarray) -> None:
        shape = tuple(int(d) for d in value.shape)
        if not self._context.set_input_shape(name, shape):
            raise EngineError(
                f"{self.spec.name}: TensorRT refused input {name!r} of shape {list(shape)}: the plan takes "
                f"batches of 1 to {self.max_batch} of {list(self._spec(name).shape[1:])} (see the TensorRT log)"
            )
        buf = self._buffer(name, shape)
        host = buf.view(shape)
        host[...] = value  # casts to the plan's dtype inside the page-locked buffer
        self._cuda.memcpy_htod_async(buf.device, host, self._stream)
        self._bind(name, buf)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._ctx.push()
        try:
            for name in self.input_names:
                self._feed(name, np.asarray(feeds[name]))
            shapes = {n: tuple(int(d) for d in self._context.get_tensor_shape(n)) for n in self.output_names}
            for name, shape in shapes.items():
                self._bind(name, self._buffer(name, shape))
            if not self._context.execute_async_v3(self._stream.handle):
                raise EngineError(f"{self.spec.name}: TensorRT execution failed (see the TensorRT log)")
            for name, shape in shapes.items():
                buf = self._buffers[name]
                self._cuda.memcpy_dtoh_async(buf.view(shape), buf.device, self._stream)
            self._stream.synchronize()
            # Copies: the page-locked buffers are reused by the next call.
            return {name: self._buffers[name].view(shape).copy() for name, shape in shapes.items()}
        finally:
            self._ctx.pop()

    def describe(self) -> str:
        return f"native {self.providers[0]} ({self.spec.name}, max batch {self.max_batch})"

    def close(self) -> None:
        """Release everything inside the CUDA context, newest first, then the context itself."""
        ctx = self.__dict__.pop("_ctx", None)
        if ctx is None:
            return
        ctx.push()
        try:
            stream = self.__dict__.pop("_stream", None)
            if stream is not None:
                stream.synchronize()  # no copy may still be reading or writing a buffer freed below
                del stream
            for buf in self._buffers.values():
                buf.free()
            self._buffers.clear()
            self.__dict__.pop("_context", None)
            self.__dict__.pop("_engine", None)
        finally:
            ctx.pop()
            ctx.detach()


# ---- the one constructor -------------------------------------------------------------------------------------


def _openvino_engine(spec: EngineSpec, options: EngineOptions) -> Engine:
    from clipn_runtime.ov_engine import OpenVinoEngine  # imported on use: openvino is an optional extra

    return OpenVinoEngine(spec, options)


#: Backend name (``EngineSpec.backend``) → class; a backend takes ``(EngineSpec, EngineOptions)``.
BACKENDS: dict[str, Callable[[EngineSpec, EngineOptions], Engine]] = {
    "onnxruntime": OrtEngine,
    "tensorrt": TensorRTEngine,
    "openvino": _openvino_engine,
}


def open_engine(
    spec: EngineSpec | str | Path | bytes,
    *,
    device: str = "auto",
    threads: int | None = None,
    log_severity: int | None = None,
    cache_dir: str | Path | None = None,
) -> Engine:
    """Open an engine: ``spec`` (or a bare ONNX path/bytes) on ``device`` with ``threads`` intra-op threads.

    An ONNX engine on an OpenVINO device (``openvino``, ``openvino:X``) goes to the OpenVINO backend."""
    if not isinstance(spec, EngineSpec):
        spec = EngineSpec(spec)
    check_device(device)
    if is_openvino_device(device) and spec.backend == "onnxruntime":
        spec = replace(spec, backend="openvino")
    try:
        backend = BACKENDS[spec.backend]
    except KeyError:
        raise EngineError(f"unknown engine backend {spec.backend!r}; known: {', '.join(BACKENDS)}") from None
    options = EngineOptions(device, threads, log_severity, Path(cache_dir) if cache_dir is not None else None)
    return backend(spec, options)
