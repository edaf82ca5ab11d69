"""The one user cache folder every clipn-ood tool writes under (TensorRT plans, text banks, benchmark files)."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that moves the whole cache (useful on machines with a small home directory).
CACHE_ENV = "CLIPN_CACHE"


def cache_root() -> Path:
    """``$CLIPN_CACHE``, else ``$XDG_CACHE_HOME/clipn-ood``, else ``~/.cache/clipn-ood``.

    Each tool uses its own subfolder (``tensorrt/``, ``text-banks/``, ``banks/``, ``bench/``), so one variable
    relocates everything.
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "clipn-ood"
