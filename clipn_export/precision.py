"""Reduced-precision encoders (fp16, int8).

Only the image-encoder graph is converted (see :mod:`clipn_export.onnx_export`): the preprocessing, the feature
normalisation and the scoring head stay fp32, because at scale 100 an fp16 cosine error of ~5e-4 would move
every logit by ~0.05.

* fp16: onnxconverter-common's ``convert_float_to_float16`` with ``keep_io_types`` — the encoder still takes
  float32 pixels and returns float32 features; the casts live inside the graph.
* int8: onnxruntime's dynamic quantisation of the encoder's MatMul weights (int8 weights, activations quantised
  per batch at run time) — a CPU speed-up; the patch-embedding convolution stays fp32.
* int8 with a calibration set (:func:`to_int8_static`): NNCF post-training static quantisation (transformer
  preset) of the MatMul/Gemm layers only — weights and activations int8 with ranges measured on the user's ID
  images — written as a QDQ graph (QuantizeLinear/DequantizeLinear pairs), which onnxruntime, OpenVINO and
  TensorRT all run as int8. The convolutions stay float, and the recipe departs from NNCF's defaults where the
  toy world or the ViT-B-16 timing said so (:class:`StaticInt8Options`; docs/export.md has the numbers).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from clipn_runtime.bundle import INT8_STATIC

if TYPE_CHECKING:
    from clipn_export.int8_calibration import CalibrationSet

log = logging.getLogger(__name__)

#: Bundle file name per precision (fp32 is the reference engine and is always written).
ENGINE_FILES: dict[str, str] = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
#: The fp16 converter's clamps (its defaults, written out because the count of clamped weights uses them):
#: nonzero weights below 1e-7 become ±1e-7 (an fp16 subnormal, so never 0), above 1e4 become ±1e4.
FP16_MIN_POSITIVE = 1e-7
FP16_MAX_FINITE = 1e4


@dataclass(frozen=True)
class Int8Options:
    """Dynamic-quantisation knobs (onnxruntime.quantization.quantize_dynamic)."""

    per_channel: bool = True
    #: 7-bit weights. On by default because a bundle runs on CPUs it was not exported on: without VNNI
    #: (AVX2-only x86, e.g. AMD Zen 1/2) onnxruntime's u8×s8 kernels add pairs of products in saturating 16-bit
    #: (vpmaddubsw), and 8-bit weights overflow. Measured on AMD EPYC (Zen 1, AVX2), tiny CLIPN, 24 images: int8
    #: max |Δ ATD| vs fp32 0.0158 with 8-bit weights, 0.0019 with 7-bit (ATD range 0.061). With VNNI the
    #: 8-bit weights would be a little more accurate; the gate's records show what this export measured.
    reduce_range: bool = True
    op_types: tuple[str, ...] = ("MatMul",)


def to_fp16(encoder: onnx.ModelProto) -> onnx.ModelProto:
    """The encoder with fp16 weights and arithmetic, float32 at its input and output."""
    from onnxconverter_common import float16

    model = onnx.ModelProto()
    model.CopyFrom(encoder)
    with warnings.catch_warnings():
        # The converter warns once per tensor and sign with the extreme value it clamps; the log line below
        # counts the values it actually changed instead.
        warnings.filterwarnings("ignore", message=".*will be truncated to", category=UserWarning)
        converted: onnx.ModelProto = float16.convert_float_to_float16(
            model, min_positive_val=FP16_MIN_POSITIVE, max_finite_val=FP16_MAX_FINITE, keep_io_types=True
        )
    tiny, huge = clamped_weights(encoder, converted)
    if tiny or huge:
        log.info(
            "fp16: the converter set %d weight values with 0 < |w| < %g to ±%g and %d with |w| > %g to ±%g",
            tiny, FP16_MIN_POSITIVE, FP16_MIN_POSITIVE, huge, FP16_MAX_FINITE, FP16_MAX_FINITE,
        )  # fmt: skip
    _fix_float_casts(converted.graph)
    return converted


def _float_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initialisers and Constant-node values by the name the converter keeps (initialiser / node output)."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in (a for a in node.attribute if a.name == "value"):
                tensors[node.output[0]] = attr.t
    return tensors


def clamped_weights(original: onnx.ModelProto, converted: onnx.ModelProto) -> tuple[int, int]:
    """How many float32 weight values the fp16 converter clamped: (0 < |w| < min positive, |w| > max finite)."""
    from onnx import numpy_helper

    now_fp16 = {n for n, t in _float_tensors(converted).items() if t.data_type == onnx.TensorProto.FLOAT16}
    tiny = huge = 0
    for name, t in _float_tensors(original).items():
        if name not in now_fp16 or t.data_type != onnx.TensorProto.FLOAT:
            continue
        w = np.abs(numpy_helper.to_array(t))
        tiny += int(np.count_nonzero((w > 0) & (w < FP16_MIN_POSITIVE)))
        huge += int(np.count_nonzero((w > FP16_MAX_FINITE) & np.isfinite(w)))
    return tiny, huge


def _fix_float_casts(graph: onnx.GraphProto) -> None:
    """Retarget ``Cast(to=float)`` nodes whose output the converter re-typed as float16.

    onnxconverter-common 1.16 turns every float tensor into float16 but leaves the ``to`` attribute of the
    exporter's own Casts (open_clip's LayerNorm casts back to the input dtype; attention casts its scale from
    int64) at float, which onnxruntime rejects as a type mismatch.
    """
    fp16_values = {v.name for v in graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    for node in graph.node:
        if node.op_type != "Cast" or node.output[0] not in fp16_values:
            continue
        for attr in node.attribute:
            if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                attr.i = onnx.TensorProto.FLOAT16


def to_int8(encoder: onnx.ModelProto, options: Int8Options | None = None) -> onnx.ModelProto:
    """The encoder with its MatMul weights dynamically quantised to int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    opts = options or Int8Options()
    root = logging.getLogger()
    quiet = _DropQuantizerChatter()
    root.addFilter(quiet)
    try:
        with tempfile.TemporaryDirectory(prefix="clipn-int8-") as tmp:
            out = Path(tmp) / "encoder.int8.onnx"
            quantize_dynamic(
                encoder,
                out,
                op_types_to_quantize=list(opts.op_types),
                per_channel=opts.per_channel,
                reduce_range=opts.reduce_range,
                weight_type=QuantType.QInt8,
            )
            return onnx.load(str(out))
    finally:
        root.removeFilter(quiet)


class _DropQuantizerChatter(logging.Filter):
    """onnxruntime's quantiser logs on the root logger: an advice to run its pre-processing (whose symbolic
    shape inference fails on the open_clip ViT graph) and one INFO line per tensor. Neither is actionable."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Please consider to run pre-processing") or record.levelno <= logging.INFO)


@dataclass(frozen=True)
class StaticInt8Options:
    """NNCF post-training quantisation knobs (``nncf.quantize``, ONNX backend)."""

    #: NNCF's transformer patterns; its preset is then "mixed": symmetric weights, asymmetric activations.
    model_type: str = "transformer"
    #: ONNX op types kept in float: with the transformer patterns, every MatMul/Gemm is then quantised and
    #: nothing else (the ViT patch embedding and a ResNet tower's convolutions stay float).
    ignored_types: tuple[str, ...] = ("Conv", "ConvTranspose")
    #: How an activation's range is taken from the calibration images: "minmax" (the extremes over all of
    #: them) or "mean_minmax" (NNCF's default: the mean over images of each image's min and max, which clips
    #: every image's extremes; it cost the toy world's colour split 1.2 ATD AUROC points, "minmax" 0.02).
    activations_range: str = "minmax"
    #: SmoothQuant's alpha on the MatMuls (NNCF's transformer default 0.95); negative: off. Off: its scales,
    #: fitted to the ID calibration images, moved the toy world's OOD scores (max |Δ ATD| vs fp32 0.26 on OOD
    #: images, 0.008 without it) — what an OOD detector must not do.
    smooth_quant_alpha: float = -1.0
    #: NNCF's fast bias correction after quantising.
    bias_correction: bool = True
    #: Asymmetric activation quantisers as uint8 (:func:`uint8_activations`; exact, for x86 kernels).
    uint8_activations: bool = True
    #: NNCF's overflow fix: "enable" quantises every MatMul weight to 7 bits (a half of the int8 range), as
    #: the dynamic int8 does (``Int8Options.reduce_range``): a bundle runs on CPUs it was not exported on, and
    #: without VNNI the u8×s8 kernels add pairs of products in saturating 16 bits. "first_layer_only" (NNCF's
    #: default) would touch only the first convolution, which stays float here; "disable": 8-bit weights.
    overflow_fix: str = "enable"


def to_int8_static(
    encoder: onnx.ModelProto,
    calibration: CalibrationSet,
    options: StaticInt8Options | None = None,
    *,
    progress: bool = True,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The encoder with its MatMul/Gemm layers statically quantised to int8 on ``calibration`` (QDQ graph), and
    the record of how (the manifest's ``quantization``)."""
    from clipn_runtime.clikit import MissingExtra

    try:
        import nncf
        from nncf.common.logging import nncf_logger
    except ImportError as e:
        raise MissingExtra("nncf", "export", str(e)) from None
    opts = options or StaticInt8Options()
    input_name = encoder.graph.input[0].name
    present = {n.op_type for n in encoder.graph.node}
    ignored = [t for t in opts.ignored_types if t in present]  # NNCF refuses a type the graph does not have
    level = nncf_logger.level
    # NNCF logs to stdout (its own handler) and draws rich progress bars on stdout: both go to stderr here
    # (stdout is the CLI's parity table), the bars only with ``progress``.
    nncf_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr if progress else io.StringIO()):
            quantized: onnx.ModelProto = nncf.quantize(
                encoder,
                nncf.Dataset(list(calibration.batches()), lambda x: {input_name: x}),
                model_type=nncf.ModelType(opts.model_type),
                ignored_scope=nncf.IgnoredScope(types=ignored),
                subset_size=len(calibration),
                advanced_parameters=_advanced(opts),
            )
    finally:
        nncf_logger.setLevel(level)
    if opts.uint8_activations:
        uint8_activations(quantized)
    drop_zero_weight_zero_points(quantized)
    record = {
        "method": INT8_STATIC,
        "format": "QDQ (QuantizeLinear/DequantizeLinear, int8 weights and activations)",
        "nncf": _nncf_version(),
        "model_type": opts.model_type,
        "preset": "mixed (NNCF's default for transformers: symmetric weights, asymmetric activations)",
        "ignored_scope": {"types": list(opts.ignored_types)},
        "activations_range": opts.activations_range,
        "smooth_quant_alpha": opts.smooth_quant_alpha,
        "bias_correction": opts.bias_correction,
        "uint8_activations": opts.uint8_activations,
        "overflow_fix": opts.overflow_fix,
        "quantized_ops": quantized_ops(quantized),
        "subset_size": len(calibration),
        "calibration": calibration.record(),
    }
    return quantized, record


def uint8_activations(model: onnx.ModelProto) -> int:
    """Re-type the int8 activation quantisers with a nonzero zero point (asymmetric) as uint8, in place; returns
    how many.

    Exact: ``q_u8 = q_i8 + 128`` with ``zp_u8 = zp_i8 + 128`` dequantises to the same values. NNCF's ONNX
    backend writes every activation that can be negative as int8; x86 int8 kernels without VNNI multiply
    u8 activations by s8 weights (``vpmaddubsw``), and OpenVINO's CPU plugin ran the int8 ones more slowly
    (docs/export.md has the measurement).
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    readers = _readers(model)
    types = {v.name: v for v in model.graph.value_info}
    done = 0
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) == 3]:
        zp_name = q.input[2]
        zp = inits.get(zp_name)
        dqs = readers.get(q.output[0], [])
        if zp is None or zp.data_type != onnx.TensorProto.INT8 or not dqs:
            continue
        if any(d.op_type != "DequantizeLinear" or len(d.input) != 3 or d.input[2] != zp_name for d in dqs):
            continue  # not the plain Q → DQ pair sharing one zero point that NNCF writes
        if len(readers[zp_name]) != 1 + len(dqs):
            continue  # the zero point is shared with other quantisers
        value = numpy_helper.to_array(zp).astype(np.int16)
        if not value.any():
            continue
        zp.CopyFrom(numpy_helper.from_array((value + 128).astype(np.uint8), zp_name))
        if q.output[0] in types:
            types[q.output[0]].type.tensor_type.elem_type = onnx.TensorProto.UINT8
        done += 1
    return done


def drop_zero_weight_zero_points(model: onnx.ModelProto) -> int:
    """Remove the all-zero zero points of the weights' DequantizeLinear nodes, in place; returns how many.

    Exact (a DequantizeLinear without a zero point uses 0, in the type of its input), and NNCF's symmetric
    weights always have zero ones. OpenVINO's CPU plugin treats an explicit zero point as asymmetric weights:
    with them the ViT-B-16 encoder's layers took 1.32× the time of the same engine as an OpenVINO IR, without
    them 0.99× (docs/export.md)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits or len(n.input) != 3:
            continue
        zp = inits.get(n.input[2])
        if zp is not None and not numpy_helper.to_array(zp).any():
            del n.input[2]
            done += 1
    used = {i for n in model.graph.node for i in n.input} | {
        v.name for v in (*model.graph.input, *model.graph.output)
    }
    keep = [t for t in model.graph.initializer if t.name in used]  # the zero points no node reads any more
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return done


def _advanced(opts: StaticInt8Options) -> Any:
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    ranges = {"mean_minmax": RangeEstimatorParametersSet.MEAN_MINMAX, "minmax": RangeEstimatorParametersSet.MINMAX}
    return AdvancedQuantizationParameters(
        overflow_fix=OverflowFix(opts.overflow_fix),
        activations_range_estimator_params=ranges[opts.activations_range],
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=opts.smooth_quant_alpha),
        disable_bias_correction=not opts.bias_correction,
    )


def _nncf_version() -> str | None:
    import importlib.metadata as md

    try:
        return md.version("nncf")
    except md.PackageNotFoundError:
        return None


def _readers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name → the nodes that read it (a node reading a tensor twice is listed twice)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return readers


#: Ops that only move or reshape data: a dequantised tensor passes through them to the op that computes on it.
_MOVES = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Gather", "Slice"})


def quantized_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op type → how many nodes of that type compute on dequantised tensors (run in int8 by the backends):
    the readers of DequantizeLinear outputs, looking through data moves, not counting ``Shape``."""
    readers = _readers(model)
    todo = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    seen: set[str] = set()
    compute: dict[str, onnx.NodeProto] = {}
    while todo:
        tensor = todo.pop()
        for n in readers.get(tensor, []):
            if n.op_type in _MOVES and n.output[0] not in seen:
                seen.add(n.output[0])
                todo.append(n.output[0])
            elif n.op_type not in _MOVES and n.op_type != "Shape":
                compute[n.name or n.output[0]] = n
    counts: dict[str, int] = {}
    for n in compute.values():
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def make_session(model: str | Path | bytes, precision: str | None = None, *, threads: int = 0) -> Any:
    """The onnxruntime session ``clipn-detect --device cpu`` runs for an engine of ``precision`` (tests, tools)."""
    from clipn_runtime.engine import EngineSpec, OrtEngine, open_engine

    engine = open_engine(
        EngineSpec(model, precision=precision), device="cpu", threads=threads or None, log_severity=3
    )
    assert isinstance(engine, OrtEngine)
    return engine.session
