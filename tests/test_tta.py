"""Flip averaging (predict --tta, eval.tta): on an image that is its own mirror it changes no classification, it makes
a segmentation mirror-symmetric, it is what validation scores with eval.tta, and the other tasks refuse it in a line."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.tasks import registry
from pipeline.tasks.tta import FlipAveraged, flip_averaged_predict
from pipeline.train import builders, checkpoint, engine, runner
from pipeline.use import inference


def _checkpoint(name: str, folder: Path, uri: str, **data) -> Path:
    """A random-init model of task `name` on its tiny data, saved as the runner saves best.pt."""
    task = registry.get(name)
    sections = task.tiny(folder / "data")
    sections["data"].update(data)
    path = folder / "tasks" / f"{name}.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump({"task": name, **sections, "train": {"output_dir": str(folder / "out")},
                                    "tracking": {"uri": uri, "log_model": False}}))
    setup = runner.prepare(path)
    data = builders.build_data(setup)
    model = builders.build_model(setup, data.info).eval()
    ckpt = folder / "best.pt"
    checkpoint.save({"model": model.state_dict(), "config": setup.cfg.model_dump(mode="json"),
                     "info": data.info.to_dict(), "fit": {}, "run_id": None}, ckpt)
    return ckpt


def _symmetric(path: Path, size: int) -> Path:
    left = np.random.default_rng(0).integers(0, 256, (size, size // 2, 3), dtype=np.uint8)
    Image.fromarray(np.concatenate([left, left[:, ::-1]], axis=1)).save(path)
    return path


def _probs(folder: Path) -> dict[tuple[str, str], float]:
    with (folder / "predictions.csv").open() as f:
        return {(row["rank"], row["class"]): float(row["prob"]) for row in csv.DictReader(f)}


def test_a_mirror_symmetric_image_gets_the_same_classification_with_tta(tmp_path, uri):
    ckpt = _checkpoint("classification", tmp_path, uri, val_transforms=[{"name": "Resize", "height": 32, "width": 32}])
    image = _symmetric(tmp_path / "sym.png", 32)
    for args, out in (([], "plain"), (["--tta"], "tta")):
        result = CliRunner().invoke(main, ["predict", str(ckpt), str(image), "--out", str(tmp_path / out), *args])
        assert result.exit_code == 0, result.output
    plain, tta = _probs(tmp_path / "plain"), _probs(tmp_path / "tta")
    assert plain.keys() == tta.keys() and all(tta[k] == pytest.approx(plain[k], abs=1e-6) for k in plain)


def test_segmentation_tta_is_mirror_symmetric_on_a_symmetric_image(tmp_path, uri):
    ckpt = _checkpoint("segmentation", tmp_path, uri)
    plain = inference.open_session(str(ckpt), device="cpu")
    tta = inference.open_session(str(ckpt), device="cpu", tta=True)
    assert isinstance(tta.module, FlipAveraged)
    left = torch.randn(1, 3, 64, 32)
    image = torch.cat([left, left.flip(-1)], dim=-1)
    with torch.no_grad():
        once, averaged = plain.module(image), tta.module(image)
        assert not torch.allclose(once, once.flip(-1), atol=1e-4)  # a random model is no mirror itself
        assert torch.allclose(averaged, averaged.flip(-1), atol=1e-5)  # the average of it and its mirror is
        assert torch.allclose(averaged, (once + once.flip(-1)) / 2, atol=1e-5)
        any_image = torch.randn(2, 3, 64, 64)  # and for any image: the mirror's average is the average's mirror
        assert torch.allclose(tta.module(any_image.flip(-1)), tta.module(any_image).flip(-1), atol=1e-5)


@pytest.mark.parametrize("name", ["detection", "face"])
def test_tta_of_other_tasks_is_refused_in_one_line(name, tmp_path, uri):
    ckpt = _checkpoint(name, tmp_path, uri)
    image = _symmetric(tmp_path / "sym.png", 64)
    result = CliRunner().invoke(main, ["predict", str(ckpt), str(image), "--out", str(tmp_path / "p"), "--tta"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --tta: flip averaging is for classification and segmentation, not {name} (face "
                      "embeddings already add each image's mirror); leave it out"]


@pytest.mark.e2e
def test_eval_tta_scores_validation_on_the_averaged_outputs(task_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = task_file(train={"epochs": 1, "precision": "fp32"}, eval={"tta": True})
    result = runner.run(path)
    setup = runner.prepare(path)
    data = builders.build_data(setup)
    model = builders.build_model(setup, data.info)
    model.load_state_dict(checkpoint.load(result.output_dir / checkpoint.BEST)["model"])
    _, val = builders.loaders(setup.task, data.train, data.val, 16, 0, setup.device, 0)
    settings = builders.step_settings(setup)
    task = setup.task

    def top1(predict) -> float:
        return engine.evaluate(model, predict, task.make_evaluator(data.info), val, settings)["val/top1"]

    averaged = flip_averaged_predict(task.predict, task.mirror_outputs)
    assert result.best == pytest.approx(top1(averaged))
    batch = next(iter(val))
    model.eval()
    with torch.no_grad():
        by_hand = (model(batch[0]) + model(batch[0].flip(-1))) / 2
        assert torch.allclose(averaged(model, batch), by_hand, atol=1e-5)
