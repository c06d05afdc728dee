"""Foreground masks: which parts of an image hold anything worth mapping (tissue on a slide).

A mask is a 2-D boolean array over the whole image's extent, at any resolution with the
image's aspect ratio: mask pixel ``(r, c)`` of an ``h x w`` mask covers image rows
``[r H / h, (r + 1) H / h)`` and the same for columns, on whatever level, resize or scale the
image is mapped at. A cell whose window touches no foreground mask pixel is NaN in the map
(whatever the tiling: tiled == whole holds with a mask too), and ``dense_map`` computes a
tile only when one of the cells it owns is not (the others are skipped), and then only the
bounding box of those cells.

``mask="auto"`` thresholds the colour saturation of a low-resolution view (a slide's
coarsest level; an image read every ``k``-th pixel, at most ``AUTO_SIDE`` pixels a side)
with Otsu's method (scikit-image), capped at ``SATURATION_CAP`` so that a slide covered in
tissue is not cut in two, and grows the foreground by one mask pixel so that tissue edges a
low-resolution pixel half covers are kept. Glass is grey (saturation near 0), stained tissue
is not.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..geometry import Geometry
from .tiling import Tile, TileGrid, shrink

__all__ = ["AUTO_SIDE", "SATURATION_CAP", "Mask", "Work", "auto_mask", "blank", "check_mask",
           "low_resolution", "plan_work"]

AUTO_SIDE = 2048
SATURATION_CAP = 0.08


@dataclass(frozen=True)
class Mask:
    """A foreground mask over an image's extent (see the module docstring)."""

    array: np.ndarray  # (h, w) bool

    def digest(self) -> str:
        bits = np.packbits(self.array).tobytes() + str(self.array.shape).encode()
        return hashlib.sha1(bits).hexdigest()[:16]

    @property
    def foreground(self) -> float:
        """The share of mask pixels that are foreground."""
        return float(self.array.mean())

    def cells(self, geometry: Geometry, size: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
        """``(rows, cols)`` bools: which cells of the map of an image of ``size`` have a window
        that touches a foreground mask pixel (a summed-area table: no loop over cells)."""
        (h, w), (height, width) = self.array.shape, size
        table = np.zeros((h + 1, w + 1), np.int64)
        table[1:, 1:] = self.array.cumsum(0).cumsum(1)
        spans = []
        for axis, (n, full, m) in enumerate(((cells[0], height, h), (cells[1], width, w))):
            start = np.arange(n) * geometry.stride[axis] + geometry.offset[axis]
            lo = np.clip(np.floor(np.clip(start, 0, full) * m / full), 0, m - 1).astype(np.int64)
            end = np.clip(start + geometry.window[axis], 0, full)
            hi = np.maximum(np.ceil(end * m / full).astype(np.int64), lo + 1)
            spans.append((lo, np.minimum(hi, m)))
        (r0, r1), (c0, c1) = spans
        count = (table[np.ix_(r1, c1)] - table[np.ix_(r0, c1)] - table[np.ix_(r1, c0)]
                 + table[np.ix_(r0, c0)])
        return count > 0


@dataclass(frozen=True)
class Work:
    """How one tile is computed: ``part`` (the tile itself, or under a mask the smaller tile
    of its foreground cells' bounding box) is read and run; :meth:`cells` turns its output
    into the cells ``tile`` owns, NaN where ``keep`` (the owned cells' block of
    :meth:`Mask.cells`) is False."""

    tile: Tile
    part: Tile
    keep: np.ndarray | None = None

    def cells(self, scores: np.ndarray) -> np.ndarray:
        """The owned cells from ``scores``, ``part``'s ``(classes, rows, cols)`` output."""
        cells = scores[(slice(None), *self.part.crop())]
        if self.part.cells != self.tile.cells:
            (r0, r1, c0, c1), (p0, p1, q0, q1) = self.tile.cells, self.part.cells
            owned = np.full((cells.shape[0], r1 - r0, c1 - c0), np.nan, np.float32)
            owned[:, p0 - r0:p1 - r0, q0 - c0:q1 - c0] = cells
            cells = owned
        return blank(cells, self.keep)


    def cells_from(self, block: np.ndarray | None, row: int, col: int) -> np.ndarray:
        """The owned cells from ``block`` (``(classes, rows, cols)`` of map cells from cell
        ``(row, col)`` on, a stream's output), NaN where ``keep`` is False.

        Raises:
            RuntimeError: ``block`` lacks a cell the tile must compute (a bug, not bad input).
        """
        r0, r1, c0, c1 = self.tile.cells
        a0, b0 = max(r0, row), max(c0, col)
        a1, b1 = (a0, b0) if block is None else (min(r1, row + block.shape[1]), min(c1, col + block.shape[2]))
        lacking = np.ones((r1 - r0, c1 - c0), bool)
        lacking[a0 - r0:max(a1 - r0, 0), b0 - c0:max(b1 - c0, 0)] = False
        if (lacking & (True if self.keep is None else self.keep)).any() or block is None:
            raise RuntimeError(f"the stream did not reach all the cells tile {self.tile.index} computes")
        if not lacking.any():
            return blank(block[:, r0 - row:r1 - row, c0 - col:c1 - col], self.keep)
        cells = np.full((block.shape[0], r1 - r0, c1 - c0), np.nan, np.float32)
        cells[:, a0 - r0:a1 - r0, b0 - c0:b1 - c0] = block[:, a0 - row:a1 - row, b0 - col:b1 - col]
        return blank(cells, self.keep)


def plan_work(grid: TileGrid, keep: np.ndarray | None, geometry: Geometry,
              size: tuple[int, int]) -> tuple[list[Work], list[Tile]]:
    """The work of the grid's tiles with foreground cells (each shrunk to their bounding box,
    which its smaller read computes exactly as the whole tile would) and the tiles with none."""
    if keep is None:
        return [Work(t, t) for t in grid.tiles], []
    works, skipped = [], []
    for t in grid.tiles:
        r0, r1, c0, c1 = t.cells
        block = keep[r0:r1, c0:c1]
        rows, cols = np.flatnonzero(block.any(axis=1)), np.flatnonzero(block.any(axis=0))
        if not len(rows):
            skipped.append(t)
            continue
        part = shrink(t, _quantized(r0, r1, r0 + int(rows[0]), r0 + int(rows[-1]) + 1),
                      _quantized(c0, c1, c0 + int(cols[0]), c0 + int(cols[-1]) + 1), geometry, size,
                      grid.align)
        works.append(Work(t, part, block))
    return works, skipped


def _quantized(start: int, stop: int, lo: int, hi: int) -> tuple[int, int]:
    """``lo .. hi`` inside ``start .. stop`` grown to half of it or all of it: cut tiles come
    in a few shapes, whose memory the next tiles reuse (cut to any size, the masked map of a
    40k slide peaked at 1.86 GiB, to quarters at 1.74, to halves at 1.56, unmasked at 1.48)."""
    half = -(-(stop - start) // 2)
    length = min(-(-(hi - lo) // half) * half, stop - start)
    lo = min(lo, stop - length)
    return lo, lo + length


def blank(cells: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """``cells`` ``(classes, rows, cols)`` with NaN where ``keep`` (their ``(rows, cols)``
    block of :meth:`Mask.cells`) is False."""
    if keep is None or keep.all():
        return cells
    return np.where(keep[None], cells, np.float32(np.nan))


def check_mask(mask: Any, size: tuple[int, int]) -> Mask:
    """A caller's mask (an array, nonzero = foreground; or a ``.npy`` / image file) for an
    image of ``size``.

    Raises:
        ValueError: not 2-D, empty, or not of the image's aspect ratio.
        TypeError: neither an array nor a path.
    """
    if isinstance(mask, (str, os.PathLike)):
        mask = _read_mask(Path(mask))
    if not hasattr(mask, "shape"):
        raise TypeError(f'mask must be "auto", a 2-D array or a path to one, got {type(mask).__name__}')
    array = np.asarray(mask)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"mask must be a 2-D (rows, cols) array, got shape {array.shape}")
    (h, w), (height, width) = array.shape, size
    if abs(w * height - h * width) > (height + width) / 2:  # more than each side's rounding
        raise ValueError(f"a {h}x{w} mask does not have the {height}x{width} image's aspect ratio; "
                         "pass a mask of the whole image at any resolution")
    return Mask(array.astype(bool))


def auto_mask(pixels: np.ndarray) -> Mask:
    """The foreground of ``pixels``, a low-resolution ``(h, w, 3)`` view of the image (see the
    module docstring).

    Raises:
        ValueError: not 3-channel colour pixels.
    """
    from skimage.filters import threshold_otsu
    from skimage.morphology import dilation

    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError('mask="auto" finds tissue by its colour saturation and needs RGB pixels, got '
                         f"shape {pixels.shape}; pass a mask array")
    saturation = hsv_saturation(pixels)
    spread = float(saturation.max() - saturation.min())
    threshold = min(float(threshold_otsu(saturation)) if spread > 1e-3 else SATURATION_CAP, SATURATION_CAP)
    return Mask(dilation(saturation > threshold, np.ones((3, 3), bool)))


def hsv_saturation(pixels: np.ndarray) -> np.ndarray:
    """HSV saturation, ``(max - min) / max`` over the channels (0 where the max is 0), as
    skimage's ``rgb2hsv`` computes it, without its hue: 0.22 s against 2.0 s on 2000 x 2000
    pixels (the coarsest level of an 8000-px slide), to 2e-16. It needs no scale: any dtype."""
    hi, lo = pixels.max(axis=2), pixels.min(axis=2)
    dtype = hi.dtype if np.issubdtype(hi.dtype, np.floating) else np.float64
    return np.divide((hi - lo).astype(dtype), hi, out=np.zeros(hi.shape, dtype), where=hi > 0)


def low_resolution(array: Any, side: int = AUTO_SIDE) -> np.ndarray:
    """Every ``k``-th pixel of an ``(H, W, C)`` array, ``k`` the smallest step that leaves at most
    ``side`` pixels a side; read in blocks (a lazy array is never loaded whole)."""
    height, width = int(array.shape[0]), int(array.shape[1])
    step = max(math.ceil(max(height, width) / side), 1)
    block = step * max(math.ceil(2048 / step), 1)
    rows = []
    for y in range(0, height, block):
        rows.append(np.concatenate([np.asarray(array[y:min(y + block, height), x:min(x + block, width)])
                                    [::step, ::step] for x in range(0, width, block)], axis=1))
    return np.concatenate(rows, axis=0)


def _read_mask(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"mask {path} does not exist")
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path)
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image.convert("L")) > 0
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the mask {path}: {' '.join(str(exc).split())}") from exc
