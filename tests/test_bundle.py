"""The bundle manifest: round trip, schema errors that say what is wrong, tamper detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipn_runtime.bundle import (
    MANIFEST_NAME,
    BundleError,
    BundleFile,
    Manifest,
    Preprocess,
    Scoring,
    TensorSpec,
    hash_entry,
    load_manifest,
    write_manifest,
)


def _bundle(tmp_path: Path) -> Manifest:
    (tmp_path / "model.onnx").write_bytes(b"not really onnx, but hashed all the same")
    (tmp_path / "text_bank.npz").write_bytes(b"bank")
    m = Manifest(
        model={"name": "ViT-B-16", "pretrained": None, "checkpoint_sha256": "ab" * 32},
        preprocess=Preprocess(224, (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)),
        classes=["cat", 'hot dog, "chili"', "日本"],
        prompts={"name": "clipn", "yes": ["a {}"], "no": ["no {}"]},
        scoring=Scoring(scale=100.0),
        files=[
            hash_entry(
                tmp_path,
                "model.onnx",
                "image_engine",
                precision="fp32",
                inputs=[TensorSpec("image", ["batch", 3, 224, 224], "float32")],
                outputs=[TensorSpec("pred", ["batch"], "int64")],
            ),
            hash_entry(tmp_path, "text_bank.npz", "text_bank"),
        ],
        versions={"clipn-ood": "0.1.0", "opset": 17},
    )
    write_manifest(tmp_path, m)
    return m


def test_round_trip(tmp_path: Path) -> None:
    m = _bundle(tmp_path)
    loaded = load_manifest(tmp_path)
    assert loaded == m
    assert loaded.engine("fp32").path == "model.onnx"
    assert loaded.engine().output("pred") == TensorSpec("pred", ["batch"], "int64")
    with pytest.raises(BundleError, match="no int8 engine .*clipn-export --int8"):
        loaded.engine("int8")


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    _bundle(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match=r"model.onnx: sha256 does not match"):
        load_manifest(tmp_path)
    assert load_manifest(tmp_path, verify_hashes=False).classes[0] == "cat"


def test_missing_file_and_unknown_version(tmp_path: Path) -> None:
    _bundle(tmp_path)
    (tmp_path / "text_bank.npz").unlink()
    with pytest.raises(BundleError, match="text_bank.npz: listed in clipn.json but missing"):
        load_manifest(tmp_path)
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    raw["version"] = 99
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="version 99 is not supported"):
        load_manifest(tmp_path)


def test_schema_errors_list_every_problem(tmp_path: Path) -> None:
    _bundle(tmp_path)
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    raw["classes"] = []
    raw["preprocess"]["mean"] = [0.5]
    raw["scoring"]["scale"] = -1
    raw["files"][0]["path"] = "../escape.onnx"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(BundleError) as e:
        load_manifest(tmp_path)
    msg = str(e.value)
    for part in ("'classes'", "'preprocess.mean'", "'scoring.scale'", "inside the bundle"):
        assert part in msg


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no clipn.json"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{ broken")
    with pytest.raises(BundleError, match=r"clipn.json:1: not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(BundleError, match="not a clipn-ood bundle"):
        load_manifest(tmp_path)


def test_bundle_file_defaults() -> None:
    f = BundleFile("a", "b", "image_engine")
    assert f.inputs == [] and f.output("x") is None
