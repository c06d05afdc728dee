"""Detection: dense class-probability maps turned into labelled boxes in image pixels.

Each cell of a convolutionalized classifier's map scores one window of the image
(``geometry.box(i, j)``). An object the classifier was trained to recognise when centred
lights up a small blob of neighbouring cells; the cell at the blob's peak is the window
best centred on it. So, per class: keep the cells that are local maxima of that class's
probability (3x3 neighbourhood) and above a threshold, take their windows as boxes, and
drop overlapping boxes of the same class with non-maximum suppression
(``torchvision.ops.batched_nms``). The result is plain data: a list of :class:`Detection`.

Across scales (an image pyramid, ``dense_map(..., scales=...)``): an object larger than the
window lights up the map of the scale that shrinks it to the window's size. Peaks are found in
every scale's map, their windows put in the original image's pixels
(:class:`~convolutionalize.inference.ScaledMap`), and one suppression runs over all of them.

Box regression: a model with a box output (MTCNN's R-/O-Net, any two-head detector) says at
each cell how to move that cell's window onto the object. ``boxes=`` (or ``box_output=`` in
:func:`detection_maps`) reads it at every peak and a box decoder applies it before the
suppression: by default MTCNN's convention (:func:`mtcnn_boxes`), any other as a function
``decoder(windows, offsets) -> boxes`` (``(N, 4)`` float64 tensors ``x0, y0, x1, y1`` in
image pixels, and the ``(N, channels)`` offsets read at their cells), passed as
``box_decoder=`` or registered by name in :data:`BOX_DECODERS`::

    def centre_size(windows, offsets):  # Faster R-CNN: (dx, dy, log dw, log dh)
        size = windows[:, 2:] - windows[:, :2]
        centre = windows[:, :2] + size * (0.5 + offsets[:, :2])
        half = size * torch.exp(offsets[:, 2:4]) / 2
        return torch.cat([centre - half, centre + half], 1)

    BOX_DECODERS["centre-size"] = centre_size
    detect(probabilities, geometry, boxes=box_map, box_decoder="centre-size")
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, nms

from .frameworks import adapter_for
from .geometry import Geometry
from .inference import ScaledGeometry, ScaledMap, dense_map
from .outputs import OutputKey, select_output

__all__ = ["BOX_DECODERS", "BoxDecoder", "Detection", "as_numpy", "box_iou", "class_probabilities", "detect",
           "detect_objects", "detection_maps", "mtcnn_boxes"]

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
BoxDecoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Detection:
    """One found object: its class index, its probability and its box ``(x0, y0, x1, y1)`` in
    the image's pixels (end exclusive): a cell's window, refined by box regression when asked.
    Whole-number coordinates are ints (one map at the model's own scale), others floats."""

    label: int
    score: float
    box: Box

    def to_dict(self) -> dict[str, Any]:
        """``{"label", "score", "box": [x0, y0, x1, y1]}``, ready for ``json.dumps``."""
        return {"label": self.label, "score": self.score, "box": list(self.box)}


def class_probabilities(model: Any, image: torch.Tensor,
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
    batch = torch.as_tensor(image).detach().float().cpu().numpy()[None]
    logits = adapter_for(model).runner(model, output)(batch)  # type: ignore[arg-type]
    if logits.ndim != 4:
        raise ValueError(f"expected a (1, classes, rows, cols) map, got shape {tuple(logits.shape)}")
    return torch.softmax(torch.from_numpy(logits[0]).double(), dim=0).numpy()


def mtcnn_boxes(windows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """MTCNN's box regression: four offsets ``(dx0, dy0, dx1, dy1)`` as fractions of the window's
    width ``w`` and height ``h`` move its corners: ``(x0 + dx0 * w, y0 + dy0 * h, x1 + dx1 * w,
    y1 + dy1 * h)``.

    Raises:
        ValueError: offsets that are not four numbers per window.
    """
    if offsets.shape[1] != 4:
        raise ValueError(f"the 'mtcnn' box convention reads 4 offsets per cell (dx0, dy0, dx1, dy1), "
                         f"the box map has {offsets.shape[1]}; pass the model's box output, or another "
                         "box_decoder")
    size = windows[:, 2:] - windows[:, :2]
    return windows + offsets * torch.cat([size, size], 1)


BOX_DECODERS: dict[str, BoxDecoder] = {"mtcnn": mtcnn_boxes}
"""Box-regression conventions by name, for ``box_decoder=`` (add your own: module docstring)."""


@dataclass(frozen=True)
class _Level:
    """One map to find peaks in: probabilities, where its cells are, its box offsets if any."""

    probs: torch.Tensor
    geometry: Geometry | ScaledGeometry
    boxes: torch.Tensor | None


def detect(
    probabilities: np.ndarray | Sequence[ScaledMap],
    geometry: Geometry | ScaledGeometry | None = None,
    *,
    threshold: float = 0.5,
    background_class: int | None = None,
    iou: float = 0.3,
    exclusive_iou: float | None = None,
    boxes: Any = None,
    box_decoder: str | BoxDecoder = "mtcnn",
) -> list[Detection]:
    """Boxes of the objects in a class-probability map, or in every scale of a pyramid, best first.

    Args:
        probabilities: ``(classes, rows, cols)`` per-cell class probabilities (softmax of a
            convolutionalized classifier's map for one image), with ``geometry``; or a pyramid
            of them, one :class:`~convolutionalize.inference.ScaledMap` per scale
            (:func:`detection_maps`), each carrying its geometry in the original image's pixels.
        geometry: the converted model's geometry; cell ``(i, j)`` becomes ``geometry.box(i, j)``.
            Only with a single map.
        threshold: minimum probability of a detection, in ``(0, 1]``.
        background_class: a class index that is never reported (the "nothing here" class).
        iou: boxes of the same class overlapping more than this (intersection over union,
            in ``[0, 1]``) are suppressed in favour of the higher score, across all scales.
        exclusive_iou: for mutually exclusive classes (one object per place, like digits):
            after the per-class suppression, a box overlapping a better box *of any class*
            by more than this is dropped too. ``None`` (default): classes never suppress
            each other.
        boxes: box regression, on the same cells: a ``(channels, rows, cols)`` map for a single
            map, one map (or ``ScaledMap``) per scale for a pyramid. Every peak's window is
            refined with the offsets at its cell, before the suppression. ``None``: windows.
        box_decoder: how offsets refine a window: a name in :data:`BOX_DECODERS` (default
            ``"mtcnn"``, :func:`mtcnn_boxes`) or a function (see the module docstring).

    Equal scores (saturated probabilities) rank by their 3x3 neighbourhood mean, highest at a
    plateau's centre, then by scale (in the order given) and cell.

    Raises:
        ValueError: a map that is not 3-D, an option out of range, box maps that do not match
            the class maps, an unknown box decoder (the message names it).
    """
    decode = _check_decoder(box_decoder)
    levels = _levels(probabilities, geometry, boxes)
    for level in levels:
        _check(level.probs, threshold, background_class, iou)
    if exclusive_iou is not None and not 0 <= exclusive_iou <= 1:
        raise ValueError(f"exclusive_iou must be in [0, 1], got {exclusive_iou}")
    labels, scores, smooth, found = _candidates(levels, threshold, background_class, decode)
    if not len(scores):
        return []
    order = torch.argsort(smooth, descending=True, stable=True)
    order = order[torch.argsort(scores[order], descending=True, stable=True)]
    # NMS sees ranks, not scores: ties are already resolved, deterministically
    ranks = torch.arange(len(order), 0, -1, dtype=torch.float64)
    keep = order[batched_nms(found[order], ranks, labels[order], iou)]
    if exclusive_iou is not None:
        keep = keep[nms(found[keep], torch.arange(len(keep), 0, -1, dtype=torch.float64),
                        exclusive_iou)]
    logger.info("%d peaks above %.2f in %d map(s), %d after suppression", len(scores), threshold,
                len(levels), len(keep))
    return [Detection(int(labels[k]), float(scores[k]), _as_box(found[k].tolist())) for k in keep.tolist()]


def _candidates(levels: list[_Level], threshold: float, background_class: int | None,
                decode: BoxDecoder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every level's peaks, in level order: labels, scores, the 3x3 neighbourhood mean that
    breaks ties (highest at a saturated plateau's centre) and boxes in image pixels."""
    labels, scores, smooth, found = [], [], [], []
    for level in levels:
        peaks = _peaks(level.probs, threshold, background_class)
        if not len(peaks):
            continue
        label, rows, cols = peaks.unbind(1)
        places = torch.tensor([level.geometry.box(int(i), int(j)) for i, j in zip(rows, cols)],
                              dtype=torch.float64)
        if level.boxes is not None:
            places = _decoded(decode, places, level.boxes[:, rows, cols].T)
        mean = F.avg_pool2d(level.probs[None], kernel_size=3, stride=1, padding=1,
                            count_include_pad=True)[0]
        labels.append(label)
        scores.append(level.probs[label, rows, cols])
        smooth.append(mean[label, rows, cols])
        found.append(places)
    if not labels:
        return (torch.zeros(0, dtype=torch.long), *(torch.zeros(0, dtype=torch.float64),) * 2,
                torch.zeros(0, 4, dtype=torch.float64))
    return torch.cat(labels), torch.cat(scores), torch.cat(smooth), torch.cat(found)


def as_numpy(values: Any, dtype: Any = None) -> np.ndarray:
    """``values`` as a numpy array: a tensor detached from autograd and moved to the CPU first
    (a map computed without ``torch.no_grad`` requires grad), anything else as ``np.asarray``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype == torch.bfloat16:
            values = values.float()
        values = values.numpy()
    return np.asarray(values, dtype=dtype)


def _levels(probabilities: Any, geometry: Geometry | ScaledGeometry | None, boxes: Any) -> list[_Level]:
    """The maps to search: one with ``geometry``, or each scale of a pyramid."""
    pyramid = isinstance(probabilities, (list, tuple)) and all(
        isinstance(p, ScaledMap) for p in probabilities)
    if not pyramid:
        if geometry is None:
            raise ValueError("detect needs the geometry of a single probability map (detect(probs, "
                             "fcn.geometry)); a pyramid is a list of ScaledMap")
        return [_level(probabilities, geometry, boxes, "")]
    if geometry is not None:
        raise ValueError("a pyramid's maps carry their own geometry; leave geometry out")
    if not probabilities:
        raise ValueError("the pyramid has no maps; pass at least one ScaledMap")
    if boxes is not None and (not isinstance(boxes, (list, tuple)) or len(boxes) != len(probabilities)):
        count = len(boxes) if isinstance(boxes, (list, tuple)) else "not a list of"
        raise ValueError(f"boxes must hold one box map per scale: {len(probabilities)} scales, {count} "
                         "box maps")
    return [_level(p.map, p.geometry, None if boxes is None else boxes[k], f" at scale {p.scale:g}")
            for k, p in enumerate(probabilities)]


def _level(probabilities: Any, geometry: Geometry | ScaledGeometry, boxes: Any, where: str) -> _Level:
    probs = torch.as_tensor(as_numpy(probabilities, np.float64))
    if probs.dim() != 3:
        raise ValueError(f"probabilities must be (classes, rows, cols), got shape {tuple(probs.shape)}")
    if boxes is None:
        return _Level(probs, geometry, None)
    offsets = torch.as_tensor(as_numpy(boxes.map if isinstance(boxes, ScaledMap) else boxes, np.float64))
    if offsets.dim() != 3 or offsets.shape[1:] != probs.shape[1:]:
        raise ValueError(f"the box map{where} has shape {tuple(offsets.shape)} but the class map "
                         f"{tuple(probs.shape)}: it must be (channels, {probs.shape[1]}, "
                         f"{probs.shape[2]}), the box output of the same model on the same image")
    return _Level(probs, geometry, offsets)


def _check_decoder(box_decoder: object) -> BoxDecoder:
    if callable(box_decoder):
        return box_decoder  # type: ignore[return-value]
    if isinstance(box_decoder, str) and box_decoder in BOX_DECODERS:
        return BOX_DECODERS[box_decoder]
    raise ValueError(f"unknown box_decoder {box_decoder!r}: pass one of "
                     f"{', '.join(map(repr, BOX_DECODERS))} or a function (windows, offsets) -> boxes")


def _decoded(decode: BoxDecoder, windows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    refined = torch.as_tensor(decode(windows, offsets), dtype=torch.float64)
    if refined.shape != windows.shape:
        name = getattr(decode, "__name__", repr(decode))
        raise ValueError(f"box decoder {name} returned shape {tuple(refined.shape)} for "
                         f"{len(windows)} windows; it must return ({len(windows)}, 4) boxes x0, y0, x1, y1")
    return refined


def _as_box(values: list[float]) -> Box:
    """Whole numbers as ints (a window at the model's own scale), others as they are."""
    return tuple(int(v) if float(v).is_integer() else float(v) for v in values)  # type: ignore[return-value]


def detection_maps(
    model: Any,
    image: Any,
    *,
    scales: Sequence[float] | None = None,
    output: OutputKey = None,
    box_output: OutputKey = None,
    input_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    tile: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[list[ScaledMap], list[ScaledMap] | None]:
    """What :func:`detect` reads, for ``model`` on ``image``: per scale, the class probabilities
    of output ``output`` and (with ``box_output``) the box output's map, from the same passes.

    The maps are :func:`~convolutionalize.dense_map`'s (see there for ``model``, ``image``,
    ``input_size``, ``mean``, ``std``, ``tile``, ``device`` and how ``scales`` resize the
    image); probabilities are their softmax over the classes in float64 (float32 saturates at
    1.0 for logit margins above ~17). ``scales=None`` is the image as it is (scale 1).

    Returns:
        ``(probabilities, boxes)``: one :class:`~convolutionalize.inference.ScaledMap` per scale
        kept, in the order given, each in numpy; ``boxes`` is ``None`` without ``box_output``.

    Raises:
        ValueError: as ``dense_map`` (Keras and ONNX models name outputs by index; their two
            outputs are mapped in two passes).
    """
    levels = (1.0,) if scales is None else scales
    if box_output is None:
        maps = dense_map(model, image, input_size=input_size, mean=mean, std=std, tile=tile,
                         device=device, output=output, scales=levels)
        return [_probabilities(level, np.asarray(level.map)) for level in maps], None
    if isinstance(model, (str, os.PathLike)) or not adapter_for(model).maps_all_outputs:
        # Keras and ONNX models are mapped one output at a time: the scores, then the boxes
        options = dict(input_size=input_size, mean=mean, std=std, tile=tile, device=device, scales=levels)
        scores = dense_map(model, image, output=output, **options)  # type: ignore[arg-type]
        offsets = dense_map(model, image, output=box_output, **options)  # type: ignore[arg-type]
        return ([_probabilities(level, np.asarray(level.map)) for level in scores],
                [ScaledMap(np.asarray(level.map), level.geometry, level.scale, level.size)
                 for level in offsets])
    maps = dense_map(model, image, input_size=input_size, mean=mean, std=std, tile=tile,
                     device=device, output="all", scales=levels)
    probs, boxes = [], []
    for level in maps:
        outputs = _computed(level.map)
        probs.append(_probabilities(level, select_output(outputs, output).numpy()))
        boxes.append(ScaledMap(select_output(outputs, box_output).numpy(), level.geometry, level.scale,
                               level.size))
    return probs, boxes


def _computed(maps: dict[int | str, Any]) -> dict[int | str, torch.Tensor]:
    """``output="all"``'s maps in memory (a dask input's together: one pass computes them all)."""
    values = list(maps.values())
    if any(hasattr(v, "compute") for v in values):
        import dask

        values = list(dask.compute(*values))
    return {key: torch.from_numpy(np.asarray(v)) for key, v in zip(maps, values)}


def _probabilities(level: ScaledMap, logits: np.ndarray) -> ScaledMap:
    probs = torch.softmax(torch.from_numpy(np.asarray(logits)).double(), dim=0).numpy()
    return ScaledMap(probs, level.geometry, level.scale, level.size)


def detect_objects(
    model: Any,
    image: Any,
    *,
    scales: Sequence[float] | None = None,
    output: OutputKey = None,
    box_output: OutputKey = None,
    box_decoder: str | BoxDecoder = "mtcnn",
    threshold: float = 0.5,
    background_class: int | None = None,
    iou: float = 0.3,
    exclusive_iou: float | None = None,
    input_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    tile: int | None = None,
    device: str | torch.device | None = None,
) -> list[Detection]:
    """The objects ``model`` finds in ``image`` at every scale, best first, boxes in the image's
    pixels: :func:`detection_maps` then :func:`detect` (see both for the arguments).

    >>> found = detect_objects(model, "page.png", scales=(1, 0.7, 0.5), box_output="box",
    ...                        background_class=0)   # doctest: +SKIP
    """
    probs, boxes = detection_maps(model, image, scales=scales, output=output, box_output=box_output,
                                  input_size=input_size, mean=mean, std=std, tile=tile, device=device)
    return detect(probs, threshold=threshold, background_class=background_class, iou=iou,
                  exclusive_iou=exclusive_iou, boxes=boxes, box_decoder=box_decoder)


def _check(probs: torch.Tensor, threshold: float, background_class: int | None, iou: float) -> None:
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


def _peaks(probs: torch.Tensor, threshold: float, background_class: int | None) -> torch.Tensor:
    """``(K, 3)`` ``(class, row, col)`` of the cells that are 3x3 local maxima above ``threshold``."""
    neighbourhood = F.max_pool2d(probs[None], kernel_size=3, stride=1, padding=1)[0]
    mask = (probs >= neighbourhood) & (probs >= threshold)
    if background_class is not None:
        mask[background_class] = False
    return mask.nonzero()


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (end exclusive)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union
