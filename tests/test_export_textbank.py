"""Text banks: the prompt ensembling of docs/export.md, exact under context truncation, deduplicated and cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clipn_export import textbank as tb
from clipn_runtime.errors import UserError
from clipn_runtime.prompts import PromptSet, load_prompts

CLASSES = ["cat", "hot dog, \"chili\" 'x'", "日本の猫", "{weird} braces"]


def test_fast_bank_equals_naive_reference(tiny_clipn: Any) -> None:
    bank = tb.build_text_bank(tiny_clipn, CLASSES, "clipn", progress=False)
    yes, no = tb.naive_text_bank(tiny_clipn, CLASSES, "clipn")
    assert bank.yes.shape == bank.no.shape == (len(CLASSES), tiny_clipn.model.embed_dim)
    assert bank.yes.dtype == bank.no.dtype == np.float32
    np.testing.assert_allclose(bank.yes, yes, atol=1e-6)
    np.testing.assert_allclose(bank.no, no, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(bank.yes, axis=1), 1.0, atol=1e-6)
    # The fixture's no tower differs from the yes tower, so the banks must too (the test could not tell else).
    assert np.abs(bank.yes - bank.no).max() > 0.01
    # Every distinct string once per tower: 4 classes × 128 templates, shared by both towers (learnable).
    assert bank.encoded == {"yes": 4 * 128, "no": 4 * 128}


def test_ensembling_formula_by_hand(tiny_clipn: Any) -> None:
    """w_c = normalize(Σ_t normalize(E(t(c)))) for both towers, in the official order of operations."""
    prompts = PromptSet("two", ("a photo of a {}.", "a {} in the wild"))
    bank = tb.build_text_bank(tiny_clipn, ["dog"], prompts, progress=False)
    tokens = tiny_clipn.tokenizer(["a photo of a dog.", "a dog in the wild"])
    with torch.inference_mode():
        for got, encode in ((bank.yes, tiny_clipn.model.encode_text), (bank.no, tiny_clipn.model.encode_text_no)):
            e = encode(tokens, normalize=False)
            e = e / e.norm(dim=-1, keepdim=True)
            w = e.sum(0)
            np.testing.assert_allclose(got[0], (w / w.norm()).numpy(), atol=1e-6)


def test_context_truncation_is_exact(tiny_clipn: Any) -> None:
    """Cutting the context to the longest tokenised prompt gives the full-77-context embedding: causal mask
    (no position sees a later one) + EOT pooling (the EOT position is kept)."""
    model = tiny_clipn.model
    strings = [t.replace("{}", "golden retriever") for t in load_prompts("clipn").yes[:16]]
    tokens = tiny_clipn.tokenizer(strings)
    assert tokens.shape[1] == 77
    length = int(tb._token_lengths(tokens).max())
    assert length < 30  # the cut is real
    with torch.inference_mode():
        for encode in (model.encode_text, model.encode_text_no):
            full = encode(tokens, normalize=False)
            cut = encode(tokens[:, :length], normalize=False)
            np.testing.assert_allclose(cut.numpy(), full.numpy(), atol=1e-5, rtol=1e-5)
            # Control: one token too short drops the EOT of the longest prompt and changes its embedding.
            too_short = encode(tokens[:, : length - 1].clone(), normalize=False)
            longest = int(tb._token_lengths(tokens).argmax())
            assert (too_short[longest] - full[longest]).abs().max() > 1e-3
    # And the whole bank with truncation equals the bank without it.
    a = tb.build_text_bank(tiny_clipn, ["cat", "dog"], "clipn", progress=False, truncate=True)
    b = tb.build_text_bank(tiny_clipn, ["cat", "dog"], "clipn", progress=False, truncate=False)
    np.testing.assert_allclose(a.yes, b.yes, atol=1e-6)
    np.testing.assert_allclose(a.no, b.no, atol=1e-6)


def test_handcrafted_variant_feeds_no_templates_to_the_no_tower(tiny_config: Path) -> None:
    from clipn_train.factory import create_clipn

    torch.manual_seed(0)
    loaded = create_clipn(tiny_config, variant="handcrafted")
    with torch.no_grad():  # make the no tower differ from the yes tower
        for p in loaded.model.transformer_no.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = load_prompts("clipn")
    bank = tb.build_text_bank(loaded, ["cat", "dog"], prompts, progress=False)
    yes, no = tb.naive_text_bank(loaded, ["cat", "dog"], prompts)
    np.testing.assert_allclose(bank.yes, yes, atol=1e-6)
    np.testing.assert_allclose(bank.no, no, atol=1e-6)
    # The no tower only encodes its own (paired) strings: the official no list has 98 distinct templates.
    assert bank.encoded == {"yes": 2 * 128, "no": 2 * len(set(prompts.no or ()))}
    # Feeding it the yes templates instead would give a different bank.
    learnable_style = PromptSet("yes-only", prompts.yes, prompts.yes)
    other = tb.build_text_bank(loaded, ["cat", "dog"], learnable_style, progress=False)
    assert np.abs(other.no - bank.no).max() > 1e-3
    with pytest.raises(UserError, match="no paired"):
        tb.build_text_bank(loaded, ["cat"], "openai", progress=False)


def test_cache_hit_skips_encoding_and_key_tracks_inputs(
    tiny_clipn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = tb.build_text_bank(tiny_clipn, ["cat", "dog"], "clipn", cache_dir=tmp_path, progress=False)
    assert list(tmp_path.glob("*.npz")) == [tmp_path / f"{first.key}.npz"]

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("encoded although the bank was cached")

    monkeypatch.setattr(tb, "_encode_unique", boom)
    again = tb.build_text_bank(tiny_clipn, ["cat", "dog"], "clipn", cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again.yes, first.yes)
    np.testing.assert_array_equal(again.no, first.no)
    monkeypatch.undo()

    key = tb.bank_key(tiny_clipn, ["cat", "dog"], load_prompts("clipn"))
    assert key == first.key
    assert tb.bank_key(tiny_clipn, ["dog", "cat"], load_prompts("clipn")) != key
    assert tb.bank_key(tiny_clipn, ["cat", "dog"], load_prompts("clean")) != key
    # Weights of a text tower are part of the key (the image tower is not). Values are restored exactly:
    # tiny_clipn is shared by the session.
    for tensor, changes_key in (
        (tiny_clipn.model.prompt_no, True),
        (next(tiny_clipn.model.clip.visual.parameters()), False),
    ):
        flat = tensor.data.view(-1)
        saved = flat[0].clone()
        flat[0] = saved + 1.0
        try:
            changed = tb.bank_key(tiny_clipn, ["cat", "dog"], load_prompts("clipn")) != key
        finally:
            flat[0] = saved
        assert changed == changes_key
    assert tb.bank_key(tiny_clipn, ["cat", "dog"], load_prompts("clipn")) == key


def test_corrupt_cache_entry_is_recomputed(tiny_clipn: Any, tmp_path: Path) -> None:
    bank = tb.build_text_bank(tiny_clipn, ["cat"], "openai", cache_dir=tmp_path, progress=False)
    entry = tmp_path / f"{bank.key}.npz"
    good = entry.read_bytes()
    for broken in (b"not a zip", good[: len(good) // 2]):  # garbage, and a truncated zip
        entry.write_bytes(broken)
        again = tb.build_text_bank(tiny_clipn, ["cat"], "openai", cache_dir=tmp_path, progress=False)
        np.testing.assert_allclose(again.yes, bank.yes, atol=1e-6)


def test_save_round_trip_keeps_unicode_classes(tiny_clipn: Any, tmp_path: Path) -> None:
    bank = tb.build_text_bank(tiny_clipn, CLASSES, "openai", progress=False)
    path = bank.save(tmp_path / "text_bank.npz")
    with np.load(path, allow_pickle=False) as z:
        assert [str(c) for c in z["classes"]] == CLASSES
        np.testing.assert_array_equal(z["yes"], bank.yes)
        np.testing.assert_array_equal(z["no"], bank.no)
        assert str(z["key"]) == bank.key


def test_bad_arguments(tiny_clipn: Any) -> None:
    with pytest.raises(UserError, match="no classes"):
        tb.build_text_bank(tiny_clipn, [], "clipn", progress=False)
    with pytest.raises(UserError, match="batch size"):
        tb.build_text_bank(tiny_clipn, ["cat"], "clipn", batch_size=0, progress=False)


def test_fill_replaces_only_the_placeholder() -> None:
    from clipn_runtime.openvocab import fill

    assert fill("a {} photo", "{x}") == "a {x} photo"
    assert fill("'a photo of a {}.',", "cat") == "'a photo of a cat.',"
