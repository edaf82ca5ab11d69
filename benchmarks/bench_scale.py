"""Scaling out: ``clipn-detect`` on images as files vs the same images in webdataset shards (one machine), and Ray
Data with 1 vs 2 :class:`~clipn_runtime.ray.ClipnScorer` actors.

* **files vs shards**: the same generated JPEGs (bench_detect's, mixed sizes) once as a folder, once packed into
  tar shards (``key.jpg`` members), scored by the ``clipn-detect`` command (a subprocess: start-up included, the
  same for both) with the same bundle, precision, batch size and threads. Runs alternate (file, shard, file,
  shard, …) after one warm-up each, so drift in the machine's load hits both alike; medians are reported.
* **Ray Data, 1 vs 2 actors**: ``ray.init(num_cpus=2)``, the same JPEGs' bytes (``from_items``, one block per
  batch: a read task would need a CPU that two 1-CPU actors hold, and wait for ever),
  ``map_batches(ClipnScorer, concurrency=k, num_cpus=1, fn_constructor_kwargs={..., "threads": 1})``,
  materialised; k = 1 and 2 alternate. Actor start-up (each loads the bundle) is included in every run. The
  ratio is measured, never assumed: on a loaded or 2-core machine it can be far from 2. Skipped, with the reason
  printed and recorded, when ray is not installed.

    python benchmarks/bench_scale.py --quick
    python benchmarks/bench_scale.py --smoke --out /tmp/r
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_detect import JPEG_VERSION, REAL_SIZES, jpeg_folder, stage_folder
from harness import (
    TINY_CONFIG,
    VIT_B16,
    add_common_args,
    default_cache_dir,
    get_bundle,
    md_table,
    model_label,
    save,
)

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": str(TINY_CONFIG),
        "precision": "fp32",
        "sizes": ((320, 240),),
        "per_size": 8,
        "per_shard": 4,
        "reps": 2,
    },
    "quick": {
        "model": VIT_B16,
        "precision": "int8",
        "sizes": REAL_SIZES,
        "per_size": 48,
        "per_shard": 48,
        "reps": 3,
    },
    "full": {
        "model": VIT_B16,
        "precision": "int8",
        "sizes": REAL_SIZES,
        "per_size": 200,
        "per_shard": 200,
        "reps": 5,
    },
}
BATCH = 16  # clipn-detect's default
CLASSES = 10
ACTORS = (1, 2)
RAY_CPUS = 2

#: clipn-detect's own entry point, run by this interpreter (the venv's packages, no console script needed).
_CLI = "import sys\nsys.argv[0] = 'clipn-detect'\nfrom clipn_runtime.cli import main\nmain()\n"


# ---- inputs -------------------------------------------------------------------------------------------------------


def write_shards(cache: Path, name: str, paths: list[Path], per_shard: int) -> list[Path]:
    """``paths`` packed ``per_shard`` at a time into ``<cache>/shards/<name>/000NN.tar`` as ``key.jpg`` members
    (key: the folder's file stem, so records of both runs name the same images)."""
    folder = cache / "shards" / JPEG_VERSION / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.tar"):
        old.unlink()
    shards = []
    for n, i in enumerate(range(0, len(paths), per_shard)):
        shard = folder / f"{n:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for j, src in enumerate(paths[i : i + per_shard], start=i):
                tar.add(src, arcname=f"{j:05d}_{src.parent.name}.jpg")
        shards.append(shard)
    return shards


# ---- files vs shards ----------------------------------------------------------------------------------------------


def cli_args(inputs: list[str], bundle: Path, out: Path, threads: int, precision: str) -> list[str]:
    return [
        *inputs,
        *("-e", str(bundle), "-o", str(out), "--overwrite", "--threads", str(threads)),
        *("-b", str(BATCH), "--precision", precision, "-q"),
    ]


def run_cli(args: list[str], out: Path, images: int) -> float:
    """One ``clipn-detect`` run in a subprocess: its wall seconds; every image must have an error-free record."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CLI, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"clipn-detect exited with {proc.returncode}:\n{proc.stderr}")
    recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    errors = [r for r in recs if r.get("error") is not None]
    if len(recs) != images or errors:
        raise RuntimeError(f"clipn-detect wrote {len(recs)} records for {images} images, {len(errors)} errors")
    return wall


def alternate(fns: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """One warm-up call each (page cache, bundle files), then ``reps`` rounds in turn: the seconds per call."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(fn())
    return times


def summarise(times: dict[str, list[float]], images: int) -> dict[str, dict[str, Any]]:
    return {
        k: {
            "seconds": t,
            "median_s": statistics.median(t),
            "images_per_s": images / statistics.median(t),
        }
        for k, t in times.items()
    }


def files_vs_shards(
    bundle: Path, folder: Path, shards: list[Path], out_dir: Path, threads: int, precision: str, reps: int
) -> dict[str, Any]:
    images = sum(1 for _ in folder.glob("*.jpg"))
    out_dir.mkdir(parents=True, exist_ok=True)
    commands = {
        "file": cli_args([str(folder)], bundle, out_dir / "files.jsonl", threads, precision),
        "shard": cli_args([str(s) for s in shards], bundle, out_dir / "shards.jsonl", threads, precision),
    }
    outs = {"file": out_dir / "files.jsonl", "shard": out_dir / "shards.jsonl"}
    times = alternate({k: functools.partial(run_cli, commands[k], outs[k], images) for k in commands}, reps)
    res = summarise(times, images)
    return {
        "images": images,
        "shards": len(shards),
        "per_shard": -(-images // len(shards)),
        "runs": res,
        "shard_over_file": res["shard"]["images_per_s"] / res["file"]["images_per_s"],
        "commands": {k: "clipn-detect " + " ".join(v) for k, v in commands.items()},
    }


# ---- Ray Data -----------------------------------------------------------------------------------------------------


def ray_actors(bundle: Path, paths: list[Path], precision: str, reps: int) -> dict[str, Any]:
    """images/s of Ray Data with 1 and 2 scoring actors (one CPU and one onnxruntime thread each)."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        reason = f"ray is not installed ({e}): Ray Data rows skipped (pip install 'clipn-ood[ray]')"
        print(reason, flush=True)
        return {"skipped": reason}
    from clipn_runtime.ray import ClipnScorer

    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        kwargs = {"bundle_dir": str(bundle), "threads": 1, "precision": precision, "batch_size": BATCH}

        def score(k: int) -> float:
            t0 = time.perf_counter()
            # The bytes go in from the driver: a read task would need a CPU that the k = 2 actors hold, and wait.
            items = [{"bytes": p.read_bytes(), "path": str(p)} for p in paths]
            ds = ray.data.from_items(items, override_num_blocks=-(-len(paths) // BATCH)).map_batches(
                ClipnScorer, concurrency=k, num_cpus=1, batch_size=BATCH, fn_constructor_kwargs=kwargs
            )
            rows = ds.materialize().to_pandas()
            wall = time.perf_counter() - t0
            if len(rows) != len(paths) or rows["error"].notna().any():
                raise RuntimeError(f"Ray Data gave {len(rows)} records for {len(paths)} images, or errors")
            return wall

        times = alternate({f"{k} actor(s)": functools.partial(score, k) for k in ACTORS}, reps)
    finally:
        ray.shutdown()
    res = summarise(times, len(paths))
    one, two = (res[f"{k} actor(s)"]["images_per_s"] for k in ACTORS)
    return {
        "ray": ray.__version__,
        "num_cpus": RAY_CPUS,
        "threads_per_actor": 1,
        "runs": res,
        "two_over_one": two / one,
    }


# ---- report -------------------------------------------------------------------------------------------------------


def markdown(fs: dict[str, Any], rr: dict[str, Any], label: str, precision: str, threads: int) -> str:
    rows = [
        [k, f"{v['images_per_s']:.2f}", f"{v['median_s']:.2f}", ", ".join(f"{s:.2f}" for s in v["seconds"])]
        for k, v in fs["runs"].items()
    ]
    text = (
        f"## clipn-detect: {fs['images']} images as files vs in {fs['shards']} shards of {fs['per_shard']}\n\n"
        f"{label} {precision}, {CLASSES} classes, batch {BATCH}, {threads} onnxruntime threads; subprocess wall "
        "time (start-up included), runs alternating after one warm-up each:\n\n"
        + md_table(["input", "images/s (median)", "median s", "runs (s)"], rows)
        + f"\nshards / files: **{fs['shard_over_file']:.3f}**\n\n"
    )
    if "skipped" in rr:
        return text + f"## Ray Data, 1 vs 2 actors\n\nSkipped: {rr['skipped']}\n"
    rows = [
        [k, f"{v['images_per_s']:.2f}", f"{v['median_s']:.2f}", ", ".join(f"{s:.2f}" for s in v["seconds"])]
        for k, v in rr["runs"].items()
    ]
    return (
        text
        + f"## Ray Data, 1 vs 2 actors (ray {rr['ray']}, ray.init(num_cpus={RAY_CPUS}), 1 thread per actor)\n\n"
        + md_table(["actors", "images/s (median)", "median s", "runs (s)"], rows)
        + f"\n2 actors / 1 actor: **{rr['two_over_one']:.3f}** (actor start-up included in every run)\n"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    ps = PRESETS[args.mode]
    cache = args.cache_dir or default_cache_dir()
    paths = jpeg_folder(cache, ps["sizes"], ps["per_size"])
    t0 = time.perf_counter()
    bb = get_bundle(None, ps["model"], CLASSES, (ps["precision"],), cache)
    build_s = time.perf_counter() - t0
    folder = stage_folder(cache, f"scale-{args.mode}", paths)
    shards = write_shards(cache, f"scale-{args.mode}", sorted(folder.glob("*.jpg")), ps["per_shard"])
    fs = files_vs_shards(bb.path, folder, shards, cache / "scale-out", args.threads, ps["precision"], ps["reps"])
    print(f"files vs shards: {fs['shard_over_file']:.3f}", flush=True)
    rr = ray_actors(bb.path, sorted(folder.glob("*.jpg")), ps["precision"], ps["reps"])
    label = model_label(ps["model"])
    payload = {
        "model": label,
        "precision": ps["precision"],
        "classes": CLASSES,
        "batch": BATCH,
        "threads": args.threads,
        "bundle": {"path": str(bb.path), "cached": bb.cached, "build_seconds": round(build_s, 1)},
        "files_vs_shards": fs,
        "ray_actors": rr,
    }
    save(args, "scale", payload, markdown(fs, rr, label, ps["precision"], args.threads))


if __name__ == "__main__":
    main()
