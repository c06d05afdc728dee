"""The check a conversion runs on itself before it returns (framework-neutral parts).

Two sizes are checked. At the native size the converted model must equal the original
(``native_error``). At a larger, non-square size (native + ``(2·sy, 3·sx)``: a transposed
map cannot pass) every output map must have exactly the rows and columns the geometry
predicts and, when the model is crop-equivalent, a few cells must equal the original run
on their true crops (``crop_error``). Anything else raises ``NotConvolutionalizable``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .geometry import Geometry

__all__ = ["CHECK_RTOL", "SelfCheck", "check_cells", "check_sizes"]

CHECK_RTOL = 1e-4  # float32, relative to the largest score


@dataclass(frozen=True)
class SelfCheck:
    """What the conversion measured on itself."""

    native_error: float | None  # max relative error at the native size (None: no equality)
    size: tuple[int, int]  # the larger, non-square input that was checked
    cells: tuple[int, int]  # the map's rows and columns there (as the geometry predicts)
    crop_error: float | None  # max relative error of cells vs true crops (crop-equivalent only)

    def describe(self) -> str:
        h, w = self.size
        crops = ("cells not compared with crops (not crop-equivalent)" if self.crop_error is None
                 else f"cells vs true crops {self.crop_error:.1e}")
        return f"self-check at {h}x{w}: map {self.cells[0]}x{self.cells[1]} as predicted, {crops}"


def check_sizes(geometry: Geometry) -> list[tuple[int, int]]:
    """Larger non-square sizes to check, in order of preference: native + (2, 3) strides,
    then native + (2, 3) steps of lcm(stride, native) for blocks that need multiples."""
    (h, w), (sy, sx) = geometry.input_size, geometry.stride
    first = (h + 2 * sy, w + 3 * sx)
    second = (h + 2 * math.lcm(sy, h), w + 3 * math.lcm(sx, w))
    return [first] if second == first else [first, second]


def check_cells(geometry: Geometry, size: tuple[int, int]) -> list[tuple[int, int]]:
    """A few cells whose windows lie inside an image of ``size``: corners and the middle."""
    rows, cols = geometry.cells(*size)
    (sy, sx), (oy, ox), (wh, ww) = geometry.stride, geometry.offset, geometry.window
    inside = [(i, j) for i in range(rows) for j in range(cols)
              if i * sy + oy >= 0 and j * sx + ox >= 0
              and i * sy + oy + wh <= size[0] and j * sx + ox + ww <= size[1]]
    if not inside:
        return []
    picks = [inside[0], inside[-1], inside[len(inside) // 2],
             next((c for c in inside if c[0] == inside[-1][0]), inside[0])]
    return list(dict.fromkeys(picks))
