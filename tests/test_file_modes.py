"""Every file clipn-ood writes gets the mode the umask says (0644 under 022, 0600 under 077), atomically.

Checkpoints, the resume state and ``latest.json`` used to be 0600 whatever the umask (``mkstemp``), bundle text
banks 0644 whatever the umask (``chmod``): both are wrong for someone whose umask says otherwise.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from clipn_runtime.fileio import CHUNK, atomic_write, atomic_writer, sha256_file

if TYPE_CHECKING:
    from clipn_train.factory import LoadedCLIPN

pytestmark = [
    pytest.mark.skipif(os.name == "nt", reason="POSIX file modes"),
    pytest.mark.usefixtures("torch_one_thread"),
]


@pytest.fixture(params=[0o022, 0o077, 0o027], ids=lambda m: f"umask{m:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _files(*folders: Path) -> list[Path]:
    return sorted(p for f in folders for p in f.rglob("*") if p.is_file())


def test_atomic_write_gets_the_umask_mode_and_leaves_no_temporary_file(umask: int, tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    atomic_write(target, "first")
    assert target.read_text() == "first" and _mode(target) == 0o666 & ~umask
    target.chmod(0o400)  # replacing never reuses the old file's mode (or needs write access to it)
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second" and _mode(target) == 0o666 & ~umask
    assert os.listdir(target.parent) == ["a.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path: Path) -> None:
    target = atomic_write(tmp_path / "x.bin", b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as fh:
        fh.write(b"half")
        raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]


def test_sha256_file_reads_in_chunks(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 1)  # more than one chunk, not a multiple of it
    assert sha256_file(atomic_write(tmp_path / "big", data)) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_training_cache_checkpoints_and_bundle_follow_the_umask(
    mask: int, tiny_config: Path, tiny_clipn: LoadedCLIPN, tmp_path: Path
) -> None:
    from helpers import make_csv, tiny_weights

    from clipn_demo.pretrain import save_clip
    from clipn_export.exporter import export_bundle
    from clipn_export.parity import ParityOptions
    from clipn_train.cache import build_feature_cache
    from clipn_train.trainer import TrainConfig, Trainer

    data = make_csv(tmp_path / "data", n=8)
    weights = tiny_weights(tiny_clipn, tmp_path)
    old = os.umask(mask)
    try:
        build_feature_cache(
            data=str(data), output=tmp_path / "cache", model=str(tiny_config), pretrained=str(weights),
            variant="learnable", prompts="clipn", batch_size=4, workers=0, precision="fp32", dtype="float32",
            shard_size=4,
        )  # fmt: skip
        cfg = TrainConfig(
            train_data=str(tmp_path / "cache"), model=str(tiny_config), pretrained=str(weights), batch_size=4,
            epochs=1, workers=0, precision="fp32", logs=str(tmp_path / "logs"), name="run", tensorboard=False,
            val_batch_size=4,
        )  # fmt: skip
        Trainer(cfg).run()
        export_bundle(
            tiny_clipn,
            ["cat", "dog"],
            tmp_path / "bundle",
            parity=ParityOptions(enabled=False),
            cache_dir=tmp_path / "banks",
            progress=False,
        )
        save_clip(tiny_clipn.model.clip, tiny_clipn.info.model_config, tmp_path / "clip")
    finally:
        os.umask(old)
    checkpoints = tmp_path / "logs" / "run" / "checkpoints"
    expected = {
        checkpoints / "latest.json",
        tmp_path / "cache" / "manifest.json",
        tmp_path / "cache" / "r0-00000.image.npy",
        tmp_path / "bundle" / "text_bank.npz",
        tmp_path / "bundle" / "clipn.json",
        tmp_path / "clip" / "open_clip_model.safetensors",
    }
    written = _files(
        tmp_path / "cache", tmp_path / "logs", tmp_path / "bundle", tmp_path / "banks", tmp_path / "clip"
    )
    assert (
        expected <= set(written)
        and list(checkpoints.glob("*.safetensors"))
        and list(checkpoints.glob("*.state.pt"))
    )
    assert list((tmp_path / "banks").iterdir()), "the text bank was cached"
    wrong = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in written if _mode(p) != 0o666 & ~mask}
    assert not wrong, f"umask {mask:03o}: expected {0o666 & ~mask:o} for every file"


def test_replace_dir_swaps_a_whole_folder_and_keeps_the_old_one_on_failure(tmp_path: Path) -> None:
    from clipn_runtime.fileio import replace_dir

    target, staging = tmp_path / "model", tmp_path / ".model.tmp"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    replace_dir(staging, target)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging, no old copy left behind
    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / "missing", target)  # the new folder never came …
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]  # … so the one there stays in place
