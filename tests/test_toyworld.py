"""The toy world (procedural shapes → webdataset shards / ImageFolder splits) and CLIP pretraining on it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from clipn_demo import world as tw

if TYPE_CHECKING:
    from open_clip.model import CLIP

    from clipn_demo.pretrain import CaptionedImages

WORD = re.compile(r"[a-z]+")


def _shard_bytes(paths: tuple[Path, ...]) -> list[bytes]:
    return [p.read_bytes() for p in paths]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = tw.write_shards(tmp_path / "a", 70, seed=3, shard_size=40)
    b = tw.write_shards(tmp_path / "b", 70, seed=3, shard_size=40)
    c = tw.write_shards(tmp_path / "c", 70, seed=4, shard_size=40)
    assert [p.name for p in a.paths] == ["toy-00000.tar", "toy-00001.tar"]
    assert _shard_bytes(a.paths) == _shard_bytes(b.paths)
    assert all(x != y for x, y in zip(_shard_bytes(a.paths), _shard_bytes(c.paths), strict=True))
    recipe = json.loads((tmp_path / "a" / "toy.json").read_text())
    assert recipe["seed"] == 3 and recipe["count"] == 70 and recipe["shards"] == ["toy-00000.tar", "toy-00001.tar"]
    assert json.loads((tmp_path / "a" / "sizes.json").read_text()) == {"toy-00000.tar": 40, "toy-00001.tar": 30}


def test_worker_processes_write_the_same_bytes(tmp_path: Path) -> None:
    one = tw.write_shards(tmp_path / "one", 300, seed=1, shard_size=200)
    two = tw.write_shards(tmp_path / "two", 300, seed=1, shard_size=200, workers=2, progress=True)
    assert _shard_bytes(one.paths) == _shard_bytes(two.paths)
    with pytest.raises(ValueError, match="workers"):
        tw.write_shards(tmp_path / "bad", 10, workers=0)


def test_image_depends_only_on_seed_and_index() -> None:
    world = tw.ToyWorld()
    concept = tw.Concept("star", "green")
    one = world.sample(5, tw.STREAM_SHARDS, 17, concept)
    two = world.sample(5, tw.STREAM_SHARDS, 17, concept)
    assert one.image.tobytes() == two.image.tobytes() and one.captions == two.captions
    assert world.sample(5, tw.STREAM_SPLIT, 17, concept).image.tobytes() != one.image.tobytes()


def test_shards_read_back_with_webdataset(tmp_path: Path) -> None:
    import webdataset as wds

    shards = tw.write_shards(tmp_path, 150, seed=0, shard_size=64)
    assert len(shards.paths) == 3
    samples = list(wds.WebDataset(shards.url, shardshuffle=False).decode("pil"))
    assert len(samples) == 150
    concepts = tw.all_concepts()
    for i, s in enumerate(samples):
        assert {k for k in s if not k.startswith("__")} == {"png", "txt", "json", "cls"}
        assert s["__key__"] == f"{i:08d}"
        assert s["png"].size == (32, 32) and s["png"].mode == "RGB"
        meta = s["json"]
        assert (meta["shape"], meta["colour"]) == (concepts[i % 64].shape, concepts[i % 64].colour)
        assert meta["class_name"] == f"{meta['colour']} {meta['shape']}"
        assert int(s["cls"]) == meta["concept_index"] == tw.concept_index(concepts[i % 64])
        assert s["txt"] == meta["captions"][0] and len(meta["captions"]) == 5
        assert len(set(meta["captions"])) == 5
        assert meta["background"] in tw.BACKGROUNDS and meta["size"] in tw.SIZE_WORDS


def test_captions_name_the_right_shape_and_colour_and_nothing_else() -> None:
    world = tw.ToyWorld()
    both = 0
    for i, concept in enumerate(world.concepts() * 3):
        sample = world.sample(1, tw.STREAM_SHARDS, i, concept)
        for caption in sample.captions:
            words = set(WORD.findall(caption))
            assert words & set(tw.SHAPES) <= {concept.shape}, caption
            assert words & set(tw.COLOURS) <= {concept.colour}, caption
            assert concept.shape in words or concept.colour in words, caption
            both += f"{concept.colour} {concept.shape}" in caption
            assert " a orange" not in caption and not caption.startswith("a orange"), caption
    # Most captions name the full concept; single-attribute ones are the minority.
    assert both > 0.7 * 3 * 64 * 5


def test_size_and_placement_constraints() -> None:
    world = tw.ToyWorld(max_pixel_noise=0.0)
    checked = 0
    for i in range(400):
        concept = world.concepts()[i % 64]
        sample = world.sample(2, tw.STREAM_SHARDS, i, concept)
        lab = sample.labels
        assert world.min_radius <= lab.radius <= world.max_radius
        assert lab.radius - 1e-3 <= lab.x <= 32 - lab.radius + 1e-3
        assert lab.radius - 1e-3 <= lab.y <= 32 - lab.radius + 1e-3
        if lab.background == "plain" and concept.shape in ("circle", "square"):
            # The drawn area matches the labelled size. Coverage per pixel (antialiased edges count partly) is
            # its position between the background (the corner, never covered) and the shape (the centre).
            px = np.asarray(sample.image, dtype=np.float32)
            bg, fg = px[0, 0], px[int(lab.y), int(lab.x)]
            coverage = np.clip(((px - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg)), 0, 1).sum()
            expected = np.pi * lab.radius**2 if concept.shape == "circle" else 2 * lab.radius**2
            assert 0.9 * expected < coverage < 1.1 * expected, (concept, lab.radius, coverage, expected)
            checked += 1
    assert checked >= 5
    with pytest.raises(ValueError, match="min_radius"):
        tw.ToyWorld(min_radius=10, max_radius=5)
    with pytest.raises(ValueError, match="min_radius"):
        tw.ToyWorld(max_radius=20)


def test_concepts_and_names() -> None:
    assert len(tw.all_concepts()) == 64
    assert tw.Concept.parse("red circle") == tw.Concept("circle", "red")
    assert tw.Concept("circle", "red").name == "red circle"
    with pytest.raises(ValueError, match="not a toy-world class"):
        tw.Concept.parse("circle red")
    with pytest.raises(ValueError, match="unknown shape"):
        tw.all_concepts(shapes=("hexagon",))
    assert tw.all_concepts(("ring",), ("black", "white")) == [
        tw.Concept("ring", "black"),
        tw.Concept("ring", "white"),
    ]


def test_split_writes_imagefolder_layout(tmp_path: Path) -> None:
    from PIL import Image

    split = tw.write_image_folder(tmp_path / "ood", seed=9, n_per_class=3, concepts=["red circle", "blue star"])
    assert split.class_names == ("red circle", "blue star") and split.count == 6
    dirs = sorted(p.name for p in (tmp_path / "ood").iterdir() if p.is_dir())
    assert dirs == ["blue star", "red circle"]
    for name in dirs:
        files = sorted((tmp_path / "ood" / name).glob("*.png"))
        assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png"]
        assert all(Image.open(f).size == (32, 32) for f in files)
    lines = [json.loads(x) for x in (tmp_path / "ood" / "labels.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and lines[0]["path"] == "red circle/00000.png" and lines[0]["shape"] == "circle"
    # A concept's images do not depend on which other concepts share the split.
    alone = tw.generate_split(9, 3, [tw.Concept("star", "blue")])
    assert [s.image.tobytes() for s in alone] == [
        np.asarray(Image.open(tmp_path / "ood" / "blue star" / f"{i:05d}.png")).tobytes() for i in range(3)
    ]
    with pytest.raises(ValueError, match="duplicates"):
        tw.write_image_folder(tmp_path / "dup", 0, 1, ["red circle", "red circle"])


# --- contrastive pretraining -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> CaptionedImages:
    from clipn_demo import pretrain

    root = tmp_path_factory.mktemp("toy")
    shards = tw.write_shards(root, 48, seed=0, shard_size=32)
    return pretrain.load_captioned_shards(shards.url)


def test_loaded_shards_hold_all_captions(toy_data: CaptionedImages) -> None:
    assert tuple(toy_data.images.shape) == (48, 3, 32, 32)
    assert all(len(c) == 5 for c in toy_data.captions)
    assert toy_data.metadata[0]["class_name"] == "red circle"


def test_normalize_matches_open_clip_eval_transform() -> None:
    import open_clip
    import torch

    from clipn_demo import pretrain

    model, _, _ = pretrain.create_clip(pretrain.TOY_MODEL_CONFIG)
    images = [s.image for s in tw.generate_split(0, 1, tw.all_concepts()[:4])]
    cfg = open_clip.transform.PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
    transform = open_clip.transform.image_transform_v2(cfg, is_train=False)
    expected = torch.stack([transform(im) for im in images])
    got = pretrain.normalize_images(pretrain.images_to_uint8(images), model)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_toy_config_context_length_is_honoured() -> None:
    from clipn_demo import pretrain

    cfg = pretrain.load_model_config(pretrain.TOY_MODEL_CONFIG)
    assert cfg["text_cfg"]["context_length"] == 20
    tokens = pretrain.tokenizer_for(cfg)(["a photo of a red circle."])
    assert tuple(tokens.shape) == (1, 20)


def test_pretrain_smoke_saves_open_clip_loadable_weights(toy_data: CaptionedImages, tmp_path: Path) -> None:
    import open_clip
    import torch
    from open_clip.model import CLIP

    from clipn_demo import pretrain

    torch.manual_seed(11)
    initial, _, cfg = pretrain.create_clip(pretrain.TOY_MODEL_CONFIG)
    calls: list[int] = []

    def evaluate(model: CLIP, tokenizer: Any) -> dict[str, float]:
        calls.append(1)
        ev = pretrain.ToyEvalSet.generate(0, 1)
        return pretrain.toy_zero_shot(model, tokenizer, ev)

    result = pretrain.pretrain_clip(
        toy_data,
        steps=3,
        batch_size=16,
        lr=1e-3,
        seed=11,
        out_dir=tmp_path / "clip",
        threads=1,
        progress=False,
        evaluate=evaluate,
        eval_at=(0, 3),
    )
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    # The first loss of a random model is near ln(batch) (chance for a 16-way contrastive task).
    assert abs(result.losses[0] - np.log(16)) < 1.5
    changed = [k for k, v in result.model.state_dict().items() if not torch.equal(v, initial.state_dict()[k])]
    assert "visual.conv1.weight" in changed and "text_projection" in changed and "logit_scale" in changed
    assert [h["step"] for h in result.history] == [0.0, 3.0] and len(calls) == 2
    for h in result.history:
        assert set(h) == {"step", "concept", "concept_shape", "concept_colour", "shape", "colour"}
        assert all(0.0 <= v <= 1.0 for k, v in h.items() if k != "step")

    # Round trip through open_clip's front door (local-dir) and its load_checkpoint (strict).
    loaded, tokenizer = pretrain.load_clip(tmp_path / "clip")
    assert tuple(tokenizer(["a red circle"]).shape) == (1, 20)
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    fresh = CLIP(**cfg)
    open_clip.load_checkpoint(fresh, str(result.weights_path), strict=True)
    fresh.eval()
    images = pretrain.normalize_images(toy_data.images[:4], loaded)
    torch.testing.assert_close(fresh.encode_image(images), result.model.encode_image(images))
    record = json.loads((tmp_path / "clip" / pretrain.RECORD_NAME).read_text())
    assert record["steps"] == 3 and record["losses"] == [round(x, 4) for x in result.losses]

    again = pretrain.pretrain_clip(toy_data, steps=3, batch_size=16, lr=1e-3, seed=11, threads=1, progress=False)
    assert again.losses == result.losses


def test_pretrain_rejects_bad_input(toy_data: CaptionedImages) -> None:
    from clipn_demo import pretrain

    with pytest.raises(ValueError, match="cannot fill a batch"):
        pretrain.pretrain_clip(toy_data, steps=1, batch_size=64, progress=False)
    with pytest.raises(ValueError, match="negatives"):
        pretrain.pretrain_clip(toy_data, steps=1, batch_size=1, progress=False)


def test_zero_shot_accuracy_scores_predictions() -> None:
    import torch

    from clipn_demo import pretrain

    torch.manual_seed(0)
    model, tokenizer, _ = pretrain.create_clip(pretrain.TOY_MODEL_CONFIG)
    model.eval()
    ev = pretrain.ToyEvalSet.generate(0, 1)
    images = pretrain.normalize_images(ev.images, model)
    names = [lab.class_name for lab in ev.labels]
    preds = pretrain.predict(model, tokenizer, images, names, tw.CONCEPT_TEMPLATES)
    acc = pretrain.zero_shot_accuracy(model, tokenizer, images, list(range(64)), names, tw.CONCEPT_TEMPLATES)
    assert acc == pytest.approx(float((preds == torch.arange(64)).float().mean()))
    # Scoring against the predictions themselves must give 1.
    assert pretrain.zero_shot_accuracy(model, tokenizer, images, preds, names, tw.CONCEPT_TEMPLATES) == 1.0
