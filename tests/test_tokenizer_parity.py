"""The runtime tokenizer (tokenizer.json + clipn_runtime cleaning) gives open_clip's token ids.

Compared with open_clip's ``SimpleTokenizer`` on > 10,000 strings: every official CLIPN template (yes and no,
with their literal quotes and trailing commas) × a spread of ImageNet class names and hand-picked hard names,
plus unicode (accents, combining marks, CJK, Hangul, RTL scripts, emoji with modifiers and ZWJ sequences),
HTML entities, mojibake, control and zero-width characters, very long names (truncation), empty-ish strings,
special-token strings inside texts, and seeded random strings over many Unicode blocks. The full
1000 ImageNet classes × 128 official templates product runs in a slow-marked test.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("ftfy")
open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

from clipn_export.tokenizer_export import (  # noqa: E402
    describe_mismatches,
    tokenizer_json,
    tokenizer_parity,
    write_tokenizer,
)
from clipn_runtime.classes import load_classes  # noqa: E402
from clipn_runtime.prompts import load_prompts  # noqa: E402
from clipn_runtime.tokenizer import ClipTokenizer, clean_text  # noqa: E402

if TYPE_CHECKING:
    from open_clip.tokenizer import SimpleTokenizer

HARD_NAMES = [
    "café",
    "naïve résumé",
    "Ångström",
    "Zürich Straße",
    "SEÑOR JALAPEÑO",
    "crème brûlée",
    "e\u0301clair",  # decomposed accent: ftfy's NFC composes it
    "ﬁsh ﬂy",  # ligatures
    "ＦＵＬＬＷＩＤＴＨ ｃａｔ",
    "“curly” ‘quotes’",
    "it’s a dog's life",
    "猫",
    "日本の猫",
    "中文 名字",
    "한국어 고양이",
    "ภาษาไทย",
    "हिन्दी बिल्ली",
    "עברית",
    "العربية ١٢٣",
    "Ελληνικά ΟΔΟΣ",
    "Кошка",
    "🐱",
    "cat 🐈‍⬛",
    "👍🏽 thumbs",
    "👨‍👩‍👧 family",
    "🇯🇵 flag",
    "a&amp;b",
    "&lt;b&gt;bold&lt;/b&gt;",
    "Tom &amp;amp; Jerry",
    "&#39;quoted&#39; &quot;x&quot;",
    "caf&eacute; &#x1F600; &#128512;",
    "non&nbsp;breaking",
    "cafÃ©",  # mojibake ftfy repairs
    "Ã¼ber",
    "a\tb\nc\r\nd",
    "zero\u200bwidth\u200djoin\ufeffbom",
    "ctrl\x00\x07\x1b[31mred\x1b[0m",
    "\x1c\x1d\x1e\x1f separators",
    "\u00a0nbsp\u2003em space\u3000ideographic",
    "İstanbul",
    "ſtraße",
    "'ſ 'S 'T 'LL",
    "Kelvin \u212a",
    "½ Ⅻ ² ③",
    "a\u0345b '\u0345x \u0345",  # a non-letter that case-folds to a letter: open_clip drops it
    "Ⓐⓑ Ⅻⅻ circled",
    "x" * 300,
    "the " * 120,
    "supercalifragilisticexpialidocious" * 8,
    "tench, Tinca tinca",
    'hot dog, "chili"',
    "a/b\\c|d_e-f+g=h",
    "{}",
    "<start_of_text>",
    "a <end_of_text> b",
    "x<start_of_text>y",
    "<<start_of_text>>",
    "'<end_of_text>",
    "1<end_of_text>2",
    "",
    " ",
    "\t\n",
    "\u200b",
    ".",
    "'",
    ",",
    "!!!",
]

RANDOM_BLOCKS = [
    (0x20, 0x7E),
    (0xA0, 0x24F),
    (0x300, 0x36F),
    (0x370, 0x3FF),
    (0x400, 0x4FF),
    (0x590, 0x6FF),
    (0x900, 0x97F),
    (0xE00, 0xE7F),
    (0x1100, 0x11FF),
    (0x2000, 0x206F),
    (0x20A0, 0x20CF),
    (0x2100, 0x214F),
    (0x2190, 0x23FF),
    (0x2500, 0x27BF),
    (0x3000, 0x30FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0xFB00, 0xFB4F),
    (0xFF00, 0xFFEF),
    (0x1F300, 0x1FAFF),
]


def random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 24)):
            lo, hi = rng.choice(RANDOM_BLOCKS)
            chars.append(chr(rng.randint(lo, hi)) if rng.random() < 0.8 else " ")
        out.append("".join(chars))
    return out


def assigned_code_points(every: int = 1) -> list[str]:
    """Every ``every``-th code point assigned in Python's Unicode database (no surrogates, no private use),
    in three contexts: inside a word, after an apostrophe (the contraction rules), after a digit."""
    import unicodedata

    cps = [chr(cp) for cp in range(0x110000) if unicodedata.category(chr(cp)) not in ("Cn", "Cs", "Co")][::every]
    return [f"a{c}b '{c}x 1{c}" for c in cps]


def corpus() -> list[str]:
    """> 10,000 strings: every official template (yes and no) × 10 ImageNet names and half the hard names, every
    hard name alone and in 4 templates, 1000 random strings, and every 100th assigned code point."""
    ps = load_prompts("clipn")
    assert ps.no is not None
    templates = sorted(set(ps.yes) | set(ps.no))
    names = load_classes("imagenet")[::100] + HARD_NAMES[::2]
    texts = [t.replace("{}", n, 1) for t in templates for n in names]
    texts += [t.replace("{}", n, 1) for t in ps.yes[:4] for n in HARD_NAMES]
    return texts + HARD_NAMES + random_strings(1000) + assigned_code_points(every=100)


@pytest.fixture(scope="module")
def simple() -> SimpleTokenizer:
    return open_clip_tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def runtime_tokenizer(simple: SimpleTokenizer, tmp_path_factory: pytest.TempPathFactory) -> ClipTokenizer:
    path = write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", simple)
    return ClipTokenizer.from_file(path)


def test_parity_on_prompts_unicode_entities_long_and_empty(
    simple: SimpleTokenizer, runtime_tokenizer: ClipTokenizer
) -> None:
    texts = corpus()
    assert len(texts) > 10_000
    parity = tokenizer_parity(runtime_tokenizer, simple, texts)
    assert parity.compared == len(texts)
    assert parity.passed, describe_mismatches(parity)


@pytest.mark.slow
def test_parity_on_all_imagenet_classes_times_official_templates(
    simple: SimpleTokenizer, runtime_tokenizer: ClipTokenizer
) -> None:
    ps = load_prompts("clipn")
    texts = [t.replace("{}", n, 1) for n in load_classes("imagenet") for t in ps.yes]
    assert len(texts) == 128_000
    parity = tokenizer_parity(runtime_tokenizer, simple, texts)
    assert parity.passed, describe_mismatches(parity)


@pytest.mark.slow
def test_parity_on_every_assigned_code_point(simple: SimpleTokenizer, runtime_tokenizer: ClipTokenizer) -> None:
    # Code points newer than Python's Unicode database (Unicode 15+) are the documented exception: the
    # `regex` module and Oniguruma (inside `tokenizers`) classify some of them differently.
    texts = assigned_code_points()
    parity = tokenizer_parity(runtime_tokenizer, simple, texts)
    assert parity.passed, describe_mismatches(parity)


def test_truncation_keeps_eot_last_and_lengths_count_real_tokens(runtime_tokenizer: ClipTokenizer) -> None:
    batch = runtime_tokenizer.encode(["x " * 200, "a cat", "", "<start_of_text>!", "!~"])
    ctx = runtime_tokenizer.context_length
    sot, eot = runtime_tokenizer.sot_id, runtime_tokenizer.eot_id
    assert batch.ids.shape == (5, ctx) and batch.ids.dtype.name == "int64"
    assert batch.ids[0, -1] == eot and batch.lengths[0] == ctx
    assert batch.ids[1, 0] == sot and batch.lengths[1] == 4
    assert batch.ids[1, 3] == eot and not batch.ids[1, 4:].any()
    assert batch.lengths[2] == 2
    assert batch.ids[3, :4].tolist() == [sot, sot, 256, eot] and batch.lengths[3] == 4
    # "!" inside a word is token id 0 — the pad id — and still counts as a real token
    assert batch.ids[4, :4].tolist() == [sot, 0, 349, eot] and batch.lengths[4] == 4


def test_cleaning_is_open_clips(simple: SimpleTokenizer) -> None:
    for text in HARD_NAMES:
        assert clean_text(text) == simple.clean_fn(text)


def test_tokenizer_json_is_deterministic_and_loads(simple: SimpleTokenizer) -> None:
    a = tokenizer_json(simple)
    assert a == tokenizer_json(simple)
    assert ClipTokenizer.from_str(a).context_length == 77
    assert ClipTokenizer.from_str(tokenizer_json(simple, context_length=16)).context_length == 16


def test_unsupported_tokenizers_are_refused(simple: SimpleTokenizer) -> None:
    from clipn_runtime.errors import UserError

    canon = open_clip_tokenizer.SimpleTokenizer(clean="canonicalize")
    with pytest.raises(UserError, match="clean='lower'"):
        tokenizer_json(canon)
    with pytest.raises(UserError, match="SimpleTokenizer"):
        tokenizer_json(object())


def test_unreadable_tokenizer_file_is_a_user_error(tmp_path: Path) -> None:
    from clipn_runtime.errors import UserError

    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a readable tokenizer.json"):
        ClipTokenizer.from_file(bad)
