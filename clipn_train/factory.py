"""Build a CLIPN model from names and files: model config, base weights, checkpoint, tokenizer, transforms.

The layout follows open_clip: :mod:`clipn_train.model` is the ``nn.Module`` alone, :mod:`clipn_train.checkpoint`
reads and writes weights for it, and this module, which imports both, turns command-line values
(``--model``, ``--pretrained``, ``--checkpoint``, ``--variant``) into a ready :class:`LoadedCLIPN`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP

from clipn_runtime.errors import InputFileError, UserError
from clipn_runtime.fileio import sha256_file
from clipn_train import checkpoint as ckpt
from clipn_train.model import CLIPN, SUPPORTED_MODELS_HINT, VARIANTS

__all__ = ["LoadedCLIPN", "ModelInfo", "create_clipn", "resolve_model_config"]


@dataclass
class ModelInfo:
    """Where a CLIPN model came from and how its images must be preprocessed (goes into manifests and logs)."""

    model_name: str
    model_config: dict[str, Any]
    pretrained: str | None
    weights_sha256: str | None
    checkpoint_sha256: str | None
    checkpoint_kind: str | None
    variant: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    resize_mode: str
    context_length: int
    #: What create_clipn was given (a file as an absolute path), so that a suggested command can repeat it.
    model_arg: str = ""
    pretrained_arg: str | None = None
    checkpoint_path: str | None = None


@dataclass
class LoadedCLIPN:
    model: CLIPN
    tokenizer: Any
    preprocess_train: Any
    preprocess_val: Any
    info: ModelInfo
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)


def _as_given(value: str | Path | None) -> str | None:
    """A command-line value as given, or the absolute path of a file (so it works from any directory)."""
    if value is None:
        return None
    return str(Path(value).absolute()) if Path(str(value)).is_file() else str(value)


# ---------------------------------------------------------------------------------------------------------------
# Model config
# ---------------------------------------------------------------------------------------------------------------


def _check_supported(name: str, cfg: dict[str, Any]) -> None:
    text_cfg = cfg.get("text_cfg", {})
    reason = None
    if "multimodal_cfg" in cfg:
        reason = "it is a CoCa model (captioning decoder)"
    elif isinstance(text_cfg, dict) and text_cfg.get("hf_model_name"):
        reason = f"its text tower is the Hugging Face model {text_cfg['hf_model_name']!r}"
    elif cfg.get("custom_text"):
        reason = "it uses a custom text tower (CustomTextCLIP, e.g. SigLIP, MobileCLIP, EVA)"
    if reason:
        raise UserError(f"--model {name}: not supported because {reason}. {SUPPORTED_MODELS_HINT}.")


def _read_config_file(path: Path) -> dict[str, Any]:
    """A model-config JSON as a config dict; open_clip's ``open_clip_config.json`` layout is unwrapped."""
    if not path.is_file():
        raise UserError(f"--model {path}: no such model-config file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputFileError(path, e.lineno, f"not valid JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(path, None, f"cannot read model config: {e}") from None
    if not isinstance(raw, dict):
        raise InputFileError(path, 1, "a model config must be a JSON object")
    cfg = dict(raw["model_cfg"]) if isinstance(raw.get("model_cfg"), dict) else dict(raw)
    if isinstance(raw.get("preprocess_cfg"), dict):
        cfg["preprocess_cfg"] = raw["preprocess_cfg"]
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise InputFileError(
            path,
            None,
            f"not an open_clip model config: missing {', '.join(missing)} (see open_clip's model_configs)",
        )
    return cfg


def resolve_model_config(model: str | Path) -> tuple[str, dict[str, Any]]:
    """An open_clip model name or a path to an open_clip model-config JSON → (name, config dict).

    A JSON may be a bare model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) or open_clip's
    ``open_clip_config.json`` layout (``model_cfg`` plus ``preprocess_cfg``, kept under ``"preprocess_cfg"``).
    """
    spec = str(model)
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        cfg, name = _read_config_file(path), path.stem
    else:
        found = open_clip.get_model_config(spec)
        if found is None:
            raise UserError(
                f"--model {spec}: not an open_clip model name nor a model-config JSON file. "
                "Run `python -c 'import open_clip; print(open_clip.list_models())'` for the names."
            )
        cfg, name = copy.deepcopy(found), spec
    _check_supported(name, cfg)
    return name, cfg


def _is_builtin(model: str | Path) -> bool:
    return open_clip.get_model_config(str(model)) is not None and not Path(str(model)).is_file()


# ---------------------------------------------------------------------------------------------------------------
# Base CLIP, tokenizer
# ---------------------------------------------------------------------------------------------------------------


def _tagged_clip(model: str | Path, name: str, tag: str) -> Any:
    """open_clip's model ``name`` with its released weights ``tag`` (downloaded or from open_clip's cache)."""
    if not _is_builtin(model):
        raise UserError(
            f"--pretrained {tag}: not a file, and open_clip tags only exist for built-in model names "
            f"(--model {model} is a config file); pass a local weights file"
        )
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise UserError(
            f"--pretrained {tag}: not a file and not an open_clip tag for {name} (tags: {', '.join(tags) or 'none'})"
        )
    try:
        return open_clip.create_model(name, pretrained=tag)
    except RuntimeError as e:
        raise UserError(
            f"--pretrained {tag}: could not fetch the weights ({e}); on an offline machine pass a local weights file"
        ) from None


def _load_weights_file(clip: CLIP, name: str, path: Path) -> None:
    """Load a local weights file strictly into ``clip``; every way it can fail is one UserError line that says
    whether the file could not be read or does not fit the model."""
    try:  # reading first tells a damaged file from a model mismatch (open_clip raises the same types for both)
        open_clip.factory.load_state_dict(str(path))
    except Exception as e:  # unreadable/corrupt files surface as many exception types
        raise UserError(ckpt.load_failure(f"--pretrained {path}", e)) from None
    try:
        open_clip.load_checkpoint(clip, str(path), strict=True)
    except Exception as e:  # missing/unexpected keys, wrong shapes, open_clip's position-embedding asserts
        detail = " ".join(str(e).split()) or type(e).__name__
        detail = detail if len(detail) <= 400 else detail[:399] + "…"
        raise UserError(f"--pretrained {path}: these weights do not fit --model {name} ({detail})") from None


def _configured_clip(name: str, cfg: dict[str, Any], weights: Path | None) -> CLIP:
    """A CLIP built from ``cfg`` (random init), with the weights file ``weights`` loaded if given."""
    clip = CLIP(**{k: v for k, v in cfg.items() if k not in ("preprocess_cfg", "custom_text")})
    pp = open_clip.transform.PreprocessCfg(size=clip.visual.image_size)
    open_clip.model.set_model_preprocess_cfg(clip, {**pp.__dict__, **cfg.get("preprocess_cfg", {})})
    if weights is not None:
        _load_weights_file(clip, name, weights)
    return clip


def _build_base(
    model: str | Path, name: str, cfg: dict[str, Any], pretrained: str | Path | None
) -> tuple[CLIP, str | None, str | None]:
    """The base CLIP with its weights → (clip, open_clip tag or None, sha256 of a local weights file or None)."""
    tag: str | None = None
    sha: str | None = None
    if pretrained is not None and not Path(str(pretrained)).is_file():
        tag = str(pretrained)
        clip = _tagged_clip(model, name, tag)
    else:
        path = None if pretrained is None else Path(str(pretrained))
        sha = None if path is None else sha256_file(path)
        clip = _configured_clip(name, cfg, path)
    if not isinstance(clip, CLIP):
        raise UserError(f"--model {name}: built {type(clip).__name__}. {SUPPORTED_MODELS_HINT}.")
    return clip, tag, sha


def _tokenizer(model: str | Path, name: str, cfg: dict[str, Any]) -> Any:
    if _is_builtin(model):
        return open_clip.get_tokenizer(name)
    text_cfg = cfg["text_cfg"]
    ctx = int(text_cfg.get("context_length", 77))
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(
            text_cfg["hf_tokenizer_name"], context_length=ctx, **text_cfg.get("tokenizer_kwargs", {})
        )
    return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint, variant, the whole model
# ---------------------------------------------------------------------------------------------------------------


def _open_checkpoint(
    checkpoint: str | Path | None, name: str, cfg: dict[str, Any], pretrained: str | Path | None
) -> tuple[ckpt.CheckpointContents | None, str | Path | None]:
    """The checkpoint's contents and the base weights to use with it (ours records them; the official one
    carries the whole CLIP, so ``pretrained`` must be left out)."""
    if checkpoint is None:
        return None, pretrained
    contents = ckpt.read_checkpoint(checkpoint)
    if contents.base_state is not None and pretrained is not None:
        raise UserError(
            f"--checkpoint {checkpoint} is an official CLIPN checkpoint and carries the whole CLIP; "
            f"drop --pretrained {pretrained}"
        )
    if contents.kind == "clipn-ood":
        pretrained = ckpt.check_base_matches(contents, name, cfg, pretrained)
    return contents, pretrained


def _resolve_variant(
    variant: str | None, contents: ckpt.CheckpointContents | None, checkpoint: str | Path | None
) -> str:
    """``variant`` if given (it must agree with the checkpoint), else the checkpoint's, else learnable."""
    if variant is not None and variant not in VARIANTS:
        raise UserError(f"--variant {variant}: choose one of {', '.join(VARIANTS)}")
    resolved = variant or (contents.variant if contents is not None else "learnable")
    if contents is not None and contents.variant != resolved:
        raise UserError(
            f"--checkpoint {checkpoint} holds a {contents.variant} CLIPN model but --variant {variant} was asked"
        )
    return resolved


def _with_checkpoint(
    clip: CLIP, variant: str, contents: ckpt.CheckpointContents | None, checkpoint: str | Path | None
) -> CLIPN:
    """The CLIPN model around ``clip`` with the checkpoint's tensors (its CLIP part too, if it has one)."""
    if contents is not None and contents.base_state is not None:
        ckpt.load_strict(clip.state_dict(keep_vars=True), contents.base_state, str(checkpoint), "the CLIP part")
    clipn = CLIPN(clip, variant)
    if contents is not None:
        ckpt.load_no_tower(clipn, contents.no_state, source=str(checkpoint))
    return clipn


def create_clipn(
    model: str | Path,
    pretrained: str | Path | None = None,
    *,
    variant: str | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> LoadedCLIPN:
    """Build a CLIPN model, its tokenizer and transforms.

    * ``model``: open_clip model name or model-config JSON path.
    * ``pretrained``: base CLIP weights: an open_clip tag (downloads where possible) or a local weights file
      (open_clip checkpoint, state dict or safetensors). ``None``: random init, or what ``checkpoint`` says.
    * ``checkpoint``: a clipn-ood no-tower checkpoint (``.safetensors``) or an official CLIPN checkpoint
      (torch pickle, read with ``weights_only=True``). The official one carries the whole CLIP, so it
      conflicts with ``pretrained``. Both are loaded strictly.
    * ``variant``: ``learnable`` | ``handcrafted``; ``None`` means what the checkpoint holds (else learnable);
      a value that contradicts the checkpoint is an error.
    """
    model_arg, pretrained_arg = _as_given(model), _as_given(pretrained)  # before `pretrained` is resolved
    name, cfg = resolve_model_config(model)
    contents, pretrained = _open_checkpoint(checkpoint, name, cfg, pretrained)
    resolved_variant = _resolve_variant(variant, contents, checkpoint)
    base_from_checkpoint = contents is not None and contents.base_state is not None
    clip, tag, weights_sha = _build_base(model, name, cfg, None if base_from_checkpoint else pretrained)
    clipn = _with_checkpoint(clip, resolved_variant, contents, checkpoint)
    clipn.to(device)
    clipn.eval()

    ours = contents.metadata if contents is not None and contents.kind == "clipn-ood" else {}
    pp = dict(clip.visual.preprocess_cfg)
    pp_cfg = open_clip.transform.PreprocessCfg(**pp)
    size = pp_cfg.size if isinstance(pp_cfg.size, int) else int(pp_cfg.size[0])
    info = ModelInfo(
        model_name=name,
        model_config=cfg,
        pretrained=ours.get("pretrained") or tag,
        weights_sha256=ours.get("weights_sha256") or (None if base_from_checkpoint else weights_sha),
        checkpoint_sha256=None if contents is None else contents.sha256,
        checkpoint_kind=None if contents is None else contents.kind,
        variant=resolved_variant,
        image_size=int(size),
        mean=tuple(float(v) for v in pp_cfg.mean),
        std=tuple(float(v) for v in pp_cfg.std),
        interpolation=str(pp_cfg.interpolation),
        resize_mode=str(pp_cfg.resize_mode),
        context_length=clipn.context_length,
        model_arg=model_arg or name,
        pretrained_arg=pretrained_arg,
        checkpoint_path=_as_given(checkpoint),
    )
    return LoadedCLIPN(
        model=clipn,
        tokenizer=_tokenizer(model, name, cfg),
        preprocess_train=open_clip.transform.image_transform_v2(pp_cfg, is_train=True),
        preprocess_val=open_clip.transform.image_transform_v2(pp_cfg, is_train=False),
        info=info,
        preprocess_cfg=pp,
    )
