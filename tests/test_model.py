"""The CLIPN model: towers, prompts, construction from names/configs/weights, and both checkpoint kinds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict

import pytest
import torch
from safetensors.torch import save_file

from clipn_runtime.errors import InputFileError, UserError
from clipn_runtime.fileio import sha256_file
from clipn_train import checkpoint as ckpt
from clipn_train.factory import LoadedCLIPN, create_clipn, resolve_model_config
from clipn_train.model import CLIPN

CAPTIONS = ["a photo of a dog.", "a much longer caption about a small red bicycle leaning on a wall", "cat"]


# Tiny models on a shared 2-core machine run several times faster on one thread (conftest.py).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_config: Path) -> LoadedCLIPN:
    torch.manual_seed(0)
    return create_clipn(tiny_config)


@pytest.fixture(scope="module")
def base_weights(tiny: LoadedCLIPN, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base CLIP's weights as a local safetensors file (what --pretrained FILE reads)."""
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.clip.state_dict().items()}, str(path))
    return path


def _perturb(model: CLIPN, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_yes_tower_equals_open_clip_and_truncated_context(tiny: LoadedCLIPN) -> None:
    model = tiny.model
    tokens = tiny.tokenizer(CAPTIONS)
    full = model.encode_text(tokens)
    assert torch.equal(full, model.clip.encode_text(tokens, normalize=True))  # open_clip's own ops, in its order
    length = int((tokens != 0).sum(1).max())
    assert length < model.context_length
    assert model.truncation_is_exact
    torch.testing.assert_close(model.encode_text(tokens[:, :length]), full, atol=1e-6, rtol=1e-5)


def test_no_tower_starts_as_yes_tower_and_prompts_select(tiny_config: Path) -> None:
    loaded = create_clipn(tiny_config)
    model = loaded.model.train()
    tokens = loaded.tokenizer(CAPTIONS)
    # Zero prompts, copied weights. Not bit-equal: torch picks the attention kernel by whether the weights require
    # grad, so the frozen tower and its trainable copy round differently (measured ≤ 2e-7 here, 1-2 ulps of 1).
    torch.testing.assert_close(model.encode_text_no(tokens), model.encode_text(tokens), atol=1e-6, rtol=0)
    assert model.prompt_no is not None
    with torch.no_grad():
        model.prompt_no.normal_(std=0.5)
    model.eval()
    mean = model.encode_text_no(tokens)
    # Bit-equal by construction: option 16 is the same mean, so the same kernels see identical inputs.
    assert torch.equal(mean, model.encode_text_no(tokens, prompt_index=torch.full((3,), 16)))
    first = model.encode_text_no(tokens, prompt_index=torch.zeros(3, dtype=torch.long))
    assert not torch.allclose(first, mean)
    # Each sample gets its own prompt; truncation stays exact with the prompt added.
    mixed = model.encode_text_no(tokens, prompt_index=torch.tensor([0, 16, 0]))
    torch.testing.assert_close(mixed[[0, 2]], first[[0, 2]])
    torch.testing.assert_close(mixed[1], mean[1])
    length = int((tokens != 0).sum(1).max())
    torch.testing.assert_close(model.encode_text_no(tokens[:, :length]), mean, atol=1e-6, rtol=1e-5)
    model.train()
    torch.manual_seed(3)
    draws = model.sample_prompt_index(1000)
    assert draws.min() == 0 and draws.max() == 16  # 17 options


def test_frozen_and_trainable_parameters_use_official_names(tiny: LoadedCLIPN) -> None:
    model = tiny.model
    assert not any(p.requires_grad for p in model.clip.parameters())
    assert all(p.requires_grad for p in model.trainable_parameters())
    names = set(model.trainable_state_dict())
    assert {"prompt_no", "positional_embedding_no", "token_embedding_no.weight", "text_projection_no"} <= names
    assert "ln_final_no.weight" in names and "transformer_no.resblocks.0.attn.in_proj_weight" in names
    assert not any(n.startswith(("clip.", "module.")) for n in names)
    assert model.trainable_state_dict()["prompt_no"].shape == (16, 77, 32)
    model.train()
    assert not model.clip.training  # the frozen base keeps inference behaviour
    assert model.scale == pytest.approx(1 / 0.07, rel=1e-5)


def test_official_train_transform(tiny: LoadedCLIPN) -> None:
    from torchvision.transforms import InterpolationMode, RandomResizedCrop

    crop = tiny.preprocess_train.transforms[0]
    assert isinstance(crop, RandomResizedCrop) and crop.scale == (0.9, 1.0)
    assert crop.interpolation == InterpolationMode.BICUBIC and crop.size == (32, 32)
    assert tiny.info.mean == (0.48145466, 0.4578275, 0.40821073)  # OpenAI mean/std for a config without tag


def test_handcrafted_variant_has_no_prompt(tiny_config: Path) -> None:
    model = create_clipn(tiny_config, variant="handcrafted").model
    assert model.prompt_no is None and "prompt_no" not in model.trainable_state_dict()
    with pytest.raises(ValueError, match="hand-crafted"):
        model.encode_text_no(torch.ones(1, 5, dtype=torch.long), prompt_index=torch.zeros(1, dtype=torch.long))


def test_local_weights_file_is_loaded(tiny: LoadedCLIPN, base_weights: Path, tiny_config: Path) -> None:
    loaded = create_clipn(tiny_config, base_weights)
    for k, v in tiny.model.clip.state_dict().items():
        assert torch.equal(loaded.model.clip.state_dict()[k], v), k
    assert loaded.info.weights_sha256 == sha256_file(base_weights)
    assert loaded.info.pretrained is None


def test_our_checkpoint_round_trip(
    tiny: LoadedCLIPN, base_weights: Path, tiny_config: Path, tmp_path: Path
) -> None:
    trained = create_clipn(tiny_config, base_weights).model
    _perturb(trained)
    info = create_clipn(tiny_config, base_weights).info
    meta = ckpt.no_tower_metadata(
        model_name=info.model_name,
        model_config=info.model_config,
        pretrained=None,
        weights_sha256=info.weights_sha256,
        variant="learnable",
        epoch=3,
        step=30,
    )
    path = tmp_path / "epoch_3.safetensors"
    sha = ckpt.save_no_tower(path, trained, meta)
    loaded = create_clipn(tiny_config, base_weights, checkpoint=path)
    assert loaded.info.checkpoint_kind == "clipn-ood" and loaded.info.checkpoint_sha256 == sha
    for k, v in trained.trainable_state_dict().items():
        assert torch.equal(loaded.model.trainable_state_dict()[k], v), k
    with pytest.raises(UserError, match="pass it as --pretrained"):
        create_clipn(tiny_config, checkpoint=path)
    other = tmp_path / "other.safetensors"
    save_file({k: torch.zeros_like(v).contiguous() for k, v in tiny.model.clip.state_dict().items()}, str(other))
    with pytest.raises(UserError, match="differs from the weights"):
        create_clipn(tiny_config, other, checkpoint=path)
    with pytest.raises(UserError, match="learnable"):
        create_clipn(tiny_config, base_weights, checkpoint=path, variant="handcrafted")


class _OfficialCheckpoint(TypedDict):
    epoch: int
    name: str
    state_dict: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def _official_layout(model: CLIPN) -> _OfficialCheckpoint:
    state = {f"module.{k}": v for k, v in model.clip.state_dict().items()}
    state.update({f"module.{k}": v for k, v in model.trainable_state_dict().items()})
    return {"epoch": 10, "name": "CLIPN_tiny", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def test_official_checkpoint_import_round_trip(tiny_config: Path, tmp_path: Path) -> None:
    torch.manual_seed(5)
    source = create_clipn(tiny_config).model
    _perturb(source, seed=2)
    path = tmp_path / "CLIPN_official.pt"
    torch.save(_official_layout(source), path)
    loaded = create_clipn(tiny_config, checkpoint=path)
    assert loaded.info.checkpoint_kind == "official" and loaded.info.variant == "learnable"
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    tokens = loaded.tokenizer(CAPTIONS)
    assert torch.equal(loaded.model.encode_text_no(tokens), source.eval().encode_text_no(tokens))

    with pytest.raises(UserError, match="drop --pretrained"):
        create_clipn(tiny_config, "laion2b_s34b_b88k", checkpoint=path)

    broken = _official_layout(source)
    del broken["state_dict"]["module.ln_final_no.bias"]
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(UserError, match=r"missing 1: ln_final_no\.bias"):
        create_clipn(tiny_config, checkpoint=tmp_path / "broken.pt")

    bare = {k.removeprefix("module."): v for k, v in _official_layout(source)["state_dict"].items()}
    bare["prompt_no"] = torch.zeros(16, 77, 31)
    torch.save(bare, tmp_path / "bare.pt")
    with pytest.raises(UserError, match="wrong shape 1: prompt_no"):
        create_clipn(tiny_config, checkpoint=tmp_path / "bare.pt")


def test_official_handcrafted_checkpoint_is_detected(tiny_config: Path, tmp_path: Path) -> None:
    source = create_clipn(tiny_config, variant="handcrafted").model
    torch.save(_official_layout(source), tmp_path / "hc.pt")
    assert create_clipn(tiny_config, checkpoint=tmp_path / "hc.pt").info.variant == "handcrafted"
    with pytest.raises(UserError, match="handcrafted CLIPN model"):
        create_clipn(tiny_config, checkpoint=tmp_path / "hc.pt", variant="learnable")


def test_unreadable_checkpoints_are_user_errors(tiny_config: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="weights_only"):
        create_clipn(tiny_config, checkpoint=tmp_path / "junk.pt")
    save_file({"visual.proj": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="without clipn-ood metadata"):
        create_clipn(tiny_config, checkpoint=tmp_path / "plain.safetensors")
    torch.save({"state_dict": {"module.visual.proj": torch.zeros(2)}}, tmp_path / "clip_only.pt")
    with pytest.raises(UserError, match="pass it as --pretrained"):
        create_clipn(tiny_config, checkpoint=tmp_path / "clip_only.pt")


def test_model_names_configs_and_unsupported_towers(tiny_config: Path, tmp_path: Path) -> None:
    name, cfg = resolve_model_config("ViT-B-16")
    assert name == "ViT-B-16" and cfg["text_cfg"]["context_length"] == 77
    name, cfg = resolve_model_config(tiny_config)
    assert name == "tiny-clip" and cfg["embed_dim"] == 32
    for unsupported, why in (
        ("coca_ViT-B-32", "CoCa"),
        ("roberta-ViT-B-32", "Hugging Face"),
        ("ViT-B-16-SigLIP", "custom"),
    ):
        with pytest.raises(UserError, match=f"{why}.*supports open_clip models built as open_clip.CLIP"):
            resolve_model_config(unsupported)
    hf = json.loads(tiny_config.read_text())
    hf["text_cfg"]["hf_model_name"] = "roberta-base"
    (tmp_path / "hf.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match="Hugging Face"):
        resolve_model_config(tmp_path / "hf.json")
    (tmp_path / "bad.json").write_text('{\n  "embed_dim": 32,\n  oops\n}')
    with pytest.raises(InputFileError, match=r"bad\.json:3"):
        resolve_model_config(tmp_path / "bad.json")
    with pytest.raises(UserError, match="not an open_clip model name"):
        resolve_model_config("ViT-Q-99")
    with pytest.raises(UserError, match="tags only exist for built-in"):
        create_clipn(tiny_config, "laion2b_s34b_b88k")
    wrapped = {"model_cfg": json.loads(tiny_config.read_text()), "preprocess_cfg": {"mean": [0.5, 0.5, 0.5]}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(wrapped))
    assert create_clipn(tmp_path / "open_clip_config.json").info.mean == (0.5, 0.5, 0.5)


def test_wrong_weights_file_is_a_user_error(tiny_config: Path, tmp_path: Path) -> None:
    save_file({"visual.proj": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match="do not fit --model"):
        create_clipn(tiny_config, tmp_path / "w.safetensors")
