"""Shared fixtures. No test touches the network: hub caches point into a temp folder and hub access is offline."""
import os
import shutil
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub or torch.hub: they read these once, at import.
_CACHE = Path(tempfile.mkdtemp(prefix="pipeline-test-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_CACHE / "huggingface")
os.environ["HF_HUB_CACHE"] = str(_CACHE / "huggingface" / "hub")
os.environ["TORCH_HOME"] = str(_CACHE / "torch")
os.environ.pop("MLFLOW_TRACKING_URI", None)

from collections.abc import Iterator  # noqa: E402

import mlflow  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from said import said_lines  # noqa: E402

# Lanes (README.md, Tests): a test that depends on a trained run or on running servers through these fixtures is marked
# e2e or server here, so no such test can slip into the unit lane (`-m "not e2e and not server"`) unmarked. Tests that
# train or start a server in their own body carry the marker themselves.
E2E_FIXTURES = {"trained_runs"}
SERVER_FIXTURES = {"servers"}


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & E2E_FIXTURES:
            item.add_marker(pytest.mark.e2e)
        if fixtures & SERVER_FIXTURES:
            item.add_marker(pytest.mark.server)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)  # weights the tests placed in the hub caches (~130 MB a session)


@pytest.fixture
def said() -> Iterator[list[str]]:
    """What the pipeline says on the console while the test runs, line by line (tests/said.py)."""
    with said_lines() as lines:
        yield lines


@pytest.fixture(scope="session")
def hub_cache() -> Path:
    return Path(os.environ["HF_HUB_CACHE"])


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow database: creating one takes seconds (schema migrations), copying it does not."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="module")
def module_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A folder for one test module's shared runs, removed when the module is done: trained runs hold checkpoints of
    100-400 MB each, and kept to the end of the session they add up to gigabytes (tmp_path goes per test already, by
    tmp_path_retention_policy in pyproject.toml)."""
    folder = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def uri(tmp_path: Path, empty_store: Path) -> str:
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny shapes ImageFolder (32 px, 10 train / 4 val images per class) shared by the end-to-end tests."""
    from pipeline.data import synth

    return synth.generate(tmp_path_factory.mktemp("shapes"), image_size=32, train_per_class=10, val_per_class=4)


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def task_file(tmp_path: Path, shapes: Path, uri: str):
    """Write a small classification task file into tmp_path (with the repo's configs/ beside it)."""

    def write(name: str = "tiny", **sections) -> Path:
        (tmp_path / "tasks").mkdir(exist_ok=True)
        if not (tmp_path / "configs").exists():
            shutil.copytree(REPO / "configs", tmp_path / "configs")
        cfg = {
            "task": "classification",
            "seed": 0,
            "data": {"root": str(shapes), "image_size": 32, "batch_size": 16, "num_workers": 0,
                     "train_transforms": [{"name": "HorizontalFlip", "p": 0.5}],
                     "val_transforms": [{"name": "Resize", "height": 32, "width": 32}]},
            "model": {"backbone": {"name": "resnet18", "weights": "none"}},
            "train": {"epochs": 2, "lr": 1e-3, "log_every": 2, "output_dir": str(tmp_path / "out")},
            "tracking": {"uri": uri, "log_model": False},
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                cfg.setdefault(section, {}).update(values)
            else:
                cfg[section] = values
        path = tmp_path / "tasks" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return write


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory: pytest.TempPathFactory, empty_store: Path, shapes: Path):
    """task -> its trained run (tests/shared_runs.py), trained on first use and shared by the whole session; the
    store and checkpoints go when the session ends."""
    from shared_runs import TrainedRuns

    folder = tmp_path_factory.mktemp("trained")
    shutil.copy(empty_store, folder / "mlflow.db")
    runs = TrainedRuns(folder, shapes)
    yield runs
    runs.close()
