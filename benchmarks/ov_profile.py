"""Where OpenVINO spends an engine's time: its per-layer performance counters summed by layer type and kernel.

It answers what a fraction of the CPU's limit (bench_engine.py) cannot: whether the matrix multiplications run
near the peak and the rest of the graph costs the difference, or the kernels themselves are slow. The engine is
compiled as the runtime compiles it (``clipn_runtime.ov_engine``: latency hint, the inference-precision hint,
``--threads``), with OpenVINO's ``PERF_COUNT`` on, and fed one batch of random pixels.

    python benchmarks/ov_profile.py BUNDLE --precision int8 --hint bf16 --batch 8
    python benchmarks/ov_profile.py BUNDLE --precision int8 --hint bf16 --batch 8 --gflop 35.1

With ``--gflop`` (per image; ViT-B-16 at 224 px: 35.1) it also prints the rate of the matrix-multiplication
layers alone (FullyConnected, MatMul, Convolution), counted as if they held all of the model's operations — an
upper bound on their real rate, since the attention products and the head are among the others.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import md_table

#: OpenVINO layer types that are matrix multiplications (the GEMM-bound part of a transformer).
GEMM_TYPES = ("FullyConnected", "FullyConnectedQuantizedLegacy", "MatMul", "Convolution")


def profile(
    engine: Path, hint: str, batch: int, threads: int, calls: int
) -> tuple[float, dict[tuple[str, str], tuple[float, int]]]:
    """Seconds per call summed over the layers' own counters (not wall time) and, per (layer type, kernel),
    seconds per call and the number of layers."""
    import openvino as ov

    core = ov.Core()
    config = {
        "INFERENCE_PRECISION_HINT": hint,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
        "PERF_COUNT": True,
    }
    compiled = core.compile_model(str(engine), "CPU", config)
    request = compiled.create_infer_request()
    port = compiled.inputs[0]
    shape = [batch, *(d.get_length() for d in list(port.get_partial_shape())[1:])]
    dtype = port.get_element_type().to_dtype()
    rng = np.random.default_rng(0)
    x = (
        rng.integers(0, 256, shape).astype(dtype)
        if dtype == np.uint8
        else rng.standard_normal(shape).astype(dtype)
    )
    feeds = {port.get_any_name(): x}
    for _ in range(2):  # warm-up: first calls pay for memory allocation and kernel selection
        request.infer(feeds)
    seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
    layers: dict[tuple[str, str], int] = collections.defaultdict(int)
    for _ in range(calls):
        request.infer(feeds)
        for info in request.profiling_info:
            key = (info.node_type, info.exec_type)
            seconds[key] += info.real_time.total_seconds() / calls
            layers[key] += 1
    by = {k: (v, layers[k] // calls) for k, v in seconds.items()}
    return float(sum(seconds.values())), by


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, help="a bundle folder (or an .onnx engine file)")
    ap.add_argument("--precision", default="int8", help="the bundle's engine file to profile (default: int8)")
    ap.add_argument("--hint", default="bf16", choices=("f32", "bf16"), help="INFERENCE_PRECISION_HINT")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=5, help="timed calls (their layers' times are averaged)")
    ap.add_argument("--gflop", type=float, help="GFLOP per image: also print the GEMM layers' rate")
    args = ap.parse_args(argv)
    engine = args.bundle
    if engine.is_dir():
        from clipn_runtime.bundle import load_manifest

        engine = engine / load_manifest(engine).engine(args.precision).path
    total, by = profile(engine, args.hint, args.batch, args.threads, args.calls)
    rows = [
        [kind, kernel, n, f"{1e3 * s:.2f}", f"{100 * s / total:.1f}%"]
        for (kind, kernel), (s, n) in sorted(by.items(), key=lambda kv: -kv[1][0])
        if s > 0
    ]
    print(
        f"{engine} · hint {args.hint} · batch {args.batch} · {args.threads} threads: {1e3 * total:.1f} ms per call"
    )
    print(md_table(["layer type", "kernel", "layers", "ms per call", "share"], rows, align="llrrr"))
    gemm = sum(s for (kind, _), (s, _) in by.items() if kind in GEMM_TYPES)
    print(
        f"\nmatrix-multiplication layers ({', '.join(GEMM_TYPES)}): {1e3 * gemm:.1f} ms, {100 * gemm / total:.0f}%"
    )
    if args.gflop and gemm > 0:
        rate = args.gflop * args.batch / gemm
        print(f"as if they held all {args.gflop:g} GFLOP per image: {rate:.0f} G(FL)OP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
