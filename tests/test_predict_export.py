"""`pipeline predict` and `pipeline export` round trips from a checkpoint, a run id and a models:/ URI.

The session's classification run (tests/shared_runs.py: resnet18, 32 px, model logged) is the source; the other
tasks' predict and export are in test_predict_tasks.py and test_export_tasks.py.
"""
import csv
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime
import pytest
import torch
from click.testing import CliRunner

from pipeline import tracking
from pipeline.cli import main
from pipeline.data.images import read_rgb
from pipeline.data.transforms import build_transforms
from pipeline.tasks import export_checks
from pipeline.use import export, inference

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module")
def trained(trained_runs):
    """The session's classification run (tests/shared_runs.py): resnet18 at 32 px with its stem frozen (a frozen
    prefix trains under no_grad: the logged model must still export and load), model and checkpoint logged."""
    run = trained_runs("classification")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run.folder)
        yield {"uri": run.uri, "run_id": run.run_id, "checkpoint": run.checkpoint, "model_uri": run.model_uri,
               "folder": run.folder, "images": run.data / "val"}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def read_predictions(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_predict_from_checkpoint_run_and_logged_model_agree(trained, tmp_path: Path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    outputs = {}
    for name, source in (("ckpt", trained["checkpoint"]), ("run", trained["run_id"]), ("model", trained["model_uri"])):
        result = cli("predict", source, trained["images"], bad, "--out", tmp_path / name, "--top-k", "3",
                     "--batch-size", "16", "--uri", trained["uri"])
        assert result.exit_code == 0, result.output
        assert "skipped 1 unreadable files" in result.output and "broken.png" in result.output
        outputs[name] = read_predictions(tmp_path / name / "predictions.csv")
    rows = outputs["ckpt"]
    n_images = len(list(trained["images"].rglob("*.png")))
    assert len(rows) == 3 * n_images and [r["rank"] for r in rows[:3]] == ["1", "2", "3"]
    for other in ("run", "model"):
        assert [(r["file"], r["class"]) for r in outputs[other]] == [(r["file"], r["class"]) for r in rows]
        assert np.allclose([float(r["prob"]) for r in outputs[other]], [float(r["prob"]) for r in rows], atol=1e-5)
    # the top-1 row is the checkpoint model's own answer on the image, through the val transforms
    loaded = inference.load(str(trained["checkpoint"]))
    first = Path(rows[0]["file"])
    transform = build_transforms([{"name": "Resize", "height": 32, "width": 32}], field="t",
                                 mean=loaded.cfg.data.mean or (0.485, 0.456, 0.406),
                                 std=loaded.cfg.data.std or (0.229, 0.224, 0.225))
    with torch.no_grad():
        probs = loaded.model(transform(image=read_rgb(first))["image"][None]).softmax(1)[0]
    assert rows[0]["class"] == loaded.info.classes[int(probs.argmax())]
    assert float(rows[0]["prob"]) == pytest.approx(float(probs.max()), abs=1e-5)


def test_onnx_export_matches_pytorch_at_another_size_and_is_logged(trained, tmp_path: Path):
    out = tmp_path / "model.onnx"
    result = export.run(trained["run_id"], "onnx", out, uri=trained["uri"], log_to_run=True)
    assert result.agreement.worst <= export_checks.TOLERANCE["atol"] and result.dynamic_size
    # an independent check: a batch of 3 at 48 px, neither of which the export saw
    images = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = inference.load(str(trained["checkpoint"])).model(images).numpy()
    assert logits.shape == (3, 6)
    np.testing.assert_allclose(logits, expected, **export_checks.TOLERANCE)
    artifacts = mlflow.MlflowClient(trained["uri"]).list_artifacts(trained["run_id"], "export")
    assert [a.path for a in artifacts] == ["export/model.onnx"]


def test_torchscript_export_from_the_logged_model_uri(trained, tmp_path: Path):
    out = tmp_path / "model.pt"
    result = cli("export", trained["model_uri"], "--format", "torchscript", "--out", out, "--uri", trained["uri"])
    assert result.exit_code == 0, result.output
    assert "any image size" in result.output and "max abs diff" in result.output
    scripted = export.load_torchscript(out)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), inference.load(str(trained["checkpoint"])).model(images))


def test_run_without_checkpoint_and_unknown_sources_are_one_line_errors(trained, tmp_path: Path):
    with tracking.Tracker.start(trained["uri"], "empty", "empty", params={}, tags={}) as empty:
        pass  # a run that never saved a checkpoint (e.g. it failed while loading data)
    cases = [
        (("predict", empty.run_id, trained["images"]), f"run {empty.run_id} has no artifact 'checkpoints/best.pt'"),
        (("predict", "0123456789abcdef0123456789abcdef", trained["images"]), "is not in tracking store"),
        (("predict", tmp_path / "nosuch" / "best.pt", trained["images"]), "nosuch/best.pt' not found"),
        (("predict", "models:/m-nosuch", trained["images"]), "model 'models:/m-nosuch' is not in tracking store"),
        (("predict", trained["checkpoint"], tmp_path / "nothing*.png"), "nothing*.png' matches no files"),
        (("predict", trained["checkpoint"], tmp_path / "nothing.png"), "nothing.png' does not exist"),
        (("predict", trained["checkpoint"], tmp_path), "holds no image files"),
        (("export", empty.run_id), "has no artifact 'checkpoints/best.pt'"),
    ]
    for args, expected in cases:
        extra = ("--out", tmp_path / "o") if args[0] == "predict" else ()
        result = cli(*args, *extra, "--uri", trained["uri"])
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 1 and len(errors) == 1 and expected in errors[0], (args, result.output)
