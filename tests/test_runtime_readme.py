"""The README's Python API example runs as written (on the exporter's tiny bundle)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- runtime-api-example -->"


def api_example() -> tuple[str, Path]:
    """The first ```python block after the marker in README.md."""
    for doc in (ROOT / "README.md",):
        text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
        if MARKER in text:
            m = re.search(r"```python\n(.*?)```", text.split(MARKER, 1)[1], re.DOTALL)
            assert m, f"{doc}: no ```python block after {MARKER}"
            return m.group(1), doc
    raise AssertionError(f"no {MARKER} in README.md")


def test_readme_python_api_example_runs(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("av", reason="the example reads a video: PyAV (the `video` extra) is not installed")
    from test_runtime_video import make_clip

    code, source = api_example()
    shutil.copytree(tiny_bundle, tmp_path / "bundle")
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for name in ("cat.png", "street.jpg"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    make_clip(tmp_path / "clip.mp4", n=12)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(source), "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("images/cat.png ") and lines[1].startswith("images/street.jpg ")
    assert "'pred':" in lines[2] and "'error': None" in lines[2]
    assert "skipped images/notes.txt not an image" in out
    video = [line for line in lines if re.match(r"^\s*\d+\.\d\ds ", line)]
    assert [line.split("s ")[0].strip() for line in video] == ["0.00", "0.50", "1.00"]  # every 5th frame at 10 fps
