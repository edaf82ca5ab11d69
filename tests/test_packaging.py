"""The runtime never needs torch: an edge device installs only clipn_runtime's dependencies."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

from helpers import BLOCK_TORCH


def run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_runtime_imports_without_torch() -> None:
    r = run_blocked(
        """
        import pkgutil, importlib, clipn_runtime
        for m in pkgutil.walk_packages(clipn_runtime.__path__, "clipn_runtime."):
            importlib.import_module(m.name)
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_block_is_effective() -> None:
    # The guard above must be able to fail: importing torch under it has to raise.
    r = run_blocked("import torch")
    assert r.returncode != 0 and "blocked for this test" in r.stderr


def test_wheel_ships_types_data_and_license(tmp_path: Path) -> None:
    """The built wheel (not the checkout) holds every package's py.typed, the runtime's data and the LICENSE."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("clipn_ood-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{p}/py.typed" for p in ("clipn_runtime", "clipn_train", "clipn_export", "clipn_eval")}
    expected |= {f"clipn_runtime/data/{f.name}" for f in (root / "clipn_runtime" / "data").iterdir()}
    assert expected <= names, sorted(expected - names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
