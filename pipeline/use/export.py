"""`pipeline export`: write a trained model as ONNX or TorchScript, then check the file against PyTorch.

The check runs the exported file (ONNX through onnxruntime, TorchScript through `torch.jit.load`) and the PyTorch model
on the same seeded random images, at two batch sizes, and at another image size when the graph takes any size (which
proves the dynamic axes work); it compares the outputs by the task's measure (pipeline/tasks/export_checks.py): logits
number by number, segmentation by the class of each pixel, embeddings by cosine, detections by matched boxes.

What a task exports is its part of the task contract (pipeline/tasks/base.py): `inference_module(model)` takes an
image batch and returns tensors, and `export` names the outputs, says whether the graph takes any image size, how it
is checked, and (detection) how the module becomes TorchScript where tracing alone cannot export it.
"""
from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from pipeline import tracking
from pipeline.errors import UserError
from pipeline.tasks import saved
from pipeline.tasks.export_checks import Agreement, ExportMismatch
from pipeline.use import inference

log = logging.getLogger(__name__)

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
ONNX_OPSET = 18
# The exporter needs these at run time; the `export` extra installs them.
_ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


@dataclass
class ExportResult:
    path: Path
    agreement: Agreement  # the check's summary and worst value over all checked batches
    checked_shapes: list[tuple[int, ...]]
    dynamic_size: bool
    logged_to: str | None  # the run the file was logged to


def run(source: str, fmt: Format, out: str | Path | None = None, uri: str | None = None, log_to_run: bool = False,
) -> ExportResult:
    """Export the model behind `source` (checkpoint, run id or models:/ URI) and check it; optionally log it."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown format; use one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require_onnx()
    # a models:/ source is rebuilt from its run's checkpoint: the logged model's weights, as a plain torch module
    loaded = inference.load(source, uri)
    task = loaded.saved.task
    spec = task.export
    # stock operations only (torchvision's RoIAlign, plain convolutions): what ONNX and TorchScript can express
    module = task.inference_module(saved.inference_ready(loaded.model)).eval()
    size = loaded.cfg.data.image_size
    path = Path(out) if out else Path(f"{loaded.cfg.model.backbone.name}{SUFFIX[fmt]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    checks = check_inputs(size, spec.dynamic_size)
    # a module that tracing alone cannot export (detection's loop over images) comes scripted from its task
    graph = spec.script(module, checks[0]) if spec.script is not None else module
    if fmt == "onnx":
        to_onnx(graph, checks[0], path, spec.output_names, spec.dynamic_size)
        exported = [onnx_outputs(path, x) for x in checks]
    else:
        to_torchscript(graph, checks[0], path)
        scripted = load_torchscript(path)
        exported = [_torch_outputs(scripted, x) for x in checks]
    try:
        agreement = spec.check([_torch_outputs(module, x) for x in checks], exported)
    except ExportMismatch as err:
        path.unlink(missing_ok=True)  # a file that computes something else must not be picked up by mistake
        raise ExportMismatch(f"{err} (on {_shapes(checks)}; {path} deleted)") from None
    size_note = "any image size" if spec.dynamic_size else f"{size}x{size} images only"
    log.info(f"wrote {path} ({fmt}, dynamic batch, {size_note}); {agreement.summary} on {_shapes(checks)}")
    logged_to = _log(loaded, path) if log_to_run else None
    return ExportResult(path, agreement, [tuple(x.shape) for x in checks], spec.dynamic_size, logged_to)


def check_inputs(size: int, dynamic_size: bool) -> list[torch.Tensor]:
    """Seeded random images: the export example (a batch of 2, since torch.export would fix a batch of 1 as the
    only size), then a batch of another size, and at another image size when the graph takes any (taller than wide,
    so that height and width each prove dynamic)."""
    generator = torch.Generator().manual_seed(0)
    other = (1, 3, size + 32, size) if dynamic_size else (3, 3, size, size)
    return [torch.randn(2, 3, size, size, generator=generator), torch.randn(*other, generator=generator)]


def _shapes(images: list[torch.Tensor]) -> str:
    return ", ".join(str(tuple(x.shape)) for x in images)


def _require_onnx() -> None:
    missing = [name for name in _ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--format onnx needs {', '.join(missing)}; install them with "
                        "pip install 'resnet-transfer-pipeline[export]' (or use --format torchscript)")


def _log(loaded: inference.Loaded, path: Path) -> str:
    if not loaded.run_id:
        raise UserError("--log-to-run: the checkpoint names no MLflow run; export from the run id instead")
    tracking.Tracker.attach(loaded.uri, loaded.run_id).log_artifact(path, "export")
    log.info(f"logged {path.name} to run {loaded.run_id} (artifacts: export/)")
    return loaded.run_id


# ---------------------------------------------------------------------------------------------------------------------
# Writers


def to_onnx(module: nn.Module, example: torch.Tensor, path: Path, output_names: tuple[str, ...],
            dynamic_size: bool) -> None:
    """ONNX with the batch dynamic, and height and width too when `dynamic_size`: through torch.export (the dynamo
    exporter), or for a scripted module through the TorchScript-based exporter, which turns its loops into ONNX Loops
    (torch.export cannot export detection's data-dependent NMS)."""
    if isinstance(module, torch.jit.ScriptModule):
        axes = {0: "batch"} | ({2: "height", 3: "width"} if dynamic_size else {})
        with _jit_is_wanted(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["images"],
                              output_names=list(output_names), opset_version=ONNX_OPSET,
                              dynamic_axes={"images": axes} | {name: {0: "batch"} for name in output_names})
        return
    dims = {0: torch.export.Dim("batch")}
    if dynamic_size:
        dims |= {2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    # external_data=False: one self-contained file (protobuf's 2 GB limit is far above any ResNet)
    torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["images"],
                      output_names=list(output_names), dynamic_shapes=(dims,), opset_version=ONNX_OPSET,
                      external_data=False, verbose=False)


def to_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """A traced TorchScript module (tracing records the ops, not the shapes, so a ResNet takes any batch and size),
    or the already scripted one."""
    with _jit_is_wanted():
        # check_trace re-runs and diffs the graph (3 s for a resnet18); the output check after export covers it
        scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.trace(module, example,
                                                                                             check_trace=False)
        scripted.save(str(path))


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

    options = onnxruntime.SessionOptions()
    # errors only: inside an ONNX Loop (detection) onnxruntime warns once per pair of identical weights it merges,
    # and an untrained model has hundreds (zero biases)
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})

