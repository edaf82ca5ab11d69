"""clipn_train: the CLIPN model, its ITBO/TSO losses and the ``clipn-train`` trainer (torch + open_clip).

Importing this package stays light (no torch) so ``clipn-train --help`` is fast; import the submodules
(``clipn_train.model``, ``clipn_train.losses``, ``clipn_train.trainer``) for the real work.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clipn-ood")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
