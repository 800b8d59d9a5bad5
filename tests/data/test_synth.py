import hashlib
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.data import shapes, synth
from pipeline.errors import UserError


def _digest(root):
    sha = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            sha.update(str(path.relative_to(root)).encode())
            sha.update(path.read_bytes())
    return sha.hexdigest()


def test_layout_and_counts(tmp_path):
    root = synth.generate(tmp_path / "shapes", image_size=32, train_per_class=3, val_per_class=2)
    assert root == tmp_path / "shapes" / "classification"
    assert "shapes" in (tmp_path / "shapes" / "README.txt").read_text()
    for split, count in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(synth.SHAPES)
        for kind in synth.SHAPES:
            files = sorted((root / split / kind).glob("*.png"))
            assert len(files) == count
            with Image.open(files[0]) as img:
                assert img.mode == "RGB" and img.size == (32, 32)
    assert not list(tmp_path.glob("shapes/.*"))  # no scratch folder left behind


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    args = dict(image_size=32, train_per_class=2, val_per_class=1)
    first = _digest(synth.generate(tmp_path / "a", seed=3, **args))
    again = _digest(synth.generate(tmp_path / "b", seed=3, **args))
    other = _digest(synth.generate(tmp_path / "c", seed=4, **args))
    assert first == again
    assert first != other


def test_existing_output_needs_overwrite(tmp_path):
    synth.generate(tmp_path, image_size=16, train_per_class=1, val_per_class=1)
    with pytest.raises(UserError, match="already exists"):
        synth.generate(tmp_path, image_size=16, train_per_class=1, val_per_class=1)
    synth.generate(tmp_path, image_size=16, train_per_class=2, val_per_class=1, overwrite=True)
    assert len(list((tmp_path / "classification" / "train" / "star").iterdir())) == 2


def test_ensure_generates_only_when_missing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(shapes.KINDS, "classification", lambda out, seed, overwrite: calls.append(out))
    (tmp_path / "have" / "classification" / "train").mkdir(parents=True)
    assert shapes.ensure(tmp_path / "have", "classification") == tmp_path / "have" / "classification"
    assert calls == []
    shapes.ensure(tmp_path / "missing", "classification")
    assert calls == [tmp_path / "missing"]


def test_runs_started_together_generate_once_and_both_get_the_data(tmp_path, monkeypatch):
    calls = []

    def slow_generate(out, seed, overwrite):  # a generation that takes a while, as the real ones do
        calls.append(out)
        time.sleep(0.5)
        (out / "classification" / "train").mkdir(parents=True)

    monkeypatch.setitem(shapes.KINDS, "classification", slow_generate)
    roots = []
    threads = [threading.Thread(target=lambda: roots.append(shapes.ensure(tmp_path, "classification")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [tmp_path]
    assert roots == [tmp_path / "classification"] * 2


def test_two_processes_ensuring_one_dataset_both_succeed(tmp_path):
    """Two `pipeline run`s of the quickstart started at once: before the lock, they shared one scratch folder and one
    of them died with FileExistsError."""
    code = ("import sys; from pathlib import Path; from pipeline.data import shapes; "
            "root = shapes.ensure(Path(sys.argv[1]), 'classification'); print(len(list(root.rglob('*.png'))))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["1500", "1500"]  # 6 classes x (200 train + 50 val)
    assert not list(tmp_path.glob(".classification.partial*"))


def test_a_place_the_data_cannot_be_written_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(UserError, match=r"data.root: the synthetic classification data cannot be written under '.*file/"
                                        r"shapes' \(.*\); point data.root at a folder you can write to"):
        shapes.ensure(blocker / "shapes", "classification")


def test_mean_colour_does_not_predict_the_class(tmp_path):
    root = synth.generate(tmp_path, image_size=32, train_per_class=40, val_per_class=1)
    means = {kind: np.stack([np.asarray(Image.open(p), dtype=np.float64).mean(axis=(0, 1))
                             for p in sorted((root / "train" / kind).glob("*.png"))])
             for kind in synth.SHAPES}
    class_means = np.stack([m.mean(axis=0) for m in means.values()])
    within_spread = np.mean([m.std(axis=0).mean() for m in means.values()])
    between_spread = class_means.std(axis=0).mean()
    assert between_spread < 0.25 * within_spread
    # A nearest-class-mean classifier on mean RGB stays near chance (1/6).
    hits = sum(int(np.argmin(np.linalg.norm(class_means - x, axis=1)) == label)
               for label, m in enumerate(means.values()) for x in m)
    assert hits / (40 * len(synth.SHAPES)) < 0.35


@pytest.mark.parametrize("kind", synth.SHAPES)
def test_draw_shape_returns_polygon_and_box_matching_the_pixels(kind):
    background = np.zeros((64, 64, 3), dtype=np.uint8)
    image, drawn = synth.draw_shape(background, kind, center=(30.0, 34.0), radius=20.0, angle=0.3,
                                    color=(255, 255, 255))
    assert background.max() == 0  # input untouched
    polygon = np.array(drawn.polygon)
    x, y, w, h = drawn.bbox
    assert np.all(polygon >= np.array([x, y]) - 1e-9) and np.all(polygon <= np.array([x + w, y + h]) + 1e-9)
    assert np.linalg.norm(polygon - [30, 34], axis=1).max() == pytest.approx(20.0)
    # Painted area (anti-aliased coverage) matches the polygon's shoelace area.
    xs, ys = polygon[:, 0], polygon[:, 1]
    area = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
    assert image[:, :, 0].sum() / 255.0 == pytest.approx(area, rel=0.03)
    assert tuple(image[34, 30]) == (255, 255, 255)
    rows, cols = np.nonzero(image[:, :, 0])
    assert cols.min() >= math.floor(x) and cols.max() <= math.ceil(x + w)
    assert rows.min() >= math.floor(y) and rows.max() <= math.ceil(y + h)


def test_shapes_are_clearly_lighter_than_their_background():
    for index in range(50):
        rng = np.random.default_rng(index)
        shape, background = synth.random_colors(rng)
        luma = np.array([0.299, 0.587, 0.114])
        assert np.all(np.dot(shape, luma) - background @ luma >= synth.MIN_CONTRAST - 1e-6)


def test_generating_says_where_and_how_big(tmp_path, monkeypatch, said):
    def two_files(out, seed, overwrite):
        (out / "classification" / "train").mkdir(parents=True)
        for name in ("a.png", "b.png"):
            (out / "classification" / "train" / name).write_bytes(b"x" * 2**19)

    monkeypatch.setitem(shapes.KINDS, "classification", two_files)
    shapes.ensure(tmp_path, "classification")
    assert said == [f"generating the synthetic classification dataset in {tmp_path / 'classification'} (first use; "
                    "later runs reuse it) ...",
                    f"wrote 2 files, 1.0 MB, in {tmp_path / 'classification'}"]
    shapes.ensure(tmp_path, "classification")  # there: nothing to say
    assert len(said) == 2
