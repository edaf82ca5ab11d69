"""One user cache folder for every tool: ``$CLIPN_CACHE`` moves all of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipn_runtime.cache import cache_root


def test_precedence_clipn_cache_then_xdg_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CLIPN_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "clipn-ood"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "clipn-ood"
    monkeypatch.setenv("CLIPN_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_every_tool_caches_under_the_one_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from clipn_export.textbank import default_cache_dir as text_bank_cache
    from clipn_runtime.openvocab import user_cache_dir as runtime_bank_cache

    # The benchmarks are scripts that import each other by bare name (``harness``, ``common``), as
    # tests/test_benchmarks.py does: ``benchmarks.harness`` would be the same file under a second module name.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from harness import default_cache_dir as bench_cache

    monkeypatch.setenv("CLIPN_CACHE", str(tmp_path))
    assert text_bank_cache() == tmp_path / "text-banks"
    assert runtime_bank_cache() == tmp_path / "banks"
    assert bench_cache() == tmp_path / "bench"
