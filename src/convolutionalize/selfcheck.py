"""The check every conversion runs on itself before it returns, for every framework.

An adapter hands over two functions from an NCHW float32 batch to every output of a model
(maps as ``(N, classes, rows, cols)``, vectors as ``(N, classes)``, numpy): the original,
run while it is still intact (:class:`Reference`), and the converted model
(:meth:`Reference.check`). Everything else is decided here, once:

- at the native size every output of the converted model equals the original's (the 1x1
  window map, the global prediction, or for ``pool="none"`` on an affine head the mean of
  the map), within :func:`tolerance` of the model's precision;
- at a larger, non-square size (native + ``(2·sy, 3·sx)``: a transposed map cannot pass)
  every output map has exactly the rows and columns the geometry predicts (a map that stays
  at its native size is diagnosed: something resizes every input), and, when the model is
  crop-equivalent, a few cells equal the original run on their true crops.

Anything else raises ``NotConvolutionalizable``. A model that runs only at multiples of some
size is checked at the next size, and the check records where it did not run (``refused``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import NotConvolutionalizable, first_line
from .geometry import Geometry
from .plan import HeadPlan

__all__ = ["CHECK_RTOL", "TOLERANCES", "Reference", "Run", "SelfCheck", "check_cells", "check_sizes",
           "relative_error", "tolerance"]

Run = Callable[[np.ndarray], list[np.ndarray]]  # NCHW float32 batch -> every output (NCHW maps)

# Max relative error (of the largest magnitude) allowed between a converted model and its
# original, by the precision the model computes in. A rewrite changes the order in which a
# linear layer's products are summed; the rounding of that alone reaches ~1e-6 in float32,
# ~1e-3 in float16 (11-bit mantissa) and ~1e-2 in bfloat16 (8-bit). A misread head (a wrong
# flatten order, a shifted window) is off by the size of the scores themselves.
# A statically quantized model ("quantized": any of its tensors is quantized) computes in
# integers: its converted head holds the same int8 weights and requantizes with the same scales,
# so it gives the same integers (measured: 0 steps of the output scale, at the native size and
# on true crops, with the x86, fbgemm, onednn and qnnpack engines). One step of an 8-bit output
# is at least 1/255 of its largest magnitude, so 1e-4 asks for equality: the tolerance is
# exactness: a conversion that changes one integer of an output is refused.
# A pt2e-quantized graph ("pt2e") computes in float32 between 8-bit quantize/dequantize pairs: its
# converted head sums the same products in another order, so a value within a float rounding of a
# quantization boundary can round to the neighbouring step, which later layers carry on. Measured
# (15 random padding-free CNNs, X86Inductor and XNNPACK quantizers, 3150 cells): native size 0 to
# 3e-7; cells vs true crops up to 1.4e-3 (float output) and 8.3e-3 (one step of an 8-bit output,
# 1 cell in 3150); 2e-2 allows that step and still refuses a misread head (off by whole scores).
TOLERANCES = {"float64": 1e-4, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2, "quantized": 1e-4,
              "pt2e": 2e-2}
CHECK_RTOL = TOLERANCES["float32"]


def tolerance(precision: str = "float32") -> float:
    """The self-check's tolerance for a model computing in ``precision`` (a dtype name)."""
    return TOLERANCES.get(str(precision).rsplit(".", 1)[-1], CHECK_RTOL)


def relative_error(actual: Any, expected: Any) -> float:
    """``max |actual - expected| / max |expected|`` in float64 (numpy arrays or anything
    ``np.asarray`` takes)."""
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(a - e).max() / max(float(np.abs(e).max()), 1e-30))


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SelfCheck | None:
        if data is None:
            return None
        return cls(data["native_error"], tuple(data["size"]), tuple(data["cells"]),  # type: ignore[arg-type]
                   data["crop_error"], tuple(data.get("refused", ())))


LARGEST = 16  # the largest check size, in native areas


def check_sizes(geometry: Geometry) -> list[tuple[int, int]]:
    """Larger non-square sizes to check, in order of preference: native + (2, 3) strides,
    then native + (2, 3) steps of lcm(stride, native) for blocks that need multiples (windowed
    attention), where that is at most :data:`LARGEST` times the native area (inception's 299 and
    stride 32 would ask for 19435x29003)."""
    (h, w), (sy, sx) = geometry.input_size, geometry.stride
    first = (h + 2 * sy, w + 3 * sx)
    second = (h + 2 * math.lcm(sy, h), w + 3 * math.lcm(sx, w))
    if second == first or second[0] * second[1] > LARGEST * h * w:
        return [first]
    return [first, second]


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


def random_image(channels: int, size: tuple[int, int], batch: int = 1, seed: int = 0) -> np.ndarray:
    """The check's random NCHW float32 input (seeded: a conversion checks itself the same way
    every time)."""
    return np.random.default_rng(seed).standard_normal((batch, channels, *size), dtype=np.float32)


class Reference:
    """The original model's outputs on the check's inputs, measured before the rewrite.

    ``original`` runs the unconverted model; ``network_stride=False`` marks a denser (à trous)
    map, whose ``pool="none"`` mean averages other positions than the original's and is not
    compared. ``batch`` images are run at the larger size (a graph whose body fixes the batch
    is checked with ``batch=1``).
    """

    def __init__(self, original: Run, plan: HeadPlan, geometry: Geometry, *, precision: str = "float32",
                 network_stride: bool = True) -> None:
        self.plan, self.geometry, self.network_stride = plan, geometry, network_stride
        self.tolerance = tolerance(precision)
        # a quantized head rounds the scores of every cell: the mean of a rounded map is not the
        # rounded mean, so a pool="none" map is not compared with the logits there
        self.rounds = precision in ("quantized", "pt2e")
        self.native_input = random_image(plan.in_channels, plan.input_size)
        self.native = original(self.native_input)
        self.crops: dict[tuple[int, int], list[tuple[tuple[int, int], list[np.ndarray]]]] = {}
        for size in check_sizes(geometry):
            image = random_image(plan.in_channels, size, seed=2)
            cells = check_cells(geometry, size) if geometry.crop_equivalent else []
            self.crops[size] = self._originals(original, image, cells)

    def _originals(self, original: Run, image: np.ndarray, cells: list[tuple[int, int]]
                   ) -> list[tuple[tuple[int, int], list[np.ndarray]]]:
        """The original on the true crops of ``cells``. A window other than the native size
        (padding made explicit around a stem) is compared where the original runs on it."""
        try:
            return [(cell, original(self._crop(image, cell))) for cell in cells]
        except Exception:
            if self.geometry.window == self.plan.input_size:
                raise
            return []

    def _crop(self, image: np.ndarray, cell: tuple[int, int]) -> np.ndarray:
        x0, y0, x1, y1 = self.geometry.box(*cell)
        return image[:1, :, y0:y1, x0:x1]

    def check(self, converted: Run, batch: int = 1) -> SelfCheck:
        """Compare ``converted`` with the original (see the module docstring)."""
        error = self.native_error(converted(self.native_input))
        failures = []
        for size, crops in self.crops.items():
            image = np.repeat(random_image(self.plan.in_channels, size, seed=2), batch, axis=0)
            try:
                maps = converted(image)
            except Exception as exc:  # e.g. a block that needs multiples of its size
                failures.append(f"at {size[0]}x{size[1]}: {first_line(exc)}")
                continue
            cells = self._check_shapes(maps, size, batch)
            errors = [relative_error(m[0, :, i, j], e.reshape(-1))
                      for (i, j), expected in crops for m, e in zip(maps, expected)]
            crop_error = max(errors) if errors else None
            if crop_error is not None and crop_error > self.tolerance:
                raise NotConvolutionalizable(
                    f"the converted model's map at {size[0]}x{size[1]} differs from the original on "
                    f"the true crops of its cells (max relative error {crop_error:.2e}); the head's "
                    "geometry or flatten order was misread")
            return SelfCheck(error, size, cells, crop_error, tuple(failures))
        raise NotConvolutionalizable("the converted model does not run at sizes larger than the "
                                     f"native one ({'; '.join(failures)}); it cannot slide")

    def native_error(self, maps: list[np.ndarray]) -> float | None:
        """Max relative error over the outputs at the native size (None: nothing to compare);
        raises when it is over the tolerance or the map is not the native one."""
        if len(maps) != len(self.native):
            raise NotConvolutionalizable(f"the rewritten model has {len(maps)} outputs, the original "
                                         f"{len(self.native)}")
        errors = [self._output_error(out, expected) for out, expected in zip(maps, self.native)]
        error = None if not errors or None in errors else max(e for e in errors if e is not None)
        if error is not None and error > self.tolerance:
            raise NotConvolutionalizable(
                f"the rewritten model differs from the original at the native size (max relative "
                f"error {error:.2e}); a head operation has no exact sliding form")
        return error

    def _output_error(self, out: np.ndarray, expected: np.ndarray) -> float | None:
        pool = self.geometry.pool
        if pool == "global" or out.ndim == 2:
            return relative_error(out.reshape(len(out), -1), expected.reshape(len(expected), -1))
        if out.ndim != 4:
            raise NotConvolutionalizable(f"at the native size the converted model returns shape "
                                         f"{out.shape}, not (N, classes, rows, cols)")
        if pool == "window" or (out.shape[-2:] == (1, 1) and not self.plan.global_pooling):
            if out.shape[-2:] != (1, 1):
                raise NotConvolutionalizable(f"at the native size the map is {out.shape}, not "
                                             "(N, classes, 1, 1); the head's geometry was misread")
            return relative_error(out.reshape(expected.shape), expected)
        # a denser CAM averages other places; a quantized one rounds each cell
        if not self.network_stride or not self.plan.affine or self.rounds:
            return None
        return relative_error(out.mean((2, 3)).reshape(expected.shape), expected)

    def _check_shapes(self, maps: list[np.ndarray], size: tuple[int, int], batch: int) -> tuple[int, int]:
        geometry = self.geometry
        if geometry.pool == "global":
            bad = [m.shape for m in maps if m.ndim != 2]
            if bad:
                raise NotConvolutionalizable(f"with pool='global' the converted model returns {bad} "
                                             f"at {size[0]}x{size[1]}, not (N, classes)")
            return (1, 1)
        expected = geometry.cells(*size)
        native = geometry.cells(*geometry.input_size)
        for m in maps:
            cells = tuple(m.shape[-2:]) if m.ndim == 4 else None
            if cells == native != expected:
                raise NotConvolutionalizable(
                    f"at {size[0]}x{size[1]} the converted model returns a map of shape {m.shape}, "
                    "as at the native size: its map does not grow with the input, so something in the "
                    "body brings every input to one size (an interpolate or an adaptive pool to a fixed "
                    "size, say); it cannot slide")
            if cells != expected:
                raise NotConvolutionalizable(
                    f"at {size[0]}x{size[1]} the converted model returns a map of shape {m.shape}, "
                    f"but its geometry predicts {expected[0]}x{expected[1]} cells; the map is "
                    "transposed or the geometry was misread")
            if m.shape[0] != batch:
                raise NotConvolutionalizable(f"a batch of {batch} gives a map of shape {m.shape}")
        return expected  # type: ignore[return-value]
