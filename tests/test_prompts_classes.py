"""Prompt sets and class lists: byte-exact official data, user files, errors that name the line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from clipn_runtime.classes import load_classes, read_classes
from clipn_runtime.errors import InputFileError, UserError
from clipn_runtime.prompts import clean_template, load_prompts, official_prompt_pairs, read_prompt_file

PACKAGED_TSV = Path(__file__).resolve().parents[1] / "clipn_runtime" / "data" / "clipn_prompts.tsv"
# sha256 of the 128 official (yes, no) pairs as the released CLIPN weights were evaluated with them (xmed-lab/CLIPN,
# commit e465074, verbatim: literal quotes and the trailing commas of pairs 34 and 98 included).
OFFICIAL_TSV_SHA256 = "5f150cde1484382443fd94245be7db31af469530c29e3f25f3cffab17f70a4a5"


def test_shipped_official_pairs_are_byte_exact() -> None:
    assert hashlib.sha256(PACKAGED_TSV.read_bytes()).hexdigest() == OFFICIAL_TSV_SHA256


def test_official_pairs_verbatim() -> None:
    pairs = official_prompt_pairs()
    assert len(pairs) == 128
    assert pairs[0] == ("'a bad photo of a {}.'", "'a bad photo of no {}.'")
    assert pairs[34] == ("'a photo of a {}.',", "'a photo of no {}.',")
    assert pairs[98] == ("'a photo with a {}.',", "'a photo without a {}.',")
    # Rebuild the file from the parsed pairs: parsing loses nothing.
    rebuilt = "index\tyes\tno\n" + "".join(f"{i}\t{y}\t{n}\n" for i, (y, n) in enumerate(pairs))
    assert rebuilt.encode() == PACKAGED_TSV.read_bytes()
    ps = load_prompts("clipn")
    assert ps.yes == tuple(y for y, _ in pairs) and ps.no == tuple(n for _, n in pairs)


def test_clean_set() -> None:
    ps = load_prompts("clean")
    assert ps.no is not None
    assert ps.yes[0] == "a bad photo of a {}." and ps.no[0] == "a bad photo of no {}."
    assert ps.yes[34] == "a photo of a {}."
    assert all("'" not in t[:1] and not t.endswith(",") for t in ps.yes + ps.no)
    assert clean_template("'a {}.',") == "a {}."


def test_openai_templates_match_open_clip() -> None:
    zsm = pytest.importorskip("open_clip.zero_shot_metadata")
    ps = load_prompts("openai")
    assert ps.yes == tuple(t("{}") for t in zsm.OPENAI_IMAGENET_TEMPLATES)
    assert ps.no is None
    with pytest.raises(UserError, match="hand-crafted"):
        ps.templates_for("no", "handcrafted")
    assert ps.templates_for("no", "learnable") == ps.yes


def test_imagenet_builtin_matches_open_clip() -> None:
    zsm = pytest.importorskip("open_clip.zero_shot_metadata")
    assert load_classes("imagenet") == list(zsm.IMAGENET_CLASSNAMES)


def test_prompt_files(tmp_path: Path) -> None:
    one = tmp_path / "one.txt"
    one.write_text("# my templates\na photo of a {}.\n\nan image of {}\n", encoding="utf-8")
    ps = read_prompt_file(one)
    assert ps.yes == ("a photo of a {}.", "an image of {}") and ps.no is None
    two = tmp_path / "two.tsv"
    two.write_text("a {}.\tno {}.\nthe {}\tnot the {}\n", encoding="utf-8")
    ps = load_prompts(str(two))
    assert ps.no == ("no {}.", "not the {}") and ps.templates_for("no", "handcrafted") == ps.no
    bad = tmp_path / "bad.txt"
    bad.write_text("a {}.\nno placeholder\n", encoding="utf-8")
    with pytest.raises(InputFileError, match=r"bad.txt:2: .*exactly one"):
        read_prompt_file(bad)
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("a {}.\tno {}.\nthe {}\n", encoding="utf-8")
    with pytest.raises(InputFileError, match=r"ragged.tsv:2:"):
        read_prompt_file(ragged)
    with pytest.raises(UserError, match="not one of"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_class_file_rules(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text(
        "\ufeff# comment\n  cat \n\ndog\n  # indented comment\nhot dog, \"chili\" 'n' cheese\nçà 日本\n", "utf-8"
    )
    assert read_classes(p) == ["cat", "dog", "hot dog, \"chili\" 'n' cheese", "çà 日本"]


def test_class_file_duplicate_names_both_lines(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text("cat\ndog\n\n  cat\n", "utf-8")
    with pytest.raises(InputFileError, match=r"c.txt:4: duplicate class 'cat' \(first on line 1\)"):
        read_classes(p)


def test_class_file_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", "utf-8")
    with pytest.raises(InputFileError, match="empty"):
        read_classes(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"cat\ncaf\xe9\n")
    with pytest.raises(InputFileError, match=r"latin.txt:2: not valid UTF-8"):
        read_classes(latin)
    with pytest.raises(InputFileError, match="cannot read"):
        read_classes(tmp_path / "missing.txt")
