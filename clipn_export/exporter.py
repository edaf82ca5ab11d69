"""``export_bundle``: a loaded CLIPN model + a class list → a bundle directory (DESIGN §2), gate included.

Stages: text bank → ONNX parts (encoder, head, optional uint8 preprocessing) → one fp32 engine and the
requested fp16/int8 variants → parity gate → optional TensorRT plan → manifest → optional Triton repository.

The bundle is assembled in a hidden staging directory next to ``out_dir`` and moved into place only when
complete, so an interrupted or failed export never leaves a half-written bundle (and never destroys an
existing one before the new one is ready). The expensive text bank is cached (``cache_dir``), so re-running
after a mistake loses nothing. A failed parity gate still writes the bundle — marked ``parity.passed: false``
in its manifest, for inspection — and then raises :class:`ParityGateError`.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from clipn_export import onnx_export as ox
from clipn_export import precision as prec
from clipn_export.head import EMBEDDING_OUTPUT, ScoringHead, normalize_uint8
from clipn_export.parity import ParityOptions, ParityReport, parity_images, run_parity
from clipn_export.textbank import TextBank, build_text_bank
from clipn_runtime.bundle import (
    MANIFEST_NAME,
    ROLE_IMAGE_ENGINE,
    ROLE_TENSORRT,
    ROLE_TEXT_BANK,
    BundleFile,
    Manifest,
    Preprocess,
    Scoring,
    hash_entry,
    write_manifest,
)
from clipn_runtime.errors import UserError
from clipn_runtime.prompts import PromptSet, load_prompts
from clipn_runtime.scoring import MCM_TEMPERATURE, MSP_SCALE, Scores, l2_normalize, score_features

if TYPE_CHECKING:
    from clipn_train.model import LoadedCLIPN

log = logging.getLogger(__name__)

TEXT_BANK_FILE = "text_bank.npz"


class ParityGateError(Exception):
    """The exported engines do not match the PyTorch reference within the gate's thresholds.

    The bundle was written (manifest ``parity.passed`` is false); ``result.parity.table()`` says where.
    """

    def __init__(self, result: ExportResult) -> None:
        assert result.parity is not None
        super().__init__("export parity gate failed:\n" + result.parity.table())
        self.result = result


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: Manifest
    text_bank: TextBank
    parity: ParityReport | None
    triton_dir: Path | None = None
    #: Wall-clock seconds per stage.
    seconds: dict[str, float] = field(default_factory=dict)


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _versions() -> dict[str, Any]:
    names = ("clipn-ood", "torch", "open_clip_torch", "onnx", "onnxruntime", "onnxconverter-common", "numpy")
    return {**{n: _version(n) for n in names}, "opset": ox.OPSET, "exporter": ox.EXPORTER}


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"-o {out_dir}: exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise UserError(f"-o {out_dir}: exists and is not empty; pass --overwrite to replace it, or pick another")
    if not (out_dir / MANIFEST_NAME).is_file():
        raise UserError(
            f"-o {out_dir}: not empty and not a clipn-ood bundle (no {MANIFEST_NAME}); refusing to overwrite it"
        )


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished ``staging`` to ``out_dir``; an old bundle there is removed only after the move."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _validate(
    classes: Sequence[str], scale: float | None, max_batch: int, tensorrt: bool, triton_name: str
) -> None:
    if not classes:
        raise UserError("the class list is empty")
    bad = [i for i, c in enumerate(classes) if not isinstance(c, str) or not c.strip() or "\n" in c]
    if bad:
        raise UserError(f"class names must be non-empty single-line strings (bad entries at {bad[:5]})")
    if scale is not None and not (np.isfinite(scale) and scale > 0):
        raise UserError(f"--scale must be a positive number, got {scale}")
    if max_batch < 1:
        raise UserError(f"--max-batch must be ≥ 1, got {max_batch}")
    if tensorrt:
        from clipn_export.tensorrt import require_tensorrt

        require_tensorrt()
    from clipn_export.triton import check_model_name

    check_model_name(triton_name)


def _reference(
    loaded: LoadedCLIPN, pixels: npt.NDArray[np.float32], bank: TextBank, scale: float
) -> tuple[Scores, npt.NDArray[np.float32]]:
    """PyTorch image tower (fp32) + the numpy reference scoring: what every engine must reproduce."""
    import torch

    model = loaded.model
    device = next(model.parameters()).device
    # No TF32 convolutions on a GPU: the reference must be full fp32 (the gate's 1e-4 is tighter than TF32).
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        feats = model.encode_image(torch.from_numpy(pixels).to(device), normalize=False).float().cpu().numpy()
    scores = score_features(feats, bank.yes, bank.no, scale, msp_scale=MSP_SCALE, mcm_temperature=MCM_TEMPERATURE)
    return scores, l2_normalize(feats).astype(np.float32)


def _prompts_record(ps: PromptSet, variant: str) -> dict[str, Any]:
    return {
        **ps.to_dict(),
        "variant": variant,
        "no_tower_templates": "yes" if variant == "learnable" else "no",
        "ensembling": "w_c = normalize(sum_t normalize(E(template_t(c)))), yes and no towers (DESIGN §3)",
    }


def export_bundle(
    loaded: LoadedCLIPN,
    classes: Sequence[str],
    out_dir: str | Path,
    *,
    prompts: str | PromptSet = "clipn",
    fp16: bool = False,
    int8: bool = False,
    uint8_input: bool = False,
    full_outputs: bool = False,
    embeddings: bool = False,
    scale: float | None = None,
    max_batch: int = 32,
    opt_batch: int | None = None,
    tensorrt: bool = False,
    timing_cache: str | Path | None = None,
    triton_repo: str | Path | None = None,
    triton_name: str = "clipn",
    parity: ParityOptions | None = None,
    cache_dir: str | Path | None = None,
    text_batch_size: int = 256,
    int8_options: prec.Int8Options | None = None,
    overwrite: bool = False,
    progress: bool = True,
    open_vocabulary: bool = False,
) -> ExportResult:
    """Export ``loaded`` (a :class:`clipn_train.model.LoadedCLIPN`) for ``classes`` into the bundle ``out_dir``.

    Always writes the fp32 engine ``model.onnx``; ``fp16``/``int8`` add ``model.fp16.onnx``/``model.int8.onnx``
    (encoder converted, preprocessing and head fp32); ``tensorrt`` adds ``model.plan`` (needs TensorRT and a
    GPU). ``scale`` defaults to the checkpoint CLIP's ``exp(logit_scale)``. ``open_vocabulary`` adds the ONNX
    yes/no text encoders and ``tokenizer.json`` and makes the engines take the class banks as inputs (defaulting
    to the baked ones), so the runtime can score other class lists (:mod:`clipn_export.openvocab_export`).
    Raises :class:`ParityGateError` after writing the bundle when the gate fails, :class:`UserError` for bad
    arguments before any work.
    """
    out_dir = Path(out_dir)
    parity = parity if parity is not None else ParityOptions()
    seconds: dict[str, float] = {}
    _validate(classes, scale, max_batch, tensorrt, triton_name)
    if open_vocabulary:
        from clipn_export.tokenizer_export import check_supported

        check_supported(loaded.tokenizer)
    _check_out_dir(out_dir, overwrite)
    triton_dir_planned = Path(triton_repo) / triton_name if triton_repo is not None else None
    if triton_dir_planned is not None and triton_dir_planned.exists() and not overwrite:
        raise UserError(f"{triton_dir_planned} already exists; pick another --triton-name or pass --overwrite")
    ps = load_prompts(prompts) if isinstance(prompts, str) else prompts
    model = loaded.model
    info = loaded.info
    if model.training:
        model.eval()

    t0 = time.perf_counter()
    bank = build_text_bank(
        loaded, list(classes), ps, batch_size=text_batch_size, cache_dir=cache_dir, progress=progress
    )
    seconds["text_bank"] = time.perf_counter() - t0
    s = float(scale) if scale is not None else float(model.scale)
    size = int(info.image_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        result = _assemble(
            loaded, bank, ps, staging, out_dir, s, size, seconds,
            fp16=fp16, int8=int8, uint8_input=uint8_input, full_outputs=full_outputs, embeddings=embeddings,
            max_batch=max_batch, opt_batch=opt_batch, tensorrt=tensorrt, timing_cache=timing_cache,
            parity=parity, int8_options=int8_options, open_vocabulary=open_vocabulary, progress=progress,
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _replace_dir(staging, out_dir)
    result.bundle_dir = out_dir

    if triton_repo is not None:
        from clipn_export.triton import write_triton_repo

        result.triton_dir = _write_triton(
            result, triton_repo, triton_name, max_batch, overwrite, write_triton_repo
        )
    log.info("bundle written: %s", out_dir)
    if result.parity is not None and not result.parity.passed:
        raise ParityGateError(result)
    return result


def _write_triton(
    result: ExportResult, repo: str | Path, name: str, max_batch: int, overwrite: bool, write: Any
) -> Path:
    """Triton serves the plan when there is one, else the fp16, int8 or fp32 ONNX (first present)."""
    m = result.manifest
    plan = m.file(ROLE_TENSORRT)
    chosen: BundleFile
    if plan is not None:
        chosen = plan
    else:
        by_precision = {e.precision: e for e in m.engines()}
        chosen = next(by_precision[p] for p in ("fp16", "int8", "fp32") if p in by_precision)
    return Path(
        write(
            repo,
            name,
            result.bundle_dir / chosen.path,
            max_batch=max_batch,
            inputs=chosen.inputs,
            outputs=chosen.outputs,
            classes=m.classes,
            overwrite=overwrite,
        )
    )


def _assemble(
    loaded: LoadedCLIPN,
    bank: TextBank,
    ps: PromptSet,
    staging: Path,
    out_dir: Path,
    scale: float,
    size: int,
    seconds: dict[str, float],
    *,
    fp16: bool,
    int8: bool,
    uint8_input: bool,
    full_outputs: bool,
    embeddings: bool,
    max_batch: int,
    opt_batch: int | None,
    tensorrt: bool,
    timing_cache: str | Path | None,
    parity: ParityOptions,
    int8_options: prec.Int8Options | None,
    open_vocabulary: bool = False,
    progress: bool = True,
) -> ExportResult:
    info = loaded.info
    bank.save(staging / TEXT_BANK_FILE)

    t0 = time.perf_counter()
    head = ScoringHead(bank.yes, bank.no, scale, full_outputs=full_outputs, embeddings=embeddings)
    head_graph = ox.export_head(head, bank_inputs=open_vocabulary)
    encoder = ox.export_encoder(loaded.model, size, input_name=ox.PIXELS if uint8_input else ox.IMAGE_INPUT)
    front = [(ox.PREFIX_PREPROCESS, ox.export_preprocess(info.mean, info.std, size))] if uint8_input else []
    seconds["onnx_export"] = time.perf_counter() - t0

    precisions = ["fp32"] + (["fp16"] if fp16 else []) + (["int8"] if int8 else [])
    engines: list[BundleFile] = []
    extra_files: list[BundleFile] = []
    for p in precisions:
        t0 = time.perf_counter()
        if p == "fp16":
            enc = prec.to_fp16(encoder)
        elif p == "int8":
            enc = prec.to_int8(encoder, int8_options)
        else:
            enc = encoder
        graph = ox.chain([*front, (ox.PREFIX_ENCODER, enc), (ox.PREFIX_HEAD, head_graph)])
        if open_vocabulary:  # the baked banks become the bank inputs' defaults
            ox.add_bank_defaults(graph, head.bank.numpy(), head.bank_no.numpy())
        name = prec.ENGINE_FILES[p]
        written = ox.save_model(graph, staging / name)
        inputs, outputs = ox.graph_signature(graph)
        meta: dict[str, Any] = {
            "encoder_precision": p,
            "head_precision": "fp32",
            "opset": ox.OPSET,
            "exporter": ox.EXPORTER,
            "max_batch": max_batch,
            "bytes": sum(f.stat().st_size for f in written),
        }
        if open_vocabulary:
            meta["bank_inputs"] = dict(ox.BANK_INPUTS)
        if p == "int8":
            meta["quantization"] = {"method": "onnxruntime dynamic", **vars(int8_options or prec.Int8Options())}
        kw = prec.session_kwargs(p)
        if kw:
            meta["onnxruntime_disabled_optimizers"] = kw["disabled_optimizers"]
        if len(written) > 1:
            meta["external_data"] = written[1].name
            extra_files.append(hash_entry(staging, written[1].name, "other", meta={"external_data_of": name}))
        engines.append(
            hash_entry(staging, name, ROLE_IMAGE_ENGINE, precision=p, inputs=inputs, outputs=outputs, meta=meta)
        )
        seconds[f"engine_{p}"] = time.perf_counter() - t0
        log.info("engine %s: %s (%.1f MB)", p, name, meta["bytes"] / 1e6)

    report: ParityReport | None = None
    if parity.enabled:
        t0 = time.perf_counter()
        images = parity_images(parity.images, size, parity.seed)
        pixels = normalize_uint8(images, info.mean, info.std)
        ref, ref_emb = _reference(loaded, pixels, bank, scale)
        engine_input = images if uint8_input else pixels

        def runner(path: Path, p: str) -> Any:
            session = prec.make_session(path, p)
            names = [o.name for o in session.get_outputs()]
            return lambda x: dict(zip(names, session.run(None, {ox.IMAGE_INPUT: x}), strict=True))

        report = run_parity(
            [(e.precision or "fp32", runner(staging / e.path, e.precision or "fp32")) for e in engines],
            engine_input,
            ref,
            ref_emb if embeddings else None,
            parity,
        )
        seconds["parity"] = time.perf_counter() - t0

    trt_info: dict[str, Any] | None = None
    files = [*engines, *extra_files, hash_entry(staging, TEXT_BANK_FILE, ROLE_TEXT_BANK, meta={"key": bank.key})]
    ov_section = None
    if open_vocabulary:
        from clipn_export.openvocab_export import write_open_vocabulary

        t0 = time.perf_counter()
        ov_section, ov_files = write_open_vocabulary(loaded, staging)
        files += ov_files
        seconds["open_vocabulary"] = time.perf_counter() - t0
    if tensorrt:
        from clipn_export.tensorrt import PLAN_FILE, build_engine

        t0 = time.perf_counter()
        sample = (size, size, 3) if uint8_input else (3, size, size)
        built = build_engine(
            staging / prec.ENGINE_FILES["fp32"],
            staging / PLAN_FILE,
            input_name=ox.IMAGE_INPUT,
            sample_shape=sample,
            max_batch=max_batch,
            opt_batch=opt_batch,
            fp16=fp16,
            timing_cache=timing_cache,
        )
        trt_info = built.info
        files.append(
            hash_entry(
                staging,
                PLAN_FILE,
                ROLE_TENSORRT,
                precision=built.info["precision"],
                inputs=built.inputs,
                outputs=built.outputs,
                meta=built.info,
            )
        )
        seconds["tensorrt"] = time.perf_counter() - t0

    manifest = Manifest(
        model={
            "name": info.model_name,
            "config": info.model_config,
            "pretrained": info.pretrained,
            "weights_sha256": info.weights_sha256,
            "checkpoint_sha256": info.checkpoint_sha256,
            "checkpoint_kind": info.checkpoint_kind,
            "variant": info.variant,
            "context_length": info.context_length,
            "embed_dim": int(bank.yes.shape[1]),
        },
        preprocess=Preprocess(
            image_size=size,
            mean=tuple(float(v) for v in info.mean),  # type: ignore[arg-type]
            std=tuple(float(v) for v in info.std),  # type: ignore[arg-type]
            interpolation=info.interpolation,
            resize=info.resize_mode,
            crop="center",
            input_layout="NHWC" if uint8_input else "NCHW",
            input_dtype="uint8" if uint8_input else "float32",
        ),
        classes=list(bank.classes),
        prompts=_prompts_record(ps, info.variant),
        scoring=Scoring(scale=scale, msp_scale=MSP_SCALE, mcm_temperature=MCM_TEMPERATURE),
        files=files,
        versions=_versions(),
        parity=report.to_dict() if report is not None else {"passed": None, "skipped": True},
        tensorrt=trt_info,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        open_vocabulary=ov_section,
    )
    write_manifest(staging, manifest)
    if open_vocabulary and parity.enabled:
        from clipn_export.openvocab_export import check_open_vocabulary

        t0 = time.perf_counter()
        manifest = check_open_vocabulary(loaded, staging, manifest, bank, progress=progress)
        write_manifest(staging, manifest)
        seconds["open_vocabulary_parity"] = time.perf_counter() - t0
    return ExportResult(out_dir, manifest, bank, report, seconds=seconds)


__all__ = ["EMBEDDING_OUTPUT", "ExportResult", "ParityGateError", "export_bundle"]
