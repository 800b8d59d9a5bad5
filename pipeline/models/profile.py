"""What a model costs: parameter count and compute per image, measured on the model itself (not looked up by name)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def num_params(model: nn.Module) -> int:
    """Every parameter, trainable or frozen (shared tensors counted once, as `nn.Module.parameters` yields them)."""
    return sum(p.numel() for p in model.parameters())


def gflops(model: nn.Module, image_size: int) -> float:
    """Billions of multiply-accumulates (MACs) for one `image_size` x `image_size` RGB image, in eval mode.

    Reported under the name GFLOPs because that is what the ResNet paper, torchvision and timm call this number:
    their "4.1 GFLOPs" for resnet50 at 224 px are multiply-accumulates. `FlopCounterMode` counts a multiply and an
    add as two FLOPs, so its total is halved here. It counts matrix products and convolutions only; BatchNorm,
    activations and pooling (about 1% of a ResNet) are left out, as in the published figures.

    The forward pass runs once on the model's device and dtype; train/eval mode is restored afterwards, so calling
    this mid-training neither updates BatchNorm statistics nor changes the mode.
    """
    reference = next(model.parameters())
    image = torch.zeros(1, 3, image_size, image_size, device=reference.device, dtype=reference.dtype)
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with counter, torch.no_grad():
            model(image)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9
