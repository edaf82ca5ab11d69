"""Class banks for a new class list, computed by the runtime from an open-vocabulary bundle (no torch).

An open-vocabulary bundle (``clipn-export --open-vocabulary``) carries its yes and no text encoders as ONNX
graphs, the tokenizer as ``tokenizer.json`` and the prompt set in its manifest; its image engines take the
yes/no banks as inputs. :class:`BankBuilder` computes the banks of any class list with onnxruntime by the
same prompt ensembling as the exporter (docs/export.md, Text bank; :mod:`clipn_export.textbank`)::

    w_c = normalize( Σ_t normalize( E(template_t(c)) ) )       for E = the yes tower and the no tower

the variant deciding which templates feed the no tower (:meth:`PromptSet.templates_for`). The same shortcuts
keep it fast without changing the result: every distinct prompt string is encoded once per tower, prompts are
sorted by token count and each batch is cut to its longest prompt (exact: causal mask, EOT pooling), batches.

Banks are cached as ``<bundle>/banks/<key>.npz`` — the key hashes the text encoders' and tokenizer's sha256,
the cleaning libraries' versions, the variant, the templates and the classes — or, when the bundle directory is
read-only, under the user cache (:func:`clipn_runtime.cache.cache_root`, then ``banks/``). Writes are
atomic (temp file + rename), so a crash never leaves a half-written cache entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm.auto import tqdm

from clipn_runtime.bundle import TOWERS, BundleError, Manifest, OpenVocabulary
from clipn_runtime.cache import cache_root
from clipn_runtime.engine import Engine
from clipn_runtime.errors import UserError
from clipn_runtime.fileio import atomic_writer
from clipn_runtime.prompts import PromptSet
from clipn_runtime.scoring import l2_normalize

log = logging.getLogger(__name__)

#: Bump when the computation changes, so that stale cache entries are never reused.
BANK_FORMAT = "clipn-ood runtime bank v1"
BANKS_DIR = "banks"

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


# ---- prompt ensembling (the exporter's text bank uses these too) ----------------------------------------------


def fill(template: str, name: str) -> str:
    """The prompt for class ``name``: the template's first ``{}`` replaced (other braces left alone)."""
    return template.replace("{}", name, 1)


@dataclass(frozen=True)
class PromptPlan:
    """The distinct prompt strings of a class list and, per tower, which string each (class, template) is.

    ``index[tower]`` is C×T (into ``strings``); ``used[tower]`` the sorted distinct indices that tower encodes.
    """

    strings: list[str]
    index: dict[str, IntArray]
    used: dict[str, IntArray]

    @property
    def shared(self) -> bool:
        """Both towers receive the same strings (the learnable variant): tokenise and order them once."""
        return bool(np.array_equal(self.used["yes"], self.used["no"]))


def plan_prompts(classes: Sequence[str], prompts: PromptSet, variant: str) -> PromptPlan:
    """Every (class, template) prompt of both towers, deduplicated into one list of strings."""
    unique: dict[str, int] = {}
    index: dict[str, IntArray] = {}
    for tower in TOWERS:
        templates = prompts.templates_for(tower, variant)
        index[tower] = np.array(
            [[unique.setdefault(fill(t, name), len(unique)) for t in templates] for name in classes],
            dtype=np.int64,
        ).reshape(len(classes), len(templates))
    used = {tower: np.unique(index[tower]) for tower in TOWERS}
    return PromptPlan(list(unique), index, used)


def ensemble(embeddings: FloatArray, index: IntArray) -> FloatArray:
    """``normalize(Σ_t e[index[c, t]])`` per class, from already L2-normalised prompt embeddings."""
    return l2_normalize(embeddings[index].sum(axis=1)).astype(np.float32)


def length_batches(lengths: IntArray, batch_size: int) -> Iterator[IntArray]:
    """Row indices in batches of ``batch_size``, sorted by token count (stable), so each can be cut short."""
    order = np.argsort(lengths, kind="stable")
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


# ---- banks -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassBanks:
    """The yes/no banks (C×D fp32, rows L2-normalised) of ``classes`` and where they came from.

    ``cache``: the file they were read from or written to (``None``: not cached); ``encoded``: distinct prompts
    run through each text encoder to make them (all zero on a cache hit).
    """

    yes: FloatArray
    no: FloatArray
    classes: tuple[str, ...]
    prompts: PromptSet
    key: str
    cache: Path | None = None
    encoded: dict[str, int] = field(default_factory=dict)

    @property
    def from_cache(self) -> bool:
        return not any(self.encoded.values())


def open_vocabulary_spec(
    manifest: Manifest,
    bundle_dir: str | os.PathLike[str] = "bundle",
    classes_file: str | os.PathLike[str] | None = None,
) -> OpenVocabulary:
    """The manifest's ``open_vocabulary`` section, or a :class:`BundleError` saying how to get one
    (``classes_file``: the class list the user gave, named in the suggested export)."""
    ov = manifest.open_vocabulary
    if ov is None:  # not manifest.is_open_vocabulary
        from clipn_runtime.vocab import CLASSES_PLACEHOLDER, export_command

        classes = os.fspath(classes_file) if classes_file is not None else CLASSES_PLACEHOLDER
        raise BundleError(
            f"{bundle_dir}: not an open-vocabulary bundle (exported without --open-vocabulary), so its class "
            "banks cannot be recomputed here. Export one with:\n  "
            + export_command(manifest, os.fspath(bundle_dir), classes, open_vocabulary=True)
            + ("" if classes_file is not None else f"\n{CLASSES_PLACEHOLDER}: a file of the classes, one per line")
        )
    return ov


def bundle_prompts(manifest: Manifest) -> PromptSet:
    """The prompt set a bundle was exported with (``prompts`` of its manifest)."""
    try:
        return PromptSet.from_dict(manifest.prompts)
    except (KeyError, TypeError) as e:
        raise BundleError(f"clipn.json: 'prompts' lacks the templates ({e}); re-export the bundle") from None


def user_cache_dir() -> Path:
    """Where banks go when the bundle directory is read-only: ``<runtime cache>/banks``."""
    return cache_root() / BANKS_DIR


class BankBuilder:
    """Computes (and caches) yes/no banks for an open-vocabulary bundle with onnxruntime.

    The text-encoder sessions are created on the first cache miss only. ``runs`` counts text-encoder
    ``session.run`` calls (a cache hit makes none). ``cache_dir=None`` caches beside the bundle, falling back to
    :func:`user_cache_dir`; ``cache=False`` disables the cache.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        manifest: Manifest,
        *,
        device: str = "cpu",
        threads: int | None = None,
        batch_size: int = 256,
        cache: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.spec = open_vocabulary_spec(manifest, bundle_dir)
        self.variant = manifest.model.variant or str(manifest.prompts.get("variant") or "learnable")
        self.device = device
        self.threads = threads
        self.batch_size = batch_size
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.runs = 0
        self._sessions: dict[str, Engine] = {}
        self._tokenizer: Any = None
        # The files the section names (on load, each is checked to be listed with its role and hash).
        hashes = {f.path: f.sha256 for f in manifest.files}
        self._hashes = {t: hashes.get(self.spec.text_encoders[t]) for t in TOWERS}
        self._hashes["tokenizer"] = hashes.get(self.spec.tokenizer)

    # -- identity and cache ------------------------------------------------------------------------------------
    def key(self, classes: Sequence[str], prompts: PromptSet) -> str:
        """sha256 of everything a bank depends on: the encoders and tokenizer (by hash), the cleaning
        libraries' versions, the variant, each tower's templates and the classes."""
        from clipn_runtime.tokenizer import cleaning_versions

        info = {
            "format": BANK_FORMAT,
            "text_encoders": {t: self._hashes[t] for t in TOWERS},
            "tokenizer": self._hashes["tokenizer"],
            "libraries": cleaning_versions(),
            "variant": self.variant,
            "truncate": self.spec.truncation_is_exact and self.spec.sequence == "dynamic",
            "templates": {t: list(prompts.templates_for(t, self.variant)) for t in TOWERS},
            "classes": list(classes),
        }
        return hashlib.sha256(json.dumps(info, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def cache_dirs(self) -> list[Path]:
        """Where cached banks are looked up, in order (the first writable one receives new banks)."""
        if self.cache_dir is not None:
            return [self.cache_dir]
        return [self.bundle_dir / BANKS_DIR, user_cache_dir()]

    def _read(self, key: str, classes: Sequence[str]) -> tuple[FloatArray, FloatArray, Path] | None:
        for d in self.cache_dirs():
            path = d / f"{key}.npz"
            if not path.is_file():
                continue
            try:
                with np.load(path, allow_pickle=False) as z:
                    yes, no, names, stored = z["yes"], z["no"], [str(c) for c in z["classes"]], str(z["key"])
            except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
                log.warning("class-bank cache %s unreadable (%s); ignoring it", path, e)
                continue
            shape = (len(classes), self.spec.embed_dim)
            if stored != key or names != list(classes) or yes.shape != shape or no.shape != shape:
                log.warning("class-bank cache %s does not match its key; ignoring it", path)
                continue
            return yes.astype(np.float32), no.astype(np.float32), path
        return None

    def _write(self, key: str, yes: FloatArray, no: FloatArray, classes: Sequence[str]) -> Path | None:
        for d in self.cache_dirs():
            path = d / f"{key}.npz"
            try:
                with atomic_writer(path) as fh:
                    np.savez(fh, yes=yes, no=no, classes=np.array(classes, dtype=np.str_), key=np.array(key))
            except OSError as e:
                log.info("cannot cache class banks in %s (%s)", d, e.strerror or e)
                continue
            return path
        log.warning("class banks not cached: no writable cache directory (tried %s)", self.cache_dirs())
        return None

    # -- encoding ------------------------------------------------------------------------------------------------
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from clipn_runtime.tokenizer import ClipTokenizer

            self._tokenizer = ClipTokenizer.from_file(self.bundle_dir / self.spec.tokenizer)
            if self._tokenizer.context_length != self.spec.context_length:
                raise BundleError(
                    f"{self.bundle_dir}: tokenizer context {self._tokenizer.context_length} ≠ the manifest's "
                    f"{self.spec.context_length}; re-export the bundle"
                )
        return self._tokenizer

    def session(self, tower: str) -> Engine:
        """The ``tower`` text encoder's engine, on ``device`` (without the TensorRT EP: the towers run once per
        class list, and a TensorRT build would cost more than it saves)."""
        if tower not in self._sessions:
            from clipn_runtime.engine import EngineSpec, open_engine

            path = self.bundle_dir / self.spec.text_encoders[tower]
            spec = EngineSpec(path, sha256=self._hashes[tower], tensorrt_ep=False)
            self._sessions[tower] = open_engine(spec, device=self.device, threads=self.threads, log_severity=3)
        return self._sessions[tower]

    def encode(
        self, strings: Sequence[str], towers: Sequence[str], *, progress: bool = True
    ) -> dict[str, FloatArray]:
        """L2-normalised embeddings of ``strings`` through each of ``towers`` (length-sorted, cut batches)."""
        batch = self.tokenizer().encode(strings)
        cut = self.spec.truncation_is_exact and self.spec.sequence == "dynamic"
        out: dict[str, FloatArray] = {}
        bar = tqdm(
            total=len(strings) * len(towers),
            desc="class banks",
            unit="prompt",
            disable=not progress,
            dynamic_ncols=True,
        )
        with bar:
            for tower in towers:
                session = self.session(tower)
                emb = np.empty((len(strings), self.spec.embed_dim), dtype=np.float32)
                for idx in length_batches(batch.lengths, self.batch_size):
                    ids = batch.ids[idx]
                    if cut:
                        ids = ids[:, : int(batch.lengths[idx].max())]
                    feats = session.run({self.spec.tokens_input: ids})[self.spec.features_output]
                    self.runs += 1
                    emb[idx] = l2_normalize(np.asarray(feats, dtype=np.float32))
                    bar.update(len(idx))
                out[tower] = emb
        return out

    def banks(
        self, classes: Sequence[str], prompts: PromptSet | None = None, *, progress: bool = True
    ) -> ClassBanks:
        """The yes/no banks of ``classes`` (``prompts``: default the bundle's), from the cache when there."""
        classes = list(classes)
        if not classes:
            raise UserError("the class list is empty")
        bad = [i + 1 for i, c in enumerate(classes) if not isinstance(c, str) or not c.strip() or "\n" in c]
        if bad:
            raise UserError(f"class names must be non-empty single-line strings (bad entries: {bad[:5]})")
        ps = prompts if prompts is not None else bundle_prompts(self.manifest)
        key = self.key(classes, ps)
        if self.cache:
            hit = self._read(key, classes)
            if hit is not None:
                log.debug("class banks: cache hit %s", hit[2])
                return ClassBanks(hit[0], hit[1], tuple(classes), ps, key, hit[2], {t: 0 for t in TOWERS})
        plan = plan_prompts(classes, ps, self.variant)
        emb: dict[str, FloatArray] = {}
        if plan.shared:
            strings = [plan.strings[i] for i in plan.used["yes"]]
            log.info("class banks: %d classes, %d distinct prompts, both towers", len(classes), len(strings))
            got = self.encode(strings, TOWERS, progress=progress)
            for tower in TOWERS:
                emb[tower] = _scatter(got[tower], plan.used[tower], len(plan.strings))
        else:
            for tower in TOWERS:
                strings = [plan.strings[i] for i in plan.used[tower]]
                log.info("class banks: %d classes, %d distinct %s prompts", len(classes), len(strings), tower)
                got = self.encode(strings, [tower], progress=progress)
                emb[tower] = _scatter(got[tower], plan.used[tower], len(plan.strings))
        yes, no = (ensemble(emb[t], plan.index[t]) for t in TOWERS)
        path = self._write(key, yes, no, classes) if self.cache else None
        if path is not None:
            log.debug("class banks: cached %s", path)
        return ClassBanks(yes, no, tuple(classes), ps, key, path, {t: len(plan.used[t]) for t in TOWERS})

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()


def _scatter(values: FloatArray, rows: IntArray, n: int) -> FloatArray:
    full = np.zeros((n, values.shape[1]), dtype=np.float32)
    full[rows] = values
    return full
