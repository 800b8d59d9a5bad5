"""Detection model: forward/backward with resnet18 and resnet50 backbones, frozen and unfrozen, fine-tuning parts,
frozen BatchNorm, float32 box outputs under bf16, and torchvision's COCO weights read from the torch hub cache."""
import os
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import faster_rcnn
from torchvision.ops import MultiScaleRoIAlign as torchvision_pooler
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline.config import validate
from pipeline.errors import UserError
from pipeline.models import weights as W
from pipeline.tasks import registry
from pipeline.tasks.base import DataInfo
from pipeline.tasks.detection.model import COCO_WEIGHTS
from pipeline.tasks.detection.roi_align import MultiScaleRoIAlign
from pipeline.tasks.detection.task import DetectionFacts
from pipeline.train import finetune

detection = registry.get("detection")
INFO = DataInfo(classes=["cat", "dog"], train_size=0, val_size=0, mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225), image_size=64, facts=DetectionFacts([3, 17]))
SMALL = {"min_size": 64, "max_size": 64, "anchor_sizes": [8, 16, 32, 64, 128], "fpn_channels": 32,
         "representation_size": 64, "box_batch_size_per_image": 16, "rpn_pre_nms_top_n_train": 100,
         "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50}


def _model(backbone: str = "resnet18", **model):
    cfg = validate({"task": "detection", "model": {"backbone": {"name": backbone, "weights": "none"}, **model}})
    return detection.build_model(cfg.model, INFO)


def _batch():
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [40.0, 10.0, 60.0, 30.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # a negative image
    return images, targets


def _plan(model, freeze):
    return finetune.make_plan(model, freeze=freeze, bn="frozen", lr_mult={"roi_heads": 10.0}, layer_decay=None,
                              unfreeze={}, no_decay_norm_bias=True, epochs=1)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
@pytest.mark.parametrize("freeze", [[], ["stem", "layer1", "layer2", "fpn"]])
def test_forward_backward(backbone, freeze):
    model = _model(backbone, frozen_bn=False, **SMALL)
    plan = _plan(model, freeze)
    finetune.apply(model, plan, epoch=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(finetune.param_groups(model, plan, 0.01, 1e-4), lr=0.01, momentum=0.9)
    model.train()
    losses = detection.loss(model, _batch())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        frozen = any(name.startswith(f"backbone.body.{m}") for m in ("conv1", "bn1", "layer1.", "layer2."))
        frozen |= name.startswith("fpn.") and "fpn" in freeze
        if frozen and freeze:
            assert p.grad is None and torch.equal(p, before[name]), name
    head = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(model.state_dict()[head], before[head])
    model.eval()
    with torch.no_grad():
        detections = detection.predict(model, _batch())
    assert len(detections) == 2 and all(set(d) == {"boxes", "scores", "labels"} for d in detections)


def test_head_parts_serve_finetuning():
    model = _model(**SMALL)
    plan = _plan(model, ["fpn"])
    assert plan.parts == ("stem", "layer1", "layer2", "layer3", "layer4", "fpn", "rpn", "roi_heads")
    groups = finetune.param_groups(model, plan, 0.01, 1e-4)
    lrs = {g["stage"]: g["lr"] for g in groups}
    assert "fpn" not in lrs and lrs["roi_heads"] == pytest.approx(0.1) and lrs["rpn"] == pytest.approx(0.01)


def test_frozen_batchnorm_by_default():
    model = _model(**SMALL)
    norms = [m for m in model.backbone.modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    stats = model.backbone.body.bn1.running_mean.clone()
    model.train()
    sum(detection.loss(model, _batch()).values()).backward()
    assert torch.equal(model.backbone.body.bn1.running_mean, stats)
    assert not any(p.requires_grad for m in norms for p in m.parameters())
    assert all(isinstance(m, torch.nn.BatchNorm2d) for m in _model(frozen_bn=False, **SMALL).backbone.modules()
               if "Norm" in type(m).__name__)


def test_box_outputs_are_float32_under_bf16():
    model = _model(**SMALL).eval()
    features = [torch.randn(1, 32, 8, 8, dtype=torch.bfloat16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, deltas = model.rpn.head(features)
        scores, boxes = model.roi_heads.box_predictor(torch.randn(4, 64))
    assert {t.dtype for t in logits + deltas + [scores, boxes]} == {torch.float32}


def test_knob_mismatches_are_user_errors():
    with pytest.raises(UserError, match=r"model.anchor_sizes: 3 sizes for 5 pyramid levels"):
        _model(anchor_sizes=[8, 16, 32])
    with pytest.raises(UserError, match=r"model.fpn_stages: \['layer9'\] are not feature stages"):
        _model(fpn_stages=["layer2", "layer9"], anchor_sizes=[8, 16, 32])
    with pytest.raises(UserError, match=r"model.init: coco .* needs model.backbone.name=resnet50"):
        _model(init="coco")
    expected = r"strides \[4, 16\]; .* e\.g\. model\.fpn_stages=\[layer1,layer2,layer3,layer4\]"
    with pytest.raises(UserError, match=expected):
        _model(fpn_stages=["layer1", "layer3"], anchor_sizes=[8, 16, 32])


def test_a_cifar_net_gets_a_pyramid_it_can_build():
    """cifar_resnet20's stem and layer1 share stride 1: the default (its last four stages) is refused with the stages
    that do make a pyramid, and those build and run."""
    with pytest.raises(UserError, match=r"for cifar_resnet20 e\.g\. model\.fpn_stages=\[layer1,layer2,layer3\] "
                                        r"with 4 model\.anchor_sizes"):
        _model("cifar_resnet20")
    model = _model("cifar_resnet20", **{**SMALL, "fpn_stages": ["layer1", "layer2", "layer3"],
                                         "anchor_sizes": [8, 16, 32, 64]}).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert out[0]["boxes"].shape[1] == 4


def _hub_file(version: str) -> Path:
    return Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / os.path.basename(COCO_WEIGHTS[version].url)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_coco_init_loads_torchvision_detector(version):
    """torchvision's COCO detector, as its file in the hub cache holds it (frozen BN: no num_batches_tracked)."""
    build = faster_rcnn.fasterrcnn_resnet50_fpn if version == "v1" else faster_rcnn.fasterrcnn_resnet50_fpn_v2
    torch.manual_seed(1)
    reference = build(weights=None, weights_backbone=None, num_classes=91)
    # v1's backbone has FrozenBatchNorm2d in the real file (no num_batches_tracked); v2's has BatchNorm2d
    state = {k: v for k, v in reference.state_dict().items()
             if version == "v2" or not (k.startswith("backbone.body.") and k.endswith("num_batches_tracked"))}
    path = _hub_file(version)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    try:
        model = _model("resnet50", init="coco", version=version)
    finally:
        path.unlink()
    own = model.state_dict()
    for key in ("backbone.body.layer3.2.conv2.weight", "backbone.body.bn1.running_var", "rpn.head.conv.0.0.weight",
                "roi_heads.box_head.fc6.weight" if version == "v1" else "roi_heads.box_head.0.1.weight"):
        assert torch.equal(own[key], state[key]), key
    assert torch.equal(own["fpn.layer_blocks.1.0.weight"], state["backbone.fpn.layer_blocks.1.0.weight"])
    assert model.roi_heads.box_predictor.cls_score.out_features == 3  # the dataset's two classes + background
    assert model.backbone.weights.startswith("coco")


def test_coco_init_offline_fails_fast_with_remedy(monkeypatch):
    monkeypatch.setattr(W, "_reachable", lambda host, timeout=3.0: False)
    with pytest.raises(UserError, match=r"model.init: coco needs torchvision's fasterrcnn_resnet50_fpn_coco-.*\.pth.*"
                                        r"not reachable.*model.init: backbone"):
        _model("resnet50", init="coco")


def test_coco_init_refuses_changed_heads():
    reference = faster_rcnn.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = _hub_file("v1")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), path)
    try:
        with pytest.raises(UserError, match=r"does not fit this detector .*keep torchvision's defaults"):
            _model("resnet50", init="coco", representation_size=512)
    finally:
        path.unlink()


def test_inference_module_returns_one_tensor_with_category_ids():
    torch.manual_seed(0)
    model = _model(box_score_thresh=0.0, box_detections_per_img=20, **SMALL).eval()
    module = detection.inference_module(model)
    assert detection.example_input(64).shape == (2, 3, 64, 64)
    with torch.no_grad():
        out = module(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 20, 6)
    used = out[..., 4] > 0
    assert used.any() and set(out[..., 5][used].tolist()) <= {3.0, 17.0} and (out[..., 5][~used] == -1).all()


@pytest.mark.parametrize("fast_path", [True, False], ids=["gather", "torchvision_kernel"])
def test_roi_align_matches_torchvision_forward_and_backward(fast_path):
    """The pooler gives torchvision's MultiScaleRoIAlign numbers, boxes outside the map included: with its gather
    (cpu_kernels' fast path) and with torchvision's kernel (cpu_kernels off, other devices, export)."""
    torch.manual_seed(0)
    names = ["layer1", "layer2", "layer3"]
    features = {n: torch.randn(2, 8, 64 // 2 ** i, 48 // 2 ** i, requires_grad=True) for i, n in enumerate(names)}
    xy = torch.rand(40, 2) * 70 - 10
    boxes = torch.cat([xy, xy + torch.rand(40, 2) * 320 + 0.5], dim=1)
    boxes[0] = torch.tensor([-40.0, -40.0, -20.0, -10.0])  # wholly outside the image
    proposals, shapes = [boxes[:25], boxes[25:]], [(256, 192), (256, 192)]
    pooler = MultiScaleRoIAlign(names, [4, 8, 16], output_size=7)
    pooler.fast_path = fast_path
    ours = pooler(features, proposals, shapes)
    reference = torchvision_pooler(names, output_size=7, sampling_ratio=2)(features, proposals, shapes)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    levels = MultiScaleRoIAlign(names, [4, 8, 16], output_size=7).levels(boxes)
    assert set(levels.tolist()) == {0, 1, 2}  # every level is used
    grad = torch.randn_like(reference)
    for name, ref_grad, our_grad in zip(names, torch.autograd.grad(reference, list(features.values()), grad),
                                        torch.autograd.grad(ours, list(features.values()), grad)):
        torch.testing.assert_close(our_grad, ref_grad, atol=1e-4, rtol=1e-4, msg=name)
