"""``--triton-repo DIR``: a Triton Inference Server model repository for the bundle's engine.

Layout (Triton's model-repository convention)::

    DIR/<name>/config.pbtxt
    DIR/<name>/1/model.onnx      (platform onnxruntime_onnx)  — or model.plan (tensorrt_plan)
    DIR/<name>/1/model.onnx/     instead, holding model.onnx and its weights file, for an ONNX engine whose
                                 weights live in an external-data file (> 2 GB)
    DIR/<name>/labels.txt        the class names, line i = class i
    DIR/<name>/README.md         what clients send and receive; for a plan, the TensorRT it needs

``max_batch_size`` is the export's ``--max-batch``; dynamic batching is on. Inputs and outputs are taken from
the graph (from the TensorRT engine itself for a plan) with the batch axis dropped, as Triton wants when
``max_batch_size > 0``. Triton cannot serve a tensor with no axis besides the batch, so each per-image scalar
(``[batch]`` in the graph) is declared ``dims: [ 1 ]`` with ``reshape: { shape: [ ] }``: the model gets its
``[batch]`` and **clients receive ``[batch, 1]``**. Class axes the graph leaves symbolic (an open-vocabulary
engine's per-class outputs) are ``-1``. Per-class outputs name ``labels.txt`` as their ``label_filename``, so
Triton's classification extension returns class names; ``pred`` is an index, not per-class scores, so it does
not (line ``pred`` of ``labels.txt`` is its name).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clipn_runtime.bundle import TensorSpec
from clipn_runtime.errors import UserError
from clipn_runtime.fileio import replace_dir
from clipn_runtime.scoring import FULL_OUTPUTS

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
LABELS_FILE = "labels.txt"
README_FILE = "README.md"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_model_name(name: str) -> str:
    if not _NAME.match(name):
        raise UserError(
            f"Triton model name {name!r}: use letters, digits, '_', '.', '-' (it becomes a directory name)"
        )
    return name


def triton_dims(spec: TensorSpec) -> tuple[list[int], bool]:
    """Per-sample dims (batch axis dropped, symbolic axes ``-1``) and whether a ``[batch]`` tensor needs the
    ``[1]`` reshape."""
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in spec.shape[1:]]
    return (dims, False) if dims else ([1], True)


def client_shape(spec: TensorSpec) -> list[int | str]:
    """The shape a Triton client receives for ``spec``: ``N`` (the batch) first, then the config's dims."""
    return ["N", *triton_dims(spec)[0]]


def _tensor_block(spec: TensorSpec, label_filename: str | None = None) -> str:
    try:
        dtype = TRITON_DTYPES[spec.dtype]
    except KeyError:
        raise ValueError(f"{spec.name}: dtype {spec.dtype} has no Triton equivalent") from None
    dims, reshape = triton_dims(spec)
    lines = [
        "  {",
        f'    name: "{spec.name}"',
        f"    data_type: {dtype}",
        f"    dims: [ {', '.join(str(d) for d in dims)} ]",
    ]
    if reshape:
        lines.append("    reshape: { shape: [ ] }")
    if label_filename is not None:
        lines.append(f'    label_filename: "{label_filename}"')
    lines.append("  }")
    return "\n".join(lines)


def _per_class(spec: TensorSpec) -> bool:
    return spec.name in FULL_OUTPUTS and len(spec.shape) == 2


def plan_requirement(tensorrt: Mapping[str, Any] | None) -> str | None:
    """One line saying which TensorRT (and GPU architecture) a plan needs, or None without a record."""
    if not tensorrt:
        return None
    return (
        f"model.plan was built with TensorRT {tensorrt.get('version')} for compute capability "
        f"{tensorrt.get('compute_capability')} ({tensorrt.get('gpu')}): serve it with a Triton container whose "
        "TensorRT is exactly that version, on a GPU of that architecture"
    )


def config_pbtxt(
    name: str,
    platform: str,
    max_batch: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    max_queue_delay_us: int = 100,
    labels: str | None = LABELS_FILE,
    tensorrt: Mapping[str, Any] | None = None,
) -> str:
    """The text of ``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``)."""
    if max_batch < 1:
        raise ValueError("max_batch must be ≥ 1")
    requirement = plan_requirement(tensorrt) if platform == "tensorrt_plan" else None
    out_blocks = [_tensor_block(s, labels if _per_class(s) else None) for s in outputs]
    parts = [
        *([f"# {requirement}"] if requirement else []),
        f'name: "{check_model_name(name)}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch}",
        "input [\n" + ",\n".join(_tensor_block(s) for s in inputs) + "\n]",
        "output [\n" + ",\n".join(out_blocks) + "\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}",
    ]
    if platform == "tensorrt_plan":
        parts.append("instance_group [\n  {\n    kind: KIND_GPU\n    count: 1\n  }\n]")
    return "\n".join(parts) + "\n"


def readme(
    name: str, platform: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], requirement: str | None
) -> str:
    """What a client of this model sends and receives (and, for a plan, where it runs)."""

    def rows(specs: Sequence[TensorSpec]) -> list[str]:
        return [f"| `{s.name}` | {s.dtype} | `{client_shape(s)}` |" for s in specs]

    lines = [
        f"# {name} ({platform})",
        "",
        *([requirement + ".", ""] if requirement else []),
        "Written by clipn-export. N is the batch (up to max_batch_size). Per-image scalars come back as",
        "[N, 1]: Triton serves no tensor without an axis besides the batch (take column 0). Line i of",
        f"{LABELS_FILE} names class i (`pred`, and the class axis of per-class outputs).",
        "",
        "| input | dtype | shape sent |",
        "|---|---|---|",
        *rows(inputs),
        "",
        "| output | dtype | shape received |",
        "|---|---|---|",
        *rows(outputs),
    ]
    return "\n".join(lines) + "\n"


def external_data_files(model_file: Path) -> list[str]:
    """The external-data files an ONNX graph refers to (paths relative to the graph file)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(model_file), load_external_data=False)
    found = {
        e.value
        for t in model.graph.initializer
        if uses_external_data(t)
        for e in t.external_data
        if e.key == "location"
    }
    return sorted(found)


def _copy_model(model_file: Path, version_dir: Path) -> Path:
    """Copy the engine into ``version_dir``: ``model.plan``/``model.onnx``, or the folder ``model.onnx/`` with the
    graph and its external-data files (their names kept: the graph refers to them)."""
    target = version_dir / f"model{model_file.suffix}"
    extra = external_data_files(model_file) if model_file.suffix == ".onnx" else []
    if extra:
        target.mkdir()
        for rel in extra:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model_file.parent / rel, target / rel)
        target = target / "model.onnx"
    shutil.copyfile(model_file, target)
    return target


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
    tensorrt: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``repo/name/`` for ``model_file`` (``.onnx`` or ``.plan``); returns the model directory.

    ``tensorrt``: the manifest's record of a plan (its TensorRT version and GPU), written into the config and
    the README, because Triton can only load a plan with that exact TensorRT."""
    model_file = Path(model_file)
    platform = PLATFORMS.get(model_file.suffix)
    if platform is None:
        raise ValueError(f"{model_file}: expected a .onnx or .plan engine")
    model_dir = Path(repo) / check_model_name(name)
    if model_dir.exists() and not overwrite:
        raise UserError(f"{model_dir} already exists; pick another --triton-name or pass --overwrite")
    text = config_pbtxt(name, platform, max_batch, inputs, outputs, tensorrt=tensorrt)
    requirement = plan_requirement(tensorrt) if platform == "tensorrt_plan" else None
    # Built beside it and swapped in whole: a server polling the repository never loads a half-written model,
    # and a failure leaves the old model as it was.
    staging = model_dir.with_name(f".{model_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "1").mkdir(parents=True)
        _copy_model(model_file, staging / "1")
        (staging / LABELS_FILE).write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
        (staging / README_FILE).write_text(readme(name, platform, inputs, outputs, requirement), encoding="utf-8")
        (staging / "config.pbtxt").write_text(text, encoding="utf-8")
        replace_dir(staging, model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model_dir
