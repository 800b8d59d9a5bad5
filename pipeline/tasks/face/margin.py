"""The training-only margin head: class logits `s·cos θ` from normalised embeddings and normalised class weights,
with the target class's logit replaced by `s·(cos(m1·θ + m2) − m3)`.

ArcFace is (m1, m2, m3) = (1, m, 0), CosFace (1, 0, m); insightface's combined margin uses all three. The math runs
in float32 even under autocast (half-precision cosines near ±1 give NaN angles, insightface#2200), cosines are
clamped away from ±1 before acos (whose gradient is infinite there), and where m1·θ + m2 passes π, where cos would
rise again and reward a worse angle, the target logit falls back to `cos θ − m2·sin m2` (arcface_torch's threshold).
An optional warm-up ramps the margins from 0 over the first steps: small datasets do not converge with the full
margin from the start (ronghuaiyang/arcface-pytorch#93).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Cosines are kept this far inside [-1, 1]: acos'(1 - 1e-6) is about -707 in float32, finite.
EPS = 1e-6


class MarginHead(nn.Module):
    def __init__(self, embedding_dim: int, num_classes: int, s: float, m1: float, m2: float, m3: float,
                 warmup_steps: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim).normal_(0.0, 0.01))
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.warmup_steps = warmup_steps
        # Training steps seen, in the state_dict so that a resumed run continues the warm-up where it stopped.
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def ramp(self) -> torch.Tensor:
        """The fraction of the full margins in use now: 0 -> 1 over the warm-up steps, then 1."""
        if self.warmup_steps == 0:
            return torch.ones((), device=self.steps.device)
        return (self.steps.float() / self.warmup_steps).clamp(max=1.0)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Float32 logits (N, num_classes), margins applied to each row's `labels` column."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))
            cos = cos.clamp(-1.0 + EPS, 1.0 - EPS)
            ramp = self.ramp()
            m1, m2, m3 = 1.0 + (self.m1 - 1.0) * ramp, self.m2 * ramp, self.m3 * ramp
            target = cos.gather(1, labels[:, None])
            angle = m1 * torch.acos(target) + m2
            with_margin = torch.where(angle <= math.pi, torch.cos(angle), target - m2 * torch.sin(m2)) - m3
            logits = cos.scatter(1, labels[:, None], with_margin)
        if self.training:
            self.steps += 1
        return logits * self.s
