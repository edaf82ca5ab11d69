"""The Detector API on a synthetic bundle: results equal open_clip's transform + the numpy scoring core."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import SyntheticBundle, SyntheticBundleFactory
from PIL import Image

from clipn_runtime.bundle import (
    MANIFEST_NAME,
    BundleError,
    BundleFile,
    ModelIdentity,
    OpenVocabulary,
    load_manifest,
    sha256_file,
)
from clipn_runtime.detector import RECORD_FIELDS, Detection, Detector
from clipn_runtime.errors import UserError
from clipn_runtime.vocab import ClassListMismatch, export_command

FIELDS = ("prob", "p_no", "ctw", "atd", "p_ood")


def _images(tmp_path: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(10, 60)), int(rng.integers(10, 60))
        p = tmp_path / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _reference(bundle: Any, paths: list[Path]) -> Any:
    """open_clip's own eval transform, then the bundle's encoder and clipn_runtime.scoring (numpy).

    On a runtime-only install (no open_clip) the transform is the runtime's own Preprocessor, whose equality with
    open_clip's is pinned by test_runtime_preprocess wherever open_clip is installed (the main CI run)."""
    pre = bundle.preprocess
    try:
        import open_clip
    except ImportError:
        from clipn_runtime.preprocess import Preprocessor

        batch = np.stack([Preprocessor(pre)(Image.open(p)) for p in paths])
    else:
        tf = open_clip.image_transform(pre.image_size, is_train=False, mean=pre.mean, std=pre.std)
        batch = np.stack([tf(Image.open(p)).numpy() for p in paths])
    return bundle.reference(batch)


def _assert_matches(dets: list[Detection], ref: Any, classes: list[str], method: str = "atd") -> None:
    for i, d in enumerate(dets):
        assert d.ok, d.error
        assert d.pred_index == ref.pred[i] and d.pred == classes[ref.pred[i]]
        for f in FIELDS:
            assert abs(getattr(d, f) - getattr(ref, f)[i]) <= 1e-5, (f, i)
        assert d.ood == bool(getattr(ref, f"ood_{method}")[i])
        assert d.method == method
        assert abs(d.scores["energy"] - ref.energy[i]) <= 1e-4


def test_detect_paths_equals_reference(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    paths = _images(tmp_path, 11)
    det = Detector(synthetic_bundle.root, batch_size=4)
    dets = det.detect(paths)
    assert [d.path for d in dets] == [str(p) for p in paths]
    _assert_matches(dets, _reference(synthetic_bundle, paths), synthetic_bundle.classes)
    assert {d.ood for d in dets} == {True, False}  # both decisions occur, so `ood` is really checked
    # Alone (batch 1) vs in a batch of 4: the same decision, scores equal up to fp32 rounding (onnxruntime may
    # sum in another order for another batch shape).
    alone = det.detect(str(paths[0]))[0]
    assert (alone.path, alone.pred, alone.ood) == (dets[0].path, dets[0].pred, dets[0].ood)
    assert alone.scores == pytest.approx(dets[0].scores, rel=1e-5, abs=1e-6)


def test_ctw_method(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    paths = _images(tmp_path, 5, seed=1)
    dets = Detector(synthetic_bundle.root, method="ctw").detect(paths)
    _assert_matches(dets, _reference(synthetic_bundle, paths), synthetic_bundle.classes, method="ctw")
    assert {d.ood for d in dets} == {True, False}
    with pytest.raises(ValueError, match="method must be one of atd, ctw, msp"):
        Detector(synthetic_bundle.root, method="maxlogits")
    # A baseline has no rule of its own: it needs clipn-calibrate's threshold (tests/test_calibration.py).
    with pytest.raises(UserError, match="needs a calibrated threshold. Run clipn-calibrate"):
        Detector(synthetic_bundle.root, method="msp")


def test_frames_and_pil_equal_paths(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    paths = _images(tmp_path, 6, seed=2)
    det = Detector(synthetic_bundle.root, batch_size=4)
    by_path = det.detect(paths)
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    by_frame = det.detect_frames(frames)
    by_pil = det.detect([Image.open(p) for p in paths])
    assert det.detect_frames(frames[0]) == [replace(by_path[0], path=None)]
    for a, b, c in zip(by_path, by_frame, by_pil, strict=True):
        assert b.path is None and c.path is None
        assert replace(a, path=None) == b == c
        assert a.scores == b.scores


def test_uint8_nhwc_bundle_equals_float_bundle(
    synthetic_bundle_factory: SyntheticBundleFactory, tmp_path: Path
) -> None:
    classes = ["x", "y", "z"]
    f32 = synthetic_bundle_factory(classes, seed=5)
    u8 = synthetic_bundle_factory(classes, seed=5, input_dtype="uint8", input_layout="NHWC")
    paths = _images(tmp_path, 5, seed=3)
    a, b = Detector(f32.root).detect(paths), Detector(u8.root).detect(paths)
    for x, y in zip(a, b, strict=True):
        assert x.pred_index == y.pred_index and x.ood == y.ood
        assert all(abs(getattr(x, f) - getattr(y, f)) <= 1e-5 for f in FIELDS)


def test_bad_inputs_become_error_records_in_order(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    good = _images(tmp_path, 2)
    (tmp_path / "bad.jpg").write_text("text")
    (tmp_path / "zero.png").write_bytes(b"")
    items = [good[0], tmp_path / "bad.jpg", tmp_path / "missing.png", tmp_path / "zero.png", good[1]]
    dets = Detector(synthetic_bundle.root, batch_size=2).detect(items)
    assert [d.ok for d in dets] == [True, False, False, False, True]
    assert dets[1].error == "not an image (PIL cannot identify the file format)"
    assert dets[2].error == "no such file" and dets[3].error == "empty file (0 bytes)"
    assert all(getattr(dets[1], f) is None for f in ("pred", "pred_index", *FIELDS, "ood"))
    not_a_path: Any = 3  # what an untyped caller may pass: refused with a TypeError, not scored
    with pytest.raises(TypeError, match="cannot detect on a int"):
        Detector(synthetic_bundle.root).detect([not_a_path])


def test_record_fields(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    d = Detector(synthetic_bundle.root).detect(_images(tmp_path, 1))[0]
    rec = d.to_dict()
    assert tuple(rec) == RECORD_FIELDS
    assert isinstance(rec["pred_index"], int) and isinstance(rec["ood"], bool) and rec["error"] is None
    json.dumps(rec)


def test_streaming_is_lazy_and_bounded(synthetic_bundle: SyntheticBundle) -> None:
    """An endless input stream: results come out while at most a few batches are held in memory."""
    pulled = 0
    frame = np.zeros((20, 20, 3), np.uint8)

    def endless() -> Any:
        nonlocal pulled
        for _ in itertools.count():
            pulled += 1
            yield frame

    det = Detector(synthetic_bundle.root, batch_size=4, decode_workers=2)
    got = list(itertools.islice(det.iter_detect(endless()), 10))
    assert len(got) == 10
    assert pulled <= 12 + 2 * 4 + 2  # what was scored, plus at most the in-flight window


def test_memory_stays_flat(synthetic_bundle: SyntheticBundle) -> None:
    import tracemalloc

    det = Detector(synthetic_bundle.root, batch_size=8)
    rng = np.random.default_rng(0)

    def frames(n: int) -> Any:
        for _ in range(n):
            yield rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)

    def peak(n: int) -> int:
        tracemalloc.start()
        count = sum(1 for _ in det.iter_detect(frames(n)))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count == n
        return top

    small, large = peak(100), peak(800)
    assert large < 1.5 * small + 200_000, (small, large)


def test_classes_equal_are_accepted_others_get_the_export_command(synthetic_bundle: SyntheticBundle) -> None:
    det = Detector(synthetic_bundle.root)
    det.set_classes(list(synthetic_bundle.classes))
    with pytest.raises(ClassListMismatch) as e:
        det.set_classes(["cat", "dog"], source="mine.txt")
    msg = str(e.value)
    assert (
        "mine.txt: not the classes this bundle was exported for (the bundle has 5 classes, the list has 2)" in msg
    )
    assert e.value.command in msg
    assert e.value.command.startswith("clipn-export --checkpoint <CHECKPOINT> --classes mine.txt -o ")
    assert "--model synthetic-linear" in e.value.command and "--scale 100.0" in e.value.command
    with pytest.raises(ClassListMismatch, match="same classes in a different order"):
        det.set_classes(list(reversed(synthetic_bundle.classes)))


def test_export_command_carries_the_bundle_options(synthetic_bundle: SyntheticBundle) -> None:
    m = load_manifest(synthetic_bundle.root)
    fp32 = m.files[0]
    fp16 = replace(fp32, path="model.fp16.onnx", precision="fp16")
    full = [
        *fp32.outputs,
        *(replace(fp32.outputs[0], name=n) for n in ("logits", "logits_no", "probs", "p_no_all")),
    ]
    m2 = replace(
        m,
        model=ModelIdentity("ViT-B-16", pretrained="laion2b_s34b_b88k", checkpoint_sha256="ab"),
        prompts={"name": "clean"},
        files=[replace(fp32, outputs=full), fp16, BundleFile("model.plan", "x", "tensorrt_engine")],
        preprocess=replace(m.preprocess, input_dtype="uint8", input_layout="NHWC"),
        tensorrt={"version": "10.3", "profile": {"max": [64, 3, 224, 224]}},
    )
    cmd = export_command(m2, "bundles/b/", "my classes.txt")
    assert cmd == (
        "clipn-export --checkpoint <CHECKPOINT> --classes 'my classes.txt' -o 'bundles/b-my classes' "
        "--model ViT-B-16 --pretrained laion2b_s34b_b88k --prompts clean --fp16 --uint8-input --full-outputs "
        "--scale 100.0 --tensorrt --max-batch 64"
    )
    local = replace(m, model=ModelIdentity("tiny", weights_sha256="cd", checkpoint_path="ckpt/latest.safetensors"))
    cmd = export_command(local, "b", "c.txt")
    assert "--checkpoint ckpt/latest.safetensors" in cmd and "--pretrained <PRETRAINED_WEIGHTS>" in cmd


def test_open_vocabulary_bundles_are_recognised(synthetic_bundle: SyntheticBundle) -> None:
    from clipn_runtime.vocab import check_classes

    m = load_manifest(synthetic_bundle.root)
    assert not m.is_open_vocabulary
    # the open_vocabulary section decides (load_manifest checks the files it names: tests/test_bundle.py)
    towers = {"yes": "text_encoder_yes.onnx", "no": "text_encoder_no.onnx"}
    section = OpenVocabulary(towers, {"yes": "bank", "no": "bank_no"}, "tokenizer.json", 77, 8)
    ov = replace(m, open_vocabulary=section)
    assert ov.is_open_vocabulary
    # open vocabulary: a different list is accepted (False: the runtime computes its banks, tests/test_openvocab_*.py)
    assert check_classes(ov, ["a"]) is False
    assert check_classes(ov, list(m.classes)) is True


def _rewrite_bank(root: Path, n_classes: int) -> None:
    np.savez(
        root / "text_bank.npz", yes=np.ones((n_classes, 8), np.float32), no=np.ones((n_classes, 8), np.float32)
    )
    raw = json.loads((root / MANIFEST_NAME).read_text())
    for f in raw["files"]:
        if f["path"] == "text_bank.npz":
            f["sha256"] = sha256_file(root / "text_bank.npz")
    (root / MANIFEST_NAME).write_text(json.dumps(raw))


def test_inconsistent_bundle_is_refused(synthetic_bundle_factory: SyntheticBundleFactory) -> None:
    b = synthetic_bundle_factory(["a", "b", "c"], full_outputs=True)
    Detector(b.root)
    _rewrite_bank(b.root, 4)
    with pytest.raises(BundleError, match=r"text_bank.npz:yes has 4 classes, manifest lists 3"):
        Detector(b.root)
    raw = json.loads((b.root / MANIFEST_NAME).read_text())
    raw["classes"] = ["a", "b", "c", "d"]
    raw["preprocess"]["image_size"] = 24
    # the manifest's own listing of the engine agrees with it (else its validation stops first): only the
    # engine itself disagrees
    for t in raw["files"][0]["inputs"] + raw["files"][0]["outputs"]:
        t["shape"] = [24 if a == 16 else 4 if a == 3 and len(t["shape"]) == 2 else a for a in t["shape"]]
    (b.root / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(BundleError) as e:
        Detector(b.root)
    assert "output 'logits' has 3 classes, the manifest lists 4" in str(e.value)
    assert "input 'image' has shape" in str(e.value)


def test_tampered_bundle_is_refused(synthetic_bundle_factory: SyntheticBundleFactory) -> None:
    b = synthetic_bundle_factory(["a", "b"])
    with open(b.root / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="sha256 does not match"):
        Detector(b.root)


def test_failed_parity_gate_is_warned(
    synthetic_bundle_factory: SyntheticBundleFactory, caplog: pytest.LogCaptureFixture
) -> None:
    b = synthetic_bundle_factory(["a", "b"])
    raw = json.loads((b.root / MANIFEST_NAME).read_text())
    raw["parity"] = {"passed": False}
    (b.root / MANIFEST_NAME).write_text(json.dumps(raw))
    with caplog.at_level("WARNING", logger="clipn_runtime"):
        Detector(b.root)
    assert "failed clipn-export's parity gate" in caplog.text


def test_context_manager_and_repr(synthetic_bundle: SyntheticBundle) -> None:
    with Detector(synthetic_bundle.root) as det:
        assert "5 classes" in repr(det) and det.provider == "CPUExecutionProvider"
