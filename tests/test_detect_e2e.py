"""End to end: a real (tiny, random-init) CLIPN exported by clipn_export, scored by the torch-free runtime.

The reference is built without any runtime code: open_clip's own eval transform (the model's preprocess_val),
the PyTorch CLIPN image tower, text banks encoded by the PyTorch towers at full context, and the numpy scoring
core (clipn_runtime.scoring, the one definition of the CLIPN math).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from helpers import BLOCK_TORCH, TinyBundleFactory
from PIL import Image

from clipn_runtime.detector import Detector
from clipn_runtime.scoring import Scores, score_features

if TYPE_CHECKING:
    from clipn_train.factory import LoadedCLIPN

TINY_CLASSES = ["cat", "dog", "car"]  # the classes of the exporter's tiny_bundle fixture
FIELDS = ("prob", "p_no", "ctw", "atd", "p_ood")


def _generated_images(folder: Path) -> list[Path]:
    """Images of many sizes, aspect ratios, modes and formats, with structure (ramps) and noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(42)
    specs = [
        ((32, 32), "RGB", "png"), ((57, 23), "RGB", "jpg"), ((23, 90), "L", "png"), ((100, 64), "RGBA", "png"),
        ((48, 48), "P", "gif"), ((33, 31), "RGB", "bmp"), ((200, 120), "RGB", "webp"), ((40, 41), "LA", "png"),
        ((64, 30), "CMYK", "jpg"), ((31, 77), "I;16", "png"), ((16, 16), "RGB", "png"), ((80, 60), "RGB", "tiff"),
    ]  # fmt: skip
    paths = []
    for i, ((w, h), mode, ext) in enumerate(specs):
        yy, xx = np.mgrid[0:h, 0:w]
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = ((xx / w) if i % 2 else (yy / h))[..., None]
        rgb = (c0 * (1 - t) + c1 * t + rng.normal(0, 15, (h, w, 3))).clip(0, 255).astype(np.uint8)
        if mode == "I;16":
            im = Image.frombytes("I;16", (w, h), (rgb[..., 0].astype(np.uint16) * 257).tobytes())
        else:
            im = Image.fromarray(rgb).convert("RGBA" if mode in ("RGBA", "LA") else "RGB").convert(mode)
        p = folder / f"{i:02d}_{mode.replace(';', '')}.{ext}"
        im.save(p)
        paths.append(p)
    return paths


def _pytorch_reference(loaded: LoadedCLIPN, paths: list[Path], classes: list[str], scale: float) -> Scores:
    import torch

    from clipn_export.textbank import build_text_bank

    bank = build_text_bank(loaded, classes, "clipn", cache_dir=None, progress=False, truncate=False)
    with torch.inference_mode():
        pixels = torch.stack([loaded.preprocess_val(Image.open(p)) for p in paths])
        feats = loaded.model.encode_image(pixels, normalize=False).float().numpy()
    return score_features(feats, bank.yes, bank.no, scale)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _generated_images(tmp_path_factory.mktemp("e2e") / "images")


@pytest.fixture(scope="module")
def reference(tiny_clipn: LoadedCLIPN, images: list[Path]) -> Scores:
    return _pytorch_reference(tiny_clipn, images, TINY_CLASSES, 100.0)


def _check(recs: list[dict[str, Any]], ref: Scores, paths: list[Path]) -> None:
    assert [r["path"] for r in recs] == [str(p) for p in paths]
    for i, r in enumerate(recs):
        assert r["error"] is None, r
        assert r["pred_index"] == ref.pred[i] and r["pred"] == TINY_CLASSES[ref.pred[i]]
        for f in FIELDS:
            assert abs(r[f] - float(getattr(ref, f)[i])) <= 1e-5, (paths[i].name, f, r[f], getattr(ref, f)[i])
        assert r["ood"] == bool(ref.ood_atd[i])


def test_detect_folder_equals_pytorch_model_and_numpy_scoring(
    tiny_bundle: Path, images: list[Path], reference: Scores
) -> None:
    from click.testing import CliRunner

    from clipn_runtime.cli import main

    classes = images[0].parent.parent / "classes.txt"
    classes.write_text("\n".join(TINY_CLASSES) + "\n")
    r = CliRunner().invoke(main, [str(images[0].parent), "--engine", str(tiny_bundle), "--classes", str(classes)])
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    _check(recs, reference, images)
    # (The random-init tiny model predicts the same class and decision for these images; the synthetic-bundle
    # tests in test_runtime_detector.py cover both decisions and varied predictions.)


def test_same_with_torch_blocked(tiny_bundle: Path, images: list[Path], reference: Scores) -> None:

    code = BLOCK_TORCH + "from clipn_runtime.cli import main\nmain(prog_name='clipn-detect')\n"
    r = subprocess.run(
        [sys.executable, "-c", code, *map(str, images), "-e", str(tiny_bundle), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    _check([json.loads(line) for line in r.stdout.splitlines()], reference, images)


def test_frames_api_equals_path_api(tiny_bundle: Path, images: list[Path]) -> None:
    det = Detector(tiny_bundle)
    rgb = [p for p in images if Image.open(p).mode == "RGB" and p.suffix != ".jpg"]
    by_path = det.detect(rgb)
    by_frame = det.detect_frames([np.asarray(Image.open(p)) for p in rgb])
    assert [d.scores for d in by_path] == [d.scores for d in by_frame]


def test_baselines_match_too(tiny_bundle: Path, images: list[Path], reference: Scores) -> None:
    dets = Detector(tiny_bundle).detect(images)
    for i, d in enumerate(dets):
        for name in ("max_logit", "energy"):
            assert abs(d.scores[name] - float(getattr(reference, name)[i])) <= 1e-4
        for name in ("msp", "mcm"):
            assert abs(d.scores[name] - float(getattr(reference, name)[i])) <= 1e-5


def test_uint8_and_fp16_bundles_at_a_soft_scale(
    tiny_clipn: LoadedCLIPN, tiny_bundle_factory: TinyBundleFactory, images: list[Path]
) -> None:
    """At scale 2 nothing saturates (p_no, ATD, CTW all strictly inside (0, 1)), so every score is compared
    for real; the uint8-input engine (normalising inside the graph) must give the same numbers."""
    from clipn_export.parity import ParityOptions

    ref = _pytorch_reference(tiny_clipn, images, TINY_CLASSES, 2.0)
    assert ref.p_no.min() > 0.05 and ref.p_no.max() < 0.95
    b = tiny_bundle_factory(scale=2.0, uint8_input=True, fp16=True, parity=ParityOptions(enabled=False))
    recs = [d.to_dict() for d in Detector(b, precision="fp32").detect(images)]
    _check(recs, ref, images)
    half = Detector(b, precision="fp16").detect(images)  # ORT CPU fp16: needs the NchwcTransformer workaround
    half_atd = np.array([d.atd for d in half], dtype=np.float64)  # a failed record's None becomes NaN: fails
    assert np.abs(half_atd - ref.atd).max() < 1e-2


def test_class_mismatch_names_the_export_command(tiny_bundle: Path, tiny_config: Path) -> None:
    import shlex

    from clipn_runtime.vocab import ClassListMismatch

    with pytest.raises(ClassListMismatch) as e:
        Detector(tiny_bundle).set_classes(["cat", "dog", "truck"], source="new.txt")
    assert "they first differ at class 3: bundle 'car', list 'truck'" in str(e.value)
    # tiny_bundle's model was made without a checkpoint, so there is none to name
    assert e.value.command.startswith("clipn-export --checkpoint <CHECKPOINT> --classes new.txt -o ")
    model = shlex.quote(str(tiny_config.absolute()))  # the --model CONFIG.json it was made from, runnable anywhere
    assert f"--model {model} --variant learnable --scale 100.0" in e.value.command
