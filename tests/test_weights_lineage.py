"""Backbone weights from where users keep them, against a real sqlite MLflow store: `runs:/` of a classification run
starts detection, segmentation and face models with every backbone tensor bit-identical; `pipeline register` and
`tracking.register` make registry versions that resolve as `models:/<name>/<version>` and `@alias`; the run records
its lineage; every bad source is one line naming model.backbone.weights."""
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from safetensors.torch import save_file
from said import said_lines

from pipeline import config, tracking
from pipeline.cli import main
from pipeline.data import synth_coco
from pipeline.errors import UserError
from pipeline.models import backbones, tracked
from pipeline.models import weights as W
from pipeline.tasks import registry
from pipeline.tasks.base import DataInfo
from pipeline.tasks.detection.task import DetectionFacts
from pipeline.tasks.face.task import FaceFacts
from pipeline.tasks.segmentation.task import SegmentationFacts
from pipeline.train import runner

pytestmark = pytest.mark.e2e

NAME = "shapes-cls"  # the registered model
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INFOS = {  # what each task's data would say; building a model needs no images
    "detection": DataInfo(classes=["circle", "square"], train_size=4, val_size=2, mean=MEAN, std=STD, image_size=64,
                          facts=DetectionFacts([1, 2])),
    "segmentation": DataInfo(classes=["background", "circle", "square"], train_size=4, val_size=2, mean=MEAN,
                             std=STD, image_size=64, facts=SegmentationFacts(255)),
    "face": DataInfo(classes=[f"id{i}" for i in range(5)], train_size=20, val_size=4, mean=MEAN, std=STD,
                     image_size=32, facts=FaceFacts()),
}
SMALL_DETECTOR = {"min_size": 64, "max_size": 64, "anchor_sizes": [8, 16, 32, 64, 128], "fpn_channels": 32,
                  "representation_size": 128, "box_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 300,
                  "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100}


@pytest.fixture(scope="module")
def store(module_dir: Path, empty_store: Path):
    """A store of one finished classification run (resnet18 from random init, 1 epoch, model logged and registered
    by tracking.register as version 1), in a folder that is also the working directory (MLflow's ./mlruns)."""
    folder = module_dir
    shutil.copy(empty_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield {"uri": uri, "folder": folder}


@pytest.fixture(scope="module")
def cls_run(store: dict, shapes: Path) -> dict:
    task = {"task": "classification", "seed": 0,
            "data": {"root": str(shapes), "image_size": 32, "batch_size": 16, "num_workers": 0,
                     "train_transforms": [], "val_transforms": [{"name": "Resize", "height": 32, "width": 32}]},
            "model": {"backbone": {"name": "resnet18", "weights": "none"}},
            "train": {"epochs": 1, "output_dir": str(store["folder"] / "cls")},
            "tracking": {"uri": store["uri"], "log_model": True, "register": NAME}}
    path = store["folder"] / "cls.yaml"
    path.write_text(yaml.safe_dump(task))
    with said_lines() as lines:
        result = runner.run(path)
    ckpt = torch.load(store["folder"] / "cls" / "best.pt", map_location="cpu", weights_only=True)
    backbone = {k.removeprefix("backbone.body."): v for k, v in ckpt["model"].items() if k.startswith("backbone.body.")}
    return {"id": result.run_id, "backbone": backbone, "lines": lines,
            "head": [k for k in ckpt["model"] if not k.startswith("backbone.body.")]}


def task_config(task: str, weights: str, **model):
    return config.validate({"task": task, "model": {"backbone": {"name": "resnet18", "weights": weights}, **model}})


def build(task: str, weights: str, uri: str, **model):
    """The task's model as the runner builds it from runs:/ or models:/ weights (builders.build_model)."""
    cfg = task_config(task, weights, **model)
    with tracked.fetch(weights, uri, cfg.model.backbone.name) as fetched:
        backbone = cfg.model.backbone.model_copy(update={"weights": str(fetched.path)})
        built = registry.get(task).build_model(cfg.model.model_copy(update={"backbone": backbone}), INFOS[task])
        tracked.relabel(built.backbone, fetched)
    return built


def assert_same_backbone(model, expected: dict[str, torch.Tensor]) -> None:
    """Every tensor of the built backbone is the checkpoint's, bit for bit; only BatchNorm step counters, which
    FrozenBatchNorm2d does not have, may be absent."""
    got = model.backbone.body.state_dict()
    assert set(got) <= set(expected)
    assert all(k.endswith("num_batches_tracked") for k in set(expected) - set(got))
    for key, tensor in got.items():
        assert torch.equal(tensor, expected[key]), key
    assert model.backbone.lineage.loaded == len(expected)


# --- runs:/ into every task ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task, model", [
    ("detection", {"frozen_bn": True, **SMALL_DETECTOR}),  # FrozenBatchNorm2d: same tensors, no step counters
    ("detection", {"frozen_bn": False, **SMALL_DETECTOR}),
    ("segmentation", {"output_stride": 8}),  # dilated: the same weights with other strides
    ("segmentation", {"output_stride": 16}),
    ("face", {}),
])
def test_a_classification_run_starts_every_task(store: dict, cls_run: dict, task: str, model: dict):
    source = f"runs:/{cls_run['id']}"
    built = build(task, source, store["uri"], **model)
    assert_same_backbone(built, cls_run["backbone"])
    lineage = built.backbone.lineage
    assert (built.backbone.weights, lineage.source, lineage.run_id, lineage.task) == \
        (source, source, cls_run["id"], "classification")
    assert lineage.skipped == cls_run["head"] and all(k.startswith("head.") for k in lineage.skipped)
    assert lineage.line().startswith(f"loaded {len(cls_run['backbone'])} backbone tensors from {source} "
                                     f"(run {cls_run['id']}, task classification); skipped {len(cls_run['head'])}: "
                                     "head.")


def test_a_detection_run_from_runs_records_its_lineage(said, store: dict, cls_run: dict, tmp_path_factory):
    scenes = synth_coco.generate(tmp_path_factory.mktemp("scenes"), image_size=64, train_images=4, val_images=2)
    task = {"task": "detection",
            "data": {"root": str(scenes), "image_size": 64, "batch_size": 2, "num_workers": 0},
            "model": {"backbone": {"name": "resnet18", "weights": "none"}, "frozen_bn": True, **SMALL_DETECTOR},
            "train": {"epochs": 1, "optimizer": "sgd", "lr": 0.01, "output_dir": str(store["folder"] / "det")},
            "tracking": {"uri": store["uri"], "log_model": False}}
    path = store["folder"] / "det.yaml"
    path.write_text(yaml.safe_dump(task))
    lines = said
    source = f"runs:/{cls_run['id']}"
    result = runner.run(path, (f"model.backbone.weights={source}",))
    tags = MlflowClient(store["uri"]).get_run(result.run_id).data.tags
    assert tags["weights.source"] == tags["weights"] == source
    assert tags["weights.source_run_id"] == cls_run["id"] and tags["weights.source_task"] == "classification"
    assert tags["weights.loaded_tensors"] == str(len(cls_run["backbone"]))
    assert tags["weights.skipped_tensors"] == str(len(cls_run["head"]))
    assert tags["weights.skipped"] == ", ".join(cls_run["head"])
    assert any(line.startswith(f"loaded {len(cls_run['backbone'])} backbone tensors from {source} (run "
                               f"{cls_run['id']}, task classification); skipped") for line in lines)


def test_hub_and_file_weights_record_their_lineage_too(store: dict, cls_run: dict):
    """Any weights: the checkpoint file a run wrote names that run."""
    built = registry.get("face").build_model(task_config("face", str(store["folder"] / "cls" / "best.pt")).model,
                                      INFOS["face"])
    lineage = built.backbone.lineage
    assert (lineage.run_id, lineage.task, lineage.loaded) == (cls_run["id"], "classification",
                                                              len(cls_run["backbone"]))
    assert lineage.tags()["weights.source_run_id"] == cls_run["id"]


# --- the registry ----------------------------------------------------------------------------------------------------


def test_tracking_register_and_pipeline_register_make_usable_versions(store: dict, cls_run: dict):
    assert f"registered models:/{NAME}/1 (run {cls_run['id']})" in cls_run["lines"]
    result = CliRunner().invoke(main, ["register", cls_run["id"], "--name", NAME, "--alias", "champion",
                                       "--uri", store["uri"]])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (f"registered models:/{NAME}/2 (run {cls_run['id']}); "
                                     f"models:/{NAME}@champion points to it")
    client = MlflowClient(store["uri"])
    version = client.get_model_version(NAME, "2")
    best = client.get_run(cls_run["id"]).data.metrics["best/top1"]
    (logged,) = client.search_logged_models([client.get_run(cls_run["id"]).info.experiment_id])
    assert version.run_id == cls_run["id"] and version.source == f"models:/{logged.model_id}"
    assert version.tags == {"task": "classification", "backbone": "resnet18", "depth": "18",
                            "primary_metric": "val/top1", "val/top1": f"{best:.4f}"}
    for source in (f"models:/{NAME}/1", f"models:/{NAME}@champion", f"models:/{NAME}/latest"):
        built = build("face", source, store["uri"])
        assert_same_backbone(built, cls_run["backbone"])
        assert (built.backbone.weights, built.backbone.lineage.run_id) == (source, cls_run["id"])


def test_a_bad_alias_registers_nothing(store: dict, cls_run: dict):
    client = MlflowClient(store["uri"])
    before = sorted(v.version for v in client.search_model_versions(f"name = '{NAME}'"))
    result = CliRunner().invoke(main, ["register", f"runs:/{cls_run['id']}", "--name", NAME, "--alias", "no way!",
                                       "--uri", store["uri"]])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("error: --alias: 'no way!' cannot name an alias (") and \
        result.output.rstrip().endswith("nothing was registered"), result.output
    assert sorted(v.version for v in client.search_model_versions(f"name = '{NAME}'")) == before


def test_register_refuses_a_run_without_a_logged_model(store: dict):
    run = MlflowClient(store["uri"]).create_run(MlflowClient(store["uri"]).create_experiment("bare"))
    result = CliRunner().invoke(main, ["register", run.info.run_id, "--name", NAME, "--uri", store["uri"]])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and f"run {run.info.run_id} logged no model to register" in result.output


def test_tracking_register_needs_a_logged_model():
    with pytest.raises(UserError, match="tracking.register: 'shapes-cls' is not allowed: .*needs tracking.log_model: "
                                        "true"):
        config.validate({"task": "classification", "tracking": {"register": NAME, "log_model": False}})


# --- bad sources -----------------------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bad_sources(store: dict, cls_run: dict) -> list[tuple[str, str, str, str]]:
    """(weights, backbone, store, the message's expected part) for each bad source."""
    client = MlflowClient(store["uri"])
    experiment_id = client.create_experiment("bad-sources")
    running = client.create_run(experiment_id).info.run_id
    empty = client.create_run(experiment_id).info.run_id
    client.set_terminated(empty)
    uri, port = store["uri"], closed_port()
    return [
        ("runs:/0123456789abcdef0123456789abcdef", "resnet18", uri,
         "run '0123456789abcdef0123456789abcdef' is not in tracking store"),
        (f"runs:/{empty}", "resnet18", uri, f"run {empty} has no artifact 'checkpoints/best.pt'"),
        (f"runs:/{running}", "resnet18", uri, f"run {running} is still RUNNING"),
        ("runs:/", "resnet18", uri, "'runs:/' names no run"),
        ("models:/nosuch/1", "resnet18", uri, f"no registered model 'nosuch' in tracking store {uri} (registered "
                                              f"there: {NAME})"),
        (f"models:/{NAME}/9", "resnet18", uri, f"registered model '{NAME}' has no version '9' (its versions: 1"),
        (f"models:/{NAME}@nope", "resnet18", uri, f"registered model '{NAME}' has no alias 'nope'"),
        (f"runs:/{cls_run['id']}", "resnet18", f"http://127.0.0.1:{port}",
         f"tracking server http://127.0.0.1:{port} is not reachable"),
        (f"runs:/{cls_run['id']}", "resnet50", uri,
         f"runs:/{cls_run['id']} (a resnet18 classification run) does not match resnet50: "),
    ]


def test_bad_sources_are_one_line_naming_the_field(store: dict, cls_run: dict):
    for weights, backbone, uri, expected in bad_sources(store, cls_run):
        with pytest.raises(UserError) as err:
            with tracked.fetch(weights, uri, backbone):
                pass
        message = str(err.value)
        assert message.startswith("model.backbone.weights: ") and "\n" not in message, message
        assert expected in message, message


def test_a_mismatch_names_the_first_keys_and_shapes(store: dict, cls_run: dict):
    source = f"runs:/{cls_run['id']}"
    with pytest.raises(UserError) as err:
        build("face", source, store["uri"], backbone={"name": "resnet50", "weights": source})
    assert str(err.value) == (
        f"model.backbone.weights: {source} (a resnet18 classification run) does not match resnet50: 165 missing keys "
        "(layer1.0.conv3.weight, layer1.0.bn3.weight, layer1.0.bn3.bias, ...), 23 of another shape "
        "(layer1.0.conv1.weight [64, 64, 3, 3] given, [64, 64, 1, 1] in resnet50; layer1.1.conv1.weight [64, 64, 3, "
        "3] given, [64, 256, 1, 1] in resnet50; layer2.0.conv1.weight [128, 64, 3, 3] given, [128, 256, 1, 1] in "
        "resnet50; ...)")


def test_a_bad_source_fails_the_opened_run_with_the_reason(store: dict, shapes: Path):
    path = store["folder"] / "cls_bad.yaml"
    task = yaml.safe_load((store["folder"] / "cls.yaml").read_text())
    task["tracking"] = {"uri": store["uri"], "log_model": False, "experiment": "cls_bad"}
    task["train"]["output_dir"] = str(store["folder"] / "cls_bad")
    path.write_text(yaml.safe_dump(task))
    result = CliRunner().invoke(main, ["run", str(path), "model.backbone.weights=models:/nosuch/1"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: model.backbone.weights: no registered model "
                                                             "'nosuch'"), result.output
    (run,) = tracking.search_runs(store["uri"], "cls_bad")
    assert run.status == "FAILED" and "no registered model 'nosuch'" in run.tags["error"]
    assert run.tags["weights.source"] == "models:/nosuch/1"


# --- hf-hub ----------------------------------------------------------------------------------------------------------


def test_hf_hub_weights_offline(hub_cache: Path):
    with pytest.raises(UserError) as err:
        backbones.build("resnet18", "hf-hub:someorg/nosuch-resnet")
    assert str(err.value).startswith("weights hf-hub:someorg/nosuch-resnet unavailable (not in the local cache and "
                                     "downloads are off); on a connected machine run 'pipeline weights pull "
                                     "hf-hub:someorg/nosuch-resnet'")
    with pytest.raises(UserError, match="weights hf-hub:someorg/nosuch-resnet unavailable"):
        W.pull(["hf-hub:someorg/nosuch-resnet"])
    # a repo already in the hub cache (as `pipeline weights pull` leaves it) loads offline
    import timm

    full = timm.create_model("resnet18", pretrained=False, num_classes=3)
    snapshot = hub_cache / "models--someorg--my-resnet" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (hub_cache / "models--someorg--my-resnet" / "refs").mkdir()
    (hub_cache / "models--someorg--my-resnet" / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(snapshot / "model.safetensors"))
    assert W.pull(["hf-hub:someorg/my-resnet"]) == [snapshot / "model.safetensors"]
    built = backbones.build("resnet18", "hf-hub:someorg/my-resnet")
    assert built.weights == "hf-hub:someorg/my-resnet" and sorted(built.lineage.skipped) == ["fc.bias", "fc.weight"]
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in built.body.state_dict().items())
