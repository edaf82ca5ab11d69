"""CLIPN checkpoints: ours (safetensors, no-tower tensors + metadata) and the official one (torch pickle).

Our checkpoint holds only the trainable no-tower tensors under their official names, plus string metadata
that says which base CLIP they belong to. The official CLIPN checkpoint (xmed-lab/CLIPN) is a torch pickle
``{'epoch', 'name', 'state_dict', 'optimizer'[, 'scaler']}`` whose keys carry DDP's ``module.`` prefix and hold
the whole CLIP; it is read with ``torch.load(weights_only=True)`` and loaded strictly (the official code used
``strict=False``, which silently ignores a mismatch).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from clipn_runtime.errors import UserError
from clipn_runtime.fileio import atomic_write, sha256_file
from clipn_train.model import CLIPN

log = logging.getLogger(__name__)

FORMAT = "clipn-ood/no-tower"
FORMAT_VERSION = "1"
#: Name prefixes of the no tower in the official model (and ours).
NO_TOWER_PREFIXES: tuple[str, ...] = (
    "transformer_no.",
    "token_embedding_no.",
    "positional_embedding_no",
    "ln_final_no.",
    "text_projection_no",
    "prompt_no",
)


def is_no_tower_key(key: str) -> bool:
    return key.startswith(NO_TOWER_PREFIXES)


@dataclass
class CheckpointContents:
    kind: str  # "clipn-ood" | "official"
    no_state: dict[str, Tensor]
    base_state: dict[str, Tensor] | None
    metadata: dict[str, str]
    sha256: str
    variant: str
    extra: dict[str, Any] = field(default_factory=dict)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: Messages of a torch file that ends early or is damaged (torch raises plain RuntimeErrors or UnpicklingErrors).
_TORCH_CORRUPT = re.compile(
    r"PytorchStreamReader|unexpected EOF|file might be corrupted|pickle data was truncated"
)


def _first_line(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= 200 else line[:199] + "…"


def _refused_globals(text: str) -> str:
    """What torch's safe unpickler refused: the globals it names, else its own one-line reason."""
    found = sorted(set(re.findall(r"Unsupported global: GLOBAL ([\w.]+)", text)))
    if found:
        return ", ".join(found)
    detail = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    return _first_line(detail.group(1)) if detail else "an object that is not a tensor"


def load_failure(source: str, e: BaseException) -> str:
    """One line saying why the weights file ``source`` (e.g. ``--checkpoint x.pt``) could not be read.

    Torch's own messages run over many lines and, for a refused pickle, advise ``weights_only=False``, which
    executes whatever the file contains; the user gets the reason and a safe way out instead.
    """
    text = _ANSI.sub("", str(e))
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
        return (
            f"{source}: a torch pickle holding objects that safe loading (weights_only) refuses "
            f"({_refused_globals(text)}); clipn-ood never unpickles arbitrary objects: re-save only its tensors "
            "(the state_dict, e.g. as .safetensors) with the code that made the file"
        )
    if isinstance(e, OSError):
        return f"{source}: cannot read ({e.strerror or text})"
    if isinstance(e, SafetensorError):
        return f"{source}: truncated or corrupt (safetensors error: {_first_line(text)}); re-download or copy it again"
    if isinstance(e, (EOFError, zipfile.BadZipFile)) or _TORCH_CORRUPT.search(text):
        reason = _first_line(text.split(". This is an internal miniz error")[0]) or "the file ends early"
        return f"{source}: truncated or corrupt (torch load error: {reason}); re-download or copy it again"
    return (
        f"{source}: neither a safetensors file nor a torch checkpoint "
        f"({type(e).__name__}: {_first_line(text) or 'unreadable'})"
    )


def _strip_module(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def _variant_of(no_state: Mapping[str, Tensor]) -> str:
    return "learnable" if "prompt_no" in no_state else "handcrafted"


def no_tower_metadata(
    *,
    model_name: str,
    model_config: dict[str, Any],
    pretrained: str | None,
    weights_sha256: str | None,
    variant: str,
    epoch: int,
    step: int,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    from clipn_train import __version__

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "clipn_ood_version": __version__,
        "model_name": model_name,
        "model_config": json.dumps(model_config, sort_keys=True),
        "pretrained": pretrained or "",
        "weights_sha256": weights_sha256 or "",
        "variant": variant,
        "epoch": str(epoch),
        "step": str(step),
    }
    meta.update(extra or {})
    return meta


def save_no_tower(path: str | Path, model: CLIPN, metadata: Mapping[str, str]) -> str:
    """Write the no-tower tensors and ``metadata`` atomically as safetensors; returns the file's sha256."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()}
    data = st_save(tensors, metadata=dict(metadata))
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def read_checkpoint(path: str | Path) -> CheckpointContents:
    """Read a clipn-ood safetensors checkpoint or an official CLIPN torch checkpoint (no model needed)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"--checkpoint {path}: cannot read ({e.strerror or e})") from None
    sha = hashlib.sha256(data).hexdigest()
    if path.suffix == ".safetensors" or data[8:9] == b"{":
        try:
            tensors = st_load(data)
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(load_failure(f"--checkpoint {path}", e)) from None
        if metadata.get("format") != FORMAT:
            raise UserError(
                f"--checkpoint {path}: a safetensors file without clipn-ood metadata; expected a checkpoint "
                "written by clipn-train (logs/<name>/checkpoints/epoch_K.safetensors)"
            )
        if metadata.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"--checkpoint {path}: format version {metadata.get('format_version')!r} is not supported "
                f"(this clipn-ood reads version {FORMAT_VERSION}); upgrade clipn-ood"
            )
        return CheckpointContents(
            kind="clipn-ood",
            no_state=tensors,
            base_state=None,
            metadata=metadata,
            sha256=sha,
            variant=metadata.get("variant") or _variant_of(tensors),
        )
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; all mean "not a checkpoint we can read"
        raise UserError(load_failure(f"--checkpoint {path}", e)) from None
    state = obj.get("state_dict") if isinstance(obj, dict) and "state_dict" in obj else obj
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(
            f"--checkpoint {path}: expected the official CLIPN layout (a dict with 'state_dict') or a bare state dict"
        )
    state = _strip_module(state)
    no_state = {k: v for k, v in state.items() if is_no_tower_key(k)}
    base_state = {k: v for k, v in state.items() if not is_no_tower_key(k)}
    if not no_state:
        raise UserError(
            f"--checkpoint {path}: holds no CLIPN no-tower tensors (transformer_no.*, prompt_no, …); "
            "is it a plain CLIP checkpoint? pass it as --pretrained instead"
        )
    extra = {k: obj[k] for k in ("epoch", "name") if isinstance(obj, dict) and k in obj}
    return CheckpointContents(
        kind="official",
        no_state=no_state,
        base_state=base_state or None,
        metadata={},
        sha256=sha,
        variant=_variant_of(no_state),
        extra=extra,
    )


def load_strict(target: Mapping[str, Tensor], incoming: Mapping[str, Tensor], source: str, what: str) -> None:
    """Copy ``incoming`` into the tensors of ``target`` if names and shapes match exactly, else a UserError."""
    missing = sorted(set(target) - set(incoming))
    unexpected = sorted(set(incoming) - set(target))
    mismatched = sorted(
        f"{k} {tuple(incoming[k].shape)} vs {tuple(target[k].shape)}"
        for k in set(target) & set(incoming)
        if tuple(incoming[k].shape) != tuple(target[k].shape)
    )
    if missing or unexpected or mismatched:

        def listed(label: str, keys: list[str]) -> str:
            more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
            return f"{label} {len(keys)}: {', '.join(keys[:10])}{more}"

        parts = [
            listed(label, keys)
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        ]
        raise UserError(f"{source}: {what} does not fit the model ({'; '.join(parts)}); check --model/--variant")
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(incoming[k].to(dtype=t.dtype, device=t.device))


def load_no_tower(model: CLIPN, state: Mapping[str, Tensor], source: str) -> None:
    """Strictly load no-tower tensors (official names, no ``module.`` prefix) into ``model``."""
    load_strict(model.trainable_state_dict(), _strip_module(state), source, "the no tower")


def check_base_matches(
    contents: CheckpointContents, name: str, cfg: dict[str, Any], pretrained: str | Path | None
) -> str | Path | None:
    """The base weights to use with our checkpoint; a UserError when they cannot be the ones it was trained on."""
    meta = contents.metadata
    try:
        trained_cfg = json.loads(meta.get("model_config", "null"))
    except json.JSONDecodeError:
        trained_cfg = None
    if trained_cfg is not None and json.dumps(trained_cfg, sort_keys=True) != json.dumps(cfg, sort_keys=True):
        raise UserError(
            f"the checkpoint was trained on model {meta.get('model_name')!r} whose config differs from "
            f"--model {name}; pass the same --model it was trained with"
        )
    tag, sha = meta.get("pretrained") or None, meta.get("weights_sha256") or None
    if pretrained is None:
        if not tag and not sha:
            log.warning("the checkpoint was trained on a randomly initialised base CLIP (a test model)")
        if sha:
            raise UserError(
                f"the checkpoint was trained on a local weights file (sha256 {sha[:16]}…); pass it as --pretrained"
            )
        return tag
    if Path(str(pretrained)).is_file():
        if sha:
            actual = sha256_file(pretrained)
            if actual != sha:
                raise UserError(
                    f"--pretrained {pretrained}: sha256 {actual[:16]}… differs from the weights the "
                    f"checkpoint was trained on ({sha[:16]}…)"
                )
        elif tag:
            raise UserError(
                f"the checkpoint was trained on the open_clip weights {tag!r}, not a local file; pass --pretrained {tag}"
            )
        return pretrained
    if tag != str(pretrained):
        raise UserError(
            f"--pretrained {pretrained}: the checkpoint was trained on {tag or 'a local weights file'!r}; "
            "pass those weights (or leave --pretrained out)"
        )
    return pretrained
