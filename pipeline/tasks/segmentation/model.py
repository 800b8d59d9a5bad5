"""DeepLabV3 on a dilated backbone: ASPP head on the last stage, optional FCN auxiliary head on the one before.

The backbone keeps its stride until output stride 8 or 16 and dilates the later stages instead, so the last feature
map stays large enough to segment. The heads are torchvision's `DeepLabHead` and `FCNHead`, named `aspp` and `aux`
as the fine-tuning code's head parts. `model.init: coco_voc` starts backbone and heads from torchvision's
COCO-with-VOC-labels DeepLabV3 (ResNet-50/101) and gives the final 1x1 convolutions the dataset's classes.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights, DeepLabV3_ResNet101_Weights
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from pipeline.errors import UserError
from pipeline.models import backbones
from pipeline.models import weights as W

# The DeepLabV3 paper's ASPP rates: (6, 12, 18) at output stride 16, doubled at 8 (what torchvision's weights use).
ATROUS_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
COCO_VOC = {"resnet50": DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
            "resnet101": DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1}


class DeepLabV3(nn.Module):
    """Images -> {"out": logits at the backbone's output stride, "aux": the same from the aux head (training only)}.

    Logits stay at feature resolution here; `upsample` brings them to the label or input size where they are used.
    """

    def __init__(self, backbone: backbones.Backbone, num_classes: int, atrous_rates: tuple[int, ...], aux: bool,
                 aux_weight: float = 0.5, ignore_index: int = 255, class_weights: list[float] | None = None):
        super().__init__()
        self.backbone = backbone
        self.aux_stage, self.out_stage = backbone.out_stages[-2:]
        self.aspp = DeepLabHead(backbone.channels[self.out_stage], num_classes, atrous_rates)
        self.aux = FCNHead(backbone.channels[self.aux_stage], num_classes) if aux else None
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        # Not saved in checkpoints: the config that built the model gives it again.
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weight, persistent=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(images)
        out = {"out": self.aspp(feats[self.out_stage])}
        if self.aux is not None and self.training:
            out["aux"] = self.aux(feats[self.aux_stage])
        return out

    def head_parts(self) -> OrderedDict[str, nn.Module]:
        parts = OrderedDict(aspp=self.aspp)
        if self.aux is not None:
            parts["aux"] = self.aux
        return parts


class Logits(nn.Module):
    """What MLflow logs: images (N, 3, H, W) -> class logits (N, C, H, W) at the input size."""

    def __init__(self, model: DeepLabV3):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return upsample(self.model(images)["out"], images.shape[-2:])


def upsample(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling in float32: scores are compared pixel by pixel, bf16 would blur close calls."""
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


def build(name: str, weights: str, fallback_to_random: bool, *, num_classes: int, output_stride: int,
          atrous_rates: tuple[int, ...] | None, aux: bool, aux_weight: float, ignore_index: int,
          class_weights: list[float] | None, init: str, keep_classifier: bool) -> DeepLabV3:
    """The model with backbone weights (`init: backbone`) or torchvision's COCO-with-VOC DeepLabV3 (`coco_voc`).

    `keep_classifier`: with coco_voc, keep the pretrained final convolutions too (the dataset has the VOC classes).
    """
    if class_weights is not None and len(class_weights) != num_classes:
        raise UserError(f"model.class_weights: {len(class_weights)} weights for {num_classes} classes; give one per "
                        f"class (background first)")
    state_dict = coco_voc_state_dict(name) if init == "coco_voc" else None
    try:
        if state_dict is None:
            backbone = backbones.build_or_random(name, weights, fallback_to_random,
                                                 output_stride=output_stride)
        else:  # the backbone's weights come with the rest of the model
            backbone = backbones.build(name, "none", output_stride=output_stride)
    except TypeError as err:  # timm models without dilation support reject the output_stride argument
        if "output_stride" not in str(err):
            raise
        raise UserError(f"model.output_stride: backbone '{name}' cannot dilate its last stages ({err}); use a "
                        f"ResNet-family backbone") from None
    model = DeepLabV3(backbone, num_classes, atrous_rates or ATROUS_RATES[output_stride], aux, aux_weight,
                      ignore_index, class_weights)
    if state_dict is not None:
        load_coco_voc(model, state_dict, f"deeplabv3_{name} COCO_WITH_VOC_LABELS", keep_classifier)
        backbone.weights = f"deeplabv3_{name}.coco_with_voc_labels"
    return model


def coco_voc_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's COCO-with-VOC-labels DeepLabV3 state_dict, from the torch hub cache or downloaded into it."""
    if name not in COCO_VOC:
        raise UserError(f"model.init: coco_voc weights exist for {' and '.join(COCO_VOC)} (torchvision's "
                        f"deeplabv3_*); model.backbone.name is '{name}', so use model.init: backbone")
    url = COCO_VOC[name].url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    what = f"weights deeplabv3_{name} COCO_WITH_VOC_LABELS"
    if not path.is_file():
        host = urlparse(url).hostname or ""
        remedy = (f"on a connected machine run once, or copy {path.name} from {url} into {path.parent}; or set "
                  f"model.init: backbone")
        if not W._reachable(host):
            raise UserError(f"{what} unavailable (not in {path.parent} and {host} is not reachable); {remedy}")
        try:
            torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, check_hash=True)
        except Exception as err:  # any network or hash failure means the same to the user: no weights here
            raise UserError(f"{what} download failed ({' '.join(str(err).split())[:160]}); {remedy}") from None
    return W.read_state_dict(path, what=what)


def load_coco_voc(model: DeepLabV3, state_dict: dict[str, torch.Tensor], source: str, keep_classifier: bool) -> None:
    """Load torchvision's DeepLabV3 keys into ours: backbone.* -> backbone.body.* (timm's ResNet names match
    torchvision's), classifier.* -> aspp.*, aux_classifier.* -> aux.* (skipped without an aux head). The final 1x1
    convolutions keep their fresh init for the dataset's classes unless `keep_classifier`."""
    prefixes = {"backbone.": "backbone.body.", "classifier.": "aspp.", "aux_classifier.": "aux."}
    mapped = {}
    for key, value in state_dict.items():
        for old, new in prefixes.items():
            if key.startswith(old):
                mapped[new + key[len(old):]] = value
                break
    if model.aux is None:
        mapped = {k: v for k, v in mapped.items() if not k.startswith("aux.")}
    final = tuple(f"{part}.{len(head) - 1}." for part, head in model.head_parts().items())
    if not keep_classifier:
        mapped = {k: v for k, v in mapped.items() if not k.startswith(final)}
    own = model.state_dict()
    # Checkpoints from before PyTorch 0.4.1 lack BatchNorm's num_batches_tracked; it does not affect the outputs.
    missing = sorted(k for k in set(own) - set(mapped)
                     if not k.endswith("num_batches_tracked") and (keep_classifier or not k.startswith(final)))
    unexpected = sorted(set(mapped) - set(own))
    mismatched = sorted(k for k in set(mapped) & set(own) if mapped[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        raise UserError(f"{source} does not fit this DeepLabV3: {len(missing)} missing {_few(missing)}, "
                        f"{len(unexpected)} unexpected {_few(unexpected)}, {len(mismatched)} of another shape "
                        f"{_few(mismatched)}; is the file a torchvision deeplabv3 state_dict?")
    model.load_state_dict(mapped, strict=False)


def _few(keys: list[str]) -> str:
    return "(" + ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "") + ")" if keys else ""
