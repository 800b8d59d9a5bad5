"""Face identities through a trained model: `pipeline verify` (is this pair one identity?) and galleries (`pipeline
predict --gallery`: which known identity is each probe). The decisions themselves are the face task's
(pipeline/tasks/face/identify.py): a score is the cosine similarity of two L2-normalised embeddings, "same" a score
above the threshold the run chose on its validation folds.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.data.images import IMAGE_EXTENSIONS
from pipeline.errors import UserError
from pipeline.tasks.face.identify import Gallery, Verdict, threshold
from pipeline.use import inference

log = logging.getLogger(__name__)


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


def build_gallery(session: inference.Session, folder: Path, limit: float, batch_size: int) -> Gallery:
    """The identities in `folder` (<identity>/<image>), each the mean of its readable images' embeddings."""
    identities = _scan(folder)
    owner = {path: name for name, paths in identities for path in paths}
    kept, embeddings, skipped = embed(session, list(owner), batch_size, desc="gallery")
    if skipped:
        log.warning(inference.skipped_line(skipped, "gallery files"))
    if not kept:
        raise UserError(f"--gallery: no image under '{folder}' could be read; give readable images in "
                        f"{folder}/<identity>/")
    rows = np.array([owner[p] for p in kept])
    names = [name for name, _ in identities if (rows == name).any()]  # an identity of unreadable files drops
    return Gallery(names, np.stack([embeddings[rows == name].mean(axis=0) for name in names]), limit)


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


def open_gallery(session: inference.Session, folder: str | Path, batch_size: int) -> Gallery:
    """The identities in `folder` as the face model behind `session` sees them, with its run's threshold."""
    session.require("face", "--gallery")
    limit = threshold(session.loaded.fit, session.source)
    gallery = build_gallery(session, Path(folder), limit, batch_size)
    log.info(f"gallery: {len(gallery.names)} identities from {folder}; threshold {limit:.4f}")
    return gallery
