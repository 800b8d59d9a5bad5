"""Many writers on one store (`pipeline sweep --jobs`, Ray children): what a write does when another writer is in
its way, so that no point, tag or dataset is lost.

An sqlite store takes one writer at a time. MLflow waits 20 s for the lock, but a transaction that read before it wrote
can be refused at once (SQLITE_BUSY). And MLflow inserts some rows only after looking for them (a dataset, an
experiment tag): when two runs do that at the same moment, the slower insert is refused as a duplicate, and a second
try finds the row. Both are tried again after these waits before they count as errors.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

LOCKED_WAITS = (0.1, 0.3, 1.0, 2.0, 5.0, 10.0)  # seconds
T = TypeVar("T")


def patiently(write: Callable[[], T], duplicates: bool = False) -> T:
    """`write()`, tried again while the store is locked by another writer, and, with `duplicates`, while its insert
    is refused as a duplicate of a row another writer inserted at the same moment."""
    for wait in LOCKED_WAITS:
        try:
            return write()
        except Exception as err:
            if not (locked(err) or (duplicates and duplicate(err))):
                raise
            time.sleep(wait)
    return write()


def locked(err: BaseException) -> bool:
    """Whether `err` says the store was busy with another writer (sqlite's `database is locked`)."""
    return "database is locked" in str(err) or "database is locked" in str(getattr(err, "__cause__", ""))


def duplicate(err: BaseException) -> bool:
    """Whether `err` is a row inserted twice at once (sqlite's and PostgreSQL's words for it)."""
    return "UNIQUE constraint failed" in str(err) or "duplicate key" in str(err)
