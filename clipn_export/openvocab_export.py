"""``clipn-export --open-vocabulary``: what the bundle needs so the runtime can compute banks for new classes.

:func:`write_open_vocabulary` adds the yes and no text encoders (:mod:`clipn_export.text_export`: token ids →
text features, dynamic batch and sequence, the no tower with its mean learnable prompt) and ``tokenizer.json``
(:mod:`clipn_export.tokenizer_export`) to the staging bundle and returns the manifest section that describes
them. The image engines' bank inputs are made by the exporter (:func:`clipn_export.onnx_export.export_head`
with ``bank_inputs=True`` and :func:`~clipn_export.onnx_export.add_bank_defaults`).

:func:`check_open_vocabulary` then checks the result the way the runtime will use it: the bundle's tokenizer
against open_clip's on every prompt of the exported classes, and the bank the runtime computes
(:class:`clipn_runtime.openvocab.BankBuilder` on the staging bundle: tokenizer.json + the ONNX encoders in
onnxruntime) against the PyTorch bank just baked, for the first few classes (each class's bank row depends on
that class alone, so a subset checks the same arithmetic at a fraction of the cost).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from clipn_export import onnx_export as ox
from clipn_export.text_export import TEXT_ENCODER_FILES, TEXT_OPSET, export_text_encoder, signature
from clipn_export.textbank import TextBank
from clipn_export.tokenizer_export import (
    describe_mismatches,
    tokenizer_meta,
    tokenizer_parity,
    write_tokenizer,
)
from clipn_runtime.bundle import TOWERS, BundleFile, Manifest, OpenVocabulary, hash_entry
from clipn_runtime.openvocab import BankBuilder, plan_prompts
from clipn_runtime.tokenizer import TOKENIZER_FILE, ClipTokenizer

if TYPE_CHECKING:
    from clipn_train.factory import LoadedCLIPN

log = logging.getLogger(__name__)

#: Classes whose runtime bank is compared with the PyTorch bank at export.
CHECK_CLASSES = 8
#: Largest allowed |Δ| between those banks (the runtime bank must equal the exporter's to this).
CHECK_ATOL = 1e-5


class OpenVocabularyCheckError(Exception):
    """The runtime path (tokenizer.json + ONNX text encoders) does not reproduce the PyTorch bank.

    A bug in the conversion, not in the user's input: nothing is written.
    """


def write_open_vocabulary(loaded: LoadedCLIPN, bundle_dir: Path) -> tuple[OpenVocabulary, list[BundleFile]]:
    """Write the text encoders and the tokenizer into ``bundle_dir``; return the manifest section and files."""
    model = loaded.model
    ctx = int(model.context_length)
    files: list[BundleFile] = []
    for tower in TOWERS:
        graph = export_text_encoder(model, tower)
        name = TEXT_ENCODER_FILES[tower]
        onnx.save_model(graph, str(bundle_dir / name))
        inputs, outputs = signature(model.embed_dim)
        meta: dict[str, Any] = {"opset": TEXT_OPSET, "exporter": "dynamo", "sequence": "dynamic"}
        if tower == "no":
            meta["prompt"] = (
                "mean of the learnable prompts" if model.prompt_no is not None else "none (hand-crafted)"
            )
        files.append(
            hash_entry(
                bundle_dir,
                name,
                f"text_encoder_{tower}",
                precision="fp32",
                inputs=inputs,
                outputs=outputs,
                meta=meta,
            )
        )
        log.info("text encoder %s: %s", tower, name)
    write_tokenizer(bundle_dir / TOKENIZER_FILE, loaded.tokenizer, ctx)
    tmeta = tokenizer_meta(loaded.tokenizer, ctx)
    files.append(hash_entry(bundle_dir, TOKENIZER_FILE, "tokenizer", meta=tmeta))
    section = OpenVocabulary(
        text_encoders=dict(TEXT_ENCODER_FILES),
        bank_inputs=dict(ox.BANK_INPUTS),
        tokenizer=TOKENIZER_FILE,
        context_length=ctx,
        embed_dim=int(model.embed_dim),
        sequence="dynamic",
        truncation_is_exact=bool(model.truncation_is_exact),
        tokenizer_meta=tmeta,
    )
    return section, files


def check_open_vocabulary(
    loaded: LoadedCLIPN,
    bundle_dir: Path,
    manifest: Manifest,
    bank: TextBank,
    *,
    classes: int = CHECK_CLASSES,
    atol: float = CHECK_ATOL,
    progress: bool = False,
) -> Manifest:
    """Check the runtime path against open_clip + PyTorch; ``manifest`` with ``open_vocabulary.parity`` set.

    Raises :class:`OpenVocabularyCheckError` when the tokenizer differs on any prompt or a bank differs by more
    than ``atol``.
    """
    assert manifest.open_vocabulary is not None
    plan = plan_prompts(bank.classes, bank.prompts, bank.variant)
    tok = ClipTokenizer.from_file(bundle_dir / TOKENIZER_FILE)
    tparity = tokenizer_parity(tok, loaded.tokenizer, plan.strings)
    subset = list(bank.classes[:classes])
    builder = BankBuilder(bundle_dir, manifest, cache=False)
    got = builder.banks(subset, bank.prompts, progress=progress)
    k = len(subset)
    max_abs = float(max(np.abs(got.yes - bank.yes[:k]).max(), np.abs(got.no - bank.no[:k]).max()))
    passed = tparity.passed and max_abs <= atol
    record = {
        "passed": passed,
        "max_abs": float(f"{max_abs:.3g}"),
        "atol": atol,
        "classes_checked": k,
        "prompts_encoded": got.encoded,
        "tokenizer": tparity.to_dict(),
    }
    log.info(
        "open vocabulary: runtime bank vs PyTorch max |Δ| %.2g over %d classes; tokenizer %s",
        max_abs,
        k,
        record["tokenizer"],
    )
    if not passed:
        problems = []
        if not tparity.passed:
            problems.append(describe_mismatches(tparity))
        if max_abs > atol:
            problems.append(f"the runtime's bank differs from the PyTorch bank by {max_abs:.3g} (> {atol:g})")
        raise OpenVocabularyCheckError(
            "--open-vocabulary: the bundle's tokenizer and ONNX text encoders do not reproduce the PyTorch model:\n"
            + "\n".join(problems)
            + "\nThis is a bug in clipn-ood; please report it. Export without --open-vocabulary meanwhile."
        )
    return replace(manifest, open_vocabulary=replace(manifest.open_vocabulary, parity=record))
