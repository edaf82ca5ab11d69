"""Run the benchmark suite: engine, fused head, end to end, training cache, text bank — then one summary.

    python benchmarks/run.py --quick             # → benchmarks/results/README.md (engine: 8 engines × 2 rounds)
    python benchmarks/run.py --full              # more images and repetitions (≈ 20-30 min on 2 cores)
    python benchmarks/run.py --smoke --out /tmp/bench   # tiny models, one repetition: checks the suite (CI)
    python benchmarks/run.py --quick --only engine,head --max-load 1.5

Each benchmark runs in its own process (clean memory and thread pools; one failure does not stop the rest) and
writes ``<bench>_<mode>.{json,md}`` under ``--out`` (default benchmarks/results/) with the machine, the library
versions, the load average and its exact command. The suite then writes ``<mode>.{json,md}``: the headline
numbers of every benchmark in one table set (``<mode>.md``, copied to ``README.md`` there for a real suite),
with links to the details.

Timings are only worth recording on a quiet machine: the 1-minute load average is printed and recorded, and
``--max-load`` refuses to start above a limit. Exit status: 0 all ran, 1 a benchmark failed, 3 machine too busy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_engine import fastest_line  # noqa: E402
from common import RESULTS, write_result  # noqa: E402

ROOT = HERE.parent
TINY = "tests/data/tiny-clip.json"
BENCHES = ("engine", "head", "detect", "train_cache", "textbank")

#: The other benchmark scripts' own options per mode (their CLIs; run.py only chooses sizes).
HELPER_ARGS: dict[str, dict[str, list[str]]] = {
    "textbank": {
        "smoke": ["--model", TINY, "--classes", "2"],
        "quick": ["--model", "ViT-B-16", "--classes", "2"],
        "full": ["--model", "ViT-B-16", "--classes", "10"],
    },
    "train_cache": {
        "smoke": ["--smoke"],
        "quick": ["--model", "ViT-B-16", "--batch-size", "8", "--steps", "2"],
        "full": ["--model", "ViT-B-16", "--batch-size", "32", "--steps", "5"],
    },
}
SCRIPTS = {
    "engine": "bench_engine.py",
    "head": "bench_head.py",
    "detect": "bench_detect.py",
    "train_cache": "bench_train_cache.py",
    "textbank": "bench_textbank.py",
}


def step_command(bench: str, mode: str, out: Path, threads: int, cache_dir: Path | None) -> list[str]:
    script = str(Path("benchmarks") / SCRIPTS[bench])
    # bench_textbank.py/bench_train_cache.py write through common.write_result(name) into benchmarks/results;
    # an absolute --name puts the files under --out instead (pathlib: results / "/abs/name.json" → /abs/name.json).
    name = str(out.resolve() / f"{bench}_{mode}")
    if bench in HELPER_ARGS:
        extra = ["--threads", str(threads)] if bench == "train_cache" else []
        return [sys.executable, script, *HELPER_ARGS[bench][mode], *extra, "--name", name]
    cmd = [sys.executable, script, f"--{mode}", "--out", str(out), "--threads", str(threads)]
    return cmd + (["--cache-dir", str(cache_dir)] if cache_dir else [])


def load(out: Path, bench: str, mode: str) -> dict[str, Any] | None:
    p = out / f"{bench}_{mode}.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


# ---- the summary ------------------------------------------------------------------------------------------------


def _engine_md(r: dict[str, Any]) -> str:
    rows = r["rows"]
    batches = sorted({x["batch"] for x in rows})
    backends = list(dict.fromkeys(x["backend"] for x in rows))
    cell = {(x["backend"], x["batch"]): x for x in rows}
    lines = [
        f"**Image engine** ({r['model']} at {r['image_size']} px, {r['threads']['torch']} threads, each engine in a "
        f"process of its own; batch {batches[0]}: median / p90 latency; larger batches: images/s · × onnxruntime "
        "fp32 · fraction of the CPU's limit for the row's numeric class)\n",
        "| backend | limit | " + " | ".join(f"batch {b}" for b in batches) + " | default batch |",
        "|---|---|" + "---:|" * len(batches) + "---:|",
    ]
    for be in backends:
        cells = []
        for i, b in enumerate(batches):
            x = cell.get((be, b))
            if x is None:
                cells.append("—")
                continue
            frac = "" if x["limit_fraction"] is None else f" · {100 * x['limit_fraction']:.0f}%"
            if i == 0:
                cells.append(f"{x['median_ms']:.1f} / {x['p90_ms']:.1f} ms{frac}")
                continue
            ref = "" if x["speedup_vs_ort_fp32"] is None else f" · {x['speedup_vs_ort_fp32']:.2f}×"
            cells.append(f"{x['images_per_s']:.2f}/s{ref}{frac}")
        numeric = next(x["numeric"] for x in rows if x["backend"] == be)
        best = r.get("best_batch", {}).get(be, {}).get("recommended", "—")
        lines.append(f"| {be} | {numeric} | " + " | ".join(cells) + f" | {best} |")
    for s in r.get("skipped", []):
        lines.append(f"| {s['backend']} | not run: {s['reason']} |" + " — |" * (len(batches) + 1))
    lim = r["limits"]
    peaks = ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} none" for k, v in r["limit_gflops"].items())
    notes = "".join(f"\n_{n}._" for n in r.get("notes", []))
    fastest = fastest_line(r.get("fastest_cpu"))
    return (
        "\n".join(lines)
        + (f"\n\n{fastest}" if fastest else "")
        + f"\n\nLimits ({lim['core']}, {lim['vector_bits']}-bit, {lim['clock_mhz']:.0f} MHz, "
        f"{r['threads']['torch']} threads): {peaks} GFLOP/s.{notes}\n"
    )


def _head_md(r: dict[str, Any]) -> str:
    b = max(x["batch"] for x in r["head_alone"])
    alone = [x for x in r["head_alone"] if x["batch"] == b]
    full = {x["graph"]: x for x in r["rows"] if x["batch"] == b}
    enc = full["encoder"]["median_ms"]
    parts = [
        f"{x['graph'].replace('head ', '')}: {x['median_ms']:.3f} ms = {x['pct_of_encoder']:.3f}% of the encoder "
        f"(whole graph {full['encoder+head ' + x['graph'].replace('head ', '')]['delta_pct']:+.1f}%)"
        for x in alone
    ]
    return f"**Fused head** (batch {b}, encoder {enc:.1f} ms, onnxruntime fp32): " + "; ".join(parts) + ".\n"


def _detect_md(r: dict[str, Any]) -> str:
    lines = [
        f"**End to end** ({r['images']['total']} JPEGs, {', '.join(r['images']['sizes'])}): "
        + "; ".join(
            f"{r['model']} {e['precision']}: {e['e2e_images_per_s']:.1f} images/s end to end vs "
            f"{e['engine_images_per_s']:.1f} engine only ({e['e2e_over_engine']:.2f}×)"
            for e in r["end_to_end"]
        )
        + ".",
        "`clipn-detect` per backend (scoring images/s · incl. start-up): "
        + "; ".join(
            f"{c.get('backend', 'clipn-detect')} {c.get('images_per_s') or 0:.2f} · {c['images_per_s_incl_startup']:.2f}"
            for c in r.get("cli_backends", [r["cli"]])
        )
        + ".",
        "Decode + preprocess: "
        + ", ".join(
            f"{x['threads']} thread{'s' * (x['threads'] > 1)} {x['images_per_s']:.0f}/s"
            for x in r["decode"]["rows"]
        )
        + ".",
        f"Peak RSS of clipn-detect ({r['rss']['model']} bundle): "
        + " vs ".join(f"{x['images']} images {x['peak_rss_mb']:.0f} MB" for x in r["rss"]["runs"])
        + f" ({r['rss']['ratio_last_over_first']:.2f}×).",
    ]
    return " ".join(lines) + "\n"


def _train_md(r: dict[str, Any]) -> str:
    m = Path(str(r["model"])).stem if str(r["model"]).endswith(".json") else r["model"]
    return (
        f"**Training** ({m}, batch {r['batch_size']}): {r['uncached']['samples_per_s']:.2f} samples/s from images "
        f"vs {r['cached']['samples_per_s']:.2f} from the feature cache (**{r['speedup']:.1f}×**); the cache pays "
        f"for itself after {r['break_even_epochs']:.2f} epochs.\n"
    )


def _textbank_md(r: dict[str, Any]) -> str:
    m = Path(str(r["model"])).stem if str(r["model"]).endswith(".json") else r["model"]
    return (
        f"**Text bank** ({m}, {r['classes']} classes × {r['templates']} templates): naive "
        f"{r['seconds']['naive']:.1f} s vs {r['seconds']['fast']:.1f} s (**{r['speedup']:.2f}×**, max |Δ| "
        f"{r['max_abs_diff']:.1e}).\n"
    )


SECTION = {
    "engine": _engine_md,
    "head": _head_md,
    "detect": _detect_md,
    "train_cache": _train_md,
    "textbank": _textbank_md,
}


def summary(out: Path, mode: str, steps: list[dict[str, Any]], load_start: tuple[float, ...]) -> None:
    parts = []
    headline: dict[str, Any] = {}
    for s in steps:
        r = load(out, s["bench"], mode)
        if s["returncode"] != 0 or r is None:
            parts.append(f"**{s['bench']}**: failed (exit {s['returncode']}); see its output above.\n")
            continue
        parts.append(SECTION[s["bench"]](r))
        headline[s["bench"]] = {k: r[k] for k in ("date", "command") if k in r}
    details = ", ".join(f"[{s['bench']}]({s['bench']}_{mode}.md)" for s in steps)
    busy = (
        f"\n\n**The 1-minute load average was {load_start[0]:.2f} at the start: other work shared the CPU, so "
        "these timings are not representative.**"
        if load_start and load_start[0] > 1.5 and mode != "smoke"
        else ""
    )
    total = sum(s["seconds"] for s in steps)
    md = (
        f"## Benchmarks ({mode} suite)\n\n" + "\n".join(parts) + f"\nDetails: {details}. Suite wall time "
        f"{total / 60:.1f} min.{busy}\n"
    )
    if (out / f"engine_{mode}.png").is_file():
        md += f"\n![latency vs batch](engine_{mode}.png)\n"
    _, md_path = write_result(
        mode, {"suite": mode, "load_avg_start": load_start, "steps": steps, "results": headline}, md, out
    )
    if mode != "smoke":
        # the results folder's README is what GitHub shows there: the latest real suite, whichever it was
        (out / "README.md").write_text(
            "# Latest benchmark results\n\nWritten by `benchmarks/run.py`; how to read them: "
            "[docs/benchmarks.md](../../docs/benchmarks.md).\n\n" + md_path.read_text(encoding="utf-8"),
            encoding="utf-8",
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    for m in ("smoke", "quick", "full"):
        g.add_argument(f"--{m}", dest="mode", action="store_const", const=m, help=f"the {m} suite")
    ap.set_defaults(mode="quick")
    ap.add_argument("--out", type=Path, default=RESULTS, help="result directory (default: benchmarks/results)")
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="generated images and bundles (default: bench/ in $CLIPN_CACHE, else ~/.cache/clipn-ood)",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch and onnxruntime threads (default: 2; --smoke: 1)"
    )
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--max-load", type=float, default=None, help="refuse to start above this 1-min load average")
    args = ap.parse_args()
    # smoke checks the suite, not the speed: one thread avoids OpenMP barrier stalls on a busy CI machine
    args.threads = args.threads or (1 if args.mode == "smoke" else 2)
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(only) - set(BENCHES))
    if unknown:
        ap.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else ()
    print(f"load average at start: {load_start}", flush=True)
    if args.max_load is not None and load_start and load_start[0] > args.max_load:
        print(
            f"run.py: load average {load_start[0]:.2f} > --max-load {args.max_load}: not starting", file=sys.stderr
        )
        sys.exit(3)
    if load_start and load_start[0] > 1.5 and args.mode != "smoke":
        print("run.py: warning: the machine is busy; timings will not be representative", file=sys.stderr)
    # the benchmarks run from the repository root: make the user's relative paths absolute first
    args.out = args.out.resolve()
    args.cache_dir = args.cache_dir.resolve() if args.cache_dir else None
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    steps: list[dict[str, Any]] = []
    for bench in only:
        cmd = step_command(bench, args.mode, args.out, args.threads, args.cache_dir)
        print(f"\n=== {bench}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
        seconds = time.perf_counter() - t0
        print(f"=== {bench}: exit {rc} after {seconds:.1f} s", flush=True)
        steps.append(
            {"bench": bench, "command": " ".join(cmd[1:]), "returncode": rc, "seconds": round(seconds, 1)}
        )
    summary(args.out, args.mode, steps, tuple(load_start))
    print(f"\nsummary: {args.out / (args.mode + '.md')}")
    sys.exit(1 if any(s["returncode"] for s in steps) else 0)


if __name__ == "__main__":
    main()
