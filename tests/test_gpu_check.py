"""benchmarks/gpu_check.py: the CPU dry run (``--device cpu --quick``) prints one table and writes JSON with
real numbers; an impossible tolerance fails with exit 1; no CUDA device and bad options are exit 2, one line.

The dry run compares amp (bf16 autocast on a CPU) with fp32 for real, so its reduced-precision rows measure
non-zero differences; the device-vs-CPU rows compare the CPU with itself."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CHECKS = ("train", "banks", "fp16", "latency")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # One torch thread: tiny models on a shared 2-core machine run faster without spin-waiting (conftest.py).
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of the one Markdown table in ``stdout`` (header and separator left out)."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert lines[0] == "| check | value | tolerance / limit | result |", lines[0]
    assert sum(line.startswith("| check |") for line in lines) == 1, "more than one table"
    return [[c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")] for line in lines[2:]]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path_factory.mktemp("gpu_check") / "result.json"
    proc = run("--device", "cpu", "--quick", "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text(encoding="utf-8"))


def test_dry_run_prints_the_header_and_one_table_of_passed_checks(
    dry_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    proc, result = dry_run
    out = proc.stdout
    for label in ("command: ", "GPU: none", "torch ", "CPU: ", "needs: "):
        assert re.search(rf"^{re.escape(label)}", out, re.MULTILINE), label
    assert "--device cpu --quick" in out
    rows = table_rows(out)
    assert [r[0] for r in rows] == [r["check"] for r in result["rows"]]
    assert all(r[3] == "pass" for r in rows), [r for r in rows if r[3] != "pass"]
    assert f"PASS: all {len(rows)} checks passed" in out
    # every check ran: training, bank + two caches, the half-precision tower, the head and 3 batches × 2 latencies
    names = " ".join(r[0] for r in rows)
    for part in (
        "train",
        "text bank",
        "feature cache fp32",
        "feature cache amp",
        "min cosine",
        "rank correlation",
    ):
        assert part in names, part
    assert sum("latency" in r[0] for r in rows) == 6
    assert proc.stderr.count("INFO") == 0, proc.stderr  # the trainer's INFO lines go to its out.log only


def test_dry_run_json_holds_real_numbers(dry_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    _, result = dry_run
    assert result["passed"] is True and result["exit_code"] == 0 and result["device"] == "cpu"
    assert result["gpu"] is None and result["torch"] and result["cpu"]
    rows = {r["check"]: r for r in result["rows"]}

    def find(*words: str) -> dict[str, Any]:
        hits = [r for name, r in rows.items() if all(w in name for w in words)]
        assert len(hits) == 1, (words, list(rows))
        return hits[0]

    train = find("train", "max |Δ loss|")["details"]
    losses = train["amp"]["losses"] + train["fp32_cpu"]["losses"]
    assert len(losses) == 2 * result["plan"]["train_steps"] and all(math.isfinite(x) for x in losses)
    # the first step sees an untrained no tower: p_no = 0.5 for every pair, so ln 2 + ln 2 + TSO(g = g_no), halved
    assert train["fp32_cpu"]["losses"][0] == pytest.approx(0.5 * (2 * math.log(2) + 2 - math.sqrt(1e-4)), abs=1e-5)
    assert train["fp32_cpu"]["losses"][-1] < train["fp32_cpu"]["losses"][0]  # the steps did train
    # bf16 against fp32 for real: non-zero differences, well inside the tolerances
    for row in (find("train", "max |Δ loss|"), find("max ‖Δ‖₂"), find("max |Δ ATD|")):
        assert 0 < row["measured"] <= row["limit_value"], row
    assert 0.999 < find("min cosine")["measured"] < 1.0
    # the CPU compared with itself: identical
    assert find("text bank")["measured"] == 0.0
    cache = find("feature cache fp32")["details"]
    assert cache["image"] == cache["text"] == 0.0 and cache["tokens_identical"] is True
    latency = [r for r in result["rows"] if "latency" in r["check"]]
    assert sorted((r["details"]["batch"], r["details"]["precision"]) for r in latency) == sorted(
        (b, p) for b in (1, 8, 64) for p in ("fp32", "amp")
    )
    for r in latency:
        d = r["details"]
        assert 0 < d["median_ms"] <= d["p90_ms"] and d["images_per_s"] == pytest.approx(
            d["batch"] / d["median_ms"] * 1e3
        )


def test_an_impossible_tolerance_fails_with_exit_1(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = run(
        "--device", "cpu", "--quick", "--only", "fp16", "--tol-scale", "0", "--threads", "1", "--json", str(out)
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    failed = [r for r in rows if r[3] == "FAIL"]
    assert failed and "FAIL: " in proc.stdout
    result = json.loads(out.read_text(encoding="utf-8"))  # written even when a check fails
    assert result["passed"] is False and result["exit_code"] == 1
    assert {r["check"] for r in result["rows"] if r["status"] == "fail"} == {r[0] for r in failed}
    assert rows and all("image tower amp" in r[0] for r in rows)  # --only fp16: the half-precision rows alone


def test_no_cuda_device_is_one_line_and_exit_2() -> None:
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this runs on GPU machines too.
    proc = run(env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "gpu_check.py: no CUDA device: this script checks the GPU paths; run it where torch.cuda.is_available() "
        "(or pass --device cpu --quick to check the script itself)"
    ]
    assert proc.stdout == ""


def test_a_missing_package_is_named_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_check

    monkeypatch.setitem(gpu_check.REQUIRED, "no_such_module_here", "no-such-package")
    assert gpu_check.main(["--device", "cpu", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_check.py: missing no-such-package: this script needs torch and the `train` extra")
    assert len(err.splitlines()) == 1


def test_a_check_that_raises_is_a_failed_row(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_check

    def broken() -> list[Any]:
        raise RuntimeError("CUDA error: an illegal memory access\nwas encountered")

    ok = gpu_check.Row("m: fine", "1", "≤ 2", "pass")
    assert gpu_check.attempt("m", "fine", lambda: [ok]) == [ok]
    (row,) = gpu_check.attempt("m", "latency", broken)
    assert (row.check, row.status, row.limit) == ("m: latency", "fail", "no exception")
    assert row.value == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "Traceback" in capsys.readouterr().err  # for whoever debugs the GPU run
    assert "\\| x \\|" in gpu_check.table([gpu_check.Row("| x |", "v", "l", "fail")])  # cells escape |


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--only", "train,nope"], "--only train,nope: choose from train,banks,fp16,latency"),
        (
            ["--json", "no/such/folder/r.json"],
            "--json no/such/folder/r.json: no/such/folder is not a writable folder",
        ),
        (["--device", "gpu"], "--device gpu: choose cuda, cuda:N or cpu"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    proc = run(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr and "Traceback" not in proc.stderr
