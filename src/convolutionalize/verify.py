"""Verification: does the converted model equal the original where it should?

Two checks, on fresh random inputs: at the native size the converted model equals the
original; on a larger input, cells compared with the original run on their true crops
(equal for crop-equivalent models; for others the error says how much context matters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .api import check_pool, convolutionalize
from .frameworks.torch_fx import NATIVE_RTOL, relative_error
from .geometry import Geometry, PoolMode

__all__ = ["CROP_RTOL", "VerifyReport", "crop_errors", "verify"]

CROP_RTOL = 1e-4


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

    @property
    def passed(self) -> bool:
        if self.native_error > self.tolerance:
            return False
        return not (self.crop_equivalent and (self.crop_error or 0.0) > self.tolerance)


def crop_errors(model: nn.Module, fcn: nn.Module, image: torch.Tensor,
                cells: list[tuple[int, int]]) -> list[float]:
    """Relative error of each map cell against ``model`` run on that cell's window."""
    geometry: Geometry = fcn.geometry  # type: ignore[assignment]
    with torch.no_grad():
        dense = fcn(image)
        crops = []
        for i, j in cells:
            x0, y0, x1, y1 = geometry.box(i, j)
            crops.append(image[:, :, y0:y1, x0:x1])
        logits = model(torch.cat(crops))
    return [relative_error(dense[0, :, i, j], logits[k]) for k, (i, j) in enumerate(cells)]


def verify(
    model: nn.Module,
    input_size: int | tuple[int, int] | None = None,
    *,
    pool: PoolMode = "window",
    image_size: tuple[int, int] | None = None,
    samples: int = 8,
    seed: int = 0,
) -> VerifyReport:
    """Convert ``model`` and measure how exactly the result reproduces it."""
    pool = check_pool(pool)
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    fcn = convolutionalize(model, input_size, pool=pool)
    geometry: Geometry = fcn.geometry  # type: ignore[assignment]
    native_error = fcn.native_error if fcn.native_error is not None else 0.0
    h, w = geometry.input_size
    sy, sx = geometry.stride
    if image_size is None:
        image_size = (h + 3 * sy, w + 3 * sx)
    if pool != "window":
        return VerifyReport(native_error, None, geometry.crop_equivalent, image_size, 0,
                            NATIVE_RTOL, geometry)
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(1, fcn.plan.in_channels, *image_size, generator=gen)
    param = next(model.parameters(), None)
    if param is not None:
        image = image.to(param.device, param.dtype)
    rows, cols = geometry.cells(*image_size)
    picks = torch.randint(0, rows * cols, (samples,), generator=gen).tolist()
    cells = [(p // cols, p % cols) for p in picks]
    original = _eval_copy(model)
    errors = crop_errors(original, fcn, image, cells)
    return VerifyReport(native_error, max(errors), geometry.crop_equivalent, image_size,
                        samples, CROP_RTOL, geometry)


def _eval_copy(model: nn.Module) -> nn.Module:
    """The model in eval mode without touching the caller's module's mode."""
    if not model.training:
        return model
    import copy

    return copy.deepcopy(model).eval()
