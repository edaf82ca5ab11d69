"""Plain CLIP contrastive pretraining from scratch, for worlds small enough to learn on a CPU (the toy world).

This is the stage before CLIPN: the demo has no downloadable CLIP, so it trains one. The model is an ordinary
open_clip ``CLIP`` built from a model-config JSON, the loss is open_clip's own ``ClipLoss``, and the result is
saved the way open_clip reads a local model (``open_clip_config.json`` + ``open_clip_model.safetensors`` in one
folder), so ``open_clip.create_model("local-dir:<folder>")``, ``open_clip.get_tokenizer("local-dir:<folder>")``
and ``open_clip.load_checkpoint`` all load it, as does any tool that takes ``--model <config> --pretrained
<weights>``.

Training data is held in memory as uint8 images plus every caption of every image (tokenised once); each step
draws a batch from a seeded permutation and one caption per image, so a run is a function of its seed (up to
CPU kernel non-determinism, which torch does not promise away).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from PIL import Image
from torch import Tensor

from clipn_demo import world as toyworld
from clipn_runtime.fileio import atomic_write

log = logging.getLogger(__name__)

#: The tiny model the toy-world demo trains: ModifiedResNet vision tower (layers 1,1,1,1, width 32, 32 px),
#: 2-layer width-64 text transformer, context 20. At 32 px a small ViT did not learn shape in CPU minutes.
TOY_MODEL_CONFIG = Path(__file__).parent / "model_configs" / "toy-rn-clip.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
CONFIG_NAME = "open_clip_config.json"
RECORD_NAME = "pretrain.json"

_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


@dataclass
class CaptionedImages:
    """An image-text dataset held in memory: uint8 images (N, 3, H, W), all captions and metadata per image."""

    images: Tensor
    captions: list[tuple[str, ...]]
    metadata: list[dict[str, Any]]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _shard_urls(shards: str | Path | Sequence[str | Path]) -> list[str] | str:
    if isinstance(shards, (str, Path)):
        return str(shards)
    urls = [str(s) for s in shards]
    if not urls:
        raise ValueError("no shards given")
    return urls


def load_captioned_shards(shards: str | Path | Sequence[str | Path]) -> CaptionedImages:
    """Read webdataset shards (a brace pattern, one path or a list) into memory.

    Each sample needs an image (``png``/``jpg``/``jpeg``/``webp``) and captions: the ``captions`` list of its
    ``json`` when present (the toy world writes all alternatives there), else its ``txt``. All images must have
    one size.
    """
    import webdataset as wds

    dataset = wds.WebDataset(_shard_urls(shards), shardshuffle=False, empty_check=False).decode("pil")
    arrays: list[np.ndarray] = []
    captions: list[tuple[str, ...]] = []
    metadata: list[dict[str, Any]] = []
    for sample in dataset:
        key = sample.get("__key__")
        image_key = next((k for k in _IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise ValueError(f"sample {key} in {sample.get('__url__')} has no image ({'/'.join(_IMAGE_KEYS)})")
        meta = sample.get("json") if isinstance(sample.get("json"), dict) else {}
        caps = meta.get("captions") or ([sample["txt"]] if isinstance(sample.get("txt"), str) else [])
        if not caps:
            raise ValueError(f"sample {key} in {sample.get('__url__')} has no caption (txt, or json 'captions')")
        arr = np.asarray(sample[image_key].convert("RGB"), dtype=np.uint8)
        if arrays and arr.shape != arrays[0].shape:
            raise ValueError(
                f"sample {key} is {arr.shape[1]}x{arr.shape[0]}; earlier images are "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]} (all images must have one size)"
            )
        arrays.append(arr)
        captions.append(tuple(str(c) for c in caps))
        metadata.append(meta)
    if not arrays:
        raise ValueError(f"no samples in {shards}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return CaptionedImages(images=images, captions=captions, metadata=metadata)


def images_to_uint8(images: Sequence[Image.Image]) -> Tensor:
    """PIL images of one size → a uint8 tensor (N, 3, H, W)."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])).permute(
        0, 3, 1, 2
    )


def normalize_images(images_uint8: Tensor, model: CLIP) -> Tensor:
    """uint8 images already at the model's input size → the model's input (what open_clip's eval transform
    gives for such images: resize and centre crop are the identity, then ToTensor and Normalize)."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", model.visual.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images_uint8.shape[-2:]) != tuple(size):
        raise ValueError(f"images are {tuple(images_uint8.shape[-2:])}, the model takes {tuple(size)}")
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - mean) / std


def load_model_config(model_config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A model config: a dict, a bare open_clip config JSON, or an ``open_clip_config.json`` (``model_cfg``)."""
    if isinstance(model_config, Mapping):
        raw: Any = dict(model_config)
    else:
        raw = json.loads(Path(model_config).read_text(encoding="utf-8"))
    cfg = dict(raw["model_cfg"]) if isinstance(raw.get("model_cfg"), dict) else dict(raw)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(f"{model_config}: not an open_clip model config (missing {', '.join(missing)})")
    return cfg


def create_clip(model_config: str | Path | Mapping[str, Any]) -> tuple[CLIP, Any, dict[str, Any]]:
    """A randomly initialised open_clip CLIP, its tokenizer and the config dict (seed torch beforehand)."""
    cfg = load_model_config(model_config)
    model = CLIP(**cfg)
    pp = open_clip.transform.PreprocessCfg(size=model.visual.image_size)
    open_clip.model.set_model_preprocess_cfg(model, dict(pp.__dict__))
    return model, tokenizer_for(cfg), cfg


def tokenizer_for(cfg: Mapping[str, Any]) -> Any:
    """open_clip's tokenizer at the config's context length (what ``get_tokenizer`` builds for this config)."""
    context_length = int(cfg["text_cfg"].get("context_length", 77))
    return open_clip.SimpleTokenizer(context_length=context_length)


def save_clip(model: CLIP, cfg: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``open_clip_config.json`` and ``open_clip_model.safetensors`` (open_clip's local-dir layout)."""
    from safetensors.torch import save

    out = Path(out_dir)
    config = {"model_cfg": dict(cfg), "preprocess_cfg": open_clip.get_model_preprocess_cfg(model)}
    config_path = atomic_write(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights_path = atomic_write(out / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
    return weights_path, config_path


def load_clip(folder: str | Path) -> tuple[CLIP, Any]:
    """Load a folder written by :func:`save_clip` through open_clip's own front door (strict), in eval mode."""
    spec = f"local-dir:{Path(folder)}"
    model = open_clip.create_model(spec)
    if not isinstance(model, CLIP):
        raise TypeError(f"{folder}: expected an open_clip CLIP, got {type(model).__name__}")
    model.eval()
    return model, open_clip.get_tokenizer(spec)


@dataclass
class PretrainResult:
    """What :func:`pretrain_clip` did. ``seconds`` is training time only (evaluations excluded)."""

    model: CLIP = field(repr=False)
    tokenizer: Any = field(repr=False)
    model_cfg: dict[str, Any]
    steps: int
    batch_size: int
    seed: int
    seconds: float
    losses: list[float]
    history: list[dict[str, float]]
    weights_path: Path | None = None
    config_path: Path | None = None

    def record(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "seconds": round(self.seconds, 2),
            "final_loss": self.losses[-1] if self.losses else None,
            "losses": [round(x, 4) for x in self.losses],
            "history": self.history,
            "model_cfg": self.model_cfg,
        }


def _param_groups(model: CLIP, weight_decay: float) -> list[dict[str, Any]]:
    # open_clip's training convention: no decay on gains, biases, norms and the temperature.
    def exclude(name: str, p: Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def _optimizer(
    model: CLIP, lr: float, weight_decay: float, steps: int, warmup_steps: int | None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (betas 0.9/0.98, eps 1e-6, open_clip's decay groups); linear warmup, then cosine to zero."""
    # fused: one kernel per step instead of ~10 passes over the parameters (≈4× faster on CPU; most of the
    # parameters are the 49408-row token embedding).
    optimizer = torch.optim.AdamW(
        _param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True
    )
    warmup = max(1, round(0.05 * steps)) if warmup_steps is None else max(1, warmup_steps)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _tokenise_all(captions: list[tuple[str, ...]], tokenizer: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Unique caption tokens (U, L), and per image: caption table (N, Kmax) indices into them, and counts."""
    unique = sorted({c for caps in captions for c in caps})
    index = {c: i for i, c in enumerate(unique)}
    tokens = torch.cat([tokenizer(unique[i : i + 4096]) for i in range(0, len(unique), 4096)])
    kmax = max(len(c) for c in captions)
    table = torch.zeros(len(captions), kmax, dtype=torch.long)
    counts = torch.tensor([len(c) for c in captions], dtype=torch.long)
    for row, caps in enumerate(captions):
        table[row, : len(caps)] = torch.tensor([index[c] for c in caps])
    return tokens, table, counts


class _Batches:
    """Seeded training batches: a fresh permutation each epoch (the remainder dropped), one of each image's
    captions drawn at random, all from one generator, so the sequence is a function of the seed."""

    def __init__(self, data: CaptionedImages, tokenizer: Any, batch_size: int, seed: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.tokens, self.table, self.counts = _tokenise_all(data.captions, tokenizer)
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(data), generator=self.gen)
        self.cursor = 0

    def next(self) -> tuple[Tensor, Tensor]:
        """uint8 images (B, 3, H, W) and the caption tokens (B, L) of the next batch."""
        n = len(self.data)
        if self.cursor + self.batch_size > n:  # a new epoch
            self.order = torch.randperm(n, generator=self.gen)
            self.cursor = 0
        idx = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        pick = (torch.rand(self.batch_size, generator=self.gen) * self.counts[idx]).long()
        return self.data.images[idx], self.tokens[self.table[idx, pick]]


def pretrain_clip(
    data: str | Path | Sequence[str | Path] | CaptionedImages,
    model_config: str | Path | Mapping[str, Any] = TOY_MODEL_CONFIG,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    out_dir: str | Path | None = None,
    threads: int | None = 2,
    progress: bool = True,
    weight_decay: float = 0.1,
    warmup_steps: int | None = None,
    evaluate: Callable[[CLIP, Any], dict[str, float]] | None = None,
    eval_at: Collection[int] = (),
) -> PretrainResult:
    """Train an open_clip CLIP from scratch with open_clip's ``ClipLoss`` on image-text shards.

    * ``data``: webdataset shards (brace pattern, path or list) or data already loaded with
      :func:`load_captioned_shards`; images must be at the model's input size.
    * AdamW (betas 0.9/0.98, eps 1e-6, open_clip's decay groups), linear warmup (default 5 % of the steps) then
      cosine to zero; ``logit_scale`` clamped to ln 100 after each step as open_clip does.
    * ``evaluate(model, tokenizer) -> metrics`` runs (model in eval mode, not timed) after each step count in
      ``eval_at`` (0 = before training); results land in ``history`` with their ``step``.
    * ``out_dir``: where to save the open_clip local-dir layout and ``pretrain.json``; None saves nothing.
    * ``threads``: torch intra-op threads for the run (restored afterwards); None leaves torch's setting.
    """
    from clipn_train.cli import torch_threads

    if steps < 0 or batch_size < 2:
        raise ValueError("need steps ≥ 0 and batch_size ≥ 2 (a contrastive batch needs negatives)")
    with torch_threads(threads):
        dataset = data if isinstance(data, CaptionedImages) else load_captioned_shards(data)
        if len(dataset) < batch_size:
            raise ValueError(f"{len(dataset)} images cannot fill a batch of {batch_size}")
        torch.manual_seed(seed)
        model, tokenizer, cfg = create_clip(model_config)
        normalize_images(dataset.images[:1], model)  # fail early on a size mismatch
        batches = _Batches(dataset, tokenizer, batch_size, seed)
        run = PretrainResult(model, tokenizer, cfg, steps, batch_size, seed, 0.0, [], [])
        optimizer, scheduler = _optimizer(model, lr, weight_decay, steps, warmup_steps)
        _Loop(run, batches, optimizer, scheduler, evaluate).train(eval_at, progress)
        if out_dir is not None:
            run.weights_path, run.config_path = save_clip(model, cfg, out_dir)
            record = {
                **run.record(),
                "lr": lr,
                "weight_decay": weight_decay,
                "threads": torch.get_num_threads(),
                "images": len(dataset),
                "torch": torch.__version__,
                "open_clip": open_clip.__version__,
            }
            atomic_write(Path(out_dir) / RECORD_NAME, json.dumps(record, indent=1) + "\n")
        return run


@dataclass
class _Loop:
    """The training loop of :func:`pretrain_clip`; fills ``run``'s losses, history and seconds."""

    run: PretrainResult
    batches: _Batches
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    evaluate: Callable[[CLIP, Any], dict[str, float]] | None
    loss_fn: Any = field(default_factory=open_clip.ClipLoss)

    def train(self, eval_at: Collection[int], progress: bool) -> None:
        from tqdm.auto import tqdm

        model = self.run.model
        if 0 in eval_at:
            self.eval_step(0)
        model.train()
        with tqdm(total=self.run.steps, desc="CLIP pretraining", unit="step", disable=not progress) as bar:
            for step in range(1, self.run.steps + 1):
                t0 = time.perf_counter()
                loss = self.step()
                self.run.seconds += time.perf_counter() - t0
                self.run.losses.append(loss)
                if not math.isfinite(loss):
                    lr = self.optimizer.defaults["lr"]
                    raise FloatingPointError(f"loss became {loss} at step {step}; lower lr ({lr})")
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if step in eval_at:
                    self.eval_step(step)
                    model.train()
        model.eval()

    def step(self) -> float:
        """One optimiser step on the next batch; its loss."""
        model = self.run.model
        images, texts = self.batches.next()
        image_features, text_features, scale = model(normalize_images(images, model), texts)
        loss = self.loss_fn(image_features, text_features, scale)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return float(loss.detach())

    def eval_step(self, step: int) -> None:
        if self.evaluate is None:
            return
        self.run.model.eval()
        with torch.no_grad():
            metrics = self.evaluate(self.run.model, self.run.tokenizer)
        self.run.history.append({"step": float(step), **metrics})
        log.info("step %d: %s", step, metrics)


def zero_shot_classifier(
    model: CLIP, tokenizer: Any, class_names: Sequence[str], templates: Sequence[str]
) -> Tensor:
    """Prompt-ensembled class embeddings (D, C) — open_clip's own builder (per-template normalise, mean,
    normalise)."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    return build_zero_shot_classifier(model, tokenizer, class_names, templates, num_classes_per_batch=None)


@torch.no_grad()
def predict(
    model: CLIP,
    tokenizer: Any,
    images: Tensor,
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 512,
) -> Tensor:
    """Zero-shot class indices for model-ready images (N, 3, H, W) (see :func:`normalize_images`)."""
    was_training = model.training
    model.eval()
    weights = zero_shot_classifier(model, tokenizer, class_names, templates)
    preds = []
    for i in range(0, images.shape[0], batch_size):
        feats = F.normalize(model.encode_image(images[i : i + batch_size]), dim=-1)
        preds.append((feats @ weights).argmax(dim=-1))
    model.train(was_training)
    return torch.cat(preds)


def zero_shot_accuracy(
    model: CLIP,
    tokenizer: Any,
    images: Tensor,
    labels: Sequence[int] | Tensor,
    class_names: Sequence[str],
    templates: Sequence[str],
) -> float:
    """Top-1 zero-shot accuracy of model-ready images against class names × templates."""
    target = torch.as_tensor(labels, dtype=torch.long)
    return float((predict(model, tokenizer, images, class_names, templates) == target).float().mean())


@dataclass
class ToyEvalSet:
    """Held-out toy-world images, model-size uint8, with their labels."""

    images: Tensor
    labels: list[toyworld.ToyLabels]

    @classmethod
    def generate(cls, seed: int, n_per_class: int, world: toyworld.ToyWorld | None = None) -> ToyEvalSet:
        samples = toyworld.generate_split(seed, n_per_class, world=world)
        return cls(images_to_uint8([s.image for s in samples]), [s.labels for s in samples])


def toy_zero_shot(
    model: CLIP, tokenizer: Any, evalset: ToyEvalSet, world: toyworld.ToyWorld | None = None
) -> dict[str, float]:
    """Zero-shot accuracies on the toy world.

    ``concept``: N-way over every "<colour> <shape>" class (64-way in the default world); ``concept_shape`` /
    ``concept_colour``: whether that prediction got the shape / the colour right; ``shape`` / ``colour``:
    8-way with shape-only / colour-only prompts.
    """
    world = world or toyworld.ToyWorld()
    images = normalize_images(evalset.images, model)
    concepts = world.concepts()
    by_name = {c.name: i for i, c in enumerate(concepts)}
    target = torch.tensor([by_name[lab.class_name] for lab in evalset.labels])
    pred = predict(model, tokenizer, images, [c.name for c in concepts], toyworld.CONCEPT_TEMPLATES)
    shapes = torch.tensor([world.shapes.index(c.shape) for c in concepts])
    colours = torch.tensor([world.colours.index(c.colour) for c in concepts])
    shape_target = torch.tensor([world.shapes.index(lab.shape) for lab in evalset.labels])
    colour_target = torch.tensor([world.colours.index(lab.colour) for lab in evalset.labels])
    return {
        "concept": float((pred == target).float().mean()),
        "concept_shape": float((shapes[pred] == shape_target).float().mean()),
        "concept_colour": float((colours[pred] == colour_target).float().mean()),
        "shape": zero_shot_accuracy(
            model, tokenizer, images, shape_target, world.shapes, toyworld.SHAPE_TEMPLATES
        ),
        "colour": zero_shot_accuracy(
            model, tokenizer, images, colour_target, world.colours, toyworld.COLOUR_TEMPLATES
        ),
    }
