"""What the engine, head and detect benchmarks share: modes, the model and bundle they time, the timing loop.

* Models are random-init (no download here; the cost of a forward pass does not depend on the weights' values),
  seeded, so the PyTorch model a benchmark times and the bundle exported from it hold the same weights.
* Bundles are exported once with :func:`clipn_export.exporter.export_bundle` and cached under
  ``<cache>/bundles/<key>`` — the key covers the model, classes, precisions and the exporter's source code, so a
  changed exporter never serves a stale bundle. The class banks use one template per class: what the engine
  computes (and costs) does not depend on how the banks were made.
* :func:`interleaved` times several candidates round-robin (A, B, C, A, B, C, ...), so a change of background
  load hits all of them alike and the ratios between them stay meaningful; warm-up calls are not recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import logging
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, VIT_B16_GFLOP, cpu_limits, write_result  # noqa: E402

log = logging.getLogger("benchmarks")

MODES = ("smoke", "quick", "full")
TINY_CONFIG = ROOT / "tests" / "data" / "tiny-clip.json"
#: The model every real-size benchmark uses (the paper's backbone).
VIT_B16 = "ViT-B-16"
#: One template: the engine's cost does not depend on how the class banks were made (see the module docstring).
BENCH_TEMPLATE = "a photo of a {}."


def default_cache_dir() -> Path:
    """``bench/`` in the user cache (:func:`clipn_runtime.cache.cache_root`): generated images and bundles."""
    from clipn_runtime.cache import cache_root

    return cache_root() / "bench"


def model_label(model: str) -> str:
    return Path(model).stem if model.endswith(".json") else model


def add_common_args(ap: Any) -> None:
    """``--smoke/--quick/--full``, ``--out``, ``--cache-dir``, ``--threads``, ``--name`` (every bench_*.py)."""
    g = ap.add_mutually_exclusive_group()
    for m in MODES:
        g.add_argument(f"--{m}", dest="mode", action="store_const", const=m, help=f"{m} mode")
    ap.set_defaults(mode="quick")
    ap.add_argument("--out", type=Path, default=RESULTS, help="result directory (default: benchmarks/results)")
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="generated images and exported bundles (default: bench/ in $CLIPN_CACHE, else ~/.cache/clipn-ood)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (default: 2)")
    ap.add_argument("--name", default=None, help="result file stem (default: <bench>_<mode>)")


# ---- timing ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Latency of one call (seconds → reported in ms) over ``n`` timed calls after the warm-up."""

    n: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        a = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(
            n=int(a.size),
            median_ms=float(np.median(a)),
            p90_ms=float(np.percentile(a, 90)),
            mean_ms=float(a.mean()),
            min_ms=float(a.min()),
            max_ms=float(a.max()),
        )

    def per_s(self, items: int) -> float:
        """Items per second at the median latency."""
        return items / (self.median_ms / 1e3)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Budget:
    """How many timed calls per candidate: at least ``min_reps``, then as many as fit ``target_s`` (all
    candidates together, estimated from the warm-up), at most ``max_reps``."""

    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 20
    target_s: float = 10.0


def _reps(budget: Budget, per_round_s: float) -> int:
    """Timed calls per candidate: as many rounds as fit ``target_s``, within [min_reps, max_reps]."""
    return int(min(budget.max_reps, max(budget.min_reps, budget.target_s // (per_round_s or 1e-3))))


def interleaved(fns: Mapping[str, Callable[[], object]], budget: Budget) -> dict[str, Stats]:
    """Time every candidate round-robin; returns their :class:`Stats` (warm-up calls excluded)."""
    warm = dict.fromkeys(fns, 0.0)
    for _ in range(budget.warmup):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            warm[name] = time.perf_counter() - t0
    reps = _reps(budget, sum(warm.values()))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: Stats.of(t) for name, t in times.items()}


def timed_calls(fn: Callable[[], object], budget: Budget) -> list[float]:
    """Seconds of each timed call of one candidate (warm-up calls excluded): what a benchmark worker process
    reports, so that the parent can pool the calls of several rounds before taking medians."""
    warm = 0.0
    for _ in range(budget.warmup):
        t0 = time.perf_counter()
        fn()
        warm = time.perf_counter() - t0
    out = []
    for _ in range(_reps(budget, warm)):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ---- the CPU's limits, the model's FLOP -----------------------------------------------------------------------


#: The numeric classes the CPU limits cover (common.cpu_limits); GPU rows (fp16) have none.
LIMIT_CLASSES = ("fp32", "bf16", "int8")


def peak_gflops(
    threads: int, machine: Mapping[str, Any] | None = None, numeric: str = "fp32"
) -> tuple[float | None, str]:
    """The ``numeric`` (fp32/bf16/int8) limit of the CPU for ``threads`` cores (per core × min(threads, cores))
    from common.cpu_limits, and how it was derived; None where the CPU has no such arithmetic (bf16 without
    AVX-512 BF16/AMX) or the class has no CPU limit."""
    lim = machine["limits"] if machine is not None else cpu_limits()  # not machine_info(): no nvidia-smi per row
    cores = max(1, int(lim["cores"]))
    used = max(1, min(threads, cores))
    per_core = lim["per_core_gflops"].get(numeric) if numeric in LIMIT_CLASSES else None
    if per_core is None:
        return None, f"no {numeric} limit: {lim['how'].get(numeric, 'not a CPU numeric class')}"
    how = (
        f"{lim['how'][numeric]} × {lim['clock_mhz']:.0f} MHz ({lim['clock_source']}) = {per_core:.1f} per core "
        f"× {used} threads used"
    )
    return float(per_core) * used, how


def vit_gflop(model_cfg: Mapping[str, Any]) -> float | None:
    """GFLOP (2 per multiply-add) of one image through an open_clip ViT image tower, from its config.

    Per block with T tokens and width W: QKV and output projections 4·T·W², MLP 2·T·W·(ratio·W), attention
    products 2·T²·W; plus the patch embedding and the final projection. ViT-B-16 at 224 gives 35.13 (the rounded
    35.1). Normalisations, softmax and GELU are left out (well under 1%). ``None`` for non-ViT towers.
    """
    v = model_cfg.get("vision_cfg", {})
    if not isinstance(v.get("layers"), int) or "patch_size" not in v:
        return None
    size = v.get("image_size", 224)
    size = size if isinstance(size, int) else int(size[0])
    w, layers, p = int(v["width"]), int(v["layers"]), int(v["patch_size"])
    patches = (size // p) ** 2
    t = patches + 1
    mlp = float(v.get("mlp_ratio", 4.0))
    block = 4 * t * w * w + 2 * t * w * int(mlp * w) + 2 * t * t * w
    macs = layers * block + patches * 3 * p * p * w + w * int(model_cfg.get("embed_dim", w))
    return 2 * macs / 1e9


def nominal_gflop(model: str, model_cfg: Mapping[str, Any]) -> float | None:
    """The FLOP count used for the roofline: the rounded 35.1 GFLOP for ViT-B-16, :func:`vit_gflop` otherwise."""
    return VIT_B16_GFLOP if model == VIT_B16 else vit_gflop(model_cfg)


# ---- models and bundles ------------------------------------------------------------------------------------------


def make_model(model: str) -> Any:
    """A seeded random-init CLIPN (``clipn_train.factory.LoadedCLIPN``), in eval mode.

    The no tower's prompt gets small seeded noise: an untrained no tower equals the yes tower, which would make
    every "no" probability exactly 0.5 and the correctness check between backends say nothing.
    """
    import torch

    from clipn_train.factory import create_clipn

    torch.manual_seed(0)
    loaded = create_clipn(model)
    g = torch.Generator().manual_seed(1)
    prompt = loaded.model.prompt_no
    assert prompt is not None, "create_clipn's default variant learns prompts"
    with torch.no_grad():
        prompt.copy_(torch.randn(prompt.shape, generator=g) * 0.02)
    loaded.model.eval()
    return loaded


def bench_classes(n: int) -> list[str]:
    from clipn_runtime.classes import load_classes

    names = load_classes("imagenet")
    if n <= len(names):
        return list(names[:n])
    return [*names, *(f"class {i}" for i in range(len(names), n))]


def _source_hash() -> str:
    h = hashlib.sha256()
    for folder in ("clipn_export", "clipn_train", "clipn_runtime"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            h.update(p.relative_to(ROOT).as_posix().encode())
            h.update(p.read_bytes())
    for pkg in ("torch", "onnx", "onnxruntime", "open_clip_torch", "onnxconverter-common"):
        with contextlib.suppress(md.PackageNotFoundError):
            h.update(f"{pkg}={md.version(pkg)}".encode())
    return h.hexdigest()


def bundle_key(
    model: str, classes: int, precisions: Sequence[str], tensorrt: bool = False, calibration: Path | None = None
) -> str:
    spec = Path(model).read_text() if model.endswith(".json") else model
    parts = sorted(precisions) + (["trt"] if tensorrt else []) + (["static"] if calibration is not None else [])
    h = hashlib.sha256(f"{spec}|{classes}|{parts}|{BENCH_TEMPLATE}|{_source_hash()}".encode())
    if calibration is not None:
        for f in sorted(calibration.iterdir()):
            h.update(f.name.encode() + f.read_bytes())
        with contextlib.suppress(md.PackageNotFoundError):
            h.update(f"nncf={md.version('nncf')}".encode())
    return f"{model_label(model)}-c{classes}-{'-'.join(parts)}-{h.hexdigest()[:12]}"


#: Static int8 calibrates on this many images: clipn-export's minimum (clipn_export.int8_calibration's
#: MIN_CALIBRATION_IMAGES). Their content only sets the quantisation ranges, not the cost of a forward pass.
CALIBRATION_IMAGES = 16
CALIBRATION_VERSION = "v1"  # bump when the generator changes


def static_int8_available() -> str | None:
    """None when a static int8 bundle can be exported here, else why not (recorded as the rows' skip reason)."""
    import importlib.util

    try:
        from clipn_export.precision import to_int8_static  # noqa: F401  # the exporter's static path
    except ImportError as e:
        return f"this exporter has no static int8 path ({e})"
    if importlib.util.find_spec("nncf") is None:
        return "nncf not installed (pip install nncf): static int8 rows skipped"
    return None


def calibration_folder(cache_dir: Path, size: int, n: int = CALIBRATION_IMAGES) -> Path:
    """``n`` generated PNGs (clipn_export.parity's deterministic crops, another seed than the timed batch) in
    ``<cache>/calibration/``: what ``clipn-export --int8 --calibration DIR`` reads for the static int8 bundle."""
    from PIL import Image

    from clipn_export.parity import parity_images

    folder = cache_dir / "calibration" / f"{CALIBRATION_VERSION}-{size}px-{n}"
    done = folder / ".complete"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(parity_images(n, size, seed=1)):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    done.touch()
    return folder


@dataclass(frozen=True)
class BenchBundle:
    path: Path
    precisions: tuple[str, ...]
    export_seconds: float | None  # None: taken from the cache
    cached: bool


def get_bundle(
    loaded: Any | None,
    model: str,
    classes: int,
    precisions: Sequence[str],
    cache_dir: Path,
    *,
    tensorrt: bool = False,
    calibration: Path | None = None,
) -> BenchBundle:
    """The bundle of :func:`make_model` (``model``) for ``classes`` ImageNet classes with the engines
    ``precisions`` (fp32 always; ``tensorrt`` adds a native plan, needs TensorRT and a GPU), exported once and
    cached. ``calibration``: a folder of images that makes the int8 engine static int8 (``clipn-export --int8
    --calibration DIR``; see :func:`calibration_folder`). ``loaded``: the model if already built."""
    from clipn_export.exporter import export_bundle
    from clipn_export.parity import ParityOptions
    from clipn_runtime.bundle import MANIFEST_NAME
    from clipn_runtime.prompts import PromptSet

    extra = sorted(set(precisions) - {"fp32"})
    path = cache_dir / "bundles" / bundle_key(model, classes, ["fp32", *extra], tensorrt, calibration)
    if (path / MANIFEST_NAME).is_file():
        return BenchBundle(path, ("fp32", *extra), None, True)
    # Bundles of older exporter code for the same model and engines are stale (and ~0.5 GB each for ViT-B-16).
    stem = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{stem}-*"):
        if old.is_dir() and old.name.rsplit("-", 1)[0] == stem:
            shutil.rmtree(old, ignore_errors=True)
    loaded = loaded if loaded is not None else make_model(model)
    t0 = time.perf_counter()
    export_bundle(
        loaded,
        bench_classes(classes),
        path,
        prompts=PromptSet("bench", (BENCH_TEMPLATE,)),
        fp16="fp16" in extra,
        int8="int8" in extra,
        calibration=(str(calibration),) if calibration is not None else (),
        calibration_size=CALIBRATION_IMAGES,
        tensorrt=tensorrt,
        # The same head as the PyTorch pipeline it is timed against (which has no one-prompt MCM bank).
        mcm_bank=False,
        # The gate's int8 rank test is meaningless on random weights; benchmarks check agreement themselves.
        parity=ParityOptions(enabled=False),
        overwrite=True,
        progress=False,
    )
    return BenchBundle(path, ("fp32", *extra), time.perf_counter() - t0, False)


# ---- GPU presence ---------------------------------------------------------------------------------------------


def gpu_backends() -> tuple[dict[str, bool], list[str]]:
    """What GPU paths this machine offers, and a note per missing one (printed in the results)."""
    notes: list[str] = []
    have = {"torch_cuda": False, "ort_cuda": False, "ort_tensorrt": False, "tensorrt": False}
    try:
        import torch

        have["torch_cuda"] = bool(torch.cuda.is_available())
    except ImportError:
        pass
    from clipn_runtime.engine import CUDA_EP, TRT_EP, available_providers, tensorrt_importable

    eps = available_providers()
    have["ort_cuda"] = CUDA_EP in eps and have["torch_cuda"]
    have["ort_tensorrt"] = TRT_EP in eps and have["torch_cuda"]
    have["tensorrt"] = tensorrt_importable() and have["torch_cuda"]
    if not have["torch_cuda"]:
        notes.append("no CUDA GPU visible: fp16 and TensorRT rows skipped (CPU-only machine)")
    else:
        if not have["ort_cuda"]:
            notes.append(f"onnxruntime has no {CUDA_EP} (install onnxruntime-gpu): ORT GPU rows skipped")
        if not have["tensorrt"]:
            notes.append("tensorrt/pycuda not installed: native TensorRT rows skipped")
    return have, notes


# ---- output -------------------------------------------------------------------------------------------------------


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A Markdown table; ``align`` is one char per column (``l``/``r``), default: first left, rest right."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def result_name(args: Any, bench: str) -> str:
    return str(args.name or f"{bench}_{args.mode}")


def save(args: Any, bench: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """common.write_result under ``args.out``, plus the mode; prints the Markdown."""
    payload = {"benchmark": bench, "mode": args.mode, **payload}
    j, m = write_result(result_name(args, bench), payload, markdown, out_dir=args.out)
    print(m.read_text(encoding="utf-8"))
    print(f"wrote {j} and {m}")
    return j, m


def set_threads(threads: int) -> None:
    """torch's intra-op threads (onnxruntime gets the same number per session)."""
    import torch

    torch.set_num_threads(threads)
