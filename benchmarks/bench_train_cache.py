"""Training throughput from raw images vs from the frozen-feature cache (same model, batch and steps).

The trainer runs for real in both cases (``clipn_train.trainer.Trainer``): uncached steps decode and augment the
images and run the frozen image and yes towers; cached steps read memory-mapped features and run only the no
tower. Samples/s is measured over the steps after ``--warmup-steps``. The base CLIP is random-init (no download
here), saved to a local file first so the cache and the trainer provably use the same weights; the speed does not
depend on the values of the weights.

    python benchmarks/bench_train_cache.py                      # ViT-B-16, batch 16, 3 timed steps (minutes on CPU)
    python benchmarks/bench_train_cache.py --smoke              # tiny model, seconds (CI)
    python benchmarks/bench_train_cache.py --model ViT-B-32 --batch-size 64 --steps 10 --device cuda --precision amp
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result

TINY_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "tiny-clip.json"
WORDS = [
    "a",
    "the",
    "dog",
    "cat",
    "man",
    "woman",
    "car",
    "street",
    "tree",
    "house",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "old",
    "young",
    "photo",
    "of",
    "on",
    "in",
    "with",
]


def make_data(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` noise JPEGs (``size``² px, like resized CC3M images) with 8–16-word captions, as a TSV."""
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["filepath\ttitle"]
    for i in range(n):
        pixels = bytes(rng.randrange(256) for _ in range(size * size * 3 // 64))
        img = Image.frombytes("RGB", (size // 8, size // 8), pixels).resize((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        (folder / f"{i}.jpg").write_bytes(buf.getvalue())
        lines.append(f"{i}.jpg\t{' '.join(rng.choice(WORDS) for _ in range(rng.randint(8, 16)))}")
    path = folder / "data.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def timed_run(cfg: Any, warmup: int) -> dict[str, float]:
    """Run the trainer and time the steps after ``warmup`` (stamped by the trainer's per-step hook)."""
    from clipn_train.trainer import Trainer

    stamps: list[float] = []

    def stamp(step: int) -> bool:
        stamps.append(time.perf_counter())
        return False  # never stop: the hook only times the steps

    started = time.perf_counter()
    result = Trainer(cfg, should_stop=stamp).run()
    timed = stamps[warmup - 1 :] if warmup > 0 else [started, *stamps]
    steps = len(timed) - 1
    seconds = timed[-1] - timed[0]
    return {
        "steps_timed": steps,
        "seconds": seconds,
        "samples_per_s": steps * cfg.batch_size / seconds,
        "s_per_step": seconds / steps,
        "loss": result.history[-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16", help="open_clip model name or config JSON (random init)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=256, help="side of the stored JPEGs (CC3M-like)")
    ap.add_argument("--workers", type=int, default=0, help="data workers for the uncached run")
    ap.add_argument("--precision", default="fp32", choices=["amp", "amp_bf16", "fp32"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, tiny batch: checks the script in seconds")
    ap.add_argument("--name", default=None, help="result file name under benchmarks/results/")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.batch_size, args.steps, args.image_size = str(TINY_CONFIG), 4, 2, 48

    import torch
    from safetensors.torch import save_file

    from clipn_train.cache import build_feature_cache
    from clipn_train.distributed import DistInfo, pick_device
    from clipn_train.factory import create_clipn
    from clipn_train.trainer import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    steps_total = args.steps + args.warmup_steps
    n = args.batch_size * steps_total
    with tempfile.TemporaryDirectory(prefix="bench_train_cache_") as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        weights = root / "base.safetensors"
        base = create_clipn(args.model).model.clip
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
        del base
        data = make_data(root / "data", n, args.image_size)
        common = {
            "model": args.model,
            "pretrained": str(weights),
            "batch_size": args.batch_size,
            "epochs": 1,
            "train_num_samples": n,
            "precision": args.precision,
            "device": args.device,
            "logs": str(root / "logs"),
            "tensorboard": False,
            "val_batch_size": 2,
            "log_every_n_steps": 10**9,
        }
        uncached = timed_run(
            TrainConfig(train_data=str(data), workers=args.workers, name="uncached", **common), args.warmup_steps
        )
        t0 = time.perf_counter()
        summary = build_feature_cache(
            data=str(data),
            output=root / "cache",
            model=args.model,
            pretrained=str(weights),
            variant="learnable",
            prompts="clean",
            batch_size=args.batch_size,
            workers=args.workers,
            precision=args.precision,
            dtype="float16",
            dist_info=DistInfo(device=pick_device(args.device)),  # on the device the training runs on
        )
        cache_seconds = time.perf_counter() - t0
        cached = timed_run(
            TrainConfig(train_data=str(root / "cache"), workers=0, name="cached", **common), args.warmup_steps
        )
    speedup = cached["samples_per_s"] / uncached["samples_per_s"]
    cache_rate = summary.samples / cache_seconds
    saved_per_sample = 1 / uncached["samples_per_s"] - 1 / cached["samples_per_s"]
    break_even = (1 / cache_rate) / saved_per_sample if saved_per_sample > 0 else float("inf")
    payload = {
        "model": args.model,
        "batch_size": args.batch_size,
        "steps_timed": args.steps,
        "warmup_steps": args.warmup_steps,
        "precision": args.precision,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "workers_uncached": args.workers,
        "image_size": args.image_size,
        "uncached": uncached,
        "cached": cached,
        "speedup": speedup,
        "cache_build": {"samples": summary.samples, "seconds": cache_seconds, "samples_per_s": cache_rate},
        "break_even_epochs": break_even,
    }
    model_label = Path(args.model).stem if args.model.endswith(".json") else args.model
    md = (
        f"## Training from the feature cache vs from images ({model_label}, random init, batch {args.batch_size}, "
        f"{args.precision}, {args.steps} timed steps after {args.warmup_steps} warm-up)\n\n"
        "| | samples/s | s/step |\n|---|---:|---:|\n"
        f"| uncached (decode + augment + image & yes towers + no tower) | {uncached['samples_per_s']:.2f} | "
        f"{uncached['s_per_step']:.2f} |\n"
        f"| cached (memory-mapped features + no tower) | {cached['samples_per_s']:.2f} | {cached['s_per_step']:.3f} |\n\n"
        f"Speed-up **{speedup:.1f}×**. Building the cache ran at {cache_rate:.2f} samples/s "
        f"({summary.samples} samples in {cache_seconds:.1f} s, float16 storage): caching pays for itself after "
        f"{break_even:.2f} epochs (build time per sample ÷ time saved per sample per epoch).\n"
        f"torch threads: {torch.get_num_threads()}, data workers (uncached): {args.workers}.\n"
    )
    name = args.name or ("train_cache_smoke" if args.smoke else f"train_cache_{model_label}")
    json_path, md_path = write_result(name, payload, md)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
