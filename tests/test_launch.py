"""A sweep child forked from the server that imported the pipeline (pipeline/study/launch.py) is the process
`python -m pipeline ...` would have been: its environment, working folder, console and exit code; other commands
(torchrun) run as plain processes with the same environment, folder, cores and console."""
import os
import sys
from pathlib import Path

import yaml

from pipeline import __version__
from pipeline.study import launch


def test_a_forked_child_prints_to_its_console_and_exits_with_its_code(tmp_path: Path):
    console = tmp_path / "console.log"
    console.write_text("earlier\n")
    child = launch.start([sys.executable, "-m", "pipeline", "--version"], console, dict(os.environ), cores=(0,))
    assert isinstance(child, launch.Forked)
    assert child.wait(120) == 0 and child.returncode == 0
    assert console.read_text() == f"earlier\npipeline {__version__}\n"  # appended, like a resumed child's console


def test_a_forked_child_reads_the_environment_and_folder_it_was_given(tmp_path: Path):
    store = tmp_path / "elsewhere.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    console = tmp_path / "compare.log"
    child = launch.start([sys.executable, "-m", "pipeline", "compare", "nosuch"], console, env, cwd=str(tmp_path))
    assert child.wait(120) == 1
    text = console.read_text()
    assert f"error: no tracking store at {store} (sqlite:///{store})" in text and "Traceback" not in text
    assert not store.exists()  # compare reads; it does not leave an empty store behind
    # a task file named relative to the folder it was given, which is not this process's
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"task": "classification", "trian": {"epochs": 1}}))
    child = launch.start([sys.executable, "-m", "pipeline", "run", "mine.yaml"], tmp_path / "run.log", env,
                         cwd=str(tmp_path))
    assert child.wait(120) == 1
    errors = [line for line in (tmp_path / "run.log").read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "trian" in errors[0]


def test_other_commands_run_as_processes_on_their_cores_folder_and_environment(tmp_path: Path):
    console = tmp_path / "console.log"
    script = "import os; print(os.getcwd(), sorted(os.sched_getaffinity(0)), os.environ['CHILD'], os.getsid(0) == " \
             "os.getpid())"
    child = launch.start([sys.executable, "-c", script], console, {**os.environ, "CHILD": "yes"}, cores=(0,),
                         cwd=str(tmp_path))
    assert not isinstance(child, launch.Forked)
    assert child.wait(60) == 0
    assert console.read_text() == f"{tmp_path} [0] yes True\n"
