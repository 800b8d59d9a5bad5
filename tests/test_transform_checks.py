"""Transforms follow the config and are checked at start: train and val images come out at data.image_size, and
validation transforms that would corrupt a detection or segmentation metric are refused in one line."""
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from PIL import Image

from pipeline.cli import main
from pipeline.data import transform_checks
from pipeline.errors import UserError
from pipeline.models import backbones
from pipeline.tasks import registry
from pipeline.tasks.detection.config import DetectionData
from pipeline.tasks.segmentation.config import SegmentationData
from pipeline.tasks.segmentation.metrics import Evaluator
from pipeline.train import builders, runner

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "tasks" / "quickstart.yaml"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
EXPERIMENT = "transform-checks"


def image_folder(root: Path, width: int, height: int) -> Path:
    """An ImageFolder of two classes, three train and one val image each, all width x height."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 1)):
        for label in ("dark", "light"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 128, (height, width, 3)) + (127 if label == "light" else 0)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def quickstart_data(tmp_path: Path, overrides: list[str]):
    """The quickstart's config and datasets through the runner's own stages, on the data its overrides name."""
    setup = runner.prepare(QUICKSTART, [f"train.output_dir={tmp_path / 'out'}", *overrides])
    return builders.build_data(setup)


# -- the size check -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width, height, size", [(32, 32, 32), (64, 64, 64), (150, 100, 150)],
                         ids=["32px", "64px", "150x100px"])
def test_quickstart_follows_image_size_on_any_image_size(tmp_path, width, height, size):
    root = image_folder(tmp_path / "images", width, height)
    data = quickstart_data(tmp_path, [f"data.root={root}", f"data.image_size={size}"])
    assert data.train[0][0].shape == data.val[0][0].shape == (3, size, size)


def test_mismatched_specs_are_refused_naming_both_and_the_sizes(tmp_path):
    root = image_folder(tmp_path / "images", 64, 64)
    with pytest.raises(UserError) as err:
        quickstart_data(tmp_path, [f"data.root={root}", "data.image_size=40",
                                   "data.val_transforms=[{name: Resize, height: 64, width: 64}]"])
    message = str(err.value)
    assert "\n" not in message
    assert "data.train_transforms give 40x40" in message and "data.val_transforms give 64x64" in message
    assert "data.image_size=40" in message


def test_specs_that_agree_but_miss_image_size_are_refused(tmp_path):
    root = image_folder(tmp_path / "images", 64, 48)
    resize = "[{name: Resize, height: 48, width: 64}]"  # the images' own size, not data.image_size
    with pytest.raises(UserError, match=r"give 64x48 images and data.val_transforms give 64x48, but the model is "
                                        r"configured for data.image_size=64 \(64x64\)"):
        quickstart_data(tmp_path, [f"data.root={root}", "data.image_size=64", f"data.train_transforms={resize}",
                                   f"data.val_transforms={resize}"])


def test_the_probe_leaves_augmentation_as_a_run_without_it_would_see(tmp_path):
    root = image_folder(tmp_path / "images", 64, 64)
    checked = quickstart_data(tmp_path, [f"data.root={root}"]).train  # item 0 went through the random shift
    setup = runner.prepare(QUICKSTART, [f"data.root={root}"])
    mean, std = backbones.pretrained_mean_std(setup.cfg.model.backbone.name)
    unchecked = registry.get("classification").build_data(setup.cfg.data, mean=mean, std=std, seed=setup.cfg.seed).train
    assert torch.equal(checked[1][0], unchecked[1][0])  # (feature caching reads views this way, without reseeding)


# -- the CLI: one line, exit 1, the run FAILED ------------------------------------------------------------------------

def _one_error_line(result, culprit: str) -> str:
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and culprit in errors[0], result.output
    assert "Traceback" not in result.output
    return errors[0]


def _only_run(uri: str):
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 1
    return runs[0]


def _common(tmp_path: Path, uri: str) -> list[str]:
    return [f"train.output_dir={tmp_path / 'out'}", f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}",
            "tracking.log_model=false", "model.backbone.weights=none", "data.num_workers=0"]


@pytest.mark.e2e
def test_quickstart_at_40_px_trains_and_logs_the_resolved_config(shapes, uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", str(QUICKSTART), f"data.root={shapes}", "data.image_size=40",
                                       "train.epochs=1", *_common(tmp_path, uri)])
    assert result.exit_code == 0, result.output
    run = _only_run(uri)
    assert run.info.status == "FINISHED"
    logged = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="config.yaml", dst_path=str(tmp_path / "logged"), tracking_uri=uri)
    ).read_text())
    resize = {"name": "Resize", "height": 40, "width": 40}  # ${data.image_size}, resolved with its type
    assert logged["data"]["train_transforms"][0] == resize and logged["data"]["val_transforms"] == [resize]


def test_quickstart_with_a_64_px_val_resize_at_40_is_refused(shapes, uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", str(QUICKSTART), f"data.root={shapes}", "data.image_size=40",
                                       "data.val_transforms=[{name: Resize, height: 64, width: 64}]",
                                       *_common(tmp_path, uri)])
    line = _one_error_line(result, "data.val_transforms give 64x64")
    assert "data.train_transforms give 40x40" in line
    run = _only_run(uri)
    assert run.info.status == "FAILED" and "data.val_transforms give 64x64" in run.data.tags["error"]


def test_detection_shapes_with_a_flip_in_validation_is_refused(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # refused before the synthetic scenes would be generated here
    result = CliRunner().invoke(main, ["run", str(REPO / "tasks" / "detection_shapes.yaml"),
                                       "data.val_transforms=[{name: HorizontalFlip, p: 1.0}]", *_common(tmp_path, uri)])
    _one_error_line(result, "data.val_transforms[0]: HorizontalFlip moves pixels")
    run = _only_run(uri)
    assert run.info.status == "FAILED" and "data.val_transforms[0]: HorizontalFlip" in run.data.tags["error"]
    assert not (tmp_path / "data").exists()


# -- which validation transforms detection and segmentation accept ---------------------------------------------------

@pytest.mark.parametrize("spec", [
    [{"name": "HorizontalFlip", "p": 1.0}],
    [{"name": "CenterCrop", "height": 64, "width": 64}],
    [{"name": "PadIfNeeded", "min_height": 256, "min_width": 256}],
    [{"name": "Rotate", "limit": 10}],
    [{"name": "Affine", "scale": 1.2, "p": 1.0}],
    [{"name": "Resize", "height": 96, "width": 96}, {"name": "OneOf", "transforms": [{"name": "VerticalFlip"}]}],
], ids=["flip", "crop", "pad", "rotate", "affine", "flip-inside-a-composition"])
def test_detection_refuses_geometric_validation_transforms(spec):
    with pytest.raises(UserError, match=r"^data.val_transforms\[\d\](.transforms\[0\])?: \w+ moves pixels, and "
                                        r"detection validation maps predictions back only through") as err:
        transform_checks.check_val_spec(registry.get("detection"), DetectionData(val_transforms=spec))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec", [
    None,  # the task's default
    [],
    [{"name": "Resize", "height": 96, "width": 128}],
    [{"name": "LongestMaxSize", "max_size": 96}, {"name": "ColorJitter", "p": 1.0}],  # pixel-level: moves nothing
    [{"name": "SmallestMaxSize", "max_size": 96}],
])
def test_detection_accepts_resizes_and_pixel_level_validation_transforms(spec):
    transform_checks.check_val_spec(registry.get("detection"), DetectionData(val_transforms=spec))


def test_segmentation_accepts_its_default_and_refuses_flips_and_pads_that_count():
    task = registry.get("segmentation")
    transform_checks.check_val_spec(task, SegmentationData())  # longest side to image_size, padded with ignore
    with pytest.raises(UserError, match=r"data.val_transforms\[0\]: HorizontalFlip moves pixels"):
        transform_checks.check_val_spec(task, SegmentationData(val_transforms=[{"name": "HorizontalFlip"}]))
    for pad in ({}, {"fill_mask": 255, "border_mode": 4}):  # padded with class 0, or with mirrored labels
        spec = [{"name": "PadIfNeeded", "min_height": 64, "min_width": 64, **pad}]
        with pytest.raises(UserError, match=r"data.val_transforms\[0\]: PadIfNeeded pads masks with"):
            transform_checks.check_val_spec(task, SegmentationData(val_transforms=spec))


def test_segmentation_padding_leaves_the_metric_exactly_as_without_it():
    """Why segmentation validation may pad: the default validation transform pads masks with ignore_index, so the
    scores of a padded image equal those of the image alone, whatever is predicted on the padding."""
    data = SegmentationData(image_size=32, ignore_index=255)
    _, val_tf, _ = registry.get("segmentation").transforms(data, mean=MEAN, std=STD, seed=0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 32, 3), dtype=np.uint8)  # landscape: padded above and below
    mask = rng.integers(0, 3, (20, 32)).astype(np.uint8)
    mask[0, :4] = 255  # the image's own ignored pixels stay ignored
    out = val_tf(image=image, mask=mask)
    padded = torch.as_tensor(out["mask"]).long()
    assert out["image"].shape[-2:] == padded.shape == (32, 32)
    rows = (padded != 255).any(dim=1).nonzero().flatten()
    top = int(rows[0])
    assert torch.equal(padded[top:top + 20], torch.from_numpy(mask).long())  # the original, unmoved
    assert (padded[:top] == 255).all() and (padded[top + 20:] == 255).all()

    logits = torch.from_numpy(rng.normal(size=(1, 3, 20, 32))).float()  # an imperfect prediction
    wrong_on_padding = torch.zeros(1, 3, 32, 32)
    wrong_on_padding[:, 1] = 10.0  # class 1 everywhere on the padding
    wrong_on_padding[:, :, top:top + 20] = logits
    alone, with_padding = Evaluator(["a", "b", "c"], 255), Evaluator(["a", "b", "c"], 255)
    alone.update(logits, (torch.zeros(1, 3, 20, 32), torch.from_numpy(mask).long()[None]))
    with_padding.update(wrong_on_padding, (out["image"][None], padded[None]))
    a, b = alone.compute(), with_padding.compute()
    assert np.array_equal(a["confusion"], b["confusion"])
    for key in ("val/mIoU", "val/pixel_acc", "val/mean_acc", "val/loss"):
        assert a[key] == pytest.approx(b[key], abs=1e-6)
