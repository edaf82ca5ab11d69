"""The layout of clipn_train: its modules import each other in one direction only.

The graph is read from the source (every ``import``, also those inside functions and under ``TYPE_CHECKING``),
because a cycle that Python happens to resolve at run time still means two modules that cannot be read, changed
or tested one without the other.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import clipn_train

PACKAGE = Path(clipn_train.__file__).parent


def _module_names() -> set[str]:
    return {f"clipn_train.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}


def _imported(tree: ast.AST, modules: set[str]) -> set[str]:
    """The clipn_train modules a module's source imports, wherever the import stands."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "clipn_train" + (f".{node.module}" if node.module else "") if node.level else node.module or ""
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from clipn_train import checkpoint`
    return found & modules


def import_graph() -> dict[str, set[str]]:
    modules = _module_names()
    return {
        name: _imported(ast.parse((PACKAGE / f"{name.split('.')[-1]}.py").read_text(encoding="utf-8")), modules)
        for name in sorted(modules)
    }


def test_clipn_train_has_no_import_cycle() -> None:
    graph = import_graph()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle in clipn_train: {' -> '.join(e.args[1])}") from None
    assert set(order) == graph.keys() and len(graph) >= 10  # the reader found the package's modules


def test_model_is_the_module_alone_and_the_factory_builds_it() -> None:
    """open_clip's layout: model <- checkpoint <- factory, never the other way."""
    graph = import_graph()
    assert not graph["clipn_train.model"] & {"clipn_train.factory", "clipn_train.checkpoint"}
    assert "clipn_train.factory" not in graph["clipn_train.checkpoint"]
    assert {"clipn_train.model", "clipn_train.checkpoint"} <= graph["clipn_train.factory"]
    # At run time too: importing the model loads neither the checkpoint code nor the factory.
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, clipn_train.model; print(sorted(m for m in sys.modules if m.startswith('clipn_train')))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert loaded.strip() == "['clipn_train', 'clipn_train.model']"


def test_the_graph_reader_sees_every_kind_of_import() -> None:
    """The static check would pass vacuously if it missed imports; feed it each form the package uses."""
    source = """
from clipn_train import checkpoint as ckpt
from clipn_train.model import CLIPN
import clipn_train.data
def f():
    from clipn_train.cache import FeatureCache
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from clipn_train.factory import LoadedCLIPN
from . import losses
"""
    modules = _module_names()
    assert _imported(ast.parse(source), modules) == {
        "clipn_train.checkpoint",
        "clipn_train.model",
        "clipn_train.data",
        "clipn_train.cache",
        "clipn_train.factory",
        "clipn_train.losses",
    }
