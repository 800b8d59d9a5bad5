"""Reading downloaded pickle files (CIFAR batches, insightface .bin sets) without running code they name.

Pickle calls whatever globals a file names, so an ordinary `pickle.load` of a downloaded file can execute arbitrary
code. `load` rebuilds only the globals the caller allows; any other is refused with a `UserError` that names it.
"""
from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

# Python 3 stores bytes under pickle protocol 2 through this pure function.
CODECS_ENCODE = {("_codecs", "encode"): codecs.encode}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedReader, encoding: str, allowed: dict[tuple[str, str], Any], what: str,
                 remedy: str) -> None:
        super().__init__(file, encoding=encoding)
        self.allowed, self.what, self.remedy = allowed, what, remedy

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise UserError(f"{self.what} is not a plain data pickle: it asks to run {module}.{name}, which is "
                            f"refused for safety; {self.remedy}")
        return found


def load(path: Path, *, allowed: dict[tuple[str, str], Any], encoding: str, what: str, remedy: str) -> Any:
    """The object pickled in `path`, rebuilt with only the `allowed` globals ((module, name) -> object).
    `encoding` is how Python 2 strings are read ("latin1" for text and numpy data, "bytes" to keep them bytes)."""
    try:
        with open(path, "rb") as file:
            return _Unpickler(file, encoding, allowed, what, remedy).load()
    # MemoryError too: a corrupt length field makes pickle try to allocate absurd buffers.
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError) as err:
        raise UserError(f"{what} is corrupt or not a pickle ({err}); {remedy}") from err
