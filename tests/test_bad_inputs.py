"""The bad-input matrix: each row fails with exit 1 and one `error:` line naming the culprit, no traceback, and once
the MLflow run is open it is marked FAILED with the reason as its `error` tag. Task-specific rows (annotations, masks,
pairs files) live with each task's tests."""
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.tasks import registry
from pipeline.train import checkpoint

pytestmark = pytest.mark.e2e


def _unknown_key(tmp_path, path):
    return [str(path), "train.lrr=0.1"], "did you mean train.lr", False


def _wrong_type(tmp_path, path):
    return [str(path), "train.epochs=many"], "train.epochs", False


def _broken_yaml(tmp_path, path):
    path.write_text("task: classification\ndata: {root: [unclosed\n")
    return [str(path)], "broken YAML", False


def _missing_task_file(tmp_path, path):
    return [str(tmp_path / "nope.yaml")], "nope.yaml", False


def _missing_data_root(tmp_path, path):
    return [str(path), "data.root=/nonexistent/images"], "data.root: '/nonexistent/images' does not exist", False


def _empty_dataset(tmp_path, path):
    for split in ("train", "val"):
        (tmp_path / "empty" / split / "cat").mkdir(parents=True)
    return [str(path), f"data.root={tmp_path / 'empty'}"], "holds no images", True


def _copy_with(tmp_path, shapes, name: str, content: bytes) -> Path:
    root = tmp_path / "imgs"
    shutil.copytree(shapes, root)
    (root / "val" / "circle" / name).write_bytes(content)  # every val image is read each epoch
    return root


def _corrupt_image(tmp_path, path, shapes):
    root = _copy_with(tmp_path, shapes, "broken.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return [str(path), f"data.root={root}"], "broken.png", True


def _truncated_image(tmp_path, path, shapes):
    good = next((shapes / "val" / "circle").iterdir()).read_bytes()
    root = _copy_with(tmp_path, shapes, "cut.png", good[: len(good) // 2])
    return [str(path), f"data.root={root}"], "cut.png", True


def _unknown_backbone(tmp_path, path):
    return [str(path), "model.backbone.name=resnet1800"], "'resnet1800' is not a timm model", False


def _missing_weights_file(tmp_path, path):
    return [str(path), "model.backbone.weights=/nonexistent/w.pth"], "'/nonexistent/w.pth' not found", False


def _unknown_stage(tmp_path, path):
    return [str(path), "finetune.freeze=[layer9]"], "finetune.freeze: unknown stage 'layer9'", True


def _unreachable_tracking(tmp_path, path):
    return [str(path), "tracking.uri=http://127.0.0.1:9"], "tracking server http://127.0.0.1:9 is not reachable", False


def _ema_out_of_range(tmp_path, path):
    return [str(path), "train.ema=1.5"], "train.ema: 1.5 is not allowed", False


ALL_PARTS = "finetune.freeze=[stem,layer1,layer2,layer3,layer4,head]"


def _nothing_trains(tmp_path, path):
    return [str(path), ALL_PARTS], "finetune: nothing trains at the start of this run", True


ROWS = [_unknown_key, _wrong_type, _broken_yaml, _missing_task_file, _missing_data_root, _empty_dataset, _corrupt_image,
        _truncated_image, _unknown_backbone, _missing_weights_file, _unknown_stage,
        _unreachable_tracking, _ema_out_of_range, _nothing_trains]


def _expect_clean_failure(result, culprit: str, uri: str, run_opened: bool) -> None:
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and culprit in errors[0], result.output
    assert "Traceback" not in result.output
    client = MlflowClient(uri)
    # any experiment: a run on another data.root than the task file's has one of its own (pipeline/config/placement.py)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    if run_opened:
        assert len(runs) == 1 and runs[0].info.status == "FAILED" and culprit in runs[0].data.tags["error"]
    else:  # checked before a run exists: no run, no experiment of its own, no folder
        assert runs == [] and [e.name for e in client.search_experiments()] == ["Default"]
        assert not (Path.cwd() / "out").exists() and not (Path.cwd() / "outputs").exists()


@pytest.mark.parametrize("row", ROWS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_fails_cleanly(row, task_file, shapes, uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = task_file()
    kwargs = {"shapes": shapes} if "shapes" in row.__code__.co_varnames else {}
    args, culprit, run_opened = row(tmp_path, path, **kwargs)
    _expect_clean_failure(CliRunner().invoke(main, ["run", *args]), culprit, uri, run_opened)


REPO = Path(__file__).resolve().parent.parent
OTHERS = {  # id: (command line, culprit, whether a run was opened): other commands and the built-in tasks' schemas
    "lr_find_nothing_trains": (["lr-find", "{path}", ALL_PARTS], "lr-find: nothing trains at the start", True),
    "mixup_on_segmentation": (["run", str(REPO / "tasks/segmentation_shapes.yaml"), "train.mixup=0.2"],
                              "train.mixup=0.2: mixup and cutmix blend whole images", False),
    "sampler_on_detection": (["run", str(REPO / "tasks/detection_shapes.yaml"), "data.balance=sampler"],
                             "data.balance: 'sampler' is not allowed: Value error, sampler balances classification",
                             False),
    "tta_on_detection": (["run", str(REPO / "tasks/detection_shapes.yaml"), "eval.tta=true"],
                         "eval.tta: flip averaging is for classification and segmentation, not detection", False),
    "mixup_with_cached_features": (["run", "{path}", "finetune.freeze=all", "finetune.cache_features=true",
                                    "train.mixup=0.2"], "finetune.cache_features trains on features computed once",
                                   False),
}


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_bad_input_of_other_commands_fails_cleanly(name, task_file, uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, culprit, run_opened = OTHERS[name]
    path = task_file()
    result = CliRunner().invoke(main, [a.format(path=path) for a in args])
    _expect_clean_failure(result, culprit, uri, run_opened)


def test_skip_bad_images_counts_and_names_them(task_file, shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _copy_with(tmp_path, shapes, "broken.png", b"not an image")
    result = CliRunner().invoke(main, ["run", str(task_file(train={"epochs": 1})), f"data.root={root}",
                                       "data.skip_bad_images=true"])
    assert result.exit_code == 0, result.output
    assert "broken.png" in result.output and "skipped 1" in result.output


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(task_file, uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = registry.get("classification")
    loss, calls = task.loss, []

    def diverging(model, batch):  # 3 good steps (epoch 1), then NaN
        calls.append(1)
        out = loss(model, batch)
        return out if len(calls) <= 3 else {k: v * float("nan") for k, v in out.items()}

    monkeypatch.setattr(task, "loss", diverging)
    path = task_file(train={"epochs": 3, "max_nonfinite": 2})
    result = CliRunner().invoke(main, ["run", str(path)])
    _expect_clean_failure(result, "loss was not finite for 2 consecutive steps (last at step 3)", uri, True)
    assert checkpoint.load(tmp_path / "out" / checkpoint.LAST)["fit"]["epoch"] == 1  # the last good one stays


def test_config_of_a_failed_run_is_still_saved(task_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)  # there, but nothing to read: fails after the start
    result = CliRunner().invoke(main, ["run", str(task_file()), f"data.root={tmp_path / 'empty'}"])
    assert result.exit_code == 1
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["data"]["root"] == str(tmp_path / "empty")
