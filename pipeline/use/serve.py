"""The model each run logs to MLflow: a pyfunc that takes image files and answers the task's records.

Request, in MLflow's scoring protocol (`mlflow models serve`, POST /invocations, `Content-Type: application/json`): a
table with one string column `image`, each value one image file (JPEG, PNG, BMP, WebP, TIFF; grayscale, RGBA and
16-bit are converted to RGB as in pipeline/data/images.py) encoded in base64; line breaks in the base64 are ignored.

    {"dataframe_split": {"columns": ["image"], "data": [["iVBORw0KGgo..."], ["/9j/4AAQ..."]]}}
    {"dataframe_records": [{"image": "iVBORw0KGgo..."}]}
    {"inputs": {"image": ["iVBORw0KGgo..."]}, "params": {"top_k": 3, "score": 0.3}}

Optional `params`: `top_k` (classification: classes per image), `score` (detection: lowest score kept).
Response: `{"predictions": [...]}`, one record per image in request order: the task's `records` (the formats are in
pipeline/tasks/base.py). From Python: `mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [b64, ...]}))`.

A bad request is the caller's to fix and gets HTTP 400 with a message naming the image and the reason: MLflow's
schema check refuses a table without a string column `image`; an image that is not base64 or does not decode raises an
`MlflowException` with INVALID_PARAMETER_VALUE, which the scoring server answers without a traceback.

The pyfunc holds the run's best checkpoint (weights, config and DataInfo) as its artifact and rebuilds the model from it
on load, as `pipeline predict` does: loading imports this package, so serve from the environment it is installed in
(`mlflow models serve -m models:/m-... --env-manager local`).
"""
from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from packaging.requirements import Requirement
from PIL import Image

from pipeline import tracking
from pipeline.data.images import NotAnImage, decode_rgb
from pipeline.tasks.base import Placement, PredictOptions
from pipeline.use import inference

COLUMN = "image"
CHECKPOINT = "checkpoint"  # the artifact key of the run's best.pt
BATCH_SIZE = 32  # images of one size go through the model this many at a time

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", COLUMN)]),
    params=ParamSchema([ParamSpec("top_k", "long", PredictOptions.top_k),
                        ParamSpec("score", "double", PredictOptions.score)]))


class ServedModel(PythonModel):
    """Base64 image files in, the task's records out (see the module docstring)."""

    def load_context(self, context) -> None:
        self.session = inference.open_session(context.artifacts[CHECKPOINT])

    @property
    def module(self) -> torch.nn.Module:
        """The task's inference module, in eval mode: what `tracking.load_model` returns for `pipeline predict`."""
        return self.session.module

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[dict]:
        options = _options(params or {})
        session = self.session
        prepared = [inference.prepare(session.transform, _decode(value, row))
                    for row, value in enumerate(model_input[COLUMN])]
        records: list[dict] = []
        with torch.inference_mode():
            for batch in _batches(prepared):
                outputs = session.module(torch.stack([image for image, _ in batch]).to(session.device)).cpu()
                outputs = session.task.to_original(outputs, [placement for _, placement in batch])
                records += session.task.records(outputs, session.info, options)
        return records


def pyfunc(best_checkpoint: Path, image_size: int) -> tracking.Pyfunc:
    """What the runner logs: `ServedModel` with the run's best checkpoint, an example request, the signature."""
    return tracking.Pyfunc(Path(__file__).with_name("served_model.py"), {CHECKPOINT: str(best_checkpoint)},
                           input_example(image_size), SIGNATURE, requirements())


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


def _decode(value: Any, row: int) -> np.ndarray:
    if not isinstance(value, str):
        raise _bad_request(f"image {row}: expected a base64 string, got {type(value).__name__}")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
        return decode_rgb(data)
    except binascii.Error as err:
        raise _bad_request(f"image {row} is not base64 ({err}); send each image file's bytes base64-encoded in "
                           f"the string column '{COLUMN}'") from None
    except NotAnImage as err:
        raise _bad_request(f"image {row} is not an image file, or a corrupt or truncated one ({err}); send each "
                           f"image file's bytes (JPEG, PNG, ...) base64-encoded in the string column '{COLUMN}'") \
            from None


def _batches(prepared: list[tuple[torch.Tensor, Placement]]) -> list[list[tuple[torch.Tensor, Placement]]]:
    """Consecutive images of one size, up to BATCH_SIZE a batch, in input order: without a resize in the inference
    transforms (detection, segmentation) sizes differ and cannot be stacked."""
    batches: list[list[tuple[torch.Tensor, Placement]]] = []
    for item in prepared:
        if batches and batches[-1][0][0].shape == item[0].shape and len(batches[-1]) < BATCH_SIZE:
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def _options(params: dict[str, Any]) -> PredictOptions:
    options = PredictOptions(**{f.name: params[f.name] for f in fields(PredictOptions) if f.name in params})
    if options.top_k < 1 or not 0 <= options.score <= 1:
        raise _bad_request(f"params: top_k must be at least 1 and score within 0..1 (got top_k={options.top_k}, "
                           f"score={options.score})")
    return options


def _bad_request(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE is HTTP 400; without `stack_trace` the scoring server's answer holds no traceback
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)

