"""Identity decisions from face embeddings, for `pipeline verify` (is this pair one identity?) and galleries (`pipeline
predict --gallery`: which known identity is each probe, if any); pipeline/use/identify.py runs the images through a
trained model.

A score is the cosine similarity of two L2-normalised embeddings; "same" means a score above the threshold the run
chose on its validation folds (verification.py): the best epoch's `val/<set>/threshold` from the checkpoint's
training history, averaged over the verification sets. The face inference module embeds an image as the protocol did
(the image and its mirror), so the threshold applies as chosen.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.tasks.base import PredictionWriter
from pipeline.tasks.common import write_csv

UNKNOWN = "unknown"
_THRESHOLD_KEY = re.compile(r"^val/.+/threshold$")


def threshold(fit: dict, source: str) -> float:
    """The decision threshold of the best epoch, averaged over the verification sets."""
    history, best = fit.get("history") or [], int(fit.get("best_epoch") or 0)
    entry = history[best - 1] if 0 < best <= len(history) else {}
    values = [value for key, value in entry.items() if _THRESHOLD_KEY.match(key)]
    if not values:
        raise UserError(f"{source}: its checkpoint holds no verification threshold (val/<set>/threshold of the best "
                        "epoch); use the best.pt of a face run that finished at least one epoch")
    return float(np.mean(values))


@dataclass(frozen=True)
class Verdict:
    same: bool
    score: float
    threshold: float

    def __str__(self) -> str:
        return f"{'same' if self.same else 'different'} (score {self.score:.4f}, threshold {self.threshold:.4f})"


@dataclass
class Gallery:
    """Known identities, each as the mean of its images' normalised embeddings (pipeline/use/identify.py builds one
    from a folder). Left unnormalised on purpose: a
    probe's dot product with it is its mean verification score against the identity's images, so the pair threshold
    keeps its meaning (normalising the mean would raise every score and turn strangers into known identities)."""

    names: list[str]
    centroids: np.ndarray  # (identities, D)
    threshold: float  # a probe scoring at most this against every identity is unknown

    def nearest(self, embeddings: np.ndarray) -> list[tuple[str, float]]:
        """Each probe's most similar identity and its mean score against that identity's images, or UNKNOWN where
        no identity scores above the threshold."""
        scores = embeddings @ self.centroids.T
        best = scores.argmax(axis=1)
        return [(self.names[k] if s[k] > self.threshold else UNKNOWN, float(s[k]))
                for k, s in zip(best.tolist(), scores)]


class Identities:
    """`pipeline predict --gallery`: the face writer's files plus `identities.csv` (file, identity or "unknown",
    mean score against the nearest identity's images)."""

    def __init__(self, writer: PredictionWriter, gallery: Gallery, out_dir: Path) -> None:
        self.writer, self.gallery, self.path = writer, gallery, out_dir / "identities.csv"
        self.rows: list[tuple[str, str, str]] = []

    def add(self, paths: list[Path], embeddings) -> None:
        self.writer.add(paths, embeddings)
        for path, (name, score) in zip(paths, self.gallery.nearest(embeddings.float().numpy())):
            self.rows.append((str(path), name, f"{score:.6f}"))

    def finish(self) -> list[Path]:
        return self.writer.finish() + [write_csv(self.path, ["file", "identity", "score"], self.rows)]


