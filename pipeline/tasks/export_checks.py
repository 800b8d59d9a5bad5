"""How `pipeline export` decides that an exported file computes what the PyTorch model computes.

A check gets the PyTorch outputs and the exported file's outputs of the same input batches (`Batches`: one list of
output arrays per batch) and returns an `Agreement`, or raises `ExportMismatch` naming the worst difference. Each task
declares its check in its `ExportSpec` (pipeline/tasks/base.py), by what its outputs mean: logits are compared
number by number, a segmentation by the class each pixel gets, an embedding by its direction. Detection matches boxes
(pipeline/tasks/detection/export.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Batches = list[list[np.ndarray]]  # per input batch, the module's outputs in `ExportSpec.output_names` order

# float32 on CPU: onnxruntime and TorchScript differ from eager PyTorch by accumulation order only, about 1e-6 of
# the output scale for a ResNet; anything near these bounds is a wrong graph, not rounding.
TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}
# A pixel whose two best logits are closer than the rounding difference may flip class; a wrong graph flips most.
MIN_ARGMAX_AGREEMENT = 0.999
MIN_COSINE = 0.9999


class ExportMismatch(RuntimeError):
    """The exported file disagrees with PyTorch: a wrong graph (an exporter or model bug), not a user's mistake."""


@dataclass(frozen=True)
class Agreement:
    summary: str  # what was checked and the worst case, for export's printed line
    worst: float  # the worst value of the check's measure (max abs diff, argmax agreement, min cosine, ...)


def allclose(expected: Batches, actual: Batches) -> Agreement:
    """Every output number within `TOLERANCE` of PyTorch's (classification logits)."""
    worst = 0.0
    for e, a, i in pairs(expected, actual):
        diff = float(np.abs(a - e).max()) if a.size else 0.0
        if not np.allclose(a, e, **TOLERANCE):
            raise ExportMismatch(f"export check: output {i} differs from PyTorch (max abs diff {diff:.3g}, tolerance "
                                 f"rtol {TOLERANCE['rtol']}, atol {TOLERANCE['atol']})")
        worst = max(worst, diff)
    return Agreement(f"outputs match PyTorch within rtol {TOLERANCE['rtol']:g}, atol {TOLERANCE['atol']:g} "
                     f"(max abs diff {worst:.2e})", worst)


def argmax(expected: Batches, actual: Batches) -> Agreement:
    """The class of each pixel (argmax over dim 1 of (N, C, H, W) logits) is PyTorch's for at least
    `MIN_ARGMAX_AGREEMENT` of all pixels of all batches."""
    same = total = 0
    for e, a, _ in pairs(expected, actual):
        same += int((e.argmax(axis=1) == a.argmax(axis=1)).sum())
        total += e.shape[0] * int(np.prod(e.shape[2:]))
    agreement = same / max(total, 1)
    if agreement < MIN_ARGMAX_AGREEMENT:
        raise ExportMismatch(f"export check: the exported model gives {total - same} of {total} pixels another class "
                             f"than PyTorch (agreement {agreement:.4%}, required {MIN_ARGMAX_AGREEMENT:.1%})")
    return Agreement(f"pixel classes agree with PyTorch on {agreement:.4%} of {total} pixels "
                     f"(required {MIN_ARGMAX_AGREEMENT:.1%})", agreement)


def cosine(expected: Batches, actual: Batches) -> Agreement:
    """Each row (an embedding) points where PyTorch's does: cosine similarity at least `MIN_COSINE`."""
    worst = 1.0
    for e, a, i in pairs(expected, actual):
        e, a = e.reshape(len(e), -1).astype(np.float64), a.reshape(len(a), -1).astype(np.float64)
        norms = np.linalg.norm(e, axis=1) * np.linalg.norm(a, axis=1)
        cos = (e * a).sum(axis=1) / np.maximum(norms, 1e-12)
        if len(cos) and cos.min() < MIN_COSINE:
            raise ExportMismatch(f"export check: output {i} row {int(cos.argmin())} has cosine {cos.min():.6f} to "
                                 f"PyTorch's (required {MIN_COSINE})")
        worst = min(worst, float(cos.min()) if len(cos) else 1.0)
    return Agreement(f"embeddings match PyTorch with cosine >= {MIN_COSINE} (min {worst:.7f})", worst)


def pairs(expected: Batches, actual: Batches):
    """(PyTorch array, exported array, output index) of every batch, after checking counts and shapes agree."""
    for e_batch, a_batch in zip(expected, actual, strict=True):
        if len(e_batch) != len(a_batch):
            raise ExportMismatch(f"export check: the exported model returns {len(a_batch)} outputs, PyTorch "
                                 f"{len(e_batch)}")
        for i, (e, a) in enumerate(zip(e_batch, a_batch)):
            if e.shape != a.shape:
                raise ExportMismatch(f"export check: output {i} has shape {a.shape}, PyTorch's {e.shape}")
            yield e, a, i
