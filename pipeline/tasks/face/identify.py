"""Identity decisions from face embeddings: `pipeline verify` (is this pair one identity?) and galleries (`pipeline
predict --gallery`: which known identity is each probe, if any).

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

from pipeline.data.images import IMAGE_EXTENSIONS
from pipeline.errors import UserError
from pipeline.tasks.base import PredictionWriter
from pipeline.tasks.common import write_csv
from pipeline.use import inference

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


def embed(session: inference.Session, paths: list[Path], batch_size: int,
          desc: str = "embed") -> tuple[list[Path], np.ndarray, list[Path]]:
    """(the readable images, their embeddings (N, D), the unreadable files) through the session's face model."""
    kept: list[Path] = []
    chunks: list[np.ndarray] = []
    skipped: list[Path] = []
    for batch in session.run(paths, batch_size, desc=desc):
        skipped += batch.skipped
        if batch.paths:
            kept += batch.paths
            chunks.append(batch.outputs.float().numpy())
    return kept, (np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)), skipped


@dataclass(frozen=True)
class Verdict:
    same: bool
    score: float
    threshold: float

    def __str__(self) -> str:
        return f"{'same' if self.same else 'different'} (score {self.score:.4f}, threshold {self.threshold:.4f})"


def verify(source: str, first: str | Path, second: str | Path, uri: str | None = None,
           device: str = "auto") -> Verdict:
    """Whether two images show one identity, by the face model behind `source` and its run's threshold."""
    paths = [Path(first), Path(second)]
    for path in paths:
        if not path.is_file():
            raise UserError(f"verify: image '{path}' does not exist (or is not a file); give two image files")
    session = inference.open_session(source, uri, device)
    session.require("face", "verify")
    limit = threshold(session.loaded.fit, source)
    _, embeddings, skipped = embed(session, paths, batch_size=2)
    if skipped:
        raise UserError(f"verify: image '{skipped[0]}' is corrupt, truncated or not an image; give two readable "
                        "image files")
    score = float(embeddings[0] @ embeddings[1])
    return Verdict(score > limit, score, limit)


@dataclass
class Gallery:
    """Known identities, each as the mean of its images' normalised embeddings. Left unnormalised on purpose: a
    probe's dot product with it is its mean verification score against the identity's images, so the pair threshold
    keeps its meaning (normalising the mean would raise every score and turn strangers into known identities)."""

    names: list[str]
    centroids: np.ndarray  # (identities, D)
    threshold: float  # a probe scoring at most this against every identity is unknown

    @classmethod
    def build(cls, session: inference.Session, folder: Path, limit: float, batch_size: int, say=print) -> Gallery:
        identities = _scan(folder)
        owner = {path: name for name, paths in identities for path in paths}
        kept, embeddings, skipped = embed(session, list(owner), batch_size, desc="gallery")
        if skipped:
            say(inference.skipped_line(skipped, "gallery files"))
        if not kept:
            raise UserError(f"--gallery: no image under '{folder}' could be read; give readable images in "
                            f"{folder}/<identity>/")
        rows = np.array([owner[p] for p in kept])
        names = [name for name, _ in identities if (rows == name).any()]  # an identity of unreadable files drops
        return cls(names, np.stack([embeddings[rows == name].mean(axis=0) for name in names]), limit)

    def nearest(self, embeddings: np.ndarray) -> list[tuple[str, float]]:
        """Each probe's most similar identity and its mean score against that identity's images, or UNKNOWN where
        no identity scores above the threshold."""
        scores = embeddings @ self.centroids.T
        best = scores.argmax(axis=1)
        return [(self.names[k] if s[k] > self.threshold else UNKNOWN, float(s[k]))
                for k, s in zip(best.tolist(), scores)]


def _scan(folder: Path) -> list[tuple[str, list[Path]]]:
    if not folder.is_dir():
        raise UserError(f"--gallery: folder '{folder}' does not exist; give a folder of identity folders "
                        "(<identity>/<image>)")
    identities = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if images:
            identities.append((sub.name, images))
    if not identities:
        raise UserError(f"--gallery: '{folder}' holds no identity folders with images; expected "
                        f"{folder}/<identity>/<image>")
    return identities


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


def open_gallery(session: inference.Session, folder: str | Path, batch_size: int, say=print) -> Gallery:
    """The identities in `folder` as the face model behind `session` sees them, with its run's threshold."""
    session.require("face", "--gallery")
    limit = threshold(session.loaded.fit, session.source)
    gallery = Gallery.build(session, Path(folder), limit, batch_size, say)
    say(f"gallery: {len(gallery.names)} identities from {folder}; threshold {limit:.4f}")
    return gallery
