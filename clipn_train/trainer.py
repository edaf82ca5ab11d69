"""The CLIPN training loop: official recipe by default, exact resume, DDP, feature-cache training.

Official recipe (DESIGN.md §4): AdamW lr 3e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 on ≥2-D tensors,
cosine schedule without warmup, AMP, 10 epochs, 512 per GPU × 4 GPUs on CC3M.

Run folder (like open_clip)::

    logs/<name>/out.log  params.json  results.jsonl  tensorboard/
    logs/<name>/checkpoints/epoch_K.safetensors   no-tower tensors + metadata (what clipn-export reads)
    logs/<name>/checkpoints/epoch_K.state.pt      resume state: optimizer, scaler, RNG, data position
    logs/<name>/checkpoints/step_S.*              the same, written when a run is interrupted mid-epoch
    logs/<name>/checkpoints/latest.json           which state file is the newest (``--resume latest``)
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import random
import re
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from clipn_runtime.errors import UserError
from clipn_train import checkpoint as ckpt
from clipn_train.cache import CachedBatches, FeatureCache, model_identity
from clipn_train.data import (
    Batch,
    CaptionBatches,
    CaptionTexts,
    CsvSource,
    DataSpec,
    StreamConfig,
    caption_pairs,
    mix_seed,
    worker_init,
)
from clipn_train.distributed import DistInfo
from clipn_train.losses import PARTS, distributed_clipn_loss, p_no
from clipn_train.model import CLIPN, LoadedCLIPN, create_clipn
from clipn_train.precision import autocast_for

log = logging.getLogger(__name__)

STATE_FORMAT = "clipn-ood/resume-state"
STATE_VERSION = 1
#: Settings that fix which samples a step sees; resuming with another value could not continue the same run.
RESUME_MUST_MATCH: tuple[str, ...] = (
    "train_data",
    "dataset_type",
    "train_num_samples",
    "model",
    "pretrained",
    "variant",
    "prompts",
    "batch_size",
    "seed",
    "augment",
)


@dataclass
class TrainConfig:
    """Every ``clipn-train`` option; the defaults are the official CLIPN recipe."""

    train_data: str
    model: str = "ViT-B-16"
    pretrained: str | None = "laion2b_s34b_b88k"
    variant: str = "learnable"
    prompts: str = "clean"
    dataset_type: str = "auto"
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "\t"
    train_num_samples: int | None = None
    val_data: str | None = None
    val_batch_size: int = 256
    batch_size: int = 512
    epochs: int = 10
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    wd: float = 0.2
    warmup: int = 0
    grad_clip: float | None = None
    precision: str = "amp"
    local_loss: bool = False
    workers: int = 4
    seed: int = 0
    augment: bool = True
    logs: str = "logs"
    name: str | None = None
    save_frequency: int = 1
    resume: str | None = None
    device: str = "auto"
    log_every_n_steps: int = 100
    tensorboard: bool = True


@dataclass
class TrainResult:
    log_dir: Path
    global_step: int
    epochs_done: int
    interrupted: bool
    last_checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    model: CLIPN | None = None  # the trained model (this rank's copy)


# ----------------------------------------------------------------------------------------------------------------
# Recipe pieces
# ----------------------------------------------------------------------------------------------------------------


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total`` (open_clip's schedule)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


def param_groups(model: CLIPN, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on ≥2-D tensors only (matrices, embeddings, prompts); none on gains and biases."""
    params = model.trainable_parameters()
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def prompt_index_of(model: CLIPN, batch: Batch) -> Tensor | None:
    """The official per-sample draw of one of 17 prompts (16 learned + their mean), from the sample's draw."""
    if model.prompt_no is None:
        return None
    if batch.draws is None:
        raise ValueError("the batch carries no per-sample draws")
    return batch.draws % (model.num_prompts + 1)


def batch_features(
    model: nn.Module, core: CLIPN, batch: Batch, prompt_index: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(image, yes-text, no-text) features of a batch; cached batches run only the no tower.

    Tokens are cut to the longest caption in the batch (exact for causal masks with EOT pooling).
    """
    tokens_no = batch.tokens_no
    tokens = batch.tokens
    both = tokens_no if tokens is None or tokens is tokens_no else torch.cat([tokens, tokens_no])
    cut = core.needed_context(both)
    if batch.image_features is None:
        if batch.images is None or tokens is None:
            raise ValueError("a raw batch needs images and tokens")
        image, text, text_no = model(batch.images, tokens[:, :cut], tokens_no[:, :cut], prompt_index)
    else:
        _, _, text_no = model(None, None, tokens_no[:, :cut], prompt_index)
        image, text = batch.image_features, batch.text_features
    assert image is not None and text is not None and text_no is not None
    return image, text, text_no


def heldout_p_no(core: CLIPN, batch: Batch, autocast: Callable[[], Any]) -> tuple[float, float]:
    """Mean p_no on matched (diagonal) and mismatched (off-diagonal) pairs of a held-out batch (eval mode)."""
    was_training = core.training
    core.eval()
    try:
        with torch.no_grad(), autocast():
            image, text, text_no = batch_features(core, core, batch, prompt_index=None)
        probs = p_no(image, text, text_no, core.scale)
    finally:
        core.train(was_training)
    n = probs.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=probs.device)
    return float(probs.diagonal().mean()), float(probs[off].mean()) if n > 1 else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Data plumbing
# ----------------------------------------------------------------------------------------------------------------


class TrainData:
    """Batches for one rank per epoch, from raw data (streamed) or from a feature cache."""

    def __init__(self, cfg: TrainConfig, loaded: LoadedCLIPN, dist_info: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist_info
        spec = DataSpec(cfg.train_data, cfg.dataset_type, cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator)
        self.kind = spec.kind()
        self.cache: FeatureCache | None = None
        if self.kind == "cache":
            self.cache = FeatureCache(cfg.train_data)
            self.cache.check_model(model_identity(loaded.info))
            available: int | None = len(self.cache)
            self.workers = 0
        else:
            self.source = spec.open_source()
            available = len(self.source) if isinstance(self.source, CsvSource) else self.source.size()
            self.workers = cfg.workers
            self.texts = CaptionTexts(loaded.tokenizer, caption_pairs(cfg.variant, cfg.prompts))
            self.transform = loaded.preprocess_train if cfg.augment else loaded.preprocess_val
        num_samples = cfg.train_num_samples or available
        if not num_samples:
            raise UserError(
                f"--train-data {cfg.train_data}: the number of samples is unknown (no sizes.json or __len__ "
                "beside the shards); pass --train-num-samples (CC3M train: 2905954 before filtering)"
            )
        global_batch = cfg.batch_size * dist_info.world_size
        self.num_samples = num_samples
        self.num_batches = num_samples // global_batch
        if self.num_batches == 0:
            raise UserError(
                f"{num_samples} training samples are fewer than one global batch ({cfg.batch_size} × "
                f"{dist_info.world_size} ranks); lower --batch-size"
            )

    def batches(self, epoch: int, start_batch: int, progress: dict[int, tuple[int, int]]) -> Iterable[Batch]:
        cfg, d = self.cfg, self.dist
        if self.cache is not None:
            return CachedBatches(
                self.cache,
                batch_size=cfg.batch_size,
                num_batches=self.num_batches,
                seed=cfg.seed,
                epoch=epoch,
                rank=d.rank,
                world_size=d.world_size,
                start_batch=start_batch,
            )
        stream = CaptionBatches(
            self.source,
            self.transform,
            self.texts,
            StreamConfig(
                batch_size=cfg.batch_size,
                num_batches=self.num_batches,
                seed=cfg.seed,
                epoch=epoch,
                rank=d.rank,
                world_size=d.world_size,
                start_batch=start_batch,
                progress=dict(progress),
            ),
        )
        if self.workers == 0:
            return stream
        return torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=d.device.type == "cuda",
            worker_init_fn=worker_init,
        )


def _first_cached_batch(cache: FeatureCache, size: int) -> Batch:
    """The first ``size`` samples of a feature cache (all of it if smaller), in order."""
    batches = CachedBatches(
        cache,
        batch_size=min(size, len(cache)),
        num_batches=1,
        seed=0,
        epoch=0,
        rank=0,
        world_size=1,
        shuffle=False,
    )
    return next(iter(batches))


def _heldout_batch(cfg: TrainConfig, loaded: LoadedCLIPN, data: TrainData) -> tuple[Batch, str]:
    """The fixed batch whose p_no is reported each epoch: from --val-data, else the first training samples."""
    size = cfg.val_batch_size
    if cfg.val_data:
        spec = DataSpec(cfg.val_data, "auto", cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator)
        label = "val"
        if spec.kind() == "cache":
            cache = FeatureCache(cfg.val_data)
            cache.check_model(model_identity(loaded.info))
            return _first_cached_batch(cache, size), label
        source = spec.open_source()
        texts = CaptionTexts(loaded.tokenizer, caption_pairs(cfg.variant, cfg.prompts))
    else:
        label = "train (no --val-data given, so not held out)"
        if data.cache is not None:
            return _first_cached_batch(data.cache, size), label
        source, texts = data.source, data.texts
    stream = CaptionBatches(
        source,
        loaded.preprocess_val,
        texts,
        StreamConfig(batch_size=size, num_batches=None, seed=cfg.seed, shuffle=False),
    )
    batch = next(iter(stream), None)
    if batch is None:
        raise UserError(f"no readable sample for the held-out batch in {cfg.val_data or cfg.train_data}")
    return batch, label


# ----------------------------------------------------------------------------------------------------------------
# Run folder, checkpoints, resume
# ----------------------------------------------------------------------------------------------------------------


def default_run_name(cfg: TrainConfig) -> str:
    model = Path(cfg.model).stem if cfg.model.endswith(".json") else cfg.model
    name = f"{time.strftime('%Y_%m_%d-%H_%M_%S')}-{model}-{cfg.variant}-lr_{cfg.lr:g}-b_{cfg.batch_size}-{cfg.precision}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def find_resume_state(cfg: TrainConfig) -> Path | None:
    """The state file ``--resume`` names; ``latest`` with nothing saved yet means a fresh start (None)."""
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        if not cfg.name:
            raise UserError("--resume latest needs --name (the run folder under -o/--output to continue)")
        pointer = Path(cfg.logs) / cfg.name / "checkpoints" / "latest.json"
        if not pointer.is_file():
            log.info("--resume latest: nothing saved in %s yet, starting fresh", pointer.parent)
            return None
        try:
            return pointer.parent / json.loads(pointer.read_text())["state"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise UserError(f"{pointer}: unreadable ({e}); pass --resume PATH to a *.state.pt file") from None
    path = Path(cfg.resume)
    if path.suffix == ".safetensors":
        path = path.with_name(path.name.removesuffix(".safetensors") + ".state.pt")
    if not path.is_file():
        raise UserError(f"--resume {cfg.resume}: no resume state at {path} (expected a *.state.pt file)")
    return path


def load_resume_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling failures come in many types
        raise UserError(f"--resume {path}: unreadable resume state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise UserError(f"--resume {path}: not a clipn-ood resume state of version {STATE_VERSION}")
    weights = path.parent / state["weights"]
    if not weights.is_file() or ckpt.sha256_file(weights) != state["weights_sha256"]:
        raise UserError(
            f"--resume {path}: its weights file {weights} is missing or was changed; pick another state"
        )
    return state


def _check_resumable(cfg: TrainConfig, state: dict[str, Any], dist_info: DistInfo, workers: int) -> None:
    saved = state["config"]
    for key in RESUME_MUST_MATCH:
        if saved.get(key) != getattr(cfg, key):
            raise UserError(
                f"--resume: the run was started with --{key.replace('_', '-')} {saved.get(key)!r}, now "
                f"{getattr(cfg, key)!r}; resuming must use the same value to continue the same run"
            )
    if state["world_size"] != dist_info.world_size or state["workers"] != workers:
        raise UserError(
            f"--resume: the run used {state['world_size']} rank(s) × {state['workers']} data worker(s), now "
            f"{dist_info.world_size} × {workers}; use the same numbers to continue exactly"
        )
    changed = [
        k for k in ("epochs", "lr", "warmup", "wd", "grad_clip", "precision") if saved.get(k) != getattr(cfg, k)
    ]
    if changed:
        log.warning(
            "--resume: %s differ from the interrupted run; the run continues with the new values",
            ", ".join(changed),
        )


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


class _StopSignals:
    """SIGINT/SIGTERM ask the loop to save and stop at the next step boundary; a second one aborts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum
        for s, h in self._previous.items():
            signal.signal(s, h)
        log.warning(
            "%s received: saving a checkpoint at the end of this step (send again to abort)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> _StopSignals:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


class Trainer:
    """Train the no tower of a CLIPN model.

    ``should_stop(global_step)``, checked after each step, lets a caller interrupt the run the way SIGINT or
    SIGTERM does: save a checkpoint and stop (the result says ``interrupted``).
    """

    def __init__(
        self, cfg: TrainConfig, dist_info: DistInfo | None = None, should_stop: Callable[[int], bool] | None = None
    ) -> None:
        self.cfg = cfg
        self.dist = dist_info or DistInfo()
        self.should_stop = should_stop
        if cfg.variant not in ("learnable", "handcrafted"):
            raise UserError(f"--variant {cfg.variant}: choose learnable or handcrafted")
        for name, value in (
            ("--batch-size", cfg.batch_size),
            ("--epochs", cfg.epochs),
            ("--save-frequency", cfg.save_frequency),
        ):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if cfg.batch_size * self.dist.world_size < 2:
            raise UserError("the CLIPN loss needs at least 2 pairs per global batch; raise --batch-size")

    # -- set-up -------------------------------------------------------------------------------------------------
    def _prepare_run_folder(self) -> tuple[Path, dict[str, Any] | None]:
        cfg = self.cfg
        state_path = find_resume_state(cfg)
        if state_path is not None:
            return state_path.parent.parent, load_resume_state(state_path)
        name = cfg.name or default_run_name(cfg)
        if self.dist.distributed:  # every rank must use rank 0's (time-stamped) name
            box = [name]
            dist.broadcast_object_list(box, src=0)
            name = box[0]
        log_dir = Path(cfg.logs) / name
        if (log_dir / "checkpoints").is_dir() and any((log_dir / "checkpoints").iterdir()) and cfg.resume is None:
            raise UserError(
                f"{log_dir} already holds checkpoints; pass --resume latest to continue it, or another --name"
            )
        return log_dir, None

    def run(self) -> TrainResult:
        d = self.dist
        log_dir, state = self._prepare_run_folder()
        ckpt_dir = log_dir / "checkpoints"
        file_handler = None
        package_log = logging.getLogger("clipn_train")
        level_before = package_log.level
        if d.is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(log_dir / "out.log", encoding="utf-8")
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            file_handler.setLevel(logging.INFO)
            package_log.addHandler(file_handler)
            if package_log.getEffectiveLevel() > logging.INFO:  # out.log always gets the INFO lines
                package_log.setLevel(logging.INFO)
        try:
            with _StopSignals() as signals:
                return self._run(log_dir, ckpt_dir, state, signals)
        finally:
            package_log.setLevel(level_before)
            if file_handler is not None:
                package_log.removeHandler(file_handler)
                file_handler.close()

    def _run(
        self, log_dir: Path, ckpt_dir: Path, state: dict[str, Any] | None, signals: _StopSignals
    ) -> TrainResult:
        cfg, d = self.cfg, self.dist
        # The same on every rank: a random-init base (tests) must be the same model everywhere.
        torch.manual_seed(mix_seed("init", cfg.seed))
        random.seed(mix_seed("python", cfg.seed))
        loaded = create_clipn(cfg.model, cfg.pretrained, variant=cfg.variant)
        core = loaded.model.to(d.device).train()
        data = TrainData(cfg, loaded, d)
        autocast, needs_scaler = autocast_for(cfg.precision, d.device)
        scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
        optimizer = torch.optim.AdamW(
            param_groups(core, cfg.wd), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
        )
        total_steps = data.num_batches * cfg.epochs
        start_epoch, start_batch, global_step = 0, 0, 0
        progress: dict[int, tuple[int, int]] = {}
        epoch_sums: dict[str, float] = {}
        if state is not None:
            _check_resumable(cfg, state, d, data.workers)
            weights = ckpt_dir / state["weights"]
            ckpt.load_no_tower(core, ckpt.read_checkpoint(weights).no_state, source=str(weights))
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"][d.rank] if d.rank < len(state["rng"]) else state["rng"][0])
            start_epoch, start_batch, global_step = state["epoch"], state["batch_in_epoch"], state["global_step"]
            progress = {int(k): tuple(v) for k, v in state["progress"][d.rank].items()}  # type: ignore[misc]
            epoch_sums = dict(state.get("epoch_sums", {}))
            log.info(
                "resumed from %s: epoch %d, batch %d, step %d",
                weights.name,
                start_epoch + 1,
                start_batch,
                global_step,
            )
        elif d.is_main:
            (log_dir / "params.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True))

        model: nn.Module = core
        if d.distributed:
            model = nn.parallel.DistributedDataParallel(
                core, device_ids=[d.device.index] if d.device.type == "cuda" else None
            )
        scale = core.scale
        heldout, heldout_label = _heldout_batch(cfg, loaded, data) if d.is_main else (None, "")
        writer = self._tensorboard(log_dir) if d.is_main and cfg.tensorboard else None
        if d.is_main:
            log.info(
                "training %s (%s variant) on %s: %d samples, %d steps/epoch × %d epochs, global batch %d, "
                "%d trainable tensors, scale %.2f, device %s",
                loaded.info.model_name,
                cfg.variant,
                data.kind,
                data.num_samples,
                data.num_batches,
                cfg.epochs,
                cfg.batch_size * d.world_size,
                len(core.trainable_parameters()),
                scale,
                d.device,
            )
        history: list[dict[str, Any]] = []
        last_checkpoint: Path | None = None

        def save(tag: str, epoch: int, batch_in_epoch: int, sums: dict[str, float]) -> Path:
            all_progress: list[Any] = [progress]
            all_rng: list[Any] = [_rng_state()]
            if d.distributed:
                all_progress = [None] * d.world_size
                all_rng = [None] * d.world_size
                dist.all_gather_object(all_progress, progress)
                dist.all_gather_object(all_rng, _rng_state())
            path = ckpt_dir / f"{tag}.safetensors"
            if d.is_main:
                meta = ckpt.no_tower_metadata(
                    model_name=loaded.info.model_name,
                    model_config=loaded.info.model_config,
                    pretrained=loaded.info.pretrained,
                    weights_sha256=loaded.info.weights_sha256,
                    variant=cfg.variant,
                    epoch=epoch,
                    step=global_step,
                )
                sha = ckpt.save_no_tower(path, core, meta)
                body = {
                    "format": STATE_FORMAT,
                    "version": STATE_VERSION,
                    "weights": path.name,
                    "weights_sha256": sha,
                    "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch,
                    "global_step": global_step,
                    "progress": [{str(k): list(v) for k, v in p.items()} for p in all_progress],
                    "rng": all_rng,
                    "workers": data.workers,
                    "world_size": d.world_size,
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None,
                    "config": asdict(cfg),
                    "epoch_sums": sums,
                }
                buf = io.BytesIO()
                torch.save(body, buf)
                ckpt.atomic_write_bytes(ckpt_dir / f"{tag}.state.pt", buf.getvalue())
                pointer = {"state": f"{tag}.state.pt", "weights": path.name, "global_step": global_step}
                ckpt.atomic_write_bytes(ckpt_dir / "latest.json", json.dumps(pointer).encode())
                log.info("saved %s (step %d)", path, global_step)
            return path

        interrupted = False
        for epoch in range(start_epoch, cfg.epochs):
            sums = epoch_sums or {k: 0.0 for k in (*PARTS, "steps")}
            epoch_sums = {}
            bar = tqdm(
                total=data.num_batches,
                initial=start_batch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                unit="step",
                dynamic_ncols=True,
                disable=None if d.is_main else True,
            )
            window_start, window_samples = time.perf_counter(), 0
            batches: Iterator[Batch] = iter(data.batches(epoch, start_batch, progress))
            batch_index = start_batch
            try:
                for batch in batches:
                    lr = cosine_lr(global_step, cfg.lr, cfg.warmup, total_steps)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    parts = self._step(
                        model,
                        core,
                        batch.to(d.device),
                        optimizer,
                        scaler,
                        autocast,
                        scale,
                        prompt_index_of(core, batch),
                    )
                    global_step += 1
                    batch_index += 1
                    progress[batch.worker] = (batch.consumed, batch.corrupt)
                    for k in PARTS:
                        sums[k] += parts[k]
                    sums["steps"] += 1
                    window_samples += len(batch) * d.world_size
                    elapsed = time.perf_counter() - window_start
                    rate = window_samples / elapsed if elapsed > 0 else 0.0
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{parts['total']:.4f}",
                        yes=f"{parts['itbo_yes']:.3f}",
                        no=f"{parts['itbo_no']:.3f}",
                        tso=f"{parts['tso']:.3f}",
                        lr=f"{lr:.2e}",
                        sps=f"{rate:.0f}",
                    )
                    if d.is_main and (global_step % cfg.log_every_n_steps == 0 or batch_index == data.num_batches):
                        log.info(
                            "epoch %d step %d/%d: loss %.5f (itbo_yes %.4f, itbo_no %.4f, tso %.4f) lr %.3e, "
                            "%.1f samples/s",
                            epoch + 1,
                            batch_index,
                            data.num_batches,
                            parts["total"],
                            parts["itbo_yes"],
                            parts["itbo_no"],
                            parts["tso"],
                            lr,
                            rate,
                        )
                        if writer is not None:
                            for k in PARTS:
                                writer.add_scalar(f"train/{k}", parts[k], global_step)
                            writer.add_scalar("train/lr", lr, global_step)
                            writer.add_scalar("train/samples_per_second", rate, global_step)
                        window_start, window_samples = time.perf_counter(), 0
                    if self._stop_requested(signals, global_step) and batch_index < data.num_batches:
                        last_checkpoint = save(f"step_{global_step}", epoch, batch_index, sums)
                        interrupted = True
                        break
            finally:
                bar.close()
                del batches
            if interrupted:
                break
            history.append(
                self._end_epoch(
                    epoch, global_step, sums, progress, heldout, heldout_label, core, autocast, log_dir, writer
                )
            )
            start_batch, progress = 0, {}  # before saving: the state is "at the start of the next epoch"
            if (epoch + 1) % cfg.save_frequency == 0 or epoch + 1 == cfg.epochs:
                last_checkpoint = save(f"epoch_{epoch + 1}", epoch + 1, 0, {})
            if self._stop_requested(signals, global_step) and epoch + 1 < cfg.epochs:
                if (epoch + 1) % cfg.save_frequency != 0:
                    last_checkpoint = save(f"epoch_{epoch + 1}", epoch + 1, 0, {})
                interrupted = True
                break
        if writer is not None:
            writer.close()
        if d.distributed:
            dist.barrier()
        epochs_done = history[-1]["epoch"] if history else start_epoch
        return TrainResult(log_dir, global_step, epochs_done, interrupted, last_checkpoint, history, core)

    def _step(
        self,
        model: nn.Module,
        core: CLIPN,
        batch: Batch,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        autocast: Callable[[], Any],
        scale: float,
        prompt_index: Tensor | None,
    ) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            image, text, text_no = batch_features(model, core, batch, prompt_index)
        parts = distributed_clipn_loss(image, text, text_no, scale, local_loss=self.cfg.local_loss)
        params = core.trainable_parameters()
        if scaler is not None:
            scaler.scale(parts["total"]).backward()  # type: ignore[no-untyped-call]
            if self.cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            parts["total"].backward()  # type: ignore[no-untyped-call]
            if self.cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            optimizer.step()
        values = torch.stack([parts[k].detach() for k in PARTS]).tolist()
        return dict(zip(PARTS, values, strict=True))

    def _stop_requested(self, signals: _StopSignals, global_step: int) -> bool:
        stop = signals.received is not None or (self.should_stop is not None and self.should_stop(global_step))
        if self.dist.distributed:  # every rank must stop at the same step
            flag = torch.tensor([float(stop)], device=self.dist.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def _end_epoch(
        self,
        epoch: int,
        step: int,
        sums: dict[str, float],
        progress: dict[int, tuple[int, int]],
        heldout: Batch | None,
        heldout_label: str,
        core: CLIPN,
        autocast: Callable[[], Any],
        log_dir: Path,
        writer: Any,
    ) -> dict[str, Any]:
        d = self.dist
        corrupt = torch.tensor([float(sum(c for _, c in progress.values()))], device=d.device)
        if d.distributed:
            dist.all_reduce(corrupt)
        steps = max(1.0, sums["steps"])
        record: dict[str, Any] = {"epoch": epoch + 1, "step": step}
        record.update({f"loss_{k}" if k != "total" else "loss": sums[k] / steps for k in PARTS})
        record["skipped_samples"] = int(corrupt.item())
        if d.is_main and heldout is not None:
            matched, mismatched = heldout_p_no(core, heldout.to(d.device), autocast)
            record.update(
                p_no_matched=matched, p_no_mismatched=mismatched, heldout=heldout_label, heldout_size=len(heldout)
            )
            log.info(
                "epoch %d done: mean loss %.5f; held-out p_no matched %.4f (should fall), mismatched %.4f "
                "(should rise) on %d pairs of %s; %d corrupt/unreadable samples skipped",
                epoch + 1,
                record["loss"],
                matched,
                mismatched,
                len(heldout),
                heldout_label,
                record["skipped_samples"],
            )
            with (log_dir / "results.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                writer.add_scalar("heldout/p_no_matched", matched, step)
                writer.add_scalar("heldout/p_no_mismatched", mismatched, step)
        return record

    @staticmethod
    def _tensorboard(log_dir: Path) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed; logging to out.log and results.jsonl only")
            return None
        return SummaryWriter(str(log_dir / "tensorboard"))


def train(cfg: TrainConfig, dist_info: DistInfo | None = None) -> TrainResult:
    return Trainer(cfg, dist_info).run()
