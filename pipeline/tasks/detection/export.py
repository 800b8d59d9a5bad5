"""Detection as ONNX and TorchScript, and the check that an exported detector finds what PyTorch finds.

torch.export (the dynamo ONNX exporter) cannot export Faster R-CNN: the number of proposals that survive NMS depends
on the data, and torch.export refuses to guard on it. Tracing can (torchvision takes ONNX-friendly paths while
tracing), but a trace unrolls `for image in images` and would fix the batch size. So one image is traced (`OneImage`,
padded to a fixed number of rows, so no detection count is fixed either) and a scripted loop runs it once per image
(`EachImage`): TorchScript keeps the loop, and the TorchScript-based ONNX exporter turns it into an ONNX Loop, so both
files take any batch size and any image size. The output is BoxesOut's: (N, detections_per_img, 6) rows of
(x1, y1, x2, y2, score, category_id), unused rows 0 with category -1.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_iou

from pipeline.tasks.export_checks import Agreement, Batches, ExportMismatch, pairs

# A matched detection: same category, nearly the same box, nearly the same score. float32 rounding moves box corners by
# about 1e-4 px and scores by about 1e-6; a wrong graph moves them by far more or loses detections.
MIN_IOU = 0.99
SCORE_ATOL = 1e-3


class OneImage(nn.Module):
    """One normalised image (1, 3, H, W) -> its detections as BoxesOut rows (rows, 6), traceable: no Python number
    that depends on the data."""

    def __init__(self, boxes_out: nn.Module) -> None:
        super().__init__()
        self.detector = boxes_out.detector
        self.category_ids = boxes_out.category_ids
        empty = torch.zeros(boxes_out.rows, 6)
        empty[:, 5] = -1
        self.register_buffer("empty", empty)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        found = self.detector([image[0]])[0]
        rows = torch.cat([found["boxes"], found["scores"][:, None],
                          self.category_ids[found["labels"] - 1][:, None]], dim=1)
        # concatenate and cut at a constant, not `out[:n] = rows`: a trace would fix n, this image's detection count
        return torch.cat([rows, self.empty])[: self.empty.shape[0]]


class EachImage(nn.Module):
    """Images (N, 3, H, W) -> (N, rows, 6): the traced `OneImage` once per image, in a loop TorchScript keeps."""

    def __init__(self, one_image: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.one_image = one_image

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        detections: list[torch.Tensor] = []
        for i in range(images.shape[0]):
            detections.append(self.one_image(images[i:i + 1]))
        return torch.stack(detections)


def script(boxes_out: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """BoxesOut (the detection task's inference module) as TorchScript that takes any batch and image size."""
    with quiet_tracing():
        # check_trace would re-run the detector; export's check against PyTorch covers the trace instead
        one = torch.jit.trace(OneImage(boxes_out).eval(), example[:1], check_trace=False)
        return torch.jit.script(EachImage(one))


@contextmanager
def quiet_tracing() -> Iterator[None]:
    # Tracing torchvision's detector warns about every Python number it records ("might not generalize to other
    # inputs"), and torch marks jit and the TorchScript-based ONNX exporter deprecated; export's check against PyTorch
    # on other batch and image sizes is what these warnings ask for, so on the command line they are only noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(vision)?\.")
        yield


def match_detections(expected: Batches, actual: Batches) -> Agreement:
    """Each image's detections against PyTorch's: greedily in PyTorch's score order, each is matched to an exported one
    of the same category with IoU >= `MIN_IOU` and score within `SCORE_ATOL`. Every detection must be matched, either
    way, except at the cut: one whose score is within `SCORE_ATOL` of the lowest kept score of the image may fall on
    the other side of the score threshold or the detections-per-image limit through rounding alone."""
    matched = total = at_cut = 0
    box_diff = score_diff = 0.0
    for e_batch, a_batch, _ in pairs(expected, actual):
        for image, (e, a) in enumerate(zip(e_batch, a_batch)):
            e, a = e[e[:, 5] != -1], a[a[:, 5] != -1]
            pairs_found = _greedy(e, a)
            if not len(e) and not len(a):
                continue
            cut = min(e[:, 4].min() if len(e) else np.inf, a[:, 4].min() if len(a) else np.inf) + SCORE_ATOL
            sides = (("PyTorch", e, {i for i, _ in pairs_found}, a),
                     ("the exported model", a, {j for _, j in pairs_found}, e))
            for side, rows, used, other in sides:
                lost = [k for k in range(len(rows)) if k not in used]
                unexplained = [k for k in lost if rows[k, 4] > cut]
                if unexplained:
                    x1, y1, x2, y2, score, category = rows[unexplained[0]]
                    raise ExportMismatch(
                        f"export check: image {image}: {side}'s detection of category {int(category)} at "
                        f"({x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}) with score {score:.4f} has no match among the "
                        f"other's {len(other)} (same category, IoU >= {MIN_IOU}, score within {SCORE_ATOL})")
                at_cut += len(lost)
            for i, j in pairs_found:
                box_diff = max(box_diff, float(np.abs(e[i, :4] - a[j, :4]).max()))
                score_diff = max(score_diff, float(abs(e[i, 4] - a[j, 4])))
            matched += len(pairs_found)
            total += len(e)
    if not total and not at_cut:
        # a trained detector may find nothing in random images: say so rather than report a vacuous match
        return Agreement("neither PyTorch nor the exported model finds a detection in these images (only empty "
                         "outputs compared)", 0.0)
    cut_note = f", {at_cut} at the score cut unmatched" if at_cut else ""
    return Agreement(f"detections match PyTorch: {matched} of {total} matched (same category, IoU >= {MIN_IOU}, score "
                     f"within {SCORE_ATOL}){cut_note}; max box diff {box_diff:.2e} px, max score diff {score_diff:.2e}",
                     box_diff)


def _greedy(expected: np.ndarray, actual: np.ndarray) -> list[tuple[int, int]]:
    """(expected row, actual row) pairs: each expected row, best score first, takes the unmatched actual row of its
    category with the highest IoU, if that IoU and the score difference are within bounds."""
    if not len(expected) or not len(actual):
        return []
    iou = box_iou(torch.from_numpy(expected[:, :4]).double(), torch.from_numpy(actual[:, :4]).double()).numpy()
    fits = ((expected[:, None, 5] == actual[None, :, 5]) & (iou >= MIN_IOU)
            & (np.abs(expected[:, None, 4] - actual[None, :, 4]) <= SCORE_ATOL))
    found, taken = [], set()
    for i in np.argsort(-expected[:, 4], kind="stable"):
        candidates = [j for j in np.flatnonzero(fits[i]) if j not in taken]
        if candidates:
            j = max(candidates, key=lambda k: iou[i, k])
            taken.add(j)
            found.append((int(i), int(j)))
    return found
