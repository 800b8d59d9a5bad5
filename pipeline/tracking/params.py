"""A run's config as MLflow params: flattened to dotted keys, values shortened where MLflow's limit would refuse
them."""
from __future__ import annotations

import logging
from typing import Any

from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

log = logging.getLogger(__name__)

TRUNCATION_MARK = " ...[truncated]"



def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params: `{"train": {"lr": 0.001}}` -> `{"train.lr": "0.001"}`.

    Lists stay one param (`"['stem', 'layer1']"`); an empty section is kept as `"{}"` so its key is visible.
    Values over MLflow's length limit are shortened with a marker rather than failing the run.
    """
    flat: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = shorten(str(value), MAX_PARAM_VAL_LENGTH, what=f"param {name}")
    return flat


def shorten(value: str, limit: int, what: str) -> str:
    if len(value) <= limit:
        return value
    log.warning("%s is %d characters, over MLflow's limit of %d: logged shortened", what, len(value), limit)
    return value[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK
