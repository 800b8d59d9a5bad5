"""Detection data: COCO files read and checked, id mapping, empty images, crowd and degenerate boxes, transforms that
keep boxes on their objects, aspect-ratio batches, and one-line errors for broken input."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.config import validate
from pipeline.data.sampling import EpochSampler, SeededDataset
from pipeline.errors import UserError
from pipeline.tasks import registry
from pipeline.tasks.detection.data import CocoDetection, read_coco, select_images

detection = registry.get("detection")

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # identity normalisation: tensors are the 0..1 pixels


def write_coco(root: Path, images: list[dict], annotations: list[dict], categories=None, split="train") -> Path:
    """Images named in `images` (with width/height) as black PNGs with a white rectangle per box, and the json."""
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    for entry in images:
        pixels = np.zeros((entry["height"], entry["width"], 3), dtype=np.uint8)
        for ann in annotations:
            if ann["image_id"] == entry["id"] and all(isinstance(v, (int, float)) for v in ann["bbox"]):
                x, y, w, h = (int(round(v)) for v in ann["bbox"])
                pixels[max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)] = 255
        Image.fromarray(pixels).save(folder / entry["file_name"])
    categories = categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 90, "name": "toaster"}]
    ann_file = root / "annotations" / f"{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file


def _image(i: int, width: int = 64, height: int = 48) -> dict:
    return {"id": i, "file_name": f"{i:03d}.png", "width": width, "height": height}


def _ann(i: int, image_id: int, category_id: int, bbox, **extra) -> dict:
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": bbox, "area": 1.0 * bbox[2] * bbox[3]
            if all(isinstance(v, (int, float)) for v in bbox) else 0, "iscrowd": 0, **extra}


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    """Image 1: a cat and a dog; 2: a crowd toaster and a degenerate box; 3: nothing; 4: a box half outside."""
    images = [_image(1), _image(2), _image(3), _image(4, width=40, height=60)]
    anns = [_ann(1, 1, 3, [4, 6, 20, 10]), _ann(2, 1, 7, [30, 20, 16, 20]),
            _ann(3, 2, 90, [10, 10, 30, 30], iscrowd=1), _ann(4, 2, 3, [5, 5, 0, 12]),
            _ann(5, 4, 90, [30, 40, 20, 30]), _ann(6, 4, 7, [50, 70, 5, 5])]
    write_coco(tmp_path, images, anns)
    write_coco(tmp_path, images, anns, split="val")
    return tmp_path


def test_category_ids_map_to_contiguous_labels_and_back(coco: Path):
    split = read_coco(coco / "annotations/train.json", coco / "images/train", "data.train_ann")
    assert split.category_ids == [3, 7, 90] and split.classes == ["cat", "dog", "toaster"]
    first = split.images[0]
    assert first.labels.tolist() == [1, 2]
    assert [split.category_ids[label - 1] for label in first.labels] == [3, 7]
    np.testing.assert_allclose(first.boxes, [[4, 6, 24, 16], [30, 20, 46, 40]])


def test_crowd_degenerate_and_clipped_boxes(coco: Path, caplog):
    with caplog.at_level(logging.WARNING):
        split = read_coco(coco / "annotations/train.json", coco / "images/train", "data.train_ann")
    # the zero-width box of image 2 and the box wholly outside image 4 are dropped and counted
    assert split.dropped_boxes == 2
    assert "dropped 2 degenerate box(es)" in caplog.text
    crowd_image = split.images[1]
    assert crowd_image.crowd.tolist() == [True]
    _, target = CocoDetection([crowd_image], None)[0]
    assert target["boxes"].shape == (0, 4)  # the crowd region is no training target ...
    assert target["coco_crowd"].tolist() == [True]  # ... but stays in the ground truth COCOeval sees
    clipped = split.images[3]
    np.testing.assert_allclose(clipped.boxes, [[30, 40, 40, 60]])  # 20 x 30 box clipped to the 40 x 60 image


def test_empty_images_are_negatives_or_left_out(coco: Path):
    split = read_coco(coco / "annotations/train.json", coco / "images/train", "data.train_ann")
    image, target = CocoDetection(split.images, None)[2]
    assert image.shape == (3, 48, 64)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    kept = select_images(split.images, keep_empty=False, field="data.train_ann")
    assert [rec.image_id for rec in kept] == [1, 4]  # image 2 (crowd only) and 3 (nothing) have no training box
    assert len(select_images(split.images, keep_empty=True, field="data.train_ann")) == 4


def test_build_data_info_and_targets(coco: Path):
    cfg = validate({"task": "detection", "data": {"root": str(coco), "keep_empty": False}})
    data = detection.build_data(cfg.data, mean=MEAN, std=STD, seed=0)
    train, val, info = data.train, data.val, data.info
    assert (len(train), len(val)) == (2, 4)  # validation keeps every image
    assert info.facts.category_ids == [3, 7, 90] and info.num_classes == 3
    images, targets = CocoDetection.collate_fn([val[0], val[3]])
    assert [tuple(i.shape) for i in images] == [(3, 48, 64), (3, 60, 40)]
    assert targets[1]["image_id"].item() == 4 and targets[1]["orig_size"].tolist() == [60, 40]


@pytest.mark.parametrize("spec", [
    [{"name": "HorizontalFlip", "p": 1.0}],
    [{"name": "RandomRotate90", "p": 1.0}],
    [{"name": "Affine", "scale": [0.7, 0.7], "p": 1.0}],
    [{"name": "RandomScale", "scale_limit": [0.5, 0.5], "p": 1.0}, {"name": "ColorJitter", "p": 1.0}],
])
def test_transforms_move_boxes_with_the_image(tmp_path: Path, spec):
    write_coco(tmp_path, [_image(1)], [_ann(1, 1, 3, [6, 8, 20, 14]), _ann(2, 1, 7, [40, 24, 12, 18])])
    cfg = validate({"task": "detection", "data": {"root": str(tmp_path), "val_ann": "annotations/train.json",
                                                  "val_images": "images/train", "train_transforms": spec}})
    train = detection.build_data(cfg.data, mean=MEAN, std=STD, seed=0).train
    image, target = train[0]
    assert len(target["boxes"]) == 2
    bright = image.mean(0) > 0.5
    for box in target["boxes"]:
        x1, y1, x2, y2 = box.round().long().tolist()
        inside = bright[y1:y2, x1:x2]
        assert inside.float().mean() > 0.9  # the box covers its white rectangle ...
        grown = bright[max(y1 - 2, 0):y2 + 2, max(x1 - 2, 0):x2 + 2]
        assert grown.sum() - inside.sum() <= 2 * (x2 - x1 + y2 - y1) + 8  # ... and not much outside it
    assert bright.sum() <= sum(((b[2] - b[0] + 2) * (b[3] - b[1] + 2)).item() for b in target["boxes"])
    # predictions in this frame map back to the original pixels through `scale`
    scale = target["scale"]
    assert scale.tolist() == pytest.approx([64 / image.shape[2], 48 / image.shape[1]])


def test_grouped_batches_keep_orientations_apart(tmp_path: Path):
    sizes = [(64, 48), (40, 60), (64, 48), (64, 48), (40, 60), (40, 60), (64, 48), (40, 60), (64, 48), (64, 48),
             (40, 60)]
    write_coco(tmp_path, [_image(i, w, h) for i, (w, h) in enumerate(sizes, start=1)], [_ann(1, 1, 3, [1, 1, 5, 5])])
    cfg = validate({"task": "detection", "data": {"root": str(tmp_path), "val_ann": "annotations/train.json",
                                                  "val_images": "images/train", "group_aspect_ratio": True}})
    train = detection.build_data(cfg.data, mean=MEAN, std=STD, seed=0).train
    shuffled = EpochSampler(len(sizes), seed=0)
    sampler = train.group_batches(shuffled, batch_size=3)
    sampler.set_epoch(2)
    assert shuffled.epoch == 2  # the loader's per-epoch reshuffle reaches the wrapped sampler
    loader = DataLoader(SeededDataset(train), batch_size=3, sampler=sampler, collate_fn=train.collate_fn)
    batches = [[tuple(image.shape[1:]) for image in images] for images, _ in loader]
    assert sorted(size for batch in batches for size in batch) == sorted((h, w) for w, h in sizes)
    assert all(len(set(batch)) == 1 for batch in batches[:2])  # the first batches are homogeneous
    ungrouped = cfg.data.model_copy(update={"group_aspect_ratio": False})
    plain = detection.build_data(ungrouped, mean=MEAN, std=STD, seed=0).train
    assert plain.group_batches(shuffled, batch_size=3) is shuffled


# ---------------------------------------------------------------------------------------------------- bad input


def _expect(tmp_path: Path, match: str):
    cfg = validate({"task": "detection", "data": {"root": str(tmp_path)}})
    with pytest.raises(UserError, match=match) as err:
        detection.build_data(cfg.data, mean=MEAN, std=STD, seed=0)
    assert "\n" not in str(err.value)


def test_missing_annotation_file(tmp_path: Path):
    _expect(tmp_path, r"data.train_ann: annotation file '.*train.json' not found")


def test_annotation_file_that_is_not_json(tmp_path: Path):
    write_coco(tmp_path, [_image(1)], [])
    (tmp_path / "annotations" / "train.json").write_text("{'images': [")
    _expect(tmp_path, r"train.json' is not valid JSON")


def test_annotation_file_without_coco_lists(tmp_path: Path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.json").write_text(json.dumps({"images": []}))
    _expect(tmp_path, "needs the lists 'images', 'annotations' and 'categories'")


def test_missing_image_is_named(tmp_path: Path):
    write_coco(tmp_path, [_image(1), _image(2)], [_ann(1, 1, 3, [1, 1, 5, 5])])
    (tmp_path / "images" / "train" / "002.png").unlink()
    _expect(tmp_path, r"1 image\(s\) listed in .* are missing: .*002.png")


def test_file_name_escaping_the_image_root(tmp_path: Path):
    write_coco(tmp_path, [_image(1)], [])
    (tmp_path / "images" / "secret.png").write_bytes(b"")
    ann_file = tmp_path / "annotations" / "train.json"
    data = json.loads(ann_file.read_text())
    data["images"][0]["file_name"] = "../secret.png"
    ann_file.write_text(json.dumps(data))
    _expect(tmp_path, r"file_name '../secret.png', which points outside the image folder")


def test_unknown_category_id(tmp_path: Path):
    write_coco(tmp_path, [_image(1)], [_ann(17, 1, 5, [1, 1, 5, 5])])
    _expect(tmp_path, r"annotation 17 has category_id 5, which is not in 'categories' \(ids 3, 7, 90\)")


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, "3", 4], None, [1, 2, float("nan"), 4]])
def test_bbox_that_is_not_four_numbers(tmp_path: Path, bbox):
    write_coco(tmp_path, [_image(1)], [])
    ann_file = tmp_path / "annotations" / "train.json"
    data = json.loads(ann_file.read_text())
    data["annotations"] = [{"id": 9, "image_id": 1, "category_id": 3, "bbox": bbox}]
    ann_file.write_text(json.dumps(data))
    _expect(tmp_path, r"annotation 9 has bbox .*; a bbox is four numbers")


def test_unreadable_image_is_named_or_skipped(coco: Path, caplog):
    (coco / "images" / "train" / "004.png").write_bytes(b"not a png")
    cfg = validate({"task": "detection", "data": {"root": str(coco)}})
    train = detection.build_data(cfg.data, mean=MEAN, std=STD, seed=0).train
    with pytest.raises(UserError, match=r"004.png' is corrupt, truncated or not an image"):
        train[3]
    skipping = cfg.data.model_copy(update={"skip_bad_images": True})
    with caplog.at_level(logging.WARNING):
        data = detection.build_data(skipping, mean=MEAN, std=STD, seed=0)
    assert (len(data.train), len(data.val)) == (3, 4) and "skipped 1 unreadable image(s)" in caplog.text


def test_image_size_differs_from_annotation(tmp_path: Path):
    write_coco(tmp_path, [_image(1)], [_ann(1, 1, 3, [1, 1, 5, 5])])
    Image.new("RGB", (30, 30)).save(tmp_path / "images" / "train" / "001.png")
    split = read_coco(tmp_path / "annotations/train.json", tmp_path / "images/train", "data.train_ann")
    with pytest.raises(UserError, match=r"001.png' is 30x30 pixels but its annotation file says 64x48"):
        CocoDetection(split.images, None)[0]
