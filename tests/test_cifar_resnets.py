"""The CIFAR ResNets of the ResNet paper and their plain twins (pipeline/models/cifar_resnets.py): sizes as the paper,
named stages for the pipeline, shortcuts that are (or are not) there, and the degradation task files."""
import json
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from mlflow import MlflowClient
from torch import nn

from pipeline import config
from pipeline.errors import UserError
from pipeline.models import backbones
from pipeline.models.cifar_resnets import DEPTHS, NAMES, PadShortcut
from pipeline.study import sweep
from pipeline.tasks.classification.task import Classifier
from pipeline.train import finetune, runner

REPO = Path(__file__).resolve().parent.parent
# Table 6 of the paper, in millions, as printed (two significant figures); the exact counts pin the architecture.
PAPER_PARAMS = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7}
EXACT_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}
# Option B adds a 1x1 conv + BN at each of the two stage changes: 16*32 + 32*64 weights, 2 * (32 + 64) BN.
OPTION_B_EXTRA = 16 * 32 + 32 * 64 + 2 * (32 + 64)
SMALL = ("cifar_resnet20", "cifar_resnet20b", "cifar_plain20")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def residual_bn(block: nn.Module) -> nn.BatchNorm2d:
    return block.bn2  # the last layer of the block's residual branch


@pytest.mark.parametrize("depth", DEPTHS)
def test_parameter_counts_match_the_paper(depth: int):
    resnet, resnet_b, plain = (timm.create_model(f"{kind}{depth}{suffix}")
                               for kind, suffix in (("cifar_resnet", ""), ("cifar_resnet", "b"), ("cifar_plain", "")))
    count = num_params(resnet)
    assert count == EXACT_PARAMS[depth]
    # The paper's figure, to the digits it prints: 1.73M is its 1.7M, 0.464M its 0.46M.
    printed = PAPER_PARAMS[depth]
    digits = 1 if printed >= 1 else 2
    assert round(count / 1e6, digits) == printed
    if depth != 110:  # within 1% of the printed figure; 1.73M is 1.6% above the 1.7M the paper rounds it to
        assert abs(count / (printed * 1e6) - 1) < 0.01
    assert num_params(plain) == count  # option A's shortcuts hold no parameters
    assert num_params(resnet_b) == count + OPTION_B_EXTRA
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", NAMES)
def test_depth_is_read_from_the_name(name: str):
    assert backbones.depth(name) == int(name.removeprefix("cifar_resnet").removeprefix("cifar_plain").rstrip("b"))


@pytest.mark.parametrize("name", SMALL + ("cifar_plain56",))
def test_named_stages_and_their_shapes_on_a_32px_input(name: str):
    backbone = backbones.build(name, "none")
    assert backbone.stages == ["stem", "layer1", "layer2", "layer3"]
    assert backbone.channels == {"stem": 16, "layer1": 16, "layer2": 32, "layer3": 64}
    assert backbone.strides == {"stem": 1, "layer1": 1, "layer2": 2, "layer3": 4}
    feats = backbone(torch.randn(2, 3, 32, 32))
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "stem": (16, 32, 32), "layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8)}


def test_shortcut_options():
    a, b, plain = (timm.create_model(n) for n in SMALL)
    convs = {n: [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
             for n, model in zip(SMALL, (a, b, plain))}
    assert len(convs["cifar_resnet20b"]) == 2 and all(c.stride == (2, 2) for c in convs["cifar_resnet20b"])
    assert not convs["cifar_resnet20"] and not convs["cifar_plain20"]
    assert sum(isinstance(m, PadShortcut) for m in a.modules()) == 2
    assert all(not blk.residual and blk.downsample is None for layer in (plain.layer1, plain.layer2, plain.layer3)
               for blk in layer)
    # the keyword builds the same network as the `b` name
    assert num_params(timm.create_model("cifar_resnet20", shortcut="B")) == num_params(b)
    with pytest.raises(TypeError, match="fixed shortcut"):
        timm.create_model("cifar_plain20", shortcut="B")


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and not y[:, 16:].any()


@pytest.mark.parametrize("name", SMALL + ("cifar_resnet56", "cifar_plain56"))
def test_with_residual_branches_zeroed_only_shortcuts_carry_the_input(name: str):
    """Zero the last BN of every block's residual branch: a residual block becomes relu(shortcut(x)), so the network
    still sees its input (exactly the shortcut path, for option A); a plain block outputs zeros, so the network's
    output no longer depends on its input at all."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    blocks = [blk for layer in (model.layer1, model.layer2, model.layer3) for blk in layer]
    with torch.no_grad():
        for blk in blocks:
            residual_bn(blk).weight.zero_()
            residual_bn(blk).bias.zero_()
        x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
        out1, out2 = model(x1), model(x2)
        assert torch.isfinite(out1).all()
        if name.startswith("cifar_plain"):
            assert torch.equal(out1, out2)  # constant: the bias of fc alone
            assert torch.allclose(out1, model.fc.bias.expand_as(out1))
            return
        assert not torch.allclose(out1, out2)
        # Follow the shortcuts by hand: the stem's output (>= 0, so every relu is the identity) through each
        # block's shortcut.
        feat = model.act1(model.bn1(model.conv1(x1)))
        for blk in blocks:
            feat = torch.relu(feat if blk.downsample is None else blk.downsample(feat))
        assert torch.allclose(model.forward_features(x1), feat)
        if name == "cifar_resnet20":  # option A: subsampling and zero channels only
            stem = model.act1(model.bn1(model.conv1(x1)))
            assert torch.allclose(feat[:, :16], stem[:, :, ::4, ::4]) and not feat[:, 16:].any()


@pytest.mark.parametrize("name", SMALL)
def test_frozen_stem_and_layer1_get_no_gradient(name: str):
    torch.manual_seed(0)
    model = Classifier(backbones.build(name, "none"), 3)
    plan = finetune.make_plan(model, epochs=1, freeze=["stem", "layer1"], bn="frozen", lr_mult={}, layer_decay=None,
                              unfreeze={}, no_decay_norm_bias=True)
    finetune.apply(model, plan, 0)
    groups = finetune.param_groups(model, plan, 0.1, 1e-4)
    assert {g["name"].split(".")[0] for g in groups} == {"layer2", "layer3", "head"}
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    stages_ = model.backbone.stage_modules()
    for stage in ("stem", "layer1"):
        assert all(p.grad is None for p in stages_[stage].parameters()), stage
    for stage in ("layer2", "layer3"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stages_[stage].parameters()), stage


def test_no_pretrained_weights_is_one_clear_error_and_files_load(tmp_path: Path):
    for weights in ("imagenet", "tv_in1k"):
        with pytest.raises(UserError) as err:
            backbones.build("cifar_resnet20", weights)
        assert "\n" not in str(err.value) and "set model.backbone.weights=none" in str(err.value)
    # a full classifier's state_dict (its fc left out) and a backbone's own both load
    torch.manual_seed(0)
    full = timm.create_model("cifar_resnet20")
    torch.save(full.state_dict(), tmp_path / "full.pth")
    backbone = backbones.build("cifar_resnet20", str(tmp_path / "full.pth")).eval()
    assert backbone.lineage.skipped == ["fc.weight", "fc.bias"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(backbone(x)["layer3"], full.eval().forward_features(x))
    torch.save(backbone.body.state_dict(), tmp_path / "own.pth")
    own = backbones.build("cifar_resnet20", str(tmp_path / "own.pth"))
    assert own.lineage.loaded == len(backbone.body.state_dict()) and not own.lineage.skipped
    with pytest.raises(UserError, match="does not match cifar_resnet56"):
        backbones.build("cifar_resnet56", str(tmp_path / "full.pth"))


def test_default_normalisation_is_cifar10s():
    mean, std = backbones.pretrained_mean_std("cifar_plain56")
    assert mean == pytest.approx((0.4914, 0.4822, 0.4465)) and std == pytest.approx((0.2470, 0.2435, 0.2616))


# ------------------------------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_a_classification_run_with_a_cifar_resnet(task_file, uri: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = task_file(model={"backbone": {"name": "cifar_resnet20", "weights": "none"}},
                     train={"epochs": 1, "lr": 0.05, "optimizer": "sgd", "output_dir": str(tmp_path / "out")})
    result = runner.run(path, ("finetune.freeze=[stem]",))
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["backbone"] == "cifar_resnet20" and run.data.tags["depth"] == "20"
    assert run.data.tags["frozen_stages"] == "stem"
    # the run's checkpoint is weights for the next run
    again = runner.run(path, (f"model.backbone.weights=runs:/{result.run_id}", "train.output_dir=out2"))
    assert MlflowClient(uri).get_run(again.run_id).data.tags["weights.source_run_id"] == result.run_id


# ---------------------------------------------------------------------------------------------- the task files

DEGRADATION = ("degradation_cifar10", "degradation_shapes")
SWEPT = ["cifar_plain20", "cifar_plain56", "cifar_resnet20", "cifar_resnet56"]


def documented_sweep(task_file: Path) -> list[str]:
    """The `pipeline sweep ...` command in the task file's header comment, as arguments."""
    lines = [ln.lstrip("# ").strip() for ln in task_file.read_text().splitlines() if ln.startswith("#")]
    command = next(ln for ln in lines if ln.startswith("pipeline sweep "))
    return shlex.split(command)


@pytest.mark.parametrize("name", DEGRADATION)
def test_degradation_task_files_load_and_their_sweep_parses(name: str):
    path = REPO / "tasks" / f"{name}.yaml"
    cfg = config.load(path, [])
    assert cfg.model.backbone.name == "cifar_resnet20" and cfg.model.backbone.weights == "none"
    assert cfg.data.image_size == 32 and cfg.finetune.freeze == [] and cfg.finetune.bn == "train"
    t = cfg.train
    assert (t.optimizer, t.momentum, t.nesterov, t.weight_decay, t.schedule) == ("sgd", 0.9, False, 1e-4, "step")
    assert t.lr == (0.1 if name == "degradation_cifar10" else 0.02)  # the shapes' batch is 32, not 128
    assert t.step_milestones == [t.epochs // 2, t.epochs * 3 // 4] and t.step_gamma == 0.1
    assert cfg.model.label_smoothing == 0.0
    args = documented_sweep(path)
    assert args[:3] == ["pipeline", "sweep", f"tasks/{name}.yaml"]
    fixed, swept = sweep.parse_args(tuple(args[3:]))
    assert fixed == [] and swept == {"model.backbone.name": SWEPT}
    for backbone in SWEPT:  # what `pipeline sweep` checks before it runs anything
        child = config.load(path, [f"model.backbone.name={backbone}"])
        backbones.check_name(child.model.backbone.name)


def write_cifar10(folder: Path, per_batch: int = 4) -> None:
    """The python version's files: pickled dicts of (N, 3072) uint8 rows (R, G, B planes) and labels."""
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    rng = np.random.default_rng(0)
    for i, file in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = {b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 b"labels": [(i + j) % 10 for j in range(per_batch)]}
        (folder / file).write_bytes(pickle.dumps(batch, protocol=2))


@pytest.mark.e2e
def test_degradation_cifar10_runs_on_cifar_format_data(tmp_path: Path, uri: str, monkeypatch):
    """The CIFAR task file itself (transforms, normalisation, step schedule) for one epoch on a few fake CIFAR images;
    without the data it fails naming the folder to create."""
    monkeypatch.chdir(tmp_path)
    path = REPO / "tasks" / "degradation_cifar10.yaml"
    common = (f"tracking.uri={uri}", "tracking.log_model=false", "data.num_workers=0", "data.batch_size=4",
              f"train.output_dir={tmp_path / 'out'}")
    with pytest.raises(UserError, match="cifar10 is not at .*data/cifar-10-batches-py; extract") as err:
        runner.run(path, common)
    assert str((tmp_path / "data" / "cifar-10-batches-py").resolve()) in str(err.value)
    write_cifar10(tmp_path / "data" / "cifar-10-batches-py")
    result = runner.run(path, (*common, "train.epochs=2", "train.step_milestones=[1]"))
    assert MlflowClient(uri).get_run(result.run_id).info.status == "FINISHED"


@pytest.mark.e2e
def test_degradation_shapes_runs(tmp_path: Path, uri: str, shapes: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.run(REPO / "tasks" / "degradation_shapes.yaml",
                        (f"data.root={shapes}", f"tracking.uri={uri}", "tracking.log_model=false",
                         "data.num_workers=0", "train.epochs=1", "train.step_milestones=[]",
                         f"train.output_dir={tmp_path / 'out'}"))
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    # the MLflow UI opens on what the experiment is about: training error and loss by depth, then the rest
    experiment = client.get_experiment(run.info.experiment_id)
    view = json.loads(experiment.tags["mlflow.sharedViewState.pipeline"])
    columns = [c.removeprefix("metrics.`").removesuffix("`") for c in view["selectedColumns"]
               if c.startswith("metrics.")]
    assert columns[:2] == ["train/error", "train/loss_epoch"] and "grad_norm/stem" in columns
    assert experiment.tags["mlflow.experiment.primaryMetric.name"] == "train/error"
    assert view["orderByKey"] == "metrics.`model/depth`"
    assert set(columns) <= set(run.data.metrics)  # every column has a value in the run
    # and its charts open on training error, loss, the best top-1 and the stem's gradient against depth
    assert [(c["xaxis"]["key"], c["yaxis"]["key"]) for c in view["compareRunCharts"]] == [
        ("model/depth", "train/error"), ("model/depth", "train/loss_epoch"), ("model/depth", "best/top1"),
        ("model/depth", "grad_norm/stem")]
