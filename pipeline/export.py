"""`pipeline export`: write a trained model as ONNX or TorchScript, then check the file against PyTorch.

The check runs the exported file (ONNX through onnxruntime, TorchScript through `torch.jit.load`) and the PyTorch model
on the same random images and requires every output to match within `TOLERANCE`; when the graph takes any image size,
a second check runs one image at a different size, which proves the dynamic axes work.

What a task exports is its part of the task contract (pipeline/tasks/base.py): `inference_module(model)` takes an
image batch and returns tensors, and `export` names the outputs and says whether the graph takes any image size.
"""
from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from pipeline import predict, tracking
from pipeline.errors import UserError
from pipeline.tasks.registry import TASKS

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
# float32 on CPU: onnxruntime and TorchScript differ from eager PyTorch by accumulation order only, about 1e-6 of
# the output scale for a ResNet; anything near these bounds is a wrong graph, not rounding.
TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}
ONNX_OPSET = 18
# The exporter needs these at run time; the `export` extra installs them.
_ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: float  # the largest difference between exported and PyTorch outputs over the checks
    checked_shapes: list[tuple[int, ...]]
    dynamic_size: bool
    logged_to: str | None  # the run the file was logged to


def run(source: str, fmt: Format, out: str | Path | None = None, uri: str | None = None, log_to_run: bool = False,
        say=print) -> ExportResult:
    """Export the model behind `source` (checkpoint, run id or models:/ URI) and check it; optionally log it."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown format; use one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require_onnx()
    # a models:/ source is rebuilt from its run's checkpoint (same weights): the logged graph has a fixed image size
    loaded = predict.load(source, uri, logged_model=False)
    task = TASKS[loaded.cfg.task]
    spec = task.export
    module = task.inference_module(loaded.model).eval()
    size = loaded.cfg.data.image_size
    path = Path(out) if out else Path(f"{loaded.cfg.model.backbone.name}{SUFFIX[fmt]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    checks = check_inputs(size, spec.dynamic_size)
    if fmt == "onnx":
        to_onnx(module, checks[0], path, spec.output_names, spec.dynamic_size)
        diff = max(compare(_torch_outputs(module, x), onnx_outputs(path, x)) for x in checks)
    else:
        to_torchscript(module, checks[0], path)
        scripted = load_torchscript(path)
        diff = max(compare(_torch_outputs(module, x), _torch_outputs(scripted, x)) for x in checks)
    size_note = "any image size" if spec.dynamic_size else f"{size}x{size} images only"
    say(f"wrote {path} ({fmt}, dynamic batch, {size_note}); outputs match PyTorch within rtol "
        f"{TOLERANCE['rtol']:g}, atol {TOLERANCE['atol']:g} (max abs diff {diff:.2e}) on "
        f"{', '.join(str(tuple(x.shape)) for x in checks)}")
    logged_to = _log(loaded, path, say) if log_to_run else None
    return ExportResult(path, diff, [tuple(x.shape) for x in checks], spec.dynamic_size, logged_to)


def check_inputs(size: int, dynamic_size: bool) -> list[torch.Tensor]:
    """Seeded random images: the export example (a batch of 2, since torch.export would fix a batch of 1 as the
    only size), then a batch of another size, and at another image size when the graph takes any."""
    generator = torch.Generator().manual_seed(0)
    other = (1, 3, size + 32, size + 32) if dynamic_size else (3, 3, size, size)
    return [torch.randn(2, 3, size, size, generator=generator), torch.randn(*other, generator=generator)]


def _require_onnx() -> None:
    missing = [name for name in _ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--format onnx needs {', '.join(missing)}; install them with "
                        "pip install 'resnet-transfer-pipeline[export]' (or use --format torchscript)")


def _log(loaded: predict.Loaded, path: Path, say) -> str:
    if not loaded.run_id:
        raise UserError("--log-to-run: the checkpoint names no MLflow run; export from the run id instead")
    tracking.Tracker.attach(loaded.uri, loaded.run_id).log_artifact(path, "export")
    say(f"logged {path.name} to run {loaded.run_id} (artifacts: export/)")
    return loaded.run_id


# ---------------------------------------------------------------------------------------------------------------------
# Writers


def to_onnx(module: nn.Module, example: torch.Tensor, path: Path, output_names: tuple[str, ...],
            dynamic_size: bool) -> None:
    """ONNX through torch.export (the dynamo exporter), batch dynamic, height and width too when `dynamic_size`."""
    axes = {0: torch.export.Dim("batch")}
    if dynamic_size:
        axes |= {2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    # external_data=False: one self-contained file (protobuf's 2 GB limit is far above any ResNet)
    torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["images"],
                      output_names=list(output_names), dynamic_shapes=(axes,), opset_version=ONNX_OPSET,
                      external_data=False, verbose=False)


def to_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """A traced TorchScript module. Tracing records the ops, not the shapes, so a ResNet takes any batch and size."""
    with _jit_is_wanted():
        # check_trace re-runs and diffs the graph (3 s for a resnet18); the output check after export covers it
        traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(str(path))


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with _jit_is_wanted():
        return torch.jit.load(str(path))


@contextmanager
def _jit_is_wanted() -> Iterator[None]:
    # torch marks jit as deprecated in favour of torch.export; TorchScript is asked for by name here, and is still
    # what libtorch (C++) and many serving stacks load, so the warning would only be noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


# ---------------------------------------------------------------------------------------------------------------------
# Checks


def _torch_outputs(module: nn.Module, images: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(images)
    return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]


def onnx_outputs(path: Path, images: torch.Tensor) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})


def compare(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """The largest absolute difference; raises when any output is off by more than `TOLERANCE`."""
    if len(expected) != len(actual):
        raise RuntimeError(f"export check: the exported model returns {len(actual)} outputs, PyTorch {len(expected)}")
    worst = 0.0
    for i, (e, a) in enumerate(zip(expected, actual)):
        if e.shape != a.shape or not np.allclose(a, e, **TOLERANCE):
            diff = float(np.abs(a - e).max()) if e.shape == a.shape else float("inf")
            raise RuntimeError(f"export check: output {i} differs from PyTorch (shapes {a.shape} vs {e.shape}, max "
                               f"abs diff {diff:.3g}, tolerance rtol {TOLERANCE['rtol']}, atol {TOLERANCE['atol']})")
        worst = max(worst, float(np.abs(a - e).max()))
    return worst
