"""Faster R-CNN on a pipeline backbone: torchvision's FPN, RPN and RoI heads on the backbone's named stages.

The detector is assembled here rather than through torchvision's `FasterRCNN` class so that `model.backbone` is the
pipeline's `Backbone` (stage freezing and per-stage lr work unchanged) and the heads are the parts `fpn`, `rpn` and
`roi_heads`. Parameter names follow torchvision's (`backbone.body.layer1...`, `rpn.head...`, `roi_heads.box_head...`)
except the FPN (`fpn.` instead of `backbone.fpn.`), so torchvision's COCO-trained detector loads with one renaming.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn
from torchvision.models.detection import faster_rcnn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from pipeline.errors import UserError
from pipeline.models import backbones
from pipeline.models import weights as W
from pipeline.tasks.detection.roi_align import MultiScaleRoIAlign

# torchvision's COCO-trained detectors by head version: v1 (the original), v2 (BN in FPN and heads, 4-conv box head).
COCO_WEIGHTS = {
    "v1": faster_rcnn.FasterRCNN_ResNet50_FPN_Weights.COCO_V1,
    "v2": faster_rcnn.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
}


class Float32RPNHead(RPNHead):
    """RPN head whose outputs leave in float32: anchors decoded in bf16 would snap a 100 px coordinate to 0.5 px."""

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class Float32Predictor(faster_rcnn.FastRCNNPredictor):
    """Box classifier and regressor with float32 outputs, for the same reason as `Float32RPNHead`."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


class Detector(nn.Module):
    """images (list of CHW tensors, or one NCHW batch) -> losses (train, with targets) or detections (eval).

    Detections are dicts of `boxes` (xyxy in the input image's pixels), `scores` and `labels` (1..K), as torchvision's;
    label k is the dataset's category `category_ids[k - 1]`.
    """

    def __init__(self, backbone: backbones.Backbone, fpn_stages: list[str], fpn: FeaturePyramidNetwork,
                 rpn: RegionProposalNetwork, roi_heads: RoIHeads, transform: GeneralizedRCNNTransform,
                 category_ids: list[int]) -> None:
        super().__init__()
        self.category_ids = list(category_ids)
        self.backbone = backbone
        self.fpn_stages = list(fpn_stages)
        self.fpn = fpn
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.transform = transform

    def forward(self, images, targets: list[dict] | None = None):
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        image_list, targets = self.transform(list(images), targets)
        stages = self.backbone(image_list.tensors)
        features = self.fpn(OrderedDict((s, stages[s]) for s in self.fpn_stages))
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    def head_parts(self) -> OrderedDict[str, nn.Module]:
        return OrderedDict(fpn=self.fpn, rpn=self.rpn, roi_heads=self.roi_heads)


def build_detector(backbone: backbones.Backbone, category_ids: list[int], *, version: str, fpn_stages: list[str] | None,
                   fpn_channels: int, min_size: int | list[int], max_size: int, anchor_sizes: list[int],
                   aspect_ratios: list[float], rpn_batch_size_per_image: int, rpn_pre_nms_top_n_train: int,
                   rpn_post_nms_top_n_train: int, rpn_pre_nms_top_n_test: int, rpn_post_nms_top_n_test: int,
                   rpn_nms_thresh: float, box_batch_size_per_image: int, box_positive_fraction: float,
                   roi_output_size: int, representation_size: int, box_score_thresh: float, box_nms_thresh: float,
                   box_detections_per_img: int) -> Detector:
    """A Faster R-CNN with FPN for the classes of `category_ids` plus background; the defaults of each knob are
    torchvision's `fasterrcnn_resnet50_fpn(_v2)`."""
    stages = list(fpn_stages or backbone.out_stages[-4:])
    unknown = [s for s in stages if s not in backbone.channels]
    if unknown:
        raise UserError(f"model.fpn_stages: {unknown} are not feature stages of {backbone.name}; "
                        f"valid: {', '.join(backbone.out_stages)}")
    strides = [backbone.strides[s] for s in stages]
    if any(b != 2 * a for a, b in zip(strides, strides[1:])):
        tail = backbone.out_stages[-1:]  # the last stages (up to four, as the default) that do make a pyramid
        for s in reversed(backbone.out_stages[:-1]):
            if len(tail) == 4 or backbone.strides[tail[0]] != 2 * backbone.strides[s]:
                break
            tail = [s, *tail]
        raise UserError(f"model.fpn_stages: {stages} have strides {strides}; the pyramid needs consecutive stages, "
                        f"each twice the stride of the one before: for {backbone.name} e.g. "
                        f"model.fpn_stages=[{','.join(tail)}] with {len(tail) + 1} model.anchor_sizes")
    if len(anchor_sizes) != len(stages) + 1:
        raise UserError(f"model.anchor_sizes: {len(anchor_sizes)} sizes for {len(stages) + 1} pyramid levels "
                        f"({', '.join(stages)} and the extra pooled level); give one size per level")
    norm = nn.BatchNorm2d if version == "v2" else None
    fpn = FeaturePyramidNetwork([backbone.channels[s] for s in stages], fpn_channels, extra_blocks=LastLevelMaxPool(),
                                norm_layer=norm)
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes))
    rpn_head = Float32RPNHead(fpn_channels, anchors.num_anchors_per_location()[0],
                              conv_depth=2 if version == "v2" else 1)
    rpn = RegionProposalNetwork(
        anchors, rpn_head, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=rpn_batch_size_per_image,
        positive_fraction=0.5, pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
        nms_thresh=rpn_nms_thresh)
    # torchvision's RoIAlign kernel until cpu_kernels.apply turns on the CPU gather (tasks/detection/roi_align.py)
    pool = MultiScaleRoIAlign(stages, strides, output_size=roi_output_size, sampling_ratio=2)
    if version == "v2":
        box_head = faster_rcnn.FastRCNNConvFCHead((fpn_channels, roi_output_size, roi_output_size), [256] * 4,
                                                  [representation_size], norm_layer=nn.BatchNorm2d)
    else:
        box_head = faster_rcnn.TwoMLPHead(fpn_channels * roi_output_size ** 2, representation_size)
    roi_heads = RoIHeads(
        pool, box_head, Float32Predictor(representation_size, len(category_ids) + 1), fg_iou_thresh=0.5,
        bg_iou_thresh=0.5, batch_size_per_image=box_batch_size_per_image, positive_fraction=box_positive_fraction,
        bbox_reg_weights=None, score_thresh=box_score_thresh, nms_thresh=box_nms_thresh,
        detections_per_img=box_detections_per_img)
    # The pipeline's transforms normalise already (Normalize in every albumentations spec): identity here.
    transform = GeneralizedRCNNTransform(tuple(min_size) if isinstance(min_size, list) else min_size, max_size,
                                         image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    return Detector(backbone, stages, fpn, rpn, roi_heads, transform, category_ids)


def frozen_bn(backbone: backbones.Backbone) -> backbones.Backbone:
    """The backbone with every BatchNorm replaced by FrozenBatchNorm2d (fixed statistics and affine), as torchvision
    builds detection backbones: detection batches are too small for batch statistics."""
    body = freeze_batch_norm_2d(backbone.body)
    return backbones.Backbone(body, backbone.name, weights=backbone.weights, lineage=backbone.lineage)


# ---------------------------------------------------------------------------------------------------------------------
# torchvision's COCO-trained weights


def load_coco(detector: Detector, version: str) -> None:
    """Load torchvision's COCO-trained `fasterrcnn_resnet50_fpn(_v2)` into `detector`, all but the box predictor
    (its 91 COCO classes are replaced by the dataset's): the standard start for fine-tuning on custom data."""
    weights = COCO_WEIGHTS[version]
    state = _coco_state_dict(weights.url)
    renamed = {("fpn." + k.removeprefix("backbone.fpn.")) if k.startswith("backbone.fpn.") else k: v
               for k, v in state.items() if not k.startswith("roi_heads.box_predictor.")}
    own = detector.state_dict()
    what = f"model.init: coco ({os.path.basename(weights.url)})"
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in renamed.items()
                  if k in own and own[k].shape != v.shape]
    unexpected = [k for k in renamed if k not in own and not k.endswith("num_batches_tracked")]
    if mismatched or unexpected:
        raise UserError(f"{what} does not fit this detector ({'; '.join((mismatched + unexpected)[:3])}); keep "
                        f"torchvision's defaults for fpn_stages, fpn_channels, anchor_sizes, aspect_ratios, "
                        f"roi_output_size and representation_size with init: coco")
    missing = [k for k in own if k not in renamed and not k.startswith("roi_heads.box_predictor.")
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise UserError(f"{what} lacks {len(missing)} weights of this detector ({', '.join(missing[:3])}); "
                        f"is the file damaged? delete it to download it again")
    detector.load_state_dict(renamed, strict=False)


def _coco_state_dict(url: str) -> dict[str, torch.Tensor]:
    name = os.path.basename(url)
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.is_file():
        host = urlparse(url).hostname or ""
        if not W._reachable(host):
            raise UserError(f"model.init: coco needs torchvision's {name}, which is not in {path.parent} and {host} "
                            f"is not reachable; on a connected machine run the task once (or download {url} into "
                            f"that folder), or set model.init: backbone")
        try:
            torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, check_hash=True)
        except Exception as err:  # any network failure means the same: no weights here
            raise UserError(f"model.init: coco: downloading {url} failed ({' '.join(str(err).split())[:160]}); "
                            f"retry, or set model.init: backbone") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign files fail in many ways
        reason = " ".join(str(err).split())[:160]
        raise UserError(f"model.init: coco: '{path}' is not a loadable state_dict ({reason}); delete it to download "
                        f"it again") from None
