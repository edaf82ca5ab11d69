"""Image engine speed: the official-style PyTorch pipeline vs the exported bundle in onnxruntime (fp32, int8).

PyTorch ("official style", as the CLIPN code runs it): the eager image tower, then the scoring in torch
(clipn_export.head.ScoringHead, the torch twin of clipn_runtime.scoring) under ``torch.inference_mode``.
Bundle: ``clipn_runtime.Detector(...).run(batch)`` — the engine alone, on an already preprocessed batch.
Same random-init model, same input batch (generated images, normalised), same thread count for torch and
onnxruntime; the candidates are timed round-robin after warm-up, so every ratio compares numbers measured
side by side in this run. Roofline: images/s × GFLOP per image ÷ the CPU's assumed fp32 peak (common.py).
With a CUDA GPU, PyTorch CUDA, onnxruntime CUDA fp32/fp16 and TensorRT rows are added where installed.

    python benchmarks/bench_engine.py --quick          # ViT-B-16 at 224, batch 1/8/32 (≈ 2-3 min on 2 cores)
    python benchmarks/bench_engine.py --full           # more repetitions
    python benchmarks/bench_engine.py --smoke --out /tmp/r   # tiny model, one repetition (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    TINY_CONFIG,
    VIT_B16,
    Budget,
    Stats,
    add_common_args,
    default_cache_dir,
    get_bundle,
    gpu_backends,
    interleaved,
    make_model,
    md_table,
    model_label,
    nominal_gflop,
    peak_gflops,
    save,
    set_threads,
    vit_gflop,
)

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"model": str(TINY_CONFIG), "batches": (1, 2), "budget": Budget(1, 1, 1, 0.0)},
    "quick": {"model": VIT_B16, "batches": (1, 8, 32), "budget": Budget(1, 3, 30, 12.0)},
    "full": {"model": VIT_B16, "batches": (1, 8, 32), "budget": Budget(2, 10, 200, 60.0)},
}
#: The bundle's classes (the head's cost at C = 10 vs 1000 is bench_head.py's subject).
CLASSES = 10
BASELINE = "pytorch"
BASELINE_GPU = "pytorch-cuda"


def torch_pipeline(loaded: Any, bundle: Path, device: str = "cpu", fp16: bool = False) -> Callable[[Any], Any]:
    """The official-style pipeline: eager image tower → torch scoring on the bundle's own class banks."""
    import torch

    from clipn_export.head import ScoringHead

    with np.load(bundle / "text_bank.npz", allow_pickle=False) as z:
        yes, no = z["yes"], z["no"]
    # a copy per device: nn.Module.to() moves in place, and the CPU pipeline keeps using the original
    model = loaded.model if device == "cpu" else copy.deepcopy(loaded.model).to(device)
    head = ScoringHead(yes, no, float(loaded.model.scale)).to(device).eval()

    def run(x: Any) -> Any:
        amp = torch.autocast(device, dtype=torch.float16) if fp16 else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            out = head(model.encode_image(x, normalize=False))
        if device != "cpu":
            torch.cuda.synchronize()
        return out

    return run


def agreement(loaded: Any, bundle: Path, detectors: dict[str, Any], x: np.ndarray) -> dict[str, Any]:
    """Do the candidates compute the same thing? max |Δ| of the ATD score and p_no, and argmax agreement,
    of each ONNX engine against the PyTorch pipeline on one batch."""
    import torch

    from clipn_runtime.scoring import SCALAR_OUTPUTS

    ref = dict(zip(SCALAR_OUTPUTS, torch_pipeline(loaded, bundle)(torch.from_numpy(x)), strict=True))
    out: dict[str, Any] = {}
    for name, det in detectors.items():
        got = det.run(x)
        out[name] = {
            "max_abs_atd": float(np.abs(got["atd"] - ref["atd"].numpy()).max()),
            "max_abs_p_no": float(np.abs(got["p_no"] - ref["p_no"].numpy()).max()),
            "pred_agree": float(np.mean(got["pred"] == ref["pred"].numpy())),
        }
    return out


def cpu_candidates(
    loaded: Any, bundle: Path, threads: int, precisions: tuple[str, ...]
) -> tuple[dict[str, Callable[[np.ndarray], Any]], dict[str, Any]]:
    import torch

    from clipn_runtime import Detector

    pipe = torch_pipeline(loaded, bundle)
    cands: dict[str, Callable[[np.ndarray], Any]] = {BASELINE: lambda x: pipe(torch.from_numpy(x))}
    dets = {f"ort-{p}": Detector(bundle, device="cpu", threads=threads, precision=p) for p in precisions}
    for name, det in dets.items():
        cands[name] = det.run
    return cands, dets


def gpu_candidates(
    loaded: Any, bundle: Path, have: dict[str, bool], plan_bundle: Path | None
) -> dict[str, Callable[[np.ndarray], Any]]:
    """PyTorch CUDA fp32/fp16-autocast, onnxruntime CUDA fp32/fp16, TensorRT (onnxruntime's EP; the bundle's
    native plan) where present. Inputs are host numpy arrays for every row (the copy to the GPU is in each call).
    Written against the runtime's documented devices; not run on this CPU-only machine."""
    import torch

    cands: dict[str, Callable[[np.ndarray], Any]] = {}
    if not have["torch_cuda"]:
        return cands
    from clipn_runtime import Detector

    fp32 = torch_pipeline(loaded, bundle, "cuda")
    fp16 = torch_pipeline(loaded, bundle, "cuda", fp16=True)
    cands[BASELINE_GPU] = lambda x: fp32(torch.from_numpy(x).cuda())
    cands["pytorch-cuda-fp16"] = lambda x: fp16(torch.from_numpy(x).cuda())
    if have["ort_cuda"]:
        for p in ("fp32", "fp16"):
            cands[f"ort-cuda-{p}"] = Detector(bundle, device="cuda", precision=p).run
    if have["ort_tensorrt"]:
        # this bundle has no plan, so device="tensorrt" means onnxruntime's TensorRT EP
        cands["ort-tensorrt-fp16"] = Detector(bundle, device="tensorrt", precision="fp16").run
    if plan_bundle is not None:
        cands["tensorrt-plan-fp16"] = Detector(plan_bundle, device="tensorrt").run
    return cands


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--model", default=None, help="open_clip name or config JSON (default: the mode's)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: the mode's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    preset = PRESETS[args.mode]
    model = args.model or preset["model"]
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else preset["batches"]
    budget: Budget = preset["budget"]
    cache = args.cache_dir or default_cache_dir()
    set_threads(args.threads)

    from clipn_export.head import normalize_uint8
    from clipn_export.parity import parity_images

    have, notes = gpu_backends()
    loaded = make_model(model)
    size = int(loaded.info.image_size)
    analytic = vit_gflop(loaded.info.model_config)
    gflop = nominal_gflop(model, loaded.info.model_config)
    precisions = ("fp32", "int8") + (("fp16",) if have["torch_cuda"] else ())
    bb = get_bundle(loaded, model, CLASSES, precisions, cache)
    cands, dets = cpu_candidates(loaded, bb.path, args.threads, ("fp32", "int8"))
    plan = get_bundle(loaded, model, CLASSES, ("fp16",), cache, tensorrt=True).path if have["tensorrt"] else None
    gpu = gpu_candidates(loaded, bb.path, have, plan)
    peak, assumption = peak_gflops(args.threads)

    images = parity_images(max(batches), size, seed=0)
    pixels = normalize_uint8(images, loaded.info.mean, loaded.info.std)
    agree = agreement(loaded, bb.path, dets, pixels[: min(8, len(pixels))])

    rows: list[dict[str, Any]] = []
    for b in batches:
        x = np.ascontiguousarray(pixels[:b])
        for group, baseline in ((cands, BASELINE), (gpu, BASELINE_GPU)):
            if not group:
                continue
            stats = interleaved({k: partial(f, x) for k, f in group.items()}, budget)
            base: Stats = stats[baseline]
            for name, st in stats.items():
                ips = st.per_s(b)
                rows.append(
                    {
                        "backend": name,
                        "device": "cuda" if group is gpu else "cpu",
                        "batch": b,
                        **st.to_dict(),
                        "images_per_s": ips,
                        "speedup_vs_pytorch": base.median_ms / st.median_ms,
                        "baseline": baseline,
                        "roofline_fraction": ips * gflop / peak if group is cands and gflop else None,
                    }
                )
            print(f"batch {b}: " + ", ".join(f"{k} {v.median_ms:.1f} ms" for k, v in stats.items()), flush=True)

    payload = {
        "model": model_label(model),
        "image_size": size,
        "weights": "random init, seed 0 (the cost does not depend on the weights' values)",
        "classes": CLASSES,
        "threads": {"torch": args.threads, "onnxruntime_intra_op": args.threads},
        "gflop_per_image": {"used": gflop, "analytic": analytic},
        "peak_gflops": round(peak, 1),
        "peak_assumption": assumption,
        "budget": asdict(budget),
        "bundle": {"path": str(bb.path), "cached": bb.cached, "export_seconds": bb.export_seconds},
        "agreement_vs_pytorch": agree,
        "notes": notes,
        "rows": rows,
    }
    table = md_table(
        ["backend", "batch", "median ms", "p90 ms", "images/s", "× PyTorch", "roofline", "n"],
        [
            [
                r["backend"],
                r["batch"],
                f"{r['median_ms']:.1f}",
                f"{r['p90_ms']:.1f}",
                f"{r['images_per_s']:.2f}",
                f"{r['speedup_vs_pytorch']:.2f}",
                "—" if r["roofline_fraction"] is None else f"{100 * r['roofline_fraction']:.0f}%",
                r["n"],
            ]
            for r in rows
        ],
    )
    from plot import plot_engine

    png = args.out / f"{args.name or f'engine_{args.mode}'}.png"
    plot_engine(rows, png, title=f"{model_label(model)} at {size} px, {args.threads} threads")
    agree_txt = "; ".join(
        f"{k}: max |Δ ATD| {v['max_abs_atd']:.1e}, argmax agreement {100 * v['pred_agree']:.0f}%"
        for k, v in agree.items()
    )
    md = (
        f"## Image engine: PyTorch vs the bundle in onnxruntime ({model_label(model)} at {size} px, "
        f"{CLASSES} classes, random init)\n\n{table}\n"
        f"Latency of one batch (median and p90 over n timed calls after warm-up; candidates timed round-robin). "
        f"**× PyTorch** = PyTorch's median ÷ this row's median at the same batch, in this run. PyTorch: eager image "
        f"tower + torch scoring (`ScoringHead`) under `inference_mode`; onnxruntime: `Detector.run` (engine only). "
        f"Threads: torch {args.threads}, onnxruntime intra-op {args.threads}.\n\n"
        f"Roofline: images/s × {gflop or 0:.3g} GFLOP/image ÷ {peak:.1f} GFLOP/s (assumed peak: {assumption}; "
        f"counted from the model config: {analytic or 0:.3g} GFLOP/image). int8 runs integer instructions (VNNI/AMX) the "
        f"fp32 peak does not count, so its fraction can exceed what fp32 can reach.\n\n"
        f"Agreement with PyTorch on one batch: {agree_txt}.\n\n"
        + "".join(f"_Note: {n}._\n\n" for n in notes)
        + f"![latency vs batch]({png.name})\n"
    )
    save(args, "engine", payload, md)


if __name__ == "__main__":
    main()
