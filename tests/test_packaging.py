"""Packaging: built-in tasks run by name, `defaults:` come from the package, and a wheel carries tasks/ and configs/."""
import shutil
import subprocess
import sys
import zipfile
from importlib.resources import files
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline import config
from pipeline.cli import main
from pipeline.config import shipped

REPO = Path(__file__).resolve().parent.parent
TASKS = sorted(p.stem for p in (REPO / "tasks").glob("*.yaml"))
FRAGMENTS = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))


def test_package_holds_every_task_file_and_fragment():
    # Through the package, not the checkout: in a checkout the symlinks lead back to the root folders.
    package = files("pipeline.config")
    for fragment in FRAGMENTS:
        assert (package / "fragments" / fragment).is_file(), fragment
    for name in TASKS:
        assert (package / "task_files" / f"{name}.yaml").is_file(), name
    assert shipped.task_names() == TASKS
    assert shipped.CONFIGS == (REPO / "configs").resolve() and shipped.TASK_FILES == (REPO / "tasks").resolve()


@pytest.mark.parametrize("name", TASKS)
def test_builtin_name_resolves_with_or_without_suffix(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # an empty folder: no tasks/ or configs/ beside it
    for arg in (name, f"{name}.yaml"):
        path = shipped.find_task(arg)
        assert path.stem == name  # the experiment name stays the file stem
        assert config.compose(arg) == config.compose(REPO / "tasks" / f"{name}.yaml")


def test_existing_path_wins_over_builtin_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("task: classification\ntrain: {epochs: 3}\n")
    assert config.compose("quickstart.yaml") == {"task": "classification", "train": {"epochs": 3}}
    # Without the suffix no file of that name exists here, so the name is the built-in task.
    assert config.compose("quickstart") == config.compose(REPO / "tasks/quickstart.yaml")


def test_cli_config_of_builtin_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["config", "quickstart", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    assert resolved["task"] == "classification" and resolved["train"]["epochs"] == 1
    assert resolved["model"]["backbone"]["name"] == "resnet18"  # from the package's backbone/resnet18 fragment


@pytest.mark.parametrize("command", ["config", "run", "sweep"])
def test_unknown_name_is_one_line_listing_builtins(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [command, "quikstart", "train.epochs=1"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "'quikstart' not found" in errors[0] and errors[0].endswith("did you mean quickstart?")
    assert all(name in errors[0] for name in TASKS)


def test_path_with_folder_is_not_taken_for_a_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # `pipeline run tasks/quickstart.yaml` in a folder without tasks/ points at the built-in name instead of guessing.
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["config", "tasks/quickstart.yaml"])
    assert result.exit_code == 1 and "did you mean quickstart?" in result.output, result.output


def test_tasks_command_lists_every_task_file():
    result = CliRunner().invoke(main, ["tasks"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines()}
    assert sorted(rows) == TASKS
    for name in TASKS:
        text = (REPO / "tasks" / f"{name}.yaml").read_text()
        kind = yaml.safe_load(text)["task"]
        first_comment = next(line for line in text.splitlines() if line.startswith("#")).lstrip("# ").strip()
        assert rows[name].split()[1] == kind, rows[name]
        # the whole first sentence, even where it wraps onto the next comment line
        description = rows[name].split(maxsplit=2)[2]
        assert description.endswith(".") and (description.startswith(first_comment) or
                                              first_comment.startswith(description)), rows[name]


def test_task_file_anywhere_takes_defaults_from_the_package(tmp_path: Path):
    task = tmp_path / "elsewhere" / "mine.yaml"
    task.parent.mkdir()
    task.write_text("task: classification\ndefaults: [backbone/resnet18, optim/adamw]\ntrain: {epochs: 2}\n")
    assert not (tmp_path / "configs").exists()
    merged = config.compose(task)
    expected = config.deep_merge(yaml.safe_load((REPO / "configs/backbone/resnet18.yaml").read_text()),
                                 yaml.safe_load((REPO / "configs/optim/adamw.yaml").read_text()))
    assert merged == config.deep_merge(expected, {"task": "classification", "train": {"epochs": 2}})
    assert config.load(task).train.epochs == 2


def test_project_configs_win_over_the_package(tmp_path: Path):
    # A project copied elsewhere: its configs/ is searched first, the package fills in what it lacks.
    (tmp_path / "configs/optim").mkdir(parents=True)
    (tmp_path / "configs/optim/adamw.yaml").write_text("train: {lr: 0.123}\n")
    (tmp_path / "tasks").mkdir()
    task = tmp_path / "tasks/t.yaml"
    task.write_text("task: classification\ndefaults: [backbone/resnet18, optim/adamw]\n")
    merged = config.compose(task)
    assert merged["train"] == {"lr": 0.123}
    assert merged["model"]["backbone"]["name"] == "resnet18"


def test_wheel_carries_tasks_and_configs(tmp_path: Path):
    pytest.importorskip("setuptools", minversion="70.1", reason="building a wheel without isolation needs setuptools")
    # Build from a copy so the checkout gets no build/ folder; the copy keeps pipeline/'s symlinks (relative ones).
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("pipeline", "tasks", "configs"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {f"pipeline/config/fragments/{f}" for f in FRAGMENTS} <= names
        assert {f"pipeline/config/task_files/{t}.yaml" for t in TASKS} <= names
        assert zf.read("pipeline/config/task_files/quickstart.yaml") == (REPO / "tasks/quickstart.yaml").read_bytes()


def test_the_readme_and_pipeline_tasks_agree_on_the_quickstart():
    """What `pipeline tasks` says of the quickstart (its file's first sentence) and what the README's first screen and
    tasks table say: the same top-1 and the same minutes."""
    readme = (REPO / "README.md").read_text()
    said = shipped.first_sentence((REPO / "tasks" / "quickstart.yaml").read_text())
    assert "0.98 in 3-4 minutes" in said
    assert "val top-1 0.98 in 3-4 minutes" in readme.split("## Using it")[0]
    assert "| top-1 0.98 in 3-4 min |" in readme
