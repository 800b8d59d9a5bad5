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
from dataclasses import fields
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from pipeline.data.images import NotAnImage, decode_rgb
from pipeline.tasks.base import Placement, PredictOptions
from pipeline.tracking.served import CHECKPOINT, COLUMN
from pipeline.use import inference

BATCH_SIZE = 32  # images of one size go through the model this many at a time


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
