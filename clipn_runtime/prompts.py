"""Prompt templates: the official CLIPN yes/no pairs, a cleaned copy, OpenAI's ImageNet set, user files.

Sources (facts, carried over as data with a note):
* ``data/clipn_prompts.tsv``: the 128 (yes, no) template pairs of the official CLIPN code (commit e465074),
  byte-exact — including the literal single quotes around every template and the trailing comma on pairs
  34 and 98. The released weights were evaluated with exactly these strings, so ``clipn`` uses them verbatim.
* ``data/openai_imagenet_templates.txt``: the 80 ImageNet prompt templates of Radford et al. (2021) as
  shipped by open_clip (``open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES``).

A template holds exactly one ``{}`` that is replaced by the class name.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from clipn_runtime.errors import InputFileError, UserError

#: Names accepted by :func:`load_prompts` besides a file path.
BUILTIN_PROMPTS: tuple[str, ...] = ("clipn", "clean", "openai")
#: The one default of training (hand-crafted variant), export, eval and runtime: the official 128 pairs verbatim,
#: which the official code both trains and evaluates with, so a default model is scored with its own prompts.
DEFAULT_PROMPTS = "clipn"


@dataclass(frozen=True)
class PromptSet:
    """Templates for the yes tower and, for the hand-crafted variant, the paired templates for the no tower.

    ``no`` is ``None`` when the set has no paired "no" templates (then only the learnable variant, which
    feeds the *yes* templates to both towers, can use it).
    """

    name: str
    yes: tuple[str, ...]
    no: tuple[str, ...] | None = None
    #: The file it was read from (absolute), so that a suggested command can name it again.
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.yes:
            raise UserError(f"prompt set {self.name!r} is empty")
        if self.no is not None and len(self.no) != len(self.yes):
            raise UserError(f"prompt set {self.name!r}: {len(self.yes)} yes but {len(self.no)} no templates")

    def templates_for(self, tower: str, variant: str) -> tuple[str, ...]:
        """The templates that feed ``tower`` ('yes'|'no') for a model ``variant`` ('learnable'|'handcrafted').

        In the learnable variant both towers receive the yes templates (the no tower adds its learned
        prompt); in the hand-crafted variant the no tower receives the paired no templates.
        """
        if tower == "yes" or variant == "learnable":
            return self.yes
        if variant != "handcrafted":
            raise ValueError(f"unknown variant {variant!r}")
        if self.no is None:
            raise UserError(
                f"prompt set {self.name!r} has no paired 'no' templates, which the hand-crafted variant needs; "
                "use --prompts clipn/clean or a two-column (yes<TAB>no) file"
            )
        return self.no

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "name": self.name,
            "yes": list(self.yes),
            "no": None if self.no is None else list(self.no),
        }
        if self.source is not None:
            d["source"] = self.source
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> PromptSet:
        no, source = d.get("no"), d.get("source")
        return cls(
            str(d["name"]),
            tuple(d["yes"]),  # type: ignore[arg-type]
            None if no is None else tuple(no),  # type: ignore[arg-type]
            source if isinstance(source, str) else None,
        )


def _data_text(name: str) -> str:
    return resources.files("clipn_runtime").joinpath("data", name).read_text(encoding="utf-8")


def official_prompt_pairs() -> list[tuple[str, str]]:
    """The 128 official (yes, no) pairs, verbatim (quotes and trailing commas included)."""
    rows = list(csv.reader(io.StringIO(_data_text("clipn_prompts.tsv")), delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(yes, no) for _, yes, no in rows[1:]]


def clean_template(t: str) -> str:
    """Drop the artefacts of the official list: a trailing comma and the surrounding single quotes."""
    t = t.strip()
    if t.endswith(","):
        t = t[:-1].rstrip()
    if len(t) >= 2 and t[0] == t[-1] == "'":
        t = t[1:-1]
    return t


def openai_templates() -> tuple[str, ...]:
    return tuple(line for line in _data_text("openai_imagenet_templates.txt").splitlines() if line)


def _check_template(t: str, path: str | Path, line: int) -> str:
    n = t.count("{}")
    if n != 1:
        raise InputFileError(
            path, line, f"a template needs exactly one '{{}}' for the class name, found {n}: {t!r}"
        )
    return t


def read_prompt_file(path: str | Path) -> PromptSet:
    """A user prompt file: one template per line (yes only), or ``yes<TAB>no`` per line (paired).

    UTF-8; blank lines and lines starting with ``#`` are skipped. Every line must have the same number of
    columns; each template must hold exactly one ``{}``.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(p, None, f"cannot read prompt file: {e}") from None
    yes: list[str] = []
    no: list[str] = []
    columns: int | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        parts = [c.strip() for c in raw.split("\t")]
        if columns is None:
            columns = len(parts)
            if columns not in (1, 2):
                raise InputFileError(p, lineno, f"expected 1 (yes) or 2 (yes<TAB>no) columns, found {columns}")
        elif len(parts) != columns:
            raise InputFileError(
                p, lineno, f"expected {columns} tab-separated columns like line 1, found {len(parts)}"
            )
        yes.append(_check_template(parts[0], p, lineno))
        if columns == 2:
            no.append(_check_template(parts[1], p, lineno))
    if not yes:
        raise InputFileError(p, None, "no templates found (one template with '{}' per line)")
    return PromptSet(f"file:{p.name}", tuple(yes), tuple(no) if columns == 2 else None, str(p.absolute()))


def load_prompts(spec: str) -> PromptSet:
    """``clipn`` (official, verbatim), ``clean`` (official without quote artefacts), ``openai`` or a file."""
    if spec == "clipn":
        pairs = official_prompt_pairs()
        return PromptSet("clipn", tuple(y for y, _ in pairs), tuple(n for _, n in pairs))
    if spec == "clean":
        pairs = official_prompt_pairs()
        return PromptSet(
            "clean", tuple(clean_template(y) for y, _ in pairs), tuple(clean_template(n) for _, n in pairs)
        )
    if spec == "openai":
        return PromptSet("openai", openai_templates())
    if Path(spec).is_file():
        return read_prompt_file(spec)
    raise UserError(f"--prompts {spec!r}: not one of {', '.join(BUILTIN_PROMPTS)} and not a readable file")
