"""Video: per-frame records with timestamps from a small clip generated here with PyAV."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV (the `video` extra) is not installed")

from helpers import CLIP_FPS, CLIP_FRAMES, CLIP_H, CLIP_W, SyntheticBundle, make_clip  # noqa: E402

from clipn_runtime.detector import Detector  # noqa: E402
from clipn_runtime.video import VideoError, iter_frames, prefetch  # noqa: E402

FPS, N_FRAMES, W, H = CLIP_FPS, CLIP_FRAMES, CLIP_W, CLIP_H


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("video") / "clip.mp4")


def test_iter_frames(clip: Path) -> None:
    frames = list(iter_frames(str(clip)))
    assert [f.index for f in frames] == list(range(N_FRAMES))
    assert frames[0].image.shape == (H, W, 3) and frames[0].image.dtype == np.uint8
    assert [f.time for f in frames] == pytest.approx([i / FPS for i in range(N_FRAMES)])
    assert [f.index for f in iter_frames(str(clip), every=5)] == [0, 5, 10]


def test_detect_video_equals_frames_api(synthetic_bundle: SyntheticBundle, clip: Path) -> None:
    det = Detector(synthetic_bundle.root, batch_size=4)
    recs = list(det.detect_video(clip, every=3))
    assert [r.frame for r in recs] == [0, 3, 6, 9]
    assert [r.time for r in recs] == pytest.approx([0.0, 0.3, 0.6, 0.9])
    assert all(r.path == str(clip) and r.ok for r in recs)
    assert set(recs[0].to_dict()) >= {"frame", "time", "path", "pred", "p_ood", "ood"}
    pixels = [f.image for f in iter_frames(str(clip), every=3)]
    for r, f in zip(recs, det.detect_frames(pixels), strict=True):
        assert (r.pred_index, r.ood, r.scores) == (f.pred_index, f.ood, f.scores)


def test_smoothing_is_an_exponential_moving_average(synthetic_bundle: SyntheticBundle, clip: Path) -> None:
    det = Detector(synthetic_bundle.root, batch_size=5)
    plain = list(det.detect_video(clip))
    alpha = 0.3
    smooth = list(det.detect_video(clip, smoothing=alpha))
    ema = None
    for p, s in zip(plain, smooth, strict=True):
        x = p.p_ood
        assert x is not None, p.error
        ema = x if ema is None else alpha * x + (1 - alpha) * ema
        assert s.ood_score_smooth == pytest.approx(ema, abs=1e-12)
        assert s.ood_smooth == (ema > 0.5)
        assert s.p_ood == p.p_ood
    assert "ood_score_smooth" in smooth[0].to_dict() and "ood_score_smooth" not in plain[0].to_dict()
    ctw = Detector(synthetic_bundle.root, method="ctw")
    first = next(iter(ctw.detect_video(clip, smoothing=1.0)))
    assert first.ood_score_smooth == first.p_no  # CTW smooths its own OOD probability, p_no(ĉ)
    with pytest.raises(ValueError, match="smoothing must be in"):
        next(iter(det.detect_video(clip, smoothing=0.0)))


def test_skip_frames_for_resume(synthetic_bundle: SyntheticBundle, clip: Path) -> None:
    det = Detector(synthetic_bundle.root)
    assert [r.frame for r in det.detect_video(clip, every=2, skip_frames={0, 2, 8})] == [4, 6, 10]


def test_bad_video_raises_video_error(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\0" * 1000)
    det = Detector(synthetic_bundle.root)
    with pytest.raises(VideoError, match="bad.mp4: cannot open video"):
        list(det.detect_video(bad))
    with pytest.raises(VideoError, match="cannot open video"):
        list(det.detect_video(tmp_path / "missing.mp4"))


def test_prefetch_propagates_errors_and_stops_early() -> None:
    def gen() -> Any:
        yield 1
        yield 2
        raise RuntimeError("boom")

    it = prefetch(gen(), maxsize=1)
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(RuntimeError, match="boom"):
        next(it)
    produced = []

    def endless() -> Any:
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it2 = prefetch(endless(), maxsize=2)
    assert next(it2) == 0
    it2.close()
    n = len(produced)
    assert n <= 5  # bounded look-ahead, and the producer stopped
