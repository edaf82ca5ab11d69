"""clipn_runtime.ray: ClipnScorer in ray.data pipelines on a local two-CPU Ray, record for record equal to
clipn-detect on the same images (docs/scaling.md's recipe)."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import BLOCK_TORCH, SyntheticBundle, make_images

from clipn_runtime.cli import main as clipn_detect
from clipn_runtime.detector import RECORD_FIELDS

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'clipn-ood[ray]')")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (it comes with ray[data])")

from clipn_runtime.ray import ClipnScorer  # noqa: E402  (after the skip: the scorer needs pyarrow)

# Ray's own DataContext warns about its deprecated settings; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

#: The same ONNX graph on the same pixels, but in other batch compositions (Ray's batches are not clipn-detect's),
#: so onnxruntime may block its fp32 reductions differently: 1e-6 is far above that rounding, far below a change.
TOL = 1e-6
BAD = {"not_an_image.png": b"this is text, not a PNG", "empty.png": b""}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six images of two sizes and two bad files (a non-image, an empty file)."""
    root = tmp_path_factory.mktemp("ray_images")
    make_images(root, 4)
    (root / "wide").mkdir()
    for p in make_images(root / "wide", 2, seed=1, size=(52, 24)):
        p.rename(root / f"wide_{p.name}")
    (root / "wide").rmdir()
    for name, data in BAD.items():
        (root / name).write_bytes(data)
    return root


def clipn_detect_records(bundle: Path, inputs: list[Path]) -> dict[str, dict[str, Any]]:
    """clipn-detect's JSONL records for ``inputs``, by file stem."""
    r = CliRunner().invoke(clipn_detect, [*map(str, inputs), "-e", str(bundle), "-b", "3"], catch_exceptions=False)
    assert r.exit_code in (0, 1), r.output
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(out) == len(inputs)
    return {Path(d["path"]).stem: d for d in out}


def assert_same_records(got: dict[str, dict[str, Any]], want: dict[str, dict[str, Any]]) -> None:
    assert sorted(got) == sorted(want)
    for stem, g in got.items():
        assert list(g) == list(RECORD_FIELDS)
        w = want[stem]
        for k in RECORD_FIELDS:
            if k == "path":
                continue
            if isinstance(w[k], float):
                assert math.isclose(g[k], w[k], rel_tol=0, abs_tol=TOL), (stem, k, g[k], w[k])
            else:
                assert g[k] == w[k], (stem, k, g[k], w[k])


def score_and_write(ds: Any, bundle: Path, out: Path) -> list[dict[str, Any]]:
    """The recipe of docs/scaling.md: map_batches(ClipnScorer) on two actors → write_parquet → read back."""
    scored = ds.map_batches(
        ClipnScorer,
        fn_constructor_kwargs={"bundle_dir": str(bundle), "threads": 1, "batch_size": 2},
        concurrency=2,
        # Two actors on two CPUs must leave room for the read and write tasks, or the pipeline waits forever.
        num_cpus=0.5,
        batch_size=3,
    )
    scored.write_parquet(str(out))
    return list(pq.read_table(str(out)).to_pylist())


@pytest.mark.usefixtures("local_ray")
def test_binary_files_score_as_clipn_detect(
    synthetic_bundle: SyntheticBundle, folder: Path, tmp_path: Path
) -> None:
    files = sorted(folder.iterdir())
    ds = ray.data.read_binary_files(str(folder), include_paths=True)
    got = score_and_write(ds, synthetic_bundle.root, tmp_path / "scores")
    assert sorted(Path(d["path"]).name for d in got) == sorted(p.name for p in files)
    want = clipn_detect_records(synthetic_bundle.root, files)
    assert_same_records({Path(d["path"]).stem: d for d in got}, want)
    assert want["empty"]["error"] == "empty file (0 bytes)" and want["not_an_image"]["error"].startswith("not an")
    assert sum(d["error"] is None for d in got) == len(files) - len(BAD)


@pytest.mark.usefixtures("local_ray")
def test_read_images_arrays_score_as_clipn_detect(
    synthetic_bundle: SyntheticBundle, folder: Path, tmp_path: Path
) -> None:
    images = sorted(folder.glob("*img*.png"))
    ds = ray.data.read_images([str(p) for p in images], mode="RGB", include_paths=True)
    got = score_and_write(ds, synthetic_bundle.root, tmp_path / "scores")
    want = clipn_detect_records(synthetic_bundle.root, images)
    assert all(d["error"] is None for d in got)
    assert_same_records({Path(d["path"]).stem: d for d in got}, want)


def write_shards(folder: Path, files: list[Path], per_shard: int) -> list[Path]:
    """webdataset tar shards of ``files`` (key = the file stem, member = key.png), written with tarfile."""
    shards = []
    for s in range(0, len(files), per_shard):
        shard = folder / f"shard-{s // per_shard:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for p in files[s : s + per_shard]:
                data = p.read_bytes()
                info = tarfile.TarInfo(f"{p.stem}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        shards.append(shard)
    return shards


@pytest.mark.usefixtures("local_ray")
def test_webdataset_shards_score_as_clipn_detect(
    synthetic_bundle: SyntheticBundle, folder: Path, tmp_path: Path
) -> None:
    files = sorted(folder.iterdir())
    shards = write_shards(tmp_path, files, per_shard=3)
    ds = ray.data.read_webdataset([str(s) for s in shards], decoder=None)
    got = score_and_write(ds, synthetic_bundle.root, tmp_path / "scores")
    # Each record names its sample shard#key, as clipn-detect does for shards.
    names = {s.name: {p.stem for p in files[i * 3 : i * 3 + 3]} for i, s in enumerate(shards)}
    by_shard: dict[str, set[str]] = {}
    for d in got:
        shard, key = d["path"].split("#")
        by_shard.setdefault(Path(shard).name, set()).add(key)
    assert by_shard == names
    want = clipn_detect_records(synthetic_bundle.root, files)
    assert_same_records({d["path"].split("#")[1]: d for d in got}, want)


def test_a_sample_without_an_image_and_bad_arrays_are_error_rows(synthetic_bundle: SyntheticBundle) -> None:
    scorer = ClipnScorer(synthetic_bundle.root, threads=1)
    png = io.BytesIO()
    from PIL import Image

    rgb = np.full((20, 24, 3), 128, np.uint8)
    Image.fromarray(rgb).save(png, "PNG")
    # read_webdataset leaves NaN where a sample lacks a member: that sample has no image, and says so.
    batch = {
        "__key__": np.array(["a", "b"], dtype=object),
        "__url__": np.array(["s.tar", "s.tar"], dtype=object),
        "png": np.array([png.getvalue(), float("nan")], dtype=object),
        "txt": np.array([float("nan"), b"caption"], dtype=object),
    }
    rows = scorer(batch).to_pylist()
    assert [r["path"] for r in rows] == ["s.tar#a", "s.tar#b"]
    assert rows[0]["error"] is None and rows[1]["error"] == "the sample has no image"
    assert all(rows[1][k] is None for k in ("pred", "prob", "p_ood", "ood"))
    arrays = np.empty(3, dtype=object)
    arrays[:] = [rgb, rgb[..., 0], rgb.astype(np.float32)]
    rows = scorer({"image": arrays}).to_pylist()
    assert rows[0]["error"] is None and rows[0]["p_ood"] == pytest.approx(
        scorer.detector.detect(rgb)[0].p_ood, abs=TOL
    )
    assert [r["error"] is not None and "H×W×3 uint8" in r["error"] for r in rows] == [False, True, True]


def test_a_batch_without_an_image_column_names_the_option(synthetic_bundle: SyntheticBundle) -> None:
    scorer = ClipnScorer(synthetic_bundle.root, threads=1)
    with pytest.raises(ValueError, match=r"no image column in the batch \(columns: caption\); pass image_column="):
        scorer({"caption": np.array(["x"], dtype=object)})
    with pytest.raises(ValueError, match="image_column='jpeg' is not a column"):
        ClipnScorer(synthetic_bundle.root, image_column="jpeg")({"png": np.array([b""], dtype=object)})


def test_scorer_runs_with_torch_blocked(synthetic_bundle: SyntheticBundle, folder: Path) -> None:
    """The Ray path of an edge or CPU cluster install: ray.data and the scorer, no torch."""
    program = BLOCK_TORCH + (
        "import sys, numpy as np, ray.data\n"
        "from clipn_runtime.ray import ClipnScorer\n"
        f"scorer = ClipnScorer({str(synthetic_bundle.root)!r}, threads=1)\n"
        f"data = open({str(folder / 'img0000.png')!r}, 'rb').read()\n"
        "rows = scorer({'bytes': np.array([data, b''], dtype=object)}).to_pylist()\n"
        "assert rows[0]['error'] is None and rows[1]['error'] == 'empty file (0 bytes)', rows\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
