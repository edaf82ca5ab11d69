"""The bundle: the one contract between ``clipn-export`` (writes it) and ``clipn_runtime`` (reads it).

A bundle is a directory::

    clipn.json          the manifest below (versioned, validated on load)
    model.onnx          image engine(s): encoder + fused scoring head; model.fp16.onnx / model.int8.onnx variants
    text_bank.npz       the yes/no class banks baked into the engines (arrays ``yes``, ``no``; C×D, fp32)
    model.plan          optional TensorRT engine (+ the TensorRT version and GPU it was built for)

Open-vocabulary bundles (``clipn-export --open-vocabulary``) add ``text_encoder_yes.onnx``,
``text_encoder_no.onnx`` and ``tokenizer.json`` (roles ``text_encoder_yes``/``text_encoder_no``/``tokenizer``)
and the manifest section ``open_vocabulary`` (:class:`OpenVocabulary`); their image engines take the class
banks as inputs (defaulting to the baked ones), so the runtime can swap in banks for a new class list.

The runtime refuses a bundle whose manifest format/version it does not know, whose files are missing or do not
match their sha256, or whose fields are inconsistent — with one message listing every problem and what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipn_runtime.errors import UserError

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
KNOWN_ROLES = frozenset(
    {
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


class BundleError(UserError):
    """A bundle that cannot be used as it is; the message lists each problem and what to do."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``shape`` uses strings for symbolic dims (``"batch"``)."""

    name: str
    shape: list[int | str]
    dtype: str


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
    """The scale ``s`` of ``l = s·f·Wᵀ`` and the baselines' fixed constants (DESIGN §3)."""

    scale: float = 100.0
    msp_scale: float = 100.0
    mcm_temperature: float = 1.0


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


@dataclass(frozen=True)
class Manifest:
    """``clipn.json``. ``model`` holds the identity of the weights (open_clip name and config, pretrained tag or
    weights hash, checkpoint hash and kind, variant); ``versions`` what made the bundle; ``parity`` the export
    gate's measurements; ``tensorrt`` the TensorRT version/GPU a ``model.plan`` was built for."""

    model: dict[str, Any]
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
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

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
            model=dict(d["model"]),
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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    classes = d["classes"]
    if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        p.append("'classes' must be a non-empty list of non-empty strings")
    pre = d["preprocess"]
    for key in ("image_size", "mean", "std"):
        if key not in pre:
            p.append(f"'preprocess.{key}' is missing")
    unknown = set(pre) - set(Preprocess.__dataclass_fields__)
    if unknown:
        p.append(f"'preprocess' has unknown fields {sorted(unknown)}")
    if not isinstance(pre.get("image_size"), int) or pre.get("image_size", 0) <= 0:
        p.append("'preprocess.image_size' must be a positive integer")
    for key in ("mean", "std"):
        v = pre.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            p.append(f"'preprocess.{key}' must be 3 numbers")
    if pre.get("input_dtype", "float32") not in INPUT_DTYPES:
        p.append(f"'preprocess.input_dtype' must be one of {INPUT_DTYPES}")
    if pre.get("input_layout", "NCHW") not in INPUT_LAYOUTS:
        p.append(f"'preprocess.input_layout' must be one of {INPUT_LAYOUTS}")
    sc = d["scoring"]
    unknown = set(sc) - set(Scoring.__dataclass_fields__)
    if unknown:
        p.append(f"'scoring' has unknown fields {sorted(unknown)}")
    for key, v in sc.items():
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            p.append(f"'scoring.{key}' must be a positive number")
    for i, f in enumerate(d["files"]):
        if not isinstance(f, dict) or not all(isinstance(f.get(k), str) for k in ("path", "sha256", "role")):
            p.append(f"'files[{i}]' needs string 'path', 'sha256' and 'role'")
            continue
        if f["role"] not in KNOWN_ROLES:
            p.append(f"'files[{i}]' ({f['path']}) has unknown role {f['role']!r}")
        if f.get("precision") is not None and f["precision"] not in PRECISIONS:
            p.append(f"'files[{i}]' ({f['path']}) has unknown precision {f['precision']!r}")
        if Path(f["path"]).is_absolute() or ".." in Path(f["path"]).parts:
            p.append(f"'files[{i}]' path {f['path']!r} must be relative and inside the bundle")
    if not any(isinstance(f, dict) and f.get("role") == ROLE_IMAGE_ENGINE for f in d["files"]):
        p.append("no file with role 'image_engine'")
    if d.get("open_vocabulary") is not None:
        p.extend(_open_vocabulary_problems(d["open_vocabulary"]))
    return p


def write_manifest(bundle_dir: str | Path, manifest: Manifest) -> Path:
    """Write ``clipn.json`` (atomically: temp file then rename, so a crash never leaves half a manifest)."""
    out = Path(bundle_dir) / MANIFEST_NAME
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    tmp.replace(out)
    return out


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
    manifest = Manifest.from_dict(raw)
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
