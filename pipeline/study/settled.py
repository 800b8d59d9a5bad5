"""Whether a run had settled when it stopped: a depth comparison of runs that were still improving compares how fast
each depth learns in a few epochs, not what it can reach (5-epoch quickstarts from random init put resnet50 last).

The rule: a run is still improving when the best value of its primary metric over its last quarter of epochs (at least
its last epoch) beats the best of the epochs before by more than 1% of that earlier best (at least 0.001), in the
metric's own direction, unless it reached the metric's perfect value (a top-1 of 1.0 has nowhere left to go). A
settled curve wanders within that margin (epoch-to-epoch noise of a converged run is below it on the built-in tasks);
a curve still climbing clears it. A run of one epoch has nothing to compare and counts as not settled.
`pipeline compare` and the sweep's summary mark such runs, and say in one line what to do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.tasks.metric import Metric

MARGIN = 0.01  # of the earlier best
FLOOR = 1e-3  # the smallest gain that counts, whatever the scale


@dataclass(frozen=True)
class Verdict:
    settled: bool
    gain: float  # what the last quarter added over the earlier best (NaN: nothing to compare)
    last: int  # epochs in the last quarter
    epochs: int

    @property
    def cell(self) -> str:
        """The table's `settled` column."""
        if self.settled:
            return "yes"
        if math.isnan(self.gain):
            return "no (1 epoch)"
        return f"no: {self.gain:+.3g} in last {'epoch' if self.last == 1 else f'{self.last} epochs'}"


def judge(values: list[float], metric: Metric) -> Verdict:
    """`values`: the metric at each epoch, in order (NaN for an epoch that had none)."""
    epochs = len(values)
    last = max(1, math.ceil(epochs / 4))
    earlier = metric.best(values[:-last])
    recent = metric.best(values[-last:])
    if earlier is None or recent is None:
        return Verdict(False, float("nan"), last, epochs)
    gain = (recent - earlier) if metric.goal == "max" else (earlier - recent)
    perfect = metric.perfect is not None and recent == metric.perfect
    return Verdict(perfect or gain <= max(MARGIN * abs(earlier), FLOOR), gain, last, epochs)


def advice(name: str, verdict: Verdict, metric: str) -> str:
    """The line said for a run that had not settled."""
    if math.isnan(verdict.gain):
        return (f"{name}: ran {verdict.epochs} epoch, too few to tell whether {metric} had settled; train longer "
                "before comparing depths")
    last = "its last epoch" if verdict.last == 1 else f"its last {verdict.last} epochs"
    return (f"{name}: still improving at epoch {verdict.epochs}/{verdict.epochs} ({metric} {verdict.gain:+.3g} in "
            f"{last}); train longer before comparing depths")
