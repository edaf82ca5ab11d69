"""The bundle manifest: round trip, schema errors that say what is wrong, tamper detection."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import hashed_bundle

from clipn_runtime.bundle import (
    MANIFEST_NAME,
    BundleError,
    BundleFile,
    ModelIdentity,
    TensorSpec,
    load_manifest,
    sha256_file,
    write_manifest,
)
from clipn_runtime.vocab import ClassListMismatch, check_classes


def test_round_trip(tmp_path: Path) -> None:
    m = hashed_bundle(tmp_path)
    loaded = load_manifest(tmp_path)
    assert loaded == m
    assert loaded.engine("fp32").path == "model.onnx"
    assert loaded.engine().output("pred") == TensorSpec("pred", ["batch"], "int64")
    with pytest.raises(BundleError, match="no int8 engine .*clipn-export --int8"):
        loaded.engine("int8")


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    hashed_bundle(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match=r"model.onnx: sha256 does not match"):
        load_manifest(tmp_path)
    assert load_manifest(tmp_path, verify_hashes=False).classes[0] == "cat"


def test_missing_file_and_unknown_version(tmp_path: Path) -> None:
    hashed_bundle(tmp_path)
    (tmp_path / "text_bank.npz").unlink()
    with pytest.raises(BundleError, match="text_bank.npz: listed in clipn.json but missing"):
        load_manifest(tmp_path)
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    raw["version"] = 99
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="version 99 is not supported"):
        load_manifest(tmp_path)


def test_schema_errors_list_every_problem(tmp_path: Path) -> None:
    hashed_bundle(tmp_path)
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


def test_not_ahashed_bundle(tmp_path: Path) -> None:
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


def _raw(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    return data


def _write_raw(root: Path, raw: dict[str, Any]) -> None:
    (root / MANIFEST_NAME).write_text(json.dumps(raw), encoding="utf-8")


def test_model_section_is_typed_and_keeps_what_it_does_not_know(tmp_path: Path) -> None:
    hashed_bundle(tmp_path)
    raw = _raw(tmp_path)
    raw["model"].update({"variant": "handcrafted", "context_length": 77, "from_a_newer_exporter": {"x": 1}})
    _write_raw(tmp_path, raw)
    m = load_manifest(tmp_path)
    assert isinstance(m.model, ModelIdentity)
    assert (m.model.name, m.model.variant, m.model.context_length) == ("ViT-B-16", "handcrafted", 77)
    assert not m.model.records_arguments  # written before the exporter recorded --model/--pretrained
    write_manifest(tmp_path, m)
    again = _raw(tmp_path)["model"]
    assert again["from_a_newer_exporter"] == {"x": 1} and set(raw["model"]) <= set(again)
    assert "extra" not in again  # the same JSON keys as before the section had a type
    assert load_manifest(tmp_path) == m


def test_model_section_errors_are_listed(tmp_path: Path) -> None:
    hashed_bundle(tmp_path)
    raw = _raw(tmp_path)
    raw["model"] = {"config": "ViT", "variant": "other", "context_length": 0, "checkpoint_path": 3}
    _write_raw(tmp_path, raw)
    with pytest.raises(BundleError) as e:
        load_manifest(tmp_path)
    for key in ("name", "config", "variant", "context_length", "checkpoint_path"):
        assert f"'model.{key}'" in str(e.value), key


def _listed(root: Path, path: str, role: str) -> dict[str, str]:
    (root / path).write_bytes(path.encode())
    return {"path": path, "sha256": sha256_file(root / path), "role": role}


def test_open_vocabulary_section_must_name_listed_files_with_their_roles(tmp_path: Path) -> None:
    hashed_bundle(tmp_path)
    raw = _raw(tmp_path)
    files = raw["files"]
    raw["open_vocabulary"] = {
        "text_encoders": {"yes": "yes.onnx", "no": "no.onnx"},
        "bank_inputs": {"yes": "bank", "no": "bank_no"},
        "tokenizer": "tok.json",
        "context_length": 77,
        "embed_dim": 8,
    }
    raw["files"] = [
        *files,
        _listed(tmp_path, "yes.onnx", "text_encoder_yes"),
        _listed(tmp_path, "tok.json", "other"),
    ]
    _write_raw(tmp_path, raw)
    with pytest.raises(BundleError) as e:
        load_manifest(tmp_path)
    msg = str(e.value)
    assert "'open_vocabulary' names 'no.onnx', which 'files' does not list" in msg
    assert "'tok.json' as the tokenizer, but 'files' lists it as 'other'" in msg
    assert "yes.onnx" not in msg
    raw["files"] = [
        *files,
        _listed(tmp_path, "yes.onnx", "text_encoder_yes"),
        _listed(tmp_path, "no.onnx", "text_encoder_no"),
        _listed(tmp_path, "tok.json", "tokenizer"),
    ]
    _write_raw(tmp_path, raw)
    assert load_manifest(tmp_path).is_open_vocabulary


def test_the_section_not_the_file_roles_makes_a_bundle_open_vocabulary(tmp_path: Path) -> None:
    m = hashed_bundle(tmp_path)
    roles = [BundleFile(f"{r}.bin", "0" * 64, r) for r in ("text_encoder_yes", "text_encoder_no", "tokenizer")]
    with_roles = replace(m, files=[*m.files, *roles])
    assert not with_roles.is_open_vocabulary
    # no section, so no way to compute banks: the answer is the export that makes one, not a silent accept
    with pytest.raises(ClassListMismatch) as e:
        check_classes(with_roles, ["another class"])
    assert "--open-vocabulary" in (e.value.open_vocabulary_command or "")
