"""Class lists: reading a user's file, and the built-in ``imagenet`` list.

``data/imagenet_classes.txt`` holds the 1000 CLIP ImageNet class names as shipped by open_clip
(``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``, from Radford et al. 2021), one per line, in label
order. That list names two pairs of ImageNet classes alike ("missile" ×2, "sunglasses" ×2); the built-in
list keeps all 1000 entries so that index = ImageNet label, and a tie in prediction goes to the first.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from clipn_runtime.errors import InputFileError

#: Names accepted by :func:`load_classes` besides a file path.
BUILTIN_CLASSES: tuple[str, ...] = ("imagenet",)


def parse_classes(text: str, source: str | Path, *, allow_duplicates: bool = False) -> list[str]:
    """One class per line; ``#`` comment lines and blank lines ignored; surrounding whitespace stripped.

    A duplicate is an error naming both lines (unless ``allow_duplicates``); so is an empty list.
    """
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        name = raw.strip()
        if not name or name.startswith("#"):
            continue
        if name in seen and not allow_duplicates:
            raise InputFileError(
                source,
                lineno,
                f"duplicate class {name!r} (first on line {seen[name]}); class names must be unique",
            )
        seen.setdefault(name, lineno)
        names.append(name)
    if not names:
        raise InputFileError(source, None, "the class list is empty (write one class name per line)")
    return names


def read_classes(path: str | Path) -> list[str]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InputFileError(p, None, f"cannot read class list: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputFileError(p, line, "not valid UTF-8; save the class list as UTF-8") from None
    return parse_classes(text, p)


def load_classes(spec: str | Path) -> list[str]:
    """A built-in list name (``imagenet``) or a path to a class file."""
    if str(spec) == "imagenet" and not Path(spec).exists():
        text = resources.files("clipn_runtime").joinpath("data", "imagenet_classes.txt").read_text("utf-8")
        return parse_classes(text, "imagenet", allow_duplicates=True)
    return read_classes(spec)
