"""Image engine speed: PyTorch vs the exported bundle on onnxruntime and OpenVINO, against the CPU's limits.

Every row (a candidate) is timed in a process of its own — a worker, ``bench_engine.py --worker NAME`` — because
two runtimes' spinning thread pools sharing the cores of one process slow each other down. The parent runs each
worker once per round, in an order rotated every round, so that drift in the background load spreads over all
rows; a worker loads its engine, runs one agreement batch, then times each batch size after warm-up calls.

* ``pytorch``: the official-style pipeline, eager image tower + the scoring in torch (``ScoringHead``, the torch
  twin of clipn_runtime.scoring) under ``inference_mode``.
* ``ort-fp32`` / ``ort-int8``: ``Detector.run`` (the engine alone) on onnxruntime, ``model.onnx`` /
  ``model.int8.onnx`` (onnxruntime dynamic int8).
* ``ov-f32`` / ``ov-bf16`` / ``ov-int8``: ``Detector.run`` on OpenVINO: ``model.onnx`` with the inference precision
  hint f32, or bf16 (only where OpenVINO runs bf16 on this CPU; elsewhere the row says why not), and the int8 file.
* ``ort-int8-static`` / ``ov-int8-static``: a second bundle exported with ``--int8 --calibration DIR`` (NNCF static
  int8, a QDQ ``model.int8.onnx``), calibrated on generated images — the ranges do not change the cost.
* With a CUDA GPU: PyTorch CUDA fp32 / fp16-autocast, onnxruntime CUDA fp32 / fp16 and TensorRT rows, where
  installed (written against the runtime's documented devices; not run on a CPU-only machine).

Batch 1 is reported as latency (median and p90 of the calls of all rounds), larger batches as images/s; every CPU
row also as a fraction of the CPU's limit for its numeric class — images/s × GFLOP per image ÷ the fp32, bf16 or
int8 peak of common.cpu_limits for the threads used. The benchmark bundles carry no parity records (random
weights make the gate's rank test meaningless), so the OpenVINO rows run with ``allow_unchecked``; instead,
every row's scores on one batch are compared with PyTorch's.

    python benchmarks/bench_engine.py --quick          # ViT-B-16 at 224, batch 1/8/32, 2 rounds (61 min on 2 busy Zen 1 cores)
    python benchmarks/bench_engine.py --full           # 3 rounds, more calls per round
    python benchmarks/bench_engine.py --smoke --out /tmp/r   # tiny model, one round (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    LIMIT_CLASSES,
    ROOT,
    TINY_CONFIG,
    VIT_B16,
    BenchBundle,
    Budget,
    Stats,
    add_common_args,
    bundle_key,
    calibration_folder,
    default_cache_dir,
    get_bundle,
    gpu_backends,
    make_model,
    md_table,
    model_label,
    nominal_gflop,
    peak_gflops,
    save,
    set_threads,
    static_int8_available,
    timed_calls,
    vit_gflop,
)

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"model": str(TINY_CONFIG), "batches": (1, 2), "rounds": 1, "budgets": {1: Budget(1, 1, 1, 0.0)}},
    "quick": {
        "model": VIT_B16,
        "batches": (1, 8, 32),
        "rounds": 2,
        # per worker and round: batch 1 gets ≥ 5 calls (≥ 10 over the rounds, for a p90), 8 and 32 fewer
        "budgets": {1: Budget(2, 5, 20, 5.0), 8: Budget(1, 1, 3, 6.0), 32: Budget(1, 1, 2, 10.0)},
    },
    "full": {
        "model": VIT_B16,
        "batches": (1, 8, 32),
        "rounds": 3,
        "budgets": {1: Budget(3, 10, 60, 20.0), 8: Budget(1, 3, 10, 30.0), 32: Budget(1, 2, 6, 60.0)},
    },
}
#: The bundle's classes (the head's cost at C = 10 vs 1000 is bench_head.py's subject).
CLASSES = 10
BASELINE = "pytorch"
BASELINE_GPU = "pytorch-cuda"
#: The "× onnxruntime fp32" column's reference row.
REFERENCE = "ort-fp32"
#: The default batch recommended per backend: the smallest whose images/s is within this fraction of the best
#: (a smaller batch has lower latency and memory, and a few per cent is within the noise of a quick run).
BATCH_TIE = 0.05
#: Images in the batch every worker scores once for the agreement check.
AGREE_BATCH = 8
AGREE_OUTPUTS = ("atd", "p_no", "pred")


@dataclass(frozen=True)
class Candidate:
    """One row: what runs (``runtime``, ``device``, the Detector's ``precision``, the bundle ``variant``) and
    which of the CPU's limits it is measured against (``numeric``)."""

    name: str
    what: str
    runtime: str
    numeric: str
    device: str = "cpu"
    precision: str | None = None
    #: "dynamic": fp32 + dynamic int8 (+ fp16 with a GPU); "static": fp32 + static int8; "plan": a TensorRT plan
    variant: str = "dynamic"
    gpu: bool = False


CPU_CANDIDATES = (
    Candidate("pytorch", "PyTorch eager fp32", "pytorch", "fp32"),
    Candidate("ort-fp32", "onnxruntime, model.onnx", "onnxruntime", "fp32", "cpu", "fp32"),
    Candidate("ort-int8", "onnxruntime, dynamic int8 model.int8.onnx", "onnxruntime", "int8", "cpu", "int8"),
    Candidate("ov-f32", "OpenVINO, model.onnx, hint f32", "openvino", "fp32", "openvino", "fp32"),
    Candidate("ov-bf16", "OpenVINO, model.onnx, hint bf16", "openvino", "bf16", "openvino", "bf16"),
    Candidate("ov-int8", "OpenVINO, dynamic int8 model.int8.onnx", "openvino", "int8", "openvino", "int8"),
    Candidate(
        "ort-int8-static",
        "onnxruntime, static int8 (NNCF QDQ) model.int8.onnx",
        "onnxruntime",
        "int8",
        "cpu",
        "int8",
        "static",
    ),
    Candidate(
        "ov-int8-static",
        "OpenVINO, static int8 (NNCF QDQ) model.int8.onnx",
        "openvino",
        "int8",
        "openvino",
        "int8",
        "static",
    ),
)
GPU_CANDIDATES = (
    Candidate(BASELINE_GPU, "PyTorch CUDA fp32", "pytorch", "fp32", "cuda", gpu=True),
    Candidate("pytorch-cuda-fp16", "PyTorch CUDA fp16 autocast", "pytorch", "fp16", "cuda", "fp16", gpu=True),
    Candidate("ort-cuda-fp32", "onnxruntime CUDA, model.onnx", "onnxruntime", "fp32", "cuda", "fp32", gpu=True),
    Candidate(
        "ort-cuda-fp16", "onnxruntime CUDA, model.fp16.onnx", "onnxruntime", "fp16", "cuda", "fp16", gpu=True
    ),
    # the dynamic bundle has no plan, so device="tensorrt" means onnxruntime's TensorRT EP
    Candidate("ort-tensorrt-fp16", "onnxruntime TensorRT EP", "onnxruntime", "fp16", "tensorrt", "fp16", gpu=True),
    Candidate("tensorrt-plan-fp16", "TensorRT plan", "tensorrt", "fp16", "tensorrt", None, "plan", gpu=True),
)
CANDIDATES = {c.name: c for c in CPU_CANDIDATES + GPU_CANDIDATES}


def budget_for(budgets: Mapping[int, Budget], batch: int) -> Budget:
    """The budget listed for the largest batch ≤ ``batch`` (the smallest listed one below them all)."""
    below = [k for k in sorted(budgets) if k <= batch]
    return budgets[below[-1] if below else min(budgets)]


# ---- the worker: one candidate in a process of its own ---------------------------------------------------------------


def torch_pipeline(loaded: Any, bundle: Path, device: str = "cpu", fp16: bool = False) -> Callable[[Any], Any]:
    """The official-style pipeline: eager image tower → torch scoring on the bundle's own class banks."""
    import torch

    from clipn_export.head import ScoringHead

    with np.load(bundle / "text_bank.npz", allow_pickle=False) as z:
        yes, no = z["yes"], z["no"]
    # a copy per device: nn.Module.to() moves in place
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


Runner = Callable[[np.ndarray], Mapping[str, Any]]


def make_runner(c: Candidate, bundle: Path, model: str, threads: int) -> tuple[Runner, dict[str, Any]]:
    """The candidate's call on a preprocessed batch (its scalar outputs by name) and what runs it."""
    if c.runtime == "pytorch":
        import torch

        from clipn_runtime.scoring import SCALAR_OUTPUTS

        set_threads(threads)
        pipe = torch_pipeline(make_model(model), bundle, c.device, fp16=c.numeric == "fp16")

        def run_torch(x: np.ndarray) -> dict[str, Any]:
            t = torch.from_numpy(x)
            return dict(zip(SCALAR_OUTPUTS, pipe(t if c.device == "cpu" else t.cuda()), strict=True))

        return run_torch, {"engine": f"PyTorch {torch.__version__} ({c.device}, {threads} threads)", "path": None}
    from clipn_runtime import Detector

    det = Detector(
        bundle,
        device=c.device,
        threads=None if c.gpu else threads,
        precision=c.precision,
        # benchmark bundles have no parity records (see the module docstring); agreement is checked here
        allow_unchecked=True,
    )
    key = det.numeric_path.key if det.numeric_path is not None else "tensorrt-plan"
    return det.run, {"engine": det.engine.describe(), "path": key}


def _as_list(v: Any) -> list[float]:
    a = v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
    return [float(t) for t in np.asarray(a, dtype=np.float64).ravel()]


def worker(args: argparse.Namespace) -> None:
    """``--worker NAME``: load one candidate, score the agreement batch, time every batch size, write JSON."""
    c = CANDIDATES[args.worker]
    pixels = np.load(args.input)
    budgets = {int(k): Budget(**v) for k, v in json.loads(args.budgets).items()}
    t0 = time.perf_counter()
    run, info = make_runner(c, Path(args.bundle), args.model, args.threads)
    load_s = time.perf_counter() - t0
    out = run(np.ascontiguousarray(pixels[: min(AGREE_BATCH, len(pixels))]))
    times: dict[str, list[float]] = {}
    for b in (int(v) for v in args.batches.split(",")):
        x = np.ascontiguousarray(pixels[:b])

        def call(x: np.ndarray = x) -> object:
            return run(x)

        times[str(b)] = timed_calls(call, budget_for(budgets, b))
    result = {
        "candidate": c.name,
        **info,
        "load_seconds": load_s,
        "pid": os.getpid(),
        "outputs": {k: _as_list(out[k]) for k in AGREE_OUTPUTS},
        "times": times,
    }
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")


# ---- the parent: bundles, rounds, rows ---------------------------------------------------------------------------


@dataclass
class Plan:
    """What the parent runs: the candidates with their bundle, and the rows skipped with the reason."""

    runs: dict[str, Path]
    skipped: dict[str, str]
    bundles: dict[str, BenchBundle]


def plan_candidates(model: str, cache: Path, size: int, have: Mapping[str, bool]) -> Plan:
    """Export (or take from the cache) the bundles the available candidates need; say why the others are not run."""
    from clipn_runtime.ov_engine import cpu_supports_bf16, openvino_importable

    skipped: dict[str, str] = {}
    static_why = static_int8_available()
    ov = openvino_importable()
    for c in CPU_CANDIDATES:
        if c.runtime == "openvino" and not ov:
            skipped[c.name] = "openvino not installed (pip install 'clipn-ood[openvino]')"
        elif c.name == "ov-bf16" and not cpu_supports_bf16():
            skipped[c.name] = (
                "not on this CPU: OpenVINO's CPU plugin runs bf16 only with AVX-512 BF16 or AMX, and this CPU "
                "has neither (it would run f32)"
            )
        elif c.variant == "static" and static_why is not None:
            skipped[c.name] = static_why
    gpu_ok = {
        BASELINE_GPU: have["torch_cuda"],
        "pytorch-cuda-fp16": have["torch_cuda"],
        "ort-cuda-fp32": have["ort_cuda"],
        "ort-cuda-fp16": have["ort_cuda"],
        "ort-tensorrt-fp16": have["ort_tensorrt"],
        "tensorrt-plan-fp16": have["tensorrt"],
    }
    wanted = [c for c in CPU_CANDIDATES if c.name not in skipped]
    wanted += [c for c in GPU_CANDIDATES if gpu_ok[c.name]]
    variants = {c.variant for c in wanted}
    fp16 = ("fp16",) if have["torch_cuda"] else ()
    specs: dict[str, tuple[tuple[str, ...], bool, Path | None]] = {
        "dynamic": (("fp32", "int8", *fp16), False, None),
        "plan": (("fp16",), True, None),
    }
    if "static" in variants:
        specs["static"] = (("fp32", "int8"), False, calibration_folder(cache, size))
    loaded: Any = None
    bundles: dict[str, BenchBundle] = {}
    for variant in sorted(variants, key=["dynamic", "static", "plan"].index):
        precisions, trt, calib = specs[variant]
        if loaded is None and not _cached(model, cache, precisions, trt, calib):
            loaded = make_model(model)  # built once, for every bundle that must be exported
        t0 = time.perf_counter()
        bundles[variant] = get_bundle(loaded, model, CLASSES, precisions, cache, tensorrt=trt, calibration=calib)
        print(f"bundle {variant}: {bundles[variant].path} ({time.perf_counter() - t0:.1f} s)", flush=True)
    runs = {c.name: bundles[c.variant].path for c in wanted}
    return Plan(runs, skipped, bundles)


def _cached(model: str, cache: Path, precisions: Sequence[str], trt: bool, calib: Path | None) -> bool:
    from clipn_runtime.bundle import MANIFEST_NAME

    extra = sorted(set(precisions) - {"fp32"})
    key = bundle_key(model, CLASSES, ["fp32", *extra], trt, calib)
    return (cache / "bundles" / key / MANIFEST_NAME).is_file()


def int8_method(bundle: Path) -> str | None:
    """How the bundle's int8 engine was quantised (its manifest's record), None without one."""
    from clipn_runtime.bundle import load_manifest

    for e in load_manifest(bundle, verify_hashes=False).engines():
        if e.precision == "int8":
            q = (e.meta or {}).get("quantization") or {}
            return str(q.get("method", "unrecorded"))
    return None


def input_batch(bundle: Path, n: int, out: Path) -> Path:
    """``n`` deterministic test crops normalised as the bundle's manifest says (NCHW float32), saved for the
    workers: every candidate times the same array."""
    from clipn_export.parity import parity_images
    from clipn_runtime.bundle import load_manifest
    from clipn_runtime.preprocess import Preprocessor

    pre = Preprocessor(load_manifest(bundle, verify_hashes=False).preprocess)
    np.save(out, np.stack([pre.normalize(crop) for crop in parity_images(n, pre.spec.image_size, seed=0)]))
    return out


def run_worker(
    name: str,
    bundle: Path,
    model: str,
    pixels: Path,
    batches: Sequence[int],
    threads: int,
    budgets: Mapping[int, Budget],
    result: Path,
) -> dict[str, Any] | str:
    """One worker process; its result, or the last lines of its error output."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--bundle",
        str(bundle),
        "--model",
        model,
        "--input",
        str(pixels),
        "--batches",
        ",".join(map(str, batches)),
        "--threads",
        str(threads),
        "--budgets",
        json.dumps({str(k): asdict(v) for k, v in budgets.items()}),
        "--result",
        str(result),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0 or not result.is_file():
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
        return f"worker exited with {proc.returncode}: " + " / ".join(tail)
    data: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
    result.unlink()
    return data


def agreement(outputs: Mapping[str, Mapping[str, list[float]]], reference: str) -> dict[str, Any]:
    """max |Δ| of ATD and p_no, and argmax agreement, of every candidate's agreement batch against ``reference``'s."""
    if reference not in outputs:
        return {}
    ref = {k: np.asarray(v) for k, v in outputs[reference].items()}
    out: dict[str, Any] = {}
    for name, got in outputs.items():
        if name == reference:
            continue
        g = {k: np.asarray(v) for k, v in got.items()}
        out[name] = {
            "max_abs_atd": float(np.abs(g["atd"] - ref["atd"]).max()),
            "max_abs_p_no": float(np.abs(g["p_no"] - ref["p_no"]).max()),
            "pred_agree": float(np.mean(g["pred"] == ref["pred"])),
        }
    return out


def best_batches(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per backend: the batch with the most images/s, and the smallest batch within :data:`BATCH_TIE` of it
    (the recommended default)."""
    out: dict[str, dict[str, Any]] = {}
    for be in dict.fromkeys(r["backend"] for r in rows):
        ips = {r["batch"]: r["images_per_s"] for r in rows if r["backend"] == be}
        if len(ips) < 2:
            continue
        best = max(ips, key=lambda b: ips[b])
        default = min(b for b, v in ips.items() if v >= (1 - BATCH_TIE) * ips[best])
        out[be] = {"images_per_s": ips, "best": best, "recommended": default}
    return out


#: The engine the fastest CPU engine is measured against: what ``clipn-export --int8`` gives without calibration.
INT8_BASELINE = "ort-int8"
#: The batch the fastest CPU engine is picked at.
FASTEST_AT = 8


def fastest_cpu(rows: Sequence[Mapping[str, Any]], batch: int = FASTEST_AT) -> dict[str, Any] | None:
    """The CPU engine with the most images/s at ``batch``, against onnxruntime's dynamic int8 in the same run:
    its ratio at ``batch``, both batch-1 latencies and its fraction of the limit. ``None`` without that batch."""
    cpu = [x for x in rows if x["device"] == "cpu"]
    at = {x["backend"]: x for x in cpu if x["batch"] == batch}
    if not at:
        return None
    best = max(at.values(), key=lambda x: x["images_per_s"])
    base = at.get(INT8_BASELINE)
    first = min(x["batch"] for x in cpu)
    lat = {x["backend"]: x["median_ms"] for x in cpu if x["batch"] == first}
    return {
        "backend": best["backend"],
        "what": best["what"],
        "batch": batch,
        "images_per_s": best["images_per_s"],
        "baseline": INT8_BASELINE if base else None,
        "baseline_images_per_s": base["images_per_s"] if base else None,
        "speedup_vs_baseline": best["images_per_s"] / base["images_per_s"] if base else None,
        "latency_batch": first,
        "median_ms": lat.get(best["backend"]),
        "baseline_median_ms": lat.get(INT8_BASELINE),
        "limit_fraction": best["limit_fraction"],
        "numeric": best["numeric"],
    }


def fastest_line(f: Mapping[str, Any] | None) -> str:
    """One sentence for the Markdown of the engine benchmark and the suite."""
    if f is None:
        return ""
    vs = (
        f" = {f['speedup_vs_baseline']:.2f}× onnxruntime dynamic int8 ({f['baseline']}, "
        f"{f['baseline_images_per_s']:.2f})"
        if f["baseline"]
        else " (no onnxruntime dynamic int8 row to compare with)"
    )
    lat = (
        f"; batch {f['latency_batch']} median {f['median_ms']:.1f} ms against {f['baseline_median_ms']:.1f} ms"
        if f["median_ms"] is not None and f["baseline_median_ms"] is not None
        else ""
    )
    limit = "" if f["limit_fraction"] is None else f"; {_pct(f['limit_fraction'])} of the {f['numeric']} limit"
    return (
        f"**Fastest CPU engine at batch {f['batch']}**: {f['backend']} ({f['what']}), "
        f"{f['images_per_s']:.2f} images/s{vs}{lat}{limit}."
    )


def make_rows(
    times: Mapping[str, Mapping[int, list[float]]], gflop: float | None, threads: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    batches = sorted({b for t in times.values() for b in t})
    for b in batches:
        stats = {name: Stats.of(t[b]) for name, t in times.items() if t.get(b)}
        for name, st in stats.items():
            c = CANDIDATES[name]
            base = stats.get(BASELINE_GPU if c.gpu else BASELINE)
            ref = stats.get(REFERENCE) if not c.gpu else None
            ips = st.per_s(b)
            peak, _ = (None, "") if c.gpu else peak_gflops(threads, numeric=c.numeric)
            rows.append(
                {
                    "backend": name,
                    "what": c.what,
                    "runtime": c.runtime,
                    "numeric": c.numeric,
                    "variant": c.variant,
                    "device": "cuda" if c.gpu else "cpu",
                    "batch": b,
                    **st.to_dict(),
                    "images_per_s": ips,
                    "speedup_vs_pytorch": base.median_ms / st.median_ms if base else None,
                    "speedup_vs_ort_fp32": ref.median_ms / st.median_ms if ref else None,
                    "limit_gflops": peak,
                    "limit_fraction": ips * gflop / peak if peak and gflop else None,
                }
            )
    return rows


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.0f}%"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def markdown(r: Mapping[str, Any], png: str) -> str:
    rows, skipped = r["rows"], r["skipped"]
    gflop = r["gflop_per_image"]["used"]
    by = {(x["backend"], x["batch"]): x for x in rows}
    names = list(dict.fromkeys(x["backend"] for x in rows))
    batches = sorted({x["batch"] for x in rows})
    lat_b, tput_b = batches[0], batches[1:]
    lat = md_table(
        ["engine", "what", "median ms", "p90 ms", "n", "images/s", "× ort-fp32", "of its limit"],
        [
            [
                n,
                x["what"],
                f"{x['median_ms']:.1f}",
                f"{x['p90_ms']:.1f}",
                x["n"],
                f"{x['images_per_s']:.2f}",
                _x(x["speedup_vs_ort_fp32"]),
                f"{_pct(x['limit_fraction'])} {x['numeric']}",
            ]
            for n in names
            if (x := by.get((n, lat_b)))
        ]
        + [[s["backend"], s["what"], "—", "—", 0, "—", "—", f"not run: {s['reason']}"] for s in skipped],
        align="ll" + "r" * 6,
    )
    heads = ["engine", "limit"]
    for b in tput_b:
        heads += [f"batch {b} images/s", f"× ort-fp32 @{b}", f"of limit @{b}"]
    tput_rows = []
    for n in names:
        first = next(x for x in rows if x["backend"] == n)
        cells: list[object] = [n, first["numeric"]]
        for b in tput_b:
            x = by.get((n, b))
            cells += (
                [f"{x['images_per_s']:.2f} (n={x['n']})", _x(x["speedup_vs_ort_fp32"]), _pct(x["limit_fraction"])]
                if x
                else ["—", "—", "—"]
            )
        tput_rows.append(cells)
    tput_rows += [
        [s["backend"], CANDIDATES[s["backend"]].numeric, "not run"] + ["—"] * (3 * len(tput_b) - 1)
        for s in skipped
    ]
    tput = md_table(heads, tput_rows) if tput_b else ""
    lim = r["limits"]
    lim_rows = []
    for k in LIMIT_CLASSES:
        g = r["limit_gflops"][k]
        lim_rows.append(
            [
                k,
                "—" if lim["per_cycle_per_core"][k] is None else f"{lim['per_cycle_per_core'][k]:g}",
                "—" if g is None else f"{g:.1f}",
                "—" if g is None or not gflop else f"{g / gflop:.2f}",
                lim["how"][k],
            ]
        )
    limits = md_table(
        [
            "numeric class",
            "ops/cycle/core",
            f"peak G(FL)OP/s, {r['threads']['torch']} threads",
            "images/s ceiling",
            "per-cycle assumption",
        ],
        lim_rows,
        align="lrrrl",
    )
    best = md_table(
        ["engine", *[f"images/s @{b}" for b in batches], "most images/s at", "recommended default batch"],
        [
            [n, *[f"{v['images_per_s'].get(b, float('nan')):.2f}" for b in batches], v["best"], v["recommended"]]
            for n, v in r["best_batch"].items()
        ],
    )
    agree = "; ".join(
        f"{k}: max |Δ ATD| {v['max_abs_atd']:.1e}, argmax agreement {100 * v['pred_agree']:.0f}%"
        for k, v in r["agreement_vs_pytorch"].items()
    )
    threads = r["threads"]["torch"]
    return (
        f"## Image engine: PyTorch, onnxruntime and OpenVINO against the CPU's limits ({r['model']} at "
        f"{r['image_size']} px, {CLASSES} classes, random init, {threads} threads)\n\n"
        + (f"{fastest_line(r['fastest_cpu'])}\n\n" if r.get("fastest_cpu") else "")
        + f"**Latency at batch {lat_b}** (median and p90 over the n calls of all rounds):\n\n{lat}\n"
        + (f"**Throughput** (images/s at the median call):\n\n{tput}\n" if tput else "")
        + f"**The CPU's limits** ({lim['core']}, {lim['vector_bits']}-bit datapath, {lim['clock_mhz']:.0f} MHz: "
        f"{lim['clock_source']}; {gflop or 0:.3g} GFLOP per image):\n\n{limits}\n"
        f"**Default batch** (the smallest within {100 * BATCH_TIE:.0f}% of the most images/s):\n\n{best}\n"
        f"Each engine ran in a process of its own, once per round ({r['rounds']} rounds, the order rotated each "
        f"round); `× ort-fp32` compares medians of this run; `of its limit` = images/s × GFLOP per image ÷ the peak of "
        f"the row's numeric class. OpenVINO and onnxruntime got {threads} threads, torch {threads}.\n\n"
        f"Agreement with PyTorch on one batch: {agree or 'no PyTorch row'}.\n\n"
        + "".join(f"_Note: {n}._\n\n" for n in r["notes"])
        + f"![latency vs batch]({png})\n"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--model", default=None, help="open_clip name or config JSON (default: the mode's)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: the mode's)")
    ap.add_argument("--rounds", type=int, default=None, help="worker runs per engine (default: the mode's)")
    w = ap.add_argument_group("worker (internal: one engine in a process of its own)")
    w.add_argument("--worker", choices=sorted(CANDIDATES), help=argparse.SUPPRESS)
    for opt in ("--bundle", "--input", "--budgets", "--result"):
        w.add_argument(opt, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    preset = PRESETS[args.mode]
    model = args.model or preset["model"]
    if args.worker:
        worker(args)
        return
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else preset["batches"]
    rounds = args.rounds or preset["rounds"]
    budgets: dict[int, Budget] = preset["budgets"]
    cache = args.cache_dir or default_cache_dir()

    from clipn_train.factory import resolve_model_config

    _, cfg = resolve_model_config(model)
    size = int(cfg["vision_cfg"].get("image_size", 224))
    analytic = vit_gflop(cfg)
    gflop = nominal_gflop(model, cfg)
    have, notes = gpu_backends()
    plan = plan_candidates(model, cache, size, have)
    names = list(plan.runs)
    times: dict[str, dict[int, list[float]]] = {n: {} for n in names}
    meta: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        pixels = input_batch(plan.bundles["dynamic"].path, max(max(batches), AGREE_BATCH), Path(tmp) / "x.npy")
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                if name in failed:
                    continue
                t0 = time.perf_counter()
                res = run_worker(
                    name, plan.runs[name], model, pixels, batches, args.threads, budgets, Path(tmp) / "r.json"
                )
                if isinstance(res, str):
                    failed[name] = res
                    print(f"round {r + 1}/{rounds} {name}: FAILED {res}", flush=True)
                    continue
                for b, t in res["times"].items():
                    times[name].setdefault(int(b), []).extend(t)
                m = meta.setdefault(
                    name, {"engine": res["engine"], "path": res["path"], "load_seconds": [], "pids": []}
                )
                m["load_seconds"].append(round(res["load_seconds"], 2))
                m["pids"].append(res["pid"])
                m.setdefault("outputs", res["outputs"])
                meds = ", ".join(f"@{b} {1e3 * float(np.median(t)):.0f} ms" for b, t in res["times"].items())
                print(f"round {r + 1}/{rounds} {name}: {meds} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = make_rows({n: t for n, t in times.items() if t}, gflop, args.threads)
    from common import machine_info

    limits = machine_info()["limits"]
    skipped = [{"backend": n, "what": CANDIDATES[n].what, "reason": why} for n, why in plan.skipped.items()]
    skipped += [{"backend": n, "what": CANDIDATES[n].what, "reason": why} for n, why in failed.items()]
    payload = {
        "model": model_label(model),
        "image_size": size,
        "weights": "random init, seed 0 (the cost does not depend on the weights' values)",
        "classes": CLASSES,
        "threads": {"torch": args.threads, "onnxruntime_intra_op": args.threads, "openvino": args.threads},
        "rounds": rounds,
        "pid": os.getpid(),
        "budgets": {str(k): asdict(v) for k, v in budgets.items()},
        "gflop_per_image": {"used": gflop, "analytic": analytic},
        "limits": limits,
        "limit_gflops": {k: peak_gflops(args.threads, numeric=k)[0] for k in LIMIT_CLASSES},
        "limit_assumptions": {k: peak_gflops(args.threads, numeric=k)[1] for k in LIMIT_CLASSES},
        "bundles": {
            k: {
                "path": str(b.path),
                "cached": b.cached,
                "export_seconds": b.export_seconds,
                "int8": int8_method(b.path),
            }
            for k, b in plan.bundles.items()
        },
        "engines": {n: {k: v for k, v in m.items() if k != "outputs"} for n, m in meta.items()},
        "agreement_vs_pytorch": agreement({n: m["outputs"] for n, m in meta.items()}, BASELINE),
        "skipped": skipped,
        "notes": notes,
        "rows": rows,
        "best_batch": {},
    }
    payload["best_batch"] = best_batches([x for x in rows if x["device"] == "cpu"])
    payload["fastest_cpu"] = fastest_cpu(rows)
    from plot import plot_engine

    png = args.out / f"{args.name or f'engine_{args.mode}'}.png"
    plot_engine(rows, png, title=f"{model_label(model)} at {size} px, {args.threads} threads")
    save(args, "engine", payload, markdown(payload, png.name))


if __name__ == "__main__":
    main()
