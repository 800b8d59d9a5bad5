"""What a run logs as its model: an MLflow pyfunc ("models from code") whose code file is pipeline/use/served_model.py,
with the run's best checkpoint as its one artifact, an example request, the request's signature and pinned
requirements. MLflow runs that code file when the model is loaded (serving, `mlflow.pyfunc.load_model`), so the
runner that logs the model never imports the serving code (pipeline/use/serve.py says what a request and an answer
hold)."""
from __future__ import annotations

import base64
import importlib.metadata
import io
from pathlib import Path

import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from packaging.requirements import Requirement
from PIL import Image

from pipeline.tracking.models import Pyfunc

COLUMN = "image"  # the request's one column: image files, base64-encoded
CHECKPOINT = "checkpoint"  # the artifact key of the run's best.pt
CODE = Path(__file__).resolve().parent.parent / "use" / "served_model.py"  # read by MLflow at load, not imported here
_TYPES = {int: "long", float: "double", str: "string", bool: "boolean"}


def pyfunc(best_checkpoint: Path, image_size: int, params: dict[str, int | float]) -> Pyfunc:
    """The served model of a run: its best checkpoint, a one-image example request at `image_size`, and `params` (name
    -> default: the prediction options a request may set, e.g. top_k, score) in its signature."""
    signature = ModelSignature(inputs=Schema([ColSpec("string", COLUMN)]),
                               params=ParamSchema([ParamSpec(name, _TYPES[type(default)], default)
                                                   for name, default in params.items()]))
    return Pyfunc(CODE, {CHECKPOINT: str(best_checkpoint)}, input_example(image_size), signature, requirements())


def input_example(size: int) -> pd.DataFrame:
    """One grey PNG of `size` pixels: what the MLflow UI shows as the request and what logging checks serving with
    (a few hundred bytes; a tensor example of two 224 px images took 15 MB of JSON)."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, format="PNG")
    return pd.DataFrame({COLUMN: [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def requirements() -> list[str]:
    """This package's own dependencies at the installed versions (listing them skips MLflow's slow inference); the
    package itself is not on PyPI, hence serving with `--env-manager local` where it is installed."""
    dists = importlib.metadata.packages_distributions().get("pipeline")
    if not dists:  # a checkout that is not installed: no metadata to read, and MLflow pins only itself
        return []
    pins = []
    for line in importlib.metadata.requires(dists[0]) or []:
        req = Requirement(line)
        if req.marker is None:  # extras (export, test) are not needed to serve
            # local version labels (`2.5.1+cpu`) are not on PyPI: pin the public version
            pins.append(f"{req.name}=={importlib.metadata.version(req.name).split('+')[0]}")
    return pins
