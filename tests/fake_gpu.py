"""Fakes of the GPU libraries clipn-ood calls, faithful to their documented contracts, for machines without a GPU.

* :func:`fake_tensorrt` builds a ``tensorrt`` module for 10.x or 11.x with only the attributes that version has
  (checked against NVIDIA/TensorRT's Python bindings, ``python/src/infer/pyCore.cpp``/``pyGraph.cpp``: 10.16.1 at
  5302b288 and 11.1 at 82d1dca8). 11 has no ``BuilderFlag.FP16``/``INT8``/``OBEY_PRECISION_CONSTRAINTS``, no
  ``ILayer.precision``/``set_output_type``, no ``Builder.platform_has_fast_fp16``, no
  ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``, and its ``STRONGLY_TYPED`` is bit 0 (10: bit 1), deprecated
  and ignored because every 11.x network is strongly typed. A strongly typed network refuses precision flags
  and per-layer precisions (the build fails, as TensorRT's does). The builder records what it was asked; a plan
  is JSON naming the ONNX file it came from, and its execution context really computes: it runs that ONNX with
  onnxruntime on CPU, reading and writing the fake device memory.
* :func:`fake_pycuda` builds ``pycuda.driver``: contexts with a current-context stack, device allocations,
  page-locked host arrays, streams whose async copies and kernels run at ``synchronize()``. As pycuda documents,
  ``memcpy_htod_async`` needs a page-locked source and ``memcpy_dtoh_async`` a page-locked destination (CUDA
  itself silently degrades pageable async copies to synchronous ones; the fake refuses them, as pycuda's contract
  says). Events (stream released, context detached, …) are recorded in order.
* :class:`FakeOrt` replaces ``onnxruntime.InferenceSession`` as onnxruntime-gpu behaves where a GPU provider
  fails, including onnxruntime's own fallback (``onnxruntime_inference_collection.py`` of 1.32: on a provider
  error, unless ``enable_fallback=0``, it retries with CPU and drops the provider options and the disabled
  optimisers), and records every session it was asked for.
"""

from __future__ import annotations

import base64
import enum
import importlib.machinery
import json
import sys
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

GPU_NAME = "NVIDIA Fake GPU"
COMPUTE_CAPABILITY = (8, 9)
_PLAN_MAGIC = "fake-tensorrt-plan"
_CACHE_MAGIC = b"FAKE-TRT-TIMING-CACHE "


#: The functional enum API, with members only known at run time (per TensorRT version).
_ENUM: Any = enum.Enum
_INT_ENUM: Any = enum.IntEnum


class FakeCudaError(RuntimeError):
    """What pycuda raises (``pycuda._driver.LogicError``) for a misuse of the driver API."""


# ---- pycuda.driver -----------------------------------------------------------------------------------------


@dataclass
class GPUState:
    """The fake GPU: device memory, live page-locked host arrays, the context stack and an event log."""

    memory: dict[int, bytearray] = field(default_factory=dict)
    pinned: list[weakref.ref[np.ndarray]] = field(default_factory=list)
    contexts: list[Any] = field(default_factory=list)
    streams: dict[int, weakref.ref[Any]] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    pinned_allocations: int = 0
    device_allocations: int = 0
    next_address: int = 0x10000

    def current(self) -> Any:
        if not self.contexts or not self.contexts[-1].alive:
            raise FakeCudaError("invalid device context: no current CUDA context")
        return self.contexts[-1]

    def is_pinned(self, a: Any) -> bool:
        if not isinstance(a, np.ndarray):
            return False
        start = a.__array_interface__["data"][0]
        for ref in self.pinned:
            base = ref()
            if base is None:
                continue
            b0 = base.__array_interface__["data"][0]
            if b0 <= start and start + a.nbytes <= b0 + base.nbytes:
                return True
        return False


def fake_pycuda(gpu: GPUState) -> types.ModuleType:
    cuda: Any = types.ModuleType("pycuda.driver")

    class Context:
        def __init__(self) -> None:
            self.alive = True

        def push(self) -> None:
            if not self.alive:
                raise FakeCudaError("context was detached")
            gpu.contexts.append(self)

        def pop(self) -> None:  # pycuda pops the current context, whichever it is
            if not gpu.contexts:
                raise FakeCudaError("no context to pop")
            gpu.contexts.pop()

        def detach(self) -> None:
            self.alive = False
            gpu.contexts[:] = [c for c in gpu.contexts if c is not self]
            gpu.events.append("context detached")

    class Device:
        def __init__(self, index: int) -> None:
            if index != 0:
                raise FakeCudaError(f"invalid device ordinal {index}")

        def name(self) -> str:
            return GPU_NAME

        def compute_capability(self) -> tuple[int, int]:
            return COMPUTE_CAPABILITY

        def make_context(self) -> Context:
            ctx = Context()
            gpu.contexts.append(ctx)  # pycuda makes the new context current
            return ctx

    class DeviceAllocation:
        def __init__(self, nbytes: int) -> None:
            gpu.current()
            self.address = gpu.next_address
            gpu.next_address += nbytes + 256
            gpu.memory[self.address] = bytearray(nbytes)
            gpu.device_allocations += 1

        def __int__(self) -> int:
            return self.address

        def free(self) -> None:
            gpu.current()
            gpu.memory.pop(self.address, None)

    class Stream:
        _next = 1

        def __init__(self) -> None:
            gpu.current()
            self.handle = Stream._next
            Stream._next += 1
            self.queue: list[Any] = []
            gpu.streams[self.handle] = weakref.ref(self)

        def synchronize(self) -> None:
            gpu.current()
            queue, self.queue = self.queue, []
            for op in queue:
                op()

        def __del__(self) -> None:
            current = bool(gpu.contexts) and gpu.contexts[-1].alive
            gpu.events.append(f"stream released ({'context current' if current else 'NO CONTEXT'})")

    def pagelocked_empty(shape: Any, dtype: Any) -> np.ndarray:
        gpu.current()
        a = np.zeros(shape, dtype)
        gpu.pinned.append(weakref.ref(a))
        gpu.pinned_allocations += 1
        return a

    def _device(dest: Any, nbytes: int) -> memoryview:
        mem = gpu.memory.get(int(dest))
        if mem is None or len(mem) < nbytes:
            raise FakeCudaError("invalid device pointer or copy past the allocation")
        return memoryview(mem)[:nbytes]

    def memcpy_htod_async(dest: Any, src: Any, stream: Any = None) -> None:
        if not gpu.is_pinned(src):
            raise FakeCudaError("memcpy_htod_async: src must be page-locked memory (pagelocked_empty)")
        gpu.current()

        def op() -> None:
            _device(dest, src.nbytes)[:] = np.ascontiguousarray(src).tobytes()

        stream.queue.append(op)

    def memcpy_dtoh_async(dest: Any, src: Any, stream: Any = None) -> None:
        if not gpu.is_pinned(dest):
            raise FakeCudaError("memcpy_dtoh_async: dest must be page-locked memory (pagelocked_empty)")
        gpu.current()

        def op() -> None:
            dest[...] = np.frombuffer(bytes(_device(src, dest.nbytes)), dest.dtype).reshape(dest.shape)

        stream.queue.append(op)

    cuda.init = lambda: None
    cuda.Device = Device
    cuda.Context = Context
    cuda.Stream = Stream
    cuda.mem_alloc = DeviceAllocation
    cuda.pagelocked_empty = pagelocked_empty
    cuda.memcpy_htod_async = memcpy_htod_async
    cuda.memcpy_dtoh_async = memcpy_dtoh_async
    return cuda


# ---- tensorrt ----------------------------------------------------------------------------------------------

_BUILDER_FLAGS_10 = (
    "FP16 BF16 INT8 DEBUG GPU_FALLBACK REFIT DISABLE_TIMING_CACHE EDITABLE_TIMING_CACHE TF32 SPARSE_WEIGHTS "
    "SAFETY_SCOPE OBEY_PRECISION_CONSTRAINTS PREFER_PRECISION_CONSTRAINTS DIRECT_IO REJECT_EMPTY_ALGORITHMS "
    "VERSION_COMPATIBLE EXCLUDE_LEAN_RUNTIME FP8 ERROR_ON_TIMING_CACHE_MISS DISABLE_COMPILATION_CACHE WEIGHTLESS "
    "STRIP_PLAN REFIT_IDENTICAL WEIGHT_STREAMING INT4 REFIT_INDIVIDUAL STRICT_NANS MONITOR_MEMORY FP4 "
    "DISTRIBUTIVE_INDEPENDENCE"
)
_BUILDER_FLAGS_11 = (
    "DEBUG GPU_FALLBACK REFIT DISABLE_TIMING_CACHE EDITABLE_TIMING_CACHE TF32 SPARSE_WEIGHTS SAFETY_SCOPE "
    "DIRECT_IO VERSION_COMPATIBLE EXCLUDE_LEAN_RUNTIME ERROR_ON_TIMING_CACHE_MISS DISABLE_COMPILATION_CACHE "
    "STRIP_PLAN REFIT_IDENTICAL WEIGHT_STREAMING REFIT_INDIVIDUAL STRICT_NANS MONITOR_MEMORY "
    "DISTRIBUTIVE_INDEPENDENCE"
)
#: Flags that ask for weak typing (reduced precision chosen by the builder): refused with strong typing.
_WEAK_TYPING = {
    "FP16",
    "BF16",
    "INT8",
    "FP8",
    "INT4",
    "FP4",
    "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS",
}
_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT8: "int8",
}


@dataclass
class BuildLog:
    """What the fake builder was asked for (tests read it)."""

    parsed: list[str] = field(default_factory=list)
    network_flags: list[int] = field(default_factory=list)
    strongly_typed: list[bool] = field(default_factory=list)
    flags_set: list[str] = field(default_factory=list)
    layer_precisions_set: int = 0
    errors: list[str] = field(default_factory=list)
    builds: int = 0


def _tensors(values: Any, skip: set[str]) -> list[dict[str, Any]]:
    out = []
    for v in values:
        if v.name in skip:
            continue
        t = v.type.tensor_type
        shape = [d.dim_value if d.dim_value > 0 else -1 for d in t.shape.dim]
        out.append({"name": v.name, "dtype": _ONNX_DTYPES[t.elem_type], "shape": shape})
    return out


def fake_tensorrt(version: str, gpu: GPUState, build_log: BuildLog | None = None) -> types.ModuleType:
    """A ``tensorrt`` module of ``version`` (10.x or 11.x) on the fake GPU ``gpu``."""
    major = int(version.split(".")[0])
    if major not in (10, 11):
        raise ValueError("the fake knows TensorRT 10 and 11")
    blog = build_log if build_log is not None else BuildLog()
    trt: Any = types.ModuleType("tensorrt")
    trt.__version__ = version

    class DataType(enum.Enum):
        FLOAT = "float32"
        HALF = "float16"
        INT8 = "int8"
        INT32 = "int32"
        INT64 = "int64"
        BOOL = "bool"
        UINT8 = "uint8"

    by_name = {d.value: d for d in DataType}
    for attr, d in (("float32", "float32"), ("float16", "float16"), ("int8", "int8"), ("int32", "int32"),
                    ("int64", "int64"), ("bool", "bool"), ("uint8", "uint8")):  # fmt: skip
        setattr(trt, attr, by_name[d])
    trt.DataType = DataType
    trt.nptype = lambda t: np.dtype(t.value).type
    trt.TensorIOMode = _ENUM("TensorIOMode", "NONE INPUT OUTPUT")
    trt.MemoryPoolType = _ENUM("MemoryPoolType", "WORKSPACE DLA_MANAGED_SRAM DLA_LOCAL_DRAM")
    flags = _BUILDER_FLAGS_10 if major == 10 else _BUILDER_FLAGS_11
    trt.BuilderFlag = _INT_ENUM("BuilderFlag", flags, start=0)
    creation = (
        {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2, "PREFER_AOT_PYTHON_PLUGINS": 3}
        if major == 10
        else {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2}
    )
    trt.NetworkDefinitionCreationFlag = _INT_ENUM("NetworkDefinitionCreationFlag", creation)

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, min_severity: int = 2) -> None:
            self.min_severity = min_severity

    trt.Logger = Logger

    class ITensor:
        def __init__(self, d: dict[str, Any]) -> None:
            self.name, self.dtype, self.shape = d["name"], by_name[d["dtype"]], tuple(d["shape"])

    class ILayer11:
        def __init__(self, network: Any, node: onnx.NodeProto) -> None:
            self.name = node.name
            self.network = network
            self.num_outputs = len(node.output)
            self._outputs = [ITensor({"name": o, "dtype": "float32", "shape": []}) for o in node.output]

        def get_output(self, i: int) -> Any:
            return self._outputs[i]

        def get_output_type(self, i: int) -> Any:
            return self._outputs[i].dtype

    class ILayer10(ILayer11):
        """TensorRT 10's layer: per-layer precision (deprecated in 10.12, refused with strong typing)."""

        def _weak(self) -> None:
            blog.layer_precisions_set += 1
            if self.network.strongly_typed:
                blog.errors.append(
                    f"{self.name}: setting layer precision is not allowed in a strongly typed network"
                )

        @property
        def precision(self) -> Any:
            return DataType.FLOAT

        @precision.setter
        def precision(self, value: Any) -> None:
            self._weak()

        def set_output_type(self, i: int, dtype: Any) -> None:
            self._weak()

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            st = trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
            self.strongly_typed = major >= 11 or bool(flags & (1 << int(st)))
            self.inputs: list[ITensor] = []
            self.outputs: list[ITensor] = []
            self.layers: list[Any] = []
            self.onnx_path = ""
            self.onnx_bytes = b""

        num_layers = property(lambda self: len(self.layers))
        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_layer(self, i: int) -> Any:
            return self.layers[i]

        def get_input(self, i: int) -> Any:
            return self.inputs[i]

        def get_output(self, i: int) -> Any:
            return self.outputs[i]

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Any) -> None:
            self.network = network
            self.num_errors = 0

        def get_error(self, i: int) -> str:
            return "no error"

        def parse_from_file(self, path: str) -> bool:
            model = onnx.load(path, load_external_data=False)
            inits = {i.name for i in model.graph.initializer}
            net = self.network
            net.onnx_path = str(Path(path).resolve())
            net.onnx_bytes = Path(path).read_bytes()
            net.inputs = [ITensor(d) for d in _tensors(model.graph.input, inits)]
            net.outputs = [ITensor(d) for d in _tensors(model.graph.output, set())]
            layer = ILayer10 if major == 10 else ILayer11
            net.layers = [layer(net, n) for n in model.graph.node]
            blog.parsed.append(net.onnx_path)
            return True

    class TimingCache:
        def __init__(self, key: bytes) -> None:
            self.key = key

        def serialize(self) -> bytes:
            return _CACHE_MAGIC + self.key

    device_key = f"{version} sm{COMPUTE_CAPABILITY[0]}{COMPUTE_CAPABILITY[1]}".encode()

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, list[list[int]]] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class IBuilderConfig:
        def __init__(self) -> None:
            self.flags: set[Any] = set()
            self.profiles: list[IOptimizationProfile] = []
            self.cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            pass

        def set_flag(self, flag: Any) -> None:
            self.flags.add(flag)
            blog.flags_set.append(flag.name)

        def clear_flag(self, flag: Any) -> None:
            self.flags.discard(flag)

        def get_flag(self, flag: Any) -> bool:
            return flag in self.flags

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache | None:
            if not data:
                return TimingCache(device_key)
            if not bytes(data).startswith(_CACHE_MAGIC):
                return None  # TensorRT logs a deserialisation error and returns None
            return TimingCache(bytes(data)[len(_CACHE_MAGIC) :])

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if cache.key != device_key and not ignore_mismatch:
                return False  # made by another TensorRT version or GPU
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            net = INetworkDefinition(flags)
            blog.network_flags.append(flags)
            blog.strongly_typed.append(net.strongly_typed)
            return net

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
            blog.builds += 1
            weak = sorted(f.name for f in config.flags if f.name in _WEAK_TYPING)
            if network.strongly_typed and weak:
                blog.errors.append(f"precision flags {weak} are not allowed with a strongly typed network")
            profile = config.profiles[0].shapes if config.profiles else {}
            dynamic = [t.name for t in network.inputs if -1 in t.shape and t.name not in profile]
            if dynamic:
                blog.errors.append(f"dynamic inputs {dynamic} have no optimisation profile")
            if blog.errors:
                return None
            plan = {
                "magic": _PLAN_MAGIC,
                "version": version,
                "onnx": network.onnx_path,
                # a plan carries its weights: the graph itself, so that it runs wherever it is copied
                "graph": base64.b64encode(network.onnx_bytes).decode(),
                "strongly_typed": network.strongly_typed,
                "inputs": [
                    {"name": t.name, "dtype": t.dtype.value, "shape": list(t.shape)} for t in network.inputs
                ],
                "outputs": [
                    {"name": t.name, "dtype": t.dtype.value, "shape": list(t.shape)} for t in network.outputs
                ],
                "profile": profile,
            }
            return json.dumps(plan).encode()

    if major == 10:  # removed in 11 (strong typing instead of asking the platform)
        setattr(Builder, "platform_has_fast_fp16", property(lambda self: True))  # noqa: B010

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            spec = self.engine.specs.get(name)
            shape = tuple(int(d) for d in shape)
            if spec is None or name not in self.engine.plan["profile"] or len(shape) != len(spec["shape"]):
                return False
            lo, _, hi = self.engine.plan["profile"][name]
            if any(not a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
                return False  # TensorRT logs "… outside the optimization profile" and refuses
            self.shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            if name in self.shapes:
                return self.shapes[name]
            shape = list(self.engine.specs[name]["shape"])
            batch = next(iter(self.shapes.values()), (-1,))[0]
            return tuple(batch if d == -1 and i == 0 else d for i, d in enumerate(shape))

        def set_tensor_address(self, name: str, address: int) -> bool:
            if name not in self.engine.specs or int(address) not in gpu.memory:
                return False
            self.addresses[name] = int(address)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            names = [t["name"] for t in self.engine.plan["inputs"]]
            if any(n not in self.shapes for n in names) or set(self.addresses) != set(self.engine.specs):
                return False
            stream = gpu.streams[stream_handle]()
            assert stream is not None, "execute_async_v3 on a released stream"
            shapes = {n: self.shapes[n] for n in names}
            addresses = dict(self.addresses)
            stream.queue.append(lambda: self.engine.compute(shapes, addresses))
            return True

    class ICudaEngine:
        def __init__(self, plan: dict[str, Any]) -> None:
            self.plan = plan
            self.specs = {t["name"]: t for t in plan["inputs"] + plan["outputs"]}
            self.inputs = {t["name"] for t in plan["inputs"]}
            self._session: Any = None

        num_io_tensors = property(lambda self: len(self.specs))

        def get_tensor_name(self, i: int) -> str:
            return list(self.specs)[i]

        def get_tensor_mode(self, name: str) -> Any:
            io = trt.TensorIOMode
            return io.INPUT if name in self.inputs else io.OUTPUT

        def get_tensor_dtype(self, name: str) -> Any:
            return by_name[self.specs[name]["dtype"]]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return tuple(self.specs[name]["shape"])

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
            return [tuple(s) for s in self.plan["profile"][name]]

        def create_execution_context(self) -> IExecutionContext:
            return IExecutionContext(self)

        def compute(self, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int]) -> None:
            """The kernels: the plan's ONNX graph in onnxruntime (CPU), on the bytes in device memory."""
            import onnxruntime as ort

            if self._session is None:
                self._session = ort.capi.onnxruntime_inference_collection.InferenceSession(
                    base64.b64decode(self.plan["graph"]),
                    providers=["CPUExecutionProvider"],
                    disabled_optimizers=["NchwcTransformer"],
                )
            feeds = {}
            for name, shape in shapes.items():
                dtype = np.dtype(self.specs[name]["dtype"])
                n = int(np.prod(shape)) * dtype.itemsize
                feeds[name] = np.frombuffer(bytes(gpu.memory[addresses[name]][:n]), dtype).reshape(shape)
            outs = self._session.run(None, feeds)
            for spec, value in zip(self.plan["outputs"], outs, strict=True):
                data = np.ascontiguousarray(value, dtype=spec["dtype"]).tobytes()
                gpu.memory[addresses[spec["name"]]][: len(data)] = data

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: Any) -> ICudaEngine | None:
            try:
                plan = json.loads(bytes(data))
            except ValueError:
                return None
            if plan.get("magic") != _PLAN_MAGIC or plan.get("version") != version:
                return None  # TensorRT: "The engine plan file is not compatible with this version"
            return ICudaEngine(plan)

    for cls in (Builder, OnnxParser, Runtime, ITensor, INetworkDefinition, IBuilderConfig, IOptimizationProfile,
                IExecutionContext, ICudaEngine):  # fmt: skip
        setattr(trt, cls.__name__, cls)
    trt.ILayer = ILayer10 if major == 10 else ILayer11
    trt.ITimingCache = TimingCache
    trt.build_log = blog  # the fake's record, not TensorRT API
    return trt


@dataclass
class FakeGPU:
    """A fake TensorRT ``version`` and pycuda on one fake GPU, installed into ``sys.modules``."""

    trt: types.ModuleType
    cuda: types.ModuleType
    state: GPUState
    build: BuildLog


def install_fake_gpu(monkeypatch: pytest.MonkeyPatch, version: str) -> FakeGPU:
    """Put fake ``tensorrt`` (``version``) and ``pycuda.driver`` into ``sys.modules`` for this test."""
    state, blog = GPUState(), BuildLog()
    trt = fake_tensorrt(version, state, blog)
    cuda = fake_pycuda(state)
    pycuda: Any = types.ModuleType("pycuda")
    pycuda.driver = cuda
    pycuda.__path__ = []  # a package, so that importlib finds pycuda.driver
    for module in (trt, pycuda, cuda):  # importlib.util.find_spec (tensorrt_importable) reads __spec__
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    return FakeGPU(trt, cuda, state, blog)


# ---- onnxruntime-gpu ---------------------------------------------------------------------------------------


@dataclass
class SessionCall:
    """One ``InferenceSession(...)`` onnxruntime was asked for (or made itself, falling back)."""

    source: str
    providers: list[str]
    provider_options: list[dict[str, Any]]
    disabled_optimizers: list[str] | None
    threads: int
    by_onnxruntime: bool = False
    cache_dir_existed: bool | None = None


class FakeOrt:
    """``onnxruntime.InferenceSession`` of onnxruntime-gpu on a machine where the GPU providers fail.

    ``fail``: ``"create"`` (the provider cannot start: session creation raises ``error``), ``"run"`` (it starts,
    then fails on the first run with ``EPFail``) or ``None`` (it runs; the session computes on CPU but reports
    the providers it was given). Sessions compute with onnxruntime's CPU provider and always skip
    ``NchwcTransformer`` (whatever was asked: a session without it would crash this test process on fp16 graphs;
    what was asked is in :attr:`calls`).
    """

    GPU = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

    def __init__(
        self, fail: str | None = None, error: str = "CUDA failure 100: no CUDA-capable device is detected"
    ):
        self.fail, self.error = fail, error
        self.calls: list[SessionCall] = []

    def _record(
        self, source: Any, providers: list[str], provider_options: Any, disabled: Any, so: Any, by_ort: bool
    ) -> None:
        opts = [dict(o) for o in (provider_options or [{} for _ in providers])]
        trt = next((o for p, o in zip(providers, opts, strict=True) if p == "TensorrtExecutionProvider"), {})
        cache = trt.get("trt_engine_cache_path")
        existed = Path(cache).is_dir() if cache else None
        threads = so.intra_op_num_threads if so is not None else 0
        name = "<bytes>" if isinstance(source, bytes) else Path(source).name
        call = SessionCall(
            name, list(providers), opts, list(disabled) if disabled else None, threads, by_ort, existed
        )
        self.calls.append(call)

    def InferenceSession(
        self, path_or_bytes: Any, sess_options: Any = None, providers: Any = None, provider_options: Any = None,
        **kwargs: Any,
    ) -> Any:  # fmt: skip
        fake = self
        providers = list(providers or ["CPUExecutionProvider"])
        fallback = int(kwargs.get("enable_fallback", 1)) == 1
        self._record(
            path_or_bytes, providers, provider_options, kwargs.get("disabled_optimizers"), sess_options, False
        )
        gpu_used = any(p in self.GPU for p in providers)
        if gpu_used and self.fail == "create":
            if not fallback:
                raise RuntimeError(self.error)
            # onnxruntime's own fallback: CPU, with neither the provider options nor the disabled optimisers
            self._record(path_or_bytes, ["CPUExecutionProvider"], None, None, sess_options, True)
            providers = ["CPUExecutionProvider"]

        import onnxruntime as ort

        real = ort.capi.onnxruntime_inference_collection.InferenceSession(
            path_or_bytes,
            sess_options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=["NchwcTransformer"],
        )

        class Session:
            def __init__(self) -> None:
                self.providers = providers
                self.enable_fallback = fallback
                self.failing = gpu_used and fake.fail == "run"

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def get_providers(self) -> list[str]:
                return list(self.providers)

            def disable_fallback(self) -> None:
                self.enable_fallback = False

            def run(self, output_names: Any, feeds: Any, run_options: Any = None) -> Any:
                if self.failing:
                    from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

                    if not self.enable_fallback:
                        raise EPFail(fake.error)
                    # onnxruntime's run-time fallback: set_providers(CPU) recreates the session without options
                    fake._record(path_or_bytes, ["CPUExecutionProvider"], None, None, sess_options, True)
                    self.failing, self.providers = False, ["CPUExecutionProvider"]
                return real.run(output_names, feeds, run_options)

        return Session()
