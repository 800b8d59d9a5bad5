"""Config: fragments merge in order, overrides parse as YAML, and every validation error names its key path."""
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline import config
from pipeline.cli import main
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write(tmp_path / "configs/backbone/resnet50.yaml", {"model": {"backbone": {"name": "resnet50"}}})
    write(tmp_path / "configs/optim/sgd.yaml", {"train": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 1e-4}})
    write(tmp_path / "configs/optim/slow.yaml", {"train": {"lr": 0.001}})
    return tmp_path


def test_fragments_merge_in_order_task_file_last(project: Path):
    task = write(project / "tasks/t.yaml", {"task": "classification", "defaults": ["backbone/resnet50", "optim/sgd",
                                            "optim/slow"], "train": {"epochs": 3}})
    cfg = config.load(task)
    assert cfg.model.backbone.name == "resnet50"
    assert cfg.train.optimizer == "sgd" and cfg.train.weight_decay == 1e-4
    assert cfg.train.lr == 0.001  # the later fragment wins over the earlier one
    assert cfg.train.epochs == 3
    task2 = write(project / "tasks/t2.yaml", {"task": "classification", "defaults": ["optim/sgd"],
                                              "train": {"lr": 0.5}})
    assert config.load(task2).train.lr == 0.5  # the task file wins over its fragments


def test_overrides_parse_values_as_yaml(project: Path):
    task = write(project / "tasks/t.yaml", {"task": "classification"})
    cfg = config.load(task, ["train.lr=1e-2", "finetune.freeze=[stem,layer1]", "model.backbone.name=resnet34",
                             "finetune.lr_mult.layer4=0.5", "data.num_workers=2"])
    assert cfg.train.lr == 0.01
    assert cfg.finetune.freeze == ["stem", "layer1"]
    assert cfg.model.backbone.name == "resnet34"
    assert cfg.finetune.lr_mult == {"layer4": 0.5}
    assert cfg.data.num_workers == 2


def test_config_is_frozen(project: Path):
    cfg = config.load(write(project / "tasks/t.yaml", {"task": "classification"}))
    with pytest.raises(Exception):
        cfg.train.lr = 5.0


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=0.1", "unknown key 'train.lrr'; did you mean train.lr"),
    ("model.backbone.nmae=resnet50", "unknown key 'model.backbone.nmae'; did you mean model.backbone.name"),
    ("trian.lr=0.1", "unknown key 'trian'; did you mean train"),
    ("train.lr=fast", "train.lr: 'fast' is not allowed"),
    ("train.lr=-1", "train.lr: -1 is not allowed: Value error, must be a learning rate > 0 (e.g. 0.001) or auto"),
    ("train.epochs=0", "train.epochs: 0 is not allowed"),
    ("train.precision=fp8", "train.precision: 'fp8' is not allowed"),
    ("finetune.bn=sometimes", "finetune.bn: 'sometimes' is not allowed"),
    ("finetune.layer_decay=1.5", "finetune.layer_decay: 1.5 is not allowed"),
    ("finetune.layer_decay=-0.2", "finetune.layer_decay: -0.2 is not allowed"),
    ("data.batch_size=[1,2]", "data.batch_size: [1, 2] is not allowed"),
])
def test_validation_errors_name_the_key_path(project: Path, override: str, expected: str):
    task = write(project / "tasks/t.yaml", {"task": "classification"})
    with pytest.raises(UserError) as err:
        config.load(task, [override])
    message = str(err.value)
    assert expected in message
    assert message.startswith(str(task))
    assert "\n" not in message


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=1", "train.lr=[unclosed"])
def test_malformed_overrides(project: Path, override: str):
    task = write(project / "tasks/t.yaml", {"task": "classification"})
    with pytest.raises(UserError, match="override"):
        config.load(task, [override])


def test_override_into_a_value_is_refused(project: Path):
    task = write(project / "tasks/t.yaml", {"task": "classification", "train": {"lr": 0.1}})
    with pytest.raises(UserError, match="'train.lr' is a value, not a section"):
        config.load(task, ["train.lr.x=1"])
    bare = write(project / "tasks/bare.yaml", {"task": "classification"})
    with pytest.raises(UserError, match="train.lr: a section is not allowed: Value error, must be a learning rate > 0"):
        config.load(bare, ["train.lr.x=1"])


def test_file_errors(project: Path):
    with pytest.raises(UserError, match="task file 'nope.yaml' not found"):
        config.load("nope.yaml")
    broken = write(project / "tasks/broken.yaml", "task: classification\ntrain: {lr: 0.1\n")
    with pytest.raises(UserError, match="broken.yaml: broken YAML"):
        config.load(broken)
    listy = write(project / "tasks/list.yaml", "- a\n- b\n")
    with pytest.raises(UserError, match="expected a mapping"):
        config.load(listy)
    missing = write(project / "tasks/m.yaml", {"task": "classification", "defaults": ["optim/sgdd"]})
    with pytest.raises(UserError, match="fragment 'optim/sgdd' not found in configs/; did you mean optim/sgd"):
        config.load(missing)
    unknown_task = write(project / "tasks/u.yaml", {"task": "clasification"})
    with pytest.raises(UserError, match="did you mean classification"):
        config.load(unknown_task)


def test_every_shipped_task_file_and_fragment_validates():
    for task in sorted((REPO / "tasks").glob("*.yaml")):
        config.load(task)
    for fragment in sorted((REPO / "configs").rglob("*.yaml")):
        raw = config.deep_merge({"task": "classification", "train": {"epochs": 10}}, config.read_yaml(fragment))
        config.validate(raw, source=str(fragment))


def test_cli_config_prints_resolved_config():
    result = CliRunner().invoke(main, ["config", str(REPO / "tasks/quickstart.yaml"), "train.lr=0.01"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["train"]["lr"] == 0.01
    assert printed["model"]["backbone"]["name"] == "resnet18"


def test_cli_config_error_is_one_line_without_traceback():
    result = CliRunner().invoke(main, ["config", str(REPO / "tasks/quickstart.yaml"), "train.lrr=0.01"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "did you mean train.lr" in lines[0]
    assert "Traceback" not in result.output


# -- ${key.path} references ------------------------------------------------------------------------------------------

def test_references_take_the_value_with_its_type_or_as_text(project: Path):
    task = write(project / "tasks/t.yaml", "\n".join([
        "task: classification",
        "data:",
        "  image_size: 96",
        "  root: data/at_${data.image_size}px",
        '  val_transforms: [{name: Resize, height: "${data.image_size}", width: "${data.image_size}"}]',
        "  train_transforms:",
        "    - {name: RandomResizedCrop, size: ['${train.epochs}', '${data.image_size}']}",
        "train: {epochs: '${data.batch_size}'}",  # a reference to a value that is itself a reference
        "finetune: {lr_mult: {layer4: '${train.lr}'}}",
    ]) + "\n")
    cfg = config.load(task, ["data.batch_size=12"])
    assert cfg.data.root == "data/at_96px"
    assert cfg.data.val_transforms == [{"name": "Resize", "height": 96, "width": 96}]
    assert cfg.data.train_transforms[0]["size"] == [12, 96]  # ints, through train.epochs -> data.batch_size
    assert cfg.train.epochs == 12
    assert cfg.finetune.lr_mult == {"layer4": cfg.train.lr}  # unset: the schema's default


def test_an_override_reaches_every_reference(project: Path):
    task = write(project / "tasks/t.yaml", "\n".join([
        "task: classification",
        "data:",
        "  image_size: 64",
        '  train_transforms: [{name: RandomCrop, height: "${data.image_size}", width: "${data.image_size}"}]',
        '  val_transforms: [{name: Resize, height: "${data.image_size}", width: "${data.image_size}"}]',
    ]) + "\n")
    cfg = config.load(task, ["data.image_size=128"])
    assert cfg.data.train_transforms[0]["height"] == cfg.data.val_transforms[0]["width"] == 128
    assert config.load(task).data.val_transforms[0]["height"] == 64


def test_unset_keys_resolve_to_the_task_schemas_defaults(project: Path):
    for task_name, size in (("classification", 224), ("face", 112)):
        task = write(project / f"tasks/{task_name}.yaml",
                     {"task": task_name, "data": {"val_transforms": [{"name": "Resize", "height": "${data.image_size}",
                                                                      "width": "${data.image_size}"}]}})
        assert config.load(task).data.val_transforms[0]["height"] == size


@pytest.mark.parametrize("content, expected", [
    ({"data": {"val_transforms": [{"name": "Resize", "height": "${data.imag_size}"}]}},
     "${data.imag_size} in data.val_transforms[0].height names no config key; did you mean data.image_size"),
    ({"data": {"root": "${data.root}"}}, "${data.root} in data.root refers back to itself (data.root -> data.root)"),
    ({"train": {"lr": "${train.weight_decay}", "weight_decay": "${train.lr}"}}, "refers back to itself"),
    ({"data": {"root": "images/${train}"}}, "${train} in data.root is a section or list"),
])
def test_bad_references_name_the_key_and_where_it_is_used(project: Path, content: dict, expected: str):
    task = write(project / "tasks/t.yaml", {"task": "classification", **content})
    with pytest.raises(UserError) as err:
        config.load(task)
    assert expected in str(err.value) and str(err.value).startswith(str(task)) and "\n" not in str(err.value)


def test_cli_config_prints_references_resolved():
    result = CliRunner().invoke(main, ["config", str(REPO / "tasks/quickstart.yaml"), "data.image_size=40"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)["data"]
    assert printed["val_transforms"] == [{"name": "Resize", "height": 40, "width": 40}]
    assert "${" not in result.output


def test_a_check_across_sections_says_its_message_alone():
    # a task schema's own check (not one key's) names its keys itself: no "config: a section is not allowed" before it
    with pytest.raises(UserError) as err:
        config.validate({"task": "segmentation", "data": {"batch_size": 1}}, source="t.yaml")
    assert str(err.value) == "t.yaml: data.batch_size must be at least 2 for DeepLabV3 (its ASPP pooling BatchNorm)"
    with pytest.raises(UserError, match=r"^t.yaml: train.cutmix=1: mixup and cutmix blend whole images"):
        config.validate({"task": "face", "train": {"cutmix": 1.0}}, source="t.yaml")
    assert config.validate({"task": "classification", "train": {"lr": "auto", "mixup": 0.2}}).train.lr == "auto"
