"""The synthetic shapes datasets by kind, for `data.synth_if_missing` and `pipeline data synth`.

Every generator has the signature `generate(out, seed=0, overwrite=False, ...) -> root` and writes `out/<kind>/`
through a scratch folder, so an interrupted generation never looks finished. A task module names its kind in `SYNTH`.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from pipeline.data import synth, synth_coco, synth_faces
from pipeline.errors import UserError

log = logging.getLogger(__name__)

KINDS = {
    "classification": synth.generate,  # ImageFolder: one shape per image
    "faces": synth_faces.generate,  # identities (compositions of 2-4 shapes) and an LFW-style held-out pairs set
    "coco": synth_coco.generate,  # scenes of 0-3 shapes: COCO json (boxes, polygons) and class-index masks
}


def ensure(out: Path, kind: str, seed: int = 0) -> Path:
    """Generate dataset `kind` under `out` unless it is already there; return its root (`out/<kind>`).

    Runs started together (two terminals, two depths) share one generation: the first takes a lock beside the data,
    the others wait for it and then find the data there. Without it they wrote into one scratch folder and failed.
    """
    out = Path(out)
    root = out / kind
    if root.is_dir():
        return root
    try:
        out.mkdir(parents=True, exist_ok=True)
        with _exclusive(out / f".{kind}.lock"):
            if not root.is_dir():  # another process may have generated it while this one waited
                log.info(f"generating the synthetic {kind} dataset in {root} (first use; later runs reuse it) ...")
                KINDS[kind](out, seed=seed, overwrite=True)
                files = [p for p in root.rglob("*") if p.is_file()]
                log.info(f"wrote {len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MB, in {root}")
    except OSError as e:
        raise UserError(f"data.root: the synthetic {kind} data cannot be written under '{out}' "
                        f"({e.strerror or e}); point data.root at a folder you can write to, ending in /{kind}, "
                        "or at your own data") from None
    return root


@contextmanager
def _exclusive(path: Path):
    """An advisory lock on `path` held across processes (flock); where there is no fcntl (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield
