"""The check a conversion runs on itself before it returns (framework-neutral parts).

Two sizes are checked. At the native size the converted model must equal the original
(``native_error``). At a larger, non-square size (native + ``(2·sy, 3·sx)``: a transposed
map cannot pass) every output map must have exactly the rows and columns the geometry
predicts and, when the model is crop-equivalent, a few cells must equal the original run
on their true crops (``crop_error``). Anything else raises ``NotConvolutionalizable``. A
model that runs only at multiples of some size is checked at the next size, and the check
records where it did not run (``refused``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import NotConvolutionalizable, first_line
from .geometry import Geometry

__all__ = ["CHECK_RTOL", "SelfCheck", "check_cells", "check_larger", "check_sizes"]

CHECK_RTOL = 1e-4  # float32, relative to the largest score


@dataclass(frozen=True)
class SelfCheck:
    """What the conversion measured on itself."""

    native_error: float | None  # max relative error at the native size (None: no equality)
    size: tuple[int, int]  # the larger, non-square input that was checked
    cells: tuple[int, int]  # the map's rows and columns there (as the geometry predicts)
    crop_error: float | None  # max relative error of cells vs true crops (crop-equivalent only)
    refused: tuple[str, ...] = ()  # the sizes checked first, where it did not run ("at HxW: why")

    def describe(self) -> str:
        h, w = self.size
        crops = ("cells not compared with crops (not crop-equivalent)" if self.crop_error is None
                 else f"cells vs true crops {self.crop_error:.1e}")
        refused = f"; it does not run {'; '.join(self.refused)}" if self.refused else ""
        return f"self-check at {h}x{w}: map {self.cells[0]}x{self.cells[1]} as predicted, {crops}{refused}"


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


def check_larger(geometry: Geometry, native_error: float | None,
                 runs: Iterable[tuple[tuple[int, int], Callable[[], Sequence[Any]]]],
                 cells_of: Callable[[Any], tuple[int, int] | None],
                 crop_error: Callable[[tuple[int, int], Sequence[Any]], float | None]) -> SelfCheck:
    """The larger-size half of the check, for any framework.

    ``runs`` gives, per size of :func:`check_sizes`, a function returning the converted
    model's output maps there; the first size the model runs at is checked: every map must
    have the rows and columns the geometry predicts (``cells_of(map)``: its spatial size, or
    None when it is not a 4-D map) and ``crop_error`` (None: not compared) must stay within
    :data:`CHECK_RTOL`. Raises NotConvolutionalizable saying what differed.
    """
    failures = []
    for size, run in runs:
        try:
            maps = run()
        except Exception as exc:  # e.g. a block that needs multiples of its size
            failures.append(f"at {size[0]}x{size[1]}: {first_line(exc)}")
            continue
        shapes = [getattr(m, "shape", None) for m in maps]
        cells = _check_shapes(geometry, [cells_of(m) for m in maps], shapes, size)
        error = crop_error(size, maps)
        if error is not None and error > CHECK_RTOL:
            raise NotConvolutionalizable(
                f"the converted model's map at {size[0]}x{size[1]} differs from the original on "
                f"the true crops of its cells (max relative error {error:.2e}); the head's "
                "geometry or flatten order was misread")
        return SelfCheck(native_error, size, cells, error, tuple(failures))
    raise NotConvolutionalizable("the converted model does not run at sizes larger than the "
                                 f"native one ({'; '.join(failures)}); it cannot slide")


def _check_shapes(geometry: Geometry, spatial: list[tuple[int, int] | None], shapes: list[Any],
                  size: tuple[int, int]) -> tuple[int, int]:
    if geometry.pool == "global":
        bad = [tuple(shape) for cells, shape in zip(spatial, shapes) if cells is not None]
        if bad:
            raise NotConvolutionalizable(f"with pool='global' the converted model returns {bad} "
                                         f"at {size[0]}x{size[1]}, not (N, classes)")
        return (1, 1)
    expected = geometry.cells(*size)
    native = geometry.cells(*geometry.input_size)
    for cells, shape in zip(spatial, shapes):
        if cells == native != expected:
            raise NotConvolutionalizable(
                f"at {size[0]}x{size[1]} the converted model returns a map of shape {tuple(shape)}, "
                "as at the native size: its map does not grow with the input, so something in the "
                "body brings every input to one size (an interpolate or an adaptive pool to a fixed "
                "size, say); it cannot slide")
        if cells != expected:
            raise NotConvolutionalizable(
                f"at {size[0]}x{size[1]} the converted model returns a map of shape "
                f"{tuple(shape)}, but its geometry predicts {expected[0]}x{expected[1]} cells; "
                "the map is transposed or the geometry was misread")
    return expected
