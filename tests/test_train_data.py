"""Training data: CSV and webdataset sources, corrupt samples, determinism, and the feature cache."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import caption_pairs, make_csv, tiny_weights

from clipn_runtime.errors import InputFileError, UserError
from clipn_train.cache import CachedBatches, FeatureCache, build_feature_cache, model_identity
from clipn_train.data import CaptionBatches, CaptionTexts, DataSpec, Source, StreamConfig
from clipn_train.factory import LoadedCLIPN, create_clipn

# Tiny models on a shared 2-core machine run several times faster on one thread (conftest.py).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shard(path: Path, n: int, seed: int = 0, corrupt: bool = False) -> Path:
    """A webdataset shard of ``n`` good samples; ``corrupt`` adds 3 bad ones (bad image, no caption, empty)."""
    with tarfile.open(path, "w") as tar:
        for i, (png, caption) in enumerate(caption_pairs(n, seed)):
            _add(tar, f"{seed:03d}{i:05d}.png", png)
            _add(tar, f"{seed:03d}{i:05d}.txt", caption.encode())
            if corrupt and i == 1:
                _add(tar, "bad00001.jpg", b"\xff\xd8 this is not a jpeg")
                _add(tar, "bad00001.txt", b"a broken image")
                _add(tar, "bad00002.png", png)  # no caption
                _add(tar, "bad00003.png", png)
                _add(tar, "bad00003.txt", b"   ")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_config: Path) -> LoadedCLIPN:
    torch.manual_seed(0)
    return create_clipn(tiny_config)


def _stream(source: Source, tiny: LoadedCLIPN, **kw: Any) -> list[Any]:  # raw batches: images, tokens set
    cfg = StreamConfig(**{"batch_size": 4, "num_batches": None, "shuffle": False, **kw})
    return list(CaptionBatches(source, tiny.preprocess_val, CaptionTexts(tiny.tokenizer, None), cfg))


def test_corrupt_samples_in_a_shard_are_skipped_and_counted(tiny: LoadedCLIPN, tmp_path: Path) -> None:
    make_shard(tmp_path / "s0.tar", 5, seed=0, corrupt=True)
    make_shard(tmp_path / "s2.tar", 2, seed=2, corrupt=True)  # its bad samples come last
    make_shard(tmp_path / "s1.tar", 5, seed=1)
    spec = DataSpec(str(tmp_path / "s{0..1}.tar"))
    assert spec.kind() == "webdataset"
    batches = _stream(spec.open_source(), tiny)
    assert [len(b) for b in batches] == [4, 4, 2]  # 10 good samples, the 3 bad ones skipped
    assert batches[-1].corrupt == 3 and batches[-1].consumed == 13
    # Bad samples after the last good one are still reported (by an empty, report-only batch).
    tail = _stream(DataSpec(str(tmp_path / "s2.tar")).open_source(), tiny, batch_size=2)
    assert [len(b) for b in tail] == [2, 0] and [b.corrupt for b in tail] == [0, 3]
    # A truncated shard: what can be read is used, the rest is one skipped sample, training goes on.
    data = (tmp_path / "s1.tar").read_bytes()
    (tmp_path / "s1.tar").write_bytes(data[: 6 * 1024 + 512 + 50])  # cut inside the fourth image's bytes
    batches = _stream(spec.open_source(), tiny)
    # 3 intact samples of s1 are used; its cut sample (an image without caption) and the read error are skipped.
    assert sum(len(b) for b in batches) == 5 + 3 and batches[-1].corrupt == 3 + 2


def test_csv_missing_files_are_skipped_and_bad_headers_are_user_errors(tiny: LoadedCLIPN, tmp_path: Path) -> None:
    path = make_csv(tmp_path, n=6, missing=2)
    batches = _stream(DataSpec(str(path)).open_source(), tiny)
    assert sum(len(b) for b in batches) == 6 and batches[-1].corrupt == 2
    with pytest.raises(InputFileError, match=r"pairs\.tsv:1: no column 'caption'"):
        DataSpec(str(path), csv_caption_key="caption").open_source()
    with pytest.raises(UserError, match="cannot tell the data type"):
        DataSpec(str(tmp_path / "x.parquet")).kind()
    with pytest.raises(UserError, match="do not exist"):
        DataSpec(str(tmp_path / "nope-{0..3}.tar")).open_source()


def test_epochs_are_deterministic_and_resumable_mid_epoch(tiny: LoadedCLIPN, tmp_path: Path) -> None:
    source = DataSpec(str(make_csv(tmp_path, n=12))).open_source()
    transform, texts = tiny.preprocess_train, CaptionTexts(tiny.tokenizer, None)

    def run(**kw: Any) -> list[Any]:
        cfg = StreamConfig(batch_size=3, num_batches=4, seed=7, epoch=1, **kw)
        return list(CaptionBatches(source, transform, texts, cfg))

    full = run()
    again = run()
    assert all(
        torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
        for a, b in zip(full, again, strict=True)
    )
    resumed = run(start_batch=2, progress={0: (full[1].consumed, full[1].corrupt)})
    assert len(resumed) == 2
    for a, b in zip(full[2:], resumed, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
    other_epoch = list(
        CaptionBatches(source, transform, texts, StreamConfig(batch_size=3, num_batches=4, seed=7, epoch=2))
    )
    assert not torch.equal(other_epoch[0].tokens, full[0].tokens)


def test_handcrafted_texts_wrap_captions_in_paired_templates(tiny: LoadedCLIPN) -> None:
    texts = CaptionTexts(tiny.tokenizer, [("a photo of {}.", "a photo of no {}.")])
    yes, no = texts(["dogs"], [random.Random(0)])
    assert torch.equal(yes, tiny.tokenizer(["a photo of dogs."]))
    assert torch.equal(no, tiny.tokenizer(["a photo of no dogs."]))


def test_feature_cache_round_trip_and_model_check(tiny: LoadedCLIPN, tiny_config: Path, tmp_path: Path) -> None:
    path = make_csv(tmp_path / "data", n=10, missing=1)
    weights = tiny_weights(tiny, tmp_path)
    summary = build_feature_cache(
        data=str(path),
        output=tmp_path / "cache",
        model=str(tiny_config),
        pretrained=str(weights),
        variant="learnable",
        prompts="clean",
        batch_size=4,
        workers=0,
        precision="fp32",
        dtype="float32",
        shard_size=4,
    )
    assert (summary.samples, summary.corrupt, summary.shards) == (10, 1, 3)
    cache = FeatureCache(tmp_path / "cache")
    assert len(cache) == 10 and DataSpec(str(tmp_path / "cache")).kind() == "cache"
    loaded = create_clipn(tiny_config, weights)
    cache.check_model(model_identity(loaded.info))
    # Features equal what the frozen towers give for the same samples (eval transform, in order).
    raw = _stream(DataSpec(str(path)).open_source(), loaded, batch_size=10)[0]
    image, text, tokens, ids = cache.gather(np.arange(10))
    torch.testing.assert_close(image, loaded.model.encode_image(raw.images), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(text, loaded.model.encode_text(raw.tokens), atol=1e-6, rtol=1e-5)
    assert torch.equal(tokens, raw.tokens_no) and torch.equal(ids, raw.ids)
    picked = cache.gather(np.array([7, 2, 9, 2]))[0]
    assert torch.equal(picked, image[[7, 2, 9, 2]])
    batches = list(CachedBatches(cache, StreamConfig(batch_size=4, num_batches=5)))
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)  # cycles past the end of the data
    other = create_clipn(tiny_config, variant="handcrafted")
    with pytest.raises(UserError, match="re-create the cache"):
        cache.check_model(model_identity(other.info))
    with pytest.raises(UserError, match="already holds a feature cache"):
        build_feature_cache(
            data=str(path),
            output=tmp_path / "cache",
            model=str(tiny_config),
            pretrained=None,
            variant="learnable",
            prompts="clean",
            workers=0,
        )


def test_a_handcrafted_cache_is_only_trained_with_the_prompts_it_was_made_with(
    tiny_config: Path, tmp_path: Path
) -> None:
    from clipn_train.trainer import TrainConfig, Trainer

    path = make_csv(tmp_path / "data", n=4)
    build_feature_cache(
        data=str(path), output=tmp_path / "cache", model=str(tiny_config), pretrained=None, variant="handcrafted",
        prompts="clean", batch_size=4, workers=0, precision="fp32", dtype="float32",
    )  # fmt: skip
    # its no-tower tokens hold the captions wrapped in the 'clean' pairs, not the default ones
    cfg = TrainConfig(
        train_data=str(tmp_path / "cache"), model=str(tiny_config), pretrained=None, variant="handcrafted",
        batch_size=4, epochs=1, workers=0, precision="fp32", logs=str(tmp_path / "logs"), tensorboard=False,
    )  # fmt: skip
    with pytest.raises(UserError, match=r"made with --prompts clean, but training uses --prompts clipn; pass"):
        Trainer(cfg).run()
