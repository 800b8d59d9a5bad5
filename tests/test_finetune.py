"""Fine-tuning control: freezing holds (weights and BN statistics), groups carry the right lr, unfreezing works."""
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from pipeline.models import backbones
from pipeline.tasks.classification.task import Classifier
from pipeline.train import engine, finetune, optim


def make_model(name: str = "resnet18", classes: int = 3) -> Classifier:
    torch.manual_seed(0)
    return Classifier(backbones.build(name, "none"), classes)


def plan_for(model, epochs: int = 10, **kw) -> finetune.Plan:
    args = dict(freeze=[], bn="frozen", lr_mult={}, layer_decay=None, unfreeze={}, no_decay_norm_bias=True)
    return finetune.make_plan(model, epochs=epochs, **{**args, **kw})


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_steps(model, plan, steps: int = 3, lr: float = 0.05, epoch: int = 0):
    finetune.apply(model, plan, epoch)
    opt = torch.optim.AdamW(finetune.param_groups(model, plan, lr, 0.05, epoch=epoch))
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.train()  # the classic trap: a later train() call must not wake frozen BN up again
    return opt


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "densenet121"])
def test_frozen_stages_are_bit_identical_and_the_rest_moves(name: str):
    model = make_model(name)
    plan = plan_for(model, freeze=["stem", "layer1", "layer2"], bn="frozen")
    stages = model.backbone.stage_modules()
    before = {s: snapshot(m) for s, m in stages.items()}
    train_steps(model, plan)
    for s in ["stem", "layer1", "layer2"]:
        after = snapshot(stages[s])
        assert all(torch.equal(before[s][k], after[k]) for k in after), f"{s} changed"
    for s in ["layer3", "layer4"]:
        after = snapshot(stages[s])
        moved = [k for k in after if after[k].is_floating_point() and not torch.equal(before[s][k], after[k])]
        assert any("running_mean" in k for k in moved), f"{s} BN stats did not update"
        assert any(k.endswith("weight") for k in moved), f"{s} weights did not train"


def test_requires_grad_alone_would_not_hold_bn():
    # The control: with bn=train, a frozen stage's BN running stats still move (what users get without a policy).
    model = make_model()
    plan = plan_for(model, freeze=["stem", "layer1"], bn="train")
    stem_before = snapshot(model.backbone.stage_modules()["stem"])
    train_steps(model, plan)
    after = snapshot(model.backbone.stage_modules()["stem"])
    assert not all(torch.equal(stem_before[k], after[k]) for k in after)


def test_bn_eval_keeps_every_running_stat_but_trains_affine():
    model = make_model()
    plan = plan_for(model, freeze=["stem"], bn="eval")
    bns = {n: snapshot(m) for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    train_steps(model, plan)
    for n, m in model.backbone.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.equal(bns[n]["running_mean"], m.running_mean), n
            assert not m.training
    layer4_bn = next(m for m in model.backbone.stage_modules()["layer4"].modules()
                     if isinstance(m, torch.nn.BatchNorm2d))
    assert layer4_bn.weight.requires_grad


def test_frozen_prefix_builds_no_graph():
    model = make_model()
    finetune.apply(model, plan_for(model, freeze=["stem", "layer1"]), 0)
    model.train()
    out = model.backbone(torch.randn(2, 3, 32, 32))
    assert not out["stem"].requires_grad and not out["layer1"].requires_grad
    assert out["layer2"].requires_grad
    assert model.backbone.no_grad_stages == 2


def test_groups_hold_trainable_parts_only_with_their_lr():
    model = make_model()
    plan = plan_for(model, freeze=["stem", "layer1"], lr_mult={"layer2": 0.1, "layer4": 0.5})
    groups = finetune.param_groups(model, plan, base_lr=0.01, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert [g["stage"] for g in groups if not g["name"].endswith("no_decay")] == ["layer2", "layer3", "layer4", "head"]
    assert by_name["layer2"]["lr"] == pytest.approx(0.001)
    assert by_name["layer3"]["lr"] == pytest.approx(0.01)
    assert by_name["layer4"]["lr"] == pytest.approx(0.005)
    assert by_name["layer4.no_decay"]["weight_decay"] == 0.0 and by_name["layer4"]["weight_decay"] == 0.05
    assert all(p.ndim <= 1 for p in by_name["layer3.no_decay"]["params"])
    frozen_ids = {id(p) for s in ("stem", "layer1") for p in model.backbone.stage_modules()[s].parameters()}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert not frozen_ids & set(grouped) and len(grouped) == len(set(grouped))
    trainable = sum(p.numel() for s in ("layer2", "layer3", "layer4") for p in
                    model.backbone.stage_modules()[s].parameters()) + sum(p.numel() for p in model.head.parameters())
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable


def test_layer_decay_ratios_hold_through_the_schedule():
    model = make_model()
    plan = plan_for(model, freeze=["stem", "layer1", "layer2"], layer_decay=0.5)
    opt = torch.optim.AdamW(finetune.param_groups(model, plan, base_lr=0.02, weight_decay=0.05))
    schedule = optim.Schedule(kind="cosine", total_steps=100, warmup_steps=10, min_ratio=0.01)
    for step in (0, 5, 9, 10, 50, 99):
        schedule.apply(opt, step)
        lrs = engine._stage_lrs(opt)
        factor = schedule.factor(step)
        assert lrs["head"] == pytest.approx(0.02 * factor)
        assert lrs["layer4"] == pytest.approx(0.5 * lrs["head"])
        assert lrs["layer3"] == pytest.approx(0.25 * lrs["head"])
        assert set(lrs) == {"layer3", "layer4", "head"}


def test_unfreezing_at_epoch_k_adds_exactly_that_stage():
    model = make_model()
    plan = plan_for(model, epochs=5, freeze=["stem", "layer1", "layer2", "layer3", "layer4"],
                    unfreeze={"layer4": 2, "layer3": 4}, layer_decay=0.5)
    finetune.apply(model, plan, 0)
    groups = finetune.groups_until(model, plan, 0.01, 0.0, epoch=0)
    assert {g["stage"] for g in groups} == {"head"}
    assert plan.unfreezing_at(2) == ["layer4"] and plan.unfreezing_at(3) == []
    added = finetune.param_groups(model, plan, 0.01, 0.0, epoch=2, only=plan.unfreezing_at(2))
    assert {g["stage"] for g in added} == {"layer4"}
    assert added[0]["lr"] == pytest.approx(0.005)
    finetune.apply(model, plan, 2)
    assert all(p.requires_grad for p in model.backbone.stage_modules()["layer4"].parameters())
    assert not any(p.requires_grad for p in model.backbone.stage_modules()["layer3"].parameters())
    assert "layer4" not in model.backbone.bn_eval_stages and "layer3" in model.backbone.bn_eval_stages
    # Resuming after epoch 4 rebuilds the groups in the order training added them.
    order = [g["stage"] for g in finetune.groups_until(model, plan, 0.01, 0.0, epoch=4)]
    assert [s for s in dict.fromkeys(order)] == ["head", "layer4", "layer3"]


@pytest.mark.parametrize("kw, message", [
    ({"freeze": ["layer5"]}, "finetune.freeze: unknown stage 'layer5'; valid: stem, layer1"),
    ({"lr_mult": {"neck": 1.0}}, "finetune.lr_mult: unknown stage 'neck'"),
    ({"freeze": ["stem"], "lr_mult": {"stem": 0.1}}, "finetune.lr_mult.stem: 'stem' is frozen for the whole run"),
    ({"freeze": ["layer4"], "unfreeze": {"layer4": 11}}, r"finetune.unfreeze.layer4=11: must be an epoch in 1..train"),
    ({"unfreeze": {"layer4": 2}}, "finetune.unfreeze.layer4: 'layer4' is not frozen"),
    ({"cache_features": True, "freeze": ["stem"]}, "finetune.cache_features needs the whole backbone frozen"),
])
def test_bad_plans_name_the_field(kw, message):
    model = make_model()
    with pytest.raises(UserError, match=message):
        plan_for(model, **kw)


def test_freeze_all_and_lr_mult_for_a_stage_unfrozen_later():
    model = make_model()
    plan = plan_for(model, freeze="all", lr_mult={"layer4": 0.1}, unfreeze={"layer4": 3})
    assert plan.frozen == frozenset(model.backbone.stages)
    finetune.apply(model, plan, 0)
    assert finetune.trainable_params(model) == sum(p.numel() for p in model.head.parameters())


def test_group_table_lists_every_part():
    model = make_model()
    plan = plan_for(model, freeze=["stem"], unfreeze={"stem": 3})
    table = finetune.group_table(finetune.param_groups(model, plan, 0.01, 0.05), plan, model)
    lines = table.splitlines()
    assert lines[0].split() == ["part", "params", "trainable", "lr", "weight_decay"]
    assert "from epoch 3" in lines[1] and lines[-1].startswith("head")


@pytest.mark.e2e
def test_run_from_a_state_dict_keeps_frozen_tensors_and_lr_ratios(task_file, uri, tmp_path, monkeypatch):
    """The issue's acceptance check, end to end through `pipeline run` and MLflow."""
    import timm
    from mlflow import MlflowClient

    from pipeline.train import checkpoint, runner

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1)
    source = timm.create_model("resnet18", num_classes=1000).state_dict()
    torch.save(source, tmp_path / "resnet18.pth")
    path = task_file(model={"backbone": {"name": "resnet18", "weights": str(tmp_path / "resnet18.pth")}},
                     train={"epochs": 2, "lr": 1e-2, "warmup_epochs": 0.5})
    result = runner.run(path, ("finetune.freeze=[stem,layer1,layer2]", "finetune.bn=frozen",
                               "finetune.layer_decay=0.5"))
    client = MlflowClient(uri)
    local = client.download_artifacts(result.run_id, "checkpoints/best.pt", str(tmp_path / "dl"))
    logged = {k.removeprefix("backbone.body."): v for k, v in checkpoint.load(Path(local))["model"].items()}
    frozen = [k for k in source if k.startswith(("conv1.", "bn1.", "layer1.", "layer2."))]
    assert frozen and all(torch.equal(logged[k], source[k]) for k in frozen)  # weights and BN running stats
    assert not torch.equal(logged["layer4.1.conv2.weight"], source["layer4.1.conv2.weight"])
    assert not torch.equal(logged["layer4.1.bn2.running_var"], source["layer4.1.bn2.running_var"])
    history = {g: {m.step: m.value for m in client.get_metric_history(result.run_id, f"lr/{g}")}
               for g in ("layer4", "layer3", "head")}
    # every logged step has all three groups' lr, at the ratios layer_decay 0.5 gives, through warm-up and decay
    assert len(history["head"]) >= 3 and history["layer4"].keys() == history["layer3"].keys() == history["head"].keys()
    assert len(set(history["head"].values())) >= 3  # the schedule moved the lr; the ratios held at each value
    for step, head in history["head"].items():
        assert head > 0
        assert history["layer4"][step] / head == pytest.approx(0.5) and history["layer3"][step] / head == \
            pytest.approx(0.25)
    assert not client.get_metric_history(result.run_id, "lr/layer2")
    tags = client.get_run(result.run_id).data.tags
    assert tags["frozen_stages"] == "stem,layer1,layer2" and tags["weights"] == str(tmp_path / "resnet18.pth")


@pytest.mark.e2e
def test_gradual_unfreezing_in_a_run(said, task_file, uri, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipeline.train import runner

    monkeypatch.chdir(tmp_path)
    path = task_file(train={"epochs": 2, "log_every": 1})
    result = runner.run(path, ("finetune.freeze=all", "finetune.unfreeze={layer4: 2}"))
    assert any("epoch 2: unfreezing layer4" in line for line in said)
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(result.run_id, "unfreeze/layer4")] == [2]
    steps_per_epoch = 3  # 60 images, batch 16, last batch dropped
    layer4 = client.get_metric_history(result.run_id, "lr/layer4")
    assert layer4 and min(m.step for m in layer4) > steps_per_epoch
    assert min(m.step for m in client.get_metric_history(result.run_id, "lr/head")) == 1
