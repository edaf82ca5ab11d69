"""Class vocabularies: checking a user's class list against a bundle.

A bundle's class banks are baked into its image engine, so for an ordinary bundle a different class list needs
a new bundle — this module says exactly which ``clipn-export`` command makes it (and the ``--open-vocabulary``
one that avoids the next re-export). Open-vocabulary bundles carry text encoders and a tokenizer, and the
runtime computes new banks itself (:mod:`clipn_runtime.openvocab`); :attr:`Manifest.is_open_vocabulary
<clipn_runtime.bundle.Manifest.is_open_vocabulary>` tells them apart.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from clipn_runtime.bundle import ROLE_TENSORRT, Manifest, ModelIdentity
from clipn_runtime.errors import UserError
from clipn_runtime.prompts import BUILTIN_PROMPTS, DEFAULT_PROMPTS
from clipn_runtime.scoring import FULL_OUTPUTS

#: Stands for a class-list file in a suggested command when the user gave none.
CLASSES_PLACEHOLDER = "<CLASSES_FILE>"


class ClassListMismatch(UserError):
    """The requested classes differ from the bundle's baked ones; ``command`` is the export that fixes it."""

    def __init__(self, message: str, command: str, open_vocabulary_command: str | None = None) -> None:
        super().__init__(message)
        self.command = command
        #: The same export with ``--open-vocabulary``: later class lists then need no re-export.
        self.open_vocabulary_command = open_vocabulary_command


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
    # The exporter records what it was given (model_arg, pretrained_arg, checkpoint_path: files as absolute
    # paths), which clipn-export takes back as is. Bundles from before that know only the model's identity
    # (name, pretrained tag, hashes); what cannot be recovered from it becomes a <PLACEHOLDER>.
    args = ["clipn-export", "--checkpoint", m.checkpoint_path or "<CHECKPOINT>"]
    args += ["--classes", str(classes_file)]
    out = Path(str(bundle_dir).rstrip("/\\") or ".")
    suffix = "classes" if str(classes_file) == CLASSES_PLACEHOLDER else Path(str(classes_file)).stem
    args += ["-o", str(out.with_name(f"{out.name}-{suffix}"))]
    args += ["--model", m.model_arg or m.name]
    pretrained = _pretrained(m)
    if pretrained:
        args += ["--pretrained", pretrained]
    if m.variant:
        args += ["--variant", m.variant]
    prompts = _prompts(manifest.prompts)
    if prompts:
        args += ["--prompts", prompts]
    if open_vocabulary or manifest.is_open_vocabulary:
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


def _pretrained(model: ModelIdentity) -> str | None:
    """The --pretrained to repeat; None when the export was given none (the checkpoint then says which)."""
    if model.records_arguments:
        return model.pretrained_arg or None
    if model.weights_sha256 and not model.pretrained:
        return "<PRETRAINED_WEIGHTS>"  # an older bundle from a local weights file: only its hash is known
    return model.pretrained or None


def _prompts(record: dict[str, object]) -> str | None:
    """The --prompts to repeat; None for the default set."""
    name = str(record.get("name") or "")
    if not name or name == DEFAULT_PROMPTS:
        return None
    if name in BUILTIN_PROMPTS:
        return name
    source = record.get("source")
    if isinstance(source, str) and source:
        return source
    return name if Path(name).is_file() else "<PROMPTS_FILE>"


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
    if manifest.is_open_vocabulary:
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
