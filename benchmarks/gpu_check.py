"""GPU check: do the PyTorch GPU paths of clipn-ood compute what the CPU paths compute, and how fast?

Written for a machine lent with an NVIDIA GPU that has PyTorch with CUDA but nothing more can be installed on
(no onnxruntime-gpu, no TensorRT, no internet). It needs this repository and the packages of the ``train``
extra only — torch, torchvision, open_clip_torch, safetensors, webdataset (plus numpy, pillow and tqdm, which
they bring) — and imports neither onnx, onnxruntime nor TensorRT. Models are random-init open_clip configs (no
download): the demo's ResNet (``toy-rn-clip.json``) and ViT-B-16, each saved to a local weights file first so
every path provably uses the same weights. Checks, each one row of the table:

1. train: a few steps of the real ``clipn_train.trainer.Trainer`` with ``--precision amp`` on the device (fp16
   autocast + GradScaler on CUDA) against the same steps in fp32 on the CPU: every loss finite, |Δ loss| small.
2. banks: the class text bank (``clipn_export.textbank``) and the feature cache (``clipn_train.cache``: fp32,
   and the ``cache-features`` default amp + float16 storage) built on the device against the CPU ones.
3. fp16: the image tower under the device's amp autocast against fp32 on the same device: max |Δ| and cosine of
   the normalised features, then the CLIPN scores (``clipn_runtime.scoring``): max |Δ ATD|, the ATD rank
   correlation and the ATD decisions.
4. latency: image tower + scoring head (``clipn_export.head.ScoringHead``) on the device at batch 1/8/64, fp32 and
   amp: median and p90 ms, images/s (warm-up first; every call ends with ``torch.cuda.synchronize``).

Tolerances (docs/benchmarks.md, GPU check) are written in the unit roundoff ``u`` of the reduced precision
(fp16: 2⁻¹¹; bf16, what ``amp`` means on a CPU: 2⁻⁸) and the logit scale ``s``. One table goes to stdout
(check | value | tolerance | result) under a header naming the GPU, the versions, the CPU and the command.
Exit status: 0 every check passed, 1 a check failed, 2 usage error (no CUDA device, a missing package, ...).

    python benchmarks/gpu_check.py                          # on the GPU machine (≈ 1-3 min expected)
    python benchmarks/gpu_check.py --json gpu_check.json    # also save the rows and the header
    python benchmarks/gpu_check.py --device cpu --quick     # the same logic on a CPU (checks the plumbing)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: Import name → the package that provides it; all come with ``pip install -e '.[train]'``.
REQUIRED = {
    "torch": "torch",
    "torchvision": "torchvision",
    "open_clip": "open_clip_torch",
    "safetensors": "safetensors",
    "webdataset": "webdataset",
    "numpy": "numpy",
    "PIL": "pillow",
    "tqdm": "tqdm",
}


def missing_packages() -> str | None:
    """What to install, in one line, or None when every package this script imports is there."""
    missing = [pkg for mod, pkg in REQUIRED.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return None
    return (
        f"missing {', '.join(missing)}: this script needs torch and the `train` extra's packages "
        "(pip install -e '.[train]' where a package index can be reached)"
    )


if __name__ == "__main__" and (_problem := missing_packages()):  # before numpy: one line, not a traceback
    print(f"gpu_check.py: {_problem}", file=sys.stderr)
    sys.exit(EXIT_USAGE)

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command, machine_info, versions  # noqa: E402
from harness import VIT_B16, Budget, Stats, interleaved, make_model, md_table, model_label  # noqa: E402

CHECKS = ("train", "banks", "fp16", "latency")
TOY_RN = str(ROOT / "clipn_demo" / "model_configs" / "toy-rn-clip.json")
TINY_VIT = str(ROOT / "tests" / "data" / "tiny-clip.json")
#: σ of the seeded noise on the no tower's learnable prompts (an untrained no tower equals the yes tower).
PROMPT_NOISE = 0.1

# ---- tolerances (docs/benchmarks.md, GPU check) ---------------------------------------------------------------
# u is the unit roundoff of the precision `--precision amp` runs in on the device (fp16 on CUDA: 2⁻¹¹; bf16 on
# a CPU: 2⁻⁸) and s the model's logit scale (14.3 for every random-init open_clip model).

#: fp32 on two devices (other kernels, other summation orders): the exporter's fp32 parity atol
#: (clipn_export.parity.ParityOptions.atol) — what "the same fp32 result" means everywhere in clipn-ood.
FP32_ATOL = 1e-4
#: amp: ‖f_amp − f_fp32‖₂ of L2-normalised features ≤ FEATURE_U·u. Each half-precision layer output is rounded
#: by ≤ u relative; measured with bf16 on a CPU: tiny ViT 2.3 u, toy ResNet 1.0 u, ViT-B-16 2.6 u.
FEATURE_U = 16.0
#: amp: |ATD_amp − ATD_fp32| ≤ ATD_U·u·s. ATD moves by at most the largest yes/no logit change, and a logit
#: s·⟨f, w⟩ moves by s·⟨Δf, w⟩, far less than s·‖Δf‖₂ (Δf points away from most bank rows); measured with bf16:
#: tiny ViT 0.041 u·s, toy ResNet 0.061 u·s, ViT-B-16 0.015 u·s.
ATD_U = 0.5
#: The ATD decision margin p_ood − max_c (1 − p_no_c)·p_c is 3.5-Lipschitz where ATD is 1-Lipschitz (in the
#: yes/no logits), so a decision may flip only where the fp32 margin is within 3.5 × the ATD tolerance.
MARGIN_LIPSCHITZ = 3.5
#: amp training: |L_amp − L_fp32| ≤ LOSS_U·u·s at every step. The loss reads features through the logits s·⟨f, g⟩
#: and the steps after the first inherit slightly different updates; measured with bf16 at lr 3e-5: tiny ViT
#: 0.035 u·s, toy ResNet 0.044 u·s (ViT-B-16, at the official lr 3e-4: 0.15 u·s).
LOSS_U = 0.5
#: float16 storage rounds a value of magnitude below 1 by at most half an ulp at 2⁻¹¹: 2⁻¹².
FLOAT16_STORAGE = 2.0**-12
#: TF32 keeps 10 mantissa bits, like fp16: its unit roundoff (cuDNN may run fp32 convolutions in TF32).
TF32_U = 2.0**-11


@dataclass(frozen=True)
class Plan:
    """What a run covers: the models of checks 1-3, the latency model, and the sizes."""

    models: tuple[str, ...]
    latency_model: str
    batches: tuple[int, ...] = (1, 8, 64)
    train_batch: int = 8
    train_steps: int = 4
    #: A tenth of the official 3e-4: Adam's first steps move every weight by about ±lr whatever the gradient's
    #: size, so at 3e-4 a gradient whose sign differs in the last bits sends the two runs apart (toy-rn-clip,
    #: bf16: |Δ loss| 0.6 u·s by step 3, against ≤ 0.04 u·s at 3e-5); the loss still moves by ~0.03 in 4 steps.
    train_lr: float = 3e-5
    samples: int = 32  # synthetic caption pairs (the cache encodes all of them)
    classes: int = 16
    templates: int = 4
    images: int = 256  # fp16 check: both precisions run on the device
    budget: Budget = field(default_factory=lambda: Budget(warmup=5, min_reps=20, max_reps=100, target_s=6.0))


PLANS = {
    "full": Plan(models=(TOY_RN, VIT_B16), latency_model=VIT_B16),
    "quick": Plan(
        models=(TINY_VIT,),
        latency_model=TINY_VIT,
        train_batch=4,
        train_steps=3,
        samples=12,
        classes=6,
        templates=2,
        images=32,
        budget=Budget(warmup=1, min_reps=3, max_reps=3, target_s=0.0),
    ),
}


@dataclass
class Row:
    """One line of the table; ``measured``/``limit_value`` are the raw numbers for the JSON."""

    check: str
    value: str
    limit: str
    status: str  # pass | fail
    measured: float | None = None
    limit_value: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


def judged(
    check: str, measured: float, limit: float, *, below: bool = True, fmt: str = ".2e", **details: Any
) -> Row:
    """A row that passes when ``measured`` ≤ ``limit`` (``below``) or ≥ it; NaN always fails."""
    ok = measured <= limit if below else measured >= limit
    sign = "≤" if below else "≥"
    return Row(
        check, f"{measured:{fmt}}", f"{sign} {limit:{fmt}}", "pass" if ok else "fail", measured, limit, details
    )


class UsageError(Exception):
    """A mistake of the caller: one line, exit 2."""


# ---- command line --------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block (the house rule for user mistakes)
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = _Parser(prog="gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    ap.add_argument("--quick", action="store_true", help="the tiny test model only, few repetitions (seconds)")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument(
        "--tol-scale",
        type=float,
        default=1.0,
        help="multiply every |Δ| tolerance (0.5 shows the margins; 0 fails any non-zero difference)",
    )
    args = ap.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(only) - set(CHECKS))
    if unknown or not only:
        ap.error(f"--only {args.only}: choose from {','.join(CHECKS)}")
    args.only = tuple(c for c in CHECKS if c in only)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        ap.error(f"--device {args.device}: choose cuda, cuda:N or cpu")
    if args.tol_scale < 0 or not math.isfinite(args.tol_scale):
        ap.error(f"--tol-scale {args.tol_scale}: must be a finite number ≥ 0")
    if args.threads < 0:
        ap.error(f"--threads {args.threads}: must be ≥ 0")
    return args


def resolve_device(spec: str) -> Any:
    """``torch.device`` for a valid ``--device`` value; a :class:`UsageError` when that GPU is not there."""
    import torch

    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                "no CUDA device: this script checks the GPU paths; run it where torch.cuda.is_available() "
                "(or pass --device cpu --quick to check the script itself)"
            )
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s), from 0")
        device = torch.device("cuda", index)
    return device


def check_output(path: Path | None) -> None:
    """``--json FILE`` must be writable before any work starts."""
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"--json {path}: is a folder; name a file")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"--json {path}: {parent} is not a writable folder")


# ---- the machine -----------------------------------------------------------------------------------------------


def header(device: Any, args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    import torch

    m = machine_info()
    v = versions()
    gpu = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        gpu = f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB)"
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command(),
        "device": str(device),
        "gpu": gpu,
        "nvidia_smi": m["gpu"],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),  # type: ignore[no-untyped-call]  # None without cuDNN
        "tf32": {
            "matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_conv": bool(torch.backends.cudnn.allow_tf32),
        },
        "open_clip": v["open_clip_torch"],
        "numpy": v["numpy"],
        "python": m["python"],
        "cpu": m["cpu"],
        "cores": m["cores"],
        "torch_threads": torch.get_num_threads(),
        "load_avg": m["load_avg"],
        "mode": "quick" if args.quick else "full",
        "checks": list(args.only),
        "models": [model_label(x) for x in plan.models],
        "latency_model": model_label(plan.latency_model),
        "tol_scale": args.tol_scale,
        "needs": "torch + open_clip_torch, torchvision, safetensors, webdataset (the `train` extra); "
        "no onnx, onnxruntime or TensorRT",
    }


def header_text(h: dict[str, Any]) -> str:
    gpu = h["gpu"] or "none (CPU run: the comparisons compare the CPU with itself)"
    tf32 = f"TF32 matmul {'on' if h['tf32']['matmul'] else 'off'}, cuDNN conv {'on' if h['tf32']['cudnn_conv'] else 'off'}"
    load = h["load_avg"]
    load_txt = "n/a" if load is None else ", ".join(f"{x:.2f}" for x in load)
    return "\n".join(
        [
            "# clipn-ood GPU check",
            f"command: {h['command']}",
            f"date: {h['date']}",
            f"GPU: {gpu}" + (f"; nvidia-smi: {h['nvidia_smi']}" if h["nvidia_smi"] else ""),
            f"torch {h['torch']} (CUDA {h['cuda']}, cuDNN {h['cudnn']}; {tf32}); open_clip {h['open_clip']}; "
            f"numpy {h['numpy']}; Python {h['python']}",
            f"CPU: {h['cpu']}, {h['cores']} cores, torch threads {h['torch_threads']}; load average {load_txt}",
            f"device {h['device']}; mode {h['mode']}; checks {', '.join(h['checks'])}; models "
            f"{', '.join(h['models'])}; latency model {h['latency_model']}; tolerance scale {h['tol_scale']:g}",
            f"needs: {h['needs']}",
        ]
    )


# ---- shared inputs ---------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """One check model: the seeded random-init CLIPN, its base weights as a file, its class bank on the CPU."""

    name: str
    loaded: Any  # clipn_train.factory.LoadedCLIPN, on the CPU
    weights: Path
    bank: Any  # clipn_export.textbank.TextBank, built on the CPU

    @property
    def label(self) -> str:
        return model_label(self.name)

    @property
    def scale(self) -> float:
        return float(self.loaded.model.scale)


def make_subject(name: str, folder: Path, plan: Plan) -> Subject:
    """The seeded random-init model of harness.make_model with its no tower's prompts noised (so the yes and no
    banks differ), its base CLIP saved as safetensors (what the trainer and the cache load), the CPU text bank."""
    import torch
    from safetensors.torch import save_file

    from clipn_export.textbank import build_text_bank

    loaded = make_model(name)
    prompt = loaded.model.prompt_no
    assert prompt is not None, "create_clipn's default variant learns prompts"
    with torch.no_grad():
        # More noise than harness's 0.02: the no bank moves further from the yes bank, so the ATD scores of the
        # test images spread wider (toy-rn-clip: over 0.027 instead of 0.0076) and their rank order under a
        # reduced precision measures the precision, not float noise between near-equal scores.
        prompt.copy_(torch.randn(prompt.shape, generator=torch.Generator().manual_seed(1)) * PROMPT_NOISE)
    weights = folder / f"{model_label(name)}.base.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.model.clip.state_dict().items()}, str(weights))
    bank = build_text_bank(loaded, class_names(plan), prompt_set(plan), cache_dir=None, progress=False)
    return Subject(name, loaded, weights, bank)


def class_names(plan: Plan) -> list[str]:
    from clipn_runtime.classes import load_classes

    return list(load_classes("imagenet")[: plan.classes])


def prompt_set(plan: Plan) -> Any:
    from clipn_runtime.prompts import PromptSet, load_prompts

    return PromptSet("gpu-check", load_prompts("clipn").yes[: plan.templates])


KINDS = ("gradient", "striped", "checkered", "round", "speckled")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")


def caption_data(folder: Path, n: int) -> Path:
    """``n`` generated images (clipn_export.parity's five kinds) with captions of varied length, as a TSV."""
    from PIL import Image

    from clipn_export.parity import parity_images

    folder.mkdir(parents=True, exist_ok=True)
    lines = ["filepath\ttitle"]
    for i, img in enumerate(parity_images(n, 64, seed=1)):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
        extra = " on a plain background seen from far away"[: 8 * (i % 6)]
        lines.append(
            f"{i:04d}.png\ta {COLOURS[i % len(COLOURS)]} {KINDS[i % len(KINDS)]} picture number {i}{extra}"
        )
    path = folder / "pairs.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def amp_dtype(device: Any) -> Any:
    """The dtype ``--precision amp`` autocasts to on ``device`` (clipn_train.precision's one definition)."""
    from clipn_train.precision import autocast_for

    factory, _ = autocast_for("amp", device)
    return factory().fast_dtype  # type: ignore[attr-defined]


def unit_roundoff(dtype: Any) -> float:
    import torch

    return float(torch.finfo(dtype).eps) / 2


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- 1. training -------------------------------------------------------------------------------------------------


def train_run(subject: Subject, data: Path, logs: Path, device: Any, precision: str, plan: Plan) -> dict[str, Any]:
    """``plan.train_steps`` steps of the real Trainer, one batch per epoch so that the per-epoch history holds
    every step's loss; the optimizer steps actually taken come from the saved resume state (a GradScaler skips
    the update of a step whose gradients overflowed)."""
    import torch

    from clipn_train.distributed import DistInfo
    from clipn_train.resume import load_resume_state
    from clipn_train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(
        train_data=str(data),
        model=subject.name,
        pretrained=str(subject.weights),
        batch_size=plan.train_batch,
        epochs=plan.train_steps,
        lr=plan.train_lr,
        train_num_samples=plan.train_batch,
        workers=0,
        augment=False,  # the comparison is about the device, not about augmentation draws
        precision=precision,
        device=str(device),
        logs=str(logs),
        name=f"{subject.label}-{device.type}-{precision}",
        save_frequency=plan.train_steps,  # one checkpoint, at the end
        log_every_n_steps=10**9,
        tensorboard=False,
        val_batch_size=2,
    )
    t0 = time.perf_counter()
    result = Trainer(cfg, DistInfo(device=device)).run()
    seconds = time.perf_counter() - t0
    assert result.last_checkpoint is not None
    state = load_resume_state(result.last_checkpoint.with_suffix("").with_suffix(".state.pt"))
    steps = [int(torch.as_tensor(s["step"]).item()) for s in state["optimizer"]["state"].values()]
    return {
        "losses": [float(h["loss"]) for h in result.history],
        "p_no_matched": [float(h.get("p_no_matched", math.nan)) for h in result.history],
        "optimizer_steps": min(steps) if steps else 0,
        "seconds": seconds,
    }


def check_training(subject: Subject, data: Path, work: Path, device: Any, plan: Plan, scale: float) -> list[Row]:
    import torch

    ref = train_run(subject, data, work / "logs", torch.device("cpu"), "fp32", plan)
    amp = train_run(subject, data, work / "logs", device, "amp", plan)
    dtype = amp_dtype(device)
    u, s = unit_roundoff(dtype), subject.scale
    n = plan.train_steps
    skipped = n - amp["optimizer_steps"]
    # A skipped update leaves the AMP run `skipped` updates behind; its loss may then differ by what that many
    # updates moved the fp32 run (one batch per step, so the loss is that of another batch too: see the docs).
    lag = max((abs(ref["losses"][i] - ref["losses"][max(0, i - skipped)]) for i in range(n)), default=0.0)
    tol = LOSS_U * u * s * scale + lag
    diffs = [abs(a - b) for a, b in zip(amp["losses"], ref["losses"], strict=True)]
    finite = all(math.isfinite(x) for x in amp["losses"] + amp["p_no_matched"])
    tag = f"{subject.label}: train {n} steps, amp ({dtype_name(dtype)}) on {device.type}"
    moved = abs(ref["losses"][-1] - ref["losses"][0])
    details = {"amp": amp, "fp32_cpu": ref, "u": u, "scale": s, "skipped_updates": skipped, "lag_allowance": lag}
    rows = [
        Row(
            f"{tag}: losses and held-out p_no finite",
            f"{'all finite' if finite else 'NOT finite'}; loss {amp['losses'][0]:.4f} → {amp['losses'][-1]:.4f}; "
            f"{amp['optimizer_steps']}/{n} updates taken",
            "finite",
            "pass" if finite else "fail",
        ),
        judged(
            f"{tag} vs fp32 on cpu: max |Δ loss| (fp32 moved {moved:.2e})",
            max(diffs) if finite else math.nan,
            tol,
            **details,
        ),
    ]
    rows[1].limit += f" ({LOSS_U:g}·u·s" + (f" + {skipped}-update lag {lag:.1e})" if skipped else ")")
    rows[1].details["per_step_abs_diff"] = diffs
    return rows


# ---- 2. text bank and feature cache --------------------------------------------------------------------------------


def check_bank(subject: Subject, device: Any, plan: Plan, scale: float) -> list[Row]:
    from clipn_export.textbank import build_text_bank

    loaded = copy.copy(subject.loaded)
    loaded.model = copy.deepcopy(subject.loaded.model).to(device).eval()
    bank = build_text_bank(loaded, class_names(plan), prompt_set(plan), cache_dir=None, progress=False)
    diff = max(float(np.abs(bank.yes - subject.bank.yes).max()), float(np.abs(bank.no - subject.bank.no).max()))
    return [
        judged(
            f"{subject.label}: text bank on {device.type} vs cpu ({plan.classes} classes × {plan.templates} templates, "
            "yes+no): max |Δ|",
            diff,
            FP32_ATOL * scale,
        )
    ]


def build_cache(subject: Subject, data: Path, out: Path, device: Any, precision: str, dtype: str) -> Any:
    from clipn_train.cache import FeatureCache, build_feature_cache
    from clipn_train.distributed import DistInfo

    build_feature_cache(
        data=str(data),
        output=out,
        model=subject.name,
        pretrained=str(subject.weights),
        variant="learnable",
        prompts="clipn",
        batch_size=16,
        workers=0,
        precision=precision,
        dtype=dtype,
        dist_info=DistInfo(device=device),
    )
    return FeatureCache(out)


def cache_diff(a: Any, b: Any) -> tuple[float, float, bool]:
    """(max |Δ| image features, max |Δ| text features, tokens and ids identical) of two caches of one dataset."""
    idx = np.arange(len(a), dtype=np.int64)
    ia, ta, ka, da = a.gather(idx)
    ib, tb, kb, db = b.gather(idx)
    same = len(a) == len(b) and bool((ka == kb).all() and (da == db).all())
    return float((ia - ib).abs().max()), float((ta - tb).abs().max()), same


def check_cache(subject: Subject, data: Path, work: Path, device: Any, scale: float) -> list[Row]:
    import torch

    root = work / "caches" / subject.label
    ref = build_cache(subject, data, root / "reference-cpu-fp32", torch.device("cpu"), "fp32", "float32")
    rows = []
    # fp32 on the device: cuDNN may run the convolutions (patch embedding, ResNet) in TF32, as clipn-train does.
    tf32 = device.type == "cuda" and bool(torch.backends.cudnn.allow_tf32)
    image_tol = max(FP32_ATOL, FEATURE_U * TF32_U) if tf32 else FP32_ATOL
    u = unit_roundoff(amp_dtype(device))
    for precision, dtype, tol_image, tol_text in (
        ("fp32", "float32", image_tol, FP32_ATOL),
        ("amp", "float16", FEATURE_U * u + FLOAT16_STORAGE, FEATURE_U * u + FLOAT16_STORAGE),
    ):
        got = build_cache(subject, data, root / f"{device.type}-{precision}", device, precision, dtype)
        d_image, d_text, same = cache_diff(got, ref)
        ok = same and d_image <= tol_image * scale and d_text <= tol_text * scale
        why = (
            f"{FEATURE_U:g}·u + 2⁻¹²"
            if precision == "amp"
            else (f"TF32 convs: {FEATURE_U:g}·2⁻¹¹" if tf32 else "fp32")
        )
        rows.append(
            Row(
                f"{subject.label}: feature cache {precision}/{dtype} on {device.type} vs fp32 cpu "
                f"({len(ref)} pairs): max |Δ| image / text, tokens identical",
                f"{d_image:.2e} / {d_text:.2e}, tokens {'identical' if same else 'DIFFER'}",
                f"≤ {tol_image * scale:.2e} / {tol_text * scale:.2e} ({why})",
                "pass" if ok else "fail",
                max(d_image, d_text),
                None,
                {"image": d_image, "text": d_text, "tokens_identical": same, "tol_image": tol_image * scale},
            )
        )
    return rows


# ---- 3. the image tower in half precision ------------------------------------------------------------------------


def pixels(n: int, loaded: Any) -> npt.NDArray[np.float32]:
    """``n`` generated images at the model's size, normalised as the exporter does (NCHW float32)."""
    from clipn_export.head import normalize_uint8
    from clipn_export.parity import parity_images

    return normalize_uint8(
        parity_images(n, int(loaded.info.image_size), seed=0), loaded.info.mean, loaded.info.std
    )


def tower_features(model: Any, x: npt.NDArray[np.float32], device: Any, half: bool) -> npt.NDArray[np.float32]:
    """Unnormalised image features; fp32 with TF32 convolutions off (a true fp32 reference, as the exporter's
    parity gate takes it), or under the device's amp autocast."""
    import torch

    from clipn_train.precision import autocast_for

    ctx = autocast_for("amp", device)[0]() if half else torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
    with torch.inference_mode(), ctx:
        out = model.encode_image(torch.from_numpy(x).to(device), normalize=False)
    return np.asarray(out.float().cpu().numpy(), dtype=np.float32)


def check_half(subject: Subject, device: Any, plan: Plan, scale: float) -> list[Row]:
    from clipn_export.parity import ParityOptions, rank_corr
    from clipn_runtime.scoring import l2_normalize, score_features

    model = copy.deepcopy(subject.loaded.model).to(device).eval()
    x = pixels(plan.images, subject.loaded)
    f32 = tower_features(model, x, device, half=False)
    f16 = tower_features(model, x, device, half=True)
    dtype = amp_dtype(device)
    u, s = unit_roundoff(dtype), subject.scale
    eps = FEATURE_U * u * scale  # ‖Δf‖₂ of unit features
    atd_tol = ATD_U * u * s * scale
    n32, n16 = l2_normalize(f32).astype(np.float64), l2_normalize(f16).astype(np.float64)
    delta = np.linalg.norm(n16 - n32, axis=1)
    cos = np.sum(n16 * n32, axis=1)
    r32 = score_features(f32, subject.bank.yes, subject.bank.no, s)
    r16 = score_features(f16, subject.bank.yes, subject.bank.no, s)
    d_atd = float(np.abs(r16.atd - r32.atd).max())
    agree = (1.0 - r32.p_no_all) * r32.probs
    margin = np.abs(r32.p_ood - agree.max(axis=1))
    flips = r16.ood_atd != r32.ood_atd
    band = MARGIN_LIPSCHITZ * atd_tol
    outside = int((flips & (margin > band)).sum())
    gate = ParityOptions()
    need, spread = gate.min_rank_corr["fp16"], float(np.ptp(r32.atd))
    rho = rank_corr(r32.atd, r16.atd)
    tag = f"{subject.label}: image tower amp ({dtype_name(dtype)}) vs fp32 on {device.type}, {plan.images} images"
    rows = [
        judged(
            f"{tag}: max ‖Δ‖₂ of the normalised features (max |Δ| {np.abs(n16 - n32).max():.1e})",
            float(delta.max()),
            eps,
        ),
        # unit vectors at distance ε have cosine 1 − ε²/2
        judged(f"{tag}: min cosine", float(cos.min()), 1.0 - eps * eps / 2, below=False, fmt=".8f"),
        judged(f"{tag}: max |Δ ATD| (s = {s:.1f})", d_atd, atd_tol),
    ]
    if rho is None or spread < gate.min_atd_range:
        rows.append(
            Row(
                f"{tag}: ATD rank correlation",
                f"n/a: fp32 ATD spans only {spread:.1e}",
                f"≥ {need:g} when the span is ≥ {gate.min_atd_range:g}",
                "fail",
                rho,
                need,
                {"atd_range": spread},
            )
        )
    else:
        rows.append(
            judged(f"{tag}: ATD rank correlation ρ (span {spread:.2f})", rho, need, below=False, fmt=".4f")
        )
    rows.append(
        Row(
            f"{tag}: ATD decisions",
            f"{100 * (1 - flips.mean()):.1f}% agree ({int(flips.sum())} flips, {outside} outside the band)",
            f"flips only where |fp32 margin| ≤ {band:.2e} ({MARGIN_LIPSCHITZ:g} × the ATD tolerance)",
            "pass" if outside == 0 else "fail",
            float(flips.mean()),
            band,
            {"flips": int(flips.sum()), "flips_outside_band": outside},
        )
    )
    return rows


# ---- 4. latency ----------------------------------------------------------------------------------------------------


def pipeline(model: Any, head: Any, device: Any, half: bool) -> Callable[[Any], Any]:
    """Host float32 batch → device → image tower (fp32, or under the device's amp autocast) → scoring head in fp32
    (outside autocast: at scale s an fp16 logit is off by up to s·2⁻¹¹) → synchronize; scores stay on the device."""
    import torch

    from clipn_train.precision import autocast_for

    amp = autocast_for("amp", device)[0] if half else contextlib.nullcontext

    def run(x: Any) -> Any:
        with torch.inference_mode():
            with amp():
                features = model.encode_image(x.to(device), normalize=False)
            out = head(features)
        synchronize(device)
        return out

    return run


def check_latency(subject: Subject, device: Any, plan: Plan, scale: float) -> list[Row]:
    import torch

    from clipn_export.head import ScoringHead
    from clipn_runtime.scoring import SCALAR_OUTPUTS, score_features

    model = copy.deepcopy(subject.loaded.model).to(device).eval()
    head = ScoringHead(subject.bank.yes, subject.bank.no, subject.scale).to(device).eval()
    x = torch.from_numpy(pixels(max(plan.batches), subject.loaded))
    rows: list[Row] = []
    # The head on the device against the numpy reference, on the very same features.
    with torch.inference_mode():
        feats = model.encode_image(x[:8].to(device), normalize=False).float()
        got = dict(zip(SCALAR_OUTPUTS, head(feats), strict=True))
    ref = score_features(feats.cpu().numpy(), subject.bank.yes, subject.bank.no, subject.scale)
    d = max(float(np.abs(got[k].cpu().numpy() - getattr(ref, k)).max()) for k in ("atd", "p_no", "ctw", "p_ood"))
    same = bool(
        (got["pred"].cpu().numpy() == ref.pred).all() and (got["ood_atd"].cpu().numpy() == ref.ood_atd).all()
    )
    rows.append(
        Row(
            f"{subject.label}: scoring head on {device.type} vs clipn_runtime.scoring (8 images): max |Δ| "
            "atd/p_no/ctw/p_ood, decisions",
            f"{d:.2e}, decisions {'identical' if same else 'DIFFER'}",
            f"≤ {FP32_ATOL * scale:.2e} (fp32)",
            "pass" if same and d <= FP32_ATOL * scale else "fail",
            d,
            FP32_ATOL * scale,
        )
    )
    runs = {"fp32": pipeline(model, head, device, half=False), "amp": pipeline(model, head, device, half=True)}
    for b in plan.batches:
        xb = x[:b].contiguous()
        outs: dict[str, Any] = {}

        def call(name: str, fn: Callable[[Any], Any], xb: Any = xb, outs: dict[str, Any] = outs) -> None:
            outs[name] = fn(xb)

        stats: dict[str, Stats] = interleaved({k: partial(call, k, f) for k, f in runs.items()}, plan.budget)
        for name, st in stats.items():
            finite = all(bool(torch.isfinite(t.float()).all()) for t in outs[name])
            rows.append(
                Row(
                    f"{subject.label}: latency tower + head, {name}, batch {b} ({device.type})",
                    f"median {st.median_ms:.2f} ms, p90 {st.p90_ms:.2f} ms, {st.per_s(b):.0f} images/s (n={st.n})",
                    "finite scores",
                    "pass" if finite else "fail",
                    st.median_ms,
                    None,
                    {**st.to_dict(), "images_per_s": st.per_s(b), "batch": b, "precision": name},
                )
            )
    return rows


# ---- the run -------------------------------------------------------------------------------------------------------


def quiet_logs() -> None:
    """Warnings only on stderr. The trainer raises clipn_train's loggers to INFO for its out.log, and open_clip's
    root-level logging.info() would otherwise install a root handler that prints them all."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("gpu_check.py: %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="clipn-gpu-check-") as tmp:
        yield Path(tmp)


def attempt(label: str, check: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """``fn()``'s rows, or one failed row naming the exception (its traceback goes to stderr): a GPU is lent
    rarely, so one broken path must not cost the other checks' results."""
    try:
        return fn()
    except Exception as e:
        traceback.print_exc()
        text = " ".join(f"{type(e).__name__}: {e}".split())
        return [Row(f"{label}: {check}", text[:300], "no exception", "fail", details={"exception": text})]


def run_checks(device: Any, args: argparse.Namespace, plan: Plan) -> list[Row]:
    rows: list[Row] = []
    scale = args.tol_scale
    with workspace() as work:
        data = caption_data(work / "data", plan.samples)
        subjects: dict[str, Subject] = {}
        for name in plan.models:
            subject = subjects[name] = make_subject(name, work, plan)
            label = subject.label
            if "train" in args.only:
                rows += attempt(label, "train", partial(check_training, subject, data, work, device, plan, scale))
            if "banks" in args.only:
                rows += attempt(label, "text bank", partial(check_bank, subject, device, plan, scale))
                rows += attempt(label, "feature cache", partial(check_cache, subject, data, work, device, scale))
            if "fp16" in args.only:
                rows += attempt(label, "image tower amp", partial(check_half, subject, device, plan, scale))
        if "latency" in args.only:
            # The head's cost at C classes is C·D multiply-adds per image: negligible next to the tower at any C.
            subject = subjects.get(plan.latency_model) or make_subject(plan.latency_model, work, plan)
            rows += attempt(subject.label, "latency", partial(check_latency, subject, device, plan, scale))
    return rows


def table(rows: Sequence[Row]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")  # |Δ| inside a cell is not a column border

    return md_table(
        ["check", "value", "tolerance / limit", "result"],
        [
            [cell(r.check), cell(r.value), cell(r.limit), r.status.upper() if r.status == "fail" else r.status]
            for r in rows
        ],
        align="llll",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        problem = missing_packages()
        if problem:
            raise UsageError(problem)
        check_output(args.json)
        device = resolve_device(args.device)
    except UsageError as e:
        print(f"gpu_check.py: {e}", file=sys.stderr)
        return EXIT_USAGE
    import torch

    quiet_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    # fp32 matmuls in full fp32 (torch's default) even where the environment asks for TF32, so that every fp32
    # comparison means fp32; cuDNN's convolutions keep torch's default (TF32 allowed), as clipn-train runs them.
    torch.set_float32_matmul_precision("highest")
    plan = PLANS["quick" if args.quick else "full"]
    head = header(device, args, plan)
    print(header_text(head), flush=True)
    t0 = time.perf_counter()
    rows = run_checks(device, args, plan)
    seconds = time.perf_counter() - t0
    failed = [r for r in rows if r.status == "fail"]
    print()
    print(table(rows))
    verdict = (
        f"FAIL: {len(failed)} of {len(rows)} checks failed" if failed else f"PASS: all {len(rows)} checks passed"
    )
    print(f"{verdict} ({seconds:.0f} s)")
    code = EXIT_FAILED if failed else EXIT_OK
    if args.json is not None:
        payload = {
            **head,
            "seconds": seconds,
            "passed": not failed,
            "exit_code": code,
            "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(plan).items()},
            "tolerances": {
                "fp32_atol": FP32_ATOL,
                "feature_u": FEATURE_U,
                "atd_u": ATD_U,
                "loss_u": LOSS_U,
                "margin_lipschitz": MARGIN_LIPSCHITZ,
                "float16_storage": FLOAT16_STORAGE,
                "tf32_u": TF32_U,
            },
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
