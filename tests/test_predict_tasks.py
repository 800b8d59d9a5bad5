"""`pipeline predict` for detection, segmentation and face, and `pipeline verify`, from MLflow run ids.

The session's runs of these tasks (tests/shared_runs.py) are the sources. Inputs mix sizes and pixel formats: a square
scene, a wide crop of it and that crop at twice the size, grayscale, RGBA and 16-bit copies, and a file that is not an
image.
"""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from PIL import Image

from pipeline.cli import main
from pipeline.data import synth_coco
from pipeline.errors import UserError
from pipeline.tasks.base import Placement
from pipeline.tasks.detection import predictions as detection_predictions
from pipeline.tasks.face import identify
from pipeline.tasks.segmentation import predictions as segmentation_predictions
from pipeline.tasks.segmentation.report import palette

# the first test also trains three shared runs
pytestmark = pytest.mark.timeout(600)

SHAPE_NAMES = {cid: name for name, cid in synth_coco.CATEGORY_IDS.items()}
TASKS = ("detection", "segmentation", "face")


@pytest.fixture(scope="module")
def runs(trained_runs, module_dir: Path) -> dict:
    """The session's detection, segmentation and face runs (tests/shared_runs.py): one store, trained once."""
    trained = {name: trained_runs(name) for name in TASKS}
    return {"uri": trained["face"].uri, "ids": {name: run.run_id for name, run in trained.items()},
            "scenes": trained["detection"].data, "faces": trained["face"].data, "folder": module_dir,
            "embedding_dim": int(MlflowClient(trained["face"].uri).get_run(trained["face"].run_id)
                                 .data.params["model.embedding_dim"])}


def _inputs(folder: Path, source: Path) -> dict[str, Path]:
    """Test images made from `source`: the image, a wide crop and the crop at twice the size (pixels repeated, so a
    resize back halves it exactly), grayscale, RGBA, 16-bit grayscale, and a broken file."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.asarray(Image.open(source).convert("RGB"))
    h, w = rgb.shape[:2]
    wide = rgb[h // 4: h // 4 + (h * 5) // 8]  # e.g. 40 x 64
    files = {"square": rgb, "wide": wide, "wide2x": wide.repeat(2, axis=0).repeat(2, axis=1)}
    paths = {}
    for name, pixels in files.items():
        paths[name] = folder / f"{name}.png"
        Image.fromarray(pixels).save(paths[name])
    paths["gray"] = folder / "gray.png"
    Image.fromarray(rgb).convert("L").save(paths["gray"])
    paths["rgba"] = folder / "rgba.png"
    Image.fromarray(np.dstack([rgb, np.full((h, w), 255, np.uint8)])).save(paths["rgba"])
    paths["deep"] = folder / "deep.png"  # 16-bit grayscale (PIL mode I;16)
    Image.fromarray(np.asarray(Image.open(paths["gray"])).astype(np.uint16) * 257).save(paths["deep"])
    paths["broken"] = folder / "broken.png"
    paths["broken"].write_bytes(b"not a png")
    return paths


@pytest.fixture(scope="module")
def inputs(runs) -> dict[str, dict[str, Path]]:
    scene = sorted((runs["scenes"] / "images" / "val").glob("*.png"))[0]
    face = sorted((runs["faces"] / "holdout").rglob("*.jpg"))[0]
    images = _inputs(runs["folder"] / "inputs_scene", scene)
    return {"detection": images, "segmentation": images, "face": _inputs(runs["folder"] / "inputs_face", face)}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    return errors[0]


def _predict(runs, inputs, task: str, out: Path, *extra):
    images = inputs[task]
    result = cli("predict", runs["ids"][task], *images.values(), "--out", out, "--uri", runs["uri"], "--batch-size", 3,
                 *extra)
    assert result.exit_code == 0, result.output
    # the broken file is named and counted; every other format is converted and predicted
    assert "skipped 1 unreadable files" in result.output and "broken.png" in result.output
    assert "predicted 6 images" in result.output
    return [p for name, p in images.items() if name != "broken"]


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.height, image.width


# ---------------------------------------------------------------------------------------------------------------------
# Each task's files, from a run id


def test_detection_writes_coco_results_in_original_pixels_and_drawn_boxes(runs, inputs, tmp_path):
    good = _predict(runs, inputs, "detection", tmp_path, "--score", "0.1")
    results = json.loads((tmp_path / "predictions.json").read_text())
    assert results and {r["image_id"] for r in results} <= set(range(len(good)))
    for r in results:
        assert SHAPE_NAMES[r["category_id"]] == r["category"]  # the annotation file's own ids and names
        x, y, w, h = r["bbox"]
        height, width = _size(Path(r["file_name"]))
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= width + 0.01 and y + h <= height + 0.01
        assert 0.0 <= r["score"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "boxes").iterdir()) == sorted(p.name for p in good)
    assert _size(tmp_path / "boxes" / "wide2x.png") == _size(inputs["detection"]["wide2x"])
    # the doubled crop is resized to the crop's own size (its pixels halve exactly): the detector sees the same
    # image, and its boxes come back at twice the coordinates
    boxes = {name: sorted((r["score"], r["bbox"]) for r in results if Path(r["file_name"]).stem == name)
             for name in ("wide", "wide2x")}
    assert len(boxes["wide"]) == len(boxes["wide2x"]) > 0
    for (score, small), (score2, big) in zip(boxes["wide"], boxes["wide2x"]):
        assert score2 == pytest.approx(score, abs=1e-3)
        np.testing.assert_allclose(big, 2 * np.array(small), atol=0.1)


def test_segmentation_writes_palette_masks_at_original_size_and_overlays(runs, inputs, tmp_path):
    good = _predict(runs, inputs, "segmentation", tmp_path)
    classes = json.loads((tmp_path / "classes.json").read_text())
    assert [c["name"] for c in classes][0] == "background" and len(classes) == 7
    colors = (palette(7) * 255).round().astype(int)
    for path in good:
        mask_path = tmp_path / "masks" / path.name
        with Image.open(mask_path) as mask:
            assert mask.mode == "P"
            assert np.array_equal(np.array(mask.getpalette()[:21]).reshape(7, 3), colors)
            values = np.asarray(mask)
        assert values.shape == _size(path) and values.max() < 7  # the padded square input is undone
        assert _size(tmp_path / "overlays" / path.name) == _size(path)
    assert _size(tmp_path / "masks" / "wide.png") == (40, 64)


def test_face_writes_unit_embeddings_in_input_order(runs, inputs, tmp_path):
    good = _predict(runs, inputs, "face", tmp_path)
    embeddings = np.load(tmp_path / "embeddings.npy")
    names = (tmp_path / "embeddings.txt").read_text().splitlines()
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(good), runs["embedding_dim"])
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert names == [str(p) for p in good]
    # grayscale, RGBA and 16-bit copies of one image are the same pixels: the same embedding
    by_name = dict(zip((Path(n).stem for n in names), embeddings))
    assert by_name["gray"] @ by_name["deep"] == pytest.approx(1.0, abs=1e-4)
    assert by_name["square"] @ by_name["rgba"] == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Face: verify and galleries


def test_verify_an_image_and_itself_is_same_with_the_runs_threshold(runs, inputs):
    image = inputs["face"]["square"]
    for source in (runs["ids"]["face"], f"runs:/{runs['ids']['face']}"):
        result = cli("verify", source, image, inputs["face"]["rgba"], "--uri", runs["uri"])  # the same pixels
        assert result.exit_code == 0, result.output
        line = result.stdout.strip().splitlines()[-1]  # stderr has MLflow's download progress
        assert line.startswith("same (score 1.0000, threshold ") and line.endswith(")"), line


def test_gallery_names_the_identity_of_a_gallery_image_and_writes_embeddings(runs, tmp_path):
    holdout = sorted(p for p in (runs["faces"] / "holdout").iterdir() if p.is_dir())
    gallery = tmp_path / "gallery"
    for identity in holdout:
        (gallery / identity.name).mkdir(parents=True)
        shutil.copy(sorted(identity.glob("*.jpg"))[0], gallery / identity.name)
    probes = [sorted(identity.glob("*.jpg"))[0] for identity in holdout]
    out = tmp_path / "out"
    result = cli("predict", runs["ids"]["face"], *probes, "--out", out, "--gallery", gallery, "--uri", runs["uri"])
    assert result.exit_code == 0, result.output
    with (out / "identities.csv").open() as f:
        rows = list(csv.DictReader(f))
    # each probe is its identity's only gallery image: it is that identity, at score 1
    assert [(r["file"], r["identity"]) for r in rows] == [(str(p), p.parent.name) for p in probes]
    assert all(float(r["score"]) == pytest.approx(1.0, abs=1e-4) for r in rows)
    assert np.load(out / "embeddings.npy").shape == (len(probes), runs["embedding_dim"])


def test_gallery_answers_unknown_below_the_threshold():
    gallery = identify.Gallery(["a", "b"], np.eye(2, 3, dtype=np.float32), threshold=0.5)
    probes = np.array([[0.96, 0.28, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    assert gallery.nearest(probes) == [("a", pytest.approx(0.96)), (identify.UNKNOWN, 0.0)]


def test_threshold_is_the_best_epochs_mean_over_sets_and_missing_is_an_error():
    fit = {"best_epoch": 2, "history": [{"val/lfw/threshold": 0.9}, {"val/lfw/threshold": 0.2,
                                                                    "val/cfp/threshold": 0.4, "val/lfw/acc": 0.8}]}
    assert identify.threshold(fit, "x") == pytest.approx(0.3)
    with pytest.raises(UserError, match="holds no verification threshold"):
        identify.threshold({"best_epoch": 0, "history": []}, "best.pt")


# ---------------------------------------------------------------------------------------------------------------------
# Geometry: outputs back in the original pixels


def test_detection_boxes_undo_padding_and_resize():
    # a 100 x 50 image resized to 64 x 32 and padded by 16 rows above: input box (8, 24, 40, 40) is (12.5, 12.5, 62.5,
    # 37.5) in the original; unused rows stay zero
    place = Placement(height=50, width=100, box=(0.0, 16.0, 64.0, 48.0))
    outputs = torch.tensor([[[8.0, 24.0, 40.0, 40.0, 0.9, 5.0], [0.0, 0.0, 0.0, 0.0, 0.0, -1.0]]])
    mapped = detection_predictions.to_original(outputs, [place])
    torch.testing.assert_close(mapped[0, 0], torch.tensor([12.5, 12.5, 62.5, 37.5, 0.9, 5.0]))
    torch.testing.assert_close(mapped[0, 1, :5], torch.zeros(5))


def test_segmentation_logits_undo_padding_at_the_original_size():
    # class 1 on the left half of a 40 x 64 image padded to 64 x 64 (12 rows each side); padding scores class 2
    logits = torch.zeros(1, 3, 64, 64)
    logits[0, 2] = 5.0
    logits[0, 2, 12:52] = 0.0
    logits[0, 1, 12:52, :32] = 5.0
    (mapped,) = segmentation_predictions.to_original(logits, [Placement(40, 64, (0.0, 12.0, 64.0, 52.0))])
    mask = mapped.argmax(0)
    assert mask.shape == (40, 64) and set(mask.unique().tolist()) == {0, 1}
    assert (mask[:, :32] == 1).all() and (mask[:, 32:] == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line each


@pytest.mark.parametrize("task", TASKS)
def test_bad_score_and_an_out_that_is_a_file_fail_in_one_line(runs, inputs, task, tmp_path):
    image = inputs[task]["square"]
    error = one_error(cli("predict", runs["ids"][task], image, "--out", tmp_path / "o", "--score", "1.5",
                          "--uri", runs["uri"]))
    assert "--score 1.5: must be within 0..1" in error
    taken = tmp_path / "taken"
    taken.write_text("a file")
    error = one_error(cli("predict", runs["ids"][task], image, "--out", taken, "--uri", runs["uri"]))
    assert f"--out '{taken}' is a file" in error


@pytest.mark.parametrize("task", ("detection", "segmentation"))
def test_verify_and_gallery_refuse_a_source_of_another_task(runs, inputs, task, tmp_path):
    source = runs["ids"][task]
    image = inputs[task]["square"]
    error = one_error(cli("verify", source, image, image, "--uri", runs["uri"]))
    assert error == f"error: {source} is a {task} run; verify needs a face model"
    error = one_error(cli("predict", source, image, "--out", tmp_path, "--gallery", tmp_path, "--uri", runs["uri"]))
    assert error == f"error: {source} is a {task} run; --gallery needs a face model"


def test_verify_names_a_missing_or_unreadable_image(runs, inputs, tmp_path):
    face = inputs["face"]
    error = one_error(cli("verify", runs["ids"]["face"], face["square"], tmp_path / "nosuch.png", "--uri", runs["uri"]))
    assert "nosuch.png' does not exist" in error
    error = one_error(cli("verify", runs["ids"]["face"], face["broken"], face["square"], "--uri", runs["uri"]))
    assert "broken.png' is corrupt, truncated or not an image" in error
