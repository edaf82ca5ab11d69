"""``--triton-repo DIR``: a Triton Inference Server model repository for the bundle's engine.

Layout (Triton's model-repository convention)::

    DIR/<name>/config.pbtxt
    DIR/<name>/1/model.onnx      (platform onnxruntime_onnx)  — or model.plan (tensorrt_plan)
    DIR/<name>/labels.txt        the class names, line i = ``pred`` i

``max_batch_size`` is the export's ``--max-batch``; dynamic batching is on. Inputs and outputs are taken from
the graph (from the TensorRT engine itself for a plan) with the batch axis dropped, as Triton wants when
``max_batch_size > 0``; per-image scalars (``[batch]``) are declared ``dims: [ 1 ]`` with an empty
``reshape`` so clients receive them as ``[batch]``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from clipn_runtime.bundle import TensorSpec
from clipn_runtime.errors import UserError

#: Triton's data types for the dtypes our graphs use.
TRITON_DTYPES: dict[str, str] = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
}
PLATFORMS: dict[str, str] = {".onnx": "onnxruntime_onnx", ".plan": "tensorrt_plan"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_model_name(name: str) -> str:
    if not _NAME.match(name):
        raise UserError(
            f"Triton model name {name!r}: use letters, digits, '_', '.', '-' (it becomes a directory name)"
        )
    return name


def _dims(spec: TensorSpec) -> tuple[list[int], bool]:
    """Per-sample dims (batch axis dropped) and whether a ``[batch]`` tensor needs the ``[1]`` reshape."""
    rest = spec.shape[1:]
    if any(not isinstance(d, int) or d < 1 for d in rest):
        raise ValueError(f"{spec.name}: only the batch axis may be dynamic for Triton, got {spec.shape}")
    dims = [int(d) for d in rest]
    return (dims, False) if dims else ([1], True)


def _tensor_block(spec: TensorSpec) -> str:
    try:
        dtype = TRITON_DTYPES[spec.dtype]
    except KeyError:
        raise ValueError(f"{spec.name}: dtype {spec.dtype} has no Triton equivalent") from None
    dims, reshape = _dims(spec)
    lines = [
        "  {",
        f'    name: "{spec.name}"',
        f"    data_type: {dtype}",
        f"    dims: [ {', '.join(str(d) for d in dims)} ]",
    ]
    if reshape:
        lines.append("    reshape: { shape: [ ] }")
    lines.append("  }")
    return "\n".join(lines)


def config_pbtxt(
    name: str,
    platform: str,
    max_batch: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    max_queue_delay_us: int = 100,
) -> str:
    """The text of ``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``)."""
    if max_batch < 1:
        raise ValueError("max_batch must be ≥ 1")
    parts = [
        f'name: "{check_model_name(name)}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch}",
        "input [\n" + ",\n".join(_tensor_block(s) for s in inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(s) for s in outputs) + "\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}",
    ]
    if platform == "tensorrt_plan":
        parts.append("instance_group [\n  {\n    kind: KIND_GPU\n    count: 1\n  }\n]")
    return "\n".join(parts) + "\n"


def write_triton_repo(
    repo: str | Path,
    name: str,
    model_file: str | Path,
    *,
    max_batch: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    classes: Sequence[str],
    overwrite: bool = False,
) -> Path:
    """Write ``repo/name/`` for ``model_file`` (``.onnx`` or ``.plan``); returns the model directory."""
    model_file = Path(model_file)
    platform = PLATFORMS.get(model_file.suffix)
    if platform is None:
        raise ValueError(f"{model_file}: expected a .onnx or .plan engine")
    model_dir = Path(repo) / check_model_name(name)
    if model_dir.exists():
        if not overwrite:
            raise UserError(f"{model_dir} already exists; pick another --triton-name or pass --overwrite")
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    text = config_pbtxt(name, platform, max_batch, inputs, outputs)
    target = model_dir / "1" / f"model{model_file.suffix}"
    shutil.copyfile(model_file, target)
    external = model_file.with_name(model_file.name + ".data")
    if external.is_file():  # > 2 GB ONNX: the weights file keeps the name the graph refers to
        shutil.copyfile(external, target.with_name(external.name))
    (model_dir / "labels.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
    (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
    return model_dir
