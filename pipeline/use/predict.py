"""`pipeline predict`: run a trained model on image files and write the task's files into a folder.

Loading the source (checkpoint, run id, `runs:/`, `models:/`) and running images through the model in their original
pixels is pipeline/use/inference.py, shared with `pipeline verify`. What a task writes is its `writer` in the task
contract (pipeline/tasks/base.py): classification `predictions.csv` (file, rank, class, prob); detection
`predictions.json` (COCO results) and `boxes/`; segmentation `masks/`, `overlays/` and `classes.json`; face
`embeddings.npy` and `embeddings.txt`, plus `identities.csv` against a `--gallery` of identity folders.
Unreadable files are skipped and named; the rest are predicted.
"""
from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.images import IMAGE_EXTENSIONS
from pipeline.errors import UserError
from pipeline.platform import cpu_kernels
from pipeline.tasks.base import PredictOptions
from pipeline.tasks.face.identify import Identities
from pipeline.use import identify, inference

log = logging.getLogger(__name__)

SKIPPED_LIST = "skipped.txt"  # every unreadable file, one per line, when there were any


def find_images(inputs: list[str]) -> list[Path]:
    """Image files named by `inputs`: files, folders (searched recursively) and glob patterns, in the order given."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not matches:
                raise UserError(f"folder '{item}' holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        elif path.is_file():
            matches = [path]  # named explicitly: read_rgb decides whether it is an image
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"pattern '{item}' matches no files; check the path (quote it so the shell keeps it)")
        else:
            raise UserError(f"input '{item}' does not exist; give image files, folders or glob patterns")
        found += matches
    return list(dict.fromkeys(found))  # a file named twice is predicted once


def output_folder(out: str | Path) -> Path:
    """`out`, created if missing; a file there (or on the way there) is the user's to move."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; give a folder for the predictions (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--out '{out}': a file stands where a folder of its path should be; give another folder") \
            from None
    return out


@dataclass
class PredictResult:
    files: list[Path]  # what was written (files and folders)
    predicted: int  # images predicted
    skipped: list[Path]  # files that could not be read


def run(source: str, inputs: list[str], out: str | Path, uri: str | None = None, batch_size: int = 32,
        top_k: int = 5, score: float = 0.5, gallery: str | Path | None = None, device: str = "auto",
        tta: bool = False) -> PredictResult:
    """Predict every image of `inputs` in batches on the best device and write the task's files into `out`; with
    `gallery` (face), also name each image's identity; with `tta`, average each image's outputs with its mirror's."""
    if batch_size < 1 or top_k < 1:
        raise UserError(f"--batch-size ({batch_size}) and --top-k ({top_k}) must be at least 1")
    if not 0.0 <= score <= 1.0:
        raise UserError(f"--score {score:g}: must be within 0..1 (detection draws the boxes scoring at least this)")
    paths = find_images(inputs)
    out = output_folder(out)
    session = inference.open_session(source, uri, device, tta=tta)
    # every batch frees what the next allocates: kept for reuse, unless the run switched the CPU paths off
    cpu_kernels.prepare_process(session.loaded.cfg.train.cpu_kernels)
    known = identify.open_gallery(session, gallery, batch_size) if gallery is not None else None
    writer = session.task.writer(out, session.info, PredictOptions(top_k=top_k, score=score))
    if known is not None:
        writer = Identities(writer, known, out)
    skipped: list[Path] = []
    for batch in session.run(paths, batch_size):
        skipped += batch.skipped
        if batch.paths:
            writer.add(batch.paths, batch.outputs)
    files = writer.finish()
    if skipped:
        files.append(out / SKIPPED_LIST)
        files[-1].write_text("".join(f"{p}\n" for p in skipped))
    result = PredictResult(files, len(paths) - len(skipped), skipped)
    log.info(f"predicted {result.predicted} images on {session.device} with {session.loaded.cfg.model.backbone.name}; "
        f"wrote {', '.join(str(f) for f in files)}")
    if skipped:
        log.info(f"{inference.skipped_line(skipped)} (all listed in {out / SKIPPED_LIST})")
    return result
