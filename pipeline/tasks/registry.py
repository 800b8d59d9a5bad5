"""The task registry: a plain dict from the `task:` name in a task file to the task (see base.py for the contract)."""
from __future__ import annotations

from pipeline.errors import UserError
from pipeline.tasks.base import Task
from pipeline.tasks.classification.task import Classification
from pipeline.tasks.detection.task import Detection
from pipeline.tasks.face.task import Face
from pipeline.tasks.segmentation.task import Segmentation

TASKS: dict[str, Task] = {task.name: task for task in (Classification(), Detection(), Face(), Segmentation())}


def get(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"task '{name}' is not a task; valid: {', '.join(TASKS)}")
    return TASKS[name]
