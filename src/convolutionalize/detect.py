"""Detection: a dense class-probability map turned into labelled boxes in image pixels.

Each cell of a convolutionalized classifier's map scores one window of the image
(``geometry.box(i, j)``). An object the classifier was trained to recognise when centred
lights up a small blob of neighbouring cells; the cell at the blob's peak is the window
best centred on it. So, per class: keep the cells that are local maxima of that class's
probability (3x3 neighbourhood) and above a threshold, take their windows as boxes, and
drop overlapping boxes of the same class with non-maximum suppression
(``torchvision.ops.batched_nms``). The result is plain data: a list of :class:`Detection`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, nms

from .geometry import Geometry
from .outputs import OutputKey, select_output

__all__ = ["Detection", "box_iou", "class_probabilities", "detect"]

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Detection:
    """One found object: its class index, its probability and its window ``(x0, y0, x1, y1)``
    in image pixels (end exclusive)."""

    label: int
    score: float
    box: Box

    def to_dict(self) -> dict[str, Any]:
        """``{"label", "score", "box": [x0, y0, x1, y1]}``, ready for ``json.dumps``."""
        return {"label": self.label, "score": self.score, "box": list(self.box)}


def class_probabilities(model: torch.nn.Module, image: torch.Tensor,
                        output: OutputKey = None) -> np.ndarray:
    """``(classes, rows, cols)`` softmax probabilities of a converted model's map of one
    ``(C, H, W)`` image. The softmax runs in float64 so that confident cells stay ordered
    (float32 saturates at 1.0 for logit margins above ~17).

    ``output`` picks the class scores of a model with several outputs: an index or a name
    (default: ``logits`` where there is one, else the first; see :mod:`convolutionalize.outputs`).

    Raises:
        ValueError: an ``output`` the model does not have (the message lists its outputs), or
            scores that are not a map.
    """
    with torch.inference_mode():
        logits = select_output(model(image[None].float()), output)
    if logits.dim() != 4:
        raise ValueError(f"expected a (1, classes, rows, cols) map, got shape {tuple(logits.shape)}")
    return torch.softmax(logits[0].double(), dim=0).numpy()


def detect(
    probabilities: np.ndarray,
    geometry: Geometry,
    *,
    threshold: float = 0.5,
    background_class: int | None = None,
    iou: float = 0.3,
    exclusive_iou: float | None = None,
) -> list[Detection]:
    """Boxes of the objects in a class-probability map, best first.

    Args:
        probabilities: ``(classes, rows, cols)`` per-cell class probabilities (softmax of a
            convolutionalized classifier's map for one image).
        geometry: the converted model's geometry; cell ``(i, j)`` becomes ``geometry.box(i, j)``.
        threshold: minimum probability of a detection, in ``(0, 1]``.
        background_class: a class index that is never reported (the "nothing here" class).
        iou: boxes of the same class overlapping more than this (intersection over union,
            in ``[0, 1]``) are suppressed in favour of the higher score.
        exclusive_iou: for mutually exclusive classes (one object per place, like digits):
            after the per-class suppression, a box overlapping a better box *of any class*
            by more than this is dropped too. ``None`` (default): classes never suppress
            each other.

    Raises:
        ValueError: a map that is not 3-D, or an option out of range (the message names it).
    """
    probs = _check(probabilities, threshold, background_class, iou)
    if exclusive_iou is not None and not 0 <= exclusive_iou <= 1:
        raise ValueError(f"exclusive_iou must be in [0, 1], got {exclusive_iou}")
    candidates = _peaks(probs, threshold, background_class)
    if candidates.numel() == 0:
        return []
    labels, rows, cols = candidates.unbind(1)
    scores = probs[labels, rows, cols]
    boxes = torch.tensor([geometry.box(int(i), int(j)) for i, j in zip(rows, cols)],
                         dtype=torch.float64)
    order = _rank(probs, candidates, scores)
    # NMS sees ranks, not scores: ties are already resolved, deterministically
    ranks = torch.arange(len(order), 0, -1, dtype=torch.float64)
    keep = order[batched_nms(boxes[order], ranks, labels[order], iou)]
    if exclusive_iou is not None:
        keep = keep[nms(boxes[keep], torch.arange(len(keep), 0, -1, dtype=torch.float64),
                        exclusive_iou)]
    logger.info("%d peaks above %.2f, %d after suppression", len(scores), threshold, len(keep))
    return [
        Detection(int(labels[k]), float(scores[k]), tuple(int(v) for v in boxes[k].tolist()))  # type: ignore[arg-type]
        for k in keep.tolist()
    ]


def _check(probabilities: np.ndarray, threshold: float, background_class: int | None,
           iou: float) -> torch.Tensor:
    probs = torch.as_tensor(np.asarray(probabilities, dtype=np.float64))
    if probs.dim() != 3:
        raise ValueError(f"probabilities must be (classes, rows, cols), got shape {tuple(probs.shape)}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not 0 <= iou <= 1:
        raise ValueError(f"iou must be in [0, 1], got {iou}")
    classes = probs.shape[0]
    if background_class is not None and not 0 <= background_class < classes:
        raise ValueError(
            f"background class {background_class} is out of range: the map has {classes} classes "
            f"(0..{classes - 1})"
        )
    return probs


def _peaks(probs: torch.Tensor, threshold: float, background_class: int | None) -> torch.Tensor:
    """``(K, 3)`` ``(class, row, col)`` of the cells that are 3x3 local maxima above ``threshold``."""
    neighbourhood = F.max_pool2d(probs[None], kernel_size=3, stride=1, padding=1)[0]
    mask = (probs >= neighbourhood) & (probs >= threshold)
    if background_class is not None:
        mask[background_class] = False
    return mask.nonzero()


def _rank(probs: torch.Tensor, candidates: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Candidates best first: by score, ties (a plateau of saturated probabilities) broken by
    the 3x3 neighbourhood mean, which is highest at the plateau's centre, then by cell index."""
    labels, rows, cols = candidates.unbind(1)
    smooth = F.avg_pool2d(probs[None], kernel_size=3, stride=1, padding=1,
                          count_include_pad=True)[0][labels, rows, cols]
    order = torch.argsort(smooth, descending=True, stable=True)
    return order[torch.argsort(scores[order], descending=True, stable=True)]


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (end exclusive)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union
