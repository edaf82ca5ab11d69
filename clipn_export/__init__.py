"""clipn_export: CLIPN model + class list → a deployable bundle (``clipn-export``).

The public API is imported lazily, so ``import clipn_export`` (and ``clipn-export --help``) stays torch-free::

    from clipn_export import export_bundle, ExportOptions, build_text_bank, ParityOptions
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_API = {
    "export_bundle": "clipn_export.exporter",
    "ExportOptions": "clipn_export.options",
    "ExportResult": "clipn_export.exporter",
    "ParityGateError": "clipn_export.exporter",
    "build_text_bank": "clipn_export.textbank",
    "TextBank": "clipn_export.textbank",
    "ParityOptions": "clipn_export.parity",
    "ParityReport": "clipn_export.parity",
    "ScoringHead": "clipn_export.head",
    "Int8Options": "clipn_export.precision",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'clipn_export' has no attribute {name!r}")
