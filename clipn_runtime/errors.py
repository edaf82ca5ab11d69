"""Errors a user can fix. CLIs print them as one clear message (no traceback) and exit with code 2."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input: the message says what is wrong and what to do."""


class InputFileError(UserError, ValueError):
    """A problem at a specific place in a user-supplied text file."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
