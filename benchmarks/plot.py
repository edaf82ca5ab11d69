"""Latency vs batch size per backend (PNG, matplotlib's Agg backend: no display needed).

python benchmarks/plot.py benchmarks/results/engine_quick.json        # → engine_quick.png beside it
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def plot_engine(rows: Sequence[Mapping[str, Any]], png: Path, title: str = "") -> Path:
    """Two panels from bench_engine's rows: median latency per batch (p90 as the upper whisker) and images/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_ips) = plt.subplots(1, 2, figsize=(10, 4))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        rs = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["batch"])
        b = [r["batch"] for r in rs]
        med = [r["median_ms"] for r in rs]
        up = [r["p90_ms"] - r["median_ms"] for r in rs]
        ax_lat.errorbar(b, med, yerr=[[0] * len(rs), up], marker="o", capsize=3, label=backend)
        ax_ips.plot(b, [r["images_per_s"] for r in rs], marker="o", label=backend)
    for ax in (ax_lat, ax_ips):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.grid(True, which="both", alpha=0.3)
        batches = sorted({r["batch"] for r in rows})
        ax.set_xticks(batches, [str(b) for b in batches])
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency per batch, ms (median; bar to p90)")
    ax_ips.set_ylabel("images/s (at the median)")
    ax_ips.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", type=Path, help="an engine_*.json written by bench_engine.py")
    ap.add_argument("-o", "--output", type=Path, help="PNG path (default: beside the JSON)")
    args = ap.parse_args()
    data = json.loads(args.result.read_text(encoding="utf-8"))
    png = args.output or args.result.with_suffix(".png")
    plot_engine(data["rows"], png, title=f"{data['model']} at {data['image_size']} px")
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
