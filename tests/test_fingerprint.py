"""The data version a run records: the digest follows the files a split reads, not where the dataset lies."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.data import fingerprint, synth_coco, synth_faces
from pipeline.tasks.classification.data import build_datasets
from pipeline.train import builders, describe, runner


def splits(root: Path):
    train, val, _ = build_datasets(root, "imagefolder", val_fraction=0.0, seed=0, train_transform=None,
                                   val_transform=None, skip_bad_images=False, download=False)
    return train, val


def digests(root: Path) -> tuple[str, str]:
    return tuple(fingerprint.digest(ds.files(), root, len(ds)) for ds in splits(root))


def test_digest_follows_the_files_not_the_folder(shapes: Path, tmp_path: Path):
    train, val = splits(shapes)
    assert train.files() == [path for path, _ in train.samples]  # what the split reads, nothing else
    original = digests(shapes)
    assert original[0] != original[1]
    copy = tmp_path / "copy"
    shutil.copytree(shapes, copy)
    assert digests(copy) == original  # moved or copied: the same data
    image = next((copy / "val").rglob("*.png"))
    image.write_bytes(image.read_bytes() + b"\0")  # one val file changed in size
    resized = digests(copy)
    assert resized[0] == original[0] and resized[1] != original[1]
    shutil.copy(image, image.with_name("extra.png"))  # one val file added
    assert len(splits(copy)[1].files()) == len(val) + 1 and digests(copy)[1] not in resized


def test_cifar_in_memory_lists_the_batches_it_was_read_from(tmp_path: Path):
    from pipeline.tasks.classification.cifar import cifar_files
    from pipeline.tasks.classification.data import CifarDataset

    folder = tmp_path / "cifar-10-batches-py"
    train, test = cifar_files(folder, "cifar10", train=True), cifar_files(folder, "cifar10", train=False)
    assert [p.name for p in train] == ["batches.meta", *(f"data_batch_{i}" for i in range(1, 6))]
    assert [p.name for p in test] == ["batches.meta", "test_batch"]
    dataset = CifarDataset(np.zeros((4, 32, 32, 3), dtype=np.uint8), np.zeros(4, dtype=np.int64), ["a"], None, test)
    assert dataset.files() == test


@pytest.fixture(scope="module")
def scenes_and_faces(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fingerprint")
    return {"coco": synth_coco.generate(folder, image_size=64, train_images=4, val_images=2),
            "faces": synth_faces.generate(folder, image_size=32, train_identities=4, images_per_identity=4,
                                          holdout_identities=4, holdout_images=3, pairs_per_fold=1)}


@pytest.mark.parametrize("task, data", [
    ("detection", {"root": "coco", "image_size": 64}),
    ("segmentation", {"root": "coco", "format": "coco", "image_size": 64}),
    ("face", {"root": "faces", "verification": ["holdout"], "image_size": 32}),
])
def test_every_task_records_the_files_each_split_reads(task, data, scenes_and_faces, tmp_path: Path, uri: str):
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump({
        "task": task, "data": {**data, "root": str(scenes_and_faces[data["root"]]), "num_workers": 0},
        "model": {"backbone": {"name": "resnet18", "weights": "none"}},
        "train": {"output_dir": str(tmp_path / "out")}, "tracking": {"uri": uri}}))
    setup = runner.prepare(path)
    built = builders.build_data(setup)
    assert all(split.files() for split in (built.train, built.val))
    train, val = describe.dataset_records(setup.cfg.data.root, built.train, built.val)
    assert (train.context, val.context) == ("training", "validation") and train.digest != val.digest
    assert (train.rows, val.rows) == (len(built.train), len(built.val))
