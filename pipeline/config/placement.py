"""Where a run goes: its MLflow experiment and its checkpoint folder.

A task file's runs go to the experiment named after the file and to `outputs/<experiment>/<backbone>`. A run on other
data (its `data.root` differs from the task file's own) gets a place of its own, named after the data folder: the
quickstart on `data/my_images` goes to experiment `quickstart-my_images` and `outputs/quickstart-my_images/resnet18`,
so the demo's runs and checkpoints stay as they were and `pipeline compare` never puts the two datasets in one table.
`tracking.experiment` and `train.output_dir`, when set, win. Whatever the names, a folder holding another dataset's
checkpoints is never written over (`check_folder`).
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipeline.config.load import load
from pipeline.config.sections import TaskConfig
from pipeline.errors import UserError


def experiment(task_file: str | Path, cfg: TaskConfig) -> str:
    """`tracking.experiment`, else the task file's name, suffixed with the data folder's name for other data."""
    if cfg.tracking.experiment:
        return cfg.tracking.experiment
    stem = Path(task_file).stem
    own = own_data_name(task_file, cfg.data.root)
    return f"{stem}-{own}" if own else stem


def output_dir(cfg: TaskConfig, experiment_name: str) -> Path:
    return Path(cfg.train.output_dir or f"outputs/{experiment_name}/{cfg.model.backbone.name}")


def own_data_name(task_file: str | Path, root: str) -> str | None:
    """The data folder's name when `root` is not the task file's own data.root (None when it is, or when the file
    alone does not load, e.g. it needs overrides to be valid: then nothing says what its own data is)."""
    try:
        file_root = load(task_file).data.root  # the file's own value, without any override
    except UserError:
        return None
    if _same_folder(root, file_root):
        return None
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(root).resolve().name).strip("-.")
    return name or "data"


def check_folder(folder: Path, data_root: str, checkpoints: tuple[str, ...]) -> None:
    """Refuse a folder whose checkpoints (files named `checkpoints`) were trained on other data: a run never replaces
    another dataset's checkpoints, even when two data folders share a name or a user reuses an experiment name."""
    saved = folder / "config.yaml"  # written at the start of every run (runner.open_run)
    if not saved.is_file() or not any((folder / name).exists() for name in checkpoints):
        return
    try:
        earlier = (yaml.safe_load(saved.read_text()) or {}).get("data", {}).get("root")
    except (yaml.YAMLError, AttributeError, OSError):
        return  # an unreadable config says nothing about the data; the replacement note of open_run still shows
    if earlier and not _same_folder(data_root, earlier):
        raise UserError(f"{folder} holds checkpoints trained on {earlier}, not {data_root}; set train.output_dir "
                        "(or tracking.experiment) to keep both, or delete the folder to replace them")


def _same_folder(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
