"""The task registry: a plain dict from the `task:` name in a task file to the module implementing it.

Each task module provides the same verbs: `Config` (its pydantic schema), `PRIMARY` (its primary metric), `SYNTH` (its
synthetic dataset kind, see pipeline/data/shapes.py), `build_data`, `build_model`, `loss`, `predict`, `make_evaluator`,
`report`, and for MLflow model logging `inference_module` (images -> one tensor), `example_input` and `LOG_FORMAT`.
"""
from pipeline.tasks import classification
from pipeline.tasks import detection
from pipeline.tasks import face
from pipeline.tasks import segmentation

TASKS = {
    "classification": classification,
    "detection": detection,
    "face": face,
    "segmentation": segmentation,
}
