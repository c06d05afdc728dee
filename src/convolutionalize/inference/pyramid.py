"""Image pyramids: dense maps of one image resized to several scales, in its own pixels.

A classifier sees objects of about its window's size. To find larger ones, the image is
shrunk: at scale ``s`` it is resized (antialiased, :mod:`.resize`) to ``round(s * H) x
round(s * W)`` and mapped as any image is. A cell's window there covers the original pixels of
that window divided by the resize factor, ``f = round(s * H) / H`` per axis (``s`` up to the
rounding): a resized pixel edge ``k`` is the original edge ``k / f``. :class:`ScaledGeometry`
is the model's geometry in those original pixels (floats), :class:`ScaledMap` one scale's map
with it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..geometry import Geometry

__all__ = ["ScaleWarning", "ScaledGeometry", "ScaledMap", "check_scales", "scaled_size"]

FloatPair = tuple[float, float]


class ScaleWarning(UserWarning):
    """A scale was skipped: it makes the image smaller than the model's window."""


@dataclass(frozen=True)
class ScaledGeometry:
    """A converted model's geometry on an image resized by ``factor``, in original pixels.

    Attributes:
        model: the model's own geometry, in the resized image's pixels.
        factor: ``(fy, fx)``, the resized size over the original size per axis.
    """

    model: Geometry
    factor: FloatPair

    @property
    def window(self) -> FloatPair:
        """``(h, w)`` of a cell's window in original pixels."""
        return self._original(self.model.window)

    @property
    def stride(self) -> FloatPair:
        return self._original(self.model.stride)

    @property
    def offset(self) -> FloatPair:
        return self._original(self.model.offset)

    @property
    def receptive_field(self) -> FloatPair | None:
        field = self.model.receptive_field
        return None if field is None else self._original(field)

    def box(self, i: int, j: int) -> tuple[float, float, float, float]:
        """Cell ``(i, j)``'s window ``(x0, y0, x1, y1)`` in original pixels (end exclusive)."""
        x0, y0, x1, y1 = self.model.box(i, j)
        fy, fx = self.factor
        return (x0 / fx, y0 / fy, x1 / fx, y1 / fy)

    def _original(self, pair: tuple[int, int]) -> FloatPair:
        return (pair[0] / self.factor[0], pair[1] / self.factor[1])


@dataclass(frozen=True)
class ScaledMap:
    """One scale of a pyramid: the dense map of the image resized by ``scale``.

    Attributes:
        map: ``(classes, rows, cols)``, as ``dense_map`` returns it at one scale (numpy, a zarr
            array with ``out``, a dask array for a dask input; a dict of them by output key
            with ``output="all"``).
        geometry: where its cells are in the original image's pixels.
        scale: the scale asked for.
        size: ``(h, w)`` of the resized image the map was computed on.
        mpp: ``(y, x)`` microns per original pixel (a slide's level 0), where known.
    """

    map: Any
    geometry: ScaledGeometry
    scale: float
    size: tuple[int, int]
    mpp: tuple[float, float] | None = None

    def box(self, i: int, j: int) -> tuple[float, float, float, float]:
        """Cell ``(i, j)``'s window ``(x0, y0, x1, y1)`` in original pixels."""
        return self.geometry.box(i, j)

    def box_microns(self, i: int, j: int) -> tuple[float, float, float, float]:
        """Cell ``(i, j)``'s window ``(x0, y0, x1, y1)`` in microns from the original's corner.

        Raises:
            ValueError: the image has no known resolution.
        """
        if self.mpp is None:
            raise ValueError("this map's image has no resolution (microns per pixel) to convert to")
        x0, y0, x1, y1 = self.box(i, j)
        my, mx = self.mpp
        return (x0 * mx, y0 * my, x1 * mx, y1 * my)

    @property
    def microns_per_cell(self) -> FloatPair | None:
        """``(y, x)`` microns between neighbouring cells' windows, where known."""
        if self.mpp is None:
            return None
        (sy, sx), (my, mx) = self.geometry.stride, self.mpp
        return (sy * my, sx * mx)


def check_scales(scales: object) -> tuple[float, ...]:
    """Validate a ``scales`` option: a non-empty sequence of positive finite numbers.

    Raises:
        ValueError: the message names the bad value and the fix.
    """
    example = "pass e.g. scales=(1.0, 0.75, 0.5)"
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
        raise ValueError(f"scales must be a sequence of positive numbers, got {scales!r}; {example}")
    if not scales:
        raise ValueError(f"scales is empty; {example}, or leave scales out for the image as it is")
    for scale in scales:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (
                math.isfinite(scale) and scale > 0):
            raise ValueError(f"every scale must be a positive finite number, got {scale!r} in "
                             f"scales={tuple(scales)!r}; {example}")
    return tuple(float(s) for s in scales)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``(round(scale * H), round(scale * W))``: the image size at ``scale``."""
    return (round(scale * size[0]), round(scale * size[1]))


def kept_scales(scales: tuple[float, ...], size: tuple[int, int], need: tuple[int, int],
                stacklevel: int) -> list[tuple[int, float, tuple[int, int]]]:
    """``(index, scale, resized size)`` of the scales whose image holds a ``need`` window; the
    others are skipped with a :class:`ScaleWarning` (at the frame ``stacklevel`` counts from here).

    Raises:
        ValueError: no scale is left.
    """
    sizes = [scaled_size(size, scale) for scale in scales]
    kept = [(index, scale, resized) for index, (scale, resized) in enumerate(zip(scales, sizes))
            if resized[0] >= need[0] and resized[1] >= need[1]]
    if not kept:
        smallest = max(need[0] / size[0], need[1] / size[1])
        raise ValueError(f"every scale in {scales} makes the {size[0]}x{size[1]} image smaller than "
                         f"the {need[0]}x{need[1]} window; pass scales of at least {smallest:.3g}")
    for scale, resized in zip(scales, sizes):
        if resized[0] < need[0] or resized[1] < need[1]:
            warnings.warn(f"scale {scale:g} makes the {size[0]}x{size[1]} image {resized[0]}x"
                          f"{resized[1]}, smaller than the {need[0]}x{need[1]} window; skipped",
                          ScaleWarning, stacklevel=stacklevel)
    return kept
