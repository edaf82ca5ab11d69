"""open_clip's CLIP tokenizer → a Hugging Face ``tokenizers`` definition (``tokenizer.json``) for the runtime.

Nothing of the BPE is re-implemented: the vocabulary, the merge ranks and the word regex are read from an
open_clip ``SimpleTokenizer`` instance (which loads ``bpe_simple_vocab_16e6.txt.gz``) and handed to the
``tokenizers`` building blocks that implement the same algorithm:

* pre-tokenizer: ``Split`` keeping exactly the matches of open_clip's regex (case-insensitive, as open_clip
  compiles it; whitespace between words dropped), then ``ByteLevel`` — the GPT-2 byte-to-unicode table, which
  is the table CLIP uses;
* model: ``BPE`` with open_clip's vocabulary and merges and the ``</w>`` end-of-word suffix;
* post-processor: ``<start_of_text> $A <end_of_text>``; truncation to the context (``tokenizers`` reserves the
  two template tokens, so the result is SOT + the first ``context − 2`` tokens + EOT, as open_clip's
  truncate-then-set-EOT); padding with id 0 to the context, as open_clip.

Text cleaning (ftfy, HTML unescaping, whitespace, lower case) is not expressible in ``tokenizer.json``; the
runtime does it (:func:`clipn_runtime.tokenizer.clean_text`). :func:`tokenizer_parity` compares the two
tokenizers on any list of strings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipn_runtime.errors import UserError
from clipn_runtime.tokenizer import CLEANING, EOT_TOKEN, SOT_TOKEN, ClipTokenizer

#: The open_clip cleaning this builder supports (``SimpleTokenizer(clean="lower")``, the CLIP default).
SUPPORTED_CLEAN = "_clean_lower"


def check_supported(simple: Any) -> None:
    """A :class:`UserError` unless ``simple`` is a tokenizer :func:`build_tokenizer` reproduces exactly."""
    from open_clip.tokenizer import SimpleTokenizer

    problems = []
    if not isinstance(simple, SimpleTokenizer):
        problems.append(f"the model's tokenizer is {type(simple).__name__}, not open_clip's SimpleTokenizer")
    else:
        if getattr(simple.clean_fn, "__name__", "") != SUPPORTED_CLEAN:
            problems.append(f"its cleaning is {getattr(simple.clean_fn, '__name__', '?')}, not 'lower'")
        if simple.reduction_fn is not None:
            problems.append("it uses a token-reduction strategy instead of truncation")
        specials = [simple.decoder[i] for i in simple.all_special_ids]
        if specials != [SOT_TOKEN, EOT_TOKEN]:
            problems.append(f"its special tokens are {specials}, not [{SOT_TOKEN}, {EOT_TOKEN}]")
    if problems:
        raise UserError(
            "--open-vocabulary needs open_clip's CLIP tokenizer (SimpleTokenizer, clean='lower', truncation): "
            + "; ".join(problems)
        )


def word_pattern(compiled: Any) -> str:
    """open_clip's word regex (a compiled ``regex`` pattern) in the Oniguruma syntax ``tokenizers`` uses.

    open_clip compiles it with IGNORECASE. The ``regex`` module honours that for the literal alternatives
    (special tokens, contractions) and for the negated class ``[^\\s\\p{L}\\p{N}]``, but not for the positive
    ``[\\p{L}]``/``[\\p{N}]`` classes, so a non-letter that case-folds to a letter (U+0345 → ι) belongs to no
    alternative and is dropped. Oniguruma's ``(?i)`` widens every class by case folding. Scoping the flag to
    the alternatives the ``regex`` module applies it to gives the same words (an exhaustive scan over every
    assigned code point agrees; see tests/test_tokenizer_parity.py).
    """
    if compiled.flags & 2 == 0:  # re.IGNORECASE == regex.IGNORECASE == 2
        return str(compiled.pattern)
    parts = []
    for alt in compiled.pattern.split("|"):
        positive_class = alt.startswith("[") and not alt.startswith("[^")
        if "[" in alt and not alt.startswith("["):
            raise UserError(
                f"unexpected open_clip word regex {compiled.pattern!r}; cannot convert it for tokenizers"
            )
        parts.append(alt if positive_class else f"(?i:{alt})")
    return "|".join(parts)


def build_tokenizer(simple: Any, context_length: int | None = None) -> Any:
    """A ``tokenizers.Tokenizer`` equal to the open_clip ``SimpleTokenizer`` ``simple`` on cleaned text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    check_supported(simple)
    ctx = int(context_length or simple.context_length)
    if ctx < 2:
        raise ValueError(f"context length must be ≥ 2, got {ctx}")
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    tok = Tokenizer(models.BPE(vocab=dict(simple.encoder), merges=merges, end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(word_pattern(simple.pat)), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT_TOKEN} $A {EOT_TOKEN}",
        special_tokens=[(SOT_TOKEN, simple.sot_token_id), (EOT_TOKEN, simple.eot_token_id)],
    )
    tok.enable_truncation(max_length=ctx)
    tok.enable_padding(length=ctx, pad_id=0, pad_token=simple.decoder[0])
    return tok


def tokenizer_json(simple: Any, context_length: int | None = None) -> str:
    """The ``tokenizer.json`` text for ``simple`` (deterministic: same tokenizer, same bytes)."""
    return str(build_tokenizer(simple, context_length).to_str(pretty=False))


def write_tokenizer(path: str | Path, simple: Any, context_length: int | None = None) -> Path:
    path = Path(path)
    path.write_text(tokenizer_json(simple, context_length), encoding="utf-8")
    return path


def tokenizer_meta(simple: Any, context_length: int | None = None) -> dict[str, Any]:
    """What the manifest records about the tokenizer beside its file."""
    from clipn_runtime.tokenizer import cleaning_versions

    return {
        "kind": "open_clip SimpleTokenizer as tokenizers BPE",
        "context_length": int(context_length or simple.context_length),
        "sot_id": int(simple.sot_token_id),
        "eot_id": int(simple.eot_token_id),
        "vocab_size": len(simple.encoder),
        "cleaning": CLEANING,
        "versions": cleaning_versions(),
    }


@dataclass
class TokenizerParity:
    """How many strings were compared and the ones whose ids differ: (text, open_clip ids, runtime ids)."""

    compared: int
    mismatches: list[tuple[str, list[int], list[int]]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        return {"compared": self.compared, "mismatches": len(self.mismatches), "passed": self.passed}


def tokenizer_parity(
    runtime: ClipTokenizer, simple: Any, texts: Sequence[str], *, keep: int = 20
) -> TokenizerParity:
    """Compare the runtime tokenizer with open_clip's on ``texts`` (ids at the full context)."""
    ref = simple(list(texts), context_length=runtime.context_length).numpy()
    got = runtime(texts)
    result = TokenizerParity(len(texts))
    for i in (ref != got).any(axis=1).nonzero()[0]:
        if len(result.mismatches) < keep:
            result.mismatches.append((texts[i], _trim(ref[i].tolist()), _trim(got[i].tolist())))
        else:
            result.mismatches.append((texts[i], [], []))
    return result


def _trim(ids: list[int]) -> list[int]:
    while ids and ids[-1] == 0:
        ids.pop()
    return ids


def describe_mismatches(parity: TokenizerParity, limit: int = 10) -> str:
    lines = [f"{len(parity.mismatches)} of {parity.compared} strings tokenise differently:"]
    for text, ref, got in parity.mismatches[:limit]:
        lines.append(f"  {json.dumps(text, ensure_ascii=True)[:120]}: open_clip {ref[:16]} runtime {got[:16]}")
    return "\n".join(lines)
