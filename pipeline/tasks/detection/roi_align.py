"""RoIAlign as one weighted gather (`embedding_bag`), and the multi-scale pooler of Faster R-CNN built on it.

torchvision's CPU RoIAlign runs on one core and recomputes every sample's bilinear weights for every channel; its
backward scatters one value at a time. Here each output bin is a "bag" of its sampling points' four neighbours with
their bilinear weights, so the forward pass is one `embedding_bag` over channel-contiguous rows (parallel, vectorised
over channels) and the backward pass is PyTorch's sorted, parallel bag backward: about 4x less CPU time on one core
for the shapes task's RoI batch, with the same numbers as `torchvision.ops.roi_align(..., aligned=False)` up to
float rounding (tests/tasks/test_detection_model.py checks both directions). It is one of the fast paths of
pipeline/platform/cpu_kernels.py: the pooler runs it only on CPU features once `cpu_kernels.apply` turned it on, and
torchvision's kernel otherwise (CUDA has a fast one; export wants torchvision's op).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import box_area

from pipeline.platform.cpu_kernels import FastPath


def roi_align(feature: torch.Tensor, rois: torch.Tensor, output_size: int, scale: float,
              sampling_ratio: int) -> torch.Tensor:
    """(R, C, output_size, output_size) float32 features of `rois` (R, 5: batch index, x1, y1, x2, y2 in image pixels)
    from `feature` (B, C, H, W), sampling `sampling_ratio` x `sampling_ratio` points per bin, as torchvision's
    roi_align with aligned=False."""
    batch, channels, height, width = feature.shape
    n, out, sr = rois.shape[0], output_size, sampling_ratio
    steps = (torch.arange(out * sr, dtype=torch.float32, device=rois.device) + 0.5) / sr  # sample positions, in bins
    x1, y1 = rois[:, 1] * scale, rois[:, 2] * scale
    bin_w = (rois[:, 3] * scale - x1).clamp(min=1.0) / out  # a RoI is at least one feature pixel wide
    bin_h = (rois[:, 4] * scale - y1).clamp(min=1.0) / out
    x_low, x_high, wx_low, wx_high = _bilinear(x1[:, None] + steps * bin_w[:, None], width)
    y_low, y_high, wy_low, wy_high = _bilinear(y1[:, None] + steps * bin_h[:, None], height)
    base = rois[:, 0].long()[:, None, None, None] * (height * width)
    # (R, y sample, x sample, corner): the four neighbours of every sampling point and their weights
    index = torch.stack([y_low[:, :, None] * width + x_low[:, None, :], y_low[:, :, None] * width + x_high[:, None, :],
                         y_high[:, :, None] * width + x_low[:, None, :],
                         y_high[:, :, None] * width + x_high[:, None, :]], dim=-1) + base
    weight = torch.stack([wy_low[:, :, None] * wx_low[:, None, :], wy_low[:, :, None] * wx_high[:, None, :],
                          wy_high[:, :, None] * wx_low[:, None, :], wy_high[:, :, None] * wx_high[:, None, :]],
                         dim=-1) / (sr * sr)  # the mean over a bin's samples
    # one bag per output bin: its sr x sr samples times four corners
    index = index.view(n, out, sr, out, sr, 4).permute(0, 1, 3, 2, 4, 5).reshape(n * out * out, sr * sr * 4)
    weight = weight.view(n, out, sr, out, sr, 4).permute(0, 1, 3, 2, 4, 5).reshape(n * out * out, sr * sr * 4)
    rows = feature.float().permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # a view if channels_last
    pooled = F.embedding_bag(index, rows, per_sample_weights=weight, mode="sum")
    return pooled.view(n, out, out, channels).permute(0, 3, 1, 2)


def _bilinear(coord: torch.Tensor, size: int):
    """Neighbour indices and weights along one axis, with RoIAlign's border rules: samples more than one pixel
    outside the map contribute nothing, samples in the last pixel row or column use that row or column alone."""
    inside = ((coord >= -1.0) & (coord <= size)).to(coord.dtype)
    coord = coord.clamp(min=0.0)
    low = coord.floor().long()
    at_edge = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coord), coord - low)
    return low, high, (1.0 - frac) * inside, frac * inside


class MultiScaleRoIAlign(FastPath, nn.Module):
    """Faster R-CNN's FPN pooler: each box is pooled from the level that suits its size (FPN paper, eq. 1: a 224 px
    box from level 4, i.e. stride 16; twice the size one level up), as torchvision's MultiScaleRoIAlign. With
    `fast_path` on (`cpu_kernels.apply`), CPU features are pooled by `roi_align` above, else by torchvision's kernel."""

    fast_path_name = "roi_align"

    def __init__(self, featmap_names: list[str], strides: list[int], output_size: int, sampling_ratio: int = 2,
                 canonical_size: int = 224, canonical_level: int = 4) -> None:
        super().__init__()
        self.featmap_names, self.strides = list(featmap_names), list(strides)
        self.output_size, self.sampling_ratio = output_size, sampling_ratio
        self.canonical_size, self.canonical_level = canonical_size, canonical_level

    def levels(self, boxes: torch.Tensor) -> torch.Tensor:
        first, last = math.log2(self.strides[0]), math.log2(self.strides[-1])
        size = box_area(boxes).clamp(min=0).sqrt()
        level = torch.floor(self.canonical_level + torch.log2(size / self.canonical_size) + 1e-6)
        return (level.clamp(min=first, max=last) - first).long()

    def forward(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.levels(rois[:, 1:])
        first = features[self.featmap_names[0]]
        gather = self.fast_path and first.device.type == "cpu"
        pool = roi_align if gather else _torchvision_roi_align
        # The gather computes in float32; torchvision's pooler gives its result the features' dtype. rois.shape[0], not
        # len(rois): a trace (detection export) records the first and would fix the second, the number of proposals.
        out = first.new_zeros((rois.shape[0], first.shape[1], self.output_size, self.output_size),
                              dtype=torch.float32 if gather else first.dtype)
        for level, (name, stride) in enumerate(zip(self.featmap_names, self.strides)):
            chosen = torch.where(levels == level)[0]
            pooled = pool(features[name], rois[chosen], self.output_size, 1.0 / stride, self.sampling_ratio)
            if torch.jit.is_tracing():
                # A traced `out[chosen] = ...` exports to ONNX with the shape of a one-box level fixed (it then fails on
                # zero boxes); scatter keeps the count dynamic, as torchvision's pooler does while tracing.
                out = out.scatter(0, chosen[:, None, None, None].expand(pooled.shape), pooled.to(out.dtype))
            else:
                out[chosen] = pooled.to(out.dtype)
        return out


def _torchvision_roi_align(feature: torch.Tensor, rois: torch.Tensor, output_size: int, scale: float,
                           sampling_ratio: int) -> torch.Tensor:
    return torchvision.ops.roi_align(feature, rois, output_size, scale, sampling_ratio, aligned=False)
