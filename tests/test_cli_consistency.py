"""The five CLIs agree (clipn_runtime.clikit): -h, --version, --device, --threads, -q/-v, output checks before
any work, $CLIPN_ENGINE, exit codes, and a missing optional dependency named by its extra."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner, Result
from helpers import SyntheticBundle, import_blocker
from PIL import Image

from clipn_demo.cli import main as demo_main
from clipn_eval.cli import main as eval_main
from clipn_export.cli import main as export_main
from clipn_runtime.calibrate_cli import main as calibrate_main
from clipn_runtime.cli import main as detect_main
from clipn_train.cli import cli as train_cli


@dataclass(frozen=True)
class Cli:
    """One command line: its click command, the words before the options, and arguments that get it past
    click (``tmp`` is replaced by a fresh folder; ``OUT`` by the output location under test)."""

    name: str
    command: click.Command
    words: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    out_kind: str = "dir"
    devices: tuple[str, ...] = ()
    cannot: str = ""  # a device of the vocabulary this command cannot honour

    def args(self, tmp: Path, *extra: str, out: str | None = None) -> list[str]:
        target = out if out is not None else str(tmp / ("out.jsonl" if self.out_kind == "file" else "out"))
        filled = [a.replace("TMP", str(tmp)).replace("OUT", target) for a in self.required]
        return [*self.words, *filled, *extra]


CLIS = [
    Cli("clipn-detect", detect_main, (), ("TMP/missing.jpg", "-o", "OUT"), "file", ("auto", "cpu", "cuda", "tensorrt", "openvino", "openvino:gpu"), "cuda:1"),
    Cli("clipn-calibrate", calibrate_main, (), ("TMP/missing.jpg", "-e", "TMP", "-o", "OUT"), "file", ("auto", "cpu", "cuda", "tensorrt", "openvino"), "cuda:1"),
    Cli("clipn-export", export_main, (), ("-c", "TMP/missing.pt", "--classes", "imagenet", "-o", "OUT"), "dir", ("auto", "cpu", "cuda", "cuda:0"), "tensorrt"),
    Cli("clipn-eval", eval_main, (), ("--id", "TMP", "--ood", "x=TMP", "-o", "OUT"), "dir", ("auto", "cpu", "cuda", "tensorrt", "openvino"), "cuda:1"),
    Cli("clipn-demo", demo_main, (), ("-o", "OUT"), "dir", ("auto", "cpu"), "cuda"),
    Cli("clipn-train train", train_cli, ("train",), ("--train-data", "TMP/missing.csv", "-o", "OUT"), "dir", ("auto", "cpu", "cuda", "cuda:0"), "tensorrt"),
    Cli("clipn-train cache-features", train_cli, ("cache-features",), ("--data", "TMP/missing.csv", "-o", "OUT"), "dir", ("auto", "cpu", "cuda", "cuda:0"), "tensorrt"),
]  # fmt: skip
IDS = [c.name for c in CLIS]


def invoke(cli: Cli | click.Command, args: list[str], **kw: Any) -> Result:
    command = cli.command if isinstance(cli, Cli) else cli
    return CliRunner().invoke(command, args, env={"CLIPN_ENGINE": None, **kw.pop("env", {})}, **kw)


def one_clean_line(r: Result) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return lines[0]


@pytest.mark.parametrize("cli", [*CLIS, Cli("clipn-train", train_cli)], ids=[*IDS, "clipn-train"])
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_teaches(cli: Cli, flag: str) -> None:
    r = invoke(cli, [*cli.words, flag])
    assert r.exit_code == 0, r.output
    assert f"Usage: {cli.name}" in r.stdout
    for text in ("Example", "Exit codes", "--version", "-h, --help"):
        assert text in r.stdout, text
    if cli.words or cli.name != "clipn-train":  # the group lists commands; its commands have the options
        for text in ("--device", "--threads", "-q, --quiet", "-v, --verbose"):
            assert text in r.stdout, text
    undocumented = [p.opts for p in _command(cli).params if isinstance(p, click.Option) and not p.help]
    assert not undocumented


def _command(cli: Cli) -> click.Command:
    if isinstance(cli.command, click.Group) and cli.words:
        return cli.command.commands[cli.words[0]]
    return cli.command


@pytest.mark.parametrize("cli", [*CLIS, Cli("clipn-train", train_cli)], ids=[*IDS, "clipn-train"])
def test_version(cli: Cli) -> None:
    r = invoke(cli, [*cli.words, "--version"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"{cli.name.split()[0]} (clipn-ood) {importlib.metadata.version('clipn-ood')}"


@pytest.mark.parametrize("cli", CLIS, ids=IDS)
@pytest.mark.parametrize(("typo", "meant"), [("gpu", "cuda"), ("foo", None), ("cuda1", "cuda:1")])
def test_device_typo_is_one_line_exit_2(cli: Cli, typo: str, meant: str | None, tmp_path: Path) -> None:
    r = invoke(cli, cli.args(tmp_path, "--device", typo))
    assert r.exit_code == 2, r.output
    line = one_clean_line(r)
    assert "--device" in line and repr(typo) in line and "choose auto, cpu" in line
    if meant is not None:
        assert repr(meant) in line


@pytest.mark.parametrize("cli", CLIS, ids=IDS)
def test_device_vocabulary_per_command(cli: Cli, tmp_path: Path) -> None:
    """Each command takes its part of the one vocabulary and names the reason for a word it cannot honour."""
    device = next(p for p in _command(cli).params if p.name == "device")
    for word in cli.devices:
        assert device.type.convert(word, device, None) == word
    r = invoke(cli, cli.args(tmp_path, "--device", cli.cannot))
    assert r.exit_code == 2, r.output
    assert f"{cli.name.split()[0]} cannot use {cli.cannot}" in one_clean_line(r)


def _unwritable(tmp_path: Path, where: str) -> str:
    """A location nobody can write, root included (the tests may run as root: chmod would not stop it)."""
    if where == "under-a-file":
        (tmp_path / "somefile").write_text("x", encoding="utf-8")
        return str(tmp_path / "somefile" / "out")
    if where == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc here")
        return "/proc/clipn-test/out"
    (tmp_path / "a-folder").mkdir()
    return str(tmp_path / "a-folder")  # a folder where a file is expected


def _locations(cli: Cli) -> list[str]:
    return ["under-a-file", "proc", *(["folder-for-file"] if cli.out_kind == "file" else [])]


@pytest.mark.parametrize(
    ("cli", "where"), [(c, w) for c in CLIS for w in _locations(c)], ids=[f"{c.name}-{w}" for c in CLIS for w in _locations(c)]
)  # fmt: skip
def test_unwritable_output_is_one_line_exit_2(cli: Cli, where: str, tmp_path: Path) -> None:
    out = _unwritable(tmp_path, where)
    r = invoke(cli, cli.args(tmp_path, out=out))
    assert r.exit_code == 2, r.output
    line = one_clean_line(r)
    assert "--output" in line and (out in line or str(Path(out).parent) in line), line


def test_train_group_default_command_checks_output_too(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x", encoding="utf-8")
    r = invoke(train_cli, ["--train-data", "x.csv", "-o", str(tmp_path / "f" / "logs")])
    assert r.exit_code == 2 and "is a file, not a folder" in one_clean_line(r)


def test_export_checks_the_output_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`-o` under a file fails before the model is loaded or the text bank is built, not after."""
    import clipn_export.exporter
    import clipn_export.textbank
    import clipn_train.factory

    calls: list[str] = []

    def spy(name: str) -> Any:
        def record(*args: object, **kwargs: object) -> None:
            calls.append(name)
            raise RuntimeError(f"{name} ran")  # stops the run right there; the exit code says it got this far

        return record

    monkeypatch.setattr(clipn_train.factory, "create_clipn", spy("create_clipn"))
    monkeypatch.setattr(clipn_export.textbank, "build_text_bank", spy("build_text_bank"))
    monkeypatch.setattr(clipn_export.exporter, "build_text_bank", spy("build_text_bank"))
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"")
    (tmp_path / "somefile").write_text("x", encoding="utf-8")
    base = ["-c", str(ckpt), "--classes", "imagenet", "--no-cache"]
    r = invoke(export_main, [*base, "-o", str(tmp_path / "somefile" / "bundle")])
    assert r.exit_code == 2 and "is a file, not a folder" in one_clean_line(r)
    assert calls == []
    # So do the other checks that need no model: an existing -o without --overwrite, a bad --max-batch.
    (tmp_path / "made").mkdir()
    (tmp_path / "made" / "clipn.json").write_text("{}", encoding="utf-8")
    r = invoke(export_main, [*base, "-o", str(tmp_path / "made")])
    assert r.exit_code == 2 and "--overwrite" in one_clean_line(r)
    r = invoke(export_main, [*base, "-o", str(tmp_path / "bundle"), "--max-batch", "0"])
    assert r.exit_code == 2
    assert calls == []
    # The spies are wired: with a writable -o the same command reaches the model.
    r = invoke(export_main, [*base, "-o", str(tmp_path / "bundle")])
    assert calls == ["create_clipn"] and r.exit_code != 0


def test_threads_quiet_verbose_are_accepted_everywhere(tmp_path: Path, tiny_config: Path) -> None:
    """Each CLI takes --threads 1 -q -v and gets as far as its own input checks (the one user error)."""
    expected = {
        "clipn-detect": "pass --engine DIR",
        "clipn-calibrate": "missing.jpg",
        "clipn-export": "no such file",
        "clipn-eval": "set CLIPN_ENGINE",
        "clipn-train train": "missing.csv",
        "clipn-train cache-features": "missing.csv",
    }
    model = ["--model", str(tiny_config), "--pretrained", "none", "--workers", "0"]
    for cli in CLIS:
        if cli.name == "clipn-demo":
            continue  # below, without running the demo
        extra = model if cli.words else []
        r = invoke(cli, cli.args(tmp_path, "--threads", "1", "-q", "-vv", *extra))
        assert r.exit_code == 2, (cli.name, r.output)
        assert expected[cli.name] in one_clean_line(r), cli.name


def test_demo_passes_threads_and_quiet_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake_run_demo(out: Path, settings: object, **kw: Any) -> None:
        seen.update(kw)
        raise KeyboardInterrupt

    monkeypatch.setattr("clipn_demo.cli.run_demo", fake_run_demo)
    r = invoke(demo_main, ["--quick", "-o", str(tmp_path / "d"), "--threads", "1", "-q"])
    assert r.exit_code == 130 and "run the same command again" in one_clean_line(r)
    assert seen["threads"] == 1 and seen["progress"] is False


def _images(folder: Path, n: int, lo: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(lo)
    for i in range(n):
        Image.fromarray(rng.integers(lo, lo + 120, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_eval_honours_clipn_engine(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    _images(tmp_path / "id", 4, 0)
    _images(tmp_path / "ood", 4, 120)
    out = tmp_path / "report"
    args = ["--id", str(tmp_path / "id"), "--ood", f"x={tmp_path / 'ood'}", "-o", str(out), "--no-plots", "-q"]
    r = invoke(eval_main, args, env={"CLIPN_ENGINE": str(synthetic_bundle.root)})
    assert r.exit_code == 0, r.output
    assert json.loads((out / "metrics.json").read_text())["meta"]["engine"] == str(synthetic_bundle.root)
    r = invoke(eval_main, args)  # and without it, the error names both ways to give the bundle
    assert r.exit_code == 2 and "--engine" in one_clean_line(r) and "CLIPN_ENGINE" in r.stderr


# A real missing package raises ModuleNotFoundError with .name set; this blocker does the same.
BLOCK_TORCH = import_blocker(("torch", "torchvision", "open_clip"))


@pytest.mark.parametrize(
    ("module", "args", "extra"),
    [
        ("clipn_train.cli", ["--train-data", "x.csv", "-o", "OUT"], "train"),
        ("clipn_train.cli", ["cache-features", "--data", "x.csv", "-o", "OUT"], "train"),
        ("clipn_export.cli", ["-c", "CKPT", "--classes", "imagenet", "-o", "OUT"], "export"),
        ("clipn_eval.cli", ["--torch", "--checkpoint", "CKPT", "--classes", "imagenet", "--id", "TMP", "--ood", "x=TMP", "-o", "OUT"], "train"),
        ("clipn_demo.cli", ["--quick", "-o", "OUT"], "demo"),
    ],
    ids=["train", "cache-features", "export", "eval-torch", "demo"],
)  # fmt: skip
def test_missing_torch_names_the_extra(module: str, args: list[str], extra: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"")
    argv = [
        a.replace("OUT", str(tmp_path / "out")).replace("CKPT", str(ckpt)).replace("TMP", str(tmp_path))
        for a in args
    ]
    code = BLOCK_TORCH + f"from {module} import main\nmain({argv!r})\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "torch cannot be imported" in lines[0] and f"pip install 'clipn-ood[{extra}]'" in lines[0]


def test_only_an_extras_module_counts_as_a_missing_install() -> None:
    """Any other ImportError is a bug and must stay a crash, not be disguised as a missing extra."""
    from clipn_runtime.clikit import missing_extra

    def missing(name: str | None) -> ModuleNotFoundError:
        return ModuleNotFoundError(f"No module named {name!r}", name=name)

    assert missing_extra(missing("clipn_train.nope"), ("train",)) is None
    assert missing_extra(missing(None), ("train",)) is None
    assert missing_extra(ImportError("cannot import name 'x' from 'y'"), ("train",)) is None
    found = missing_extra(missing("sklearn.metrics"), ("eval",))
    assert found is not None and found.extra == "eval" and found.module == "sklearn"
    # A command that does not list the module's extra gets the smallest extra that has it.
    found = missing_extra(missing("tokenizers"), ())
    assert found is not None and found.extra == "openvocab"
    found = missing_extra(missing("torch"), ("eval",))
    assert found is not None and found.extra == "train"
    # A broken install (the module is there but fails to import) says so rather than "not installed".
    found = missing_extra(
        ImportError("libcudnn.so.9: cannot open shared object file", name="torch._C"), ("train",)
    )
    assert found is not None and "libcudnn" in str(found)
