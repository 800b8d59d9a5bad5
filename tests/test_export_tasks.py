"""`pipeline export` for every task: ONNX and TorchScript files that take any batch size and compute what PyTorch does.

Each task's model is the session's trained run of it (tests/shared_runs.py), exported from its best checkpoint through
the CLI. The tests then run the ONNX file with onnxruntime themselves on images of the run's own data, at batch sizes
and image sizes the export did not use, compare with PyTorch by the task's own check, and show that the check rejects
outputs that are off.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.tasks import registry
from pipeline.tasks.detection.export import quiet_tracing
from pipeline.tasks.detection.roi_align import MultiScaleRoIAlign
from pipeline.tasks.export_checks import ExportMismatch
from pipeline.train import checkpoint
from pipeline.use import export, inference

# the first test also trains the four shared runs
pytestmark = pytest.mark.timeout(600)

TASKS = ("classification", "segmentation", "face", "detection")


@dataclass
class Case:
    checkpoint: Path  # the trained run's best.pt
    size: int  # its data.image_size
    per_image: tuple[int, ...]  # the shape of one image's output at that size, after the batch axis
    images: list[Path]  # images of its own data
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@pytest.fixture(scope="module")
def cases(trained_runs) -> dict[str, Case]:
    """The session's trained runs of every task (tests/shared_runs.py), as export sees them: their best checkpoints."""
    out = {}
    for name in TASKS:
        run = trained_runs(name)
        ckpt = checkpoint.load(run.checkpoint)
        size, classes = ckpt["config"]["data"]["image_size"], len(ckpt["info"]["classes"])
        model = ckpt["config"]["model"]
        per_image = {"classification": lambda: (classes,), "segmentation": lambda: (classes, size, size),
                     "face": lambda: (model["embedding_dim"],),
                     "detection": lambda: (model["box_detections_per_img"], 6)}[name]()
        out[name] = Case(run.checkpoint, size, per_image, run.images, tuple(ckpt["info"]["mean"]),
                         tuple(ckpt["info"]["std"]))
    return out


def batch_of(case: Case, batch: int, height: int, width: int) -> torch.Tensor:
    """`batch` images of the run's own data, resized to height x width and normalised as it was trained: what a
    trained model meets (a detector finds its shapes there, not in noise)."""
    images = []
    for i in range(batch):
        with Image.open(case.images[i % len(case.images)]) as image:
            pixels = np.asarray(image.convert("RGB").resize((width, height)), dtype=np.float32) / 255.0
        images.append((pixels - np.array(case.mean, np.float32)) / np.array(case.std, np.float32))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def torch_outputs(source: Path, images: torch.Tensor) -> list[np.ndarray]:
    loaded = inference.load(str(source))
    module = registry.get(loaded.cfg.task).inference_module(loaded.model).eval()
    with torch.no_grad():
        return [module(images).numpy()]


@pytest.mark.parametrize("name", TASKS)
def test_onnx_export_checks_and_runs_at_any_batch_size(name, cases, tmp_path: Path):
    case = cases[name]
    out = tmp_path / f"{name}.onnx"
    result = cli("export", case.checkpoint, "--format", "onnx", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (onnx, dynamic batch" in result.output and "on (2, 3, " in result.output
    if name == "detection":  # export checks on seeded random images, where a trained detector may find nothing:
        # it says which (the images of its own data below must then compare boxes, not only emptiness)
        assert " matched (same category" in result.output or "(only empty outputs compared)" in result.output
    spec = registry.get(name).export
    size = case.size
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(spec.output_names)
    for batch, width in ((1, size), (5, size - 16 if spec.dynamic_size else size)):  # export checked 2 and 1 or 3
        images = batch_of(case, batch, size, width)
        if name == "detection":  # noise between its scenes: images with and without detections in one batch
            images[1::2] = torch.randn(images[1::2].shape, generator=torch.Generator().manual_seed(1))
        actual = session.run(None, {"images": images.numpy()})
        per_image = case.per_image if name != "segmentation" else (case.per_image[0], size, width)
        assert actual[0].shape == (batch, *per_image)
        spec.check([torch_outputs(case.checkpoint, images)], [actual])
    if name == "detection":  # boxes were compared: images with different numbers of detections, in one batch
        counts = (actual[0][..., 5] != -1).sum(axis=1).tolist()
        assert max(counts) > 0 and len(set(counts)) > 1, counts


@pytest.mark.parametrize("name", TASKS)
def test_torchscript_export_checks_and_loads(name, cases, tmp_path: Path):
    case = cases[name]
    out = tmp_path / f"{name}.pt"
    result = cli("export", case.checkpoint, "--format", "torchscript", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (torchscript, dynamic batch" in result.output
    images = batch_of(case, 3, case.size, case.size)
    with torch.no_grad():
        actual = [export.load_torchscript(out)(images).numpy()]
    registry.get(name).export.check([torch_outputs(case.checkpoint, images)], [actual])


def test_the_sizes_each_task_takes(cases, tmp_path: Path):
    """Classification, segmentation and detection take any image size; face flattens a fixed-size map, says so."""
    for name in ("segmentation", "face"):
        size = cases[name].size
        result = export.run(str(cases[name].checkpoint), "onnx", tmp_path / f"{name}.onnx")
        assert result.dynamic_size == (name == "segmentation")
        assert result.checked_shapes == ([(2, 3, size, size), (1, 3, 2 * size, size)] if result.dynamic_size
                                         else [(2, 3, size, size), (3, 3, size, size)])
    # segmentation logits come back at the input's size, whatever it is
    session = onnxruntime.InferenceSession(str(tmp_path / "segmentation.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": batch_of(cases["segmentation"], 2, 40, 56).numpy()})
    assert logits.shape == (2, cases["segmentation"].per_image[0], 40, 56)


@pytest.mark.parametrize("name", TASKS)
def test_each_check_rejects_outputs_that_are_off(name, cases):
    case = cases[name]
    images = batch_of(case, 2, case.size, case.size)
    expected = torch_outputs(case.checkpoint, images)
    check = registry.get(name).export.check
    check([expected], [[expected[0].copy()]])  # identical outputs pass
    off = expected[0].copy()
    if name == "detection":
        assert (off[..., 5] != -1).any(), "the trained detector should find boxes in its own scenes"
        off[..., :4] += 3.0  # every box 3 px away
    elif name == "segmentation":
        off = -off  # the least likely class wins every pixel
    else:
        off += np.random.default_rng(0).normal(0, 0.05, off.shape).astype(off.dtype)
    with pytest.raises(ExportMismatch):
        check([expected], [[off]])


def test_detection_check_tolerates_a_swap_at_the_score_cut_only():
    def rows(*dets):
        out = np.zeros((4, 6), np.float32)
        out[:, 5] = -1
        out[:len(dets)] = dets
        return [out[None]]

    a, b, c = [0, 0, 10, 10, 0.9, 3], [20, 20, 30, 30, 0.5, 7], [5, 5, 25, 25, 0.5002, 3]
    check = registry.get("detection").export.check
    # two near-equal scores at the bottom: rounding may keep either one
    assert "at the score cut" in check([rows(a, b)], [rows(a, c)]).summary
    with pytest.raises(ExportMismatch, match="score 0.9000 has no match"):
        check([rows(a, b)], [rows(b)])


def test_traced_pooler_takes_any_number_of_boxes_per_level(tmp_path: Path):
    """Export traces the FPN pooler once, on whatever proposals the example image gives: the graph must then pool any
    split of boxes over the levels. Traced with one box on the coarser level, it runs with none and with several."""
    class Pool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = MultiScaleRoIAlign(["p2", "p3"], [4, 8], output_size=2)

        def forward(self, p2, p3, boxes):
            return self.pool({"p2": p2, "p3": p3}, [boxes], [(128, 128)])

    def squares(*sizes):  # boxes under 112 px pool from stride 4, larger ones from stride 8 (FPN paper, eq. 1)
        return torch.tensor([[1.0, 2.0, 1.0 + s, 2.0 + s] for s in sizes])

    generator = torch.Generator().manual_seed(0)
    p2, p3 = torch.randn(1, 4, 32, 32, generator=generator), torch.randn(1, 4, 16, 16, generator=generator)
    module, path = Pool().eval(), tmp_path / "pool.onnx"
    with quiet_tracing():
        torch.onnx.export(module, (p2, p3, squares(20, 30, 120)), str(path), dynamo=False,
                          opset_version=export.ONNX_OPSET, input_names=["p2", "p3", "boxes"],
                          dynamic_axes={"boxes": {0: "boxes"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for boxes in (squares(20, 30), squares(120, 125, 20), squares(120)):
        (pooled,) = session.run(None, {"p2": p2.numpy(), "p3": p3.numpy(), "boxes": boxes.numpy()})
        np.testing.assert_allclose(pooled, module(p2, p3, boxes).numpy(), rtol=1e-5, atol=1e-6)


def test_unknown_format_is_a_one_line_error(cases):
    result = cli("export", cases["classification"].checkpoint, "--format", "tflite")
    assert result.exit_code == 1
    assert result.output.strip() == "error: --format tflite: unknown format; use one of onnx, torchscript"
