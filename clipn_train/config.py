"""Every ``clipn-train`` option in one dataclass, shared by the trainer, its data, its schedule and resume."""

from __future__ import annotations

from dataclasses import dataclass

from clipn_runtime.prompts import DEFAULT_PROMPTS


@dataclass
class TrainConfig:
    """Every ``clipn-train`` option; the defaults are the official CLIPN recipe."""

    train_data: str
    model: str = "ViT-B-16"
    pretrained: str | None = "laion2b_s34b_b88k"
    variant: str = "learnable"
    prompts: str = DEFAULT_PROMPTS
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
