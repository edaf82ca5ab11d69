"""The yes/no class banks: CLIPN's prompt ensembling, computed fast and exactly.

For every class ``c`` and tower (docs/export.md, Text bank: the official order of operations)::

    w_c = normalize( Σ_t normalize( E(template_t(c)) ) )

with ``E`` the yes tower for ``W`` and the no tower (with its mean learnable prompt, in eval mode) for
``W_no``. The variant decides which templates feed the no tower (:meth:`PromptSet.templates_for`).

What makes it fast without changing the result:

* every distinct prompt string is tokenised and encoded once per tower (templates that coincide for a class,
  or the learnable variant's shared strings, cost nothing extra);
* prompts are sorted by token length and each batch is cut to its longest prompt instead of the full context
  (77): under the causal mask no position attends to a later one and pooling reads the EOT position, which is
  kept, so the cut is exact (up to float rounding of differently-sized matmuls; tests/test_export_textbank.py
  checks it against the full context) — :attr:`CLIPN.truncation_is_exact` says when this holds, else the full
  context is used;
* batched, under ``torch.inference_mode``;
* banks are cached on disk under a key hashing the text towers' weights, the tokenizer, the variant, the
  prompts and the classes, so a re-export with the same inputs skips the encoding.

:func:`naive_text_bank` is the straightforward version (full context, every template encoded per class) kept as
the reference for tests and benchmarks/bench_textbank.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm.auto import tqdm

from clipn_runtime.errors import UserError
from clipn_runtime.fileio import atomic_writer
from clipn_runtime.openvocab import ensemble, fill, plan_prompts
from clipn_runtime.prompts import DEFAULT_PROMPTS, PromptSet, load_prompts
from clipn_runtime.scoring import MCM_PROMPT

log = logging.getLogger(__name__)

#: Bump when the bank computation changes, so stale cache entries are never reused.
BANK_FORMAT = "clipn-ood text bank v1"
TOWERS: tuple[str, ...] = ("yes", "no")

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TextBank:
    """The C×D yes/no class banks (fp32, rows L2-normalised) and what they were computed from."""

    yes: FloatArray
    no: FloatArray
    classes: tuple[str, ...]
    prompts: PromptSet
    variant: str
    #: sha256 of everything the banks depend on (the cache key).
    key: str
    #: Longest tokenised prompt (the context the cut encodes at most).
    max_tokens: int = 0
    #: Distinct prompt strings encoded per tower.
    encoded: dict[str, int] | None = None

    def save(self, path: str | Path) -> Path:
        """``text_bank.npz``: arrays ``yes``, ``no`` (C×D fp32), ``classes`` (unicode), ``key``; no pickles."""
        path = Path(path)
        _atomic_savez(
            path,
            yes=self.yes,
            no=self.no,
            classes=np.array(self.classes, dtype=np.str_),
            key=np.array(self.key),
        )
        return path


def _atomic_savez(path: Path, **arrays: npt.ArrayLike) -> None:
    with atomic_writer(path) as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]


def default_cache_dir() -> Path:
    """The user cache (:func:`clipn_runtime.cache.cache_root`), then ``text-banks``."""
    from clipn_runtime.cache import cache_root

    return cache_root() / "text-banks"


def _templates(prompts: PromptSet, variant: str) -> dict[str, tuple[str, ...]]:
    return {tower: prompts.templates_for(tower, variant) for tower in TOWERS}


def _model_device(model: Any) -> Any:
    return next(model.parameters()).device


def bank_key(loaded: Any, classes: Sequence[str], prompts: PromptSet) -> str:
    """sha256 over the text towers' tensors (not the image tower), tokenizer, variant, templates and classes."""
    import torch

    model = loaded.model
    h = hashlib.sha256(BANK_FORMAT.encode())
    info = {
        "variant": model.variant,
        "context_length": int(model.context_length),
        "tokenizer": type(loaded.tokenizer).__name__,
        "templates": _templates(prompts, model.variant),
        "classes": list(classes),
    }
    h.update(json.dumps(info, sort_keys=True, ensure_ascii=False).encode())
    for name, t in sorted(model.state_dict().items()):
        if name.startswith("clip.visual.") or not isinstance(t, torch.Tensor):
            continue
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _token_lengths(tokens: Any) -> Any:
    """Tokens per row up to and including the last non-pad token and the argmax (EOT) position."""
    import torch

    positions = torch.arange(tokens.shape[1], device=tokens.device)
    last_nonpad = torch.where(tokens != 0, positions, torch.zeros_like(positions)).amax(dim=1)
    return torch.maximum(last_nonpad, tokens.argmax(dim=1)) + 1


def _batches(order: Sequence[int], batch_size: int) -> Iterator[Sequence[int]]:
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def _encode_unique(
    loaded: Any,
    strings: Sequence[str],
    towers: Sequence[str],
    *,
    batch_size: int,
    truncate: bool,
    progress: bool,
) -> tuple[dict[str, FloatArray], int]:
    """Normalised embeddings of ``strings`` (distinct) through each of ``towers``; the longest token count."""
    import torch

    model = loaded.model
    device = _model_device(model)
    tokens = loaded.tokenizer(list(strings))
    lengths = _token_lengths(tokens)
    # Length-sorted batches: each one is cut to its own longest prompt (exact, see the module docstring).
    order = torch.argsort(lengths, stable=True).tolist()
    n_batches = -(-len(order) // batch_size)
    out: dict[str, FloatArray] = {}
    bar = tqdm(total=n_batches * len(towers), desc="text bank", unit="batch", disable=not progress)
    with torch.inference_mode(), bar:
        for tower in towers:
            encode = model.encode_text if tower == "yes" else model.encode_text_no
            emb = np.empty((len(strings), model.embed_dim), dtype=np.float32)
            for idx in _batches(order, batch_size):
                batch = tokens[idx]
                if truncate:
                    batch = batch[:, : int(lengths[idx].max())]
                emb[idx] = encode(batch.to(device), normalize=True).float().cpu().numpy()
                bar.update(1)
            out[tower] = emb
    return out, int(lengths.max())


def build_text_bank(
    loaded: Any,
    classes: Sequence[str],
    prompts: str | PromptSet = DEFAULT_PROMPTS,
    *,
    batch_size: int = 256,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    truncate: bool = True,
) -> TextBank:
    """The yes/no banks of ``classes`` for a :class:`clipn_train.factory.LoadedCLIPN` (prompt ensembling, §3).

    ``prompts``: a :class:`PromptSet` or a :func:`load_prompts` spec (``clipn``, ``clean``, ``openai``, a file).
    ``cache_dir``: where banks are cached by :func:`bank_key` (``None``: no cache). ``truncate=False``
    encodes at the full context (for checks; same result).
    """
    if not classes:
        raise UserError("no classes to build a text bank for")
    if batch_size < 1:
        raise UserError(f"batch size must be ≥ 1, got {batch_size}")
    ps = load_prompts(prompts) if isinstance(prompts, str) else prompts
    model = loaded.model
    if model.training:
        raise ValueError("build_text_bank needs the model in eval mode (the no tower uses its mean prompt then)")
    _templates(ps, model.variant)  # a prompt set the variant cannot use fails here, before any work
    key = bank_key(loaded, classes, ps)
    cache_file = Path(cache_dir) / f"{key}.npz" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        cached = _read_cached(cache_file, classes)
        if cached is not None:
            log.info("text bank: cache hit %s", cache_file)
            return TextBank(cached[0], cached[1], tuple(classes), ps, model.variant, key)

    # One list of distinct strings for both towers: the learnable variant feeds them the same prompts. The
    # runtime computes open-vocabulary banks with the same plan and ensemble (clipn_runtime.openvocab).
    plan = plan_prompts(classes, ps, model.variant)
    strings = plan.strings
    truncate = truncate and bool(getattr(model, "truncation_is_exact", False))
    if not truncate:
        log.info("text bank: encoding at the full context (truncation not exact or disabled)")
    if plan.shared:
        emb, longest = _encode_unique(
            loaded, strings, TOWERS, batch_size=batch_size, truncate=truncate, progress=progress
        )
        encoded = {tower: len(strings) for tower in TOWERS}
    else:
        # Hand-crafted variant: each tower only encodes the strings it actually receives.
        emb, encoded, longest = {}, {}, 0
        for tower in TOWERS:
            used = plan.used[tower].tolist()
            remap = {old: new for new, old in enumerate(used)}
            e, n = _encode_unique(
                loaded,
                [strings[i] for i in used],
                [tower],
                batch_size=batch_size,
                truncate=truncate,
                progress=progress,
            )
            full = np.zeros((len(strings), model.embed_dim), dtype=np.float32)
            full[used] = e[tower][[remap[i] for i in used]]
            emb[tower], encoded[tower], longest = full, len(used), max(longest, n)

    banks = {tower: ensemble(emb[tower], plan.index[tower]) for tower in TOWERS}
    bank = TextBank(banks["yes"], banks["no"], tuple(classes), ps, model.variant, key, longest, encoded)
    if cache_file is not None:
        _atomic_savez(cache_file, yes=bank.yes, no=bank.no, classes=np.array(bank.classes, dtype=np.str_))
        log.info("text bank: cached %s", cache_file)
    return bank


def build_single_bank(
    loaded: Any,
    classes: Sequence[str],
    template: str = MCM_PROMPT,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> FloatArray:
    """One prompt per class through the yes (plain CLIP) tower, L2-normalised: the bank MCM's paper scores
    against (``mcm_single``). C encodings, against the 2·T·C of the CLIPN banks: not cached."""
    strings = [fill(template, c) for c in classes]
    truncate = bool(getattr(loaded.model, "truncation_is_exact", False))
    emb, _ = _encode_unique(loaded, strings, ["yes"], batch_size=batch_size, truncate=truncate, progress=progress)
    return emb["yes"]


def _read_cached(path: Path, classes: Sequence[str]) -> tuple[FloatArray, FloatArray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            yes, no, cached_classes = z["yes"], z["no"], [str(c) for c in z["classes"]]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        log.warning("text bank cache %s unreadable (%s); recomputing", path, e)
        return None
    if cached_classes != list(classes) or yes.shape != no.shape or yes.shape[0] != len(classes):
        log.warning("text bank cache %s does not match its key; recomputing", path)
        return None
    return yes.astype(np.float32), no.astype(np.float32)


def naive_text_bank(
    loaded: Any, classes: Sequence[str], prompts: str | PromptSet = DEFAULT_PROMPTS, *, progress: bool = False
) -> tuple[FloatArray, FloatArray]:
    """The reference computation: per class, tokenise every template at the full context and encode all of
    them through each tower, normalise, average, normalise. Slow; for tests and the benchmark."""
    import torch

    ps = load_prompts(prompts) if isinstance(prompts, str) else prompts
    model = loaded.model
    device = _model_device(model)
    templates = _templates(ps, model.variant)
    out: dict[str, list[FloatArray]] = {tower: [] for tower in TOWERS}
    with torch.inference_mode():
        for name in tqdm(classes, desc="text bank (naive)", disable=not progress):
            for tower in TOWERS:
                encode = model.encode_text if tower == "yes" else model.encode_text_no
                tokens = loaded.tokenizer([fill(t, name) for t in templates[tower]]).to(device)
                e = encode(tokens, normalize=True)
                e = e.mean(dim=0)
                out[tower].append((e / e.norm()).float().cpu().numpy())
    return np.stack(out["yes"]), np.stack(out["no"])
