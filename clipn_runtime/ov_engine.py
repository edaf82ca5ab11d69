"""The OpenVINO backend: a bundle's ONNX image engine compiled by OpenVINO (``--device openvino``).

On x86 CPUs OpenVINO runs the same ONNX file as onnxruntime, faster where it matters: bf16 on CPUs with
AVX-512 BF16 or AMX, and static int8 (a QDQ engine from ``clipn-export --int8 --calibration``) on VNNI/AMX.
The optional extra ``clipn-ood[openvino]`` installs it; it is imported only when this backend opens an engine.

Precision is never left to OpenVINO's default (bf16 on such CPUs): :class:`OpenVinoEngine` always sets
``INFERENCE_PRECISION_HINT`` to the hint of the numeric path the detector chose (one the export's parity gate
checked, see :mod:`clipn_runtime.engine_choice`) and refuses when the compiled model reports another one.

``CACHE_DIR`` (``<cache_root>/openvino``) keeps compiled blobs, so a second start of the same engine on the same
machine skips compilation; OpenVINO keys the cache by the model, the device and the configuration.
OpenVINO's other devices (Intel integrated GPUs, NPUs) are reached as ``--device openvino:GPU`` /
``openvino:NPU``; the parity gate runs on the CPU only, so those paths are unchecked (and untested here).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clipn_runtime.bundle import TensorSpec
from clipn_runtime.cache import cache_root
from clipn_runtime.engine import BATCH_DIM, EngineError, EngineOptions, EngineSpec

log = logging.getLogger(__name__)

#: ``--device openvino`` means OpenVINO's CPU plugin; ``openvino:X`` its device X.
DEFAULT_OV_DEVICE = "CPU"
#: OpenVINO's ``INFERENCE_PRECISION_HINT`` values this project uses (the names OpenVINO prints).
HINTS = ("f32", "bf16")
INSTALL_HINT = "pip install 'clipn-ood[openvino]'"


def ov_device(device: str) -> str:
    """OpenVINO's device name for a ``--device`` value: ``openvino`` → CPU, ``openvino:GPU`` → GPU."""
    _, _, name = device.partition(":")
    return name.upper() if name else DEFAULT_OV_DEVICE


def openvino_importable() -> bool:
    """True when the openvino package can be imported (without importing it now)."""
    import importlib.util

    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):  # a broken install, or an import hook refusing it
        return False


def _onednn_cap() -> str:
    """oneDNN's ISA cap from the environment (``ONEDNN_MAX_CPU_ISA``, else its old name), upper case; "" if none."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()


def onednn_cap_allows_bf16() -> bool:
    """False when ``ONEDNN_MAX_CPU_ISA`` (or its old name ``DNNL_MAX_CPU_ISA``) caps oneDNN below the ISAs with bf16
    kernels. OpenVINO's CPU plugin still reports BF16 then, but its bf16 layers fail to initialise or crash the
    process (OpenVINO 2026.4 on an AMX Xeon with ``ONEDNN_MAX_CPU_ISA=AVX2``: a segmentation fault), so a capped
    machine is treated as one without bf16."""
    cap = _onednn_cap()
    return cap in ("", "ALL", "DEFAULT") or any(isa in cap for isa in ("BF16", "FP16", "AMX", "AVX10"))


@functools.cache
def cpu_supports_bf16() -> bool:
    """OpenVINO's CPU plugin runs bf16 here (AVX-512 BF16 or AMX, not capped by ``ONEDNN_MAX_CPU_ISA``); False
    without openvino."""
    if not openvino_importable() or not onednn_cap_allows_bf16():
        return False
    import openvino as ov

    caps = ov.Core().get_property(DEFAULT_OV_DEVICE, "OPTIMIZATION_CAPABILITIES")
    return "BF16" in [str(c).upper() for c in caps]


def _element_type_name(t: Any) -> str:
    """An OpenVINO element type as the short name its hint property uses ("f32", "bf16")."""
    return str(getattr(t, "get_type_name", lambda: t)()).lower()


def _port_name(port: Any) -> str:
    """The graph-level name of an input/output port. OpenVINO keeps every tensor name that was merged into the
    port (after the fp16 engine's input Cast it also carries the Cast's output name) and ``get_any_name`` may
    return any of them; the ONNX graph's I/O names are plain identifiers, its inner names are ``/`` paths."""
    return min(port.get_names(), key=lambda n: ("/" in n, len(n), n))


_NUMPY_NAMES = {"f32": "float32", "f16": "float16", "f64": "float64", "u8": "uint8", "i8": "int8"}
_NUMPY_NAMES |= {"i32": "int32", "i64": "int64", "boolean": "bool"}


class OpenVinoEngine:
    """One ONNX image engine compiled by OpenVINO, run through a single infer request."""

    backend = "openvino"
    optional_input_names: tuple[str, ...] = ()
    max_batch: int | None = None

    def __init__(self, spec: EngineSpec, options: EngineOptions | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise EngineError(
                f"--device openvino needs OpenVINO ({e}); {INSTALL_HINT}, or use --device cpu"
            ) from None
        if spec.path is None:
            raise EngineError("the OpenVINO backend compiles engine files, not in-memory models")
        self.spec = spec
        self.options = options or EngineOptions(device="openvino")
        self.path: Path | None = spec.path
        self.precision = spec.precision
        self.fallback_notes: list[str] = []
        self.device = ov_device(self.options.device)
        self.hint = spec.inference_precision or "f32"
        if self.hint not in HINTS:
            raise EngineError(
                f"unknown OpenVINO inference precision {self.hint!r}; choose one of {', '.join(HINTS)}"
            )
        if self.hint == "bf16" and self.device == DEFAULT_OV_DEVICE and not onednn_cap_allows_bf16():
            raise EngineError(
                f"OpenVINO cannot run bf16 with oneDNN capped at {_onednn_cap()} (ONEDNN_MAX_CPU_ISA): its bf16 layers would "
                "crash; unset the variable or use --precision fp32 or int8"
            )
        core = ov.Core()
        self._set_cache(core)
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.hint, "PERFORMANCE_HINT": "LATENCY"}
        if self.options.threads and self.device == DEFAULT_OV_DEVICE:
            config["INFERENCE_NUM_THREADS"] = int(self.options.threads)
        try:
            # Compiling from the path (not a read model) lets OpenVINO import a cached blob without reading the
            # ONNX file at all.
            self._compiled = core.compile_model(str(spec.path), self.device, config)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EngineError(
                f"OpenVINO cannot compile {spec.name} for {self.device}: {first}; use --device cpu (onnxruntime)"
            ) from None
        got = _element_type_name(self._compiled.get_property("INFERENCE_PRECISION_HINT"))
        if self.device == DEFAULT_OV_DEVICE and got != self.hint:
            # The CPU plugin silently runs f32 when asked for bf16 on a CPU without it: a path nobody checked.
            raise EngineError(
                f"OpenVINO runs {spec.name} in {got} on this CPU, not the {self.hint} that was asked for "
                "(no bf16 support here); use --precision fp32 or int8"
            )
        self._request = self._compiled.create_infer_request()
        self.input_names = tuple(_port_name(p) for p in self._compiled.inputs)
        self.output_names = tuple(_port_name(p) for p in self._compiled.outputs)
        self.providers: tuple[str, ...] = (f"OpenVINO {ov.get_version().split('-')[0]} {self.device}",)

    def _set_cache(self, core: Any) -> None:
        root = self.options.cache_dir if self.options.cache_dir is not None else cache_root() / "openvino"
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning("OpenVINO model cache off: cannot create %s (%s); each start compiles again", root, e)
            return
        core.set_property({"CACHE_DIR": str(root)})

    @staticmethod
    def _spec(port: Any) -> TensorSpec:
        shape: list[int | str] = []
        for i, d in enumerate(port.get_partial_shape()):
            shape.append(d.get_length() if d.is_static else (BATCH_DIM if i == 0 else "?"))
        t = _element_type_name(port.get_element_type())
        return TensorSpec(_port_name(port), shape, _NUMPY_NAMES.get(t, t))

    def input_specs(self) -> dict[str, TensorSpec]:
        return {_port_name(p): self._spec(p) for p in self._compiled.inputs}

    def output_specs(self) -> dict[str, TensorSpec]:
        return {_port_name(p): self._spec(p) for p in self._compiled.outputs}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        unknown = sorted(set(feeds) - set(self.input_names))
        if unknown:
            # OpenVINO folds an ONNX initialiser that is also an input (an open-vocabulary engine's banks) into a
            # constant: a bank fed here would be ignored, and the scores would belong to the baked class list.
            raise EngineError(
                f"the OpenVINO engine has no input {', '.join(map(repr, unknown))} (inputs: "
                f"{', '.join(self.input_names)}); run open-vocabulary class lists with --device cpu"
            )
        result = self._request.infer({n: np.ascontiguousarray(feeds[n]) for n in self.input_names})
        # The request reuses its output buffers on the next call: copy.
        return {_port_name(p): np.array(result[p], copy=True) for p in self._compiled.outputs}

    def describe(self) -> str:
        threads = f", {self.options.threads} threads" if self.options.threads else ""
        return f"{self.providers[0]} ({self.spec.name}, {self.precision or 'fp32'}, hint {self.hint}{threads})"

    def close(self) -> None:
        self.__dict__.pop("_request", None)
        self.__dict__.pop("_compiled", None)
