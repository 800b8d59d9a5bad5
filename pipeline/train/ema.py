"""An exponential moving average of the weights (train.ema), as timm's ModelEmaV3 and torchvision's references keep it.

After every optimizer step each entry of the model's state_dict moves towards the trained model's: parameters and
floating-point buffers (BatchNorm running means and variances) alike, avg <- decay * avg + (1 - decay) * now, so the
averaged model is never evaluated with statistics of other weights; integer buffers (BatchNorm's batch counts) are
copied. The decay of update n is min(decay, (1 + n) / (10 + n)) (TensorFlow's ExponentialMovingAverage with
num_updates): early on the average follows the weights closely, so a short run's average does not stay near the random
or pretrained start. The average is the model that counts: the engine evaluates it, picks the best epoch by it and
writes it as best.pt's weights; last.pt keeps both, so a resumed run continues both.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, update: int) -> float:
        return min(self.decay, (1 + update) / (10 + update))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model` (the trained weights, unwrapped from DDP)."""
        d = self.decay_at(self.updates)
        now = model.state_dict()
        for name, avg in self.module.state_dict().items():
            if avg.is_floating_point():
                avg.lerp_(now[name].to(avg.dtype), 1.0 - d)
            else:
                avg.copy_(now[name])
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])

    def describe(self) -> str:
        return f"the moving average of the weights (train.ema={self.decay:g})"
