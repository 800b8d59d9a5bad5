"""Face data: identity folders, LFW pairs.txt (both line forms), insightface .bin files read without running code,
and the clear one-line errors for bad input. Every fixture is written by the tests."""
import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import config
from pipeline.data.transforms import build_transforms
from pipeline.errors import UserError
from pipeline.tasks.face.data import VerificationDataset, load_verification, read_bin, scan_identities


def _image(value: int, size: int = 16) -> Image.Image:
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[:, : size // 2] = value  # left half bright: a flip moves it
    return Image.fromarray(array)


def _lfw(root: Path, lines: list[str], people=("Ann_A", "Bob_B", "Cy_C"), per_person: int = 3) -> Path:
    folder = root / "lfw"
    for k, person in enumerate(people):
        (folder / person).mkdir(parents=True, exist_ok=True)
        for i in range(1, per_person + 1):
            _image(40 * k + i).save(folder / person / f"{person}_{i:04d}.jpg")
    (folder / "pairs.txt").write_text("\n".join(lines) + "\n")
    return folder


def _encoded(value: int) -> bytes:
    buffer = io.BytesIO()
    _image(value).save(buffer, format="PNG")
    return buffer.getvalue()


MATCHED = ["Ann_A\t1\t2", "Bob_B\t1\t3"]
MISMATCHED = ["Ann_A\t1\tBob_B\t2", "Cy_C\t3\tAnn_A\t2"]


def test_pairs_file_parses_both_line_forms(tmp_path: Path):
    _lfw(tmp_path, ["5\t2"] + (MATCHED + MISMATCHED) * 3)  # the header line names folds and pairs per fold
    pairs = load_verification(tmp_path, "lfw")
    assert pairs.issame.tolist() == [True, True, False, False] * 3
    names = [p.name for p in pairs.images]
    first = [(names[a], names[b]) for a, b in pairs.pairs[:4]]
    assert first == [("Ann_A_0001.jpg", "Ann_A_0002.jpg"), ("Bob_B_0001.jpg", "Bob_B_0003.jpg"),
                     ("Ann_A_0001.jpg", "Bob_B_0002.jpg"), ("Cy_C_0003.jpg", "Ann_A_0002.jpg")]
    assert len(names) == len(set(names)) == 6  # each image listed once, however many pairs use it


def test_pairs_file_errors_name_the_line_and_the_missing_image(tmp_path: Path):
    _lfw(tmp_path, MATCHED * 5 + ["Ann_A\t1\tx"])
    with pytest.raises(UserError, match=r"pairs.txt:11: cannot parse 'Ann_A\s+1\s+x'"):
        load_verification(tmp_path, "lfw")
    _lfw(tmp_path, MATCHED * 5 + ["Ann_A\t1\t9"])
    with pytest.raises(UserError, match=r"pairs.txt:11: pair image '.*Ann_A_0009.jpg' is missing"):
        load_verification(tmp_path, "lfw")
    with pytest.raises(UserError, match=r"set 'agedb_30' not found: expected .*agedb_30.bin.*agedb_30/pairs.txt"):
        load_verification(tmp_path, "agedb_30")


def test_bin_file_reads_and_the_dataset_yields_each_image_and_its_flip(tmp_path: Path):
    flags = [True, False] * 5
    (tmp_path / "cfp_fp.bin").write_bytes(pickle.dumps(([_encoded(10 * i) for i in range(20)], flags), protocol=4))
    pairs = load_verification(tmp_path, "cfp_fp")
    assert pairs.issame.tolist() == flags and pairs.pairs[3].tolist() == [6, 7]
    dataset = VerificationDataset([pairs], build_transforms([], field="t", mean=(0, 0, 0), std=(1, 1, 1)))
    assert len(dataset) == 40
    image, item = dataset[6]
    flipped, flipped_item = dataset[7]
    assert (item, flipped_item) == (6, 7)
    assert torch.equal(flipped, image.flip(-1)) and not torch.equal(flipped, image)
    assert image[0, 0, 0].item() == pytest.approx(30 / 255)  # image 3, left half


def test_bin_written_by_python3_pickle_protocol_2_reads(tmp_path: Path):
    # Protocol 2 stores Python 3 bytes through _codecs.encode, the one global the reader allows.
    (tmp_path / "lfw.bin").write_bytes(pickle.dumps(([_encoded(i) for i in range(20)], [True, False] * 5), protocol=2))
    assert len(read_bin(tmp_path / "lfw.bin", "lfw").images) == 20


class _RunsCode:
    """Unpickling this object would call os.system: what a crafted .bin could do to an unrestricted reader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_bin_reader_refuses_a_pickle_that_carries_code(tmp_path: Path):
    marker = tmp_path / "pwned"
    payload = ([_encoded(1), _RunsCode(marker)], [True])
    (tmp_path / "lfw.bin").write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(UserError, match=r"lfw.bin' is not a plain data pickle: it asks to run "
                                        r"(posix|os|nt)\.system, which is refused"):
        read_bin(tmp_path / "lfw.bin", "lfw")
    assert not marker.exists()
    # the same file through an unrestricted pickle.load would have run the command
    pickle.loads((tmp_path / "lfw.bin").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("content", [{"images": []}, ([b"x"] * 3, [True]), ([1, 2], [True]), ([b"x", b"y"], "no")])
def test_bin_of_the_wrong_structure_is_a_clear_error(tmp_path: Path, content):
    (tmp_path / "lfw.bin").write_bytes(pickle.dumps(content))
    with pytest.raises(UserError, match="not a pair \\(list of encoded images, list of is-same flags\\)"):
        read_bin(tmp_path / "lfw.bin", "lfw")


def test_bin_with_a_broken_image_names_it(tmp_path: Path):
    (tmp_path / "lfw.bin").write_bytes(pickle.dumps(([b"not an image"] * 20, [True, False] * 5)))
    dataset = VerificationDataset([read_bin(tmp_path / "lfw.bin", "lfw")], lambda image: {"image": image})
    with pytest.raises(UserError, match=r"lfw.bin': image 0 is corrupt"):
        dataset[0]


def test_identity_folders_drop_small_identities_with_a_count(tmp_path: Path, caplog):
    for name, count in (("alice", 3), ("bob", 1), ("carol", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):
            _image(i).save(tmp_path / name / f"{i}.png")
    with caplog.at_level(logging.WARNING):
        samples, identities = scan_identities(tmp_path, min_images=2)
    assert identities == ["alice", "carol"] and [label for _, label in samples] == [0, 0, 0, 1, 1]
    assert "dropped 1 of 3 identities with fewer than 2 images" in caplog.text
    (tmp_path / "dave").mkdir()
    with pytest.raises(UserError, match=r"identity folder '.*dave' holds no images"):
        scan_identities(tmp_path, min_images=1)


def test_config_errors_are_one_line(tmp_path: Path):
    base = {"task": "face", "model": {"embedding_dim": 0}}
    with pytest.raises(UserError, match=r"model.embedding_dim: 0 is not allowed"):
        config.validate(base)
    with pytest.raises(UserError, match="m1, m2, m3 are for type: combined"):
        config.validate({"task": "face", "model": {"margin": {"type": "arcface", "m2": 0.3}}})
    cfg = config.validate({"task": "face", "model": {"margin": {"type": "combined", "m3": 0.1}}})
    assert cfg.model.margin.margins() == (1.0, 0.3, 0.1)
