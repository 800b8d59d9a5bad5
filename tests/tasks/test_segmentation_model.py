"""DeepLabV3: dilated backbones, heads and param groups, the loss, torchvision's COCO-with-VOC weights, export."""
import pytest
import torch
from torchvision.models.segmentation import deeplabv3_resnet50

from pipeline.config import validate
from pipeline.errors import UserError
from pipeline.models import weights as W
from pipeline.tasks import registry
from pipeline.tasks.base import DataInfo
from pipeline.tasks.segmentation.data import VOC_CLASSES
from pipeline.tasks.segmentation.model import COCO_VOC, upsample
from pipeline.tasks.segmentation.task import SegmentationFacts
from pipeline.train import finetune

seg = registry.get("segmentation")

SHAPES = ["background", "circle", "square"]


def _model(name="resnet18", output_stride=16, aux=False, classes=SHAPES, **model):
    cfg = validate({"task": "segmentation", "data": {"batch_size": 2},
                    "model": {"backbone": {"name": name, "weights": "none"}, "output_stride": output_stride,
                              "aux_loss": aux, **model}})
    info = DataInfo(classes=list(classes), train_size=0, val_size=0, mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225), image_size=32, facts=SegmentationFacts(255))
    return seg.build_model(cfg.model, info)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("aux", [False, True])
def test_forward_backward(name, output_stride, aux):
    model = _model(name, output_stride, aux).train()
    strides = model.backbone.strides
    assert strides["layer4"] == output_stride and strides["layer3"] == min(16, output_stride)
    images = torch.randn(2, 3, 32, 32)
    masks = torch.randint(0, 3, (2, 32, 32))
    masks[:, :4] = 255
    out = model(images)
    assert out["out"].shape == (2, 3, 32 // output_stride, 32 // output_stride)
    assert ("aux" in out) == aux
    losses = seg.loss(model, (images, masks))
    assert set(losses) == ({"seg", "aux"} if aux else {"seg"})
    sum(losses.values()).backward()
    assert model.aspp[-1].weight.grad is not None and model.backbone.body.conv1.weight.grad is not None
    if aux:
        assert model.aux[-1].weight.grad is not None
    model.eval()
    assert set(model(images)) == {"out"}  # no aux work at evaluation
    assert seg.predict(model, (images, masks)).shape == (2, 3, 32, 32)


def test_stage_names_and_head_parts_drive_finetuning():
    model = _model(aux=True)
    assert model.backbone.stages == ["stem", "layer1", "layer2", "layer3", "layer4"]
    plan = finetune.make_plan(model, freeze=["stem", "layer1"], bn="frozen", lr_mult={"aux": 2.0, "layer4": 0.1},
                              layer_decay=None, unfreeze={}, no_decay_norm_bias=False, epochs=1)
    assert plan.parts == ("stem", "layer1", "layer2", "layer3", "layer4", "aspp", "aux")
    groups = {g["name"]: g["lr"] for g in finetune.param_groups(model, plan, 0.01, 1e-4)}
    assert groups == {"layer2": 0.01, "layer3": 0.01, "layer4": pytest.approx(0.001), "aspp": 0.01, "aux": 0.02}


def test_non_dilatable_backbone_is_a_clear_error():
    with pytest.raises(UserError, match="model.output_stride: backbone 'densenet121' cannot dilate"):
        _model("densenet121")


def test_loss_is_float32_zero_on_all_ignored_crops_and_uses_class_weights():
    model = _model(class_weights=[0.0, 1.0, 1.0]).train()
    images = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ignored = seg.loss(model, (images, torch.full((2, 32, 32), 255)))["seg"]
        background_only = seg.loss(model, (images, torch.zeros(2, 32, 32, dtype=torch.long)))["seg"]
        mixed = seg.loss(model, (images, torch.ones(2, 32, 32, dtype=torch.long)))["seg"]
    assert ignored.dtype == torch.float32 and ignored.item() == 0.0  # not NaN
    assert background_only.item() == 0.0  # weight 0
    assert mixed.item() > 0
    with pytest.raises(UserError, match="model.class_weights: 2 weights for 3 classes"):
        _model(class_weights=[1.0, 1.0])


def test_batch_size_one_is_refused_by_the_schema():
    with pytest.raises(UserError, match="batch_size must be at least 2"):
        validate({"task": "segmentation", "data": {"batch_size": 1}})


def test_inference_module_gives_input_size_logits_and_exports():
    model = _model().eval()
    module = seg.inference_module(model)
    example = seg.example_input(32)
    logits = module(example)
    assert logits.shape == (2, 3, 32, 32)
    exported = torch.export.export(module, (example,))
    assert torch.allclose(exported.module()(example), logits, atol=1e-5)


def test_upsample_is_float32_bilinear():
    small = torch.tensor([[[[0.0, 1.0]]]], dtype=torch.bfloat16)
    big = upsample(small, (1, 4))
    assert big.dtype == torch.float32 and big[0, 0, 0].tolist() == [0.0, 0.25, 0.75, 1.0]


# ------------------------------------------------------------------------------------------ COCO-with-VOC weights


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(W, "_reachable", lambda *a, **k: False)  # never download, even on a connected machine
    return tmp_path / "torch" / "hub" / "checkpoints"


def _fake_torchvision_weights(checkpoints):
    """A torchvision deeplabv3_resnet50 (aux head included, as the published weights) saved under its hub name."""
    torch.manual_seed(0)
    reference = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True).eval()
    for m in reference.modules():  # non-trivial BatchNorm statistics, so a wrong mapping would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    checkpoints.mkdir(parents=True)
    path = checkpoints / COCO_VOC["resnet50"].url.rsplit("/", 1)[1]
    torch.save(reference.state_dict(), path)
    return reference


def test_coco_voc_weights_load_and_match_torchvision_outputs(torch_home):
    reference = _fake_torchvision_weights(torch_home)
    # the VOC classes themselves: every layer loads, and the model computes what torchvision's does
    model = _model("resnet50", output_stride=8, aux=True, classes=VOC_CLASSES, init="coco_voc").eval()
    assert model.backbone.weights == "deeplabv3_resnet50.coco_with_voc_labels"
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(images)["out"]
        got = upsample(model(images)["out"], (64, 64))
    assert torch.allclose(got, expected, atol=1e-4)
    # other classes: everything but the final 1x1 convolutions comes from the file
    model = _model("resnet50", output_stride=16, aux=True, classes=SHAPES, init="coco_voc")
    sd = reference.state_dict()
    assert torch.equal(model.backbone.body.layer4[0].conv2.weight, sd["backbone.layer4.0.conv2.weight"])
    assert torch.equal(model.aspp[0].project[0].weight, sd["classifier.0.project.0.weight"])
    assert torch.equal(model.aux[0].weight, sd["aux_classifier.0.weight"])
    assert model.aspp[-1].weight.shape == (3, 256, 1, 1) and model.aux[-1].weight.shape == (3, 256, 1, 1)
    # without an aux head the file's aux weights are simply not used
    assert _model("resnet50", aux=False, classes=SHAPES, init="coco_voc").aux is None


def test_coco_voc_offline_without_the_file_is_one_line(torch_home):
    with pytest.raises(UserError, match=r"deeplabv3_resnet50 COCO_WITH_VOC_LABELS unavailable .* not reachable.*"
                                        r"deeplabv3_resnet50_coco-cd0a2569.pth") as err:
        _model("resnet50", init="coco_voc")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="coco_voc weights exist for resnet50 and resnet101"):
        _model("resnet18", init="coco_voc")


def test_coco_voc_file_of_another_model_is_refused(torch_home):
    torch_home.mkdir(parents=True)
    torch.save({"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)},
               torch_home / COCO_VOC["resnet50"].url.rsplit("/", 1)[1])
    with pytest.raises(UserError, match="does not fit this DeepLabV3"):
        _model("resnet50", init="coco_voc")
