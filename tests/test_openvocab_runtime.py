"""Open-vocabulary bundles in the runtime: new class banks without torch, equal to the exporter's, cached.

The bundle is the exporter's own (``tiny_ov_bundle``: the tiny random-init CLIPN exported with
``open_vocabulary=True``); the references are clipn_export's PyTorch text bank and a fresh export for the new
class list. Tests that compute banks work on a private copy of the bundle (banks are cached inside it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_CLASSES, copy_bundle
from helpers import BLOCK_TORCH
from PIL import Image

from clipn_runtime.bundle import BundleError, load_manifest
from clipn_runtime.detector import Detector
from clipn_runtime.openvocab import BankBuilder, ensemble, plan_prompts
from clipn_runtime.prompts import PromptSet, load_prompts
from clipn_runtime.vocab import ClassListMismatch

#: A changed class list: new names, a comma and quotes, CJK, one long enough to be truncated, an old one.
NEW = ["zebra", 'hot dog, "chili"', "日本の猫", "a very " + "long " * 40 + "name", "cat"]
FIELDS = ("prob", "p_no", "ctw", "atd", "p_ood")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("ov_images")
    rng = np.random.default_rng(7)
    paths = []
    for i, (w, h) in enumerate([(32, 32), (57, 23), (40, 64), (50, 50), (31, 33), (90, 60)]):
        yy, xx = np.mgrid[0:h, 0:w]
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = ((xx / w) if i % 2 else (yy / h))[..., None]
        a = (c0 * (1 - t) + c1 * t + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
        paths.append(folder / f"img{i}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


@pytest.fixture()
def bundle(tiny_ov_bundle: Path, tmp_path: Path) -> Path:
    return copy_bundle(tiny_ov_bundle, tmp_path / "bundle")


def _close(a: list[Any], b: list[Any], tol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.error is None and y.error is None
        assert (x.pred, x.pred_index, x.ood) == (y.pred, y.pred_index, y.ood), (x, y)
        for f in FIELDS:
            assert abs(getattr(x, f) - getattr(y, f)) <= tol, (f, getattr(x, f), getattr(y, f))


# ---- the prompt plan --------------------------------------------------------------------------------------------


def test_prompt_plan_dedups_and_routes_templates_per_variant() -> None:
    ps = PromptSet("t", ("a {}.", "a {}.", "{} here", "no {}"), ("not {}.", "not {}.", "{} absent", "no {}"))
    plan = plan_prompts(["x", "y"], ps, "learnable")
    assert plan.shared and len(plan.strings) == 6  # 3 distinct templates × 2 classes
    assert plan.index["yes"].shape == (2, 4) and (plan.index["yes"] == plan.index["no"]).all()
    hand = plan_prompts(["x", "y"], ps, "handcrafted")
    assert not hand.shared
    assert [hand.strings[i] for i in hand.index["no"][0]] == ["not x.", "not x.", "x absent", "no x"]
    # "no x" is both a yes and a no prompt: encoded once per tower, shared in the string list
    assert hand.strings.count("no x") == 1
    emb = np.eye(len(plan.strings), 3, dtype=np.float32) + 0.5
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    w = ensemble(emb, plan.index["yes"])
    ref = emb[plan.index["yes"][1]].sum(0)
    assert np.allclose(w[1], ref / np.linalg.norm(ref), atol=1e-7)


# ---- banks ------------------------------------------------------------------------------------------------------


def test_runtime_bank_equals_the_exporters_bank(tiny_ov_bundle: Path, tiny_clipn: Any) -> None:
    from clipn_export.textbank import build_text_bank

    builder = BankBuilder(tiny_ov_bundle, load_manifest(tiny_ov_bundle), cache=False)
    for prompts in ("clipn", "openai"):
        ps = load_prompts(prompts)
        got = builder.banks(NEW, ps if prompts != "clipn" else None, progress=False)
        ref = build_text_bank(tiny_clipn, NEW, ps, cache_dir=None, progress=False)
        assert got.classes == tuple(NEW) and got.yes.shape == ref.yes.shape
        assert np.abs(got.yes - ref.yes).max() <= 1e-5, prompts
        assert np.abs(got.no - ref.no).max() <= 1e-5, prompts
        assert got.encoded["yes"] == ref.encoded["yes"]  # type: ignore[index]
    assert not (tiny_ov_bundle / "banks").exists()  # cache=False wrote nothing


def test_baked_bank_is_reproduced_by_the_runtime(tiny_ov_bundle: Path) -> None:
    builder = BankBuilder(tiny_ov_bundle, load_manifest(tiny_ov_bundle), cache=False)
    got = builder.banks(TINY_CLASSES, progress=False)
    with np.load(tiny_ov_bundle / "text_bank.npz") as z:
        assert np.abs(got.yes - z["yes"]).max() <= 1e-5 and np.abs(got.no - z["no"]).max() <= 1e-5


# ---- detection --------------------------------------------------------------------------------------------------


def test_detect_with_a_changed_class_list_equals_a_fresh_export(
    bundle: Path, tiny_bundle_factory: Any, images: list[Path]
) -> None:
    det = Detector(bundle, precision="fp32")
    det.set_classes(NEW, progress=False)
    assert det.classes == NEW and det.banks is not None and not det.banks.from_cache
    got = det.detect(images)
    fresh = Detector(tiny_bundle_factory(classes=NEW, scale=100.0))
    _close(got, fresh.detect(images))
    assert {d.pred for d in got} <= set(NEW)
    # back to the bundle's own classes: the baked banks again, no feeds
    det.set_classes(TINY_CLASSES)
    assert det.banks is None and det.classes == TINY_CLASSES


def test_default_banks_are_the_baked_ones(tiny_ov_bundle: Path, tiny_bundle: Path, images: list[Path]) -> None:
    # Same model and classes, banks as (defaulted) graph inputs vs baked into the graph.
    _close(Detector(tiny_ov_bundle, precision="fp32").detect(images), Detector(tiny_bundle).detect(images))


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_engines_take_new_banks(bundle: Path, images: list[Path], precision: str) -> None:
    ref = Detector(bundle, precision="fp32")
    ref.set_classes(NEW, progress=False)
    det = Detector(bundle, precision=precision)
    det.set_classes(NEW, progress=False)
    assert det.banks is not None and det.banks.from_cache  # the fp32 detector's banks, from the bundle's cache
    a, b = det.detect(images), ref.detect(images)
    assert all(d.ok and d.pred in NEW for d in a)
    assert max(abs(x.atd - y.atd) for x, y in zip(a, b, strict=True)) < 0.05  # type: ignore[operator]


def test_other_prompts_on_the_same_classes_compute_new_banks(bundle: Path, tiny_clipn: Any) -> None:
    from clipn_export.textbank import build_text_bank

    det = Detector(bundle)
    det.set_classes(TINY_CLASSES, "openai", progress=False)
    assert det.banks is not None
    ref = build_text_bank(tiny_clipn, TINY_CLASSES, "openai", cache_dir=None, progress=False)
    assert np.abs(det.banks.yes - ref.yes).max() <= 1e-5
    det.set_classes(TINY_CLASSES, "clipn")  # the bundle's own prompts: baked banks
    assert det.banks is None


# ---- cache --------------------------------------------------------------------------------------------------------


def test_second_run_is_a_cache_hit_with_no_text_encoding(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = Detector(bundle)
    first.set_classes(NEW, progress=False)
    assert first.banks is not None and first.banks.cache is not None
    assert first.banks.cache.parent == bundle / "banks" and first.banks.encoded["yes"] > 0
    assert first._bank_builder is not None and first._bank_builder.runs > 0

    def no_encoding(*a: object, **k: object) -> None:
        raise AssertionError("a cache hit must not encode any text")

    monkeypatch.setattr(BankBuilder, "encode", no_encoding)
    monkeypatch.setattr(BankBuilder, "session", no_encoding)
    second = Detector(bundle)
    second.set_classes(NEW, progress=False)
    assert second.banks is not None and second.banks.from_cache and second.banks.cache == first.banks.cache
    assert second._bank_builder is not None and second._bank_builder.runs == 0
    assert np.array_equal(second.banks.yes, first.banks.yes) and np.array_equal(second.banks.no, first.banks.no)
    # another class list or other prompts are other keys
    b = second._bank_builder
    assert (
        len(
            {
                b.key(NEW, load_prompts("clipn")),
                b.key(NEW[:-1], load_prompts("clipn")),
                b.key(NEW, load_prompts("openai")),
            }
        )
        == 3
    )


def test_read_only_bundle_caches_in_the_user_cache(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIPN_CACHE", str(tmp_path / "user-cache"))
    (bundle / "banks").write_text("a file where the cache folder would go: the bundle dir takes no banks")
    b = BankBuilder(bundle, load_manifest(bundle))
    got = b.banks(NEW, progress=False)
    assert got.cache == tmp_path / "user-cache" / "banks" / f"{got.key}.npz" and got.cache.is_file()
    again = BankBuilder(bundle, load_manifest(bundle)).banks(NEW, progress=False)
    assert again.from_cache and again.cache == got.cache


def test_a_corrupt_cache_entry_is_recomputed(bundle: Path) -> None:
    b = BankBuilder(bundle, load_manifest(bundle))
    got = b.banks(NEW, progress=False)
    assert got.cache is not None
    whole = got.cache.read_bytes()
    for broken in (whole[: len(whole) // 2], b"not an npz"):  # a cut write, garbage
        got.cache.write_bytes(broken)
        again = BankBuilder(bundle, load_manifest(bundle)).banks(NEW, progress=False)
        assert not again.from_cache and np.abs(again.yes - got.yes).max() <= 1e-6
    with np.load(got.cache) as z:  # rewritten whole
        assert z["yes"].shape == got.yes.shape


# ---- errors -------------------------------------------------------------------------------------------------------


def test_a_bundle_without_open_vocabulary_names_the_export_command(tiny_bundle: Path) -> None:
    det = Detector(tiny_bundle)
    with pytest.raises(ClassListMismatch) as e:
        det.set_classes(NEW, source="other.txt")
    assert e.value.open_vocabulary_command is not None
    assert "--open-vocabulary" in e.value.open_vocabulary_command and "--classes other.txt" in str(e.value)
    assert e.value.open_vocabulary_command in str(e.value)
    with pytest.raises(
        BundleError, match="(?s)exported without --open-vocabulary.*clipn-export .*--open-vocabulary"
    ):
        BankBuilder(tiny_bundle, load_manifest(tiny_bundle))
    with pytest.raises(BundleError, match="--open-vocabulary"):
        det.set_classes(TINY_CLASSES, "openai")


def test_bad_class_names_are_user_errors(bundle: Path) -> None:
    from clipn_runtime.errors import UserError

    b = BankBuilder(bundle, load_manifest(bundle), cache=False)
    with pytest.raises(UserError, match="empty"):
        b.banks([])
    with pytest.raises(UserError, match="single-line"):
        b.banks(["ok", "two\nlines"])


def test_tampered_text_encoder_is_refused(bundle: Path) -> None:
    with open(bundle / "tokenizer.json", "a", encoding="utf-8") as fh:
        fh.write(" ")
    with pytest.raises(BundleError, match=r"tokenizer.json: sha256 does not match"):
        Detector(bundle)


# ---- clipn-detect ---------------------------------------------------------------------------------------------------


def _detect(*args: str) -> Any:
    from clipn_runtime.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_clipn_detect_classes_on_an_open_vocabulary_bundle(
    bundle: Path, images: list[Path], tmp_path: Path
) -> None:
    other = tmp_path / "other.txt"
    other.write_text("\n".join(NEW) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    r = _detect(str(images[0].parent), "-e", str(bundle), "--classes", str(other), "-o", str(out))
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(recs) == len(images) and all(rec["pred"] in NEW and rec["error"] is None for rec in recs)
    assert "5 classes: class banks computed" in r.stderr and "cached in" in r.stderr
    r2 = _detect(str(images[0].parent), "-e", str(bundle), "--classes", str(other), "-o", str(out), "--overwrite")
    assert r2.exit_code == 0 and "class banks from the cache" in r2.stderr and "no text encoding" in r2.stderr
    assert out.read_text(encoding="utf-8").splitlines() == [json.dumps(x, ensure_ascii=False) for x in recs]


def test_clipn_detect_refuses_other_classes_for_a_plain_bundle(
    tiny_bundle: Path, images: list[Path], tmp_path: Path
) -> None:
    other = tmp_path / "other.txt"
    other.write_text("zebra\n", encoding="utf-8")
    r = _detect(str(images[0]), "-e", str(tiny_bundle), "--classes", str(other))
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "--open-vocabulary" in r.stderr and f"--classes {other}" in r.stderr
    r = _detect(str(images[0]), "-e", str(tiny_bundle), "--prompts", "openai")
    assert r.exit_code == 2 and "exported without --open-vocabulary" in r.stderr


# ---- torch-free -----------------------------------------------------------------------------------------------------


def test_new_classes_work_with_torch_blocked(bundle: Path, images: list[Path]) -> None:

    code = f"""
import sys
from clipn_runtime import Detector
det = Detector({str(bundle)!r})
det.set_classes({NEW!r}, progress=False)
recs = det.detect({[str(p) for p in images[:2]]!r})
assert all(r.ok and r.pred in {NEW!r} for r in recs), recs
assert not any(m.split(".")[0] in ("torch", "open_clip", "clipn_export", "clipn_train") for m in sys.modules)
print("ok", det.banks.encoded["yes"])
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "ok" and int(r.stdout.split()[1]) > 0


@pytest.mark.slow
def test_handcrafted_variant_feeds_the_no_templates_to_the_no_tower(tiny_config: Path, tmp_path: Path) -> None:
    """The hand-crafted variant (no learnable prompt; the no tower gets the paired no templates): the runtime's
    banks equal the exporter's. Only the text side is exported — the image engine plays no part in a bank."""
    import torch

    from clipn_export.openvocab_export import write_open_vocabulary
    from clipn_export.textbank import build_text_bank
    from clipn_runtime.bundle import Manifest, ModelIdentity, Preprocess, Scoring
    from clipn_train.factory import create_clipn

    torch.manual_seed(3)
    loaded = create_clipn(tiny_config, variant="handcrafted")
    with torch.no_grad():  # a fresh no tower is a copy of the yes tower; make them differ
        for p in loaded.model.transformer_no.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    section, files = write_open_vocabulary(loaded, tmp_path)
    ps = load_prompts("clean")
    manifest = Manifest(
        model=ModelIdentity("tiny", variant="handcrafted"),
        preprocess=Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        classes=["cat"],
        prompts={**ps.to_dict(), "variant": "handcrafted"},
        scoring=Scoring(),
        files=files,
        open_vocabulary=section,
    )
    got = BankBuilder(tmp_path, manifest, cache=False).banks(NEW, progress=False)
    ref = build_text_bank(loaded, NEW, ps, cache_dir=None, progress=False)
    assert got.encoded == ref.encoded and got.encoded["no"] > 0
    assert np.abs(got.yes - ref.yes).max() <= 1e-5 and np.abs(got.no - ref.no).max() <= 1e-5
    # the no bank really comes from the no templates: the yes templates through the no tower differ
    assert (
        np.abs(
            got.no - BankBuilder(tmp_path, replace_variant(manifest), cache=False).banks(NEW, progress=False).no
        ).max()
        > 1e-3
    )


def replace_variant(manifest: Any) -> Any:
    from dataclasses import replace

    return replace(manifest, model=replace(manifest.model, variant="learnable"))


def test_docs_open_vocabulary_example_runs(
    tiny_ov_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/open-vocabulary.md's Python example, as written, on the tiny open-vocabulary bundle copied to b/."""
    import re

    page = Path(__file__).resolve().parents[1] / "docs" / "open-vocabulary.md"
    m = re.search(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL)
    assert m, f"no ```python block in {page}"
    copy_bundle(tiny_ov_bundle, tmp_path / "b")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
        tmp_path / "dock.jpg"
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(m.group(1), str(page), "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip() in ("forklift", "pallet", "person")
    assert list((tmp_path / "b" / "banks").glob("*.npz"))
