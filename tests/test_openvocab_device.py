"""Open-vocabulary class banks follow the detector's --device (they used to run on CPU whatever it said)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import copy_bundle
from fake_gpu import FakeOrt

from clipn_runtime import engine as eng
from clipn_runtime.detector import Detector
from clipn_runtime.engine import CPU_EP, CUDA_EP, TRT_EP


def test_class_banks_are_computed_on_the_detectors_device(
    tiny_ov_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """BankBuilder's text encoders follow --device (CUDA here; not the TensorRT EP: they run once per list)."""
    bundle = copy_bundle(tiny_ov_bundle, tmp_path / "ov")
    fake = FakeOrt()  # onnxruntime-gpu whose providers all start
    monkeypatch.setattr(eng, "available_providers", lambda: [TRT_EP, CUDA_EP, CPU_EP])
    monkeypatch.setattr("onnxruntime.InferenceSession", fake.InferenceSession)
    det = Detector(bundle, device="cuda")
    det.set_classes(["zebra", "tram"], progress=False)
    text = [c for c in fake.calls if c.source.startswith("text_encoder_")]
    assert sorted(c.source for c in text) == ["text_encoder_no.onnx", "text_encoder_yes.onnx"]
    assert all(c.providers == [CUDA_EP, CPU_EP] for c in text)
