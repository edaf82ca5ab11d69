"""The Python examples of the docs run as written (on the exporter's tiny bundles)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import make_clip
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- runtime-api-example -->"


def api_example() -> tuple[str, Path]:
    """The first ```python block after the marker in docs/detect.md."""
    for doc in (ROOT / "docs" / "detect.md",):
        text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
        if MARKER in text:
            m = re.search(r"```python\n(.*?)```", text.split(MARKER, 1)[1], re.DOTALL)
            assert m, f"{doc}: no ```python block after {MARKER}"
            return m.group(1), doc
    raise AssertionError(f"no {MARKER} in docs/detect.md")


def test_detect_docs_python_api_example_runs(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("av", reason="the example reads a video: PyAV (the `video` extra) is not installed")

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


def test_readme_python_example_runs(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's short Detector example, as written, on the tiny bundle copied to bundle/."""
    m = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.DOTALL)
    assert m, "no ```python block in README.md"
    shutil.copytree(tiny_bundle, tmp_path / "bundle")
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(tmp_path / "images" / "cat.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(m.group(1), "README.md", "exec"), {"__name__": "__readme__"})
    path, _pred, p_ood, ood = capsys.readouterr().out.split()
    assert path == "images/cat.png" and 0.0 <= float(p_ood) <= 1.0 and ood in ("True", "False")


def _markdown_files() -> list[Path]:
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "benchmarks" / "results" / "README.md",
    ]


def test_readme_is_short_and_docs_hold_the_rest() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines: move reference material to docs/"


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_into_the_repo(doc: Path) -> None:
    """Every relative link of the README and docs names a file that exists, and an #anchor a heading there."""
    text = doc.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists() or (
            anchor and path.suffix == ".md" and anchor not in _anchors(path.read_text(encoding="utf-8"))
        ):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links to nothing: {broken}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    heads = re.findall(r"^#+\s+(.*)$", re.sub(r"```.*?```", "", markdown, flags=re.DOTALL), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_nothing_refers_to_text_outside_the_repo() -> None:
    """Users get the repo, not our design notes or issue tracker: code and docs cite only what ships."""
    pattern = re.compile(r"\bDESIGN(\.md)?\b|\.\./shared|\b[Ii]ssue #?\d+|\b[Tt]he issue(?:'s)?\b")
    sources = [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/*.py"), ROOT / ".ci" / "run"]
    sources += [
        p
        for pkg in ("clipn_runtime", "clipn_train", "clipn_export", "clipn_eval", "clipn_demo", "tests")
        for p in (ROOT / pkg).rglob("*.py")
    ]
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in sources
        if p.name != "test_docs_examples.py"
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "\n".join(hits)
