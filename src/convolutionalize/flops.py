"""FLOP counts: what one dense pass costs against classifying every window crop by crop.

A converted model scores every native-size window of an image in one forward pass that
shares the convolutions of overlapping windows; the crop-by-crop alternative runs the
original classifier once per window. ``compare_flops`` measures both with
``torch.utils.flop_counter.FlopCounterMode`` (matmul and convolution FLOPs, a
multiply-add counting as two) on real tensors of batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .api import geometry_of
from .errors import first_line
from .geometry import Geometry, output_cells

__all__ = ["FlopComparison", "compare_flops", "count_flops"]


def count_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of ``module`` on a zero tensor of ``input_shape``.

    The module runs in eval mode without gradients, on its parameters' device and dtype;
    the training flags of it and its submodules are restored afterwards.
    """
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(input_shape, device=device, dtype=dtype)
    modes = [(m, m.training) for m in module.modules()]
    for m in module.modules():  # not module.eval(): exported programs refuse it (set at export)
        m.training = False
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
    finally:
        for m, training in modes:
            m.training = training
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class FlopComparison:
    """FLOPs of the dense map of one image against running the original on each window.

    ``map_size`` is the converted model's output shape without the batch dimension;
    ``windows`` the number of native-size windows, at the model's stride, whose scores the
    dense pass yields (its map cells for ``pool="window"``).
    """

    image_size: tuple[int, int]
    map_size: tuple[int, ...]
    windows: int
    dense: int
    per_crop: int

    shift_and_stitch: int | None = None  # below the network stride: (S/s)^2 network-stride passes

    @property
    def crop_by_crop(self) -> int:
        return self.per_crop * self.windows

    @property
    def ratio(self) -> float:
        """How many times more FLOPs crop by crop costs than the dense pass."""
        return self.crop_by_crop / self.dense if self.dense else float("inf")


def compare_flops(model: nn.Module, fcn: nn.Module, image_size: tuple[int, int],
                  network: nn.Module | None = None) -> FlopComparison:
    """Count FLOPs of ``fcn`` on an ``image_size`` image and of ``model`` on one window.

    ``network``: the same model converted at its network stride S, when ``fcn`` has an output
    stride s below it; shift-and-stitch then costs (S/s)^2 of its passes over the image
    (counted on the whole image: each shifted copy is up to S pixels smaller, so a little less).

    Raises:
        ValueError: the image is smaller than the native window.
    """
    geometry = geometry_of(fcn)
    (height, width), (h, w) = image_size, geometry.input_size
    rows = output_cells(height, h, geometry.stride[0])
    cols = output_cells(width, w, geometry.stride[1])
    if rows < 1 or cols < 1:
        raise ValueError(
            f"image {height}x{width} is smaller than the {h}x{w} window; pass a larger --image-size"
        )
    channels = fcn.plan.in_channels  # type: ignore[union-attr]
    try:
        map_size = tuple(fcn.output_size(height, width))  # type: ignore[operator]
    except RuntimeError as exc:
        raise ValueError(f"the converted model does not run on a {height}x{width} image: "
                         f"{first_line(exc)}") from exc
    if geometry.pool == "window" and len(map_size) == 3:
        rows, cols = map_size[1], map_size[2]
    return FlopComparison(
        image_size=(height, width),
        map_size=map_size,
        windows=rows * cols,
        dense=count_flops(fcn, (1, channels, height, width)),
        per_crop=count_flops(model, (1, channels, h, w)),
        shift_and_stitch=None if network is None else _shift_and_stitch(network, geometry, channels,
                                                                        (height, width)),
    )


def _shift_and_stitch(network: nn.Module, geometry: Geometry, channels: int, size: tuple[int, int]) -> int:
    shifts = (geometry_of(network).stride[0] // geometry.stride[0]) * (
        geometry_of(network).stride[1] // geometry.stride[1])
    return shifts * count_flops(network, (1, channels, *size))
