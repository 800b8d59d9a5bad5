"""`pipeline export` for every task: ONNX and TorchScript files that take any batch size and compute what PyTorch does.

Each task's model is built untrained (random init, resnet18, small images) and saved as the runner saves a checkpoint;
export runs through the CLI. The tests then run the ONNX file with onnxruntime themselves, at batch sizes the export
did not use, compare with PyTorch by the task's own check, and show that the check rejects outputs that are off.
"""
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.tasks import registry
from pipeline.tasks.base import DataInfo
from pipeline.tasks.detection.export import quiet_tracing
from pipeline.tasks.detection.roi_align import MultiScaleRoIAlign
from pipeline.tasks.export_checks import ExportMismatch
from pipeline.train import checkpoint
from pipeline.use import export, inference

BACKBONE = {"name": "resnet18", "weights": "none"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Per task: config sections, what the data would say, and the shape of one image's output (after the batch axis).
CASES = {
    "classification": ({"data": {"image_size": 32}, "model": {"backbone": BACKBONE}},
                       {"classes": ["a", "b", "c"]}, (3,)),
    "segmentation": ({"data": {"image_size": 32}, "model": {"backbone": BACKBONE, "atrous_rates": [1, 2, 3]}},
                     {"classes": ["background", "circle", "square"], "ignore_index": 255}, (3, 32, 32)),
    "face": ({"data": {"image_size": 32}, "model": {"backbone": BACKBONE, "embedding_dim": 16}},
             {"classes": ["p0", "p1", "p2"]}, (16,)),
    # The detector resizes the short side to 64 px (long side up to 128: another aspect ratio gives another anchor
    # grid); few proposals and detections keep it quick. The score threshold leaves images with different numbers of
    # detections (see `checkpoints`), so exported outputs are padded differently per image.
    "detection": ({"data": {"image_size": 48},
                   "model": {"backbone": BACKBONE, "frozen_bn": False, "min_size": 64, "max_size": 128,
                             "fpn_channels": 32, "representation_size": 64, "rpn_pre_nms_top_n_test": 200,
                             "rpn_post_nms_top_n_test": 50, "box_detections_per_img": 8, "box_score_thresh": 0.7}},
                  {"classes": ["circle", "square"], "category_ids": [3, 7]}, (8, 6)),
}


@pytest.fixture(scope="module")
def checkpoints(module_dir: Path) -> dict[str, Path]:
    """One untrained checkpoint per task, in the runner's format (engine._save plus stages' extras)."""
    folder = module_dir
    paths = {}
    for name, (sections, data, _) in CASES.items():
        task = registry.get(name)
        cfg = registry.entry(name).schema.model_validate({"task": name, **sections})
        info = DataInfo(classes=data["classes"], train_size=10, val_size=4, mean=MEAN, std=STD,
                        image_size=cfg.data.image_size, facts=task.facts.from_dict(data) if task.facts else None)
        torch.manual_seed(0)
        model = task.build_model(cfg.model, info)
        if name == "detection":  # untrained class scores are all near 1/3: spread them as training would
            with torch.no_grad():
                model.roi_heads.box_predictor.cls_score.weight *= 20
        paths[name] = folder / f"{name}.pt"
        checkpoint.save({"model": model.state_dict(), "fit": {}, "run_id": None,
                         "config": cfg.model_dump(mode="json"), "info": info.to_dict()}, paths[name])
    return paths


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def torch_outputs(source: Path, images: torch.Tensor) -> list[np.ndarray]:
    loaded = inference.load(str(source))
    module = registry.get(loaded.cfg.task).inference_module(loaded.model).eval()
    with torch.no_grad():
        return [module(images).numpy()]


@pytest.mark.parametrize("name", CASES)
def test_onnx_export_checks_and_runs_at_any_batch_size(name, checkpoints, tmp_path: Path):
    out = tmp_path / f"{name}.onnx"
    result = cli("export", checkpoints[name], "--format", "onnx", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (onnx, dynamic batch" in result.output and "on (2, 3, " in result.output
    assert name != "detection" or " matched (same category" in result.output  # boxes compared, not only emptiness
    spec = registry.get(name).export
    size = CASES[name][0]["data"]["image_size"]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(spec.output_names)
    generator = torch.Generator().manual_seed(1)
    for batch, width in ((1, size), (5, size - 16 if spec.dynamic_size else size)):  # export checked 2 and 1 or 3
        images = torch.randn(batch, 3, size, width, generator=generator)
        actual = session.run(None, {"images": images.numpy()})
        per_image = CASES[name][2] if name != "segmentation" else (3, size, width)
        assert actual[0].shape == (batch, *per_image)
        spec.check([torch_outputs(checkpoints[name], images)], [actual])
    if name == "detection":  # images with different numbers of detections, in one batch
        assert len(set((actual[0][..., 5] != -1).sum(axis=1).tolist())) > 1


@pytest.mark.parametrize("name", CASES)
def test_torchscript_export_checks_and_loads(name, checkpoints, tmp_path: Path):
    out = tmp_path / f"{name}.pt"
    result = cli("export", checkpoints[name], "--format", "torchscript", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (torchscript, dynamic batch" in result.output
    size = CASES[name][0]["data"]["image_size"]
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        actual = [export.load_torchscript(out)(images).numpy()]
    registry.get(name).export.check([torch_outputs(checkpoints[name], images)], [actual])


def test_the_sizes_each_task_takes(checkpoints, tmp_path: Path):
    """Classification, segmentation and detection take any image size; face flattens a fixed-size map, says so."""
    for name, note in (("segmentation", "any image size"), ("face", "32x32 images only")):
        result = export.run(str(checkpoints[name]), "onnx", tmp_path / f"{name}.onnx")
        assert result.dynamic_size == (note == "any image size")
        assert result.checked_shapes == ([(2, 3, 32, 32), (1, 3, 64, 32)] if result.dynamic_size
                                         else [(2, 3, 32, 32), (3, 3, 32, 32)])
    # segmentation logits come back at the input's size, whatever it is
    session = onnxruntime.InferenceSession(str(tmp_path / "segmentation.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": np.random.default_rng(0).standard_normal((2, 3, 40, 56), np.float32)})
    assert logits.shape == (2, 3, 40, 56)


@pytest.mark.parametrize("name", CASES)
def test_each_check_rejects_outputs_that_are_off(name, checkpoints):
    size = CASES[name][0]["data"]["image_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    expected = torch_outputs(checkpoints[name], images)
    check = registry.get(name).export.check
    check([expected], [[expected[0].copy()]])  # identical outputs pass
    off = expected[0].copy()
    if name == "detection":
        assert (off[..., 5] != -1).any(), "the untrained detector should still find boxes"
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


def test_unknown_format_is_a_one_line_error(checkpoints):
    result = cli("export", checkpoints["classification"], "--format", "tflite")
    assert result.exit_code == 1
    assert result.output.strip() == "error: --format tflite: unknown format; use one of onnx, torchscript"
