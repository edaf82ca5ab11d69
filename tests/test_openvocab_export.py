"""``clipn-export --open-vocabulary``: text encoders, tokenizer, banks as engine inputs, manifest, CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from clipn_runtime.bundle import load_manifest
from clipn_runtime.tokenizer import ClipTokenizer


def test_manifest_lists_the_encoders_tokenizer_and_bank_inputs(tiny_ov_bundle: Path, tiny_clipn: Any) -> None:
    m = load_manifest(tiny_ov_bundle)
    ov = m.open_vocabulary
    assert ov is not None
    roles = {f.role: f for f in m.files}
    assert roles["text_encoder_yes"].path == ov.text_encoders["yes"] == "text_encoder_yes.onnx"
    assert roles["text_encoder_no"].path == ov.text_encoders["no"] == "text_encoder_no.onnx"
    assert roles["tokenizer"].path == ov.tokenizer == "tokenizer.json"
    assert ov.sequence == "dynamic" and ov.truncation_is_exact and ov.context_length == 77
    assert ov.embed_dim == tiny_clipn.model.embed_dim
    assert ov.parity["passed"] is True and ov.parity["max_abs"] <= 1e-5
    assert ov.parity["tokenizer"]["compared"] > 0 and ov.parity["tokenizer"]["mismatches"] == 0
    assert "--open-vocabulary" in __import__("clipn_runtime.vocab").vocab.export_command(
        m, tiny_ov_bundle, "c.txt"
    )
    # the prompt set travels in the manifest, verbatim
    assert m.prompts["yes"][0].startswith("'") and len(m.prompts["yes"]) == 128


def test_every_engine_takes_the_banks_as_inputs_defaulting_to_the_baked_ones(tiny_ov_bundle: Path) -> None:
    m = load_manifest(tiny_ov_bundle)
    ov = m.open_vocabulary
    assert ov is not None and {e.precision for e in m.engines()} == {"fp32", "fp16", "int8"}
    with np.load(tiny_ov_bundle / "text_bank.npz") as z:
        baked = {"yes": z["yes"], "no": z["no"]}
    for e in m.engines():
        model = onnx.load(str(tiny_ov_bundle / e.path))
        inits = {i.name: i for i in model.graph.initializer}
        inputs = {i.name: i for i in model.graph.input}
        for tower in ("yes", "no"):
            name = ov.bank_inputs[tower]
            assert name in inputs and name in inits, (e.path, name)  # an overridable initialiser
            dims = [d.dim_param or d.dim_value for d in inputs[name].type.tensor_type.shape.dim]
            assert dims == ["classes", ov.embed_dim]
            default = onnx.numpy_helper.to_array(inits[name])
            assert np.abs(default - baked[tower]).max() <= 1e-6
        from clipn_export.precision import make_session

        sess = make_session(tiny_ov_bundle / e.path, e.precision)
        over = {i.name for i in sess.get_overridable_initializers()}
        assert set(ov.bank_inputs.values()) <= over


def test_new_banks_fed_to_the_engine_change_the_class_count(tiny_ov_bundle: Path) -> None:
    from clipn_export.precision import make_session

    m = load_manifest(tiny_ov_bundle)
    ov = m.open_vocabulary
    assert ov is not None
    sess = make_session(tiny_ov_bundle / "model.onnx", "fp32")
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    rng = np.random.default_rng(1)
    for c in (1, 2, 7):
        w = rng.standard_normal((c, ov.embed_dim)).astype(np.float32)
        out = dict(
            zip(
                [o.name for o in sess.get_outputs()],
                sess.run(None, {"image": x, ov.bank_inputs["yes"]: w, ov.bank_inputs["no"]: w[::-1].copy()}),
                strict=True,
            )
        )
        assert out["pred"].shape == (3,) and (out["pred"] < c).all()
        assert np.isfinite(out["atd"]).all()


@pytest.mark.parametrize("tower", ["yes", "no"])
def test_text_encoders_equal_pytorch_at_any_length_and_batch(
    tiny_ov_bundle: Path, tiny_clipn: Any, tower: str
) -> None:
    sess = ort.InferenceSession(
        str(tiny_ov_bundle / f"text_encoder_{tower}.onnx"), providers=["CPUExecutionProvider"]
    )
    inp = sess.get_inputs()[0]
    assert inp.name == "tokens" and inp.shape == ["batch", "sequence"]
    tokens = tiny_clipn.tokenizer(["a photo of a cat.", "x", "a long prompt " * 30])
    encode = tiny_clipn.model.encode_text if tower == "yes" else tiny_clipn.model.encode_text_no
    for length in (2, 5, 23, 77):
        for rows in (slice(0, 1), slice(0, 3)):
            t = tokens[rows, :length]
            with torch.inference_mode():
                ref = encode(t, normalize=False).numpy()
            got = sess.run(None, {"tokens": t.numpy()})[0]
            assert np.abs(got - ref).max() <= 1e-5, (length, rows)


def test_no_encoder_holds_the_mean_prompt_not_the_sixteen(tiny_ov_bundle: Path, tiny_clipn: Any) -> None:
    model = onnx.load(str(tiny_ov_bundle / "text_encoder_no.onnx"))
    shapes = [tuple(i.dims) for i in model.graph.initializer]
    width = tiny_clipn.model.width
    assert (16, 77, width) not in shapes and (1, 77, width) in shapes


def test_bundled_tokenizer_matches_open_clip(tiny_ov_bundle: Path, tiny_clipn: Any) -> None:
    tok = ClipTokenizer.from_file(tiny_ov_bundle / "tokenizer.json")
    texts = ["a photo of a cat.", "'a bad photo of a 日本の猫.',", "x" * 500, ""]
    assert np.array_equal(tok(texts), tiny_clipn.tokenizer(texts).numpy())


def test_export_without_open_vocabulary_is_unchanged(tiny_bundle: Path) -> None:
    m = load_manifest(tiny_bundle)
    assert m.open_vocabulary is None
    assert not {"text_encoder_yes", "text_encoder_no", "tokenizer"} & {f.role for f in m.files}
    model = onnx.load(str(tiny_bundle / "model.onnx"))
    inits = {i.name for i in model.graph.initializer}
    assert [i.name for i in model.graph.input if i.name not in inits] == ["image"]
    assert all(i.name not in inits for i in model.graph.input)


@pytest.mark.slow
def test_clipn_export_open_vocabulary_cli(
    tiny_official_checkpoint: Path, tiny_config: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from clipn_export.cli import main

    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n", encoding="utf-8")
    out = tmp_path / "b"
    r = CliRunner().invoke(
        main,
        [
            "--checkpoint",
            str(tiny_official_checkpoint),
            "--model",
            str(tiny_config),
            "--classes",
            str(classes),
            "-o",
            str(out),
            "--open-vocabulary",
            "--prompts",
            "openai",
            "--quiet",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    m = load_manifest(out)
    assert m.open_vocabulary is not None and m.prompts["name"] == "openai"
    assert "--open-vocabulary" in main.get_help(__import__("click").Context(main))
