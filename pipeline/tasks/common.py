"""Helpers the tasks share, next to their contract (base.py)."""
from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from pathlib import Path


def metric_key(name: str) -> str:
    """A class or set name as part of an MLflow metric key, which allows letters, digits, _ - . / and spaces."""
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", name)


def write_csv(path: Path, header: list[str], rows: Iterable[Iterable]) -> Path:
    """A CSV through the csv module, so a class name with a comma or a quote stays one field."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def fmt(value: float, digits: int = 4) -> str:
    """A metric for a table: empty where undefined (NaN), not "nan"."""
    return "" if value != value else f"{value:.{digits}f}"


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure and close it (pyplot keeps every figure alive until closed)."""
    import matplotlib.pyplot as plt  # only the reports draw: reading a config or predicting needs no matplotlib

    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


class OutputNames:
    """File names for per-image outputs (drawn boxes, masks): the image's stem with the output's suffix, numbered when
    two inputs share a stem (a/x.png and b/x.png), so no output overwrites another."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, path: Path, suffix: str) -> str:
        name, n = f"{path.stem}{suffix}", 1
        while name in self.used:
            name, n = f"{path.stem}-{n}{suffix}", n + 1
        self.used.add(name)
        return name
