"""What every benchmark records beside its numbers: the machine, the library versions, the command — and the
arithmetic limits of the CPU in use (:func:`cpu_limits`), which the engine benchmark divides its throughput by.

The limits are peak operations per second for the three numeric classes a CPU engine runs: fp32, bf16 and int8
(one multiply-add = 2 operations, as in the model's GFLOP count). Each is (operations per cycle per core, from the
core's vector datapath and the instructions its flags offer) × clock × cores used; the per-cycle assumptions and
their sources are the comments of :func:`core_resources` and :func:`per_cycle`. Turbo above the clock used,
memory bandwidth and the non-GEMM work are outside the model, so a fraction of a limit is a yardstick, not a law.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
#: The load average when the benchmark process started (this module is imported first thing): a long benchmark
#: records it beside the load at the end.
LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None
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


@dataclass(frozen=True)
class Core:
    """What one core can issue per cycle for GEMM work: its SIMD datapath width and how many pipes do FMAs and
    vector integer multiplies (``vpmaddubsw``/``vpmaddwd``/``vpdpbusd``)."""

    name: str
    vector_bits: int
    fma_pipes: int
    imul_pipes: int
    source: str


def core_resources(vendor: str, family: int, model: int, flags: set[str]) -> Core:
    """The datapath of this core: a few x86 cores are narrower than their flags say, the rest follow the flags.

    Flags alone would call every AVX2 core "2 × 256-bit FMA" and every AVX-512 core "2 × 512-bit"; AMD's cores
    before Zen 5 are not, and the difference is 2-4× on the limit.
    """
    widest = 512 if "avx512f" in flags else 256 if {"avx2", "fma"} <= flags else 128
    if vendor in ("AuthenticAMD", "HygonGenuine") and family in (0x17, 0x18):
        # Zen/Zen+ (17h models < 30h; Hygon Dhyana 18h is a Zen): four 128-bit FP pipes, a 256-bit AVX op is
        # split into two 128-bit halves, FMA on two pipes, vector integer multiply on one (FP0). Zen 2 (17h
        # models ≥ 30h): the same pipes at 256 bits. Sources: AMD, "Software Optimization Guide for AMD Family
        # 17h Processors" (pub. 55723), its floating-point unit section, as encoded in LLVM's
        # X86ScheduleZnver1.td / X86ScheduleZnver2.td (WriteVecIMul on FPU0 only, WriteFMA on two pipes).
        zen2 = family == 0x17 and model >= 0x30
        bits = 256 if zen2 else 128
        name = "AMD Zen 2" if zen2 else "AMD Zen/Zen+"
        return Core(name, bits, 2, 1, "AMD SOG family 17h; LLVM X86ScheduleZnver1/2.td")
    if vendor == "AuthenticAMD" and family == 0x19:
        # Zen 3 and Zen 4: 256-bit pipes (Zen 4 runs AVX-512 as two 256-bit halves), FMA on two pipes, vector
        # integer multiply on two (FP0, FP3). Sources: AMD, "Software Optimization Guide for AMD Family 19h
        # Processors" (pub. 56665), §2.11.1, as encoded in LLVM's X86ScheduleZnver3.td / X86ScheduleZnver4.td
        # (FPFMul01 and FPVMul01 groups; a ZMM op is two µops on Zen 4).
        return Core("AMD Zen 3/Zen 4", 256, 2, 2, "AMD SOG family 19h §2.11.1; LLVM X86ScheduleZnver3/4.td")
    # Everything else (Intel since Haswell, AMD Zen 5 = family 1Ah with a 512-bit datapath on server and desktop
    # parts): the widest ISA the flags show, two FMA pipes and two vector integer multiply pipes (Intel: ports
    # 0 and 1, or 0 and 5 for 512-bit). One-FMA-unit parts (Xeon Bronze/Silver and many client AVX-512 chips,
    # Zen 5 mobile) are overestimated 2× by this: their fractions read low.
    fma = 2 if "fma" in flags else 1
    return Core(f"{vendor or 'unknown vendor'} (from the flags)", widest, fma, 2, "the CPU flags (see per_cycle)")


#: Intel Advanced Matrix Extensions per core and cycle (Sapphire Rapids): 1024 bf16 and 2048 int8 operations —
#: 16× and 32× the 64 fp32 FLOP of two 512-bit FMA units. Source: Intel Architecture Day 2021, "Sapphire Rapids"
#: (AMX: 2048 int8 / 1024 bf16 ops per cycle per core, vs 256 int8 ops with AVX-512 VNNI).
AMX_BF16_PER_CYCLE = 1024.0
AMX_INT8_PER_CYCLE = 2048.0


def per_cycle(core: Core, flags: set[str]) -> tuple[dict[str, float | None], dict[str, str]]:
    """Operations per cycle per core for fp32, bf16 and int8 GEMMs (None: no native path), and how each was
    derived. One multiply-add counts 2 operations throughout."""
    lanes32 = core.vector_bits // 32
    how: dict[str, str] = {}
    if "fma" in flags:
        # one FMA per pipe per cycle on every 32-bit lane
        fp32 = float(core.fma_pipes * lanes32 * 2)
        how["fp32"] = f"{core.fma_pipes} FMA pipes × {lanes32} fp32 lanes ({core.vector_bits}-bit) × 2"
    else:
        # SSE without FMA: one multiply and one add per cycle on 4 lanes
        fp32 = float(4 * 2)
        how["fp32"] = "SSE, no FMA: 4 lanes × (1 mul + 1 add)"
    bf16: float | None = None
    if "amx_bf16" in flags:
        bf16 = AMX_BF16_PER_CYCLE
        how["bf16"] = "AMX: 1024 bf16 FLOP/cycle (Intel Architecture Day 2021)"
    elif "avx512_bf16" in flags:
        # vdpbf16ps: two bf16 products per fp32 lane, accumulated in fp32, on the FMA pipes (Intel SDM vol. 2)
        bf16 = 2 * fp32
        how["bf16"] = "AVX-512 BF16 vdpbf16ps: 2 bf16 multiply-adds per fp32 lane = 2 × fp32"
    else:
        how["bf16"] = "no bf16 arithmetic (no avx512_bf16/amx_bf16 flag): bf16 would run as fp32"
    bytes_ = core.vector_bits // 8
    if "amx_int8" in flags:
        int8 = AMX_INT8_PER_CYCLE
        how["int8"] = "AMX: 2048 int8 ops/cycle (Intel Architecture Day 2021)"
    elif flags & {"avx512_vnni", "avx_vnni"}:
        # vpdpbusd: 4 u8×s8 multiply-adds per 32-bit lane into an int32 accumulator, one instruction, on the
        # integer multiply pipes. Source: Intel, "Introduction to Intel Deep Learning Boost on Second Generation
        # Intel Xeon Scalable Processors" (2019): one vpdpbusd replaces vpmaddubsw + vpmaddwd + vpaddd.
        int8 = float(core.imul_pipes * bytes_ * 2)
        how["int8"] = f"VNNI vpdpbusd: {core.imul_pipes} pipes × {bytes_} u8×s8 multiply-adds × 2"
    else:
        # Without VNNI an int8 GEMM needs two multiply µops per vector of u8×s8 products: vpmaddubsw (u8×s8 →
        # pairwise s16) then vpmaddwd (s16 pairs → s32), plus an add (same Intel paper). With two multiply pipes
        # that is 2× the fp32 rate (Intel, Zen 3/4); with one (Zen 1/2) it equals the fp32 rate.
        macs = core.imul_pipes * bytes_ / 2
        int8 = macs * 2
        how["int8"] = (
            f"no VNNI: vpmaddubsw + vpmaddwd, {core.imul_pipes} integer multiply pipe(s) × {bytes_} u8×s8 "
            "multiply-adds ÷ 2 µops × 2"
        )
    return {"fp32": fp32, "bf16": bf16, "int8": int8}, how


def _cpufreq_max_khz() -> int | None:
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text().strip())
    except (OSError, ValueError):
        return None


def _clock(cpu: dict[str, str]) -> tuple[float, str]:
    """The clock the limits use, and where it came from: ``$CLIPN_BENCH_CPU_MHZ`` (a stated assumption), the
    cpufreq maximum (lscpu's "CPU max MHz"), ``cpu MHz`` of /proc/cpuinfo, or the TSC rate from BogoMIPS."""
    env = os.environ.get("CLIPN_BENCH_CPU_MHZ")
    if env:
        return float(env), "$CLIPN_BENCH_CPU_MHZ (stated)"
    khz = _cpufreq_max_khz()
    if khz:
        return khz / 1000, "cpufreq maximum (lscpu's CPU max MHz)"
    if float(cpu.get("cpu MHz", "0") or 0) > 0:
        return float(cpu["cpu MHz"]), "cpu MHz in /proc/cpuinfo"
    if float(cpu.get("bogomips", "0") or 0) > 0:
        # x86 Linux presets loops_per_jiffy from the TSC (arch/x86/kernel/tsc.c: lpj = tsc_khz·1000/HZ) and prints
        # BogoMIPS = lpj·HZ/500000 (init/calibrate.c), i.e. 2 × the TSC rate in MHz: the nominal clock.
        return float(cpu["bogomips"]) / 2, "BogoMIPS ÷ 2 = the TSC rate (no cpufreq, no cpu MHz: a VM)"
    return 0.0, "unknown (set CLIPN_BENCH_CPU_MHZ)"


def cpu_limits(cpu: dict[str, str] | None = None, cores: int | None = None) -> dict[str, Any]:
    """Peak GFLOP/s (int8: GOP/s) of the CPU in use for fp32, bf16 and int8, over ``cores`` cores (default: those
    this process may use), with the assumptions: the one definition every benchmark's limit comes from."""
    cpu = _cpuinfo() if cpu is None else cpu
    flags = set(cpu.get("flags", "").split())
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def num(key: str) -> int:
        try:
            return int(cpu.get(key, "0"), 0)
        except ValueError:
            return 0

    core = core_resources(cpu.get("vendor_id", ""), num("cpu family"), num("model"), flags)
    ops, how = per_cycle(core, flags)
    mhz, clock_source = _clock(cpu)
    per_core = {k: (None if v is None or mhz <= 0 else round(v * mhz / 1000, 2)) for k, v in ops.items()}
    return {
        "core": core.name,
        "vector_bits": core.vector_bits,
        "fma_pipes": core.fma_pipes,
        "imul_pipes": core.imul_pipes,
        "source": core.source,
        "clock_mhz": round(mhz, 1),
        "clock_source": clock_source,
        "cores": cores,
        "per_cycle_per_core": ops,
        "how": how,
        "per_core_gflops": per_core,
        "gflops": {k: (None if v is None else round(v * cores, 1)) for k, v in per_core.items()},
    }


def machine_info() -> dict[str, Any]:
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    limits = cpu_limits(cpu)
    isa = "AVX-512" if "avx512f" in flags else "AVX2+FMA" if {"avx2", "fma"} <= flags else "SSE"
    return {
        "cpu": cpu.get("model name", platform.processor()),
        "cores": limits["cores"],
        "clock_mhz": limits["clock_mhz"],
        "isa": f"{isa}, {limits['vector_bits']}-bit datapath ({limits['core']})",
        "notable_flags": sorted(
            flags & {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}
        ),
        "limits": limits,
        "peak_fp32_gflops": limits["gflops"]["fp32"],
        "peak_assumption": f"{limits['how']['fp32']} × {limits['clock_mhz']:.0f} MHz ({limits['clock_source']}) "
        f"× {limits['cores']} cores",
        "gpu": _gpu(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "load_avg_start": LOAD_AT_START,
    }


def versions() -> dict[str, str | None]:
    pkgs = (
        "clipn-ood",
        "numpy",
        "onnxruntime",
        "onnxruntime-gpu",
        "openvino",
        "nncf",
        "onnx",
        "torch",
        "open_clip_torch",
        "pillow",
    )
    return {p: _version(p) for p in pkgs}


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def _load(avg: Any) -> str:
    return "unknown" if avg is None else " / ".join(f"{x:.2f}" for x in avg)


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
        f"{m['isa']}; GPU: {m['gpu'] or 'none'}; load avg (1, 5, 15 min) at start {_load(m['load_avg_start'])}, "
        f"at the end {_load(m['load_avg'])}_\n\n"
    )
    md_path = out_dir / f"{name}.md"
    md_path.write_text(header + markdown, encoding="utf-8")
    return j, md_path
