"""The exported engine: one ONNX graph (encoder + banks + fused head) that equals PyTorch + the reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from clipn_export import onnx_export as ox
from clipn_export.exporter import export_bundle
from clipn_export.head import normalize_uint8
from clipn_export.parity import parity_images
from clipn_export.precision import ENGINE_FILES, make_session
from clipn_runtime.bundle import BundleError, load_manifest
from clipn_runtime.errors import UserError
from clipn_runtime.scoring import BASELINE_OUTPUTS, FULL_OUTPUTS, SCALAR_OUTPUTS, score_features

DECISIONS = ("pred", "ood_ctw", "ood_atd")
CLASSES = ["cat", "dog", "car"]


def _reference(loaded: Any, bundle: Path, pixels: np.ndarray) -> Any:
    manifest = load_manifest(bundle)
    with np.load(bundle / "text_bank.npz") as z:
        yes, no = z["yes"], z["no"]
    with torch.inference_mode():
        feats = loaded.model.encode_image(torch.from_numpy(pixels), normalize=False).numpy()
        # MCM's one-prompt bank, encoded here at the full context (the exporter cuts prompts to their length)
        tokens = loaded.tokenizer([f"a photo of a {c}." for c in manifest.classes])
        single = loaded.model.encode_text(tokens, normalize=True).numpy()
    return score_features(feats, yes, no, manifest.scoring.scale, bank_single=single)


def _run(bundle: Path, precision: str, x: np.ndarray) -> dict[str, np.ndarray]:
    session = make_session(bundle / ENGINE_FILES[precision], precision)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": x}), strict=True))


@pytest.fixture(scope="module")
def full_bundle(tiny_bundle_factory: Any) -> Path:
    """fp32 + fp16 + int8 engines with every optional output."""
    return tiny_bundle_factory(fp16=True, int8=True, full_outputs=True, embeddings=True, scale=100.0)


def test_exporter_choice_is_pinned(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Legacy TorchScript exporter (dynamo=False), opset 17 with native LayerNormalization."""
    assert ox.EXPORTER == "torchscript" and ox.OPSET == 17
    seen: list[dict[str, Any]] = []
    real = torch.onnx.export

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    ox.export_preprocess((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 8)
    assert seen and seen[0]["dynamo"] is False and seen[0]["opset_version"] == 17

    model = onnx.load(str(tiny_bundle / "model.onnx"))
    onnx.checker.check_model(model)
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 17
    ops = {n.op_type for n in model.graph.node}
    assert "LayerNormalization" in ops
    names = [n.name for n in model.graph.node]
    assert all(n.startswith((ox.PREFIX_ENCODER, ox.PREFIX_HEAD)) for n in names)
    manifest = load_manifest(tiny_bundle)
    assert manifest.versions["exporter"] == "torchscript" and manifest.versions["opset"] == 17


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_dynamic_batch_equals_pytorch_and_reference(tiny_clipn: Any, full_bundle: Path, batch: int) -> None:
    manifest = load_manifest(full_bundle)
    pixels = normalize_uint8(
        parity_images(batch, 32, seed=batch), manifest.preprocess.mean, manifest.preprocess.std
    )
    got = _run(full_bundle, "fp32", pixels)
    ref = _reference(tiny_clipn, full_bundle, pixels)
    assert set(got) == set(SCALAR_OUTPUTS + BASELINE_OUTPUTS + FULL_OUTPUTS + ("embedding",))
    for name in SCALAR_OUTPUTS + BASELINE_OUTPUTS + FULL_OUTPUTS:
        want = getattr(ref, name)
        assert got[name].shape == want.shape, name
        if name in DECISIONS:
            # Exact: these images sit ≥ 1.1 logits from a class tie and ≥ 0.37 from p_no = 0.5, 10⁴× the float error.
            np.testing.assert_array_equal(got[name], want, err_msg=name)
        else:
            # 1e-5 on probabilities; logit-valued outputs are 100× cosines, so 1e-5 relative to s = 100.
            tol = 1e-3 if name in ("max_logit", "energy", "logits", "logits_no") else 1e-5
            np.testing.assert_allclose(got[name], want, rtol=0, atol=tol, err_msg=name)
    assert got["pred"].dtype == np.int64 and got["ood_atd"].dtype == np.bool_


def test_graph_signature_in_manifest(full_bundle: Path) -> None:
    manifest = load_manifest(full_bundle)
    engine = manifest.engine("fp32")
    assert [i.name for i in engine.inputs] == ["image"]
    assert engine.inputs[0].shape == ["batch", 3, 32, 32] and engine.inputs[0].dtype == "float32"
    assert [o.name for o in engine.outputs] == [*SCALAR_OUTPUTS, *BASELINE_OUTPUTS, *FULL_OUTPUTS, "embedding"]
    dtypes = {o.name: o.dtype for o in engine.outputs}
    assert dtypes["pred"] == "int64" and dtypes["ood_ctw"] == "bool" and dtypes["atd"] == "float32"
    shapes = {o.name: o.shape for o in engine.outputs}
    assert shapes["atd"] == ["batch"] and shapes["logits"] == ["batch", 3] and shapes["embedding"] == ["batch", 32]
    session = make_session(full_bundle / engine.path)
    assert [o.name for o in session.get_outputs()] == [o.name for o in engine.outputs]


def test_fp16_engine_loads_in_onnxruntime_cpu_and_is_close(tiny_clipn: Any, full_bundle: Path) -> None:
    manifest = load_manifest(full_bundle)
    engine = manifest.engine("fp16")
    assert engine.meta["onnxruntime_disabled_optimizers"] == ["NchwcTransformer"]
    model = onnx.load(str(full_bundle / engine.path))
    init_types = {i.name: i.data_type for i in model.graph.initializer}
    head_inits = [t for n, t in init_types.items() if n.startswith(ox.PREFIX_HEAD)]
    enc_inits = [t for n, t in init_types.items() if n.startswith(ox.PREFIX_ENCODER)]
    # The banks (and all head constants) stay fp32; the encoder's weights are fp16.
    assert head_inits and all(t != onnx.TensorProto.FLOAT16 for t in head_inits)
    assert onnx.TensorProto.FLOAT16 in enc_inits
    assert engine.inputs[0].dtype == manifest.preprocess.input_dtype == "float32"  # the cast is inside

    pixels = normalize_uint8(parity_images(6, 32, seed=11), manifest.preprocess.mean, manifest.preprocess.std)
    got = _run(full_bundle, "fp16", pixels)
    ref = _reference(tiny_clipn, full_bundle, pixels)
    for name in ("atd", "ctw", "p_ood", "prob", "mcm"):
        np.testing.assert_allclose(got[name], getattr(ref, name), atol=5e-3, err_msg=name)
    assert got["atd"].dtype == np.float32


def test_int8_engine_quantises_only_the_encoder_and_is_close(tiny_clipn: Any, full_bundle: Path) -> None:
    engine = load_manifest(full_bundle).engine("int8")
    model = onnx.load(str(full_bundle / engine.path))
    quant = [n.name for n in model.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeLinear")]
    assert quant and all(n.startswith(ox.PREFIX_ENCODER) for n in quant)
    assert not any(n.op_type == "MatMulInteger" for n in model.graph.node if n.name.startswith(ox.PREFIX_HEAD))
    manifest = load_manifest(full_bundle)
    pixels = normalize_uint8(parity_images(6, 32, seed=12), manifest.preprocess.mean, manifest.preprocess.std)
    got = _run(full_bundle, "int8", pixels)
    ref = _reference(tiny_clipn, full_bundle, pixels)
    for name in ("atd", "ctw", "p_ood"):
        np.testing.assert_allclose(got[name], getattr(ref, name), atol=5e-2, err_msg=name)
    assert (full_bundle / "model.int8.onnx").stat().st_size < (full_bundle / "model.onnx").stat().st_size


def test_uint8_input_equals_float_path(tiny_bundle_factory: Any, tiny_bundle: Path) -> None:
    bundle = tiny_bundle_factory(uint8_input=True, scale=100.0)
    manifest = load_manifest(bundle)
    assert manifest.preprocess.input_layout == "NHWC" and manifest.preprocess.input_dtype == "uint8"
    engine = manifest.engine()
    assert engine.inputs[0].shape == ["batch", 32, 32, 3] and engine.inputs[0].dtype == "uint8"
    crops = parity_images(5, 32, seed=3)
    got = _run(bundle, "fp32", crops)
    want = _run(tiny_bundle, "fp32", normalize_uint8(crops, manifest.preprocess.mean, manifest.preprocess.std))
    for name in SCALAR_OUTPUTS:
        if name in DECISIONS:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        else:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
    # The uint8 path also agrees with the float normalisation written the textbook way.
    pre = manifest.preprocess
    textbook = (crops.transpose(0, 3, 1, 2) / 255.0 - np.array(pre.mean)[:, None, None]) / np.array(pre.std)[
        :, None, None
    ]
    ref = _run(tiny_bundle, "fp32", textbook.astype(np.float32))
    np.testing.assert_allclose(got["atd"], ref["atd"], atol=1e-5)


def test_official_checkpoint_to_bundle(tiny_config: Path, tiny_official_checkpoint: Path, tmp_path: Path) -> None:
    from clipn_train.factory import create_clipn

    loaded = create_clipn(tiny_config, checkpoint=tiny_official_checkpoint)
    result = export_bundle(loaded, CLASSES, tmp_path / "b", progress=False)
    manifest = load_manifest(tmp_path / "b")
    assert manifest.model.checkpoint_kind == "official"
    assert manifest.model.checkpoint_sha256 == loaded.info.checkpoint_sha256
    assert manifest.model.variant == "learnable"
    assert manifest.parity["passed"] is True
    assert manifest.parity["engines"]["fp32"]["max_abs"]["atd"] <= 1e-4
    assert result.parity is not None and result.parity.passed
    # Default scale = exp(logit_scale) of the checkpoint's CLIP (random init here: 1/0.07).
    assert manifest.scoring.scale == pytest.approx(loaded.model.scale)


def test_manifest_round_trip_and_tamper_rejection(tiny_bundle_factory: Any) -> None:
    bundle = tiny_bundle_factory(classes=["cat", "dog"])
    manifest = load_manifest(bundle)
    assert manifest.classes == ["cat", "dog"]
    assert {f.path for f in manifest.files} == {"model.onnx", "text_bank.npz"}
    again = type(manifest).from_dict(json.loads(manifest.to_json()))
    assert again == manifest
    assert manifest.prompts["name"] == "clipn" and len(manifest.prompts["yes"]) == 128
    assert manifest.prompts["no_tower_templates"] == "yes"
    assert set(manifest.versions) >= {"clipn-ood", "torch", "open_clip_torch", "onnx", "opset", "exporter"}
    # Tampering with the engine or the bank breaks its hash.
    with open(bundle / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 does not match"):
        load_manifest(bundle)


def test_unicode_commas_and_quotes_survive(tiny_bundle_factory: Any) -> None:
    classes = ['hot dog, "chili"', "l'éléphant", "日本の猫", "a {curly} name", "back\\slash"]
    bundle = tiny_bundle_factory(classes=classes)
    manifest = load_manifest(bundle)
    assert manifest.classes == classes
    with np.load(bundle / "text_bank.npz", allow_pickle=False) as z:
        assert [str(c) for c in z["classes"]] == classes
        assert z["yes"].shape == (5, 32)
    raw = json.loads((bundle / "clipn.json").read_text(encoding="utf-8"))
    assert raw["classes"] == classes


def test_bad_arguments_fail_before_any_work(tiny_clipn: Any, tmp_path: Path) -> None:
    out = tmp_path / "b"
    with pytest.raises(UserError, match="empty"):
        export_bundle(tiny_clipn, [], out, progress=False)
    with pytest.raises(UserError, match="scale"):
        export_bundle(tiny_clipn, CLASSES, out, scale=-1.0, progress=False)
    with pytest.raises(UserError, match="max-batch"):
        export_bundle(tiny_clipn, CLASSES, out, max_batch=0, progress=False)
    assert not out.exists()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_bundle(tiny_clipn, CLASSES, junk, progress=False)
    with pytest.raises(UserError, match="not a clipn-ood bundle"):
        export_bundle(tiny_clipn, CLASSES, junk, overwrite=True, progress=False)
    assert (junk / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_a_bundle_and_leaves_no_staging(tiny_clipn: Any, tmp_path: Path) -> None:
    out = tmp_path / "b"
    export_bundle(tiny_clipn, ["cat", "dog"], out, progress=False)
    with pytest.raises(UserError, match="--overwrite"):
        export_bundle(tiny_clipn, CLASSES, out, progress=False)
    export_bundle(tiny_clipn, CLASSES, out, overwrite=True, progress=False)
    assert load_manifest(out).classes == CLASSES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_failed_export_leaves_nothing(tiny_clipn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("simulated crash while exporting the head")

    from clipn_export import onnx_export

    monkeypatch.setattr(onnx_export, "export_head", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        export_bundle(tiny_clipn, CLASSES, tmp_path / "b", progress=False)
    assert list(tmp_path.iterdir()) == []
