"""clipn_runtime: torch-free CLIPN OOD detection with a bundle from ``clipn-export``.

Needs numpy, onnxruntime and pillow only (tensorrt/pycuda and PyAV are optional). The public API is imported
lazily, so ``import clipn_runtime`` stays cheap::

    from clipn_runtime import Detector
    det = Detector("bundle/")
    print(det.detect("photo.jpg")[0])
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipn_runtime.bundle import BundleError, Manifest, load_manifest
    from clipn_runtime.classes import load_classes
    from clipn_runtime.detector import Detection, Detector
    from clipn_runtime.errors import InputFileError, UserError
    from clipn_runtime.scoring import Scores, score_features, score_logits
    from clipn_runtime.video import VideoError
    from clipn_runtime.vocab import ClassListMismatch

_EXPORTS = {
    "Detector": "clipn_runtime.detector",
    "Detection": "clipn_runtime.detector",
    "load_manifest": "clipn_runtime.bundle",
    "Manifest": "clipn_runtime.bundle",
    "BundleError": "clipn_runtime.bundle",
    "load_classes": "clipn_runtime.classes",
    "UserError": "clipn_runtime.errors",
    "InputFileError": "clipn_runtime.errors",
    "ClassListMismatch": "clipn_runtime.vocab",
    "VideoError": "clipn_runtime.video",
    "Scores": "clipn_runtime.scoring",
    "score_features": "clipn_runtime.scoring",
    "score_logits": "clipn_runtime.scoring",
}
__all__ = [
    "BundleError",
    "ClassListMismatch",
    "Detection",
    "Detector",
    "InputFileError",
    "Manifest",
    "Scores",
    "UserError",
    "VideoError",
    "load_classes",
    "load_manifest",
    "score_features",
    "score_logits",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipn_runtime' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
