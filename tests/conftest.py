"""Shared fixtures. Tests use tiny open_clip models with random weights: no download ever happens."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_config() -> Path:
    """Path to a tiny open_clip model-config JSON (32-px ViT, 1-layer towers, width 32, context 77)."""
    return DATA / "tiny-clip.json"
