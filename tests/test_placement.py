"""Your own data gets its own place: a run on another data.root than its task file's lands in its own experiment and
checkpoint folder, and never replaces another dataset's checkpoints."""
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.train import checkpoint, runner


@pytest.fixture
def own_data(shapes: Path, tmp_path: Path) -> Path:
    """A copy of the shapes (not a link: a link resolves to the task file's own folder) under another name."""
    return Path(shutil.copytree(shapes, tmp_path / "data" / "my_images"))


def place(path: Path, *overrides: str) -> tuple[str, Path]:
    setup = runner.prepare(path, overrides)
    return setup.experiment, setup.output_dir


def test_the_place_follows_the_data_unless_named(task_file, shapes: Path, own_data: Path, tmp_path: Path,
                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = task_file(train={"output_dir": None})  # the default folder, outputs/<experiment>/<backbone>
    assert place(path) == ("tiny", Path("outputs/tiny/resnet18"))
    assert place(path, f"data.root={shapes}/../{shapes.name}") == ("tiny", Path("outputs/tiny/resnet18"))  # same data
    assert place(path, f"data.root={own_data}") == ("tiny-my_images", Path("outputs/tiny-my_images/resnet18"))
    assert place(path, f"data.root={own_data}", "tracking.experiment=mine") == ("mine", Path("outputs/mine/resnet18"))
    assert place(path, f"data.root={own_data}", "train.output_dir=elsewhere") == ("tiny-my_images", Path("elsewhere"))


@pytest.mark.e2e
def test_a_run_on_your_data_lands_in_its_own_experiment(said, task_file, own_data: Path, uri: str, tmp_path: Path,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = task_file(train={"output_dir": None, "epochs": 1})
    demo = runner.run(path)
    before = len(said)
    mine = runner.run(path, (f"data.root={own_data}",))
    client = MlflowClient(uri)
    experiment_of = {run: client.get_experiment(client.get_run(run).info.experiment_id).name
                     for run in (demo.run_id, mine.run_id)}
    assert experiment_of == {demo.run_id: "tiny", mine.run_id: "tiny-my_images"}
    assert demo.output_dir == Path("outputs/tiny/resnet18")
    assert mine.output_dir == Path("outputs/tiny-my_images/resnet18")
    assert (demo.output_dir / checkpoint.BEST).exists() and (mine.output_dir / checkpoint.BEST).exists()
    assert said[before].startswith(f"data.root {own_data} is not tiny.yaml's own data: experiment 'tiny-my_images'")


@pytest.mark.e2e
def test_a_folder_of_another_datasets_checkpoints_is_never_replaced(task_file, own_data: Path, tmp_path: Path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = task_file(train={"output_dir": None, "epochs": 1})
    runner.run(path, (f"data.root={own_data}",))
    namesake = Path(shutil.copytree(own_data, tmp_path / "other" / "my_images"))  # another dataset, the same name
    with pytest.raises(UserError, match="holds checkpoints trained on .*my_images, not .*other/my_images"):
        runner.prepare(path, (f"data.root={namesake}",))
    result = CliRunner().invoke(main, ["run", str(path), f"data.root={namesake}"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "set train.output_dir" in errors[0], result.output
    # named by the user, it trains beside the first
    assert place(path, f"data.root={namesake}", "tracking.experiment=other")[1] == Path("outputs/other/resnet18")


@pytest.mark.e2e
def test_a_sweep_on_your_data_keeps_its_runs_together(task_file, own_data: Path, uri: str, tmp_path: Path,
                                                       monkeypatch):
    from pipeline.study import sweep

    monkeypatch.chdir(tmp_path)
    path = task_file(train={"output_dir": None, "epochs": 1})
    result = sweep.run(path, ("train.lr=0.001,0.002", f"data.root={own_data}"))
    client = MlflowClient(uri)
    runs = [result.parent_run_id, *(c.run_id for c in result.children)]
    assert {client.get_experiment(client.get_run(r).info.experiment_id).name for r in runs} == {"tiny-my_images"}
    assert sorted(p.parent.name for p in Path("outputs/tiny-my_images").glob("sweep-*/*/config.yaml")) == \
        ["lr=0.001", "lr=0.002"]
