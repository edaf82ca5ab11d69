"""What every benchmark records beside its numbers: the machine, the library versions, the command.

Peak-FLOP assumption (stated in every result): fp32 FLOP/cycle/core from the widest FMA the CPU flags show —
AVX-512 with 2 FMA units: 2 × 16 lanes × 2 (mul+add) = 64; AVX2/FMA: 2 × 8 × 2 = 32; otherwise 8 — times the
nominal clock (``cpu MHz`` of /proc/cpuinfo) times the cores this process may use. Turbo, AMX/bf16 and int8
(VNNI) paths are ignored, so fractions above 1 are possible for those backends.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
VIT_B16_GFLOP = 35.1  # per 224-px image, 2 FLOP per multiply-add (harness.vit_gflop's count, rounded)


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                info.setdefault(k, v)
    except OSError:
        pass
    return info


def _gpu() -> str | None:
    if shutil.which("nvidia-smi"):
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    return None


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if "avx512f" in flags:
        per_cycle, isa = 64, "AVX-512 (2 FMA units assumed)"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, isa = 32, "AVX2+FMA (2 FMA units assumed)"
    else:
        per_cycle, isa = 8, "SSE"
    mhz = float(cpu.get("cpu MHz", "0") or 0)
    return {
        "cpu": cpu.get("model name", platform.processor()),
        "cores": cores,
        "clock_mhz": mhz,
        "isa": isa,
        "notable_flags": sorted(
            flags & {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}
        ),
        "peak_fp32_gflops": round(per_cycle * mhz / 1000 * cores, 1),
        "peak_assumption": f"{per_cycle} fp32 FLOP/cycle/core ({isa}) × {mhz:.0f} MHz × {cores} cores",
        "gpu": _gpu(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def versions() -> dict[str, str | None]:
    pkgs = ("clipn-ood", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "open_clip_torch", "pillow")
    return {p: _version(p) for p in pkgs}


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_result(name: str, payload: dict[str, Any], markdown: str, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``<name>.json`` (machine + versions + command + payload) and ``<name>.md`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    m = machine_info()
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command(),
        "machine": m,
        "versions": versions(),
    }
    j = out_dir / f"{name}.json"
    j.write_text(json.dumps({**meta, **payload}, indent=2, default=str) + "\n", encoding="utf-8")
    header = (
        f"_{meta['date']} · `{meta['command']}` · {m['cpu']}, {m['cores']} cores @ {m['clock_mhz']:.0f} MHz, "
        f"{m['isa']}; GPU: {m['gpu'] or 'none'}; load avg at start {m['load_avg']}_\n\n"
    )
    md_path = out_dir / f"{name}.md"
    md_path.write_text(header + markdown, encoding="utf-8")
    return j, md_path
