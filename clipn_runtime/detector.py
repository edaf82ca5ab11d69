"""The Python API: :class:`Detector` scores images, frames and videos with a bundle; :class:`Detection` is a result.

::

    from clipn_runtime import Detector

    det = Detector("bundle/")                      # validates the bundle, picks TensorRT → CUDA → CPU
    for d in det.detect(["a.jpg", "b.png"]):
        print(d.path, d.pred, d.p_ood, d.ood)

Images are decoded and preprocessed in a thread pool (PIL releases the GIL) while the engine runs the previous
batch; at most a few batches are in flight, so :meth:`Detector.iter_detect` streams any number of inputs with
flat memory. A bad input (unreadable, truncated, not an image, a decompression bomb, a broken link) becomes a
:class:`Detection` with ``error`` set and the run goes on.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image

from clipn_runtime.bundle import (
    ROLE_TENSORRT,
    ROLE_TEXT_BANK,
    TOWERS,
    BundleError,
    BundleFile,
    Manifest,
    load_manifest,
)
from clipn_runtime.calibration import (
    Calibration,
    CalibrationError,
    MeasuredOn,
    bundle_calibration,
    classes_digest,
)
from clipn_runtime.engine import (
    CUDA_EP,
    Engine,
    EngineError,
    EngineSpec,
    available_providers,
    check_device,
    open_engine,
    tensorrt_importable,
)
from clipn_runtime.engine_choice import (
    ONNXRUNTIME,
    NumericPath,
    PathChoice,
    choose_path,
    cpu_has_amx,
    cpu_has_int8_dot,
)
from clipn_runtime.errors import UserError
from clipn_runtime.inputs import path_fields, printable
from clipn_runtime.preprocess import ImageDecodeError, Preprocessor, open_image
from clipn_runtime.prompts import PromptSet, load_prompts
from clipn_runtime.scoring import (
    BASELINE_OUTPUTS,
    DECISION_METHODS,
    FULL_OUTPUTS,
    METHODS,
    SCALAR_OUTPUTS,
    methods_of,
)
from clipn_runtime.shards import ShardSample
from clipn_runtime.vocab import check_classes

if TYPE_CHECKING:
    from clipn_runtime.openvocab import BankBuilder, ClassBanks

log = logging.getLogger(__name__)

#: A path, a PIL image, an H×W×3 uint8 RGB array, or a file's bytes in a ``BytesIO`` (scored as that file).
ImageInput = Union[str, "os.PathLike[str]", io.BytesIO, Image.Image, np.ndarray]
ScalarValue = float | int | bool

#: The record fields of the JSONL format (docs/detect.md), in order (``frame``/``time`` and the smoothing fields are
#: added for video frames).
RECORD_FIELDS: tuple[str, ...] = (
    "path",
    "pred",
    "pred_index",
    "prob",
    "p_no",
    "ctw",
    "atd",
    "p_ood",
    "ood",
    "method",
    "rule",
    "error",
)
VIDEO_FIELDS: tuple[str, ...] = ("frame", "time")
SMOOTH_FIELDS: tuple[str, ...] = ("ood_score_smooth", "ood_smooth")
#: Method → the output holding its OOD probability (what smoothing averages): ATD's p_ood, CTW's p_no(ĉ).
OOD_SCORE_FIELD = {"atd": "p_ood", "ctw": "p_no"}
_INPUT = "image"


@dataclass(frozen=True)
class Detection:
    """The result for one image or video frame.

    ``pred`` is the class name of ``pred_index``; ``prob`` its posterior; ``p_no`` the "no" probability of that
    class; ``ctw``/``atd`` the two CLIPN ID-scores; ``p_ood = 1 − atd``; ``ood`` the decision of ``method`` by
    ``rule``: ``calibrated@0.95`` (clipn-calibrate's threshold) or ``threshold-free`` (CTW's and ATD's own rule).
    When the input failed, ``error`` holds the message and every score is ``None``. ``scores`` holds
    every scalar the engine emits (also ``msp``, ``mcm``, ``max_logit``, ``energy`` and, with MCM's one-prompt
    bank, ``mcm_single``).
    """

    path: str | None
    pred: str | None
    pred_index: int | None
    prob: float | None
    p_no: float | None
    ctw: float | None
    atd: float | None
    p_ood: float | None
    ood: bool | None
    method: str
    rule: str | None = None
    error: str | None = None
    frame: int | None = None
    time: float | None = None
    ood_score_smooth: float | None = None
    ood_smooth: bool | None = None
    scores: dict[str, ScalarValue] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(cls, path: str | None, method: str, error: str, **kw: Any) -> Detection:
        return cls(path, None, None, None, None, None, None, None, None, method, None, error, **kw)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: the documented fields, plus ``frame``/``time`` for video frames and the smoothing
        fields when smoothing is on. Every string is valid UTF-8: a file name that is not gets its undecodable
        bytes escaped in ``path`` and its exact bytes in ``path_b64`` (base64)."""
        d: dict[str, Any] = {"path": None} if self.path is None else path_fields(self.path)
        d.update({k: getattr(self, k) for k in RECORD_FIELDS if k != "path"})
        if self.error is not None:
            d["error"] = printable(self.error)
        if self.frame is not None:
            d.update({k: getattr(self, k) for k in VIDEO_FIELDS})
        if self.ood_score_smooth is not None:
            d.update({k: getattr(self, k) for k in SMOOTH_FIELDS})
        return d


def _nonfinite_message(values: list[str]) -> str:
    return (
        f"the engine returned non-finite scores ({', '.join(values)}), so no decision was made; the bundle is "
        "broken (check 'preprocess' and 'scoring' in its clipn.json, or re-export it) or this precision "
        "overflows (try --precision fp32)"
    )


@dataclass
class _Prepared:
    """A decoded, preprocessed input (or the reason it failed)."""

    path: str | None
    array: np.ndarray | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Detector:
    """Loads a bundle and scores images with it.

    ``device``: ``auto`` (native TensorRT plan if the bundle has one and it runs here, else onnxruntime with
    TensorRT → CUDA → CPU as available, or OpenVINO on a CPU where it is installed), ``cpu`` (onnxruntime),
    ``cuda``, ``tensorrt``, ``openvino`` or ``openvino:<device>``. ``method``: ``atd`` or ``ctw`` (decides
    ``ood``). ``precision`` (fp32/bf16/fp16/int8) narrows the engine choice; by default the fastest engine and
    backend that passed the export's parity gate runs (:mod:`clipn_runtime.engine_choice`), and one that did not
    is refused unless ``allow_unchecked``. ``threads``: intra-op threads (default: the backend's).
    ``decode_workers``: image decoding threads. ``max_pixels``: larger images are refused as decompression bombs
    (default: PIL's limit).
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        *,
        device: str = "auto",
        method: str = "atd",
        batch_size: int = 16,
        threads: int | None = None,
        precision: str | None = None,
        decode_workers: int | None = None,
        max_pixels: int | None = None,
        verify_hashes: bool = True,
        allow_unchecked: bool = False,
        calibration: str | os.PathLike[str] | None = None,
        use_calibration: bool = True,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        try:
            check_device(device)
        except EngineError as e:
            raise ValueError(str(e)) from None
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = load_manifest(self.bundle_dir, verify_hashes=verify_hashes)
        self.method = method
        self.classes: list[str] = list(self.manifest.classes)
        self.preprocessor = Preprocessor(self.manifest.preprocess)
        self.max_pixels = max_pixels
        self.decode_workers = decode_workers or min(4, os.cpu_count() or 1)
        self.device, self.threads, self.precision = device, threads, precision
        self.allow_unchecked = allow_unchecked
        #: The numeric path that runs (None: the native TensorRT plan, which the manifest records separately).
        self.numeric_path: NumericPath | None = None
        self.engine_entry: BundleFile
        #: clipn-calibrate's thresholds: a sidecar ``calibration``, else the bundle's own (``use_calibration``);
        #: loaded first, so that the engine choice can prefer the path they were measured on.
        self.calibration: Calibration | None = None
        self._calibration_source = ""
        if use_calibration:
            self._calibration_source = (
                str(calibration) if calibration is not None else f"the calibration of {self.bundle_dir}"
            )
            self.calibration = (
                Calibration.load(calibration)
                if calibration is not None
                else bundle_calibration(self.bundle_dir, self.manifest)
            )
        self.engine: Engine = self._open_engine(device, threads, precision)
        self.batch_size = batch_size
        if self.engine.max_batch is not None and batch_size > self.engine.max_batch:
            log.info("batch size %d lowered to the engine's maximum %d", batch_size, self.engine.max_batch)
            self.batch_size = self.engine.max_batch
        #: Extra graph inputs fed with every batch: the class banks of an open-vocabulary bundle whose class
        #: list or prompts were changed (:meth:`set_classes`); empty = the banks baked into the engine.
        self._extra_feeds: dict[str, np.ndarray] = {}
        #: The banks in use when they are not the baked ones.
        self.banks: ClassBanks | None = None
        self._bank_builder: BankBuilder | None = None
        self._validate()
        #: The scalar outputs read per image: CLIPN's and the baselines', plus those of the banks this engine has.
        self.score_outputs: tuple[str, ...] = SCALAR_OUTPUTS + tuple(
            n for n in BASELINE_OUTPUTS if n in self.engine.output_names
        )
        #: The methods this engine can score (``mcm-single`` only with MCM's one-prompt bank baked in).
        self.methods: tuple[str, ...] = methods_of(self.score_outputs)
        if method not in self.methods:
            self.close()
            why = (
                "an open-vocabulary bundle has none: export one without --open-vocabulary for this method"
                if self.manifest.is_open_vocabulary
                else "it was exported with --no-mcm-bank or before the bank existed: export it again with clipn-export"
            )
            raise UserError(f"--method {method} needs MCM's one-prompt bank, which {self.bundle_dir} lacks; {why}")
        self._check_calibration()
        if self.manifest.parity.get("passed") is False:
            log.warning(
                "%s failed clipn-export's parity gate (see 'parity' in its clipn.json): its scores may not match "
                "the PyTorch model",
                self.bundle_dir,
            )
        log.info("engine: %s%s", self.engine.describe(), "".join(f" — {n}" for n in self.engine.fallback_notes))

    # -- decisions ------------------------------------------------------------------------------------------------
    @property
    def rule(self) -> str:
        """How ``ood`` is decided: ``calibrated@<tpr>`` or ``threshold-free`` (CTW's / ATD's own rule)."""
        if self.calibration is not None and self.method in self.calibration.thresholds:
            return self.calibration.rule
        return "threshold-free"

    @property
    def decision_id(self) -> str:
        """The rule and, when calibrated, which calibration: what a resumed results file must share."""
        if self.calibration is None:
            return self.rule
        digest = hashlib.sha256(self.calibration.to_json().encode()).hexdigest()[:12]
        return f"{self.rule} {digest}"

    def measured_on(self) -> MeasuredOn:
        """What computes this detector's scores (the identity a calibration is tied to)."""
        entry = self.engine_entry
        bank = self.manifest.file(ROLE_TEXT_BANK)
        banks = self.banks.key if self.banks is not None else (bank.sha256 if bank is not None else "")
        return MeasuredOn(
            engine_file=entry.path,
            engine_sha256=entry.sha256,
            numeric_path=self.numeric_path.key if self.numeric_path is not None else "tensorrt-plan",
            precision=self.numeric_precision,
            classes_sha256=classes_digest(self.classes),
            banks_sha256=banks,
        )

    def _check_calibration(self) -> None:
        """A calibration must match this engine and class list; a baseline method needs one."""
        if self.calibration is not None:
            self.calibration.check(self.measured_on(), self._calibration_source)
            if self.method not in self.calibration.thresholds:
                raise CalibrationError(
                    f"{self._calibration_source} has no threshold for {self.method} (it has "
                    f"{', '.join(self.calibration.thresholds)}); run clipn-calibrate again"
                )
        elif self.method not in DECISION_METHODS:
            raise CalibrationError(
                f"--method {self.method} has no decision rule of its own: it needs a calibrated threshold. Run "
                f"clipn-calibrate ID_IMAGES/ -e {self.bundle_dir} (held-out images of your classes) first, or use "
                f"--method {' or '.join(DECISION_METHODS)}"
            )

    def _decide(self, row: dict[str, ScalarValue]) -> bool:
        if self.calibration is not None:
            return self.calibration.is_ood(self.method, float(row[METHODS[self.method][0]]))
        decision = METHODS[self.method][1]
        assert decision is not None  # _check_calibration refused a baseline without a calibration
        return bool(row[decision])

    # -- setup ----------------------------------------------------------------------------------------------
    def _open_engine(
        self, device: str, threads: int | None, precision: str | None, *, native_plan: bool = True
    ) -> Engine:
        plan = self.manifest.file(ROLE_TENSORRT) if native_plan else None
        if plan is not None and device in ("auto", "tensorrt"):
            if tensorrt_importable():
                try:
                    spec = EngineSpec.from_bundle(self.bundle_dir, plan, built_for=self.manifest.tensorrt)
                    engine = open_engine(spec, device=device)
                    self.numeric_path, self.engine_entry = None, plan
                    return engine
                except EngineError as e:
                    if device == "tensorrt":
                        raise
                    log.warning("not using the bundle's TensorRT plan: %s", e)
            elif device == "tensorrt":
                log.info("tensorrt/pycuda not installed: running the ONNX engine with onnxruntime's TensorRT EP")
        choice = self._choose(device, precision)
        try:
            return self._open_path(choice, device, threads)
        except EngineError as e:
            if device != "auto" or choice.path.backend == ONNXRUNTIME:
                raise
            # auto: a backend that cannot start here (OpenVINO failing to compile) leaves onnxruntime.
            log.warning("not using %s: %s", choice.path.describe(), e)
            return self._open_path(self._choose("cpu", precision), "cpu", threads)

    def _choose(self, device: str, precision: str | None) -> PathChoice:
        from clipn_runtime.ov_engine import cpu_supports_bf16, openvino_importable

        wants_ov = device == "auto" or device.startswith("openvino")
        openvino = wants_ov and openvino_importable()
        choice = choose_path(
            self.manifest,
            device=device,
            precision=precision,
            gpu=device == "auto" and CUDA_EP in available_providers(),
            openvino=openvino,
            bf16=openvino and cpu_supports_bf16(),
            allow_unchecked=self.allow_unchecked,
            prefer=self.calibration.measured_on.numeric_path if self.calibration is not None else None,
            int8_dot=cpu_has_int8_dot(),
            amx=cpu_has_amx(),
        )
        for why in choice.skipped:
            log.info("engine choice: skipped %s", why)
        if choice.unchecked is not None:
            log.warning(
                "running the %s, which clipn-export's parity gate did not pass (%s): its scores may not match "
                "the model",
                choice.path.describe(),
                choice.unchecked,
            )
        return choice

    def _open_path(self, choice: PathChoice, device: str, threads: int | None) -> Engine:
        spec = replace(EngineSpec.from_bundle(self.bundle_dir, choice.entry), inference_precision=choice.path.hint)
        if choice.path.backend != ONNXRUNTIME and not device.startswith("openvino"):
            device = choice.path.backend  # auto → openvino (its CPU plugin)
        engine = open_engine(
            spec,
            device=device,
            threads=threads,
            # Open-vocabulary engines take the class banks as initialisers that are also inputs, and onnxruntime
            # warns about each at load; that is the design here, not a problem to report.
            log_severity=3 if self.manifest.is_open_vocabulary else None,
        )
        self.numeric_path, self.engine_entry = choice.path, choice.entry
        return engine

    def _validate(self) -> None:
        """The graph must take ``image`` as the manifest says and emit every scalar output, and every class
        count (text bank, per-class outputs) must equal the class list."""
        problems: list[str] = []
        c = len(self.classes)
        if _INPUT not in self.engine.input_names:
            problems.append(f"the engine has no input {_INPUT!r} (inputs: {', '.join(self.engine.input_names)})")
        missing = [n for n in SCALAR_OUTPUTS if n not in self.engine.output_names]
        if missing:
            problems.append(f"the engine lacks outputs {missing}")
        outputs = self.engine.output_specs()
        for name in FULL_OUTPUTS:
            shape = outputs[name].shape if name in outputs else []
            if len(shape) == 2 and isinstance(shape[1], int) and shape[1] != c:
                problems.append(f"output {name!r} has {shape[1]} classes, the manifest lists {c}")
        image = self.engine.input_specs().get(_INPUT)
        if image is not None:
            shape, pre = image.shape, self.manifest.preprocess
            if image.dtype != pre.input_dtype:
                problems.append(f"input {_INPUT!r} is {image.dtype}, the manifest says {pre.input_dtype}")
            s = pre.image_size
            want = [3, s, s] if pre.input_layout == "NCHW" else [s, s, 3]
            if len(shape) != 4 or any(isinstance(a, int) and a != b for a, b in zip(shape[1:], want, strict=True)):
                problems.append(f"input {_INPUT!r} has shape {shape}, the manifest implies [batch, {want}]")
        bank = self.manifest.file(ROLE_TEXT_BANK)
        if bank is not None:
            try:
                with np.load(self.bundle_dir / bank.path, allow_pickle=False) as z:
                    for key in z.files:
                        if z[key].ndim == 2 and z[key].shape[0] != c:
                            problems.append(f"{bank.path}:{key} has {z[key].shape[0]} classes, manifest lists {c}")
            except (OSError, ValueError) as e:
                problems.append(f"{bank.path}: cannot read: {e}")
        if problems:
            raise BundleError(
                f"{self.bundle_dir}: the bundle is inconsistent:\n  - "
                + "\n  - ".join(problems)
                + "\nre-export it with clipn-export"
            )

    # -- classes ---------------------------------------------------------------------------------------------
    def set_classes(
        self,
        names: Sequence[str],
        prompts: str | PromptSet | None = None,
        *,
        source: str | os.PathLike[str] = "classes.txt",
        progress: bool = True,
    ) -> None:
        """Score against the class list ``names`` from now on.

        Equal to the bundle's classes (and no other ``prompts``): the engine's baked banks. An open-vocabulary
        bundle (``clipn-export --open-vocabulary``) computes the yes/no banks of ``names`` with its ONNX text
        encoders — ``prompts`` (a :class:`PromptSet` or ``clipn``/``clean``/``openai``/a file) replaces the
        bundle's templates — caches them beside the bundle and feeds them to the engine; a second call with the
        same classes and prompts reads the cache and encodes nothing. Any other bundle raises
        :class:`~clipn_runtime.vocab.ClassListMismatch` holding the ``clipn-export`` commands that fix it.
        ``source`` names the class list in messages.
        """
        from clipn_runtime.openvocab import bundle_prompts

        names = list(names)
        ps = load_prompts(prompts) if isinstance(prompts, str) else prompts
        if check_classes(self.manifest, names, bundle_dir=self.bundle_dir, classes_file=os.fspath(source)):
            baked = bundle_prompts(self.manifest) if ps is not None else None
            if ps is None or (baked is not None and (ps.yes, ps.no) == (baked.yes, baked.no)):
                self.classes, self._extra_feeds, self.banks = names, {}, None
                self._check_calibration()
                return
        if self._bank_builder is None:
            from clipn_runtime.openvocab import BankBuilder

            self._bank_builder = BankBuilder(
                self.bundle_dir, self.manifest, device=self.device, threads=self.threads
            )
        banks = self._bank_builder.banks(names, ps, progress=progress)
        self._ensure_bank_inputs()
        spec = self._bank_builder.spec
        self._extra_feeds = {spec.bank_inputs["yes"]: banks.yes, spec.bank_inputs["no"]: banks.no}
        self.classes, self.banks = names, banks
        self._check_calibration()
        if banks.from_cache:
            log.info("%d classes: class banks from the cache %s (no text encoding)", len(names), banks.cache)
        else:
            where = f"cached in {banks.cache}" if banks.cache is not None else "not cached"
            log.info(
                "%d classes: class banks computed (%d prompts per tower), %s",
                len(names),
                banks.encoded["yes"],
                where,
            )

    def _ensure_bank_inputs(self) -> None:
        """The engine must take the bank inputs; a native TensorRT plan (banks fixed at build time) is replaced
        by the bundle's ONNX engine in onnxruntime."""
        assert self._bank_builder is not None
        wanted = [self._bank_builder.spec.bank_inputs[t] for t in TOWERS]

        def takes_banks() -> bool:
            names = set(self.engine.input_names) | set(self.engine.optional_input_names)
            return all(n in names for n in wanted)

        if takes_banks():
            return
        plan = self.manifest.file(ROLE_TENSORRT)
        if plan is not None and self.engine.path == self.bundle_dir / plan.path:
            log.warning(
                "the bundle's TensorRT plan has its classes built in; running its ONNX engine with onnxruntime "
                "for the new class list"
            )
            self.engine.close()
            self.engine = self._open_engine(self.device, self.threads, self.precision, native_plan=False)
            if takes_banks():
                return
        raise BundleError(
            f"{self.bundle_dir}: the image engine has no class-bank inputs {wanted} (inputs: "
            f"{', '.join(self.engine.input_names)}); re-export the bundle with clipn-export --open-vocabulary"
        )

    @property
    def engine_file(self) -> str:
        """The bundle file the engine runs (``model.onnx``, ``model.fp16.onnx``, ``model.plan``)."""
        path = self.engine.path
        return path.name if path is not None else self.engine.describe()

    @property
    def numeric_precision(self) -> str:
        """The precision the scores are computed in: fp32, bf16 (OpenVINO's hint on the fp32 file), fp16, int8."""
        if self.numeric_path is not None:
            return self.numeric_path.numeric
        plan = self.manifest.file(ROLE_TENSORRT)
        return str(plan.precision or "fp32") if plan is not None else "fp32"

    @property
    def provider(self) -> str:
        """What runs the graph: an onnxruntime execution provider or the native TensorRT runtime."""
        return self.engine.providers[0]

    # -- core -------------------------------------------------------------------------------------------------
    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The raw engine outputs for an already preprocessed batch (the engine's layout and dtype)."""
        return self.engine.run({_INPUT: batch, **self._extra_feeds})

    def _prepare(self, item: ImageInput) -> _Prepared:
        if isinstance(item, (str, os.PathLike, io.BytesIO)):
            path = None if isinstance(item, io.BytesIO) else os.fspath(item)
            try:
                img = open_image(item, self.max_pixels)
                return _Prepared(path, self.preprocessor(img))
            except ImageDecodeError as e:
                return _Prepared(path, error=str(e))
            except Exception as e:  # a decodable file PIL cannot convert (odd modes): an error record, not a stop
                log.debug("%s: preprocessing failed", path, exc_info=True)
                return _Prepared(path, error=f"cannot preprocess image: {type(e).__name__}: {e}")
        if isinstance(item, Image.Image):
            return _Prepared(None, self.preprocessor(item))
        if isinstance(item, np.ndarray):
            return _Prepared(None, self.preprocessor(self.preprocessor.from_array(item)))
        raise TypeError(f"cannot detect on a {type(item).__name__}: pass paths, PIL images or H×W×3 uint8 arrays")

    def _score(self, batch: list[_Prepared]) -> list[Detection]:
        good = [p for p in batch if p.array is not None]
        out: dict[str, np.ndarray] = {}
        if good:
            arrays = [p.array for p in good if p.array is not None]
            out = self.run(self.preprocessor.batch(arrays))
        results: list[Detection] = []
        rule = self.rule
        j = 0
        for p in batch:
            if p.array is None:
                results.append(Detection.failed(p.path, self.method, p.error or "unknown error", **p.extra))
                continue
            row: dict[str, ScalarValue] = {k: out[k][j].item() for k in self.score_outputs}
            j += 1
            nonfinite = [f"{k}={v}" for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
            if nonfinite:
                results.append(Detection.failed(p.path, self.method, _nonfinite_message(nonfinite), **p.extra))
                continue
            idx = int(row["pred"])
            if not 0 <= idx < len(self.classes):
                raise BundleError(
                    f"the engine predicted class {idx} but the bundle has {len(self.classes)} classes"
                )
            results.append(
                Detection(
                    path=p.path,
                    pred=self.classes[idx],
                    pred_index=idx,
                    prob=float(row["prob"]),
                    p_no=float(row["p_no"]),
                    ctw=float(row["ctw"]),
                    atd=float(row["atd"]),
                    p_ood=float(row["p_ood"]),
                    ood=self._decide(row),
                    method=self.method,
                    rule=rule,
                    scores=row,
                    **p.extra,
                )
            )
        return results

    # -- images -------------------------------------------------------------------------------------------------
    def iter_batches(
        self, items: Iterable[ImageInput], *, batch_size: int | None = None
    ) -> Iterator[list[Detection]]:
        """Stream results one batch at a time, in input order (an app can flush after each batch).

        Decoding runs ahead in the thread pool by at most two batches; ``items`` is consumed lazily.
        """
        yield from self._pipeline(iter(items), self._prepare, batch_size)

    def iter_shard_batches(
        self, samples: Iterable[ShardSample], *, batch_size: int | None = None
    ) -> Iterator[list[Detection]]:
        """:meth:`iter_batches` for the samples of tar shards: each record is named ``shard#key``, and an image
        member is decoded exactly as the same bytes in a file would be (same scores). Pass the samples of
        consecutive shards as one iterable (:class:`~clipn_runtime.shards.ShardStream`): batches then span shards,
        with no pipeline restart and no partial batch per shard."""
        yield from self._pipeline(iter(samples), self._prepare_shard, batch_size)

    def _prepare_shard(self, sample: ShardSample) -> _Prepared:
        if sample.data is None:
            return _Prepared(sample.name, error=sample.error or "no image in this sample")
        return replace(self._prepare(io.BytesIO(sample.data)), path=sample.name)

    def iter_detect(self, items: Iterable[ImageInput], *, batch_size: int | None = None) -> Iterator[Detection]:
        """Stream one :class:`Detection` per input, in order, with bounded memory."""
        for batch in self.iter_batches(items, batch_size=batch_size):
            yield from batch

    def detect(self, items: Iterable[ImageInput] | ImageInput) -> list[Detection]:
        """Score paths, PIL images or H×W×3 uint8 RGB arrays (one item or many) → one Detection each."""
        if isinstance(items, (str, os.PathLike, io.BytesIO, Image.Image)) or (
            isinstance(items, np.ndarray) and items.ndim == 3
        ):
            items = [items]
        return list(self.iter_detect(items))

    def detect_frames(self, frames: Sequence[np.ndarray] | np.ndarray) -> list[Detection]:
        """Score video frames already in memory: H×W×3 uint8 RGB arrays (or one N×H×W×3 array).
        The result equals :meth:`detect` on the same pixels."""
        if isinstance(frames, np.ndarray) and frames.ndim == 3:
            frames = [frames]
        return list(self.iter_detect(frames))

    def _pipeline(
        self, items: Iterator[Any], prepare: Callable[[Any], _Prepared], batch_size: int | None
    ) -> Iterator[list[Detection]]:
        bs = batch_size or self.batch_size
        if self.engine.max_batch is not None:
            bs = min(bs, self.engine.max_batch)
        limit = 2 * bs + self.decode_workers  # decoded inputs held at once: the memory bound
        pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="clipn-decode")
        pending: deque[Future[_Prepared]] = deque()
        # The input stream failed (a video that breaks mid-decode): everything it gave before is still scored
        # and yielded, then the failure is raised, so no finished frame is lost.
        failed: list[Exception] = []
        try:

            def fill() -> None:
                while not failed and len(pending) < limit:
                    try:
                        item = next(items)
                    except StopIteration:
                        return
                    except Exception as e:
                        failed.append(e)
                        return
                    pending.append(pool.submit(prepare, item))

            fill()
            batch: list[_Prepared] = []
            while pending:
                batch.append(pending.popleft().result())
                fill()
                if len(batch) == bs:
                    yield self._score(batch)
                    batch = []
            if batch:
                yield self._score(batch)
            if failed:
                raise failed[0]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- video ----------------------------------------------------------------------------------------------------
    def iter_video_batches(
        self,
        source: str | os.PathLike[str],
        *,
        every: int = 1,
        smoothing: float | None = None,
        batch_size: int | None = None,
        skip_frames: Container[int] = (),
        smoothing_seed: float | None = None,
    ) -> Iterator[list[Detection]]:
        """:meth:`detect_video`, one batch of frames at a time (an app can flush after each batch)."""
        from clipn_runtime.video import VideoFrame, iter_frames, prefetch

        if smoothing is not None and not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if smoothing is not None and self.method not in OOD_SCORE_FIELD:
            raise UserError(
                f"smoothing averages an OOD probability, which --method {self.method} does not have; smooth with "
                "--method atd or ctw"
            )
        path = os.fspath(source)
        bs = batch_size or self.batch_size
        decoded = (f for f in iter_frames(path, every=every) if f.index not in skip_frames)
        frames = prefetch(decoded, maxsize=2 * bs)

        def prepare(f: VideoFrame) -> _Prepared:
            return _Prepared(path, self._prepare(f.image).array, extra={"frame": f.index, "time": f.time})

        ema = smoothing_seed
        try:
            for batch in self._pipeline(frames, prepare, bs):
                if smoothing is not None:
                    smoothed = []
                    for d in batch:
                        if d.ok:
                            x = float(d.scores[OOD_SCORE_FIELD[self.method]])
                            ema = x if ema is None else smoothing * x + (1.0 - smoothing) * ema
                            d = replace(d, ood_score_smooth=ema, ood_smooth=ema > 0.5)
                        smoothed.append(d)
                    batch = smoothed
                yield batch
        finally:
            frames.close()

    def detect_video(
        self,
        source: str | os.PathLike[str],
        *,
        every: int = 1,
        smoothing: float | None = None,
        batch_size: int | None = None,
        skip_frames: Container[int] = (),
        smoothing_seed: float | None = None,
    ) -> Iterator[Detection]:
        """Yield a Detection for every ``every``-th frame of a video file or stream URL (needs PyAV).

        Frames are decoded in a background thread and scored in batches. Each record has ``frame`` (index in
        the stream, counting every frame) and ``time`` (seconds). ``smoothing=α`` in (0, 1] adds an
        exponential moving average of the method's OOD probability over the scored frames
        (``ood_score_smooth = α·x + (1 − α)·previous``, with x = ``p_ood`` for ATD, ``p_no`` for CTW) and
        ``ood_smooth = ood_score_smooth > 0.5`` — exactly CTW's rule on the smoothed ``p_no``, and for ATD a
        conservative one (``p_ood > 0.5`` implies ATD's own rule). ``skip_frames``: frame indices not to score
        and ``smoothing_seed``: the average over the frames before them (``--resume``: the last
        ``ood_score_smooth`` written), so that a resumed video continues the average of an uninterrupted run.
        Raises :class:`~clipn_runtime.video.VideoError` when the video cannot be opened or decoded, after
        yielding every frame decoded before the failure.
        """
        for batch in self.iter_video_batches(
            source,
            every=every,
            smoothing=smoothing,
            batch_size=batch_size,
            skip_frames=skip_frames,
            smoothing_seed=smoothing_seed,
        ):
            yield from batch

    # -- lifetime ---------------------------------------------------------------------------------------------------
    def close(self) -> None:
        self.engine.close()
        if self._bank_builder is not None:
            self._bank_builder.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Detector({str(self.bundle_dir)!r}, {len(self.classes)} classes, method={self.method!r}, "
            f"engine={self.engine.describe()!r})"
        )
