"""Fused-head overhead: the same ONNX image encoder with and without the CLIPN scoring head, C = 10 and 1000.

The encoder is exported once (clipn_export.onnx_export.export_encoder, the exporter's own settings); the head
(clipn_export.head.ScoringHead, random unit-norm class banks — its cost does not depend on their values) is
exported per C and chained onto it exactly as the exporter does (onnx_export.chain). All graphs run in
onnxruntime through clipn_runtime's OrtEngine (the Detector's session settings) with the same thread count,
timed round-robin. The head is also timed alone on feature batches: its share of the encoder's time is far
below the noise of timing the whole graph twice, so the head-alone number is the precise one.

    python benchmarks/bench_head.py --quick      # ViT-B-16, batch 1 and 8
    python benchmarks/bench_head.py --full       # batch 1, 8, 32, more repetitions
    python benchmarks/bench_head.py --smoke --out /tmp/r
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
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
    add_common_args,
    interleaved,
    make_model,
    md_table,
    model_label,
    save,
    set_threads,
)

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": str(TINY_CONFIG),
        "batches": (1, 2),
        "budget": Budget(1, 1, 1, 0.0),
        "head": Budget(1, 1, 1, 0),
    },
    "quick": {
        "model": VIT_B16,
        "batches": (1, 8),
        "budget": Budget(1, 3, 40, 12.0),
        "head": Budget(3, 20, 200, 2.0),
    },
    "full": {
        "model": VIT_B16,
        "batches": (1, 8, 32),
        "budget": Budget(2, 10, 200, 60.0),
        "head": Budget(10, 100, 2000, 10.0),
    },
}
CLASS_COUNTS = (10, 1000)
SCALE = 100.0


def build_graphs(loaded: Any, folder: Path) -> tuple[dict[str, Path], dict[str, Path], int]:
    """``encoder``, ``encoder+head C=…`` and ``head C=…`` ONNX files (the exporter's parts and chaining)."""
    from clipn_export import onnx_export as ox
    from clipn_export.head import ScoringHead

    size = int(loaded.info.image_size)
    encoder = ox.export_encoder(loaded.model, size)
    dim = int(loaded.model.embed_dim)
    full: dict[str, Path] = {"encoder": folder / "encoder.onnx"}
    heads: dict[str, Path] = {}
    ox.save_model(encoder, full["encoder"])
    rng = np.random.default_rng(0)
    for c in CLASS_COUNTS:
        head = ScoringHead(rng.standard_normal((c, dim)), rng.standard_normal((c, dim)), SCALE)
        graph = ox.export_head(head)
        heads[f"head C={c}"] = folder / f"head{c}.onnx"
        ox.save_model(graph, heads[f"head C={c}"])
        full[f"encoder+head C={c}"] = folder / f"full{c}.onnx"
        ox.save_model(
            ox.chain([(ox.PREFIX_ENCODER, encoder), (ox.PREFIX_HEAD, graph)]), full[f"encoder+head C={c}"]
        )
    return full, heads, dim


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--model", default=None, help="open_clip name or config JSON (default: the mode's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    preset = PRESETS[args.mode]
    model = args.model or preset["model"]
    set_threads(args.threads)

    from clipn_export.head import normalize_uint8
    from clipn_export.parity import parity_images
    from clipn_runtime.engine import open_engine

    loaded = make_model(model)
    size = int(loaded.info.image_size)
    pixels = normalize_uint8(
        parity_images(max(preset["batches"]), size, seed=0), loaded.info.mean, loaded.info.std
    )
    rows: list[dict[str, Any]] = []
    head_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_head_") as tmp:
        full, heads, dim = build_graphs(loaded, Path(tmp))
        del loaded
        engines = {k: open_engine(p, device="cpu", threads=args.threads) for k, p in full.items()}
        head_engines = {k: open_engine(p, device="cpu", threads=args.threads) for k, p in heads.items()}
        feats = np.random.default_rng(1).standard_normal((max(preset["batches"]), dim)).astype(np.float32)
        for b in preset["batches"]:
            x = np.ascontiguousarray(pixels[:b])
            stats = interleaved({k: partial(e.run, {"image": x}) for k, e in engines.items()}, preset["budget"])
            hstats = interleaved(
                {k: partial(e.run, {"feature": feats[:b]}) for k, e in head_engines.items()},
                preset["head"],
            )
            enc = stats["encoder"]
            for name, st in stats.items():
                rows.append(
                    {
                        "graph": name,
                        "batch": b,
                        **st.to_dict(),
                        "delta_ms": st.median_ms - enc.median_ms,
                        "delta_pct": 100 * (st.median_ms / enc.median_ms - 1),
                    }
                )
            for name, st in hstats.items():
                head_rows.append(
                    {
                        "graph": name,
                        "batch": b,
                        **st.to_dict(),
                        "pct_of_encoder": 100 * st.median_ms / enc.median_ms,
                    }
                )
            print(f"batch {b}: " + ", ".join(f"{k} {v.median_ms:.2f} ms" for k, v in {**stats, **hstats}.items()))

    payload = {
        "model": model_label(model),
        "image_size": size,
        "embed_dim": dim,
        "class_counts": list(CLASS_COUNTS),
        "threads": {"onnxruntime_intra_op": args.threads},
        "head_flop_per_image": {str(c): 4 * c * dim for c in CLASS_COUNTS},
        "budget": {"graphs": asdict(preset["budget"]), "head_alone": asdict(preset["head"])},
        "rows": rows,
        "head_alone": head_rows,
    }
    t1 = md_table(
        ["graph", "batch", "median ms", "p90 ms", "Δ vs encoder", "n"],
        [
            [
                r["graph"],
                r["batch"],
                f"{r['median_ms']:.2f}",
                f"{r['p90_ms']:.2f}",
                "—" if r["graph"] == "encoder" else f"{r['delta_ms']:+.2f} ms ({r['delta_pct']:+.1f}%)",
                r["n"],
            ]
            for r in rows
        ],
    )
    t2 = md_table(
        ["head alone", "batch", "median ms", "p90 ms", "% of the encoder's median", "n"],
        [
            [
                r["graph"],
                r["batch"],
                f"{r['median_ms']:.3f}",
                f"{r['p90_ms']:.3f}",
                f"{r['pct_of_encoder']:.3f}%",
                r["n"],
            ]
            for r in head_rows
        ],
    )
    md = (
        f"## Fused-head overhead ({model_label(model)} at {size} px, D = {dim}, onnxruntime fp32, "
        f"{args.threads} threads)\n\n{t1}\n{t2}\n"
        "The first table times the whole graph with and without the head (round-robin; differences within a "
        "few % are timing noise). The second times the head graph alone on feature batches: its real cost (an "
        "upper bound: it includes one onnxruntime call's fixed overhead, which the fused graph does not pay). "
        f"The head does 4·C·D FLOP per image (two C×D matmuls): {4 * 1000 * dim / 1e6:.1f} MFLOP at "
        "C = 1000, next to the encoder's GFLOPs.\n"
    )
    save(args, "head", payload, md)


if __name__ == "__main__":
    main()
