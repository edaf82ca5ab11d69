"""The benchmark suite: its pieces (timing stats, budgets, roofline, images, commands) and a smoke run of
``benchmarks/run.py`` whose every result file must exist and hold numbers that agree with each other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import harness  # noqa: E402
import run as suite  # noqa: E402

# ---- pieces --------------------------------------------------------------------------------------------------------


def test_stats_median_and_p90() -> None:
    s = harness.Stats.of([0.010, 0.020, 0.030, 0.040, 0.100])
    assert s.n == 5
    assert s.median_ms == pytest.approx(30.0)
    assert s.p90_ms == pytest.approx(76.0)  # numpy's linear interpolation: 40 + 0.6 × 60
    assert s.min_ms == pytest.approx(10.0) and s.max_ms == pytest.approx(100.0)
    assert s.per_s(8) == pytest.approx(8 / 0.030)


def test_interleaved_runs_round_robin_within_budget() -> None:
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in ("a", "b")}
    stats = harness.interleaved(fns, harness.Budget(warmup=2, min_reps=3, max_reps=5, target_s=1e9))
    assert calls == ["a", "b"] * 7  # 2 warm-up rounds + max_reps timed rounds, alternating
    assert stats["a"].n == stats["b"].n == 5
    calls.clear()
    stats = harness.interleaved(fns, harness.Budget(warmup=0, min_reps=3, max_reps=5, target_s=0.0))
    assert stats["a"].n == 3 and len(calls) == 6


def _cpu(flags: str, vendor: str = "GenuineIntel", family: int = 6, model: int = 0x55) -> dict[str, str]:
    """A /proc/cpuinfo record as common._cpuinfo reads it (a fixed clock: no host state leaks in)."""
    return {"vendor_id": vendor, "cpu family": str(family), "model": str(model), "flags": flags, "cpu MHz": "2000"}


@pytest.fixture
def no_clock_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLIPN_BENCH_CPU_MHZ", raising=False)
    monkeypatch.setattr(common, "_cpufreq_max_khz", lambda: None)


@pytest.mark.usefixtures("no_clock_override")
def test_limits_follow_the_flags_and_the_core() -> None:
    ops = {
        name: common.cpu_limits(_cpu(*cpu), cores=2)["per_cycle_per_core"]
        for name, cpu in {
            # this project's test machine: Zen 1, AVX2 split into 128-bit halves, one vector integer multiply pipe
            "zen1": ("avx2 fma", "AuthenticAMD", 0x17, 0x01),
            "zen2": ("avx2 fma", "AuthenticAMD", 0x17, 0x31),
            "zen4": ("avx2 fma avx512f avx512_vnni avx512_bf16", "AuthenticAMD", 0x19, 0x11),
            "haswell": ("avx2 fma", "GenuineIntel", 6, 0x3F),
            "cascade_lake": ("avx2 fma avx512f avx512_vnni", "GenuineIntel", 6, 0x55),
            "sapphire_rapids": (
                "avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8",
                "GenuineIntel",
                6,
                0x8F,
            ),
            "sse": ("sse4_2", "GenuineIntel", 6, 0x1A),
        }.items()
    }
    assert ops["zen1"]["fp32"] == pytest.approx(16)  # 2 FMA pipes × 4 lanes × 2
    assert ops["zen1"]["int8"] == pytest.approx(ops["zen1"]["fp32"])  # one integer multiply pipe: no int8 gain
    assert ops["zen2"]["fp32"] == pytest.approx(32) and ops["zen2"]["int8"] == pytest.approx(32)
    assert ops["haswell"]["fp32"] == pytest.approx(32) and ops["haswell"]["int8"] == pytest.approx(64)
    assert ops["cascade_lake"]["fp32"] == pytest.approx(64)
    assert ops["cascade_lake"]["int8"] == pytest.approx(4 * 64)  # VNNI: 4× fp32 (Intel's 256 int8 ops/cycle)
    assert ops["zen4"]["fp32"] == pytest.approx(32)  # AVX-512 on 256-bit pipes
    assert ops["zen4"]["bf16"] == pytest.approx(64) and ops["zen4"]["int8"] == pytest.approx(128)
    assert ops["sapphire_rapids"]["bf16"] == pytest.approx(1024) and ops["sapphire_rapids"][
        "int8"
    ] == pytest.approx(2048)
    assert ops["sse"]["fp32"] == pytest.approx(8)
    for name in ("zen1", "zen2", "haswell", "cascade_lake", "sse"):
        assert ops[name]["bf16"] is None  # no bf16 arithmetic: no bf16 limit


@pytest.mark.usefixtures("no_clock_override")
def test_limit_clock_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = _cpu("avx2 fma", "AuthenticAMD", 0x17, 0x01)
    lim = common.cpu_limits(cpu, cores=2)
    assert lim["clock_mhz"] == pytest.approx(2000) and "cpu MHz" in lim["clock_source"]
    assert lim["gflops"]["fp32"] == pytest.approx(16 * 2.0 * 2)
    # a VM without cpufreq and without "cpu MHz": the TSC rate from BogoMIPS (= 2 × TSC MHz on x86 Linux)
    vm = {k: v for k, v in cpu.items() if k != "cpu MHz"} | {"bogomips": "3992.49"}
    assert common.cpu_limits(vm, cores=2)["clock_mhz"] == pytest.approx(1996.2, abs=0.1)
    monkeypatch.setattr(common, "_cpufreq_max_khz", lambda: 3_000_000)
    assert common.cpu_limits(cpu, cores=2)["clock_mhz"] == pytest.approx(3000)
    monkeypatch.setenv("CLIPN_BENCH_CPU_MHZ", "2500")
    lim = common.cpu_limits(cpu, cores=2)
    assert lim["clock_mhz"] == pytest.approx(2500) and "stated" in lim["clock_source"]
    monkeypatch.delenv("CLIPN_BENCH_CPU_MHZ")
    monkeypatch.setattr(common, "_cpufreq_max_khz", lambda: None)
    unknown = common.cpu_limits({k: v for k, v in cpu.items() if k != "cpu MHz"}, cores=2)
    assert unknown["gflops"]["fp32"] is None and "CLIPN_BENCH_CPU_MHZ" in unknown["clock_source"]


@pytest.mark.usefixtures("no_clock_override")
def test_peak_scales_with_threads_used() -> None:
    machine = {"limits": common.cpu_limits(_cpu("avx2 fma avx512f avx512_vnni"), cores=4)}
    fp32_2, how = harness.peak_gflops(2, machine)
    assert fp32_2 == pytest.approx(64 * 2.0 * 2) and "2 threads used" in how
    # never more than the cores there are
    assert harness.peak_gflops(16, machine)[0] == pytest.approx(64 * 2.0 * 4)
    assert harness.peak_gflops(2, machine, "int8")[0] == pytest.approx(4 * 64 * 2.0 * 2)
    bf16, why = harness.peak_gflops(2, machine, "bf16")
    assert bf16 is None and "no bf16" in why
    assert harness.peak_gflops(2, machine, "fp16")[0] is None  # GPU rows have no CPU limit


def test_budget_per_batch_and_default_batch() -> None:
    import bench_engine

    budgets = {1: harness.Budget(2, 5, 20, 5.0), 8: harness.Budget(1, 1, 3, 6.0)}
    assert bench_engine.budget_for(budgets, 1) == budgets[1]
    assert bench_engine.budget_for(budgets, 4) == budgets[1]
    assert bench_engine.budget_for(budgets, 32) == budgets[8]
    rows = [
        {"backend": "a", "batch": 1, "images_per_s": 10.0},
        {"backend": "a", "batch": 8, "images_per_s": 19.5},
        {"backend": "a", "batch": 32, "images_per_s": 20.0},
        {"backend": "b", "batch": 1, "images_per_s": 10.0},
        {"backend": "b", "batch": 8, "images_per_s": 30.0},
        {"backend": "b", "batch": 32, "images_per_s": 25.0},
    ]
    best = bench_engine.best_batches(rows)
    assert best["a"]["best"] == 32 and best["a"]["recommended"] == 8  # 19.5 is within 5% of 20
    assert best["b"]["best"] == 8 and best["b"]["recommended"] == 8


def test_fastest_cpu_engine_against_dynamic_int8() -> None:
    import bench_engine

    def row(be: str, batch: int, ips: float, device: str = "cpu") -> dict[str, object]:
        return {"backend": be, "what": be, "batch": batch, "images_per_s": ips, "median_ms": 1000 * batch / ips,
                "limit_fraction": ips / 100, "numeric": "int8", "device": device}  # fmt: skip

    rows = [row("ort-int8", 1, 25.0), row("ort-int8", 8, 30.0), row("ov-int8-static", 1, 40.0)]
    rows += [row("ov-int8-static", 8, 54.0), row("ov-bf16", 8, 35.0), row("ort-cuda-fp16", 8, 900.0, "cuda")]
    f = bench_engine.fastest_cpu(rows)
    assert f is not None and f["backend"] == "ov-int8-static"  # the GPU row is not a CPU engine
    assert f["speedup_vs_baseline"] == pytest.approx(1.8) and f["limit_fraction"] == pytest.approx(0.54)
    assert (f["median_ms"], f["baseline_median_ms"]) == (pytest.approx(25.0), pytest.approx(40.0))
    line = bench_engine.fastest_line(f)
    assert "1.80× onnxruntime dynamic int8" in line and "25.0 ms against 40.0 ms" in line and "54%" in line
    alone = bench_engine.fastest_cpu([row("ov-bf16", 8, 35.0)])
    assert (
        alone is not None
        and alone["baseline"] is None
        and "no onnxruntime dynamic int8" in (bench_engine.fastest_line(alone))
    )
    assert bench_engine.fastest_cpu([row("ov-bf16", 32, 35.0)]) is None


def test_openvino_profile_sums_the_layers(tiny_bundle_factory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip(
        "openvino", reason="the profile reads OpenVINO's performance counters (the openvino extra)"
    )
    import ov_profile

    bundle = tiny_bundle_factory(int8=True)
    args = [
        "--precision",
        "fp32",
        "--hint",
        "f32",
        "--batch",
        "2",
        "--threads",
        "1",
        "--calls",
        "2",
        "--gflop",
        "1",
    ]
    assert ov_profile.main([str(bundle), *args]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.count("|") == 6 and "---" not in line][1:]  # no header
    shares = [float(line.split("|")[5].strip().rstrip("%")) for line in rows]
    assert len(shares) > 3 and abs(sum(shares) - 100) < 1.0, out
    assert "matrix-multiplication layers" in out and "G(FL)OP/s" in out


def test_timed_calls_within_budget() -> None:
    calls: list[int] = []
    t = harness.timed_calls(
        lambda: calls.append(1), harness.Budget(warmup=2, min_reps=3, max_reps=5, target_s=1e9)
    )
    assert len(t) == 5 and len(calls) == 7 and all(x >= 0 for x in t)


@pytest.mark.slow  # imports open_clip (and torch): a few seconds
def test_vit_flop_count_matches_the_issue_constant(tiny_config: Path) -> None:
    """35.1 GFLOP is the documented figure for ViT-B-16 at 224 (docs/benchmarks.md); the analytic count from the config must agree."""
    import open_clip

    assert harness.vit_gflop(open_clip.get_model_config("ViT-B-16")) == pytest.approx(
        common.VIT_B16_GFLOP, rel=2e-3
    )
    # the literature's multiply-add counts, doubled: ViT-B/32 4.4 GMACs, ViT-L/14 81 GMACs
    assert harness.vit_gflop(open_clip.get_model_config("ViT-B-32")) == pytest.approx(8.8, rel=0.02)
    assert harness.vit_gflop(open_clip.get_model_config("ViT-L-14")) == pytest.approx(162.0, rel=0.02)
    tiny = json.loads(tiny_config.read_text())
    tiny_gflop = harness.vit_gflop(tiny)
    assert tiny_gflop is not None and tiny_gflop > 0
    assert harness.vit_gflop({"vision_cfg": {"layers": [3, 4, 6, 3], "width": 64}}) is None  # a ResNet tower


def test_md_table() -> None:
    assert harness.md_table(["a", "b"], [[1, 2]]) == "| a | b |\n| --- | ---: |\n| 1 | 2 |\n"


def test_jpegs_are_deterministic_and_decodable(tmp_path: Path) -> None:
    import bench_detect
    from PIL import Image

    few = bench_detect.jpeg_folder(tmp_path / "a", ((64, 48),), 2)
    more = bench_detect.jpeg_folder(tmp_path / "b", ((64, 48),), 3)
    assert [p.read_bytes() for p in few] == [p.read_bytes() for p in more[:2]]
    with Image.open(more[2]) as im:
        assert im.size == (64, 48) and im.format == "JPEG"
    links = bench_detect.linked_folder(tmp_path, more, 7)
    assert len(list(links.glob("*.jpg"))) == 7


def test_helper_scripts_write_under_out(tmp_path: Path) -> None:
    cmd = suite.step_command("textbank", "smoke", tmp_path, 2, None)
    name = Path(cmd[cmd.index("--name") + 1])
    assert name.is_absolute() and name.parent == tmp_path.resolve()
    # what common.write_result does with the name: results / f"{name}.json"
    assert (common.RESULTS / f"{name}.json").parent == tmp_path.resolve()
    assert suite.step_command("engine", "quick", tmp_path, 2, None)[2:] == [
        "--quick",
        "--out",
        str(tmp_path),
        "--threads",
        "2",
    ]


def test_run_rejects_unknown_benchmark(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--smoke", "--out", str(tmp_path), "--only", "engine,nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2 and "unknown benchmark(s) nope" in r.stderr
    assert not list(tmp_path.iterdir())


# ---- the smoke suite -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--smoke", "--out", str(out), "--cache-dir", str(out / "cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return out


def _load(out: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
    md = (out / f"{name}.md").read_text(encoding="utf-8")
    assert data["machine"]["cores"] >= 1 and data["machine"]["peak_fp32_gflops"] > 0
    assert data["machine"]["load_avg"] is not None
    assert data["versions"]["onnxruntime"] and data["versions"]["numpy"]
    assert data["command"] in md  # the header names the command that made it
    return data


@pytest.mark.slow
def test_smoke_suite_writes_every_file(smoke: Path) -> None:
    for bench in suite.BENCHES:
        _load(smoke, f"{bench}_smoke")
    summary = _load(smoke, "smoke")
    assert [s["bench"] for s in summary["steps"]] == list(suite.BENCHES)
    assert all(s["returncode"] == 0 and s["seconds"] > 0 for s in summary["steps"])
    md = (smoke / "smoke.md").read_text(encoding="utf-8")
    for heading in ("**Image engine**", "**Fused head**", "**End to end**", "**Training**", "**Text bank**"):
        assert heading in md
    assert "failed" not in md
    assert (smoke / "engine_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_smoke_engine_numbers_agree(smoke: Path) -> None:
    r = _load(smoke, "engine_smoke")
    rows = r["rows"]
    assert {x["backend"] for x in rows} >= {"pytorch", "ort-fp32", "ort-int8"}
    gflop = r["gflop_per_image"]["used"]
    for b in {x["batch"] for x in rows}:
        same = {x["backend"]: x for x in rows if x["batch"] == b}
        base, ref = same["pytorch"]["median_ms"], same["ort-fp32"]["median_ms"]
        for x in same.values():
            assert 0 < x["median_ms"] <= x["p90_ms"] <= x["max_ms"]
            assert x["n"] >= 1
            assert x["images_per_s"] == pytest.approx(b / (x["median_ms"] / 1e3), rel=1e-3)
            # ratios come from the medians of this run, not from anywhere else
            assert x["speedup_vs_pytorch"] == pytest.approx(base / x["median_ms"], rel=1e-2)
            assert x["speedup_vs_ort_fp32"] == pytest.approx(ref / x["median_ms"], rel=1e-2)
            # each row against the limit of its own numeric class
            peak = r["limit_gflops"][x["numeric"]]
            assert x["limit_gflops"] == pytest.approx(peak, rel=1e-6)
            assert x["limit_fraction"] == pytest.approx(x["images_per_s"] * gflop / peak, rel=1e-2, abs=1e-4)
    assert r["limit_gflops"]["fp32"] > 0 and r["limit_gflops"]["int8"] >= r["limit_gflops"]["fp32"]
    # every engine ran in a process of its own, and says which numeric path it ran
    engines = r["engines"]
    assert engines["ort-fp32"]["path"] == "fp32:onnxruntime" and engines["ort-int8"]["path"] == "int8:onnxruntime"
    pids = [pid for e in engines.values() for pid in e["pids"]]
    assert len(set(pids)) == len(pids) and r["pid"] not in pids  # one process per engine and round
    # the PyTorch pipeline and the fp32 engine compute the same scores
    agree = r["agreement_vs_pytorch"]
    assert agree["ort-fp32"]["max_abs_atd"] < 1e-4 and agree["ort-fp32"]["pred_agree"] == 1.0
    assert r["threads"]["torch"] == r["threads"]["onnxruntime_intra_op"] == 1  # smoke's default
    assert r["bundles"]["dynamic"]["int8"] == "onnxruntime dynamic"
    skipped = {s["backend"]: s["reason"] for s in r["skipped"]}
    backends = {x["backend"] for x in rows}
    assert not backends & set(skipped)  # a row either ran or says why not
    from clipn_runtime.ov_engine import cpu_supports_bf16, openvino_importable

    if openvino_importable():
        assert {"ov-f32", "ov-int8"} <= backends
        assert engines["ov-f32"]["path"] == "fp32:openvino:f32"
        assert agree["ov-f32"]["max_abs_atd"] < 1e-4 and agree["ov-f32"]["pred_agree"] == 1.0
        if cpu_supports_bf16():
            assert "ov-bf16" in backends and engines["ov-bf16"]["path"] == "fp32:openvino:bf16"
            assert r["limit_gflops"]["bf16"] > 0
        else:
            assert "not on this CPU" in skipped["ov-bf16"]
    else:
        assert all("openvino not installed" in skipped[n] for n in ("ov-f32", "ov-bf16", "ov-int8"))
    import harness

    why_not_static = harness.static_int8_available()
    if why_not_static is None:
        assert {"ort-int8-static"} <= backends and r["bundles"]["static"]["int8"] == "nncf static"
        # int8 quantisation of random weights: scores close, not equal (the gate's bounds are for real models)
        assert agree["ort-int8-static"]["max_abs_atd"] < 0.2
    else:
        assert skipped["ort-int8-static"] == why_not_static
    for be, best in r["best_batch"].items():
        ips = {int(k): v for k, v in best["images_per_s"].items()}
        assert ips[best["best"]] == max(ips.values()) and best["recommended"] <= best["best"]
        assert ips[best["recommended"]] >= 0.95 * ips[best["best"]], be


@pytest.mark.slow
def test_smoke_head_numbers_agree(smoke: Path) -> None:
    r = _load(smoke, "head_smoke")
    for b in {x["batch"] for x in r["rows"]}:
        graphs = {x["graph"]: x for x in r["rows"] if x["batch"] == b}
        assert set(graphs) == {"encoder", "encoder+head C=10", "encoder+head C=1000"}
        enc = graphs["encoder"]["median_ms"]
        for x in graphs.values():
            assert x["median_ms"] > 0
            assert x["delta_pct"] == pytest.approx(100 * (x["median_ms"] / enc - 1), abs=0.1)
        for x in (h for h in r["head_alone"] if h["batch"] == b):
            assert x["median_ms"] > 0
            assert x["pct_of_encoder"] == pytest.approx(100 * x["median_ms"] / enc, rel=1e-2, abs=1e-3)
    assert r["head_flop_per_image"]["1000"] == 4 * 1000 * r["embed_dim"]


@pytest.mark.slow
def test_smoke_detect_numbers_agree(smoke: Path) -> None:
    r = _load(smoke, "detect_smoke")
    total = r["images"]["total"]
    assert total > 0
    for row in r["decode"]["rows"]:
        assert row["images"] == total and row["images_per_s"] > 0
        assert row["images_per_s"] == pytest.approx(total / row["seconds"], rel=2e-2)
    for e in r["end_to_end"]:
        assert e["images"] == total and e["errors"] == 0
        assert e["e2e_over_engine"] == pytest.approx(e["e2e_images_per_s"] / e["engine_images_per_s"], rel=2e-2)
    assert r["cli"]["records"] == total and r["cli"]["errors"] == 0
    backends = {c["backend"]: c for c in r["cli_backends"]}
    assert {"onnxruntime int8", "onnxruntime fp32"} <= set(backends)
    for c in backends.values():
        assert c["records"] == total and c["errors"] == 0
        # the scoring rate comes from clipn-detect's own summary line, and excludes the start-up
        assert c["images_per_s"] is not None and c["images_per_s"] >= c["images_per_s_incl_startup"] > 0
        assert c["images_per_s"] == pytest.approx(total / c["scoring_seconds"], rel=1e-6)
        assert f"--device {c['device']}" in c["command"] and f"--precision {c['precision']}" in c["command"]
    from clipn_runtime.ov_engine import openvino_importable

    skipped = {s["backend"]: s["reason"] for s in r["cli_skipped"]}
    if openvino_importable():
        assert "OpenVINO" in backends["OpenVINO int8"]["engine"] and "OpenVINO f32" in backends
    else:
        assert "openvino not installed" in skipped["OpenVINO int8"]
    runs = r["rss"]["runs"]
    assert [x["images"] for x in runs] == [16, 48]
    for x in runs:
        assert x["records"] == x["images"] and x["errors"] == 0
        # the CLI's own peak (VmHWM), not the torch-sized parent's: a torch-free runtime stays far below 600 MB
        assert 10 < x["peak_rss_mb"] < 600
    assert r["rss"]["ratio_last_over_first"] == pytest.approx(
        runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"], rel=1e-2
    )


@pytest.mark.slow
def test_smoke_helpers_numbers_agree(smoke: Path) -> None:
    t = _load(smoke, "train_cache_smoke")
    assert t["uncached"]["samples_per_s"] > 0 and t["cached"]["samples_per_s"] > 0
    assert t["speedup"] == pytest.approx(t["cached"]["samples_per_s"] / t["uncached"]["samples_per_s"], rel=1e-6)
    b = _load(smoke, "textbank_smoke")
    assert b["seconds"]["fast"] > 0 and b["seconds"]["naive"] > 0
    assert b["max_abs_diff"] < 1e-4
    assert np.isfinite(b["speedup"]) and b["speedup"] > 0
