"""Exact resume: the state a run saves beside each checkpoint, and finding, checking and restoring it.

Files, in ``logs/<name>/checkpoints/``::

    epoch_K.safetensors / step_S.safetensors   no-tower tensors + metadata (what clipn-export reads)
    epoch_K.state.pt / step_S.state.pt         optimizer, scaler, every rank's RNG and data position
    latest.json                                which state file is the newest (``--resume latest``)

A resumed run continues as if it had never stopped: same samples in the same order, same augmentation and
prompt draws, same optimizer moments; so its weights equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from clipn_runtime.errors import UserError
from clipn_runtime.fileio import atomic_write, atomic_writer, sha256_file
from clipn_train import checkpoint as ckpt
from clipn_train.config import TrainConfig
from clipn_train.distributed import DistInfo
from clipn_train.factory import ModelInfo
from clipn_train.model import CLIPN

log = logging.getLogger(__name__)

STATE_FORMAT = "clipn-ood/resume-state"
STATE_VERSION = 1
POINTER = "latest.json"
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
#: Settings a resumed run may change (with a warning): they shape the updates, not which samples a step sees.
RESUME_MAY_CHANGE: tuple[str, ...] = ("epochs", "lr", "warmup", "wd", "grad_clip", "precision")


@dataclass
class Position:
    """Where a run stands: what a resume state restores and each training step advances."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    #: This rank's data progress per dataloader worker: (raw samples consumed, corrupt samples skipped).
    progress: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: Running sums of the loss parts (and "steps") of the current epoch; empty at an epoch boundary.
    epoch_sums: dict[str, float] = field(default_factory=dict)

    def next_epoch(self) -> None:
        self.epoch, self.batch_in_epoch, self.progress, self.epoch_sums = self.epoch + 1, 0, {}, {}


# ---------------------------------------------------------------------------------------------------------------
# Finding and checking a state
# ---------------------------------------------------------------------------------------------------------------


def find_resume_state(cfg: TrainConfig) -> Path | None:
    """The state file ``--resume`` names; ``latest`` with nothing saved yet means a fresh start (None)."""
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        if not cfg.name:
            raise UserError("--resume latest needs --name (the run folder under -o/--output to continue)")
        pointer = Path(cfg.logs) / cfg.name / "checkpoints" / POINTER
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
    """The state at ``path``, refused unless it is ours, of this version, and its weights file is unchanged."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling failures come in many types
        raise UserError(ckpt.load_failure(f"--resume {path}", e)) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise UserError(f"--resume {path}: not a clipn-ood resume state of version {STATE_VERSION}")
    weights = path.parent / state["weights"]
    if not weights.is_file() or sha256_file(weights) != state["weights_sha256"]:
        raise UserError(
            f"--resume {path}: its weights file {weights} is missing or was changed; pick another state"
        )
    return state


def check_resumable(cfg: TrainConfig, state: dict[str, Any], dist_info: DistInfo, workers: int) -> None:
    """A UserError when ``cfg`` cannot continue the saved run exactly; a warning for the settings it may change."""
    saved = state["config"]
    for key in RESUME_MUST_MATCH:
        if key == "prompts" and cfg.variant != "handcrafted":
            continue  # only the hand-crafted variant reads the templates
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
    changed = [k for k in RESUME_MAY_CHANGE if saved.get(k) != getattr(cfg, k)]
    if changed:
        log.warning(
            "--resume: %s differ from the interrupted run; the run continues with the new values",
            ", ".join(changed),
        )


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


# ---------------------------------------------------------------------------------------------------------------
# Saving and restoring
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Checkpointer:
    """Saves a checkpoint with its resume state, and restores a run from one (the two sides of one format)."""

    folder: Path
    cfg: TrainConfig
    info: ModelInfo
    model: CLIPN
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    workers: int
    dist_info: DistInfo

    def restore(self, state: dict[str, Any]) -> Position:
        """Load the state's weights, optimizer, scaler and this rank's RNG; returns where the run stood."""
        d = self.dist_info
        check_resumable(self.cfg, state, d, self.workers)
        weights = self.folder / state["weights"]
        ckpt.load_no_tower(self.model, ckpt.read_checkpoint(weights).no_state, source=str(weights))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][d.rank] if d.rank < len(state["rng"]) else state["rng"][0])
        pos = Position(
            epoch=state["epoch"],
            batch_in_epoch=state["batch_in_epoch"],
            global_step=state["global_step"],
            progress={int(k): (int(v[0]), int(v[1])) for k, v in state["progress"][d.rank].items()},
            epoch_sums=dict(state.get("epoch_sums", {})),
        )
        log.info(
            "resumed from %s: epoch %d, batch %d, step %d",
            weights.name,
            pos.epoch + 1,
            pos.batch_in_epoch,
            pos.global_step,
        )
        return pos

    def _gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order (collective: every rank must call it)."""
        if not self.dist_info.distributed:
            return [value]
        values: list[Any] = [None] * self.dist_info.world_size
        dist.all_gather_object(values, value)
        return values

    def save(self, tag: str, pos: Position) -> Path:
        """Write ``<tag>.safetensors``, ``<tag>.state.pt`` and the ``latest.json`` pointer (collective)."""
        all_progress = self._gather(pos.progress)
        all_rng = self._gather(rng_state())
        path = self.folder / f"{tag}.safetensors"
        if not self.dist_info.is_main:
            return path
        meta = ckpt.no_tower_metadata(
            model_name=self.info.model_name,
            model_config=self.info.model_config,
            pretrained=self.info.pretrained,
            weights_sha256=self.info.weights_sha256,
            variant=self.cfg.variant,
            epoch=pos.epoch,
            step=pos.global_step,
        )
        sha = ckpt.save_no_tower(path, self.model, meta)
        with atomic_writer(self.folder / f"{tag}.state.pt") as fh:
            torch.save(self._state(path.name, sha, pos, all_progress, all_rng), fh)
        pointer = {"state": f"{tag}.state.pt", "weights": path.name, "global_step": pos.global_step}
        atomic_write(self.folder / POINTER, json.dumps(pointer))
        log.info("saved %s (step %d)", path, pos.global_step)
        return path

    def _state(
        self, weights: str, sha: str, pos: Position, all_progress: list[Any], all_rng: list[Any]
    ) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "weights": weights,
            "weights_sha256": sha,
            "epoch": pos.epoch,
            "batch_in_epoch": pos.batch_in_epoch,
            "global_step": pos.global_step,
            "progress": [{str(k): list(v) for k, v in p.items()} for p in all_progress],
            "rng": all_rng,
            "workers": self.workers,
            "world_size": self.dist_info.world_size,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "config": asdict(self.cfg),
            "epoch_sums": pos.epoch_sums,
        }
