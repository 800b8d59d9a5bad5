"""Segmentation datasets: VOC palette PNGs, images/ + masks/ folders, COCO polygons and RLE, and bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.transforms import build_transforms
from pipeline.errors import UserError
from pipeline.tasks import registry
from pipeline.tasks.segmentation.config import SegmentationData
from pipeline.tasks.segmentation.data import VOC_CLASSES, build_datasets, coco_class_mask, read_mask


def _rgb(path, size=(8, 6), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


def _palette_png(path, indices: np.ndarray):
    """A VOC-style mask: palette mode, the pixel values are class indices, the palette only colours them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(indices.astype(np.uint8), mode="P")
    img.putpalette([v for i in range(256) for v in (i * 7 % 256, i * 13 % 256, i * 29 % 256)])
    img.save(path)


def _voc(root, splits=None, masks=None):
    """A VOC2012 folder with images a, b (train) and c (val); masks by stem (default: one class per image)."""
    splits = splits or {"train": ["a", "b"], "val": ["c"]}
    masks = masks or {}
    for split, stems in splits.items():
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
        for i, stem in enumerate(stems):
            _rgb(root / "JPEGImages" / f"{stem}.jpg")
            mask = masks.get(stem, np.full((6, 8), i + 1))
            if mask is not None:
                _palette_png(root / "SegmentationClass" / f"{stem}.png", mask)
    return root


def _build(root, fmt, **kw):
    args = dict(train_split="train", val_split="val", classes=None, ignore_index=255, train_transform=None,
                val_transform=None)
    args.update(kw)
    return build_datasets(root, fmt, **args)


def _square(x, y, side):
    return [x, y, x + side, y, x + side, y + side, x, y + side]


def _coco(root, split="train", anns=None, size=(16, 12), categories=None, images=1):
    """A COCO instances json under root/annotations with `images` images of `size` (w, h) in root/images/<split>."""
    width, height = size
    entries = []
    for i in range(images):
        _rgb(root / "images" / split / f"{i}.png", size=size)
        entries.append({"id": i + 1, "file_name": f"{i}.png", "width": width, "height": height})
    categories = categories or [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}]
    data = {"images": entries, "annotations": anns or [], "categories": categories}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"{split}.json").write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------------------------- VOC


def test_voc_palette_masks_decode_to_class_indices_with_255_kept(tmp_path):
    indices = np.zeros((6, 8), dtype=np.uint8)
    indices[1:3, 2:5] = 15  # person
    indices[0, :] = 255  # VOC's object border
    root = _voc(tmp_path / "VOC2012", masks={"a": indices})
    train, val, classes = _build(root, "voc")
    assert classes == list(VOC_CLASSES) and len(classes) == 21
    assert len(train) == 2 and len(val) == 1
    image, mask = train[0]
    assert image.shape == (3, 6, 8) and image.dtype == torch.float32
    assert mask.dtype == torch.int64 and torch.equal(mask, torch.from_numpy(indices).long())


def test_read_mask_rejects_colour_masks(tmp_path):
    Image.new("RGB", (4, 4), (128, 0, 0)).save(tmp_path / "m.png")
    with pytest.raises(UserError, match=r"m\.png' is a RGB colour image.*class index"):
        read_mask(tmp_path / "m.png")


def test_voc_missing_root_names_the_download(tmp_path):
    with pytest.raises(UserError, match="VOCtrainval_11-May-2012.tar"):
        _build(tmp_path / "VOCdevkit" / "VOC2012", "voc")


def test_empty_split_file_is_one_clear_error(tmp_path):
    root = _voc(tmp_path / "VOC2012", splits={"train": [], "val": ["c"]})
    with pytest.raises(UserError, match=r"train\.txt' lists no images"):
        _build(root, "voc")


def test_missing_mask_names_the_image_and_the_mask(tmp_path):
    root = _voc(tmp_path / "VOC2012", masks={"b": None})
    with pytest.raises(UserError, match=r"image '.*b\.jpg' has no mask: '.*SegmentationClass/b\.png' is missing"):
        _build(root, "voc")


def test_class_index_out_of_range_names_the_file_and_the_value(tmp_path):
    bad = np.zeros((6, 8), dtype=np.uint8)
    bad[2, 2] = 23
    bad[0, 0] = 255  # ignore: allowed
    root = _voc(tmp_path / "VOC2012", masks={"a": bad})
    train, _, _ = _build(root, "voc")
    with pytest.raises(UserError, match=r"mask '.*a\.png' has class index 23 .* 21 classes"):
        train[0]


def test_image_and_mask_of_different_sizes_name_both(tmp_path):
    root = _voc(tmp_path / "VOC2012", masks={"a": np.zeros((5, 8))})
    train, _, _ = _build(root, "voc")
    with pytest.raises(UserError, match=r"mask '.*a\.png' is 8x5 but image '.*a\.jpg' is 8x6"):
        train[0]


def test_ignore_index_that_is_a_class_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"data.ignore_index=3 is a class index"):
        _build(_voc(tmp_path / "VOC2012"), "voc", ignore_index=3)


# ---------------------------------------------------------------------------------------------------------- folder


def test_folder_layout_with_classes_txt(tmp_path):
    for split, stems in (("train", ["x", "y"]), ("val", ["z"])):
        (tmp_path / "masks" / split).mkdir(parents=True)
        for stem in stems:
            _rgb(tmp_path / "images" / split / f"{stem}.jpg")
            mask = Image.fromarray(np.full((6, 8), 2, dtype=np.uint8), mode="L")
            mask.save(tmp_path / "masks" / split / f"{stem}.png")
    (tmp_path / "classes.txt").write_text("background\nroad\ncar\n")
    train, val, classes = _build(tmp_path, "folder")
    assert classes == ["background", "road", "car"] and len(train) == 2 and len(val) == 1
    assert torch.all(val[0][1] == 2)
    # a class list in the config wins; a mask value beyond it is an error naming the file
    train, _, classes = _build(tmp_path, "folder", classes=["bg", "road"])
    assert classes == ["bg", "road"]
    with pytest.raises(UserError, match=r"x\.png' has class index 2"):
        train[0]


def test_folder_without_class_list_says_how_to_give_one(tmp_path):
    _rgb(tmp_path / "images" / "train" / "x.jpg")
    with pytest.raises(UserError, match=r"data.classes: no class list.*classes.txt"):
        _build(tmp_path, "folder")


# ------------------------------------------------------------------------------------------------------------ COCO


def test_coco_polygons_map_category_ids_to_contiguous_labels(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 17, "segmentation": [_square(1, 1, 4)], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "segmentation": [_square(9, 5, 5)], "iscrowd": 0}]
    _coco(tmp_path, "train", anns)
    _coco(tmp_path, "val")
    train, val, classes = _build(tmp_path, "coco")
    assert classes == ["background", "cat", "dog"]  # ids 3 and 17 -> labels 1 and 2
    _, mask = train[0]
    assert mask.shape == (12, 16)
    assert set(mask[1:5, 1:5].unique().tolist()) == {2}  # dog
    assert set(mask[5:10, 9:14].unique().tolist()) == {1}  # cat
    assert mask[0, 0] == 0 and mask[11, 0] == 0
    assert int((mask == 2).sum()) == 16 and int((mask == 1).sum()) == 25
    assert torch.all(val[0][1] == 0)  # an image without annotations is all background


def test_coco_rle_compressed_and_uncompressed_decode(tmp_path):
    truth = np.zeros((12, 16), dtype=np.uint8)
    truth[2:6, 3:9] = 1
    compressed = mask_utils.encode(np.asfortranarray(truth))
    compressed["counts"] = compressed["counts"].decode()  # as json stores it
    # uncompressed RLE (what iscrowd annotations use): run lengths in column-major order, starting with zeros
    flat = truth.flatten(order="F")
    runs, value, count = [], 0, 0
    for pixel in flat:
        if pixel == value:
            count += 1
        else:
            runs.append(count)
            value, count = pixel, 1
    runs.append(count)
    labels = {3: 1, 17: 2}
    for rle, category in ((compressed, 3), ({"counts": runs, "size": [12, 16]}, 17)):
        ann = {"id": 1, "image_id": 1, "category_id": category, "segmentation": rle, "iscrowd": 1}
        mask = coco_class_mask([ann], 12, 16, labels, "test")
        assert np.array_equal(mask, truth * labels[category])


def test_coco_overlaps_paint_the_smaller_instance_on_top_whatever_the_order(tmp_path):
    big = {"id": 5, "image_id": 1, "category_id": 3, "segmentation": [_square(0, 0, 10)]}
    small = {"id": 2, "image_id": 1, "category_id": 17, "segmentation": [_square(2, 2, 3)]}
    labels = {3: 1, 17: 2}
    first = coco_class_mask([big, small], 12, 16, labels, "test")
    second = coco_class_mask([small, big], 12, 16, labels, "test")
    assert np.array_equal(first, second)
    assert np.all(first[2:5, 2:5] == 2) and first[0, 0] == 1 and first[8, 8] == 1


def test_coco_unknown_category_and_missing_files(tmp_path):
    _coco(tmp_path, "train")
    _coco(tmp_path, "val", anns=[{"id": 1, "image_id": 1, "category_id": 99, "segmentation": [_square(0, 0, 3)]}])
    with pytest.raises(UserError, match=r"annotation 1 in '.*val\.json' has category_id 99"):
        _build(tmp_path, "coco")
    with pytest.raises(UserError, match=r"annotations for split 'test' not found"):
        _build(tmp_path, "coco", val_split="test")
    (tmp_path / "images" / "train" / "0.png").unlink()
    with pytest.raises(UserError, match=r"image listed in '.*train\.json' is missing: '.*0\.png'"):
        _build(tmp_path, "coco")


def test_coco_file_name_escaping_the_image_folder_is_refused(tmp_path):
    _coco(tmp_path, "train")
    _coco(tmp_path, "val")
    _rgb(tmp_path / "secret.png", size=(16, 12))  # exists: only the name's direction is wrong
    path = tmp_path / "annotations" / "train.json"
    data = json.loads(path.read_text())
    data["images"][0]["file_name"] = "../../secret.png"
    path.write_text(json.dumps(data))
    expected = r"image 1 has file_name '\.\./\.\./secret\.png', which points outside the image folder"
    with pytest.raises(UserError, match=expected):
        _build(tmp_path, "coco")


def test_coco_json_size_disagreeing_with_the_image_names_both(tmp_path):
    _coco(tmp_path, "train", size=(16, 12))
    _coco(tmp_path, "val")
    _rgb(tmp_path / "images" / "train" / "0.png", size=(20, 12))  # the json still says 16 x 12
    train, _, _ = _build(tmp_path, "coco")
    with pytest.raises(UserError, match=r"mask of '0\.png' in '.*train\.json' is 16x12 but image '.*0\.png' is 20x12"):
        train[0]


# ------------------------------------------------------------------------------------------------------ transforms


def test_default_transforms_pad_masks_with_ignore_and_keep_labels_nearest(tmp_path):
    indices = np.zeros((6, 8), dtype=np.uint8)
    indices[:, 4:] = 7
    root = _voc(tmp_path / "VOC2012", masks={"a": indices})
    defaults = SegmentationData(image_size=16, ignore_index=255)
    train_spec, val_spec = registry.get("segmentation").default_transforms(defaults)
    kw = dict(mean=(0.5,) * 3, std=(0.5,) * 3, seed=0)
    train, val, _ = _build(root, "voc", train_transform=build_transforms(train_spec, field="t", **kw),
                           val_transform=build_transforms(val_spec, field="v", **kw))
    image, mask = train[0]
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16)
    assert set(mask.unique().tolist()) <= {0, 7, 255}
    # validation: 8x6 scaled to 16x12, padded to 16x16 with ignored rows top and bottom
    _, mask = val[0]
    assert mask.shape == (16, 16) and torch.all(mask[:2] == 255) and torch.all(mask[-2:] == 255)
    assert torch.all(mask[2:14] == 1)  # image c's mask is class 1 throughout
