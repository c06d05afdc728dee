"""The weight math of the conversion, on numpy arrays, framework-neutral.

A Linear layer ``W (M, C*H*W)`` that consumes a flattened ``(C, H, W)`` map is a
convolution with ``M`` filters of size ``H x W`` over ``C`` channels. Which kernel
layout that is depends on the order in which the map was flattened.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FlattenLayout", "dense_to_hwio", "linear_to_oihw"]

# The order of the map's axes in the flattened vector: "CHW" (an NCHW tensor flattened), "HWC"
# (channels-last), or any other permutation of C, H and W (e.g. "WHC" after permute(0, 3, 2, 1)).
FlattenLayout = str


def _check_size(n_in: int, channels: int, height: int, width: int) -> None:
    if n_in != channels * height * width:
        raise ValueError(
            f"linear layer has {n_in} inputs, but the flattened map is "
            f"{channels}x{height}x{width} = {channels * height * width}"
        )


def _unflatten(rows: np.ndarray, channels: int, height: int, width: int, layout: FlattenLayout,
               target: str) -> np.ndarray:
    """``rows`` (K, C*H*W in ``layout`` order) -> (K, *target order) for ``target`` a permutation of CHW."""
    if sorted(layout) != ["C", "H", "W"] or sorted(target) != ["C", "H", "W"]:
        raise ValueError(f"flatten layout must be a permutation of 'CHW', got {layout!r}")
    size = {"C": channels, "H": height, "W": width}
    unflat = rows.reshape(rows.shape[0], *(size[a] for a in layout))
    return unflat.transpose(0, *(1 + layout.index(a) for a in target))


def linear_to_oihw(
    weight: np.ndarray, channels: int, height: int, width: int, layout: FlattenLayout = "CHW"
) -> np.ndarray:
    """PyTorch-style ``(M, N)`` Linear weight -> ``(M, C, H, W)`` Conv2d kernel.

    ``layout`` is the order the map was flattened in: ``"CHW"`` for an NCHW tensor
    (``torch.flatten``), ``"HWC"`` for a channels-last tensor, ``"WHC"`` after
    ``permute(0, 3, 2, 1)``, and so on.
    """
    _check_size(weight.shape[1], channels, height, width)
    return _unflatten(weight, channels, height, width, layout, "CHW")


def dense_to_hwio(
    kernel: np.ndarray, channels: int, height: int, width: int, layout: FlattenLayout = "HWC"
) -> np.ndarray:
    """Keras-style ``(N, M)`` Dense kernel -> ``(H, W, C, M)`` Conv2D kernel.

    Keras flattens channels-last (``"HWC"``), also for channels_first models; a ``Permute``
    before the ``Flatten`` gives another order.
    """
    _check_size(kernel.shape[0], channels, height, width)
    return np.moveaxis(_unflatten(kernel.T, channels, height, width, layout, "HWC"), 0, -1)
