"""The parity gate checks the session clipn-detect runs: same construction, and clipn-export's --threads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_gpu import FakeOrt

from clipn_export.cli import main
from clipn_runtime.bundle import load_manifest
from clipn_runtime.detector import Detector


def test_parity_sessions_are_the_detectors_and_take_threads(
    tiny_official_checkpoint: Path, tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeOrt()  # records every session; computes with onnxruntime CPU
    monkeypatch.setattr("onnxruntime.InferenceSession", fake.InferenceSession)
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n", encoding="utf-8")
    out = tmp_path / "bundle"
    args = ["--checkpoint", str(tiny_official_checkpoint), "--model", str(tiny_config), "--classes", str(classes)]
    r = CliRunner().invoke(main, [*args, "-o", str(out), "--fp16", "--threads", "2", "--no-cache"])
    assert r.exit_code == 0, r.output
    gate = {c.source: c for c in fake.calls if c.source in ("model.onnx", "model.fp16.onnx")}
    assert set(gate) == {"model.onnx", "model.fp16.onnx"}
    assert all(c.threads == 2 for c in gate.values())
    meta = load_manifest(out).engine("fp16").meta
    assert gate["model.fp16.onnx"].disabled_optimizers == meta["onnxruntime_disabled_optimizers"]

    fake.calls.clear()
    Detector(out, device="cpu", precision="fp16", threads=2)
    (detect,) = [c for c in fake.calls if c.source == "model.fp16.onnx"]
    # same providers, provider options, disabled optimisers and threads
    assert replace(detect, source="x") == replace(gate["model.fp16.onnx"], source="x")
