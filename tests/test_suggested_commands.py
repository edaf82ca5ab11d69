"""Commands clipn-ood prints for the user run as printed, and one default prompt set is used everywhere.

A bundle exported with ``--model CONFIG.json`` used to answer a new class list with ``clipn-export --checkpoint
<CHECKPOINT> … --model tiny-clip``, which clipn-export rejects: the exporter did not record what it was given.
"""

from __future__ import annotations

import inspect
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner

from clipn_export.cli import main as export_main
from clipn_runtime.bundle import load_manifest
from clipn_runtime.detector import Detector
from clipn_runtime.prompts import DEFAULT_PROMPTS, load_prompts
from clipn_runtime.vocab import ClassListMismatch

if TYPE_CHECKING:
    from clipn_train.factory import LoadedCLIPN

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _export(args: list[str]) -> None:
    r = CliRunner().invoke(export_main, args)
    assert r.exit_code == 0, r.output


def _suggested(bundle: Path, classes: list[str], classes_file: Path) -> tuple[list[str], list[str]]:
    with pytest.raises(ClassListMismatch) as e:
        Detector(bundle).set_classes(classes, source=classes_file)
    ov_command = e.value.open_vocabulary_command
    assert ov_command is not None and e.value.command in str(e.value) and ov_command in str(e.value)
    plain, ov = shlex.split(e.value.command), shlex.split(ov_command)
    for args in (plain, ov):
        assert args[0] == "clipn-export" and not any(a.startswith("<") for a in args), args
        export_main.make_context("clipn-export", args[1:])  # the parser accepts every option and value
    return plain, ov


def test_the_class_mismatch_command_runs_as_printed(
    tiny_official_checkpoint: Path, tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIPN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "first.txt").write_text("cat\ndog\n")
    (tmp_path / "pairs.tsv").write_text("a photo of a {}.\ta photo without a {}.\nart of {}\tno {} here\n")
    _export(
        ["--checkpoint", str(tiny_official_checkpoint), "--model", str(tiny_config), "--classes", "first.txt",
         "--prompts", "pairs.tsv", "-o", "bundle", "--no-parity"]
    )  # fmt: skip
    wanted = ["cat", "car", "tree"]
    (tmp_path / "second.txt").write_text("\n".join(wanted) + "\n")
    plain, _ = _suggested(tmp_path / "bundle", wanted, Path("second.txt"))
    assert plain[plain.index("--model") + 1] == str(tiny_config.absolute())
    assert plain[plain.index("--prompts") + 1] == str(tmp_path / "pairs.tsv")
    monkeypatch.chdir(tmp_path.parent)  # the files it names are absolute: it runs from any directory …
    plain[plain.index("--classes") + 1] = str(tmp_path / "second.txt")  # … but for the class list we passed
    r = CliRunner().invoke(export_main, plain[1:])
    assert r.exit_code == 0, r.output
    made = load_manifest(tmp_path / "bundle-second")
    assert made.classes == wanted and made.prompts["yes"] == ["a photo of a {}.", "art of {}"]


def test_a_clipn_train_checkpoint_on_local_weights_is_repeated_with_its_weights(
    tiny_clipn: LoadedCLIPN, tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers import tiny_weights

    from clipn_train import checkpoint as ckpt
    from clipn_train.factory import create_clipn

    monkeypatch.setenv("CLIPN_CACHE", str(tmp_path / "cache"))
    weights = tiny_weights(tiny_clipn, tmp_path)
    info = create_clipn(tiny_config, weights).info
    meta = ckpt.no_tower_metadata(
        model_name=info.model_name, model_config=info.model_config, pretrained=None,
        weights_sha256=info.weights_sha256, variant="learnable", epoch=1, step=1,
    )  # fmt: skip
    checkpoint = tmp_path / "epoch_1.safetensors"
    ckpt.save_no_tower(checkpoint, tiny_clipn.model, meta)
    (tmp_path / "a.txt").write_text("cat\ndog\n")
    _export(
        ["--checkpoint", str(checkpoint), "--model", str(tiny_config), "--pretrained", str(weights),
         "--classes", str(tmp_path / "a.txt"), "-o", str(tmp_path / "b"), "--no-parity"]
    )  # fmt: skip
    (tmp_path / "c.txt").write_text("car\n")
    plain, ov = _suggested(tmp_path / "b", ["car"], tmp_path / "c.txt")
    assert plain[plain.index("--pretrained") + 1] == str(weights) and "--open-vocabulary" in ov
    r = CliRunner().invoke(export_main, [*plain[1:], "--no-parity"])
    assert r.exit_code == 0, r.output
    assert load_manifest(tmp_path / "b-c").classes == ["car"]


def test_one_default_prompt_set_for_training_export_and_eval() -> None:
    from clipn_eval.evaluate import TorchScorer
    from clipn_export.options import ExportOptions
    from clipn_export.textbank import build_text_bank
    from clipn_train.cli import cli as train_cli
    from clipn_train.data import caption_pairs
    from clipn_train.trainer import TrainConfig

    assert (
        DEFAULT_PROMPTS == "clipn"
    )  # the official 128 pairs, verbatim: what the official code trains and evaluates with
    train_option = next(p for p in train_cli.commands["train"].params if p.name == "prompts")
    export_option = next(p for p in export_main.params if p.name == "prompts")
    defaults = {
        "TrainConfig": TrainConfig(train_data="x").prompts,
        "clipn-train --prompts": train_option.default,
        "clipn-export --prompts": export_option.default,
        "export_bundle": ExportOptions().prompts,
        "build_text_bank": inspect.signature(build_text_bank).parameters["prompts"].default,
        "TorchScorer": inspect.signature(TorchScorer).parameters["prompts"].default,
    }
    assert set(defaults.values()) == {DEFAULT_PROMPTS}, defaults
    # a default hand-crafted model is trained on exactly the pairs its default bundle is exported with
    official = load_prompts(DEFAULT_PROMPTS)
    pairs = caption_pairs("handcrafted", TrainConfig(train_data="x").prompts)
    assert pairs == list(zip(official.yes, official.no or (), strict=True))


def test_other_prompts_on_a_baked_bundle_suggest_an_export_for_the_users_class_list(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from PIL import Image

    from clipn_runtime.cli import main as detect_main

    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "a.png")
    classes = tmp_path / "mine.txt"
    classes.write_text("cat\ndog\ncar\n")  # the bundle's own classes, so only the prompts change
    r = CliRunner().invoke(
        detect_main,
        [str(tmp_path / "a.png"), "-e", str(tiny_bundle), "--classes", str(classes), "--prompts", "clean"],
    )
    assert r.exit_code == 2, r.output
    line = next(ln.strip() for ln in r.output.splitlines() if ln.strip().startswith("clipn-export "))
    args = shlex.split(line)
    assert args[args.index("--classes") + 1] == str(classes) and "--open-vocabulary" in args
    export_main.make_context("clipn-export", args[1:])
