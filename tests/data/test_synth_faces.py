"""The synthetic identities: layout, an LFW pairs file over held-out identities, determinism, and compositions that
no single colour or shape gives away."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import shapes, synth_faces
from pipeline.errors import UserError
from pipeline.tasks.face.data import read_pairs

SMALL = {"image_size": 32, "train_identities": 4, "images_per_identity": 3, "holdout_identities": 3,
         "holdout_images": 3, "pairs_per_fold": 2}


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    return synth_faces.generate(tmp_path_factory.mktemp("synth"), **SMALL)


def test_layout_and_pairs_file(faces: Path):
    assert shapes.KINDS["faces"] is synth_faces.generate
    train = sorted(p.name for p in (faces / "train").iterdir())
    held = sorted(p.name for p in (faces / "holdout").iterdir() if p.is_dir())
    assert train == ["id0000", "id0001", "id0002", "id0003"] and held == ["held0000", "held0001", "held0002"]
    assert sorted(p.name for p in (faces / "train" / "id0001").iterdir()) == \
           ["id0001_0001.jpg", "id0001_0002.jpg", "id0001_0003.jpg"]
    lines = (faces / "holdout" / "pairs.txt").read_text().splitlines()
    assert lines[0] == "10\t2" and len(lines) == 1 + 10 * 4
    pairs = read_pairs(faces / "holdout" / "pairs.txt", faces / "holdout", "holdout")
    assert pairs.issame.tolist() == [True, True, False, False] * 10
    for (a, b), same in zip(pairs.pairs, pairs.issame):
        first, second = pairs.images[a], pairs.images[b]
        assert (first.parent == second.parent) == same and first != second
        assert first.parent.name.startswith("held")  # pairs only use identities never seen in training


def test_same_seed_gives_identical_files_and_existing_output_is_kept(faces: Path, tmp_path: Path):
    again = synth_faces.generate(tmp_path, **SMALL)
    for rel in ("train/id0002/id0002_0003.jpg", "holdout/held0001/held0001_0002.jpg", "holdout/pairs.txt"):
        assert (again / rel).read_bytes() == (faces / rel).read_bytes()
    with pytest.raises(UserError, match="already exists"):
        synth_faces.generate(tmp_path, **SMALL)


def test_images_of_one_identity_vary_but_stay_one_composition():
    parts = synth_faces.make_identity(np.random.default_rng([0, 1, 5]))
    a = synth_faces.render(np.random.default_rng([0, 1, 5, 0]), parts, 64)
    b = synth_faces.render(np.random.default_rng([0, 1, 5, 1]), parts, 64)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10  # pose, colour, background, blur and noise differ
    assert np.array_equal(a, synth_faces.render(np.random.default_rng([0, 1, 5, 0]), parts, 64))


def test_no_identity_is_told_apart_by_one_colour_or_one_shape():
    identities = [synth_faces.make_identity(np.random.default_rng([0, 1, i])) for i in range(150)]
    assert all(2 <= len(parts) <= 4 for parts in identities)
    kinds = Counter(k for parts in identities for k in {p.kind for p in parts})
    colors = Counter(c for parts in identities for c in {p.color for p in parts})
    combos = Counter(pc for parts in identities for pc in {(p.kind, p.color) for p in parts})
    for parts in identities:
        for p in parts:
            # every kind, colour, and even kind-and-colour part is shared with other identities
            assert kinds[p.kind] >= 10 and colors[p.color] >= 10 and combos[(p.kind, p.color)] >= 2
    layouts = {tuple((p.kind, p.color, round(p.offset[0], 3), round(p.offset[1], 3)) for p in parts)
               for parts in identities}
    assert len(layouts) == len(identities)  # every composition is distinct
