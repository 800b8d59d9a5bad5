import logging
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.transforms import build_transforms
from pipeline.errors import UserError
from pipeline.tasks.classification.data import CifarDataset, ImageFolderDataset, build_datasets, stratified_split


def _image(path, value=0, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def _folder(root, counts, ext=".png"):
    for name, count in counts.items():
        for index in range(count):
            _image(root / name / f"{index:03d}{ext}", value=index)
    return root


def _build(root, fmt="imagefolder", **overrides):
    args = dict(val_fraction=0.0, seed=0, train_transform=None, val_transform=None, skip_bad_images=False,
                download=False)
    args.update(overrides)
    return build_datasets(root, fmt, **args)


# ---------------------------------------------------------------------------------------------------- ImageFolder


def test_train_val_layout(tmp_path):
    _folder(tmp_path / "train", {"dog": 3, "cat": 2})
    _folder(tmp_path / "val", {"dog": 1, "cat": 1})
    transform = build_transforms([{"name": "Resize", "height": 8, "width": 8}], field="data.val_transforms",
                                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    train, val, classes = _build(tmp_path, train_transform=transform, val_transform=transform)
    assert classes == ["cat", "dog"]
    assert len(train) == 5 and len(val) == 2
    assert sorted(train.targets) == [0, 0, 1, 1, 1]
    image, label = train[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and isinstance(label, int)


def test_without_transform_items_are_unit_range_chw_tensors(tmp_path):
    _image(tmp_path / "a" / "x.png", value=255, size=(5, 4))
    dataset = ImageFolderDataset.from_folder(tmp_path)
    image, label = dataset[0]
    assert image.shape == (3, 4, 5) and image.dtype == torch.float32 and label == 0
    assert torch.all(image == 1.0)


def test_extensions_are_case_insensitive_and_other_files_ignored(tmp_path):
    _image(tmp_path / "a" / "one.JPG")
    _image(tmp_path / "a" / "two.Png")
    _image(tmp_path / "a" / "nested" / "three.jpeg")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    _image(tmp_path / "a" / ".hidden" / "four.png")
    dataset = ImageFolderDataset.from_folder(tmp_path)
    assert sorted(path.name for path, _ in dataset.samples) == ["one.JPG", "three.jpeg", "two.Png"]


def test_val_fraction_split_is_stratified_and_deterministic(tmp_path):
    _folder(tmp_path, {"a": 10, "b": 20, "c": 5})
    train, val, classes = _build(tmp_path, val_fraction=0.2, seed=1)
    assert classes == ["a", "b", "c"]
    val_counts = np.bincount(val.targets, minlength=3).tolist()
    assert val_counts == [2, 4, 1]
    assert len(train) + len(val) == 35
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    again_train, again_val, _ = _build(tmp_path, val_fraction=0.2, seed=1)
    assert again_val.samples == val.samples and again_train.samples == train.samples
    _, other_val, _ = _build(tmp_path, val_fraction=0.2, seed=2)
    assert other_val.samples != val.samples


def test_split_keeps_at_least_one_image_on_each_side():
    samples = [(f"x{i}", 0) for i in range(2)] + [("y0", 1)]
    train, val = stratified_split(samples, 0.01, seed=0)
    assert len(val) == 1 and {label for _, label in train} == {0, 1}


def test_train_folder_without_val_folder_uses_val_fraction(tmp_path):
    _folder(tmp_path / "train", {"a": 5, "b": 5})
    train, val, _ = _build(tmp_path, val_fraction=0.4)
    assert len(train) == 6 and len(val) == 4


def test_no_val_folder_and_no_val_fraction_is_an_error(tmp_path):
    _folder(tmp_path, {"a": 2})
    with pytest.raises(UserError, match="data.val_fraction"):
        _build(tmp_path)


def test_missing_root_names_the_folder(tmp_path):
    with pytest.raises(UserError, match=r"data\.root: folder '.*nowhere' does not exist.*pipeline data synth"):
        _build(tmp_path / "nowhere", val_fraction=0.2)


def test_root_without_class_folders_is_an_error(tmp_path):
    _image(tmp_path / "loose.png")
    with pytest.raises(UserError, match="no class subfolders"):
        _build(tmp_path, val_fraction=0.2)


def test_single_class_hints_that_root_is_one_level_too_high(tmp_path):
    _folder(tmp_path / "classification" / "train", {"a": 2, "b": 2})
    with pytest.raises(UserError, match="single class folder 'classification'"):
        _build(tmp_path, val_fraction=0.5)


def test_empty_class_folder_names_the_folder(tmp_path):
    _folder(tmp_path, {"a": 2})
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match=r"class folder '.*b' holds no images"):
        _build(tmp_path, val_fraction=0.5)


def test_val_class_unknown_to_train_is_an_error(tmp_path):
    _folder(tmp_path / "train", {"a": 2, "b": 2})
    _folder(tmp_path / "val", {"a": 1, "zebra": 1})
    with pytest.raises(UserError, match="zebra"):
        _build(tmp_path)


def _with_bad_files(root):
    _folder(root, {"a": 4, "b": 4})
    (root / "a" / "broken.png").write_bytes(b"garbage, not a png")
    (root / "b" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    return root


def test_skip_bad_images_skips_and_logs_count(tmp_path, caplog):
    root = _with_bad_files(tmp_path)
    with caplog.at_level(logging.WARNING):
        train, val, _ = _build(root, val_fraction=0.25, skip_bad_images=True)
    assert len(train) + len(val) == 8
    assert "skipped 2 unreadable" in caplog.text and "broken.png" in caplog.text
    for dataset in (train, val):
        for index in range(len(dataset)):
            dataset[index]


def test_bad_image_without_skip_fails_naming_the_file(tmp_path):
    root = _with_bad_files(tmp_path)
    dataset = ImageFolderDataset.from_folder(root)
    assert len(dataset) == 10
    names = [path.name for path, _ in dataset.samples]
    with pytest.raises(UserError, match="broken.png"):
        dataset[names.index("broken.png")]


def test_unknown_format_is_an_error(tmp_path):
    with pytest.raises(UserError, match="data.format.*imagefolder"):
        _build(tmp_path, fmt="coco")


# ---------------------------------------------------------------------------------------------------------- CIFAR


def _batch(labels, label_key, protocol, path):
    # Real batches: a dict with b"data" (N, 3072) uint8 rows of channel planes R, G, B, plus labels and names.
    n = len(labels)
    data = np.empty((n, 3, 1024), dtype=np.uint8)
    data[:, 0] = np.arange(n, dtype=np.uint8)[:, None]
    data[:, 1] = 100
    data[:, 2] = 200
    batch = {b"batch_label": b"batch", label_key: list(labels), b"data": data.reshape(n, 3072),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def _cifar10(root, protocol=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {b"num_cases_per_batch": 3, b"label_names": [n.encode() for n in names], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    for index in range(1, 6):
        _batch([index, 9, 0], b"labels", protocol, folder / f"data_batch_{index}")
    _batch([3, 4], b"labels", protocol, folder / "test_batch")
    return names


def _cifar100(root, protocol=2):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = [f"class_{i:02d}" for i in range(100)]
    meta = {"fine_label_names": fine, "coarse_label_names": [f"super_{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    _batch([0, 99, 42, 7], b"fine_labels", protocol, folder / "train")
    _batch([5], b"fine_labels", protocol, folder / "test")
    return fine


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_shapes_labels_and_classes(tmp_path, protocol):
    names = _cifar10(tmp_path, protocol)
    train, val, classes = _build(tmp_path, fmt="cifar10")
    assert classes == names
    assert len(train) == 15 and len(val) == 2
    assert train.targets[:6] == [1, 9, 0, 2, 9, 0] and val.targets == [3, 4]
    image, label = train[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 9
    # Channel planes land in the right channels: R holds the index within the batch, G 100, B 200.
    torch.testing.assert_close(image[:, 5, 7], torch.tensor([1, 100, 200]) / 255.0)


def test_cifar10_root_may_be_the_batches_folder_itself(tmp_path):
    _cifar10(tmp_path)
    train, _, _ = _build(tmp_path / "cifar-10-batches-py", fmt="cifar10")
    assert len(train) == 15


def test_cifar100_uses_fine_labels(tmp_path):
    fine = _cifar100(tmp_path)
    transform = build_transforms([], field="data.train_transforms", mean=(0.5,) * 3, std=(0.5,) * 3)
    train, val, classes = _build(tmp_path, fmt="cifar100", train_transform=transform)
    assert classes == fine and len(classes) == 100
    assert train.targets == [0, 99, 42, 7] and val.targets == [5]
    image, label = train[2]
    assert image.shape == (3, 32, 32) and label == 42
    assert isinstance(val, CifarDataset)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    _cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"payload": _Exploit(marker)}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(UserError, match=r"data_batch_3.*(posix|os|nt)\.system"):
        _build(tmp_path, fmt="cifar10")
    assert not marker.exists()


def test_cifar_missing_without_download_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="cifar-100-python.*data.download"):
        _build(tmp_path, fmt="cifar100")


def test_cifar_corrupt_file_is_a_user_error(tmp_path):
    _cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="test_batch"):
        _build(tmp_path, fmt="cifar10")


# ---------------------------------------------------------------------------------------------------- decode cache


def _counting_reads(monkeypatch):
    from pipeline.tasks.classification import data as data_module
    reads = []
    original = data_module.read_rgb
    monkeypatch.setattr(data_module, "read_rgb", lambda path: reads.append(path) or original(path))
    return reads


def test_decoded_images_are_cached_within_the_budget(tmp_path, monkeypatch):
    _folder(tmp_path / "train", {"a": 3, "b": 3})
    _folder(tmp_path / "val", {"a": 1, "b": 1})
    flip = build_transforms([{"name": "HorizontalFlip", "p": 1.0}], field="data.train_transforms",
                            mean=(0, 0, 0), std=(1, 1, 1))
    one_image = 12 * 10 * 3
    train, val, _ = _build(tmp_path, train_transform=flip, cache_bytes=4 * one_image)
    reads = _counting_reads(monkeypatch)
    first = [train[i][0] for i in range(len(train))]
    assert len(reads) == 6
    reads.clear()
    again = [train[i][0] for i in range(len(train))]
    assert len(reads) == 2  # the four that fit the budget come from memory; the last two are decoded again
    for a, b in zip(first, again):
        assert torch.equal(a, b)  # a transform never sees (or changes) the cached array itself
    val[0], val[0]
    assert len(reads) == 3  # val has its own cache


def test_cache_off_reads_every_time(tmp_path, monkeypatch):
    _folder(tmp_path, {"a": 2, "b": 2})
    train, _, _ = _build(tmp_path, val_fraction=0.5, cache_bytes=0)
    reads = _counting_reads(monkeypatch)
    train[0], train[0]
    assert len(reads) == 2
