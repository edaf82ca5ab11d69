"""End to end: ``clipn-detect`` / ``Detector.iter_detect`` over a folder of JPEGs vs the engine alone; decoding and
preprocessing throughput per thread count; peak memory for 1k vs 10k images.

Images: generated once into the cache (``<cache>/jpegs``) at realistic sizes (640×480, 1024×768, 1280×720,
1920×1080): random smooth colour fields plus pixel noise, JPEG quality 90 — file sizes and decode costs like
photos', not like pure noise (which compresses badly and decodes slowly).

* **decode**: the runtime's own ``open_image`` + ``Preprocessor`` (the bundle's 224-px eval transform) over the
  folder in a thread pool of 1, 2 and 4 threads — images/s and source megapixels/s.
* **end to end**: ``Detector.iter_detect`` (decode threads overlapped with the engine, in-process, after one
  warm-up batch) vs ``Detector.run`` on preprocessed batches of the same size (engine only), ViT-B-16 bundle,
  fp32 and int8.
* **clipn-detect per backend**: the ``clipn-detect`` command itself over the same folder, once per backend —
  onnxruntime int8 and fp32, OpenVINO int8 and fp32 (``--device openvino``), and both on the static int8 bundle
  (``clipn-export --int8 --calibration``) where nncf is installed — each a process of its own: images/s of the
  scoring (the command's own summary line: decoding, engine, writing) and including start-up (bundle check,
  engine load or OpenVINO compile, imports).
* **memory**: peak RSS (``VmHWM`` of the ``clipn-detect`` subprocess, read by the process itself at exit) over folders of 1,000
  and 10,000 images (hard links to the 640×480 images), with the *tiny* test model's bundle so 10k images take
  under a minute: decoding dominates and the point is that memory stays flat as the count grows.

    python benchmarks/bench_detect.py --quick
    python benchmarks/bench_detect.py --smoke --out /tmp/r
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
    calibration_folder,
    default_cache_dir,
    get_bundle,
    interleaved,
    md_table,
    model_label,
    save,
    static_int8_available,
)

from clipn_runtime.fileio import atomic_write

REAL_SIZES = ((640, 480), (1024, 768), (1280, 720), (1920, 1080))
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": str(TINY_CONFIG),
        "sizes": ((320, 240), (640, 480)),
        "per_size": 4,
        "precisions": ("int8", "fp32"),
        "decode_threads": (1, 2),
        "rss_counts": (16, 48),
        "engine": Budget(1, 1, 1, 0.0),
    },
    "quick": {
        "model": VIT_B16,
        "sizes": REAL_SIZES,
        "per_size": 16,
        "precisions": ("int8", "fp32"),
        "decode_threads": (1, 2, 4),
        "rss_counts": (1000, 10000),
        "engine": Budget(1, 3, 10, 8.0),
    },
    "full": {
        "model": VIT_B16,
        "sizes": REAL_SIZES,
        "per_size": 64,
        "precisions": ("int8", "fp32"),
        "decode_threads": (1, 2, 4),
        "rss_counts": (1000, 10000),
        "engine": Budget(2, 10, 50, 30.0),
    },
}
BATCH = 16  # clipn-detect's default
#: clipn-detect per backend: (label, --device, --precision, bundle variant); each a process of its own.
CLI_BACKENDS: tuple[tuple[str, str, str, str], ...] = (
    ("onnxruntime int8", "cpu", "int8", "dynamic"),
    ("onnxruntime fp32", "cpu", "fp32", "dynamic"),
    ("OpenVINO int8", "openvino", "int8", "dynamic"),
    ("OpenVINO f32", "openvino", "fp32", "dynamic"),
    ("onnxruntime static int8", "cpu", "int8", "static"),
    ("OpenVINO static int8", "openvino", "int8", "static"),
)
#: The scoring rate in clipn-detect's summary line (clipn_runtime.output.Tally.line): "... — 4.2 images/s [...]".
_SUMMARY_SECONDS = re.compile(r" in ([0-9.]+) s — ([0-9.]+) images/s \[(.*)\]")
CLASSES = 10
RSS_SIZE = (640, 480)
JPEG_VERSION = "v1"  # bump when the generator changes


# ---- images -----------------------------------------------------------------------------------------------------


def make_jpeg(w: int, h: int, rng: np.random.Generator) -> bytes:
    """A photo-like JPEG: a random 1/16-resolution colour field upscaled (bicubic) plus σ = 6 pixel noise."""
    from PIL import Image

    field = rng.integers(0, 256, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC)
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def jpeg_folder(cache: Path, sizes: tuple[tuple[int, int], ...], per_size: int) -> list[Path]:
    """``per_size`` JPEGs of each size in ``<cache>/jpegs/v1/<W>x<H>/`` (generated once; deterministic)."""
    paths: list[Path] = []
    for w, h in sizes:
        folder = cache / "jpegs" / JPEG_VERSION / f"{w}x{h}"
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([w, h])
        for i in range(per_size):
            p = folder / f"{i:05d}.jpg"
            data = make_jpeg(w, h, rng)  # drawn even when cached, so image i is the same whatever per_size is
            if not p.is_file():
                atomic_write(p, data)
            paths.append(p)
    return paths


def linked_folder(cache: Path, sources: list[Path], n: int) -> Path:
    """A folder of ``n`` hard links cycling over ``sources`` (cheap to make; every link is a full JPEG)."""
    folder = cache / "jpegs" / JPEG_VERSION / f"links-{sources[0].parent.name}-{len(sources)}-{n}"
    done = folder / ".complete"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = folder / f"{i:06d}.jpg"
        if not p.exists():
            try:
                os.link(sources[i % len(sources)], p)
            except OSError:  # another file system: a copy does the same job
                p.write_bytes(sources[i % len(sources)].read_bytes())
    done.touch()
    return folder


def stage_folder(cache: Path, name: str, paths: list[Path]) -> Path:
    """The images ``paths`` as one folder (hard links), what a user points clipn-detect at."""
    folder = cache / "jpegs" / JPEG_VERSION / name
    if folder.exists():
        for p in folder.iterdir():
            p.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(paths):
        os.link(src, folder / f"{i:05d}_{src.parent.name}.jpg")
    return folder


# ---- measurements -------------------------------------------------------------------------------------------------


def decode_throughput(bundle: Path, paths: list[Path], threads: tuple[int, ...]) -> dict[str, Any]:
    """Decode + preprocess (the runtime's functions) in a pool of k threads; per-size ms from the 1-thread pass."""
    from PIL import Image

    from clipn_runtime.bundle import load_manifest
    from clipn_runtime.preprocess import Preprocessor, open_image

    pre = Preprocessor(load_manifest(bundle, verify_hashes=False).preprocess)
    sizes = {}
    for p in paths:
        with Image.open(p) as im:
            sizes[p] = im.size

    def one(p: Path) -> float:
        t0 = time.perf_counter()
        pre(open_image(p))
        return time.perf_counter() - t0

    for p in paths[: min(4, len(paths))]:  # warm-up: imports, page cache
        one(p)
    mpix = sum(w * h for w, h in sizes.values()) / 1e6
    rows = []
    per_size: dict[str, list[float]] = {}
    for k in threads:
        with ThreadPoolExecutor(k) as pool:
            t0 = time.perf_counter()
            each = list(pool.map(one, paths))
            wall = time.perf_counter() - t0
        if k == 1:
            for p, s in zip(paths, each, strict=True):
                per_size.setdefault("{}x{}".format(*sizes[p]), []).append(s)
        rows.append(
            {
                "threads": k,
                "images": len(paths),
                "seconds": wall,
                "images_per_s": len(paths) / wall,
                "mpix_per_s": mpix / wall,
            }
        )
    return {
        "image_size": pre.spec.image_size,
        "rows": rows,
        "per_size_ms_1_thread": {k: round(1e3 * float(np.median(v)), 2) for k, v in per_size.items()},
    }


def end_to_end(bundle: Path, paths: list[Path], precision: str, threads: int, budget: Budget) -> dict[str, Any]:
    """``Detector.iter_detect`` over ``paths`` (after one warm-up batch) vs ``Detector.run`` on the same batch size."""
    from clipn_runtime import Detector
    from clipn_runtime.preprocess import open_image

    det = Detector(bundle, device="cpu", threads=threads, precision=precision, batch_size=BATCH)
    warm = paths[:BATCH]
    list(det.iter_detect(warm))
    t0 = time.perf_counter()
    results = list(det.iter_detect(paths))
    wall = time.perf_counter() - t0
    errors = sum(not d.ok for d in results)
    batch = det.preprocessor.batch([det.preprocessor(open_image(p)) for p in warm])
    eng: Stats = interleaved({"engine": lambda: det.run(batch)}, budget)["engine"]
    e2e_ips = len(paths) / wall
    engine_ips = eng.per_s(len(batch))
    det.close()
    return {
        "precision": precision,
        "images": len(paths),
        "errors": errors,
        "batch": len(batch),
        "decode_workers": det.decode_workers,
        "onnxruntime_threads": threads,
        "e2e_seconds": wall,
        "e2e_images_per_s": e2e_ips,
        "engine_only": eng.to_dict(),
        "engine_images_per_s": engine_ips,
        "e2e_over_engine": e2e_ips / engine_ips,
    }


#: Runs clipn-detect's own entry point and, at exit, records the process's peak resident set (VmHWM). Measured in
#: the child because ``ru_maxrss`` from ``wait4`` would include this (torch-sized) parent's memory: the kernel
#: carries the forked address space's high-water mark across exec.
_CLI_WITH_HWM = """
import atexit, os, resource, sys

def _peak():
    kib = None
    try:
        with open('/proc/self/status') as fh:
            kib = next(int(l.split()[1]) for l in fh if l.startswith('VmHWM:'))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(os.environ['CLIPN_BENCH_PEAK'], 'w') as fh:
        fh.write(str(kib))

atexit.register(_peak)
sys.argv[0] = 'clipn-detect'
from clipn_runtime.cli import main
main()
"""


def run_cli(
    bundle: Path,
    folder: Path,
    out: Path,
    threads: int,
    precision: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """``clipn-detect FOLDER -e BUNDLE -o out.jsonl`` in a subprocess: wall time, the scoring time of its summary
    line, peak RSS (VmHWM), records. ``device``: ``--device`` (with ``--allow-unchecked``: benchmark bundles carry
    no parity records)."""
    args = [
        str(folder),
        "-e",
        str(bundle),
        "-o",
        str(out),
        "--overwrite",
        "--threads",
        str(threads),
        "-b",
        str(BATCH),
        "-q",
    ]
    args += ["--precision", precision] if precision else []
    args += ["--device", device, "--allow-unchecked"] if device else []
    peak_file = out.with_suffix(".peak")
    peak_file.unlink(missing_ok=True)
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "CLIPN_BENCH_PEAK": str(peak_file),
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CLI_WITH_HWM, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"clipn-detect {' '.join(args)} exited with {proc.returncode}:\n{proc.stderr}")
    lines = out.read_text(encoding="utf-8").splitlines()
    errors = sum(json.loads(line).get("error") is not None for line in lines)
    images = sum(1 for p in folder.iterdir() if p.suffix == ".jpg")
    found = [m for line in proc.stderr.splitlines() if (m := _SUMMARY_SECONDS.search(line))]
    # The line rounds seconds to 0.1 s and the rate to 0.1 images/s: from a second on, the seconds are the
    # finer measure (±0.3 % over 35 s, where the rate's rounding is ±3 % at 1.7 images/s); below it (a tiny
    # model's smoke run, 0.0 s) only the rate is there.
    seconds = float(found[-1].group(1)) if found else None
    rate = (images / seconds if seconds >= 1.0 else float(found[-1].group(2))) if seconds is not None else None
    scoring = images / rate if rate else None
    return {
        "command": "clipn-detect " + " ".join(args),
        "images": images,
        "records": len(lines),
        "errors": errors,
        "wall_seconds": wall,
        "scoring_seconds": scoring,
        "engine": found[-1].group(3) if found else None,
        "images_per_s": rate or None,
        "images_per_s_incl_startup": images / wall,
        "peak_rss_mb": int(peak_file.read_text()) / 1024,
        "summary": proc.stderr.strip().splitlines()[-2:],
    }


def cli_backends(
    bundles: dict[str, Path | None], folder: Path, out_dir: Path, threads: int
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """clipn-detect over ``folder`` once per backend of :data:`CLI_BACKENDS` (each a process of its own); the
    runs, and the backends skipped with the reason."""
    from clipn_runtime.ov_engine import openvino_importable

    runs, skipped = [], []
    for label, device, precision, variant in CLI_BACKENDS:
        why = None
        if device == "openvino" and not openvino_importable():
            why = "openvino not installed (pip install 'clipn-ood[openvino]')"
        elif bundles.get(variant) is None:
            why = static_int8_available() or f"no {variant} bundle"
        if why:
            skipped.append({"backend": label, "reason": why})
            continue
        bundle = bundles[variant]
        assert bundle is not None
        r = run_cli(bundle, folder, out_dir / "backend.jsonl", threads, precision, device)
        runs.append({"backend": label, "device": device, "precision": precision, "bundle": variant, **r})
        print(f"clipn-detect {label}: {r['images_per_s']} images/s ({r['engine']})", flush=True)
    return runs, skipped


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    ps = PRESETS[args.mode]
    cache = args.cache_dir or default_cache_dir()
    model = ps["model"]

    t0 = time.perf_counter()
    paths = jpeg_folder(cache, ps["sizes"], ps["per_size"])
    gen_s = time.perf_counter() - t0
    bb = get_bundle(None, model, CLASSES, ps["precisions"], cache)
    tiny = get_bundle(None, str(TINY_CONFIG), CLASSES, ("fp32",), cache)
    folder = stage_folder(cache, f"mixed-{args.mode}", paths)

    decode = decode_throughput(bb.path, paths, ps["decode_threads"])
    print("decode:", decode["rows"], flush=True)
    e2e = [end_to_end(bb.path, paths, p, args.threads, ps["engine"]) for p in ps["precisions"]]
    print("e2e:", [(r["precision"], r["e2e_images_per_s"], r["engine_images_per_s"]) for r in e2e], flush=True)
    out_dir = cache / "detect-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    static = None
    if static_int8_available() is None:
        from clipn_runtime.bundle import load_manifest

        size = load_manifest(bb.path, verify_hashes=False).preprocess.image_size
        calib = calibration_folder(cache, size)
        static = get_bundle(None, model, CLASSES, ("fp32", "int8"), cache, calibration=calib).path
    backends, skipped = cli_backends({"dynamic": bb.path, "static": static}, folder, out_dir, args.threads)
    cli = backends[0]
    rss_sources = [p for p in paths if p.parent.name == "{}x{}".format(*RSS_SIZE)]
    rss = []
    for n in ps["rss_counts"]:
        r = run_cli(tiny.path, linked_folder(cache, rss_sources, n), out_dir / f"rss{n}.jsonl", args.threads)
        rss.append(r)
        print(f"rss {n}:", r["peak_rss_mb"], "MB", r["images_per_s_incl_startup"], "img/s", flush=True)

    label = model_label(model)
    sizes = ["{}x{}".format(*s) for s in ps["sizes"]]
    rss_ratio = rss[-1]["peak_rss_mb"] / rss[0]["peak_rss_mb"]
    payload = {
        "model": label,
        "classes": CLASSES,
        "images": {
            "sizes": sizes,
            "per_size": ps["per_size"],
            "total": len(paths),
            "generated_in_s": round(gen_s, 2),
            "folder": str(folder),
            "bytes": sum(p.stat().st_size for p in paths),
        },
        "threads": {"onnxruntime_intra_op": args.threads},
        "bundle": {"path": str(bb.path), "cached": bb.cached},
        "decode": decode,
        "end_to_end": e2e,
        "cli": cli,
        "cli_backends": backends,
        "cli_skipped": skipped,
        "rss": {
            "model": model_label(str(TINY_CONFIG)),
            "bundle": str(tiny.path),
            "image_size": "{}x{}".format(*RSS_SIZE),
            "runs": rss,
            "ratio_last_over_first": rss_ratio,
        },
    }
    t_dec = md_table(
        ["decode + preprocess threads", "images/s", "source Mpx/s"],
        [[r["threads"], f"{r['images_per_s']:.1f}", f"{r['mpix_per_s']:.1f}"] for r in decode["rows"]],
    )
    t_size = md_table(
        ["image size", "ms/image (1 thread)"], [[k, v] for k, v in decode["per_size_ms_1_thread"].items()]
    )
    t_e2e = md_table(
        ["engine", "end-to-end images/s", "engine-only images/s", "e2e ÷ engine", "decode threads"],
        [
            [
                f"{label} {r['precision']}",
                f"{r['e2e_images_per_s']:.2f}",
                f"{r['engine_images_per_s']:.2f}",
                f"{r['e2e_over_engine']:.2f}",
                r["decode_workers"],
            ]
            for r in e2e
        ],
    )
    t_cli = md_table(
        ["clipn-detect", "images/s (scoring)", "images/s incl. start-up", "wall s", "peak RSS MB", "engine"],
        [
            [
                r["backend"],
                "—" if r["images_per_s"] is None else f"{r['images_per_s']:.2f}",
                f"{r['images_per_s_incl_startup']:.2f}",
                f"{r['wall_seconds']:.1f}",
                f"{r['peak_rss_mb']:.0f}",
                r["engine"] or "—",
            ]
            for r in backends
        ]
        + [[s["backend"], "—", "—", "—", "—", f"not run: {s['reason']}"] for s in skipped],
        align="lrrrrl",
    )
    t_rss = md_table(
        ["images", "peak RSS MB", "images/s (incl. start-up)", "records", "errors"],
        [
            [
                r["images"],
                f"{r['peak_rss_mb']:.0f}",
                f"{r['images_per_s_incl_startup']:.1f}",
                r["records"],
                r["errors"],
            ]
            for r in rss
        ],
    )
    md = (
        f"## End to end: clipn-detect over {len(paths)} generated JPEGs "
        f"({', '.join(sizes)}; {label}, {CLASSES} classes, batch {BATCH})\n\n"
        f"Decoding + preprocessing to {decode['image_size']} px (the runtime's `open_image` + `Preprocessor`):\n\n"
        f"{t_dec}\n{t_size}\n"
        f"`Detector.iter_detect` (decode threads overlapped with the engine) vs `Detector.run` on preprocessed "
        f"batches of {BATCH} (engine only), onnxruntime with {args.threads} intra-op threads, same process:\n\n{t_e2e}\n"
        f"`clipn-detect {len(paths)} JPEGs -e BUNDLE -b {BATCH} --threads {args.threads} --device D --precision P` per "
        f"backend, each a process of its own, one after the other on the same folder. *Scoring* = images ÷ the "
        f"seconds of the command's own summary line (decode, engine, writing; after the engine is loaded); *incl. "
        f"start-up* = images ÷ the process's wall time (imports, bundle hashes, engine load or OpenVINO compile — "
        f"OpenVINO's model cache makes a second start faster):\n\n{t_cli}\n"
        f"Peak RSS of `clipn-detect` (subprocess, its `VmHWM` at exit) with the tiny test model's bundle (32 px, so decoding "
        f"dominates) over folders of {RSS_SIZE[0]}×{RSS_SIZE[1]} JPEGs:\n\n{t_rss}\n"
        f"Ratio {rss[-1]['images']} vs {rss[0]['images']} images: **{rss_ratio:.2f}×** "
        "(flat memory: results stream to the file, at most a few batches are in flight).\n"
    )
    save(args, "detect", payload, md)


if __name__ == "__main__":
    main()
