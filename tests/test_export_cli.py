"""clipn-export: help that teaches, the parity table, documented exit codes, no traceback for user mistakes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from clipn_export.cli import EXIT_PARITY, EXIT_USAGE, main
from clipn_runtime.bundle import load_manifest


@pytest.fixture()
def classes_file(tmp_path: Path) -> Path:
    p = tmp_path / "classes.txt"
    p.write_text('# my classes\ncat\nhot dog, "chili"\n日本の猫\n', encoding="utf-8")
    return p


def _args(ckpt: Path, config: Path, classes: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(ckpt), "--model", str(config), "--classes", str(classes), "-o", str(out), *extra]


def test_help_teaches() -> None:
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for text in ("Examples:", "clipn-export --checkpoint", "Exit codes", "--fp16", "--int8", "--uint8-input",
                 "--tensorrt", "--triton-repo", "--scale", "--prompts", "--parity-atol", "--max-batch"):  # fmt: skip
        assert text in r.output, text


def test_help_does_not_import_torch() -> None:
    code = "import sys; from clipn_export.cli import main; assert 'torch' not in sys.modules; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_official_checkpoint_end_to_end(
    tiny_official_checkpoint: Path, tiny_config: Path, classes_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    r = CliRunner().invoke(
        main,
        _args(
            tiny_official_checkpoint, tiny_config, classes_file, out, "--fp16", "--cache-dir", str(tmp_path / "c")
        ),
    )
    assert r.exit_code == 0, r.output
    assert "parity:" in r.output and "ATD rank corr" in r.output and "PASS" in r.output
    manifest = load_manifest(out)
    assert manifest.classes == ["cat", 'hot dog, "chili"', "日本の猫"]
    assert [e.precision for e in manifest.engines()] == ["fp32", "fp16"]
    assert manifest.model.checkpoint_kind == "official"
    assert list((tmp_path / "c").glob("*.npz"))  # the text bank was cached


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classes": "missing.txt"}, "cannot read class list"),
        ({"checkpoint": "nope.pt"}, "no such file"),
        ({"extra": ["--prompts", "nonsense"]}, "--prompts 'nonsense'"),
        ({"extra": ["--parity-images", "1"]}, "--parity-images"),
        ({"extra": ["--scale", "-3"]}, "--scale"),
    ],
)
def test_user_mistakes_exit_2_without_traceback(
    tiny_official_checkpoint: Path,
    tiny_config: Path,
    classes_file: Path,
    tmp_path: Path,
    change: dict[str, Any],
    message: str,
) -> None:
    ckpt = tmp_path / change["checkpoint"] if "checkpoint" in change else tiny_official_checkpoint
    classes = tmp_path / change["classes"] if "classes" in change else classes_file
    out = tmp_path / "bundle"
    r = CliRunner().invoke(main, _args(ckpt, tiny_config, classes, out, "--no-cache", *change.get("extra", [])))
    assert r.exit_code == EXIT_USAGE, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_bad_class_file_points_at_the_line(
    tiny_official_checkpoint: Path, tiny_config: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "classes.txt"
    bad.write_text("cat\ndog\ncat\n", encoding="utf-8")
    r = CliRunner().invoke(main, _args(tiny_official_checkpoint, tiny_config, bad, tmp_path / "b", "--no-cache"))
    assert r.exit_code == EXIT_USAGE
    assert f"{bad}:3: duplicate class 'cat'" in r.output


def test_parity_failure_exits_3_and_keeps_the_bundle(
    tiny_official_checkpoint: Path, tiny_config: Path, classes_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    r = CliRunner().invoke(
        main,
        _args(
            tiny_official_checkpoint,
            tiny_config,
            classes_file,
            out,
            "--no-cache",
            "--fp16",
            "--parity-min-rank-fp16",
            "1.01",
        ),
    )
    assert r.exit_code == EXIT_PARITY, r.output
    assert "FAIL" in r.output and "parity gate FAILED" in r.output
    assert load_manifest(out).parity["passed"] is False


def test_existing_output_needs_overwrite(
    tiny_official_checkpoint: Path, tiny_config: Path, classes_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    args = _args(tiny_official_checkpoint, tiny_config, classes_file, out, "--no-cache", "--no-parity")
    assert CliRunner().invoke(main, args).exit_code == 0
    r = CliRunner().invoke(main, args)
    assert r.exit_code == EXIT_USAGE and "--overwrite" in r.output
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0


def test_cuda_device_without_gpu_is_a_user_error(
    tiny_official_checkpoint: Path, tiny_config: Path, classes_file: Path, tmp_path: Path
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    args = _args(tiny_official_checkpoint, tiny_config, classes_file, tmp_path / "b", "--device", "cuda")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == EXIT_USAGE and "no CUDA GPU" in r.output and "Traceback" not in r.output


def test_the_cli_fills_one_export_options_with_the_library_defaults(tmp_path: Path) -> None:
    """clipn-export and export_bundle share ExportOptions: the CLI's defaults are the library's, and every
    option lands in its field (none dropped on the way)."""
    from clipn_export.cli import _parse
    from clipn_export.options import ExportOptions
    from clipn_export.parity import ParityOptions

    required = ["--checkpoint", "c.pt", "--classes", "imagenet", "-o", str(tmp_path / "b")]
    request, options = _parse(main.make_context("clipn-export", list(required)).params)
    assert options == ExportOptions() and request.checkpoint == "c.pt"
    flags = ["--fp16", "--uint8-input", "--max-batch", "8", "--triton-name", "m", "--threads", "2", "-q"]
    parity = ["--parity-images", "4", "--parity-atol", "0.5", "--parity-min-rank-int8", "0.5", "--no-parity"]
    parity += ["--parity-min-rank-bf16", "0.9"]
    _, options = _parse(main.make_context("clipn-export", [*required, *flags, *parity]).params)
    assert options == ExportOptions(
        fp16=True,
        uint8_input=True,
        max_batch=8,
        triton_name="m",
        threads=2,
        progress=False,
        parity=ParityOptions(
            enabled=False,
            images=4,
            held_out=4,
            atol=0.5,
            min_rank_corr={"fp16": 0.99, "bf16": 0.9, "int8": 0.5},
        ),
    )


def test_export_bundle_names_an_unknown_option(tiny_clipn: Any, tmp_path: Path) -> None:
    from clipn_export.exporter import export_bundle

    with pytest.raises(TypeError, match=r"unknown options \['fp61'\].*ExportOptions"):
        export_bundle(tiny_clipn, ["cat"], tmp_path / "b", fp61=True)
    assert not (tmp_path / "b").exists()
