"""Tracing the engine's parts to ONNX and joining them into the one graph of the bundle.

The engine is exported as up to three graphs and merged into one ONNX model:

``[uint8 preprocess] → image encoder → scoring head``

Exporting the parts apart keeps precision conversion exact and simple: fp16/int8 are applied to the encoder
graph alone, so the preprocessing, the normalisation and the CTW/ATD head stay fp32 by construction (no node
block lists, no guessing which nodes belong to the head). Every node of a part is prefixed with its part's
name (``encoder/``, ``head/``, ``preprocess/``), which is also how TensorRT finds the head's layers to pin them
to fp32.

Exporter: the legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``), pinned on purpose and
checked by tests/test_export_onnx.py. With torch 2.14 and open_clip 3.3 it produces opset 17 (native
``LayerNormalization``) with a working dynamic batch axis in well under a second for the tiny test model; the
dynamo exporter cannot emit opset 17 here (it builds opset 18 and its down-conversion fails on the ViT) and is
~15× slower to export. Revisit when torch removes the legacy exporter.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnx.compose
import onnx.helper
import onnx.numpy_helper
import torch
from torch import Tensor, nn
from torch.jit import TracerWarning  # type: ignore[attr-defined]

from clipn_export.head import ScoringHead, Uint8Preprocess
from clipn_runtime.bundle import TensorSpec
from clipn_runtime.scoring import FULL_OUTPUTS

log = logging.getLogger(__name__)

#: ``torch.onnx.export(dynamo=False)``: the exporter this project uses (see the module docstring).
EXPORTER = "torchscript"
#: ONNX opset of every exported graph (≥ 17: native LayerNormalization keeps fp16 sane in TensorRT).
OPSET = 17
#: The engine's input name.
IMAGE_INPUT = "image"
#: The symbolic batch dimension.
BATCH_DIM = "batch"
#: Open-vocabulary engines: the class-bank inputs (tower → name) and their symbolic class axis.
BANK_INPUTS: dict[str, str] = {"yes": "bank_yes", "no": "bank_no"}
CLASSES_DIM = "classes"
_TRACE_CLASSES = 5
#: Edges between the parts (internal to the merged graph).
PIXELS = "pixels"
FEATURE = "feature"
#: Batch size the parts are traced with: ≥ 2 so that no size-1 dimension gets folded into a constant.
TRACE_BATCH = 2
#: Largest model protobuf that can be stored as one file (protobuf's 2 GiB limit, with margin).
SINGLE_FILE_LIMIT = 2_000_000_000

#: Part prefixes in the merged graph.
PREFIX_PREPROCESS = "preprocess/"
PREFIX_ENCODER = "encoder/"
PREFIX_HEAD = "head/"


class _ImageEncoder(nn.Module):
    """``images → raw (unnormalised) image features``; the head normalises in fp32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return self.model.encode_image(image, normalize=False)  # type: ignore[operator,no-any-return]


def _trace(
    module: nn.Module,
    example: Tensor,
    input_name: str,
    output_names: Sequence[str],
    extra_inputs: Sequence[tuple[str, Tensor, dict[int, str]]] = (),
    extra_axes: dict[str, dict[int, str]] | None = None,
) -> onnx.ModelProto:
    """One legacy-exporter trace with a dynamic batch on the input and every output.

    ``extra_inputs``: further (name, example, dynamic axes) inputs; ``extra_axes``: more dynamic axes per output.
    """
    dynamic_axes = {name: {0: BATCH_DIM} for name in (input_name, *output_names)}
    for name, axes in (extra_axes or {}).items():
        dynamic_axes[name] = {**dynamic_axes.get(name, {}), **axes}
    dynamic_axes.update({name: axes for name, _, axes in extra_inputs})
    module = module.eval()
    with tempfile.TemporaryDirectory(prefix="clipn-export-") as tmp:
        path = Path(tmp) / "part.onnx"
        with warnings.catch_warnings():
            # Known and harmless: the legacy exporter's deprecation notice, and open_clip/nn.MultiheadAttention
            # shape checks that compare constant embed dims (TracerWarning on Python bools).
            warnings.filterwarnings("ignore", category=TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            fastpath = torch.backends.mha.get_fastpath_enabled()
            # nn.MultiheadAttention's eval-mode fast path is one fused aten op with no ONNX symbolic.
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                torch.onnx.export(
                    module,
                    (example, *(x for _, x, _ in extra_inputs)),
                    str(path),
                    input_names=[input_name, *(name for name, _, _ in extra_inputs)],
                    output_names=list(output_names),
                    dynamic_axes=dynamic_axes,
                    opset_version=OPSET,
                    do_constant_folding=True,
                    dynamo=False,
                )
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
        return onnx.load(str(path))


def export_preprocess(mean: Sequence[float], std: Sequence[float], image_size: int) -> onnx.ModelProto:
    """``image`` (N×H×W×3 uint8) → ``pixels`` (N×3×H×W float32, normalised)."""
    example = torch.randint(0, 256, (TRACE_BATCH, image_size, image_size, 3), dtype=torch.uint8)
    return _trace(Uint8Preprocess(mean, std), example, IMAGE_INPUT, [PIXELS])


def export_encoder(model: nn.Module, image_size: int, *, input_name: str = IMAGE_INPUT) -> onnx.ModelProto:
    """``input_name`` (N×3×S×S float32, normalised) → ``feature`` (N×D float32, unnormalised).

    ``model`` is anything with ``encode_image(images, normalize=False)`` (a CLIPN or an open_clip CLIP).
    """
    g = torch.Generator().manual_seed(0)
    example = torch.randn(TRACE_BATCH, 3, image_size, image_size, generator=g)
    device = next(model.parameters()).device
    return _trace(_ImageEncoder(model), example.to(device), input_name, [FEATURE])


def export_head(head: ScoringHead, *, bank_inputs: bool = False) -> onnx.ModelProto:
    """``feature`` (N×D) → the outputs of :attr:`ScoringHead.output_names`; the banks become initialisers.

    ``bank_inputs`` (open-vocabulary bundles): the banks are graph inputs instead, :data:`BANK_INPUTS`
    (C×D float32 with L2-normalised rows, C a dynamic axis ``classes``); :func:`add_bank_defaults` then gives
    them the baked banks as default values once the engine is assembled.
    """
    g = torch.Generator().manual_seed(0)
    example = torch.randn(TRACE_BATCH, head.dim, generator=g)
    if not bank_inputs:
        return _trace(head, example, FEATURE, head.output_names)
    # A class count unlike the batch and the feature size, so that neither gets folded into the other.
    banks = [
        (BANK_INPUTS[t], torch.randn(_TRACE_CLASSES, head.dim, generator=g), {0: CLASSES_DIM})
        for t in ("yes", "no")
    ]
    per_class = {name: {1: CLASSES_DIM} for name in head.output_names if name in FULL_OUTPUTS}
    return _trace(head, example, FEATURE, head.output_names, extra_inputs=banks, extra_axes=per_class)


def add_bank_defaults(model: onnx.ModelProto, yes: npt.ArrayLike, no: npt.ArrayLike) -> None:
    """Give an engine's bank inputs default values: initialisers named like the inputs (onnxruntime calls them
    overridable initialisers). Fed nothing, the engine scores these banks; fed new ones, it scores those."""
    inputs = {i.name for i in model.graph.input}
    for tower, value in (("yes", yes), ("no", no)):
        name = BANK_INPUTS[tower]
        if name not in inputs:
            raise ValueError(f"the engine has no input {name!r}; export the head with bank_inputs=True")
        arr = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
        if arr.ndim != 2:
            raise ValueError(f"bank {tower!r} must be C×D, got shape {arr.shape}")
        model.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))


def chain(parts: Sequence[tuple[str, onnx.ModelProto]]) -> onnx.ModelProto:
    """Join single-output graphs (the last may have many outputs) into one, each output feeding the next
    part's first input.

    Node, edge and initialiser names are prefixed per part; the graph inputs/outputs keep their names.
    """
    if not parts:
        raise ValueError("nothing to chain")
    prefixed: list[onnx.ModelProto] = []
    for prefix, model in parts:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        onnx.compose.add_prefix_graph(m.graph, prefix, rename_inputs=False, rename_outputs=False, inplace=True)
        prefixed.append(m)
    # Converters may stamp different IR versions; the merged model takes the newest (all of them load it).
    ir = max(m.ir_version for m in prefixed)
    for m in prefixed:
        m.ir_version = ir
    merged = prefixed[0]
    for nxt in prefixed[1:]:
        # A part's first input takes the previous part's output; further inputs (the bank inputs of an
        # open-vocabulary head) stay inputs of the merged graph.
        if len(merged.graph.output) != 1 or not nxt.graph.input:
            raise ValueError("chain() needs single-output parts feeding parts with an input")
        out, inp = merged.graph.output[0].name, nxt.graph.input[0].name
        merged = onnx.compose.merge_models(merged, nxt, io_map=[(out, inp)])
    merged.producer_name = "clipn-ood"
    return merged


def save_model(model: onnx.ModelProto, path: str | Path) -> list[Path]:
    """Save ``model``; one file under 2 GB, else weights in ``<name>.data`` beside it. Returns the files written."""
    path = Path(path)
    if model.ByteSize() < SINGLE_FILE_LIMIT:
        onnx.save_model(model, str(path))
        return [path]
    data = path.with_name(path.name + ".data")
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    return [path, data]


def _dtype_name(elem_type: int) -> str:
    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type).name)


def _specs(values: Sequence[onnx.ValueInfoProto]) -> list[TensorSpec]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        specs.append(TensorSpec(name=v.name, shape=shape, dtype=_dtype_name(t.elem_type)))
    return specs


def graph_signature(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The (inputs, outputs) of a graph as manifest :class:`TensorSpec` s (initialisers excluded)."""
    inits = {i.name for i in model.graph.initializer}
    return _specs([i for i in model.graph.input if i.name not in inits]), _specs(list(model.graph.output))
