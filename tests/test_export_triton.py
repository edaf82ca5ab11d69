"""--triton-repo: the model repository's config.pbtxt agrees with the ONNX model it serves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import onnx
import pytest

from clipn_export.exporter import export_bundle
from clipn_export.triton import config_pbtxt, write_triton_repo
from clipn_runtime.bundle import TensorSpec
from clipn_runtime.errors import UserError

# --- a small parser for protobuf text format (Triton's config.pbtxt); tritonclient is not installed here ---
_TOKEN = re.compile(
    r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([A-Za-z_][A-Za-z0-9_]*)|(-?\d+(?:\.\d+)?)|([{}\[\]:,]))'
)


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"cannot parse config.pbtxt at {text[pos : pos + 20]!r}")
        pos = m.end()
        if m.group(1) is None:
            out.append(m.group(0).strip())
    return out


def _value(tok: str) -> Any:
    if tok.startswith('"'):
        return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if re.fullmatch(r"-?\d+\.\d+", tok):
        return float(tok)
    return tok  # an enum name


def parse_pbtxt(text: str) -> dict[str, list[Any]]:
    """Every field maps to the list of its values (repeated or not); messages become dicts."""
    toks = _tokens(text)
    pos = 0

    def message(end: str | None) -> dict[str, list[Any]]:
        nonlocal pos
        msg: dict[str, list[Any]] = {}
        while pos < len(toks) and toks[pos] != end:
            name = toks[pos]
            pos += 1
            if toks[pos] == ":":
                pos += 1
            values: list[Any] = []
            if toks[pos] == "[":
                pos += 1
                while toks[pos] != "]":
                    values.append(item())
                    if toks[pos] == ",":
                        pos += 1
                pos += 1
            else:
                values.append(item())
            msg.setdefault(name, []).extend(values)
        if end is not None:
            pos += 1
        return msg

    def item() -> Any:
        nonlocal pos
        if toks[pos] == "{":
            pos += 1
            return message("}")
        pos += 1
        return _value(toks[pos - 1])

    return message(None)


ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}


def _check_against_onnx(config: dict[str, list[Any]], model: onnx.ModelProto, max_batch: int) -> None:
    """Triton's rules for max_batch_size > 0: dims omit the batch axis; a [batch] tensor is dims [1] + reshape []."""
    assert config["max_batch_size"] == [max_batch]
    assert config["platform"] == ["onnxruntime_onnx"]
    assert "dynamic_batching" in config
    inits = {i.name for i in model.graph.initializer}
    for section, values in (
        ("input", [v for v in model.graph.input if v.name not in inits]),
        ("output", model.graph.output),
    ):
        entries = config[section]
        assert [e["name"][0] for e in entries] == [v.name for v in values]
        for entry, v in zip(entries, values, strict=True):
            t = v.type.tensor_type
            assert entry["data_type"] == [ONNX_TO_TRITON[t.elem_type]], v.name
            dims = t.shape.dim
            assert dims[0].dim_param == "batch", v.name  # the batch axis is the dynamic one
            rest = [d.dim_value for d in dims[1:]]
            if rest:
                assert entry["dims"] == rest and "reshape" not in entry, v.name
            else:
                assert entry["dims"] == [1] and entry["reshape"] == [{"shape": []}], v.name


def test_parser_reads_nested_text_format() -> None:
    cfg = parse_pbtxt(
        'name: "x"  # c\nmax_batch_size: 4\ninput [ { name: "a" dims: [ 1, 2 ] reshape: { shape: [ ] } } ]\n'
    )
    assert cfg == {
        "name": ["x"],
        "max_batch_size": [4],
        "input": [{"name": ["a"], "dims": [1, 2], "reshape": [{"shape": []}]}],
    }


@pytest.mark.parametrize("options", [{}, {"uint8_input": True, "full_outputs": True, "embeddings": True}])
def test_triton_repo_matches_the_onnx_model(tiny_clipn: Any, tmp_path: Path, options: dict[str, bool]) -> None:
    classes = ["cat", 'hot dog, "chili"', "日本の猫"]
    result = export_bundle(
        tiny_clipn, classes, tmp_path / "b", max_batch=8, triton_repo=tmp_path / "repo", triton_name="clipn_tiny",
        progress=False, **options,
    )  # fmt: skip
    model_dir = tmp_path / "repo" / "clipn_tiny"
    assert result.triton_dir == model_dir
    served = model_dir / "1" / "model.onnx"
    assert served.read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text(encoding="utf-8"))
    assert config["name"] == ["clipn_tiny"]
    _check_against_onnx(config, onnx.load(str(served)), max_batch=8)
    assert (model_dir / "labels.txt").read_text(encoding="utf-8").splitlines() == classes


def test_triton_prefers_the_reduced_precision_engine(tiny_clipn: Any, tmp_path: Path) -> None:
    export_bundle(
        tiny_clipn, ["cat", "dog"], tmp_path / "b", fp16=True, triton_repo=tmp_path / "repo", progress=False
    )
    served = tmp_path / "repo" / "clipn" / "1" / "model.onnx"
    assert served.read_bytes() == (tmp_path / "b" / "model.fp16.onnx").read_bytes()
    _check_against_onnx(
        parse_pbtxt((served.parent.parent / "config.pbtxt").read_text()), onnx.load(str(served)), 32
    )


def test_existing_model_dir_is_refused_before_any_work(tiny_clipn: Any, tmp_path: Path) -> None:
    (tmp_path / "repo" / "clipn").mkdir(parents=True)
    with pytest.raises(UserError, match="already exists"):
        export_bundle(tiny_clipn, ["cat"], tmp_path / "b", triton_repo=tmp_path / "repo", progress=False)
    assert not (tmp_path / "b").exists()
    with pytest.raises(UserError, match="Triton model name"):
        export_bundle(
            tiny_clipn, ["cat"], tmp_path / "b", triton_repo=tmp_path / "r", triton_name="a/b", progress=False
        )


def test_plan_config_uses_tensorrt_platform_and_gpu_instances(tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine bytes")
    inputs = [TensorSpec("image", ["batch", 3, 224, 224], "float32")]
    outputs = [TensorSpec("pred", ["batch"], "int32"), TensorSpec("atd", ["batch"], "float32")]
    model_dir = write_triton_repo(
        tmp_path / "repo", "m", plan, max_batch=16, inputs=inputs, outputs=outputs, classes=["a"]
    )
    cfg = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert cfg["platform"] == ["tensorrt_plan"] and (model_dir / "1" / "model.plan").is_file()
    assert cfg["instance_group"] == [{"kind": ["KIND_GPU"], "count": [1]}]
    assert [o["data_type"][0] for o in cfg["output"]] == ["TYPE_INT32", "TYPE_FP32"]
    assert cfg["input"][0]["dims"] == [3, 224, 224]


def test_only_the_batch_axis_may_be_dynamic() -> None:
    with pytest.raises(ValueError, match="only the batch axis"):
        config_pbtxt("m", "onnxruntime_onnx", 4, [TensorSpec("image", ["batch", 3, "h", "w"], "float32")], [])
