"""Class vocabularies: checking a user's class list against a bundle.

A bundle's class banks are baked into its image engine, so for an ordinary bundle a different class list needs
a new bundle — this module says exactly which ``clipn-export`` command makes it (and the ``--open-vocabulary``
one that avoids the next re-export). Open-vocabulary bundles carry text encoders and a tokenizer, and the
runtime computes new banks itself (:mod:`clipn_runtime.openvocab`); :func:`is_open_vocabulary` tells them apart.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from clipn_runtime.bundle import ROLE_TENSORRT, Manifest
from clipn_runtime.errors import UserError
from clipn_runtime.prompts import BUILTIN_PROMPTS
from clipn_runtime.scoring import FULL_OUTPUTS

#: File roles an open-vocabulary bundle carries (written by ``clipn-export --open-vocabulary``).
OPEN_VOCAB_ROLES = frozenset({"text_encoder_yes", "text_encoder_no", "tokenizer"})


class ClassListMismatch(UserError):
    """The requested classes differ from the bundle's baked ones; ``command`` is the export that fixes it."""

    def __init__(self, message: str, command: str, open_vocabulary_command: str | None = None) -> None:
        super().__init__(message)
        self.command = command
        #: The same export with ``--open-vocabulary``: later class lists then need no re-export.
        self.open_vocabulary_command = open_vocabulary_command


def is_open_vocabulary(manifest: Manifest) -> bool:
    """True when the bundle carries the text encoders and tokenizer to compute new class banks."""
    return {f.role for f in manifest.files} >= OPEN_VOCAB_ROLES


def describe_difference(have: Sequence[str], want: Sequence[str]) -> str:
    """A short human description of how two class lists differ."""
    if len(have) != len(want):
        return f"the bundle has {len(have)} classes, the list has {len(want)}"
    if set(have) == set(want):
        return "same classes in a different order (the order defines pred_index)"
    i = next(i for i, (a, b) in enumerate(zip(have, want, strict=True)) if a != b)
    return f"they first differ at class {i + 1}: bundle {have[i]!r}, list {want[i]!r}"


def export_command(
    manifest: Manifest, bundle_dir: str | Path, classes_file: str | Path, *, open_vocabulary: bool = False
) -> str:
    """The ``clipn-export`` command that rebuilds ``bundle_dir`` with the classes in ``classes_file``.

    Everything the manifest knows is carried over (model, pretrained weights, checkpoint, prompts, scale,
    precisions, input format, extra outputs, TensorRT, open vocabulary); a path it does not know becomes a
    ``<PLACEHOLDER>``. ``open_vocabulary`` adds ``--open-vocabulary`` to a bundle that lacks it.
    """
    m = manifest.model
    # The exporter records the model's identity (name, config, pretrained tag, hashes); the *_arg/_path keys,
    # when present, are the command-line values it was given (paths the hashes alone cannot recover).
    args = ["clipn-export", "--checkpoint", _known(m, "checkpoint_path", "checkpoint_arg") or "<CHECKPOINT>"]
    args += ["--classes", str(classes_file)]
    out = Path(str(bundle_dir).rstrip("/\\") or ".")
    args += ["-o", str(out.with_name(f"{out.name}-{Path(str(classes_file)).stem}"))]
    model = _known(m, "model_arg", "name")
    if model:
        args += ["--model", model]
    pretrained = _known(m, "pretrained_arg", "pretrained")
    if pretrained is None and m.get("weights_sha256"):
        pretrained = "<PRETRAINED_WEIGHTS>"  # a local weights file: only its hash is known
    if pretrained:
        args += ["--pretrained", pretrained]
    if isinstance(m.get("variant"), str):
        args += ["--variant", str(m["variant"])]
    prompts = str(manifest.prompts.get("name") or "")
    if prompts and prompts != "clipn":
        args += [
            "--prompts",
            prompts if prompts in BUILTIN_PROMPTS or Path(prompts).is_file() else "<PROMPTS_FILE>",
        ]
    if open_vocabulary or is_open_vocabulary(manifest):
        args.append("--open-vocabulary")
    precisions = {e.precision for e in manifest.engines()}
    args += [f"--{p}" for p in ("fp16", "int8") if p in precisions]
    if manifest.preprocess.input_dtype == "uint8":
        args.append("--uint8-input")
    outputs = {o.name for e in manifest.engines() for o in e.outputs}
    if set(FULL_OUTPUTS) <= outputs:
        args.append("--full-outputs")
    if "embedding" in outputs:
        args.append("--embeddings")
    args += ["--scale", repr(float(manifest.scoring.scale))]
    if manifest.file(ROLE_TENSORRT) is not None:
        args.append("--tensorrt")
        profile = (manifest.tensorrt or {}).get("profile") or {}
        max_batch = (profile.get("max") or [None])[0]
        if max_batch:
            args += ["--max-batch", str(max_batch)]
    return " ".join(a if a.startswith("<") and a.endswith(">") else shlex.quote(a) for a in args)


def _known(model: dict[str, object], *keys: str) -> str | None:
    for k in keys:
        v = model.get(k)
        if isinstance(v, str) and v:
            return v
    return None


def check_classes(
    manifest: Manifest,
    wanted: Sequence[str],
    *,
    bundle_dir: str | Path = "bundle",
    classes_file: str | Path = "classes.txt",
) -> bool:
    """``True`` when ``wanted`` equals the bundle's classes; ``False`` when it differs but the bundle is
    open-vocabulary (the runtime computes the new banks, :mod:`clipn_runtime.openvocab`); otherwise raise
    :class:`ClassListMismatch` naming the export commands that fix it."""
    have = list(manifest.classes)
    if list(wanted) == have:
        return True
    if is_open_vocabulary(manifest):
        return False
    command = export_command(manifest, bundle_dir, classes_file)
    ov_command = export_command(manifest, bundle_dir, classes_file, open_vocabulary=True)
    raise ClassListMismatch(
        f"{classes_file}: not the classes this bundle was exported for ({describe_difference(have, wanted)}).\n"
        f"The bundle's class banks are baked into its engine; export a bundle for this list with:\n  {command}\n"
        "or export an open-vocabulary bundle once, whose classes clipn-detect --classes can then change "
        f"without torch or a re-export:\n  {ov_command}",
        command,
        ov_command,
    )
