"""Task configuration: YAML loading with `defaults:` fragments, `key.path=value` overrides and `${key.path}` references.

A task file names its task (`task: classification`) and may list fragments from `configs/`
(`defaults: [backbone/resnet18, optim/adamw]`). Fragments merge in order, the task file last, then the command-line
overrides. References such as `size: ${data.image_size}` are then resolved (pipeline/config/interpolate.py), so an
override reaches every place that refers to it. The resolved dict is validated strictly against the task's schema
(pipeline/tasks/registry.py, built on the shared sections of pipeline/config/sections.py): an unknown key, a wrong
type or an out-of-range value raises `UserError` naming the key path and what is allowed.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config import shipped
from pipeline.config.interpolate import interpolate
from pipeline.config.sections import TaskConfig
from pipeline.errors import UserError, did_you_mean

# The fragments inside the installed package (a checkout's configs/ through a symlink): the `defaults:` fallback.
PACKAGE_CONFIGS = shipped.CONFIGS


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TaskConfig:
    """Read a task file, merge its fragments and the overrides, and validate against the task's schema."""
    raw = compose(path, overrides)
    return validate(raw, source=str(path))


def compose(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The merged, unvalidated dict: fragments in order, then the task file, then `key.path=value` overrides."""
    path = shipped.find_task(path)  # an existing file, else a built-in task name such as `quickstart`
    merged = _load_with_defaults(path, _config_dirs(path), depth=0)
    for item in overrides:
        apply_override(merged, item)
    return merged


def validate(raw: dict, source: str = "config") -> TaskConfig:
    # The task registry holds each task's schema; it imports the tasks' light config modules, which import this
    # package's sections, so it is looked up here rather than at import.
    from pipeline.tasks import registry

    schema = registry.entry(str(raw.get("task")), where=f"{source}: task").schema
    raw = interpolate(raw, schema, source)
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{source}: {format_validation_error(err, schema)}") from None


def apply_override(cfg: dict, item: str) -> None:
    """Set `a.b.c=value` in place; the value is parsed as YAML, so `[stem,layer1]` is a list and `1e-3` a float."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{item}' is not of the form key.path=value (e.g. train.lr=0.01)")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as err:
        raise UserError(f"override '{item}': the value is not valid YAML ({_one_line(err)})") from None
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override '{item}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def format_validation_error(err: ValidationError, schema: type[BaseModel]) -> str:
    messages = [_format_one(e, schema) for e in err.errors()]
    more = f" (and {len(messages) - 1} more: {'; '.join(messages[1:3])})" if len(messages) > 1 else ""
    return messages[0] + more


def _format_one(error: dict, schema: type[BaseModel]) -> str:
    loc = [str(p) for p in error["loc"] if not str(p).startswith(("function-after", "list[", "dict["))]
    path = ".".join(loc)
    if error["type"] == "extra_forbidden":
        valid = _fields_at(schema, loc[:-1])
        return f"unknown key '{path}'{did_you_mean(loc[-1], valid, prefix='.'.join(loc[:-1]))}"
    if not path and error["type"] == "value_error":  # a check across sections: its message names the keys
        return error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a section"
    return f"{path or 'config'}: {shown} is not allowed: {error['msg']}"


def _fields_at(schema: type[BaseModel], loc: list[str]) -> list[str]:
    model: Any = schema
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _config_dirs(task_file: Path) -> list[Path]:
    # A project copied elsewhere keeps tasks/ and configs/ side by side; the package's own configs/ is the fallback.
    dirs = [(task_file.resolve().parent.parent / "configs").resolve(), PACKAGE_CONFIGS]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d not in dirs[:i]]


def _load_with_defaults(path: Path, config_dirs: list[Path], depth: int) -> dict:
    if depth > 8:
        raise UserError(f"{path}: `defaults:` nest more than 8 levels deep (a fragment including itself?)")
    data = read_yaml(path)
    merged: dict = {}
    defaults = data.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise UserError(f"{path}: defaults must be a list of fragment names such as [backbone/resnet18]")
    for name in defaults:
        fragment = _find_fragment(str(name), path, config_dirs)
        merged = deep_merge(merged, _load_with_defaults(fragment, config_dirs, depth + 1))
    return deep_merge(merged, data)


def _find_fragment(name: str, used_in: Path, config_dirs: list[Path]) -> Path:
    for d in config_dirs:
        candidate = d / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if candidate.is_file():
            return candidate
    available = sorted({str(p.relative_to(d).with_suffix("")) for d in config_dirs for p in d.rglob("*.yaml")})
    raise UserError(f"{used_in}: defaults: fragment '{name}' not found in configs/{did_you_mean(name, available)}")


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: broken YAML: {_one_line(err)}") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections (task:, data:, model:, ...), got "
                        f"{type(data).__name__}")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def to_yaml(cfg: TaskConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
