"""Reduced-precision encoders (fp16, int8) and onnxruntime sessions that load them.

Only the image-encoder graph is converted (see :mod:`clipn_export.onnx_export`): the preprocessing, the feature
normalisation and the scoring head stay fp32, because at scale 100 an fp16 cosine error of ~5e-4 would move
every logit by ~0.05.

* fp16: onnxconverter-common's ``convert_float_to_float16`` with ``keep_io_types`` — the encoder still takes
  float32 pixels and returns float32 features; the casts live inside the graph.
* int8: onnxruntime's dynamic quantisation of the encoder's MatMul weights (int8 weights, activations quantised
  per batch at run time) — a CPU speed-up; the patch-embedding convolution stays fp32.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

log = logging.getLogger(__name__)

#: Bundle file name per precision (fp32 is the reference engine and is always written).
ENGINE_FILES: dict[str, str] = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}

#: onnxruntime's CPU NCHWc layout pass crashes (segfault) on fp16 graphs at full optimisation; sessions for
#: fp16 engines disable it (onnxruntime 1.32, this machine). Harmless elsewhere: it only exists for CPU.
FP16_DISABLED_OPTIMIZERS: tuple[str, ...] = ("NchwcTransformer",)


@dataclass(frozen=True)
class Int8Options:
    """Dynamic-quantisation knobs (onnxruntime.quantization.quantize_dynamic)."""

    per_channel: bool = True
    #: 7-bit weights: more accurate on CPUs without VNNI (u8×s8 saturation), a little less elsewhere.
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("MatMul",)


def to_fp16(encoder: onnx.ModelProto) -> onnx.ModelProto:
    """The encoder with fp16 weights and arithmetic, float32 at its input and output."""
    from onnxconverter_common import float16

    model = onnx.ModelProto()
    model.CopyFrom(encoder)
    with warnings.catch_warnings(record=True) as caught:
        # One UserWarning per weight with 0 < |w| < 1e-7 (flushed to ±1e-7, fp16's subnormal range): counted.
        warnings.simplefilter("always", UserWarning)
        converted: onnx.ModelProto = float16.convert_float_to_float16(model, keep_io_types=True)
    clamped = sum("will be truncated" in str(w.message) for w in caught)
    for w in caught:
        if "will be truncated" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if clamped:
        log.info("fp16: %d tiny weight values (|w| < 1e-7) set to ±1e-7 by the converter", clamped)
    _fix_float_casts(converted.graph)
    return converted


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


def session_kwargs(precision: str | None) -> dict[str, Any]:
    """Extra ``onnxruntime.InferenceSession`` keyword arguments an engine of ``precision`` needs."""
    if precision == "fp16":
        return {"disabled_optimizers": list(FP16_DISABLED_OPTIMIZERS)}
    return {}


def make_session(model: str | Path | bytes, precision: str | None = None, *, threads: int = 0) -> Any:
    """A CPU ``onnxruntime.InferenceSession`` for an engine (with the fp16 workaround where needed)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"], **session_kwargs(precision))
