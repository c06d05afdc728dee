"""Span arithmetic against brute force, and the Geometry a converted model carries.

Brute force: a real conv / avg-pool stack with all-ones weights (so every gradient that can be
nonzero is positive) is differentiated at one output cell; the input pixels with a nonzero
gradient are that cell's footprint. A cell far from the border is used so that zero padding
never hides part of the footprint; shifting back by ``k * jump`` gives cell 0's span.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convolutionalize import Geometry, Span, convolutionalize
from convolutionalize.geometry import output_cells

# (kind, kernel, stride, padding, dilation) per layer; kernels/strides differ per axis.
Layer = tuple[str, tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]
STACKS: dict[str, list[Layer]] = {
    "single-conv": [("conv", (3, 5), (1, 1), (0, 0), (1, 1))],
    "strided-conv": [("conv", (3, 2), (2, 3), (0, 0), (1, 1))],
    "padded-conv": [("conv", (3, 5), (1, 1), (1, 2), (1, 1))],
    "dilated-conv": [("conv", (3, 3), (1, 1), (0, 0), (2, 3))],
    "stride-above-kernel": [("conv", (2, 1), (3, 2), (0, 0), (1, 1))],
    "avgpool": [("avg", (2, 3), (2, 3), (0, 0), (1, 1))],
    "padded-avgpool": [("avg", (3, 3), (2, 1), (1, 1), (1, 1))],
    "vgg-like": [("conv", (3, 3), (1, 1), (1, 1), (1, 1)), ("conv", (3, 3), (1, 1), (1, 1), (1, 1)),
                 ("avg", (2, 2), (2, 2), (0, 0), (1, 1)), ("conv", (3, 3), (1, 1), (1, 1), (1, 1)),
                 ("avg", (2, 2), (2, 2), (0, 0), (1, 1))],
    "resnet-stem": [("conv", (7, 7), (2, 2), (3, 3), (1, 1)), ("avg", (3, 3), (2, 2), (1, 1), (1, 1)),
                    ("conv", (3, 3), (1, 1), (1, 1), (1, 1))],
    "mixed": [("conv", (5, 3), (2, 1), (2, 0), (1, 2)), ("avg", (2, 2), (1, 2), (0, 1), (1, 1)),
              ("conv", (3, 1), (3, 1), (0, 0), (2, 1)), ("conv", (1, 3), (1, 2), (0, 1), (1, 1))],
}
CELL = 6  # the output cell measured (along both axes), far enough from the border


def _ones_stack(layers: list[Layer]) -> nn.Sequential:
    modules: list[nn.Module] = []
    for kind, kernel, stride, pad, dilation in layers:
        if kind == "conv":
            conv = nn.Conv2d(1, 1, kernel, stride, pad, dilation, bias=False)
            nn.init.ones_(conv.weight)
            modules.append(conv)
        else:
            modules.append(nn.AvgPool2d(kernel, stride, pad))
    return nn.Sequential(*modules)


def _footprint(net: nn.Module, size: int, i: int, j: int) -> tuple[int, int, int, int]:
    """(y_min, y_max, x_min, x_max) of the input pixels output cell (i, j) depends on."""
    x = torch.ones(1, 1, size, size, requires_grad=True)
    out = net(x)
    assert out.shape[2] > i + 1 and out.shape[3] > j + 1, "input too small for the probe"
    out[0, 0, i, j].backward()
    ys, xs = torch.nonzero(x.grad[0, 0] > 0, as_tuple=True)
    found = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    assert min(found) > 0 and max(found) < size - 1, "footprint touches the border"
    return found


def _brute_spans(layers: list[Layer]) -> tuple[Span, Span]:
    net = _ones_stack(layers)
    y0, y1, x0, x1 = _footprint(net, 160, CELL, CELL)
    ny0, _, nx0, _ = _footprint(net, 160, CELL + 1, CELL + 1)
    jy, jx = ny0 - y0, nx0 - x0
    return (Span(y0 - CELL * jy, y1 - CELL * jy, jy), Span(x0 - CELL * jx, x1 - CELL * jx, jx))


def _composed_spans(layers: list[Layer]) -> tuple[Span, Span]:
    ys, xs = Span(), Span()
    for _, kernel, stride, pad, dilation in layers:
        ys = ys.conv(kernel[0], stride[0], pad[0], dilation[0])
        xs = xs.conv(kernel[1], stride[1], pad[1], dilation[1])
    return ys, xs


@pytest.mark.parametrize("layers", list(STACKS.values()), ids=list(STACKS))
def test_span_conv_matches_autograd_footprint(layers: list[Layer]) -> None:
    assert _composed_spans(layers) == _brute_spans(layers)


def test_span_conv_padding_reaches_before_the_image() -> None:
    """Cell 0 of a padded conv reads zero padding: its span starts at a negative index."""
    span = Span().conv(7, 2, 3).conv(3, 2, 1)
    assert (span.lo, span.hi, span.jump, span.size) == (-5, 5, 4, 11)


def test_span_default_is_one_pixel() -> None:
    assert (Span().lo, Span().hi, Span().jump, Span().size) == (0, 0, 1, 1)


class _TwoBranches(nn.Module):
    """Branch a: 2x2 conv at (0, 0); branch b: 2x2 conv on the image shifted by one pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 1, 2, bias=False)
        self.b = nn.Conv2d(1, 1, 2, bias=False)
        nn.init.ones_(self.a.weight)
        nn.init.ones_(self.b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)[:, :, :-1, :-1] + self.b(x[:, :, 1:, 1:])


def test_span_union_matches_autograd_footprint_of_summed_branches() -> None:
    a = Span().conv(2)
    b = Span(1, 1, 1).conv(2)  # cell 0 of the shifted image is pixel 1
    union = Span.union([a, b])
    net = _TwoBranches()
    x = torch.ones(1, 1, 8, 8, requires_grad=True)
    net(x)[0, 0, 0, 0].backward()
    ys, xs = torch.nonzero(x.grad[0, 0] > 0, as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    assert union == Span(y0, y1, 1) == Span(x0, x1, 1) == Span(0, 2, 1)


def test_span_union_of_overlapping_spans() -> None:
    assert Span.union([Span(-1, 3, 2), Span(0, 5, 2), Span(-4, 0, 2)]) == Span(-4, 5, 2)


def test_span_union_of_different_jumps_is_none() -> None:
    assert Span.union([Span(0, 2, 2), Span(0, 2, 4)]) is None


# --------------------------------------------------------------------------- Geometry

WINDOW_GEOMETRY = Geometry(window=(12, 16), stride=(2, 4), offset=(1, 3), receptive_field=(12, 16),
                           crop_equivalent=True, input_size=(12, 16), feature_size=(4, 3))
NONE_GEOMETRY = Geometry(window=(2, 4), stride=(2, 4), offset=(0, 0), receptive_field=None,
                         crop_equivalent=False, input_size=(12, 16), feature_size=(4, 3), pool="none")
GLOBAL_GEOMETRY = Geometry(window=(12, 16), stride=(2, 4), offset=(0, 0), receptive_field=None,
                           crop_equivalent=False, input_size=(12, 16), feature_size=(4, 3),
                           pool="global")

CELLS = {
    "window-native": (WINDOW_GEOMETRY, (12, 16), (1, 1)),
    "window-larger": (WINDOW_GEOMETRY, (12 + 3 * 2, 16 + 5 * 4), (4, 6)),
    "window-between-strides": (WINDOW_GEOMETRY, (13, 19), (1, 1)),
    "none-native": (NONE_GEOMETRY, (12, 16), (4, 3)),
    "none-larger": (NONE_GEOMETRY, (12 + 2 * 2, 16 + 1 * 4), (6, 4)),
    "global-any": (GLOBAL_GEOMETRY, (1000, 37), (1, 1)),
}


@pytest.mark.parametrize(("geometry", "size", "cells"), list(CELLS.values()), ids=list(CELLS))
def test_geometry_cells(geometry: Geometry, size: tuple[int, int], cells: tuple[int, int]) -> None:
    assert geometry.cells(*size) == cells


def test_output_cells_formula() -> None:
    assert [output_cells(n, 7, 3) for n in (7, 9, 10, 13)] == [1, 1, 2, 3]


@pytest.mark.parametrize(
    ("cell", "box"),
    [((0, 0), (3, 1, 19, 13)), ((2, 5), (23, 5, 39, 17)), ((1, 0), (3, 3, 19, 15))],
    ids=["origin", "row2-col5", "row1-col0"],
)
def test_geometry_box(cell: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    """(x0, y0, x1, y1), end exclusive: x follows the column j, y the row i."""
    assert WINDOW_GEOMETRY.box(*cell) == box


@pytest.mark.parametrize("size", [(11, 16), (12, 15), (0, 0)], ids=["short", "narrow", "empty"])
def test_geometry_cells_smaller_than_the_window(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=rf"input {size[0]}x{size[1]} is smaller than the 12x16 "
                                         r"window; pass a larger image or pool='global'"):
        WINDOW_GEOMETRY.cells(*size)


class _Valid(nn.Module):
    """Padding-free: 3x12x18 -> 6x3x7 features (stride 2x2), flatten head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                                  nn.ReLU(), nn.Conv2d(6, 6, (2, 1)))
        self.fc = nn.Linear(6 * 3 * 7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.body(x), 1))


@pytest.fixture(scope="module")
def valid_fcn() -> nn.Module:
    torch.manual_seed(0)
    return convolutionalize(_Valid().eval(), (12, 18))


def test_converted_geometry_fields(valid_fcn: nn.Module) -> None:
    geo = valid_fcn.geometry
    assert (geo.window, geo.stride, geo.offset, geo.feature_size, geo.input_size) == (
        (12, 18), (2, 2), (0, 0), (3, 7), (12, 18))
    # the stride-2 conv leaves the last input row (10 rows -> 4 cells read rows 0..8) unread
    assert geo.crop_equivalent and geo.receptive_field == (11, 17)


@pytest.mark.parametrize("extra", [(0, 0), (1, 0), (0, 3), (4, 2)],
                         ids=["native", "taller", "wider", "both"])
def test_converted_cells_equal_real_map_size(valid_fcn: nn.Module, extra: tuple[int, int]) -> None:
    size = (12 + 2 * extra[0], 18 + 2 * extra[1])
    with torch.no_grad():
        out = valid_fcn(torch.randn(1, 3, *size))
    assert tuple(out.shape[2:]) == valid_fcn.geometry.cells(*size) == (extra[0] + 1, extra[1] + 1)


def test_converted_box_is_the_crop_each_cell_scores(valid_fcn: nn.Module) -> None:
    model = valid_fcn  # the map at each box's crop, taken from a map over the whole image
    image = torch.randn(1, 3, 12 + 2 * 3, 18 + 2 * 2)
    geo = model.geometry
    with torch.no_grad():
        dense = model(image)
        x0, y0, x1, y1 = geo.box(2, 1)
        crop = model(image[:, :, y0:y1, x0:x1])
    assert (x1 - x0, y1 - y0) == (18, 12)
    torch.testing.assert_close(crop[0, :, 0, 0], dense[0, :, 2, 1], rtol=1e-5, atol=1e-6)


def test_converted_receptive_field_matches_autograd_footprint() -> None:
    """Positive weights and input keep every ReLU open, so every read pixel has a gradient."""
    torch.manual_seed(1)
    model = _Valid().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    fcn = convolutionalize(model, (12, 18))
    x = torch.rand(1, 3, 12 + 2 * 2, 18 + 2 * 1, requires_grad=True)
    fcn(x)[0, 0, 1, 1].backward()
    ys, xs = torch.nonzero(x.grad.abs().sum(1)[0] > 0, as_tuple=True)
    x0, y0, _, _ = fcn.geometry.box(1, 1)
    footprint = (int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1)
    assert (int(ys.min()), int(xs.min())) == (y0, x0)
    assert footprint == fcn.geometry.receptive_field


def test_a_padded_network_between_whole_strides_has_a_trailing_cell_past_the_edge() -> None:
    """What ``Geometry.cells`` and the README say: off ``native + k * stride`` a padded network
    rounds up, and its last cell's window hangs less than a stride past the far edge."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    fcn = convolutionalize(net, 16)
    assert fcn.output_size(16, 24)[1:] == (1, 3) == (1, fcn.geometry.cells(16, 24)[1])  # whole strides
    assert fcn.output_size(16, 26)[1:] == (1, 4) and fcn.geometry.cells(16, 26) == (1, 3)
    x1 = fcn.geometry.box(0, 3)[2]
    assert 26 < x1 < 26 + fcn.geometry.stride[1]
