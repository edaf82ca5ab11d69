"""``export_bundle``: a loaded CLIPN model + a class list → a bundle directory, gate included.

Stages: text bank → ONNX parts (encoder, head, optional uint8 preprocessing) → one fp32 engine and the
requested fp16/int8 variants → parity gate → optional open-vocabulary parts and TensorRT plan → manifest →
optional Triton repository. What to write is one :class:`~clipn_export.options.ExportOptions`.

The bundle is assembled in a hidden staging directory next to ``out_dir`` and moved into place only when
complete, so an interrupted or failed export never leaves a half-written bundle (and never destroys an
existing one before the new one is ready). The expensive text bank is cached (``cache_dir``), so re-running
after a mistake loses nothing. A failed parity gate still writes the bundle — marked ``parity.passed: false``
in its manifest, for inspection — and then raises :class:`ParityGateError`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata as md
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from clipn_export import onnx_export as ox
from clipn_export import precision as prec
from clipn_export.head import EMBEDDING_OUTPUT, ScoringHead, normalize_uint8
from clipn_export.options import ExportOptions
from clipn_export.parity import ParityReport, parity_images, run_parity
from clipn_export.textbank import TextBank, build_single_bank, build_text_bank
from clipn_runtime.bundle import (
    INT8_DYNAMIC,
    MANIFEST_NAME,
    ROLE_IMAGE_ENGINE,
    ROLE_TENSORRT,
    ROLE_TEXT_BANK,
    BundleFile,
    Manifest,
    ModelIdentity,
    OpenVocabulary,
    Preprocess,
    Scoring,
    hash_entry,
    write_manifest,
)
from clipn_runtime.engine import (
    DISABLED_OPTIMIZERS_KEY,
    EngineError,
    EngineSpec,
    disabled_optimizers_for,
    open_engine,
)
from clipn_runtime.engine_choice import ONNXRUNTIME, OPENVINO, NumericPath
from clipn_runtime.errors import UserError
from clipn_runtime.fileio import replace_dir
from clipn_runtime.prompts import PromptSet, load_prompts
from clipn_runtime.scoring import MCM_PROMPT, MCM_TEMPERATURE, MSP_SCALE, Scores, l2_normalize, score_features

if TYPE_CHECKING:
    from clipn_export.int8_calibration import CalibrationSet
    from clipn_train.factory import LoadedCLIPN, ModelInfo

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


def _validate(classes: Sequence[str], o: ExportOptions) -> None:
    if not classes:
        raise UserError("the class list is empty")
    bad = [i for i, c in enumerate(classes) if not isinstance(c, str) or not c.strip() or "\n" in c]
    if bad:
        raise UserError(f"class names must be non-empty single-line strings (bad entries at {bad[:5]})")
    if o.scale is not None and not (np.isfinite(o.scale) and o.scale > 0):
        raise UserError(f"--scale must be a positive number, got {o.scale}")
    if o.max_batch < 1:
        raise UserError(f"--max-batch must be ≥ 1, got {o.max_batch}")
    if o.calibration:
        from clipn_export.int8_calibration import check_calibration_options, find_calibration_images, require_nncf

        check_calibration_options(o.calibration, o.calibration_size, o.int8)
        require_nncf()
        find_calibration_images(o.calibration, o.calibration_size)  # a missing folder, too few images
    if o.tensorrt:
        from clipn_export.tensorrt import require_tensorrt

        require_tensorrt()
    from clipn_export.triton import check_model_name

    check_model_name(o.triton_name)


def _options(options: ExportOptions | None, overrides: dict[str, Any]) -> ExportOptions:
    o = options if options is not None else ExportOptions()
    unknown = sorted(set(overrides) - set(ExportOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"export_bundle() got unknown options {unknown}; see clipn_export.options.ExportOptions")
    o = replace(o, **overrides)
    if isinstance(o.calibration, (str, os.PathLike)):  # one folder given as such, not as a sequence of them
        o = replace(o, calibration=(os.fspath(o.calibration),))
    return o


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    """Records the wall-clock seconds of ``stage`` (a finished one only) in ``seconds``."""
    t0 = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - t0


@dataclass(frozen=True)
class _Job:
    """One export under way: the model, its text bank and prompts, what was asked, and where it is staged."""

    loaded: LoadedCLIPN
    bank: TextBank
    prompts: PromptSet
    options: ExportOptions
    staging: Path
    scale: float
    size: int
    seconds: dict[str, float]
    #: MCM's one-prompt bank (C×D), baked into the engines as output ``mcm_single``; None without it.
    bank_single: npt.NDArray[np.float32] | None = None


def _single_bank(loaded: LoadedCLIPN, classes: Sequence[str], o: ExportOptions) -> npt.NDArray[np.float32] | None:
    if not o.mcm_bank:
        return None
    if o.open_vocabulary:
        log.info("MCM's one-prompt bank: not in open-vocabulary engines (their class banks are inputs)")
        return None
    return build_single_bank(loaded, list(classes), batch_size=o.text_batch_size)


def _reference(
    loaded: LoadedCLIPN,
    pixels: npt.NDArray[np.float32],
    bank: TextBank,
    scale: float,
    bank_single: npt.NDArray[np.float32] | None = None,
) -> tuple[Scores, npt.NDArray[np.float32]]:
    """PyTorch image tower (fp32) + the numpy reference scoring: what every engine must reproduce."""
    import torch

    model = loaded.model
    device = next(model.parameters()).device
    # No TF32 convolutions on a GPU: the reference must be full fp32 (the gate's 1e-4 is tighter than TF32).
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        feats = model.encode_image(torch.from_numpy(pixels).to(device), normalize=False).float().cpu().numpy()
    scores = score_features(
        feats,
        bank.yes,
        bank.no,
        scale,
        msp_scale=MSP_SCALE,
        mcm_temperature=MCM_TEMPERATURE,
        bank_single=bank_single,
    )
    return scores, l2_normalize(feats).astype(np.float32)


def _prompts_record(ps: PromptSet, variant: str) -> dict[str, Any]:
    return {
        **ps.to_dict(),
        "variant": variant,
        "no_tower_templates": "yes" if variant == "learnable" else "no",
        "ensembling": "w_c = normalize(sum_t normalize(E(template_t(c)))), yes and no towers (docs/export.md)",
    }


def export_bundle(
    loaded: LoadedCLIPN,
    classes: Sequence[str],
    out_dir: str | Path,
    options: ExportOptions | None = None,
    **overrides: Any,
) -> ExportResult:
    """Export ``loaded`` (a :class:`clipn_train.factory.LoadedCLIPN`) for ``classes`` into the bundle ``out_dir``.

    ``options`` (:class:`~clipn_export.options.ExportOptions`; default: clipn-export's defaults) says which
    engines and extras to write; keyword ``overrides`` replace its fields (``export_bundle(m, c, "b/",
    fp16=True)``). Raises :class:`ParityGateError` after writing the bundle when the gate fails,
    :class:`UserError` for bad arguments before any work.
    """
    o = _options(options, overrides)
    out_dir = Path(out_dir)
    _check_request(loaded, classes, out_dir, o)
    ps = load_prompts(o.prompts) if isinstance(o.prompts, str) else o.prompts
    model = loaded.model
    if model.training:
        model.eval()
    seconds: dict[str, float] = {}
    with _timed(seconds, "text_bank"):
        bank = build_text_bank(
            loaded, list(classes), ps, batch_size=o.text_batch_size, cache_dir=o.cache_dir, progress=o.progress
        )
        bank_single = _single_bank(loaded, classes, o)
    scale = float(o.scale) if o.scale is not None else float(model.scale)
    job = _Job(
        loaded, bank, ps, o, _staging_dir(out_dir), scale, int(loaded.info.image_size), seconds, bank_single
    )
    try:
        result = _assemble(job)
    except BaseException:
        shutil.rmtree(job.staging, ignore_errors=True)
        raise
    replace_dir(job.staging, out_dir)
    result.bundle_dir = out_dir
    if o.triton_repo is not None:
        result.triton_dir = _write_triton(result, o)
    log.info("bundle written: %s", out_dir)
    if result.parity is not None and not result.parity.passed:
        raise ParityGateError(result)
    return result


def check_request(classes: Sequence[str], out_dir: Path, o: ExportOptions) -> None:
    """Every check of the request that needs neither work nor the model (the CLI runs it before loading the
    model, so that a mistake costs nothing)."""
    _validate(classes, o)
    _check_out_dir(out_dir, o.overwrite)
    triton_dir = o.triton_dir
    if triton_dir is not None and triton_dir.exists() and not o.overwrite:
        raise UserError(f"{triton_dir} already exists; pick another --triton-name or pass --overwrite")


def _check_request(loaded: LoadedCLIPN, classes: Sequence[str], out_dir: Path, o: ExportOptions) -> None:
    """:func:`check_request`, and what only the loaded model can tell."""
    check_request(classes, out_dir, o)
    if o.open_vocabulary:
        from clipn_export.tokenizer_export import check_supported

        check_supported(loaded.tokenizer)


def _staging_dir(out_dir: Path) -> Path:
    """A fresh hidden directory next to ``out_dir`` (same filesystem: the final move is a rename)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def _write_triton(result: ExportResult, o: ExportOptions) -> Path:
    """Triton serves the plan when there is one, else the fp16, int8 or fp32 ONNX (first present)."""
    from clipn_export.triton import write_triton_repo

    assert o.triton_repo is not None
    m = result.manifest
    plan = m.file(ROLE_TENSORRT)
    chosen: BundleFile
    if plan is not None:
        chosen = plan
    else:
        by_precision = {e.precision: e for e in m.engines()}
        chosen = next(by_precision[p] for p in ("fp16", "int8", "fp32") if p in by_precision)
    return write_triton_repo(
        o.triton_repo,
        o.triton_name,
        result.bundle_dir / chosen.path,
        max_batch=o.max_batch,
        inputs=chosen.inputs,
        outputs=chosen.outputs,
        classes=m.classes,
        overwrite=o.overwrite,
        tensorrt=m.tensorrt if plan is not None else None,
    )


def _assemble(job: _Job) -> ExportResult:
    """Every file of the bundle into ``job.staging``, in stages: engines, parity gate, open-vocabulary parts,
    TensorRT plan, manifest (and the open-vocabulary check, which reads the staged bundle as the runtime will)."""
    o = job.options
    job.bank.save(job.staging / TEXT_BANK_FILE)
    calibration = _load_calibration(job) if o.int8 and o.calibration else None
    engines, extra_files = _write_engines(job, calibration)
    report = _run_parity_gate(job, engines, calibration) if o.parity.enabled else None
    files = [
        *engines,
        *extra_files,
        hash_entry(job.staging, TEXT_BANK_FILE, ROLE_TEXT_BANK, meta={"key": job.bank.key}),
    ]
    ov_section = None
    if o.open_vocabulary:
        from clipn_export.openvocab_export import write_open_vocabulary

        with _timed(job.seconds, "open_vocabulary"):
            ov_section, ov_files = write_open_vocabulary(job.loaded, job.staging)
        files += ov_files
    plan = _build_plan(job) if o.tensorrt else None
    if plan is not None:
        files.append(plan)
    manifest = _manifest(job, files, report, plan, ov_section)
    if report is not None and calibration is not None:  # the gate ran on the user's images, not generated ones
        manifest.parity["images_from"] = _gate_images_from(calibration)
    write_manifest(job.staging, manifest)
    if o.open_vocabulary and o.parity.enabled:
        from clipn_export.openvocab_export import check_open_vocabulary

        with _timed(job.seconds, "open_vocabulary_parity"):
            manifest = check_open_vocabulary(job.loaded, job.staging, manifest, job.bank, progress=o.progress)
            write_manifest(job.staging, manifest)
    return ExportResult(job.staging, manifest, job.bank, report, seconds=job.seconds)


# ---- engines ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parts:
    """The ONNX pieces every engine is chained from: optional uint8 preprocessing, the encoder, the head."""

    front: list[tuple[str, Any]]
    encoder: Any
    head: ScoringHead
    head_graph: Any


def _export_parts(job: _Job) -> _Parts:
    o, info = job.options, job.loaded.info
    with _timed(job.seconds, "onnx_export"):
        head = ScoringHead(
            job.bank.yes,
            job.bank.no,
            job.scale,
            full_outputs=o.full_outputs,
            embeddings=o.embeddings,
            bank_single=job.bank_single,
        )
        head_graph = ox.export_head(head, bank_inputs=o.open_vocabulary)
        encoder = ox.export_encoder(
            job.loaded.model, job.size, input_name=ox.PIXELS if o.uint8_input else ox.IMAGE_INPUT
        )
        front = (
            [(ox.PREFIX_PREPROCESS, ox.export_preprocess(info.mean, info.std, job.size))] if o.uint8_input else []
        )
    return _Parts(front, encoder, head, head_graph)


def _write_engines(
    job: _Job, calibration: CalibrationSet | None = None
) -> tuple[list[BundleFile], list[BundleFile]]:
    """One engine per requested precision; returns their entries and those of any external-data files."""
    parts = _export_parts(job)
    engines: list[BundleFile] = []
    extra_files: list[BundleFile] = []
    for p in job.options.precisions:
        with _timed(job.seconds, f"engine_{p}"):
            engine, extra = _write_engine(job, parts, p, calibration)
        engines.append(engine)
        extra_files += extra
        log.info("engine %s: %s (%.1f MB)", p, engine.path, engine.meta["bytes"] / 1e6)
    return engines, extra_files


def _load_calibration(job: _Job) -> CalibrationSet:
    """The calibration images, decoded and cropped as the runtime will (the bundle's preprocessing), and the
    images held out of them for the parity gate."""
    from clipn_export.int8_calibration import find_calibration_images, load_calibration

    o = job.options
    with _timed(job.seconds, "calibration_images"):
        hold_out = o.parity.held_out if o.parity.enabled else 0
        found = find_calibration_images(o.calibration, o.calibration_size, hold_out)
        calibration = load_calibration(found, _preprocess(job.loaded.info, job.size, uint8_input=False))
    log.info("int8: static, calibrated on %d of your images (%d found)", len(calibration), calibration.found)
    return calibration


def _write_engine(
    job: _Job, parts: _Parts, p: str, calibration: CalibrationSet | None = None
) -> tuple[BundleFile, list[BundleFile]]:
    o = job.options
    quantization: dict[str, Any] | None = None
    if p == "fp16":
        enc = prec.to_fp16(parts.encoder)
    elif p == "int8" and calibration is not None:
        # The encoder graph alone is quantised, then chained: the preprocessing and the head stay fp32.
        enc, quantization = prec.to_int8_static(parts.encoder, calibration, progress=o.progress)
    elif p == "int8":
        enc = prec.to_int8(parts.encoder, o.int8_options)
        quantization = {"method": INT8_DYNAMIC, **vars(o.int8_options or prec.Int8Options())}
    else:
        enc = parts.encoder
    graph = ox.chain([*parts.front, (ox.PREFIX_ENCODER, enc), (ox.PREFIX_HEAD, parts.head_graph)])
    if o.open_vocabulary:  # the baked banks become the bank inputs' defaults
        ox.add_bank_defaults(graph, parts.head.bank.numpy(), parts.head.bank_no.numpy())
    name = prec.ENGINE_FILES[p]
    written = ox.save_model(graph, job.staging / name)
    inputs, outputs = ox.graph_signature(graph)
    meta = _engine_meta(o, p, written, quantization)
    extra = []
    if len(written) > 1:
        meta["external_data"] = written[1].name
        extra.append(hash_entry(job.staging, written[1].name, "other", meta={"external_data_of": name}))
    engine = hash_entry(
        job.staging, name, ROLE_IMAGE_ENGINE, precision=p, inputs=inputs, outputs=outputs, meta=meta
    )
    return engine, extra


def _engine_meta(
    o: ExportOptions, p: str, written: Sequence[Path], quantization: dict[str, Any] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "encoder_precision": p,
        "head_precision": "fp32",
        "opset": ox.OPSET,
        "exporter": ox.EXPORTER,
        "max_batch": o.max_batch,
        "bytes": sum(f.stat().st_size for f in written),
    }
    if o.open_vocabulary:
        meta["bank_inputs"] = dict(ox.BANK_INPUTS)
    if quantization is not None:  # how the int8 encoder was quantised, and on what
        meta["quantization"] = quantization
    disabled = disabled_optimizers_for(p)
    if disabled:  # what every session of this engine must skip (clipn_runtime.engine reads it from here)
        meta[DISABLED_OPTIMIZERS_KEY] = list(disabled)
    return meta


# ---- parity gate, TensorRT plan -------------------------------------------------------------------------------


def _run_parity_gate(
    job: _Job, engines: list[BundleFile], calibration: CalibrationSet | None = None
) -> ParityReport:
    o, info = job.options, job.loaded.info
    with _timed(job.seconds, "parity"):
        images = _gate_images(job, calibration)
        pixels = normalize_uint8(images, info.mean, info.std)
        ref, ref_emb = _reference(job.loaded, pixels, job.bank, job.scale, job.bank_single)

        def runner(entry: BundleFile, path: NumericPath) -> Any:
            def run(x: Any) -> dict[str, Any]:
                # The engine clipn-detect opens for this path (--device cpu, or openvino with the path's hint),
                # from the manifest entry it reads; opened when its turn comes and closed after, so one engine's
                # memory is held at a time.
                spec = replace(EngineSpec.from_bundle(job.staging, entry), inference_precision=path.hint)
                device = "cpu" if path.backend == ONNXRUNTIME else path.backend
                engine = open_engine(spec, device=device, threads=o.threads, log_severity=3)
                try:
                    return engine.run({ox.IMAGE_INPUT: x})
                finally:
                    engine.close()

            return run

        paths, skipped = gate_paths(engines, open_vocabulary=o.open_vocabulary)
        report = run_parity(
            [(path, runner(entry, path)) for entry, path in paths],
            images if o.uint8_input else pixels,
            ref,
            ref_emb if o.embeddings else None,
            o.parity,
            errors=(EngineError,),
        )
        report.skipped.update(skipped)
        return report


def _gate_images(job: _Job, calibration: CalibrationSet | None) -> npt.NDArray[np.uint8]:
    """The parity gate's crops: generated ones, or — for a calibrated int8 engine — the user's images held out
    of the calibration. A static int8 engine saturates activations outside the ranges it was calibrated on, so
    on generated gradients and stripes it cannot rank like PyTorch (toy world: ρ 0.85, where it ranks held-out
    ID images at 0.9996 and the toy's OOD images at 0.9997; docs/export.md): the gate checks it, and every
    other engine of the bundle, on the images it is meant for."""
    o = job.options
    if calibration is None:
        return parity_images(o.parity.images, job.size, o.parity.seed)
    if calibration.held_out:
        return np.stack(calibration.held_out)
    # None held out (too few images, or none of them decodable): the gate runs on calibration images, a
    # weaker check, said in the log and in the manifest.
    log.warning("parity: no --calibration images held out of the calibration; the gate checks calibration images")
    return np.stack(calibration.crops[: o.parity.images])


def _gate_images_from(calibration: CalibrationSet) -> str:
    if calibration.held_out:
        return f"{len(calibration.held_out)} --calibration images held out of the calibration"
    return "--calibration images (none could be held out of the calibration)"


def gate_paths(
    engines: Sequence[BundleFile], *, open_vocabulary: bool
) -> tuple[list[tuple[BundleFile, NumericPath]], dict[str, str]]:
    """The numeric paths the gate runs here — every engine on onnxruntime, and on OpenVINO (f32, and bf16 where
    this CPU runs it) when it is installed — and those it cannot run here, with the reason."""
    from clipn_runtime.ov_engine import cpu_supports_bf16, onednn_cap_allows_bf16, openvino_importable

    paths: list[tuple[BundleFile, NumericPath]] = []
    skipped: dict[str, str] = {}
    openvino = openvino_importable() and not open_vocabulary
    bf16 = openvino and cpu_supports_bf16()
    for e in engines:
        p = e.precision or "fp32"
        paths.append((e, NumericPath(p)))
        for hint in ("f32", "bf16"):
            path = NumericPath(p, OPENVINO, hint)
            if open_vocabulary:
                continue  # OpenVINO folds the bank inputs into constants: the runtime never runs these
            if not openvino:
                skipped[path.key] = "OpenVINO was not installed where the bundle was exported"
            elif hint == "bf16" and not bf16:
                skipped[path.key] = "the export machine's CPU does not run bf16" + (
                    "" if onednn_cap_allows_bf16() else " (oneDNN capped below it by ONEDNN_MAX_CPU_ISA)"
                )
            else:
                paths.append((e, path))
    return paths, skipped


def _build_plan(job: _Job) -> BundleFile:
    """``model.plan``'s entry; its ``meta`` is also the manifest's ``tensorrt`` record."""
    from clipn_export.tensorrt import PLAN_FILE, build_engine

    o = job.options
    with _timed(job.seconds, "tensorrt"):
        # Strongly typed, from the engine whose types it keeps (int8 is onnxruntime's dynamic quantisation,
        # which TensorRT does not take).
        source = "fp16" if o.fp16 else "fp32"
        built = build_engine(
            job.staging / prec.ENGINE_FILES[source],
            job.staging / PLAN_FILE,
            input_name=ox.IMAGE_INPUT,
            sample_shape=(job.size, job.size, 3) if o.uint8_input else (3, job.size, job.size),
            max_batch=o.max_batch,
            opt_batch=o.opt_batch,
            precision=source,
            timing_cache=o.timing_cache,
        )
        return hash_entry(
            job.staging,
            PLAN_FILE,
            ROLE_TENSORRT,
            precision=built.info["precision"],
            inputs=built.inputs,
            outputs=built.outputs,
            meta=built.info,
        )


# ---- manifest ---------------------------------------------------------------------------------------------------


def _manifest(
    job: _Job,
    files: list[BundleFile],
    report: ParityReport | None,
    plan: BundleFile | None,
    ov_section: OpenVocabulary | None,
) -> Manifest:
    info = job.loaded.info
    return Manifest(
        model=_model_identity(info, embed_dim=int(job.bank.yes.shape[1])),
        preprocess=_preprocess(info, job.size, job.options.uint8_input),
        classes=list(job.bank.classes),
        prompts=_prompts_record(job.prompts, info.variant),
        scoring=Scoring(
            scale=job.scale,
            msp_scale=MSP_SCALE,
            mcm_temperature=MCM_TEMPERATURE,
            mcm_prompt=MCM_PROMPT if job.bank_single is not None else None,
        ),
        files=files,
        versions=_versions(),
        parity=report.to_dict() if report is not None else {"passed": None, "skipped": True},
        tensorrt=plan.meta if plan is not None else None,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        open_vocabulary=ov_section,
    )


def _model_identity(info: ModelInfo, *, embed_dim: int) -> ModelIdentity:
    return ModelIdentity(
        name=info.model_name,
        config=info.model_config,
        pretrained=info.pretrained,
        weights_sha256=info.weights_sha256,
        checkpoint_sha256=info.checkpoint_sha256,
        checkpoint_kind=info.checkpoint_kind,
        variant=info.variant,
        context_length=info.context_length,
        embed_dim=embed_dim,
        # What the model was loaded from, as clipn-export takes it (files as absolute paths), so that the
        # re-export command clipn-detect suggests for another class list runs as printed.
        model_arg=info.model_arg or info.model_name,
        pretrained_arg=info.pretrained_arg,
        checkpoint_path=info.checkpoint_path,
    )


def _preprocess(info: ModelInfo, size: int, uint8_input: bool) -> Preprocess:
    mean, std = (tuple(float(v) for v in values) for values in (info.mean, info.std))
    if len(mean) != 3 or len(std) != 3:
        raise UserError(f"the model's preprocessing has mean {mean} and std {std}; RGB needs 3 values each")
    return Preprocess(
        image_size=size,
        mean=(mean[0], mean[1], mean[2]),
        std=(std[0], std[1], std[2]),
        interpolation=info.interpolation,
        resize=info.resize_mode,
        crop="center",
        input_layout="NHWC" if uint8_input else "NCHW",
        input_dtype="uint8" if uint8_input else "float32",
    )


__all__ = ["EMBEDDING_OUTPUT", "ExportOptions", "ExportResult", "ParityGateError", "export_bundle"]
