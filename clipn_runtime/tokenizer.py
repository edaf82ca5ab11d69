"""CLIP's tokenizer without torch or open_clip: a Hugging Face ``tokenizers`` model plus open_clip's cleaning.

``clipn-export --open-vocabulary`` writes ``tokenizer.json`` into the bundle, built from open_clip's own BPE
tables (:mod:`clipn_export.tokenizer_export`; no BPE is written by hand here): a ``Split`` pre-tokenizer with
open_clip's word regex, GPT-2/CLIP byte-to-unicode mapping, BPE with the ``</w>`` end-of-word suffix, the
``<start_of_text> … <end_of_text>`` template (ids 49406/49407), truncation to the context (open_clip keeps the
EOT as the last token; so does ``tokenizers``' truncation, which reserves room for the template) and zero
padding.

Two things ``tokenizer.json`` cannot express are done here, in Python, exactly as open_clip's
``SimpleTokenizer`` (``clean="lower"``) does them (facts from open_clip 3.3 ``tokenizer.py``):

* cleaning: ``ftfy.fix_text``, then ``html.unescape`` twice, strip, collapse whitespace runs to one space,
  lower-case. ftfy is not re-implemented — its mojibake repair is heuristic and only ftfy reproduces it — so it
  is a dependency of the ``openvocab`` extra (pure Python, small);
* a literal ``<start_of_text>``/``<end_of_text>`` inside a text: open_clip's regex only takes it as the special
  token where its word scan starts a match there, while ``tokenizers`` would match it anywhere; such (rare)
  texts are encoded word by word with the same pre-tokenizer and BPE model (:meth:`ClipTokenizer.encode`).

tests/test_tokenizer_parity.py checks token ids against open_clip on more than ten thousand strings.
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from clipn_runtime.errors import UserError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
#: What :func:`clean_text` does, recorded in manifests (the cleaning is part of a bank's identity).
CLEANING = "open_clip lower: ftfy.fix_text, html.unescape x2, strip, collapse whitespace, lower"
INSTALL_HINT = "pip install 'clipn-ood[openvocab]' (adds tokenizers and ftfy; still no torch)"

IntArray = npt.NDArray[np.int64]


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"computing class banks needs the Python package {module!r}: {INSTALL_HINT}") from None


def cleaning_versions() -> dict[str, str]:
    """Versions of what the cleaning and tokenising depend on (part of a cached bank's key)."""
    return {m: str(getattr(_require(m), "__version__", "?")) for m in ("ftfy", "tokenizers")}


def clean_text(text: str) -> str:
    """open_clip's ``lower`` cleaning of one text (see the module docstring for the steps and their source)."""
    ftfy = _require("ftfy")
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


@dataclass(frozen=True)
class TokenBatch:
    """``ids``: N×context int64 (zero-padded, as open_clip); ``lengths``: tokens up to and including EOT."""

    ids: IntArray
    lengths: IntArray


class ClipTokenizer:
    """open_clip ``SimpleTokenizer``-equal token ids from a bundle's ``tokenizer.json``.

    ``context_length`` comes from the file's truncation setting (the model's context, 77 for CLIP).
    """

    def __init__(self, tokenizer: Any) -> None:
        trunc = tokenizer.truncation
        if not trunc or not trunc.get("max_length"):
            raise UserError("tokenizer.json has no truncation length; re-export the bundle with clipn-export")
        self._tok = tokenizer
        self.context_length = int(trunc["max_length"])
        sot, eot = tokenizer.token_to_id(SOT_TOKEN), tokenizer.token_to_id(EOT_TOKEN)
        if sot is None or eot is None:
            raise UserError(f"tokenizer.json lacks {SOT_TOKEN}/{EOT_TOKEN}; it is not a CLIP tokenizer")
        self.sot_id, self.eot_id = int(sot), int(eot)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ClipTokenizer:
        tokenizers = _require("tokenizers")
        try:
            return cls(tokenizers.Tokenizer.from_file(os.fspath(path)))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable/invalid files
            if isinstance(e, UserError):
                raise
            raise UserError(f"{path}: not a readable tokenizer.json ({e}); re-export the bundle") from None

    @classmethod
    def from_str(cls, json_text: str) -> ClipTokenizer:
        return cls(_require("tokenizers").Tokenizer.from_str(json_text))

    def _word_by_word(self, text: str) -> list[int]:
        """Ids of a cleaned text that contains a special-token string, as open_clip's word scan yields them."""
        ids = [self.sot_id]
        for word, _ in self._tok.pre_tokenizer.pre_tokenize_str(text):
            if word in (SOT_TOKEN, EOT_TOKEN):
                ids.append(self.sot_id if word == SOT_TOKEN else self.eot_id)
            else:
                ids.extend(t.id for t in self._tok.model.tokenize(word))
        ids.append(self.eot_id)
        if len(ids) > self.context_length:
            ids = [*ids[: self.context_length - 1], self.eot_id]
        return ids

    def encode(self, texts: Sequence[str]) -> TokenBatch:
        """Clean and tokenise ``texts`` → ids (N×context, zero-padded) and per-text token counts."""
        cleaned = [clean_text(t) for t in texts]
        n, ctx = len(cleaned), self.context_length
        ids = np.zeros((n, ctx), dtype=np.int64)
        lengths = np.zeros(n, dtype=np.int64)
        plain = [i for i, t in enumerate(cleaned) if SOT_TOKEN not in t and EOT_TOKEN not in t]
        if plain:
            encodings = self._tok.encode_batch([cleaned[i] for i in plain])
            for i, enc in zip(plain, encodings, strict=True):
                row = enc.ids
                ids[i, : len(row)] = row
                lengths[i] = sum(enc.attention_mask)
        for i in sorted(set(range(n)) - set(plain)):
            row = self._word_by_word(cleaned[i])
            ids[i, : len(row)] = row
            lengths[i] = len(row)
        return TokenBatch(ids, lengths)

    def __call__(self, texts: Sequence[str]) -> IntArray:
        return self.encode(texts).ids


def load_tokenizer(path: str | Path) -> ClipTokenizer:
    """The :class:`ClipTokenizer` of a ``tokenizer.json`` (e.g. ``bundle/tokenizer.json``)."""
    return ClipTokenizer.from_file(path)
