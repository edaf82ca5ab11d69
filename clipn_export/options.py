"""What one export is asked for: :class:`ExportOptions`, shared by :func:`clipn_export.exporter.export_bundle`
and ``clipn-export`` (whose options of the same names fill it).

Light on purpose (no torch, no onnx): the CLI builds one before the heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clipn_export.int8_calibration import DEFAULT_CALIBRATION_SIZE
from clipn_export.parity import ParityOptions
from clipn_runtime.prompts import DEFAULT_PROMPTS, PromptSet

if TYPE_CHECKING:
    from clipn_export.precision import Int8Options


@dataclass(frozen=True)
class ExportOptions:
    """How to export; every field has the default ``clipn-export`` has.

    Engines: the fp32 ``model.onnx`` always; ``fp16``/``int8`` add ``model.fp16.onnx``/``model.int8.onnx``
    (encoder converted, preprocessing and head fp32, ``int8_options`` the dynamic quantisation's knobs);
    ``calibration`` (image files, folders, ``@lists``) makes the int8 engine static int8, calibrated on at most
    ``calibration_size`` of those images (:mod:`clipn_export.int8_calibration`); ``uint8_input``
    makes them take raw uint8 NHWC crops; ``full_outputs``/``embeddings`` add the per-class outputs and the image
    embedding. ``scale`` defaults to the checkpoint CLIP's ``exp(logit_scale)``. ``open_vocabulary`` adds the
    ONNX text encoders and ``tokenizer.json`` and makes the engines take the class banks as inputs.
    ``mcm_bank`` bakes MCM's one-prompt bank into the engines (output ``mcm_single``: MCM as its paper defines
    it); open-vocabulary engines, whose banks are inputs, go without it.

    ``tensorrt`` adds ``model.plan`` (``max_batch``/``opt_batch`` its profile, ``timing_cache`` read and
    updated); ``triton_repo`` adds a Triton model ``triton_name`` there. ``parity`` is the gate;
    ``threads`` the onnxruntime intra-op threads of its sessions (default: onnxruntime's). ``cache_dir`` caches
    text banks (``None``: no cache); ``overwrite`` replaces an existing bundle (and Triton model).
    """

    prompts: str | PromptSet = DEFAULT_PROMPTS
    fp16: bool = False
    int8: bool = False
    int8_options: Int8Options | None = None
    calibration: tuple[str, ...] = ()
    calibration_size: int = DEFAULT_CALIBRATION_SIZE
    uint8_input: bool = False
    full_outputs: bool = False
    embeddings: bool = False
    open_vocabulary: bool = False
    mcm_bank: bool = True
    scale: float | None = None
    max_batch: int = 32
    opt_batch: int | None = None
    tensorrt: bool = False
    timing_cache: str | Path | None = None
    triton_repo: str | Path | None = None
    triton_name: str = "clipn"
    parity: ParityOptions = field(default_factory=ParityOptions)
    threads: int | None = None
    cache_dir: str | Path | None = None
    text_batch_size: int = 256
    overwrite: bool = False
    progress: bool = True

    @property
    def precisions(self) -> list[str]:
        """The engines' precisions, in the order they are written (fp32 first)."""
        return ["fp32"] + (["fp16"] if self.fp16 else []) + (["int8"] if self.int8 else [])

    @property
    def triton_dir(self) -> Path | None:
        """The Triton model directory this export writes, if any."""
        return Path(self.triton_repo) / self.triton_name if self.triton_repo is not None else None
