"""The task registry: a plain dict from the `task:` name in a task file to the module implementing it.

Each task module provides the same verbs: `Config` (its pydantic schema), `build_data`, `build_model`, `loss`,
`predict`, `Evaluator`, `example_input` and `report`.
"""
from pipeline.tasks import classification

TASKS = {
    "classification": classification,
}
