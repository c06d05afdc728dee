"""The weight math of the conversion, on numpy arrays, framework-neutral.

A Linear layer ``W (M, C*H*W)`` that consumes a flattened ``(C, H, W)`` map is a
convolution with ``M`` filters of size ``H x W`` over ``C`` channels. Which kernel
layout that is depends on the order in which the map was flattened.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["FlattenLayout", "dense_to_hwio", "linear_to_oihw"]

FlattenLayout = Literal["CHW", "HWC"]


def _check_size(n_in: int, channels: int, height: int, width: int) -> None:
    if n_in != channels * height * width:
        raise ValueError(
            f"linear layer has {n_in} inputs, but the flattened map is "
            f"{channels}x{height}x{width} = {channels * height * width}"
        )


def linear_to_oihw(
    weight: np.ndarray, channels: int, height: int, width: int, layout: FlattenLayout = "CHW"
) -> np.ndarray:
    """PyTorch-style ``(M, N)`` Linear weight -> ``(M, C, H, W)`` Conv2d kernel.

    ``layout`` is the order the map was flattened in: ``"CHW"`` for an NCHW tensor
    (``torch.flatten``), ``"HWC"`` for a channels-last tensor.
    """
    out_features, n_in = weight.shape
    _check_size(n_in, channels, height, width)
    if layout == "CHW":
        return weight.reshape(out_features, channels, height, width)
    return weight.reshape(out_features, height, width, channels).transpose(0, 3, 1, 2)


def dense_to_hwio(
    kernel: np.ndarray, channels: int, height: int, width: int, layout: FlattenLayout = "HWC"
) -> np.ndarray:
    """Keras-style ``(N, M)`` Dense kernel -> ``(H, W, C, M)`` Conv2D kernel.

    Keras flattens channels-last (``"HWC"``), also for channels_first models.
    """
    n_in, out_features = kernel.shape
    _check_size(n_in, channels, height, width)
    if layout == "HWC":
        return kernel.reshape(height, width, channels, out_features)
    return kernel.reshape(channels, height, width, out_features).transpose(1, 2, 0, 3)
