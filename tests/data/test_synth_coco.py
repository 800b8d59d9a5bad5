"""The synthetic COCO scenes: valid COCO json, masks that agree with the polygons, deterministic files."""
import hashlib

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline.data import shapes, synth, synth_coco
from pipeline.errors import UserError


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return synth_coco.generate(tmp_path_factory.mktemp("scenes"), image_size=64, train_images=40, val_images=10)


def test_layout_and_pycocotools_load(coco_root):
    for split, count in (("train", 40), ("val", 10)):
        api = COCO(str(coco_root / "annotations" / f"{split}.json"))
        assert len(api.getImgIds()) == count
        assert sorted(api.getCatIds()) == [1, 2, 4, 5, 8, 9]  # not contiguous, on purpose
        for img in api.loadImgs(api.getImgIds()):
            assert (coco_root / "images" / split / img["file_name"]).is_file()
            assert (coco_root / "masks" / split / img["file_name"]).is_file()
    assert (coco_root / "classes.txt").read_text().split() == ["background", *synth.SHAPES]


def test_masks_agree_with_polygons_and_boxes(coco_root):
    api = COCO(str(coco_root / "annotations" / "train.json"))
    names = {c["id"]: c["name"] for c in api.loadCats(api.getCatIds())}
    shapes_seen = 0
    for img in api.loadImgs(api.getImgIds()):
        mask = np.asarray(Image.open(coco_root / "masks" / "train" / img["file_name"]))
        expected = np.zeros_like(mask)
        for ann in api.loadAnns(api.getAnnIds(imgIds=img["id"])):
            instance = api.annToMask(ann).astype(bool)
            assert not expected[instance].any(), "instances overlap"
            expected[instance] = synth.SHAPES.index(names[ann["category_id"]]) + 1
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64.01 and y + h <= 64.01 and w > 0 and h > 0
            assert ann["area"] == pytest.approx(instance.sum())
            shapes_seen += 1
        np.testing.assert_array_equal(mask, expected)
    assert shapes_seen >= 40


def test_same_seed_same_bytes(tmp_path):
    def digest(root):
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())).hexdigest()

    a = synth_coco.generate(tmp_path / "a", seed=1, image_size=32, train_images=3, val_images=2)
    b = synth_coco.generate(tmp_path / "b", seed=1, image_size=32, train_images=3, val_images=2)
    c = synth_coco.generate(tmp_path / "c", seed=2, image_size=32, train_images=3, val_images=2)
    assert digest(a) == digest(b) != digest(c)


def test_refuses_to_overwrite_without_asking(tmp_path):
    synth_coco.generate(tmp_path, image_size=32, train_images=1, val_images=1)
    with pytest.raises(UserError, match="already exists"):
        synth_coco.generate(tmp_path, image_size=32, train_images=1, val_images=1)


def test_registered_kind():
    assert shapes.KINDS["coco"] is synth_coco.generate


def test_some_images_are_empty():
    rng_counts = [len(synth_coco.render_scene(np.random.default_rng([0, 100, i]), 64)[1]) for i in range(200)]
    assert 0 in rng_counts and max(rng_counts) == synth_coco.MAX_SHAPES


def test_cli_writes_the_kinds_asked_for(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import main

    calls = []
    monkeypatch.setitem(shapes.KINDS, "coco", lambda out, seed, overwrite: calls.append((out, seed)) or out / "coco")
    result = CliRunner().invoke(main, ["data", "synth", "--out", str(tmp_path), "--kind", "coco", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert calls == [(tmp_path, 3)]
    result = CliRunner().invoke(main, ["data", "synth", "--out", str(tmp_path), "--kind", "nope"])
    assert result.exit_code == 1 and "--kind: unknown nope" in result.output
