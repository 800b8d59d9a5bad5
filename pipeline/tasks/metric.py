"""A task's primary metric: its name and which way is better. Each task declares it once, in its light config module
(`PRIMARY`), and the registry hands it to everything that ranks runs or epochs: the engine (best checkpoint, early
stopping), sweep, compare and register. Light on purpose: reading a task file imports it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Metric:
    name: str  # as the evaluator reports it: val/top1, val/mAP, val/mIoU, val/verif_acc
    goal: Literal["max", "min"] = "max"
    perfect: float | None = None  # the best value it can take (1.0 for an accuracy), if it has one

    def __post_init__(self) -> None:
        if self.goal not in ("max", "min"):
            raise ValueError(f"Metric {self.name}: goal must be 'max' or 'min', not {self.goal!r}")

    def better(self, value: float, than: float | None) -> bool:
        """Whether `value` beats `than` (None: no value yet, which anything beats). NaN beats nothing, and any number
        beats NaN, so an epoch whose metric was undefined never holds the best checkpoint against a real score."""
        if than is None:
            return True
        if math.isnan(value):
            return False
        if math.isnan(than):
            return True
        return value > than if self.goal == "max" else value < than

    def best(self, values: list[float]) -> float | None:
        """The best of `values` by the goal, NaN left out; None when there is none."""
        found = None
        for value in values:
            if found is None or self.better(value, found):
                found = value
        return None if found is None or math.isnan(found) else found

    @property
    def best_key(self) -> str:
        """The metric that holds the best checkpoint's score: val/top1 -> best/top1."""
        return f"best/{self.name.split('/', 1)[-1]}"

    def __str__(self) -> str:
        return self.name
