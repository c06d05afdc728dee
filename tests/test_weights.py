"""The weight math: a Linear over a flattened map equals a convolution with the reshaped kernel.

Each case checks the library's kernel against an explicit computation of the Linear on the
flattened map (indices spelled out by loops or einsum), in both flatten orders.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from convolutionalize.weights import dense_to_hwio, linear_to_oihw

SHAPES = {"2x3x4": (2, 3, 4), "1x1x1": (1, 1, 1), "5x1x3": (5, 1, 3), "3x4x1": (3, 4, 1)}
RTOL = 1e-12  # float64 throughout: the kernels only move numbers, sums differ in order only


def _flat_index(layout: str, c: int, h: int, w: int, shape: tuple[int, int, int]) -> int:
    """Where element (c, h, w) of a C x H x W map lands in its flattened vector."""
    channels, height, width = shape
    if layout == "CHW":
        return (c * height + h) * width + w
    return (h * width + w) * channels + c


def _flatten(feature: np.ndarray, layout: str) -> np.ndarray:
    """A (C, H, W) map flattened in ``layout`` order, by explicit index arithmetic."""
    flat = np.empty(feature.size)
    for c, h, w in itertools.product(*map(range, feature.shape)):
        flat[_flat_index(layout, c, h, w, feature.shape)] = feature[c, h, w]
    return flat


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_linear_to_oihw_equals_linear_on_flattened_map(layout: str,
                                                       shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    c, h, w = shape
    weight = rng.standard_normal((7, c * h * w))
    feature = rng.standard_normal(shape)
    kernel = linear_to_oihw(weight, c, h, w, layout)  # type: ignore[arg-type]
    assert kernel.shape == (7, c, h, w)
    expected = weight @ _flatten(feature, layout)
    conv = np.einsum("mchw,chw->m", kernel, feature)  # one conv cell over the whole map
    np.testing.assert_allclose(conv, expected, rtol=RTOL)


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
def test_linear_to_oihw_places_every_weight(layout: str) -> None:
    """Entry-by-entry: kernel[m, c, h, w] is the weight of input (c, h, w) in output m."""
    shape = (3, 2, 4)
    weight = np.arange(5 * 24, dtype=np.float64).reshape(5, 24)
    kernel = linear_to_oihw(weight, *shape, layout=layout)  # type: ignore[arg-type]
    expected = np.empty((5, *shape))
    for m, c, h, w in itertools.product(range(5), *map(range, shape)):
        expected[m, c, h, w] = weight[m, _flat_index(layout, c, h, w, shape)]
    np.testing.assert_array_equal(kernel, expected)


def test_linear_to_oihw_default_layout_is_chw() -> None:
    weight = np.random.default_rng(1).standard_normal((4, 2 * 3 * 5))
    np.testing.assert_array_equal(linear_to_oihw(weight, 2, 3, 5),
                                  linear_to_oihw(weight, 2, 3, 5, "CHW"))


def test_linear_to_oihw_slides_like_the_linear_on_every_window() -> None:
    """Over a larger map, the conv at offset (i, j) is the Linear on that window."""
    rng = np.random.default_rng(2)
    c, h, w = 2, 3, 2
    weight = rng.standard_normal((4, c * h * w))
    big = rng.standard_normal((c, h + 3, w + 2))
    kernel = linear_to_oihw(weight, c, h, w)
    windows = np.lib.stride_tricks.sliding_window_view(big, (h, w), axis=(1, 2))  # C,I,J,h,w
    dense = np.einsum("mchw,cijhw->mij", kernel, windows)
    rows, cols = big.shape[1] - h + 1, big.shape[2] - w + 1
    expected = np.empty((4, rows, cols))
    for i, j in itertools.product(range(rows), range(cols)):
        expected[:, i, j] = weight @ big[:, i:i + h, j:j + w].reshape(-1)
    np.testing.assert_allclose(dense, expected, rtol=RTOL)


@pytest.mark.parametrize("layout", ["HWC", "CHW"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_dense_to_hwio_equals_dense_on_flattened_map(layout: str,
                                                     shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(3)
    c, h, w = shape
    dense_kernel = rng.standard_normal((c * h * w, 6))  # Keras Dense: (inputs, units)
    feature = rng.standard_normal(shape)
    kernel = dense_to_hwio(dense_kernel, c, h, w, layout)  # type: ignore[arg-type]
    assert kernel.shape == (h, w, c, 6)
    expected = _flatten(feature, layout) @ dense_kernel
    conv = np.einsum("hwcm,chw->m", kernel, feature)
    np.testing.assert_allclose(conv, expected, rtol=RTOL)


@pytest.mark.parametrize("layout", ["HWC", "CHW"])
def test_dense_to_hwio_places_every_weight(layout: str) -> None:
    shape = (2, 3, 2)
    dense_kernel = np.arange(12 * 3, dtype=np.float64).reshape(12, 3)
    kernel = dense_to_hwio(dense_kernel, *shape, layout=layout)  # type: ignore[arg-type]
    expected = np.empty((shape[1], shape[2], shape[0], 3))
    for c, h, w, m in itertools.product(*map(range, shape), range(3)):
        expected[h, w, c, m] = dense_kernel[_flat_index(layout, c, h, w, shape), m]
    np.testing.assert_array_equal(kernel, expected)


def test_dense_to_hwio_default_layout_is_hwc() -> None:
    dense_kernel = np.random.default_rng(4).standard_normal((2 * 3 * 5, 4))
    np.testing.assert_array_equal(dense_to_hwio(dense_kernel, 2, 3, 5),
                                  dense_to_hwio(dense_kernel, 2, 3, 5, "HWC"))


def test_linear_and_dense_kernels_agree_for_the_same_layer() -> None:
    """A PyTorch Linear W and the Keras Dense W.T are the same layer: OIHW == HWIO transposed."""
    weight = np.random.default_rng(5).standard_normal((4, 3 * 2 * 5))
    oihw = linear_to_oihw(weight, 3, 2, 5, "HWC")
    hwio = dense_to_hwio(weight.T, 3, 2, 5, "HWC")
    np.testing.assert_array_equal(oihw.transpose(2, 3, 1, 0), hwio)


@pytest.mark.parametrize(
    ("convert", "weight"),
    [(linear_to_oihw, np.zeros((4, 10))), (dense_to_hwio, np.zeros((10, 4)))],
    ids=["linear_to_oihw", "dense_to_hwio"],
)
def test_size_mismatch_is_a_value_error(convert, weight: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"linear layer has 10 inputs, but the flattened map is "
                                         r"2x2x2 = 8"):
        convert(weight, 2, 2, 2)
