"""The CLIPN training loop: official recipe by default, exact resume, DDP, feature-cache training.

The pieces live beside it: the optimiser and learning-rate schedule in :mod:`clipn_train.schedule`, the resume
state in :mod:`clipn_train.resume`, what a run reads in :mod:`clipn_train.train_data`. The paper trained 10
epochs with AMP, 512 pairs per GPU × 4 GPUs on CC3M (the defaults of :class:`TrainConfig`).

Run folder (like open_clip)::

    logs/<name>/out.log  params.json  results.jsonl  tensorboard/
    logs/<name>/checkpoints/epoch_K.safetensors   no-tower tensors + metadata (what clipn-export reads)
    logs/<name>/checkpoints/epoch_K.state.pt      resume state: optimizer, scaler, RNG, data position
    logs/<name>/checkpoints/step_S.*              the same, written when a run is interrupted mid-epoch
    logs/<name>/checkpoints/latest.json           which state file is the newest (``--resume latest``)
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from clipn_runtime.errors import UserError
from clipn_runtime.fileio import atomic_write
from clipn_train.config import TrainConfig
from clipn_train.data import Batch, mix_seed
from clipn_train.distributed import DistInfo
from clipn_train.factory import LoadedCLIPN, create_clipn
from clipn_train.losses import PARTS, distributed_clipn_loss, p_no
from clipn_train.model import CLIPN
from clipn_train.precision import autocast_for
from clipn_train.resume import Checkpointer, Position, find_resume_state, load_resume_state
from clipn_train.schedule import apply_lr, make_optimizer
from clipn_train.train_data import TrainData, heldout_batch

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "batch_features",
    "default_run_name",
    "heldout_p_no",
    "prompt_index_of",
    "train",
]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    log_dir: Path
    global_step: int
    epochs_done: int
    interrupted: bool
    last_checkpoint: Path | None
    model: CLIPN  # the trained model (this rank's copy)
    history: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Forward pieces
# ----------------------------------------------------------------------------------------------------------------


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


def default_run_name(cfg: TrainConfig) -> str:
    model = Path(cfg.model).stem if cfg.model.endswith(".json") else cfg.model
    name = f"{time.strftime('%Y_%m_%d-%H_%M_%S')}-{model}-{cfg.variant}-lr_{cfg.lr:g}-b_{cfg.batch_size}-{cfg.precision}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


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


class _Throughput:
    """Samples per second since the last log line."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.start, self.samples = time.perf_counter(), 0

    def add(self, samples: int) -> float:
        self.samples += samples
        elapsed = time.perf_counter() - self.start
        return self.samples / elapsed if elapsed > 0 else 0.0


@dataclass
class _Session:
    """What the steps of one run share, built once by :meth:`Trainer._start`."""

    loaded: LoadedCLIPN
    core: CLIPN
    model: nn.Module  # ``core``, or its DDP wrapper
    data: TrainData
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    autocast: Callable[[], Any]
    checkpoints: Checkpointer
    pos: Position
    log_dir: Path
    heldout: Batch | None = None
    heldout_label: str = ""
    writer: Any = None
    scale: float = field(init=False)

    def __post_init__(self) -> None:
        self.scale = self.core.scale


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

    def _start(self, log_dir: Path, ckpt_dir: Path, state: dict[str, Any] | None) -> _Session:
        """Build the model, data and optimiser, and restore ``state`` (None: a fresh run)."""
        cfg, d = self.cfg, self.dist
        # The same on every rank: a random-init base (tests) must be the same model everywhere.
        torch.manual_seed(mix_seed("init", cfg.seed))
        random.seed(mix_seed("python", cfg.seed))
        loaded = create_clipn(cfg.model, cfg.pretrained, variant=cfg.variant)
        core = loaded.model.to(d.device).train()
        data = TrainData(cfg, loaded, d)
        autocast, needs_scaler = autocast_for(cfg.precision, d.device)
        scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
        optimizer = make_optimizer(core, cfg)
        checkpoints = Checkpointer(ckpt_dir, cfg, loaded.info, core, optimizer, scaler, data.workers, d)
        if state is not None:
            pos = checkpoints.restore(state)
        else:
            pos = Position()
            if d.is_main:
                atomic_write(log_dir / "params.json", json.dumps(asdict(cfg), indent=2, sort_keys=True))
        model: nn.Module = core
        if d.distributed:
            model = nn.parallel.DistributedDataParallel(
                core, device_ids=[d.device.index] if d.device.type == "cuda" else None
            )
        s = _Session(loaded, core, model, data, optimizer, scaler, autocast, checkpoints, pos, log_dir)
        if d.is_main:
            s.heldout, s.heldout_label = heldout_batch(cfg, loaded, data)
            s.writer = self._tensorboard(log_dir) if cfg.tensorboard else None
            self._announce(s)
        return s

    def _announce(self, s: _Session) -> None:
        log.info(
            "training %s (%s variant) on %s: %d samples, %d steps/epoch × %d epochs, global batch %d, "
            "%d trainable tensors, scale %.2f, device %s",
            s.loaded.info.model_name,
            self.cfg.variant,
            s.data.kind,
            s.data.num_samples,
            s.data.num_batches,
            self.cfg.epochs,
            self.cfg.batch_size * self.dist.world_size,
            len(s.core.trainable_parameters()),
            s.scale,
            self.dist.device,
        )

    # -- the run ------------------------------------------------------------------------------------------------
    def _run(
        self, log_dir: Path, ckpt_dir: Path, state: dict[str, Any] | None, signals: _StopSignals
    ) -> TrainResult:
        s = self._start(log_dir, ckpt_dir, state)
        start_epoch = s.pos.epoch
        history: list[dict[str, Any]] = []
        last_checkpoint: Path | None = None
        interrupted = False
        while s.pos.epoch < self.cfg.epochs:
            saved = self._train_epoch(s, signals)
            if saved is not None:  # stopped mid-epoch
                last_checkpoint, interrupted = saved, True
                break
            history.append(self._end_epoch(s))
            saved, interrupted = self._epoch_boundary(s, signals)
            last_checkpoint = saved or last_checkpoint
            if interrupted:
                break
        if s.writer is not None:
            s.writer.close()
        if self.dist.distributed:
            dist.barrier()
        epochs_done = history[-1]["epoch"] if history else start_epoch
        return TrainResult(log_dir, s.pos.global_step, epochs_done, interrupted, last_checkpoint, s.core, history)

    def _train_epoch(self, s: _Session, signals: _StopSignals) -> Path | None:
        """The rest of the current epoch; the checkpoint saved when a stop request ends it early, else None."""
        cfg, d, pos = self.cfg, self.dist, s.pos
        pos.epoch_sums = pos.epoch_sums or {k: 0.0 for k in (*PARTS, "steps")}
        bar = tqdm(
            total=s.data.num_batches,
            initial=pos.batch_in_epoch,
            desc=f"epoch {pos.epoch + 1}/{cfg.epochs}",
            unit="step",
            dynamic_ncols=True,
            disable=None if d.is_main else True,
        )
        throughput = _Throughput()
        batches: Iterator[Batch] = iter(s.data.batches(pos.epoch, pos.batch_in_epoch, pos.progress))
        try:
            for batch in batches:
                lr = apply_lr(s.optimizer, cfg, pos.global_step, s.data.num_batches * cfg.epochs)
                parts = self._step(s, batch.to(d.device), prompt_index_of(s.core, batch))
                pos.global_step += 1
                pos.batch_in_epoch += 1
                pos.progress[batch.worker] = (batch.consumed, batch.corrupt)
                for k in PARTS:
                    pos.epoch_sums[k] += parts[k]
                pos.epoch_sums["steps"] += 1
                rate = throughput.add(len(batch) * d.world_size)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{parts['total']:.4f}",
                    yes=f"{parts['itbo_yes']:.3f}",
                    no=f"{parts['itbo_no']:.3f}",
                    tso=f"{parts['tso']:.3f}",
                    lr=f"{lr:.2e}",
                    sps=f"{rate:.0f}",
                )
                last_of_epoch = pos.batch_in_epoch == s.data.num_batches
                if d.is_main and (pos.global_step % cfg.log_every_n_steps == 0 or last_of_epoch):
                    self._log_step(s, parts, lr, rate)
                    throughput.restart()
                if self._stop_requested(signals, pos.global_step) and not last_of_epoch:
                    return s.checkpoints.save(f"step_{pos.global_step}", pos)
        finally:
            bar.close()
            del batches
        return None

    def _epoch_boundary(self, s: _Session, signals: _StopSignals) -> tuple[Path | None, bool]:
        """Save at the end of an epoch when due (or when asked to stop); → (checkpoint or None, stop)."""
        cfg, pos = self.cfg, s.pos
        pos.next_epoch()  # before saving: the state is "at the start of the next epoch"
        due = pos.epoch % cfg.save_frequency == 0 or pos.epoch == cfg.epochs
        saved = s.checkpoints.save(f"epoch_{pos.epoch}", pos) if due else None
        if self._stop_requested(signals, pos.global_step) and pos.epoch < cfg.epochs:
            if not due:
                saved = s.checkpoints.save(f"epoch_{pos.epoch}", pos)
            return saved, True
        return saved, False

    def _step(self, s: _Session, batch: Batch, prompt_index: Tensor | None) -> dict[str, float]:
        optimizer, scaler, clip = s.optimizer, s.scaler, self.cfg.grad_clip
        optimizer.zero_grad(set_to_none=True)
        with s.autocast():
            image, text, text_no = batch_features(s.model, s.core, batch, prompt_index)
        parts = distributed_clipn_loss(image, text, text_no, s.scale, local_loss=self.cfg.local_loss)
        params = s.core.trainable_parameters()
        if scaler is not None:
            scaler.scale(parts["total"]).backward()  # type: ignore[no-untyped-call]
            if clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            parts["total"].backward()  # type: ignore[no-untyped-call]
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
        values = torch.stack([parts[k].detach() for k in PARTS]).tolist()
        return dict(zip(PARTS, values, strict=True))

    def _log_step(self, s: _Session, parts: dict[str, float], lr: float, rate: float) -> None:
        pos = s.pos
        log.info(
            "epoch %d step %d/%d: loss %.5f (itbo_yes %.4f, itbo_no %.4f, tso %.4f) lr %.3e, %.1f samples/s",
            pos.epoch + 1,
            pos.batch_in_epoch,
            s.data.num_batches,
            parts["total"],
            parts["itbo_yes"],
            parts["itbo_no"],
            parts["tso"],
            lr,
            rate,
        )
        if s.writer is not None:
            for k in PARTS:
                s.writer.add_scalar(f"train/{k}", parts[k], pos.global_step)
            s.writer.add_scalar("train/lr", lr, pos.global_step)
            s.writer.add_scalar("train/samples_per_second", rate, pos.global_step)

    def _stop_requested(self, signals: _StopSignals, global_step: int) -> bool:
        stop = signals.received is not None or (self.should_stop is not None and self.should_stop(global_step))
        if self.dist.distributed:  # every rank must stop at the same step
            flag = torch.tensor([float(stop)], device=self.dist.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def _end_epoch(self, s: _Session) -> dict[str, Any]:
        """The epoch's record: mean losses, skipped samples and (main rank) the held-out p_no report."""
        d, pos, sums = self.dist, s.pos, s.pos.epoch_sums
        corrupt = torch.tensor([float(sum(c for _, c in pos.progress.values()))], device=d.device)
        if d.distributed:
            dist.all_reduce(corrupt)
        steps = max(1.0, sums["steps"])
        record: dict[str, Any] = {"epoch": pos.epoch + 1, "step": pos.global_step}
        record.update({f"loss_{k}" if k != "total" else "loss": sums[k] / steps for k in PARTS})
        record["skipped_samples"] = int(corrupt.item())
        if d.is_main and s.heldout is not None:
            self._report_heldout(s, record)
        return record

    def _report_heldout(self, s: _Session, record: dict[str, Any]) -> None:
        assert s.heldout is not None
        matched, mismatched = heldout_p_no(s.core, s.heldout.to(self.dist.device), s.autocast)
        record.update(
            p_no_matched=matched, p_no_mismatched=mismatched, heldout=s.heldout_label, heldout_size=len(s.heldout)
        )
        log.info(
            "epoch %d done: mean loss %.5f; held-out p_no matched %.4f (should fall), mismatched %.4f "
            "(should rise) on %d pairs of %s; %d corrupt/unreadable samples skipped",
            record["epoch"],
            record["loss"],
            matched,
            mismatched,
            len(s.heldout),
            s.heldout_label,
            record["skipped_samples"],
        )
        with (s.log_dir / "results.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if s.writer is not None:
            s.writer.add_scalar("heldout/p_no_matched", matched, record["step"])
            s.writer.add_scalar("heldout/p_no_mismatched", mismatched, record["step"])

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
