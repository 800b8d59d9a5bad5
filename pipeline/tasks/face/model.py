"""The face model: backbone -> embedding neck (arcface_torch's BatchNorm, dropout, flatten, fully connected,
BatchNorm) -> embedding; the margin head sits beside it for training only.

The neck flattens the last feature map instead of pooling it, as arcface_torch does: where a part of a face sits
matters. Cached features (finetune.cache_features) are that flattened map, so the neck accepts both shapes.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import backbones
from pipeline.tasks.face.margin import MarginHead


class EmbeddingNeck(nn.Module):
    def __init__(self, channels: int, height: int, width: int, embedding_dim: int, dropout: float) -> None:
        super().__init__()
        self.shape = (channels, height, width)
        self.bn_in = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * height * width, embedding_dim)
        self.bn_out = nn.BatchNorm1d(embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:  # cached features: the flattened map
            x = x.view(-1, *self.shape)
        return self.bn_out(self.fc(self.dropout(self.bn_in(x).flatten(1))))


class FaceModel(nn.Module):
    def __init__(self, backbone: backbones.Backbone, image_size: int, embedding_dim: int, dropout: float,
                 margin: MarginHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.last = backbone.out_stages[-1]
        height, width = _map_size(backbone, image_size)
        self.embedding = EmbeddingNeck(backbone.num_features, height, width, embedding_dim, dropout)
        self.margin = margin
        # Set while training on cached backbone features: forward() then receives them instead of images.
        self.input_is_features = False

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The last feature map, flattened: what the neck consumes and what feature caching stores."""
        return self.backbone(images)[self.last].flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings, not normalised (the margin head and the evaluator normalise)."""
        return self.embedding(x if self.input_is_features else self.backbone(x)[self.last])

    def head_parts(self) -> OrderedDict[str, nn.Module]:
        return OrderedDict(embedding=self.embedding, margin=self.margin)


class Embedder(nn.Module):
    """What MLflow logs: images in, L2-normalised embeddings out; the margin head (num_classes rows) stays behind.

    An image's embedding is the normalised sum of its own and its mirror image's normalised embeddings: what the
    verification protocol scores (verification.py), so a threshold chosen there applies to these embeddings as is.
    """

    def __init__(self, backbone: backbones.Backbone, embedding: EmbeddingNeck) -> None:
        super().__init__()
        self.backbone = backbone
        self.embedding = embedding
        self.last = backbone.out_stages[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        # one pass over images and mirrors (eval-mode BatchNorm treats every image alone)
        features = self.backbone(torch.cat([images, images.flip(-1)]))[self.last]
        both = F.normalize(self.embedding(features).float(), dim=1)
        return F.normalize(both[:n] + both[n:], dim=1)


@torch.no_grad()
def _map_size(backbone: backbones.Backbone, image_size: int) -> tuple[int, int]:
    """The last feature map's height and width at this input size (strides round differently across timm models)."""
    was_training = backbone.training
    backbone.eval()
    shape = backbone(torch.zeros(1, 3, image_size, image_size))[backbone.out_stages[-1]].shape
    backbone.train(was_training)
    return shape[2], shape[3]
