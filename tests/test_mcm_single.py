"""MCM as its paper defines it: the exporter's one-prompt bank, the engine output ``mcm_single`` and the
``mcm-single`` method through calibrate → detect → eval; bundles without the bank refuse the method."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import TinyBundleFactory, make_images

from clipn_eval.cli import main as eval_main
from clipn_runtime.bundle import load_manifest
from clipn_runtime.calibrate_cli import main as calibrate_main
from clipn_runtime.cli import main as detect_main
from clipn_runtime.clikit import EXIT_OK, EXIT_USAGE
from clipn_runtime.detector import Detector
from clipn_runtime.errors import UserError
from clipn_runtime.preprocess import open_image
from clipn_runtime.scoring import MCM_PROMPT, METHODS, mcm

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def bundles(tiny_bundle_factory: TinyBundleFactory) -> dict[str, Path]:
    return {"with": tiny_bundle_factory(scale=100.0), "without": tiny_bundle_factory(scale=100.0, mcm_bank=False)}


def test_the_bundle_carries_the_bank_and_the_engine_scores_it(
    bundles: dict[str, Path], tiny_clipn: Any, tmp_path: Path
) -> None:
    manifest = load_manifest(bundles["with"])
    assert manifest.scoring.mcm_prompt == MCM_PROMPT == "a photo of a {}."
    assert "mcm_single" in [o.name for o in manifest.engine("fp32").outputs]
    assert manifest.parity["passed"] is True and "mcm_single" in manifest.parity["engines"]["fp32"]["max_abs"]
    without = load_manifest(bundles["without"])
    assert without.scoring.mcm_prompt is None
    # absent from the file, as before the bank existed: clipn-ood versions without it read the bundle
    assert (
        "mcm_prompt" not in json.loads((bundles["without"] / "clipn.json").read_text(encoding="utf-8"))["scoring"]
    )
    assert "mcm_single" not in [o.name for o in without.engine("fp32").outputs]

    # The engine's mcm_single against MCM computed here with the PyTorch model: cosines of the image feature
    # to "a photo of a <class>." through the plain CLIP (yes) tower, encoded at the full context.
    images = make_images(tmp_path / "img", 3)
    with Detector(bundles["with"], device="cpu", threads=1) as d:
        got = [r.scores["mcm_single"] for r in d.iter_detect([str(p) for p in images])]
        x = np.stack([d.preprocessor(open_image(str(p))) for p in images])
    model = tiny_clipn.model
    with torch.inference_mode():
        f = model.encode_image(torch.from_numpy(x), normalize=True)
        t = model.encode_text(
            tiny_clipn.tokenizer([f"a photo of a {c}." for c in manifest.classes]), normalize=True
        )
        want = mcm((f @ t.T).numpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # probabilities; fp32 encoders in two runtimes


def test_without_the_bank_the_method_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs MCM's one-prompt bank.*export it again"):
        Detector(bundles["without"], method="mcm-single", device="cpu")
    with Detector(bundles["without"], device="cpu") as d:
        assert d.methods == tuple(m for m in METHODS if m != "mcm-single")
    make_images(tmp_path / "id", 4)
    make_images(tmp_path / "ood", 4, seed=1)
    args = ["-e", str(bundles["without"]), "--id", str(tmp_path / "id"), "--ood", f"o={tmp_path / 'ood'}"]
    r = CliRunner().invoke(eval_main, [*args, "--methods", "atd,mcm-single", "-o", str(tmp_path / "r1")])
    assert r.exit_code == EXIT_USAGE and "mcm-single" in r.output and "Traceback" not in r.output, r.output
    # "all" (the default) is every method this bundle scores
    r = CliRunner().invoke(eval_main, [*args, "-o", str(tmp_path / "r2")])
    assert r.exit_code == EXIT_OK, r.output
    rows = json.loads((tmp_path / "r2" / "metrics.json").read_text(encoding="utf-8"))["rows"]
    assert {row["method"] for row in rows} == set(METHODS) - {"mcm-single"}


def test_calibrate_detect_eval_with_mcm_single(bundles: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(bundles["with"], bundle)
    make_images(tmp_path / "hold", 40, seed=3)
    r = CliRunner().invoke(calibrate_main, [str(tmp_path / "hold"), "-e", str(bundle), "--device", "cpu"])
    assert r.exit_code == EXIT_OK, r.output
    assert "mcm-single" in r.output
    images = make_images(tmp_path / "new", 5, seed=4)
    out = tmp_path / "d.jsonl"
    r = CliRunner().invoke(
        detect_main, [*map(str, images), "-e", str(bundle), "--method", "mcm-single", "-o", str(out), "-q"]
    )
    assert r.exit_code == EXIT_OK, r.output
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 5 and all(
        x["method"] == "mcm-single" and x["rule"] == "calibrated@0.95" for x in records
    )
    make_images(tmp_path / "ood", 6, seed=5)
    args = [
        "-e",
        str(bundle),
        "--id",
        str(tmp_path / "new"),
        "--ood",
        f"o={tmp_path / 'ood'}",
        "-o",
        str(tmp_path / "r"),
    ]
    r = CliRunner().invoke(eval_main, args)
    assert r.exit_code == EXIT_OK, r.output
    rows = {row["method"]: row for row in json.loads((tmp_path / "r" / "metrics.json").read_text())["rows"]}
    assert rows["mcm-single"]["calibrated_tpr"] is not None
    assert "MCM (one prompt)" in (tmp_path / "r" / "metrics.md").read_text(encoding="utf-8")


def test_open_vocabulary_bundles_go_without_the_bank(tiny_ov_bundle: Path) -> None:
    manifest = load_manifest(tiny_ov_bundle)
    assert manifest.scoring.mcm_prompt is None
    assert all("mcm_single" not in [o.name for o in e.outputs] for e in manifest.engines())
