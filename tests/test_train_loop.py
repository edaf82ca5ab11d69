"""The training loop: recipe, learning, checkpoints, exact resume, signals, and cached vs uncached training."""

from __future__ import annotations

import math
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_csv, tiny_weights

from clipn_runtime.errors import UserError
from clipn_train.cache import build_feature_cache
from clipn_train.checkpoint import read_checkpoint
from clipn_train.factory import create_clipn
from clipn_train.model import CLIPN
from clipn_train.schedule import cosine_lr, param_groups
from clipn_train.trainer import TrainConfig, Trainer

# Tiny models on a shared 2-core machine run several times faster on one thread (conftest.py).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def setup(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    weights = tiny_weights(create_clipn(tiny_config), root)
    return {
        "csv": make_csv(root / "data", n=16),
        "small": make_csv(root / "small", n=8, seed=3),
        "weights": weights,
        "config": tiny_config,
        "root": root,
    }


def _cfg(setup: dict[str, Path], tmp_path: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "train_data": str(setup["csv"]),
        "model": str(setup["config"]),
        "pretrained": str(setup["weights"]),
        "batch_size": 4,
        "epochs": 2,
        "workers": 0,
        "precision": "fp32",
        "logs": str(tmp_path / "logs"),
        "name": "run",
        "log_every_n_steps": 1000,
        "tensorboard": False,
        "val_batch_size": 8,
    }
    base.update(kw)
    return TrainConfig(**base)


def _assert_same_weights(a: CLIPN | None, b: CLIPN | None, atol: float = 0.0) -> None:
    assert a is not None and b is not None
    sa, sb = a.trainable_state_dict(), b.trainable_state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if atol == 0.0:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)


def test_official_recipe_defaults_schedule_and_weight_decay_groups(tiny_config: Path) -> None:
    cfg = TrainConfig(train_data="x.csv")
    assert (cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.wd, cfg.warmup, cfg.epochs, cfg.batch_size) == (
        3e-4,
        0.9,
        0.98,
        1e-6,
        0.2,
        0,
        10,
        512,
    )
    assert (cfg.model, cfg.pretrained, cfg.precision, cfg.grad_clip) == (
        "ViT-B-16",
        "laion2b_s34b_b88k",
        "amp",
        None,
    )
    assert cosine_lr(0, 1.0, 0, 100) == 1.0 and cosine_lr(50, 1.0, 0, 100) == pytest.approx(0.5)
    assert cosine_lr(100, 1.0, 0, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(0, 1.0, 10, 100) == pytest.approx(0.1) and cosine_lr(10, 1.0, 10, 100) == 1.0
    model = create_clipn(tiny_config).model
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"prompt_no", "positional_embedding_no", "token_embedding_no.weight", "text_projection_no"} <= decayed
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert "ln_final_no.weight" in {names[id(p)] for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(model.trainable_parameters())


def test_training_learns_only_the_no_tower_and_checkpoints_round_trip(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    cfg = _cfg(
        setup,
        tmp_path,
        train_data=str(setup["small"]),
        batch_size=8,
        epochs=6,
        lr=2e-3,
        augment=False,
        val_data=str(setup["small"]),  # the training pairs: random images do not generalise
    )
    result = Trainer(cfg).run()
    assert not result.interrupted and result.epochs_done == 6 and result.global_step == 6
    first, last = result.history[0], result.history[-1]
    # Step 0: the no tower is the yes tower, so p_no = 0.5 everywhere and the loss is the closed form. TSO's
    # sqrt(2 - 2<g, g_no> + 1e-4) has slope 50 there, so the fp32 rounding of <g, g_no> (a few eps; the towers
    # take different attention kernels) moves the loss by up to ~1e-5: 1e-4, as in test_losses.
    assert first["loss"] == pytest.approx(0.5 * (2 * math.log(2) + 2 - math.sqrt(1e-4)), abs=1e-4)
    assert last["loss"] < first["loss"] - 0.05
    assert last["p_no_matched"] < 0.5 < last["p_no_mismatched"]  # what CLIPN learns
    assert last["heldout"] == "val" and last["heldout_size"] == 8
    # The frozen base is untouched; every no-tower tensor moved.
    fresh = create_clipn(cfg.model, cfg.pretrained)
    for k, v in fresh.model.clip.state_dict().items():
        assert torch.equal(result.model.clip.state_dict()[k], v), k
    for k, v in fresh.model.trainable_state_dict().items():
        assert not torch.equal(result.model.trainable_state_dict()[k], v), k
    # The epoch checkpoint is exactly the trained no tower and says where it came from.
    run = tmp_path / "logs" / "run"
    assert result.last_checkpoint == run / "checkpoints" / "epoch_6.safetensors"
    loaded = create_clipn(cfg.model, cfg.pretrained, checkpoint=result.last_checkpoint)
    _assert_same_weights(loaded.model, result.model)
    meta = read_checkpoint(result.last_checkpoint).metadata
    assert (meta["epoch"], meta["step"], meta["variant"], meta["model_name"]) == (
        "6",
        "6",
        "learnable",
        "tiny-clip",
    )
    assert meta["weights_sha256"] == fresh.info.weights_sha256
    for name in (
        "out.log",
        "params.json",
        "results.jsonl",
        "checkpoints/latest.json",
        "checkpoints/epoch_1.state.pt",
    ):
        assert (run / name).is_file(), name
    assert "held-out p_no matched" in (run / "out.log").read_text()
    with pytest.raises(UserError, match="already holds checkpoints"):
        Trainer(cfg).run()


def test_resume_after_an_epoch_equals_an_uninterrupted_run(setup: dict[str, Path], tmp_path: Path) -> None:
    full = Trainer(_cfg(setup, tmp_path, name="full")).run()
    cfg = _cfg(setup, tmp_path, name="split")
    first = Trainer(cfg, should_stop=lambda step: step == 4).run()  # 4 steps per epoch: stop after epoch 1
    assert first.interrupted and first.epochs_done == 1
    assert first.last_checkpoint is not None and first.last_checkpoint.name == "epoch_1.safetensors"
    second = Trainer(replace(cfg, resume="latest")).run()
    assert not second.interrupted and second.global_step == full.global_step == 8
    _assert_same_weights(second.model, full.model)
    assert second.history[-1]["loss"] == full.history[-1]["loss"]


def test_resume_mid_epoch_with_workers_equals_an_uninterrupted_run(setup: dict[str, Path], tmp_path: Path) -> None:
    kw = {"workers": 2, "variant": "handcrafted", "batch_size": 2, "epochs": 1}  # 8 steps, 2 data workers
    full = Trainer(_cfg(setup, tmp_path, name="full", **kw)).run()
    cfg = _cfg(setup, tmp_path, name="split", **kw)
    first = Trainer(cfg, should_stop=lambda step: step == 3).run()
    assert first.interrupted and first.global_step == 3
    assert first.last_checkpoint is not None and first.last_checkpoint.name == "step_3.safetensors"
    second = Trainer(replace(cfg, resume=str(first.last_checkpoint))).run()
    assert second.global_step == 8
    _assert_same_weights(second.model, full.model)  # exact: same process, same kernels, same batches
    assert second.history[-1]["loss"] == full.history[-1]["loss"]
    with pytest.raises(UserError, match="--batch-size"):
        Trainer(replace(cfg, resume=str(first.last_checkpoint), batch_size=4)).run()
    with pytest.raises(UserError, match="data worker"):
        Trainer(replace(cfg, resume=str(first.last_checkpoint), workers=0)).run()


def test_sigterm_saves_a_checkpoint_and_stops(setup: dict[str, Path], tmp_path: Path) -> None:
    def send_sigterm(step: int) -> bool:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return False

    before = signal.getsignal(signal.SIGTERM)
    result = Trainer(_cfg(setup, tmp_path), should_stop=send_sigterm).run()
    assert result.interrupted and result.global_step == 3  # noticed at the next step boundary
    assert (tmp_path / "logs" / "run" / "checkpoints" / "step_3.state.pt").is_file()
    assert signal.getsignal(signal.SIGTERM) == before


def test_cached_and_uncached_training_agree_without_augmentation(setup: dict[str, Path], tmp_path: Path) -> None:
    build_feature_cache(
        data=str(setup["csv"]),
        output=tmp_path / "cache",
        model=str(setup["config"]),
        pretrained=str(setup["weights"]),
        variant="learnable",
        prompts="clean",
        batch_size=5,
        workers=0,
        precision="fp32",
        dtype="float32",
    )
    raw = Trainer(_cfg(setup, tmp_path, name="raw", augment=False, epochs=1)).run()
    cached = Trainer(_cfg(setup, tmp_path, name="cached", train_data=str(tmp_path / "cache"), epochs=1)).run()
    assert raw.global_step == cached.global_step == 4
    for a, b in zip(raw.history, cached.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # The cache encoded its features in batches of 5, training in 4: other GEMM shapes, so ulp-level feature
    # differences. Adam's update lr·g/(|g|+ε) moves by up to lr/ε = 300 × the gradient's rounding (~1e-8) where
    # |g| ~ ε: ≤ 3e-6 a step, 4 steps (measured ≤ 4.6e-6). 5e-5 is a sixth of one step (lr 3e-4).
    _assert_same_weights(raw.model, cached.model, atol=5e-5)


def test_resuming_a_run_from_before_the_prompts_default_changed() -> None:
    from dataclasses import asdict

    from clipn_train.distributed import DistInfo
    from clipn_train.resume import check_resumable

    for variant in ("learnable", "handcrafted"):
        cfg = TrainConfig(train_data="x.csv", variant=variant)  # --prompts now defaults to clipn
        state = {"config": {**asdict(cfg), "prompts": "clean"}, "world_size": 1, "workers": 0}
        if variant == "learnable":  # never reads the templates: the old default does not block the resume
            check_resumable(cfg, state, DistInfo(), 0)
        else:
            with pytest.raises(UserError, match="started with --prompts 'clean', now 'clipn'"):
                check_resumable(cfg, state, DistInfo(), 0)
