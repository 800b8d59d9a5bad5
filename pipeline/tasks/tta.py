"""Flip averaging (test-time augmentation): a task's outputs for an image and for its horizontal mirror, the mirror's
mapped back onto the image (`Task.mirror_outputs`), averaged. Validation uses it with eval.tta, `pipeline predict` with
--tta. Classification averages the logits; segmentation the per-pixel logits, the mirror's flipped back.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.tasks.base import Task


def mirrored(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)


def mirror_back(task: Task, what: str) -> Callable[[Any], Any]:
    """The task's `mirror_outputs`; `what` (the option asking) names it in the one-line refusal of other tasks."""
    if task.mirror_outputs is None:
        raise UserError(f"{what}: flip averaging is for classification and segmentation, not {task.name} (face "
                        "embeddings already add each image's mirror); leave it out")
    return task.mirror_outputs


class FlipAveraged(nn.Module):
    """An inference module (images in, output tensor out) answering the mean of the image's and its mirror's outputs."""

    def __init__(self, module: nn.Module, back: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.module, self.back = module, back

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.module(images) + self.back(self.module(mirrored(images)))) / 2


def flip_averaged_predict(predict: Callable, back: Callable) -> Callable:
    """A task's `predict(model, batch)` that averages each batch's outputs with its mirrored images' outputs."""

    def averaged(model: nn.Module, batch):
        plain = predict(model, batch)
        flipped = predict(model, (mirrored(batch[0]), *batch[1:]))
        return (plain + back(flipped)) / 2

    return averaged
