"""--triton-repo: every generated config.pbtxt parses against Triton's own schema (model_config.proto, vendored in
tests/data/triton with its source) and agrees with the model it serves, for every bundle kind."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fake_gpu import COMPUTE_CAPABILITY, GPU_NAME, install_fake_gpu

from clipn_export import tensorrt as trt_mod
from clipn_export.exporter import export_bundle
from clipn_export.triton import write_triton_repo
from clipn_runtime.bundle import TensorSpec
from clipn_runtime.errors import UserError
from clipn_runtime.scoring import FULL_OUTPUTS

PROTO = Path(__file__).parent / "data" / "triton" / "model_config.proto"
ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}


def _protoc() -> str | None:
    found = shutil.which("protoc")
    if found:
        return found
    import torch  # torch wheels ship protoc

    bundled = Path(torch.__file__).parent / "bin" / "protoc"
    return str(bundled) if bundled.is_file() else None


@pytest.fixture(scope="module")
def model_config(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Triton's ``inference.ModelConfig`` message class, compiled from the vendored model_config.proto."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    protoc = _protoc()
    if protoc is None:
        pytest.skip("no protoc to compile Triton's model_config.proto (torch wheels ship one in torch/bin)")
    out = tmp_path_factory.mktemp("proto") / "model_config.desc"
    subprocess.run([protoc, f"--proto_path={PROTO.parent}", f"--descriptor_set_out={out}", PROTO.name], check=True)
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in files.file:
        pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def load_config(model_config: Any, model_dir: Path) -> Any:
    """Parse config.pbtxt strictly (an unknown field or enum value is an error, as in Triton)."""
    from google.protobuf import text_format

    return text_format.Parse((model_dir / "config.pbtxt").read_text(encoding="utf-8"), model_config())


def _type_name(cfg: Any, value: int) -> str:
    return str(cfg.DESCRIPTOR.file.enum_types_by_name["DataType"].values_by_number[value].name)


def check_repository(model_config: Any, model_dir: Path) -> Any:
    """Triton's rules that the schema alone does not carry, checked on ``model_dir``; returns the config."""
    cfg = load_config(model_config, model_dir)
    assert cfg.name == model_dir.name
    assert cfg.max_batch_size >= 1 and cfg.HasField("dynamic_batching")
    served = model_dir / "1" / ("model.plan" if cfg.platform == "tensorrt_plan" else "model.onnx")
    assert cfg.platform in ("onnxruntime_onnx", "tensorrt_plan") and served.exists()
    readme = (model_dir / "README.md").read_text(encoding="utf-8")
    for t in [*cfg.input, *cfg.output]:
        assert t.dims and all(d == -1 or d >= 1 for d in t.dims), t.name
        if t.HasField("reshape"):  # the model's shape: same element count as dims
            assert int(np.prod(t.reshape.shape)) == int(np.prod(t.dims)), t.name
        # the README tells clients the shape they get: the batch, then the dims
        assert f"| `{t.name}` | " in readme and f"`{['N', *t.dims]}`" in readme, t.name
    for t in cfg.output:
        per_class = t.name in FULL_OUTPUTS
        assert (t.label_filename == "labels.txt") == per_class, t.name
        if per_class:
            labels = (model_dir / t.label_filename).read_text(encoding="utf-8").splitlines()
            assert t.dims[0] in (-1, len(labels)), t.name
    return cfg


def check_against_onnx(cfg: Any, model: onnx.ModelProto) -> None:
    """dims omit the batch axis; symbolic axes are -1; a [batch] tensor is dims [1] + reshape []."""
    inits = {i.name for i in model.graph.initializer}
    for section, values in (
        (cfg.input, [v for v in model.graph.input if v.name not in inits]),
        (cfg.output, model.graph.output),
    ):
        assert [e.name for e in section] == [v.name for v in values]
        for entry, v in zip(section, values, strict=True):
            t = v.type.tensor_type
            assert _type_name(cfg, entry.data_type) == ONNX_TO_TRITON[t.elem_type], v.name
            dims = t.shape.dim
            assert dims[0].dim_param == "batch", v.name
            rest = [d.dim_value if d.dim_value > 0 else -1 for d in dims[1:]]
            if rest:
                assert list(entry.dims) == rest and not entry.HasField("reshape"), v.name
            else:
                assert list(entry.dims) == [1] and list(entry.reshape.shape) == [], v.name


KINDS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "fp16": {"fp16": True},
    "int8": {"int8": True},
    "uint8-full-embeddings": {"uint8_input": True, "full_outputs": True, "embeddings": True},
    "open-vocabulary-full": {"open_vocabulary": True, "full_outputs": True},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_triton_repository_of_every_onnx_bundle_kind(
    model_config: Any, tiny_clipn: Any, tmp_path: Path, kind: str
) -> None:
    classes = ["cat", 'hot dog, "chili"', "日本の猫"]
    result = export_bundle(
        tiny_clipn, classes, tmp_path / "b", max_batch=8, triton_repo=tmp_path / "repo", triton_name="clipn_tiny",
        progress=False, **KINDS[kind],
    )  # fmt: skip
    model_dir = tmp_path / "repo" / "clipn_tiny"
    assert result.triton_dir == model_dir
    engine = {"fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}.get(kind, "model.onnx")
    served = model_dir / "1" / "model.onnx"
    assert served.read_bytes() == (tmp_path / "b" / engine).read_bytes()
    cfg = check_repository(model_config, model_dir)
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    check_against_onnx(cfg, onnx.load(str(served)))
    assert (model_dir / "labels.txt").read_text(encoding="utf-8").splitlines() == classes
    if "full" in kind:
        assert {o.name for o in cfg.output if o.label_filename} == set(FULL_OUTPUTS)
        expected = -1 if kind.startswith("open") else len(classes)
        assert {o.dims[0] for o in cfg.output if o.name in FULL_OUTPUTS} == {expected}


def test_triton_repository_of_a_plan_names_its_tensorrt(
    model_config: Any, tiny_clipn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan only loads in a Triton whose TensorRT built it: the config and README say which."""
    gpu = install_fake_gpu(monkeypatch, "10.13.3")
    cc = "{}.{}".format(*COMPUTE_CAPABILITY)
    monkeypatch.setattr(trt_mod, "gpu_info", lambda: {"gpu": GPU_NAME, "compute_capability": cc})
    export_bundle(
        tiny_clipn, ["cat", "dog"], tmp_path / "b", fp16=True, tensorrt=True, full_outputs=True, max_batch=4,
        triton_repo=tmp_path / "repo", progress=False,
    )  # fmt: skip
    model_dir = tmp_path / "repo" / "clipn"
    cfg = check_repository(model_config, model_dir)
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 4
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(1, 1)]  # KIND_GPU
    assert (model_dir / "1" / "model.plan").read_bytes() == (tmp_path / "b" / "model.plan").read_bytes()
    want = f"TensorRT {gpu.trt.__version__} for compute capability {cc} ({GPU_NAME})"
    assert want in (model_dir / "config.pbtxt").read_text() and want in (model_dir / "README.md").read_text()


def test_an_onnx_model_with_external_data_is_a_model_onnx_folder(model_config: Any, tmp_path: Path) -> None:
    """Triton loads an ONNX model with external weights from the folder 1/model.onnx/ (graph + weights)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [w],
    )
    src = tmp_path / "engine" / "model.fp16.onnx"
    src.parent.mkdir()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(src), save_as_external_data=True, location="model.fp16.onnx.data", size_threshold=0)
    model_dir = write_triton_repo(
        tmp_path / "repo", "m", src, max_batch=4, classes=["a"],
        inputs=[TensorSpec("x", ["batch", 3], "float32")], outputs=[TensorSpec("y", ["batch", 2], "float32")],
    )  # fmt: skip
    folder = model_dir / "1" / "model.onnx"
    assert folder.is_dir() and sorted(p.name for p in folder.iterdir()) == ["model.fp16.onnx.data", "model.onnx"]
    check_repository(model_config, model_dir)
    y = ort.InferenceSession(str(folder / "model.onnx")).run(None, {"x": np.ones((1, 3), np.float32)})[0]
    np.testing.assert_array_equal(y, [[6.0, 9.0]])


def test_symbolic_axes_become_minus_one_and_scalars_come_back_as_n_by_1(model_config: Any, tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine bytes")
    inputs = [TensorSpec("image", ["batch", 3, 224, 224], "float32")]
    outputs = [TensorSpec("pred", ["batch"], "int64"), TensorSpec("probs", ["batch", "classes"], "float32")]
    model_dir = write_triton_repo(
        tmp_path / "repo", "m", plan, max_batch=16, inputs=inputs, outputs=outputs, classes=["a", "b"]
    )
    cfg = check_repository(model_config, model_dir)
    pred, probs = cfg.output
    assert list(pred.dims) == [1] and pred.HasField("reshape") and not pred.label_filename
    assert list(probs.dims) == [-1] and probs.label_filename == "labels.txt"
    assert "`['N', 1]`" in (model_dir / "README.md").read_text()


def test_existing_model_dir_is_refused_before_any_work(tiny_clipn: Any, tmp_path: Path) -> None:
    (tmp_path / "repo" / "clipn").mkdir(parents=True)
    with pytest.raises(UserError, match="already exists"):
        export_bundle(tiny_clipn, ["cat"], tmp_path / "b", triton_repo=tmp_path / "repo", progress=False)
    assert not (tmp_path / "b").exists()
    with pytest.raises(UserError, match="Triton model name"):
        export_bundle(
            tiny_clipn, ["cat"], tmp_path / "b", triton_repo=tmp_path / "r", triton_name="a/b", progress=False
        )
