"""Verification: does the converted model equal the original where it should?

Two checks, on fresh random inputs, for any framework: at the native size the converted
model equals the original (measured during conversion); on a larger input, map cells are
compared with the original run on their true crops (equal for crop-equivalent models;
for others the error says how much the context seen by the dense map matters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .api import conversion_info, convolutionalize
from .errors import first_line
from .frameworks import adapter_for
from .geometry import Geometry, PoolMode, check_pool
from .selfcheck import CHECK_RTOL, relative_error

__all__ = ["CROP_RTOL", "Runner", "VerifyReport", "crop_errors", "runner", "verify"]

CROP_RTOL = CHECK_RTOL  # float32: the self-check's own tolerance

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` measured.

    ``native_error`` compares at the native size; ``crop_error`` is the maximum relative
    error of ``samples`` map cells against the original on their crops of an
    ``image_size`` input. ``passed`` requires the native check, and for crop-equivalent
    models also the crop check, within ``tolerance``.
    """

    native_error: float
    crop_error: float | None
    crop_equivalent: bool
    image_size: tuple[int, int]
    samples: int
    tolerance: float
    geometry: Geometry
    self_check: str | None = None  # the conversion's own check at a larger size (PyTorch)

    @property
    def passed(self) -> bool:
        if self.native_error > self.tolerance:
            return False
        return not (self.crop_equivalent and (self.crop_error or 0.0) > self.tolerance)


def runner(model: Any) -> Runner:
    """A function from an NCHW float32 batch to the model's class scores (numpy), any framework."""
    return adapter_for(model).runner(model)


def crop_errors(original: Runner, dense: np.ndarray, image: np.ndarray, geometry: Geometry,
                cells: list[tuple[int, int]]) -> list[float]:
    """Relative error of each map cell of ``dense`` against ``original`` on that cell's window."""
    crops = []
    for i, j in cells:
        x0, y0, x1, y1 = geometry.box(i, j)
        crops.append(image[:, :, y0:y1, x0:x1])
    # one crop per call: an exported original may have a static batch size of 1
    logits = np.concatenate([original(crop).reshape(1, -1) for crop in crops])
    return [relative_error(dense[0, :, i, j], logits[k]) for k, (i, j) in enumerate(cells)]


def verify(
    model: Any,
    input_size: int | tuple[int, int] | None = None,
    *,
    pool: PoolMode | None = None,
    image_size: tuple[int, int] | None = None,
    samples: int = 8,
    seed: int = 0,
    output_stride: int | None = None,
) -> VerifyReport:
    """Convert ``model`` (PyTorch, Keras or ONNX; at ``output_stride`` if given) and measure
    how exactly the result reproduces it. The caller's model is not modified.

    A model that is already converted (a saved conversion read back) is measured against
    itself: its cells against its own 1x1 maps on their crops (equal where it is
    crop-equivalent), and its stored native error and self-check are reported."""
    if pool is not None:
        check_pool(pool)
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    fcn = convolutionalize(model, input_size, pool=pool, output_stride=output_stride)
    info = conversion_info(fcn)
    geometry = info.geometry
    native_error = info.native_error if info.native_error is not None else 0.0
    h, w = geometry.input_size
    if image_size is None:
        image_size = (h + 3 * geometry.stride[0], w + 3 * geometry.stride[1])
    if geometry.pool != "window":
        return VerifyReport(native_error, None, geometry.crop_equivalent, image_size, 0,
                            CHECK_RTOL, geometry, info.self_check)
    geometry.cells(*image_size)  # raises a clear error for an image smaller than the window
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((1, info.in_channels, *image_size), dtype=np.float32)
    try:
        dense = runner(fcn)(image)
    except Exception as exc:  # the model's own limits (a block that needs multiples of a size)
        checked = f"; {info.self_check}" if info.self_check else ""
        raise ValueError(f"the converted model does not run at {image_size[0]}x{image_size[1]} "
                         f"({first_line(exc)}){checked}; pass another image_size") from exc
    rows, cols = dense.shape[-2:]
    cells = [(int(p) // cols, int(p) % cols) for p in rng.integers(0, rows * cols, samples)]
    errors = crop_errors(runner(model), dense, image, geometry, cells)
    return VerifyReport(native_error, max(errors), geometry.crop_equivalent, image_size,
                        samples, CROP_RTOL, geometry, info.self_check)
