"""The clipn-train CLI: fast help, clear user errors (exit 2), a real tiny run, caching, interrupts (130)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_csv, tiny_weights

from clipn_train import trainer
from clipn_train.cli import main
from clipn_train.factory import create_clipn

# Tiny models on a shared 2-core machine run several times faster on one thread (conftest.py).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def files(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    weights = tiny_weights(create_clipn(tiny_config), root)
    return {"csv": str(make_csv(root / "data", n=8)), "weights": str(weights), "model": str(tiny_config)}


def _run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, int), e.value.code
    return e.value.code


def test_help_is_fast_and_does_not_import_torch() -> None:
    code = (
        "import sys; from clipn_train.cli import cli; from click.testing import CliRunner; "
        "r = CliRunner().invoke(cli, ['--help']); print(r.output); assert 'torch' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "cache-features" in out and "torchrun --nproc_per_node" in out and "Exit codes" in out
    out = subprocess.run(
        [sys.executable, "-m", "clipn_train", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--train-data" in out and "--local-loss" in out and "--resume" in out


def test_user_errors_exit_2_with_one_clear_line(
    files: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--model", files["model"], "--pretrained", "none", "--workers", "0", "-o", str(tmp_path)]
    assert _run(["--train-data", str(tmp_path / "missing.csv"), *common]) == 2
    err = capsys.readouterr().err
    assert "missing.csv" in err and "Traceback" not in err
    assert _run(["--train-data", files["csv"], *common, "--csv-caption-key", "caption"]) == 2
    assert "pairs.tsv:1: no column 'caption'" in capsys.readouterr().err
    assert _run(["--train-data", files["csv"], "--precision", "fp8"]) == 2
    assert "fp8" in capsys.readouterr().err
    assert _run(["--resume", "latest", "--train-data", files["csv"], "--model", files["model"]]) == 2
    assert "--resume latest needs --name" in capsys.readouterr().err


def test_cache_then_train_then_interrupt(
    files: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    common = ["--model", files["model"], "--pretrained", files["weights"], "--workers", "0", "--precision", "fp32"]
    cache = str(tmp_path / "cache")
    assert _run(["cache-features", "--data", files["csv"], "-o", cache, "--batch-size", "3", *common]) == 0
    assert "cached 8 samples (0 skipped)" in capsys.readouterr().out
    train = [
        "--train-data",
        cache,
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "-o",
        str(tmp_path / "logs"),
        "--name",
        "cli",
        "--no-tensorboard",
        *common,
    ]
    assert _run(train) == 0
    assert "done: 2 epoch(s), 4 steps" in capsys.readouterr().out
    assert (tmp_path / "logs" / "cli" / "checkpoints" / "epoch_2.safetensors").is_file()

    def pretend_sigint(self: trainer._StopSignals) -> trainer._StopSignals:
        self.received = signal.SIGINT
        return self

    monkeypatch.setattr(trainer._StopSignals, "__enter__", pretend_sigint)
    assert _run([*train, "--name", "cli-int", "--epochs", "3"]) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 1" in err and "--resume latest" in err
    assert (tmp_path / "logs" / "cli-int" / "checkpoints" / "step_1.state.pt").is_file()
