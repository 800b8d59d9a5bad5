"""The synthetic shapes datasets by kind, for `data.synth_if_missing` and `pipeline data synth`.

Every generator has the signature `generate(out, seed=0, overwrite=False, ...) -> root` and writes `out/<kind>/`
through a scratch folder, so an interrupted generation never looks finished. A task module names its kind in `SYNTH`.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.data import synth, synth_coco, synth_faces

KINDS = {
    "classification": synth.generate,  # ImageFolder: one shape per image
    "faces": synth_faces.generate,  # identities (compositions of 2-4 shapes) and an LFW-style held-out pairs set
    "coco": synth_coco.generate,  # scenes of 0-3 shapes: COCO json (boxes, polygons) and class-index masks
}


def ensure(out: Path, kind: str, seed: int = 0) -> Path:
    """Generate dataset `kind` under `out` unless it is already there; return its root (`out/<kind>`)."""
    root = Path(out) / kind
    if not root.is_dir():
        KINDS[kind](Path(out), seed=seed, overwrite=True)
    return root
