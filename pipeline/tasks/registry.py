"""The task registry: one plain dict from the `task:` name of a task file to what the pipeline knows of a task before
importing it, and how to import it.

An `Entry` holds the task's config schema and its primary metric, both light (pydantic and a dataclass): reading and
validating a task file goes through them and never imports a task implementation (torchvision's detection models,
pycocotools, matplotlib). `load` imports the implementation and builds the task (`pipeline/tasks/base.py`), when a
run, predict or export needs it. A new task is one entry here, or `register(name, Entry(...))` from outside.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.config.sections import TaskConfig
from pipeline.errors import UserError, did_you_mean
from pipeline.tasks.classification import config as classification
from pipeline.tasks.detection import config as detection
from pipeline.tasks.face import config as face
from pipeline.tasks.metric import Metric
from pipeline.tasks.segmentation import config as segmentation

if TYPE_CHECKING:
    from pipeline.tasks.base import Task


@dataclass(frozen=True)
class Entry:
    schema: type[TaskConfig]  # the task file's schema: the shared sections with the task's own data and model
    primary: Metric  # picks the best checkpoint, stops early, ranks runs in sweep, compare and register
    load: Callable[[], Task]  # imports the implementation and builds the task


def _classification() -> Task:
    from pipeline.tasks.classification.task import Classification

    return Classification()


def _detection() -> Task:
    from pipeline.tasks.detection.task import Detection

    return Detection()


def _face() -> Task:
    from pipeline.tasks.face.task import Face

    return Face()


def _segmentation() -> Task:
    from pipeline.tasks.segmentation.task import Segmentation

    return Segmentation()


TASKS: dict[str, Entry] = {
    "classification": Entry(classification.Config, classification.PRIMARY, _classification),
    "detection": Entry(detection.Config, detection.PRIMARY, _detection),
    "face": Entry(face.Config, face.PRIMARY, _face),
    "segmentation": Entry(segmentation.Config, segmentation.PRIMARY, _segmentation),
}


def register(name: str, entry: Entry) -> None:
    if name in TASKS:
        raise ValueError(f"task '{name}' is registered already")
    TASKS[name] = entry


def entry(name: str, where: str = "task") -> Entry:
    """The entry of task `name`; a `UserError` naming `where` (e.g. the task file) and the valid names otherwise."""
    if name not in TASKS:
        raise UserError(f"{where}: '{name}' is not a task; valid: {', '.join(TASKS)}{did_you_mean(name, TASKS)}")
    return TASKS[name]


_built: dict[str, tuple[Entry, Task]] = {}  # each entry's task, built once


def get(name: str) -> Task:
    """Task `name`, its implementation imported; the same object on every call while its entry stays."""
    found = entry(name)
    built = _built.get(name)
    if built is None or built[0] is not found:
        built = _built[name] = (found, found.load())
    return built[1]
