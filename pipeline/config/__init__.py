"""Config: task files + `configs/` fragments + `key.path=value` overrides -> a validated, frozen `TaskConfig`.

    load.py         reading YAML, `defaults:` fragments, overrides, validation against the task's schema
    interpolate.py  `${key.path}` references, resolved after fragments, task file and overrides
    sections.py     the sections every task shares (pydantic): data, model, finetune, train, tracking
    shipped.py      the task files and fragments inside the package; built-in tasks by name
    placement.py    where a run goes: its MLflow experiment and its checkpoint folder
"""
from pipeline.config.load import apply_override, compose, deep_merge, load, read_yaml, to_yaml, validate
from pipeline.config.sections import TaskConfig

__all__ = ["TaskConfig", "apply_override", "compose", "deep_merge", "load", "read_yaml", "to_yaml", "validate"]
