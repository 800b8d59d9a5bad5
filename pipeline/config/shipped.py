"""The task files and `configs/` fragments that ship inside the package, and finding a built-in task by name.

In a checkout, `pipeline/config/task_files` and `pipeline/config/fragments` are symlinks to the repo's `tasks/` and
`configs/`, which stay the source of truth; a wheel carries copies of them (pyproject.toml: package-data). Symlinks
rather than a setuptools `package-dir` mapping because the default (lenient) editable install does not see mapped data
packages.
"""
from __future__ import annotations

import difflib
import re
from importlib.resources import files
from pathlib import Path

import yaml

from pipeline.errors import UserError

# Resolved: in a checkout these are the repo's tasks/ and configs/, so both spellings of a path compare equal.
CONFIGS = Path(str(files("pipeline.config") / "fragments")).resolve()
TASK_FILES = Path(str(files("pipeline.config") / "task_files")).resolve()


def task_names() -> list[str]:
    return sorted(path.stem for path in TASK_FILES.glob("*.yaml"))


def find_task(arg: str | Path) -> Path:
    """An existing file wins; else a bare name (`quickstart` or `quickstart.yaml`) is a built-in task file."""
    path = Path(arg)
    if path.is_file():
        return path
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    builtin = TASK_FILES / f"{stem}.yaml"
    if path.parent == Path(".") and builtin.is_file():
        return builtin
    names = task_names()
    close = difflib.get_close_matches(stem, names, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise UserError(f"task file '{arg}' not found and not a built-in task; built-in: {', '.join(names)}{hint}")


def describe() -> list[tuple[str, str, str]]:
    """(name, task kind, first sentence of the opening comment) of every built-in task file."""
    rows = []
    for path in sorted(TASK_FILES.glob("*.yaml")):
        text = path.read_text()
        kind = (yaml.safe_load(text) or {}).get("task", "?")
        rows.append((path.stem, str(kind), first_sentence(text)))
    return rows


def first_sentence(text: str) -> str:
    """The opening comment's first sentence, joined across its lines; it ends at an example command (an indented
    comment line), a blank comment line or the first YAML line, so a sentence wrapped over two lines stays whole."""
    words = []
    for line in text.splitlines():
        if not line.startswith("#") or line.startswith("#  ") or not line.lstrip("#").strip():
            break
        words.append(line.lstrip("#").strip())
    return re.split(r"(?<=\.)\s+", " ".join(words), maxsplit=1)[0]
