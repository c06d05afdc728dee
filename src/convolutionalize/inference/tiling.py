"""Exact tiling of a dense map: which input rectangle each tile reads, which cells it owns.

The map's cells are split into blocks of ``cells_per_tile`` rows and columns; the tile for
block ``(ti, tj)`` owns those cells. It reads the input pixels their windows cover plus a
halo that covers the rest of their receptive field, with the read starting on a multiple
of the stride, so the network's grid inside the tile lines up with its grid over the whole
image: tile cell ``k`` is image cell ``start / stride + k``. Cells whose footprint lies inside
the tile (or reaches the image border exactly where the image does) then see the same pixels
and the same zero padding as in the whole-image pass, so the stitched map equals it.

When the geometry has no finite receptive field (global context) no halo is exact; the window
is used as the halo and the caller warns that tiling changes the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..geometry import Geometry

__all__ = ["Tile", "TileGrid", "halo_of", "plan_tiles", "shrink"]


@dataclass(frozen=True)
class Tile:
    """One tile: the input rectangle it reads and the map cells it owns (ends exclusive)."""

    index: tuple[int, int]
    read: tuple[int, int, int, int]  # y0, y1, x0, x1 in input pixels
    cells: tuple[int, int, int, int]  # r0, r1, c0, c1 in map cells
    first_cell: tuple[int, int]  # the map cell that the tile's own output cell (0, 0) is

    @property
    def shape(self) -> tuple[int, int]:
        return (self.read[1] - self.read[0], self.read[3] - self.read[2])

    def crop(self) -> tuple[slice, slice]:
        """Where the owned cells sit in the tile's own output."""
        (r0, r1, c0, c1), (fr, fc) = self.cells, self.first_cell
        return slice(r0 - fr, r1 - fr), slice(c0 - fc, c1 - fc)


@dataclass(frozen=True)
class TileGrid:
    """All tiles of a map of ``rows x cols`` cells, ``cells_per_tile`` cells a side."""

    tiles: tuple[Tile, ...]
    grid: tuple[int, int]
    cells_per_tile: tuple[int, int]
    halo: tuple[tuple[int, int], tuple[int, int]]  # (before, after) pixels per axis
    align: tuple[int, int] = (1, 1)  # reads end on multiples of these (or at the image's end)


def halo_of(geometry: Geometry) -> tuple[tuple[tuple[int, int], tuple[int, int]], bool]:
    """Pixels of context ``(before, after)`` per axis around the owned windows, and whether
    that is exact.

    A cell's receptive field starts ``receptive_offset`` pixels from its window's origin and
    spans ``receptive_field``: a tile that holds it computes the cell exactly as the whole
    image does (every zero a tile edge introduces lies outside it).
    """
    if geometry.receptive_field is None or geometry.receptive_offset is None:
        return ((geometry.window[0],) * 2, (geometry.window[1],) * 2), False
    halos = tuple(
        (max(-lo, 0), max(lo + rf - window, 0))
        for lo, rf, window in zip(geometry.receptive_offset, geometry.receptive_field,
                                  geometry.window)
    )
    return halos, True  # type: ignore[return-value]


def plan_tiles(
    geometry: Geometry,
    image_size: tuple[int, int],
    map_size: tuple[int, int],
    tile: int | tuple[int, int],
    align: tuple[int, int] = (1, 1),
) -> TileGrid:
    """Tiles of ``tile`` input pixels a side (rounded down to whole strides, at least one).

    Args:
        geometry: the converted model's geometry.
        image_size: ``(H, W)`` of the input.
        map_size: ``(rows, cols)`` of the whole-image map (``fcn.output_size``).
        tile: input pixels between the starts of neighbouring tiles (or ``(rows, cols)`` of them).
        align: per axis, a multiple that every read's end is rounded up to (unless it ends at the
            image's end): the stride for networks that run only on such sides (DLA's shortcuts
            add a stride-2 convolution to a 2x2 max pool, which agree on even sides only).
    """
    halo, _ = halo_of(geometry)
    sides = (tile, tile) if isinstance(tile, int) else tile
    per_tile = tuple(max(side // s, 1) for side, s in zip(sides, geometry.stride))
    grid = tuple(math.ceil(n / p) for n, p in zip(map_size, per_tile))
    axes = [
        [_span(i * per_tile[a], min((i + 1) * per_tile[a], map_size[a]), image_size[a], geometry, halo[a],
               align[a], a) for i in range(grid[a])]
        for a in (0, 1)
    ]
    tiles = tuple(
        Tile((ti, tj), (ry[0], ry[1], rx[0], rx[1]), (ry[2], ry[3], rx[2], rx[3]), (ry[4], rx[4]))
        for ti, ry in enumerate(axes[0])
        for tj, rx in enumerate(axes[1])
    )
    return TileGrid(tiles, (grid[0], grid[1]), (per_tile[0], per_tile[1]), halo, align)


def _span(c0: int, c1: int, size: int, geometry: Geometry, halo: tuple[int, int], align: int,
          axis: int) -> tuple[int, int, int, int, int]:
    """What computes cells ``c0 .. c1 - 1`` along one axis: (read start, read end, first owned
    cell, end owned cell, first tile cell)."""
    stride, offset, window = geometry.stride[axis], geometry.offset[axis], geometry.window[axis]
    start = max(c0 * stride + offset - halo[0], 0) // stride * stride
    end = min(-(-((c1 - 1) * stride + offset + window + halo[1]) // align) * align, size)
    return start, end, c0, c1, start // stride


def shrink(tile: Tile, rows: tuple[int, int], cols: tuple[int, int], geometry: Geometry,
           image_size: tuple[int, int], align: tuple[int, int] = (1, 1)) -> Tile:
    """``tile`` computing only its cells ``rows x cols`` (map cells, ends exclusive, inside the
    tile's own): the smaller read that computes them as exactly as the whole tile does."""
    halo, _ = halo_of(geometry)
    ry = _span(rows[0], rows[1], image_size[0], geometry, halo[0], align[0], 0)
    rx = _span(cols[0], cols[1], image_size[1], geometry, halo[1], align[1], 1)
    return Tile(tile.index, (ry[0], ry[1], rx[0], rx[1]), (ry[2], ry[3], rx[2], rx[3]), (ry[4], rx[4]))
