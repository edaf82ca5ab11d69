"""The bundle: the one contract between ``clipn-export`` (writes it) and ``clipn_runtime`` (reads it).

A bundle is a directory::

    clipn.json          the manifest below (versioned, validated on load)
    model.onnx          image engine(s): encoder + fused scoring head; model.fp16.onnx / model.int8.onnx variants
    text_bank.npz       the yes/no class banks baked into the engines (arrays ``yes``, ``no``; C×D, fp32)
    model.plan          optional TensorRT engine (+ the TensorRT version and GPU it was built for)

Open-vocabulary bundles (``clipn-export --open-vocabulary``) add ``text_encoder_yes.onnx``,
``text_encoder_no.onnx`` and ``tokenizer.json`` (roles ``text_encoder_yes``/``text_encoder_no``/``tokenizer``)
and the manifest section ``open_vocabulary`` (:class:`OpenVocabulary`), which alone makes a bundle
open-vocabulary (:attr:`Manifest.is_open_vocabulary`); their image engines take the class banks as inputs
(defaulting to the baked ones), so the runtime can swap in banks for a new class list.

The runtime refuses a bundle whose manifest format/version it does not know, whose files are missing or do not
match their sha256, or whose fields are inconsistent — with one message listing every problem and what to do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipn_runtime.errors import UserError
from clipn_runtime.fileio import atomic_write
from clipn_runtime.fileio import sha256_file as sha256_file  # re-exported: part of this module's API
from clipn_runtime.scoring import FULL_OUTPUTS

BUNDLE_FORMAT = "clipn-bundle"
BUNDLE_VERSION = 1
MANIFEST_NAME = "clipn.json"

#: File roles a manifest may list.
ROLE_IMAGE_ENGINE = "image_engine"
ROLE_TEXT_BANK = "text_bank"
ROLE_TENSORRT = "tensorrt_engine"
ROLE_TEXT_ENCODER_YES = "text_encoder_yes"
ROLE_TEXT_ENCODER_NO = "text_encoder_no"
ROLE_TOKENIZER = "tokenizer"
#: clipn-calibrate's thresholds (clipn_runtime.calibration), added to an exported bundle afterwards.
ROLE_CALIBRATION = "calibration"
KNOWN_ROLES = frozenset(
    {
        ROLE_CALIBRATION,
        ROLE_IMAGE_ENGINE,
        ROLE_TEXT_BANK,
        ROLE_TENSORRT,
        ROLE_TEXT_ENCODER_YES,
        ROLE_TEXT_ENCODER_NO,
        ROLE_TOKENIZER,
        "other",
    }
)
PRECISIONS = ("fp32", "fp16", "int8")
INPUT_DTYPES = ("float32", "float16", "uint8")
INPUT_LAYOUTS = ("NCHW", "NHWC")
#: open_clip's names (``image_transform``): 'random' is train-time only and means bicubic at eval.
INTERPOLATIONS = ("bicubic", "bilinear", "random")
RESIZE_MODES = ("shortest", "longest", "squash")
CROPS = ("center", "centre")
#: The engines' image input (what the manifest's ``preprocess`` describes).
IMAGE_INPUT = "image"


class BundleError(UserError):
    """A bundle that cannot be used as it is; the message lists each problem and what to do."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``shape`` uses strings for symbolic dims (``"batch"``)."""

    name: str
    shape: list[int | str]
    dtype: str


#: ``meta.quantization.method`` of an int8 engine: activation ranges measured per batch at run time (onnxruntime's
#: dynamic quantisation), or calibrated once at export (NNCF, a QDQ graph). Engines differ in speed on them.
INT8_DYNAMIC = "onnxruntime dynamic"
INT8_STATIC = "nncf static"


@dataclass(frozen=True)
class BundleFile:
    """A file of the bundle with its hash; engines also carry their precision and graph signature."""

    path: str
    sha256: str
    role: str
    precision: str | None = None
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def output(self, name: str) -> TensorSpec | None:
        return next((o for o in self.outputs if o.name == name), None)

    @property
    def static_int8(self) -> bool:
        """An int8 engine with calibrated activation ranges (an older int8 engine without the record is dynamic)."""
        q = self.meta.get("quantization")
        return self.precision == "int8" and isinstance(q, Mapping) and q.get("method") == INT8_STATIC


@dataclass(frozen=True)
class Preprocess:
    """open_clip's eval transform, as data: resize the shortest side to ``image_size`` with ``interpolation``,
    centre-crop ``image_size``², scale to [0, 1], normalise with ``mean``/``std``.

    ``input_layout``/``input_dtype`` say what the engine takes: ``NCHW float32`` (normalised pixels; ``float16``
    for an fp16 engine without a cast inside) or ``NHWC uint8`` (raw crops, normalised inside the graph).
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize: str = "shortest"
    crop: str = "center"
    input_layout: str = "NCHW"
    input_dtype: str = "float32"


@dataclass(frozen=True)
class Scoring:
    """The scale ``s`` of ``l = s·f·Wᵀ`` and the baselines' fixed constants (docs/math.md)."""

    scale: float = 100.0
    msp_scale: float = 100.0
    mcm_temperature: float = 1.0
    #: The template of the one-prompt bank baked into the engines (their ``mcm_single`` output, MCM as its
    #: paper defines it); None: the bundle has no such bank.
    mcm_prompt: str | None = None


@dataclass(frozen=True)
class OpenVocabulary:
    """``clipn.json``'s ``open_vocabulary`` section: how the runtime computes banks for new classes.

    ``text_encoders``/``bank_inputs`` map a tower (``yes``/``no``) to its encoder file (``tokens`` int64
    batch×sequence → ``text_features`` float32 batch×D, unnormalised) and to the image engines' input that
    takes its C×D bank. ``sequence`` is ``dynamic`` (the encoders take any length 2…``context_length``) or
    ``fixed``; ``truncation_is_exact`` says whether prompts may be cut to their token count (causal mask + EOT
    pooling). ``tokenizer``: the ``tokenizer.json`` file and ``tokenizer_meta`` what it was built from.
    """

    text_encoders: dict[str, str]
    bank_inputs: dict[str, str]
    tokenizer: str
    context_length: int
    embed_dim: int
    sequence: str = "dynamic"
    truncation_is_exact: bool = True
    tokens_input: str = "tokens"
    features_output: str = "text_features"
    tokenizer_meta: dict[str, Any] = field(default_factory=dict)
    #: The export's check of the ONNX encoders + tokenizer against PyTorch + open_clip.
    parity: dict[str, Any] = field(default_factory=dict)


TOWERS: tuple[str, str] = ("yes", "no")
#: CLIPN variants (``clipn_train.model.VARIANTS``; the runtime cannot import it).
VARIANTS: tuple[str, ...] = ("learnable", "handcrafted")
#: The role each part of an open-vocabulary bundle must have in ``files``.
TEXT_ENCODER_ROLES: dict[str, str] = {"yes": ROLE_TEXT_ENCODER_YES, "no": ROLE_TEXT_ENCODER_NO}


@dataclass(frozen=True)
class ModelIdentity:
    """``clipn.json``'s ``model`` section: which weights the engines hold and what ``clipn-export`` loaded them
    from — provenance, never used to score.

    ``name``/``config``: the open_clip model name and its config; ``pretrained``: the base weights' open_clip
    tag, ``weights_sha256`` the hash of a local weights file; ``checkpoint_sha256``/``checkpoint_kind``: the
    CLIPN checkpoint (``official``, or ``clipn-ood``: one clipn-train wrote); ``variant``: ``learnable`` or
    ``handcrafted``.

    ``model_arg``/``pretrained_arg``/``checkpoint_path`` are the export's ``--model``/``--pretrained``/
    ``--checkpoint`` as given (files as absolute paths), so that a suggested re-export runs as printed. Bundles
    from before they were recorded have ``model_arg`` ``None`` (:attr:`records_arguments`). Keys this version
    does not know are kept in ``extra`` and written back unchanged.
    """

    name: str
    config: dict[str, Any] | None = None
    pretrained: str | None = None
    weights_sha256: str | None = None
    checkpoint_sha256: str | None = None
    checkpoint_kind: str | None = None
    variant: str | None = None
    context_length: int | None = None
    embed_dim: int | None = None
    model_arg: str | None = None
    pretrained_arg: str | None = None
    checkpoint_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def records_arguments(self) -> bool:
        """The export recorded its arguments: ``pretrained_arg`` ``None`` then means none was given."""
        return self.model_arg is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON section: one key per field, ``extra``'s keys beside them."""
        d = {f: getattr(self, f) for f in _MODEL_FIELDS}
        return {**d, **{k: v for k, v in self.extra.items() if k not in d}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelIdentity:
        known = {k: v for k, v in d.items() if k in _MODEL_FIELDS}
        return cls(**known, extra={k: v for k, v in d.items() if k not in _MODEL_FIELDS})


_MODEL_FIELDS = tuple(f for f in ModelIdentity.__dataclass_fields__ if f != "extra")
_MODEL_STRINGS = (
    "pretrained",
    "weights_sha256",
    "checkpoint_sha256",
    "checkpoint_kind",
    "model_arg",
    "pretrained_arg",
    "checkpoint_path",
)


def _model_problems(m: dict[str, Any]) -> list[str]:
    """Unknown keys are allowed (kept in ``extra``): the section is provenance, so a key a newer exporter adds
    must not make this runtime refuse a bundle it can run; a known key of the wrong type is refused."""
    p = []
    if not (isinstance(m.get("name"), str) and m["name"]):
        p.append("'model.name' must be the model's name (a non-empty string)")
    p += [f"'model.{k}' is {m[k]!r}; it must be a string or null" for k in _MODEL_STRINGS if not _opt(m, k, str)]
    if not _opt(m, "config", dict):
        p.append("'model.config' must be an object (the open_clip model config) or null")
    p += [
        f"'model.{k}' is {m[k]!r}; it must be a positive integer or null"
        for k in ("context_length", "embed_dim")
        if m.get(k) is not None and not _is_positive_int(m[k])
    ]
    if m.get("variant") is not None and m["variant"] not in VARIANTS:
        p.append(f"'model.variant' is {m['variant']!r}; it must be one of {', '.join(VARIANTS)} or null")
    return p


def _opt(section: dict[str, Any], key: str, typ: type) -> bool:
    return section.get(key) is None or isinstance(section[key], typ)


def _open_vocabulary_problems(ov: Any) -> list[str]:
    if not isinstance(ov, dict):
        return ["'open_vocabulary' must be an object"]
    p = []
    unknown = set(ov) - set(OpenVocabulary.__dataclass_fields__)
    if unknown:
        p.append(f"'open_vocabulary' has unknown fields {sorted(unknown)}")
    for key in ("text_encoders", "bank_inputs"):
        v = ov.get(key)
        if not (isinstance(v, dict) and set(v) == set(TOWERS) and all(isinstance(x, str) for x in v.values())):
            p.append(f"'open_vocabulary.{key}' must map 'yes' and 'no' to names")
    if not isinstance(ov.get("tokenizer"), str):
        p.append("'open_vocabulary.tokenizer' must be a file name")
    for key in ("context_length", "embed_dim"):
        if not isinstance(ov.get(key), int) or ov[key] <= 0:
            p.append(f"'open_vocabulary.{key}' must be a positive integer")
    if ov.get("sequence", "dynamic") not in ("dynamic", "fixed"):
        p.append("'open_vocabulary.sequence' must be 'dynamic' or 'fixed'")
    return p


def _open_vocabulary_file_problems(ov: dict[str, Any], files: list[Any]) -> list[str]:
    """Every file the section names must be listed (hashed, so checked on load) with the role of its part."""
    roles = {f.get("path"): f.get("role") for f in files if isinstance(f, dict)}
    wanted = {ov["text_encoders"][t]: TEXT_ENCODER_ROLES[t] for t in TOWERS}
    wanted[ov["tokenizer"]] = ROLE_TOKENIZER
    p = []
    for path, role in wanted.items():
        if path not in roles:
            p.append(f"'open_vocabulary' names {path!r}, which 'files' does not list")
        elif roles[path] != role:
            p.append(f"'open_vocabulary' names {path!r} as the {role}, but 'files' lists it as {roles[path]!r}")
    return p


@dataclass(frozen=True)
class Manifest:
    """``clipn.json``. ``model`` is the identity of the weights (:class:`ModelIdentity`); ``versions`` what made
    the bundle; ``parity`` the export gate's measurements; ``tensorrt`` the TensorRT version/GPU a
    ``model.plan`` was built for; ``open_vocabulary`` (:attr:`is_open_vocabulary`) how the runtime computes
    banks for a new class list."""

    model: ModelIdentity
    preprocess: Preprocess
    classes: list[str]
    prompts: dict[str, Any]
    scoring: Scoring
    files: list[BundleFile]
    versions: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    tensorrt: dict[str, Any] | None = None
    created: str = ""
    format: str = BUNDLE_FORMAT
    version: int = BUNDLE_VERSION
    #: Present in open-vocabulary bundles only (an additive field: older readers ignore it).
    open_vocabulary: OpenVocabulary | None = None

    # -- lookups ---------------------------------------------------------------------------------------
    @property
    def is_open_vocabulary(self) -> bool:
        """The runtime can compute class banks for another class list.

        The ``open_vocabulary`` section alone decides: it is what the runtime needs to do so (which files, which
        engine inputs take the banks, the context length), and on load every file it names must be listed with
        its role. Files with those roles but no section do not make a bundle open-vocabulary.
        """
        return self.open_vocabulary is not None

    def engines(self) -> list[BundleFile]:
        """The ONNX image engines, in manifest order."""
        return [f for f in self.files if f.role == ROLE_IMAGE_ENGINE]

    def engine(self, precision: str | None = None) -> BundleFile:
        """The image engine of ``precision`` (fp32/fp16/int8), or the first one when ``None``."""
        engines = self.engines()
        if not engines:
            raise BundleError("the bundle lists no image engine; re-export it with clipn-export")
        if precision is None:
            return engines[0]
        for e in engines:
            if e.precision == precision:
                return e
        have = ", ".join(str(e.precision) for e in engines)
        raise BundleError(
            f"the bundle has no {precision} engine (it has: {have}); "
            f"re-export with clipn-export --{precision} or pick one of those"
        )

    def file(self, role: str) -> BundleFile | None:
        return next((f for f in self.files if f.role == role), None)

    # -- (de)serialisation -------------------------------------------------------------------------------
    def to_json(self) -> str:
        """Strict JSON: a non-finite float (a NaN parity measurement) is written as null, never as a bare NaN
        that strict parsers reject (and that :meth:`from_dict` would refuse where it matters)."""
        d = {**asdict(self), "model": self.model.to_dict()}
        if self.scoring.mcm_prompt is None:  # absent, as before the field existed: older readers take the bundle
            del d["scoring"]["mcm_prompt"]
        return json.dumps(_finite_or_none(d), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Build from parsed JSON; raises BundleError listing every missing or malformed field."""
        problems = _schema_problems(d)
        if problems:
            raise BundleError("invalid clipn.json:\n  - " + "\n  - ".join(problems))
        pre = dict(d["preprocess"])
        pre["mean"] = tuple(pre["mean"])
        pre["std"] = tuple(pre["std"])
        files = [
            BundleFile(
                path=f["path"],
                sha256=f["sha256"],
                role=f["role"],
                precision=f.get("precision"),
                inputs=[TensorSpec(**t) for t in f.get("inputs", [])],
                outputs=[TensorSpec(**t) for t in f.get("outputs", [])],
                meta=dict(f.get("meta", {})),
            )
            for f in d["files"]
        ]
        ov = d.get("open_vocabulary")
        return cls(
            model=ModelIdentity.from_dict(d["model"]),
            preprocess=Preprocess(**pre),
            classes=list(d["classes"]),
            prompts=dict(d["prompts"]),
            scoring=Scoring(**d["scoring"]),
            files=files,
            versions=dict(d.get("versions", {})),
            parity=dict(d.get("parity", {})),
            tensorrt=d.get("tensorrt"),
            created=str(d.get("created", "")),
            format=d["format"],
            version=d["version"],
            open_vocabulary=None if ov is None else OpenVocabulary(**ov),
        )


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _schema_problems(d: Any) -> list[str]:
    if not isinstance(d, dict):
        return ["the manifest is not a JSON object"]
    if d.get("format") != BUNDLE_FORMAT:
        return [f"'format' is {d.get('format')!r}, expected {BUNDLE_FORMAT!r}: this is not a clipn-ood bundle"]
    if d.get("version") != BUNDLE_VERSION:
        return [
            f"bundle version {d.get('version')!r} is not supported by this clipn-ood (it reads version "
            f"{BUNDLE_VERSION}); upgrade clipn-ood or re-export the bundle with this version"
        ]
    p: list[str] = []
    required = {
        "model": dict,
        "preprocess": dict,
        "classes": list,
        "prompts": dict,
        "scoring": dict,
        "files": list,
    }
    for key, typ in required.items():
        if not isinstance(d.get(key), typ):
            p.append(f"'{key}' is missing or not a {typ.__name__}")
    if p:
        return p
    p.extend(_model_problems(d["model"]))
    classes = d["classes"]
    if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        p.append("'classes' must be a non-empty list of non-empty strings")
    p.extend(_preprocess_problems(d["preprocess"]))
    p.extend(_scoring_problems(d["scoring"]))
    for i, f in enumerate(d["files"]):
        p.extend(_file_problems(i, f, d["preprocess"], len(classes)))
    if not any(isinstance(f, dict) and f.get("role") == ROLE_IMAGE_ENGINE for f in d["files"]):
        p.append("no file with role 'image_engine'")
    ov = d.get("open_vocabulary")
    if ov is not None:
        ov_problems = _open_vocabulary_problems(ov)
        p.extend(ov_problems or _open_vocabulary_file_problems(ov, d["files"]))
    return p


def _is_number(x: Any) -> bool:
    """A finite JSON number (bool is an int in Python, but ``true`` is not a number in a manifest)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _choice_problem(
    section: dict[str, Any], key: str, default: str, allowed: tuple[str, ...], where: str
) -> list[str]:
    v = section.get(key, default)
    return [] if v in allowed else [f"'{where}.{key}' is {v!r}; it must be one of {', '.join(allowed)}"]


def _preprocess_problems(pre: dict[str, Any]) -> list[str]:
    """Every value the image transform uses must make sense: a std of 0 makes every score NaN, an unknown
    interpolation would silently fall back to another one."""
    p = [f"'preprocess.{key}' is missing" for key in ("image_size", "mean", "std") if key not in pre]
    unknown = set(pre) - set(Preprocess.__dataclass_fields__)
    if unknown:
        p.append(f"'preprocess' has unknown fields {sorted(unknown)}")
    if "image_size" in pre and not _is_positive_int(pre["image_size"]):
        p.append(f"'preprocess.image_size' is {pre['image_size']!r}; it must be a positive integer")
    for key in ("mean", "std"):
        v = pre.get(key)
        if key not in pre:
            continue
        if not (isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)):
            p.append(f"'preprocess.{key}' is {v!r}; it must be 3 finite numbers (one per RGB channel)")
        elif key == "std" and not all(x > 0 for x in v):
            p.append(f"'preprocess.std' is {v!r}; every value must be > 0 (pixels are divided by it)")
    p += _choice_problem(pre, "interpolation", "bicubic", INTERPOLATIONS, "preprocess")
    p += _choice_problem(pre, "resize", "shortest", RESIZE_MODES, "preprocess")
    p += _choice_problem(pre, "crop", "center", CROPS, "preprocess")
    p += _choice_problem(pre, "input_dtype", "float32", INPUT_DTYPES, "preprocess")
    p += _choice_problem(pre, "input_layout", "NCHW", INPUT_LAYOUTS, "preprocess")
    return p


def _scoring_problems(sc: dict[str, Any]) -> list[str]:
    p = []
    unknown = set(sc) - set(Scoring.__dataclass_fields__)
    if unknown:
        p.append(f"'scoring' has unknown fields {sorted(unknown)}")
    for key, v in sc.items():
        if key == "mcm_prompt":
            if v is not None and not (isinstance(v, str) and "{}" in v):
                p.append(f"'scoring.mcm_prompt' is {v!r}; it must be null or a template with {{}}")
        elif not _is_number(v) or v <= 0:
            p.append(f"'scoring.{key}' is {v!r}; it must be a finite number > 0")
    return p


def _tensor_problems(where: str, specs: Any) -> list[str]:
    if not isinstance(specs, list):
        return [f"{where} must be a list"]
    p = []
    for j, t in enumerate(specs):
        ok = (
            isinstance(t, dict)
            and set(t) == {"name", "shape", "dtype"}
            and isinstance(t["name"], str)
            and isinstance(t["dtype"], str)
            and isinstance(t["shape"], list)
            and all(
                isinstance(a, str) or (isinstance(a, int) and not isinstance(a, bool) and a >= 0)
                for a in t["shape"]
            )
        )
        if not ok:
            p.append(f"{where}[{j}] must be {{'name': str, 'shape': [int or name, ...], 'dtype': str}}")
    return p


def _image_input_problems(where: str, inputs: list[dict[str, Any]], pre: dict[str, Any]) -> list[str]:
    """The engine's image input, as the manifest lists it, must be the shape ``preprocess`` produces."""
    spec = next((t for t in inputs if t["name"] == IMAGE_INPUT), None)
    size, layout = pre.get("image_size"), pre.get("input_layout", "NCHW")
    if spec is None or not _is_positive_int(size) or layout not in INPUT_LAYOUTS:
        return []
    want = [3, size, size] if layout == "NCHW" else [size, size, 3]
    shape = spec["shape"]
    if len(shape) != 4 or any(isinstance(a, int) and a != b for a, b in zip(shape[1:], want, strict=True)):
        return [
            f"{where} input {IMAGE_INPUT!r} has shape {shape}, but 'preprocess' makes [batch, {want}] ({layout})"
        ]
    return []


def _file_problems(i: int, f: Any, pre: dict[str, Any], n_classes: int) -> list[str]:
    if not isinstance(f, dict) or not all(isinstance(f.get(k), str) for k in ("path", "sha256", "role")):
        return [f"'files[{i}]' needs string 'path', 'sha256' and 'role'"]
    where = f"'files[{i}]' ({f['path']})"
    p = []
    if f["role"] not in KNOWN_ROLES:
        p.append(f"{where} has unknown role {f['role']!r}")
    if f.get("precision") is not None and f["precision"] not in PRECISIONS:
        p.append(f"{where} has unknown precision {f['precision']!r}")
    if Path(f["path"]).is_absolute() or ".." in Path(f["path"]).parts:
        p.append(f"'files[{i}]' path {f['path']!r} must be relative and inside the bundle")
    for key in ("inputs", "outputs"):
        p.extend(_tensor_problems(f"{where} '{key}'", f.get(key, [])))
    if p or f["role"] != ROLE_IMAGE_ENGINE:
        return p
    p.extend(_image_input_problems(where, f.get("inputs", []), pre))
    for t in f.get("outputs", []):
        shape = t["shape"]
        if t["name"] in FULL_OUTPUTS and len(shape) == 2 and isinstance(shape[1], int) and shape[1] != n_classes:
            p.append(f"{where} output {t['name']!r} has {shape[1]} classes, 'classes' lists {n_classes}")
    return p


def write_manifest(bundle_dir: str | Path, manifest: Manifest) -> Path:
    """Write ``clipn.json`` atomically, so a crash never leaves half a manifest."""
    return atomic_write(Path(bundle_dir) / MANIFEST_NAME, manifest.to_json())


def hash_entry(bundle_dir: str | Path, path: str, role: str, **kw: Any) -> BundleFile:
    """A :class:`BundleFile` for ``bundle_dir/path`` with its sha256 computed now."""
    return BundleFile(path=path, sha256=sha256_file(Path(bundle_dir) / path), role=role, **kw)


def load_manifest(bundle_dir: str | Path, *, verify_hashes: bool = True) -> Manifest:
    """Read and validate ``bundle_dir/clipn.json``; with ``verify_hashes`` every listed file is hashed."""
    root = Path(bundle_dir)
    mf = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory; pass the bundle directory written by clipn-export")
    if not mf.is_file():
        raise BundleError(
            f"{root}: no {MANIFEST_NAME}; this is not a clipn-ood bundle (make one with clipn-export)"
        )
    try:
        raw = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{mf}:{e.lineno}: not valid JSON ({e.msg}); re-export the bundle") from None
    try:
        manifest = Manifest.from_dict(raw)
    except BundleError as e:
        raise BundleError(
            f"{root}: {e}\nre-export the bundle with clipn-export (or fix {MANIFEST_NAME})"
        ) from None
    problems: list[str] = []
    for f in manifest.files:
        path = root / f.path
        if not path.is_file():
            problems.append(f"{f.path}: listed in {MANIFEST_NAME} but missing")
        elif verify_hashes and sha256_file(path) != f.sha256:
            problems.append(f"{f.path}: sha256 does not match {MANIFEST_NAME} (file changed or corrupted)")
    if problems:
        raise BundleError(
            f"{root}: bundle files do not match the manifest:\n  - "
            + "\n  - ".join(problems)
            + "\nre-export the bundle (or copy it again completely)"
        )
    return manifest
