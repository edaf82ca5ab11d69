"""The runtime never needs torch: an edge device installs only clipn_runtime's dependencies."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "open_clip", "clipn_train", "clipn_export"):
                raise ImportError(f"blocked for this test: {name}")
    sys.meta_path.insert(0, Block())
    """
)


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
