"""Face embeddings of new images (`pipeline predict`, serving): per-image records and the embeddings writer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.tasks.base import DataInfo, PredictOptions


def records(embeddings: torch.Tensor, info: DataInfo, options: PredictOptions) -> list[dict]:
    """{"embedding": [floats]} per image, L2-normalised (the inference module normalises)."""
    return [{"embedding": row} for row in embeddings.float().tolist()]


class Embeddings:
    """`embeddings.npy`: (N, D) float32, L2-normalised, row i for line i of `embeddings.txt` (the image files)."""

    def __init__(self, out_dir: Path) -> None:
        self.array_path, self.names_path = out_dir / "embeddings.npy", out_dir / "embeddings.txt"
        self.paths: list[Path] = []
        self.chunks: list[np.ndarray] = []

    def add(self, paths: list[Path], embeddings: torch.Tensor) -> None:
        self.paths += paths
        self.chunks.append(embeddings.float().numpy())

    def finish(self) -> list[Path]:
        array = np.concatenate(self.chunks) if self.chunks else np.zeros((0, 0), dtype=np.float32)
        np.save(self.array_path, array.astype(np.float32))
        self.names_path.write_text("".join(f"{path}\n" for path in self.paths))
        return [self.array_path, self.names_path]
