"""Which engine of a bundle runs, on which backend, at which precision: a numeric path the parity gate checked.

A *numeric path* is an engine file (its precision: fp32, fp16, int8) run by a backend (onnxruntime, or
OpenVINO with an inference-precision hint, f32 or bf16). Two paths over the same file can compute different
numbers: OpenVINO on a CPU with bf16 runs an fp32 file in bf16 unless told otherwise. ``clipn-export`` runs its
parity gate on every path it can run on the export machine and records each one in the manifest
(``parity.paths``, keyed by :attr:`NumericPath.key`); :func:`choose_path` only returns a path that passed there.

Defaults, fastest first. The order is fixed, not timed per run; it follows the ViT-B-16 measurements of
docs/benchmarks.md (2 threads, batch 8) on the CPUs the project has had, and OpenVINO comes first only where it
was the faster engine:

* a CPU (``auto`` with no GPU, ``openvino``):

  1. a **static** int8 file (calibrated at export) on OpenVINO, bf16 hint before f32, where the CPU has an int8
     dot product (VNNI or AMX). Intel Xeon with AMX: 53.0 images/s against 32.1 for onnxruntime's dynamic int8.
  2. with AMX only, the fp32 file on OpenVINO with the bf16 hint: AMX runs bf16 at about 4× fp32, faster than
     onnxruntime's dynamic int8 (35.7 images/s against 32.1).
  3. the int8 file on onnxruntime, static or dynamic.
  4. the fp32 file: OpenVINO bf16 (where this CPU runs bf16), OpenVINO f32, onnxruntime; then the fp16 file
     likewise.
  5. last, OpenVINO on an int8 file it runs slowly: a dynamic one on any CPU (its per-batch quantisation ran at
     6.4 images/s on the AMX Xeon, below the fp32 engines), a static one without VNNI/AMX (AMD EPYC Zen 1: 0.90
     against 1.80 for onnxruntime's).

  ``cpu`` is onnxruntime only.
* a GPU (``cuda``, ``tensorrt``, ``auto`` when onnxruntime has the CUDA provider): fp16, fp32, then int8 files on
  onnxruntime (its dynamic int8 runs on the CPU provider only).

The user's precision (``fp32``/``bf16``/``fp16``/``int8``; bf16 = the fp32 file on OpenVINO with the bf16 hint)
narrows the candidates. When none of them passed the gate the choice is refused with the reason, unless
``allow_unchecked``: then the first candidate runs and the choice says so (a warning, never silence).
Bundles written before paths were recorded count their onnxruntime engines (``parity.engines``) as checked;
bundles exported with no gate at all run on onnxruntime as before, with a warning.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clipn_runtime.bundle import BundleError, BundleFile, Manifest

ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
#: What ``--precision`` accepts: the engine files' precisions and bf16 (OpenVINO's hint on the fp32 file).
RUNTIME_PRECISIONS = ("fp32", "bf16", "fp16", "int8")
NO_GATE = "the bundle was exported without clipn-export's parity gate"
_GPU_FILES = ("fp16", "fp32", "int8")


@dataclass(frozen=True)
class NumericPath:
    """An engine file's precision × backend × OpenVINO inference-precision hint (``None`` for onnxruntime)."""

    precision: str
    backend: str = ONNXRUNTIME
    hint: str | None = None

    @property
    def key(self) -> str:
        """The manifest key: ``int8:onnxruntime``, ``fp32:openvino:bf16``."""
        return ":".join(p for p in (self.precision, self.backend, self.hint) if p)

    @property
    def numeric(self) -> str:
        """The precision the numbers have (the gate's threshold class): bf16 for the fp32 file run in bf16."""
        return "bf16" if self.precision == "fp32" and self.hint == "bf16" else self.precision

    @classmethod
    def parse(cls, key: str) -> NumericPath:
        parts = key.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"not a numeric path key: {key!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def describe(self) -> str:
        return f"{self.precision} engine on {self.backend}" + (f" ({self.hint})" if self.hint else "")


def gate_records(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """The parity gate's record of every path it ran, by key (older bundles: their onnxruntime engines)."""
    parity = manifest.parity or {}
    paths = parity.get("paths")
    if isinstance(paths, Mapping):
        return {str(k): dict(v) for k, v in paths.items() if isinstance(v, Mapping)}
    engines = parity.get("engines") or {}
    return {NumericPath(str(p)).key: dict(v) for p, v in engines.items() if isinstance(v, Mapping)}


@dataclass(frozen=True)
class PathChoice:
    """The chosen path and its manifest entry; ``unchecked`` says why the gate does not vouch for it."""

    path: NumericPath
    entry: BundleFile
    unchecked: str | None = None
    skipped: list[str] = field(default_factory=list)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from Linux's /proc/cpuinfo; empty elsewhere (or unreadable), which keeps the
    order of a CPU without VNNI or AMX: onnxruntime first for int8."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            return frozenset(next((line for line in fh if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def cpu_has_int8_dot() -> bool:
    """The CPU has an int8 dot-product unit (VNNI or AMX): where OpenVINO's static int8 is the fast path."""
    return not _cpu_flags().isdisjoint(("avx512_vnni", "avx_vnni", "amx_int8"))


def cpu_has_amx() -> bool:
    """The CPU has AMX tiles for bf16: where OpenVINO's bf16 outruns onnxruntime's dynamic int8."""
    return "amx_bf16" in _cpu_flags()


def candidate_paths(
    files: Iterable[str],
    *,
    device: str,
    gpu: bool,
    openvino: bool,
    bf16: bool,
    int8_dot: bool = True,
    amx: bool = False,
    static_int8: bool = False,
) -> list[NumericPath]:
    """Every path for ``device`` over the bundle's engine files, fastest first (see the module's order).

    ``static_int8``: the int8 file's activation ranges were calibrated at export (:attr:`BundleFile.static_int8`).
    """
    have = set(files)
    on_openvino = device == OPENVINO or device.startswith(OPENVINO + ":")
    if device in ("cuda", "tensorrt") or (device == "auto" and gpu):
        return [NumericPath(p) for p in _GPU_FILES if p in have]
    use_ov = on_openvino or (device == "auto" and openvino)
    # bf16 is offered where the device may run it; the gate's record decides whether it may.
    hints = ("bf16", "f32") if bf16 else ("f32",)

    def ov(p: str, only: tuple[str, ...] = hints) -> list[NumericPath]:
        return [NumericPath(p, OPENVINO, h) for h in only] if use_ov and p in have else []

    def ort(p: str) -> list[NumericPath]:
        return [NumericPath(p)] if not on_openvino and p in have else []

    int8_fast_on_ov = static_int8 and int8_dot
    out = ov("int8") if int8_fast_on_ov else []
    if amx and bf16:
        out += ov("fp32", ("bf16",))
    out += ort("int8")
    for p in ("fp32", "fp16"):
        out += [path for path in ov(p) if path not in out] + ort(p)
    if not int8_fast_on_ov:
        out += ov("int8")
    return out


def choose_path(
    manifest: Manifest,
    *,
    device: str,
    precision: str | None = None,
    gpu: bool = False,
    openvino: bool = False,
    bf16: bool = False,
    allow_unchecked: bool = False,
    prefer: str | None = None,
    int8_dot: bool = True,
    amx: bool = False,
) -> PathChoice:
    """The fastest path for ``device`` (and ``precision``, if given) that passed the gate.

    ``gpu``: onnxruntime can use a GPU; ``openvino``: OpenVINO is installed; ``bf16``: OpenVINO's CPU plugin runs
    bf16 here; ``int8_dot``: the CPU has VNNI or AMX (:func:`cpu_has_int8_dot`); ``amx``: AMX bf16
    (:func:`cpu_has_amx`). Raises :class:`BundleError` when the bundle has no engine for the request, or when no candidate
    passed the gate and ``allow_unchecked`` is false. ``prefer``: a path key to take when it is a candidate that
    passed (the path a calibration was measured on, whose thresholds hold there only).
    """
    if precision is not None and precision not in RUNTIME_PRECISIONS:
        raise BundleError(f"unknown precision {precision!r}; choose one of {', '.join(RUNTIME_PRECISIONS)}")
    by_precision = {str(e.precision or "fp32"): e for e in reversed(manifest.engines())}
    if not by_precision:
        raise BundleError("the bundle lists no image engine; re-export it with clipn-export")
    if precision == "bf16" and not (device == "auto" or device.startswith(OPENVINO)):
        raise BundleError(
            f"--precision bf16 runs on OpenVINO only, not on --device {device}: use --device openvino"
        )
    if precision == "bf16" and not openvino:
        raise BundleError(
            "--precision bf16 runs on OpenVINO, which is not installed: pip install 'clipn-ood[openvino]'"
        )
    if manifest.is_open_vocabulary:
        if device.startswith(OPENVINO):
            raise BundleError(
                "open-vocabulary bundles run on onnxruntime: OpenVINO folds their class-bank inputs into constants, "
                "so a new class list would be ignored; use --device cpu or auto"
            )
        openvino = False
    device_for_bf16 = OPENVINO if precision == "bf16" and device == "auto" else device
    paths = candidate_paths(
        by_precision,
        device=device_for_bf16,
        gpu=gpu,
        openvino=openvino,
        bf16=bf16 or precision == "bf16",
        int8_dot=int8_dot,
        amx=amx,
        static_int8="int8" in by_precision and by_precision["int8"].static_int8,
    )
    if precision is not None:
        paths = [p for p in paths if p.numeric == precision]
        if not paths:
            have = ", ".join(by_precision)
            raise BundleError(
                f"the bundle has no engine that runs as {precision} on --device {device} (its engines: {have}); "
                f"re-export with clipn-export --{'fp32' if precision == 'bf16' else precision} or pick one of those"
            )
    records = gate_records(manifest)
    if not records:
        # Exported with the gate switched off (--no-parity) or by a tool that records none: the exporter's user
        # chose that; onnxruntime runs as it always did, with a warning. Other backends are not guessed at.
        ort = [p for p in paths if p.backend == ONNXRUNTIME]
        if ort:
            return PathChoice(ort[0], by_precision[ort[0].precision], unchecked=NO_GATE)
    skipped: list[str] = []
    preferred = [p for p in paths if p.key == prefer and (records.get(p.key) or {}).get("passed") is True]
    if preferred:
        return PathChoice(preferred[0], by_precision[preferred[0].precision])
    for path in paths:
        rec = records.get(path.key)
        if rec is not None and rec.get("passed") is True:
            return PathChoice(path, by_precision[path.precision], skipped=skipped)
        skipped.append(f"{path.describe()}: {_why_unchecked(rec)}")
    if not paths:
        raise BundleError(f"the bundle has no engine for --device {device}")
    if allow_unchecked:
        return PathChoice(paths[0], by_precision[paths[0].precision], unchecked=skipped[0], skipped=skipped)
    raise BundleError(
        f"no engine of this bundle passed clipn-export's parity gate for --device {device}"
        + (f" --precision {precision}" if precision else "")
        + f" ({'; '.join(skipped)}). Re-export it where that backend is installed, choose another --device or "
        "--precision, or pass --allow-unchecked to run it anyway"
    )


def _why_unchecked(record: Mapping[str, Any] | None) -> str:
    if record is None:
        return "the export did not check it"
    if record.get("passed") is False:
        failures = record.get("failures") or []
        return "it failed the gate" + (f" ({failures[0]})" if failures else "")
    return str(record.get("skipped") or "the gate did not run on it")
