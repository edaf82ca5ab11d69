"""Unreadable weights files get one line with the true reason, and never the advice to unpickle them.

torch's own message for a pickle that ``weights_only`` loading refuses runs over 6–8 lines and says
``weights_only=False`` "will likely succeed" (which executes whatever the file holds); a truncated base-weights
file used to be reported as weights that "do not fit --model".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from clipn_runtime.errors import UserError
from clipn_train import checkpoint as ckpt
from clipn_train.factory import LoadedCLIPN, create_clipn

pytestmark = pytest.mark.usefixtures("torch_one_thread")

UNSAFE_ADVICE = ("weights_only=False", "likely succeed", "add_safe_globals", "\x1b[")


@pytest.fixture(scope="module")
def files(
    tiny_clipn: LoadedCLIPN, tiny_official_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bad_weights")
    out: dict[str, Path] = {}
    official = torch.load(tiny_official_checkpoint, weights_only=True)
    official["args"] = argparse.Namespace(lr=3e-4)  # what training scripts often pickle beside the weights
    torch.save(official, out.setdefault("pickle_ckpt", root / "with_objects.pt"))
    data = tiny_official_checkpoint.read_bytes()
    out["truncated_ckpt"] = root / "truncated.pt"
    out["truncated_ckpt"].write_bytes(data[: len(data) // 2])
    clip_state = {k: v.contiguous() for k, v in tiny_clipn.model.clip.state_dict().items()}
    save_file(clip_state, str(root / "base.safetensors"))
    torch.save(clip_state, root / "base.pt")
    for name in ("base.safetensors", "base.pt"):
        whole = (root / name).read_bytes()
        out[f"truncated_{name}"] = root / f"truncated_{name}"
        out[f"truncated_{name}"].write_bytes(whole[: len(whole) // 2])
    torch.save(
        {"state_dict": clip_state, "args": argparse.Namespace(lr=1)},
        out.setdefault("pickle_base", root / "obj.pt"),
    )
    meta = ckpt.no_tower_metadata(
        model_name="tiny-clip", model_config={}, pretrained=None, weights_sha256=None, variant="learnable",
        epoch=1, step=1,
    )  # fmt: skip
    ckpt.save_no_tower(root / "ours.safetensors", tiny_clipn.model, meta)
    whole = (root / "ours.safetensors").read_bytes()
    out["truncated_ours"] = root / "truncated_ours.safetensors"
    out["truncated_ours"].write_bytes(whole[: len(whole) // 2])
    wide = json.loads(Path(__file__).with_name("data").joinpath("tiny-clip.json").read_text())
    wide["embed_dim"] = 48
    (root / "wide.json").write_text(json.dumps(wide))
    out["wide_config"] = root / "wide.json"
    text_wide = json.loads(Path(__file__).with_name("data").joinpath("tiny-clip.json").read_text())
    text_wide["text_cfg"]["width"] = 64  # open_clip's position-embedding resize asserts on this mismatch
    (root / "text-wide.json").write_text(json.dumps(text_wide))
    out["text_wide_config"] = root / "text-wide.json"
    out["base"] = root / "base.pt"
    return out


def _one_line(message: str) -> str:
    assert "\n" not in message, message
    assert not any(a in message for a in UNSAFE_ADVICE), message
    return message


def test_a_pickle_with_objects_is_refused_in_one_line_without_unsafe_advice(
    files: dict[str, Path], tiny_config: Path
) -> None:
    with pytest.raises(UserError) as e:
        create_clipn(tiny_config, checkpoint=files["pickle_ckpt"])
    msg = _one_line(str(e.value))
    assert msg.startswith(f"--checkpoint {files['pickle_ckpt']}: a torch pickle")
    assert "argparse.Namespace" in msg and "never unpickles arbitrary objects" in msg and "state_dict" in msg
    with pytest.raises(UserError) as e:
        create_clipn(tiny_config, files["pickle_base"])
    msg = _one_line(str(e.value))
    assert msg.startswith(f"--pretrained {files['pickle_base']}: a torch pickle") and "argparse.Namespace" in msg


@pytest.mark.parametrize(
    ("which", "option", "kind"),
    [
        ("truncated_ckpt", "--checkpoint", "torch load error"),
        ("truncated_ours", "--checkpoint", "safetensors error"),
        ("truncated_base.pt", "--pretrained", "torch load error"),
        ("truncated_base.safetensors", "--pretrained", "safetensors error"),
    ],
)
def test_a_truncated_file_is_called_truncated(
    files: dict[str, Path], tiny_config: Path, which: str, option: str, kind: str
) -> None:
    with pytest.raises(UserError) as e:
        if option == "--checkpoint":
            create_clipn(tiny_config, checkpoint=files[which])
        else:
            create_clipn(tiny_config, pretrained=files[which])
    msg = _one_line(str(e.value))
    assert msg.startswith(f"{option} {files[which]}: truncated or corrupt ({kind}")
    assert msg.endswith("re-download or copy it again") and "do not fit" not in msg


def test_weights_of_another_model_still_do_not_fit(files: dict[str, Path]) -> None:
    with pytest.raises(UserError) as e:
        create_clipn(files["wide_config"], files["base"])
    msg = _one_line(str(e.value))
    assert msg.startswith(f"--pretrained {files['base']}: these weights do not fit --model wide (")
    assert "size mismatch" in msg


def test_a_model_mismatch_that_open_clip_asserts_on_is_not_called_unreadable(files: dict[str, Path]) -> None:
    """The file reads fine; only the model differs (open_clip raises AssertionError, not a load error)."""
    with pytest.raises(UserError) as e:
        create_clipn(files["text_wide_config"], files["base"])
    msg = _one_line(str(e.value))
    assert msg.startswith(f"--pretrained {files['base']}: these weights do not fit --model text-wide (")
    assert "neither a safetensors" not in msg


def test_clipn_export_prints_the_one_line_and_exits_2(
    files: dict[str, Path], tiny_config: Path, tmp_path: Path
) -> None:
    from clipn_export.cli import EXIT_USAGE, main

    classes = tmp_path / "c.txt"
    classes.write_text("cat\ndog\n")
    args = ["--checkpoint", str(files["pickle_ckpt"]), "--model", str(tiny_config), "--classes", str(classes)]
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b")])
    assert r.exit_code == EXIT_USAGE, r.output
    errors = [ln for ln in r.output.splitlines() if "error" in ln.lower() or "weights_only" in ln]
    assert len(errors) == 1 and errors[0].startswith("clipn-export: error: --checkpoint"), r.output
    assert "argparse.Namespace" in _one_line(errors[0]) and "never unpickles" in errors[0]
    assert not (tmp_path / "b").exists()
