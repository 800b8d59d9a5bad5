"""cpu_kernels: one switch turns the CPU fast paths on (auto, CPU) or leaves every stock operation in place (off, or
any other device). Each path is checked against its stock operation where it lives: tests/test_small_conv.py
(nn.Conv2d), tests/test_dense_adamw.py (torch's AdamW), tests/tasks/test_detection_model.py (torchvision's RoIAlign).
"""
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from torchvision.ops import MultiScaleRoIAlign as torchvision_pooler

from pipeline import config
from pipeline.errors import UserError
from pipeline.models import backbones
from pipeline.platform import allocator, cpu_kernels, small_conv
from pipeline.platform.dense_adamw import DenseAdamW
from pipeline.tasks.detection import roi_align
from pipeline.train import optim

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # CUDA only for the decision: no CUDA tensor is made
NAMES = ["p2", "p3"]


def _model() -> nn.Module:
    """A conv and the detector's box pooler: one module of each kind the switch changes."""
    torch.manual_seed(0)
    return nn.ModuleDict({"conv": nn.Conv2d(3, 8, 3), "pool": roi_align.MultiScaleRoIAlign(NAMES, [4, 8], 7)})


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode, device, expected", [
    ("auto", CPU, True), ("off", CPU, False), ("auto", CUDA, False), ("off", CUDA, False),
    ("auto", torch.device("cuda", 1), False), ("auto", torch.device("mps"), False)])
def test_enabled_on_cpu_with_auto_only(mode, device, expected):
    assert cpu_kernels.enabled(mode, device) is expected


def test_an_unknown_mode_is_a_programming_error():
    with pytest.raises(ValueError, match="valid: auto, off"):
        cpu_kernels.enabled("fast", CPU)


@pytest.mark.parametrize("compile_", [False, True])
def test_auto_on_cpu_turns_the_paths_on_and_restore_turns_them_off(compile_):
    model = _model()
    before = _state(model)
    applied = cpu_kernels.apply(model, CPU, "auto", compile=compile_)
    # a compiled model keeps plain convolutions (torch.compile through small_conv's autograd functions takes minutes)
    assert applied == (["roi_align"] if compile_ else ["small_conv", "roi_align"])
    assert (type(model["conv"]) is small_conv.SmallMapConv2d) is not compile_
    assert model["pool"].fast_path
    cpu_kernels.restore(model)
    assert type(model["conv"]) is nn.Conv2d and not model["pool"].fast_path
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("mode, device", [("off", CPU), ("auto", CUDA), ("off", CUDA)])
def test_off_or_another_device_leaves_every_stock_operation(mode, device):
    model = _model()
    assert cpu_kernels.apply(model, device, mode, compile=False) == []
    assert type(model["conv"]) is nn.Conv2d and not model["pool"].fast_path


@pytest.mark.parametrize("mode, device, expected", [
    ("auto", CPU, DenseAdamW), ("off", CPU, torch.optim.AdamW), ("auto", CUDA, torch.optim.AdamW)])
def test_the_switch_picks_the_adamw(mode, device, expected):
    params = [nn.Parameter(torch.randn(4, 3, 3, 3))]
    opt = optim.build_optimizer([{"params": params}], "adamw", 1e-3, 0.9, False, (0.9, 0.999),
                                 dense_adamw=cpu_kernels.enabled(mode, device))
    assert type(opt) is expected and opt.param_groups[0]["fused"]


def test_the_engine_default_is_the_stock_optimizer():
    """DenseAdamW overrides a private torch interface: only the switch (on a CPU device) turns it on."""
    params = [nn.Parameter(torch.randn(4, 3, 3, 3))]
    assert type(optim.build_optimizer([{"params": params}], "adamw", 1e-3, 0.9, False, (0.9, 0.999))) \
        is torch.optim.AdamW


def test_the_thread_governor_runs_on_cpu_devices_only(tmp_path: Path, monkeypatch):
    from pipeline.platform import devices
    from pipeline.train import runner

    task = tmp_path / "tasks" / "t.yaml"
    task.parent.mkdir()
    task.write_text(yaml.safe_dump({"task": "classification", "train": {"output_dir": str(tmp_path / "out")}}))
    assert runner.prepare(task).threads is not None
    monkeypatch.setattr(devices, "resolve_device", lambda name: CUDA)  # as on a GPU machine
    assert runner.prepare(task).threads is None


@pytest.mark.parametrize("mode, kept", [("auto", True), ("off", False)])
def test_predict_keeps_freed_memory_only_through_the_switch(mode, kept, tmp_path: Path, monkeypatch):
    from pipeline.tasks.classification.task import Classifier
    from pipeline.train import checkpoint
    from pipeline.use import predict

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = config.validate({"task": "classification", "data": {"image_size": 32},
                           "model": {"backbone": {"name": "resnet18", "weights": "none"}},
                           "train": {"cpu_kernels": mode}})
    model = Classifier(backbones.build("resnet18", "none"), 2)
    info = {"classes": ["a", "b"], "train_size": 2, "val_size": 2, "mean": [0.5] * 3, "std": [0.5] * 3,
            "image_size": 32}
    checkpoint.save({"model": model.state_dict(), "config": cfg.model_dump(mode="json"), "info": info},
                    tmp_path / "m.pt")
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (90, 120, 30)).save(image)
    predict.run(str(tmp_path / "m.pt"), [str(image)], tmp_path / "out", device="cpu")
    assert len(calls) == int(kept)


@pytest.mark.parametrize("mode, kept", [("auto", True), ("off", False)])
def test_prepare_process_keeps_freed_memory_unless_off(mode, kept, monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)  # not this test process's
    assert cpu_kernels.prepare_process(mode) is kept
    assert len(calls) == int(kept)


def _pool_inputs():
    torch.manual_seed(1)
    features = {n: torch.randn(2, 4, 32 // 2 ** i, 24 // 2 ** i) for i, n in enumerate(NAMES)}
    xy = torch.rand(12, 2) * 60
    boxes = torch.cat([xy, xy + torch.rand(12, 2) * 60 + 1.0], dim=1)
    return features, [boxes[:7], boxes[7:]], [(128, 96), (128, 96)]


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_the_pooler_gathers_only_when_switched_on(mode, monkeypatch):
    gathered = []
    gather = roi_align.roi_align
    monkeypatch.setattr(roi_align, "roi_align", lambda *a: gathered.append(len(a[1])) or gather(*a))
    model = _model()
    cpu_kernels.apply(model, CPU, mode, compile=False)
    features, boxes, shapes = _pool_inputs()
    got = model["pool"](features, boxes, shapes)
    assert sum(gathered) == (12 if mode == "auto" else 0)
    reference = torchvision_pooler(NAMES, output_size=7, sampling_ratio=2)(features, boxes, shapes)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    cpu_kernels.restore(model)  # before export: torchvision's op again
    gathered.clear()
    torch.testing.assert_close(model["pool"](features, boxes, shapes), reference, atol=0, rtol=0)
    assert not gathered


def test_config_takes_auto_or_off_and_refuses_other_modes(tmp_path: Path):
    task = tmp_path / "tasks" / "t.yaml"
    task.parent.mkdir()
    task.write_text(yaml.safe_dump({"task": "classification"}))
    assert config.load(task).train.cpu_kernels == "auto"
    assert config.load(task, ["train.cpu_kernels=off"]).train.cpu_kernels == "off"  # YAML's false, as a word
    written = tmp_path / "tasks" / "off.yaml"
    written.write_text("task: classification\ntrain:\n  cpu_kernels: off\n")
    assert config.load(written).train.cpu_kernels == "off"
    with pytest.raises(UserError, match=r"train\.cpu_kernels: True is not allowed"):
        config.load(task, ["train.cpu_kernels=on"])
    with pytest.raises(UserError, match=r"train\.cpu_kernels: 'fast' is not allowed"):
        config.load(task, ["train.cpu_kernels=fast"])
