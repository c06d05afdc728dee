"""Heatmaps and detection pictures: cells painted at their window centres (also over
thumbnails, with float geometries), the image pixel for pixel beside a colour-scale strip,
boxes drawn."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from convolutionalize import Geometry
from convolutionalize.detect import Detection
from convolutionalize.inference.pyramid import ScaledGeometry
from convolutionalize.render import draw_detections, heatmap, overlay, paint_map, rank_classes

GEOMETRY = Geometry(window=(12, 12), stride=(2, 2), offset=(0, 0), receptive_field=(12, 12),
                    crop_equivalent=True, input_size=(12, 12), feature_size=(4, 4))
IMAGE = (20, 24)  # a 5x7 map
STRIP = 40  # the colour-scale strip of a small picture: its minimum width


def geometry(window: tuple[int, int], stride: tuple[int, int], offset: tuple[int, int]) -> Geometry:
    return Geometry(window=window, stride=stride, offset=offset, receptive_field=window,
                    crop_equivalent=True, input_size=window, feature_size=(1, 1))


def block_painting(values: np.ndarray, geometry: Geometry, size: tuple[int, int]) -> np.ndarray:
    """Integer painting at one image pixel per picture pixel: each cell's stride block, repeated."""
    (sy, sx), (h, w), (oy, ox) = geometry.stride, geometry.window, geometry.offset
    canvas = np.full(size, np.nan)
    blocks = np.repeat(np.repeat(values, sy, 0), sx, 1)
    top, left = oy + (h - sy) // 2, ox + (w - sx) // 2
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + blocks.shape[0], size[0]), min(left + blocks.shape[1], size[1])
    if y1 > y0 and x1 > x0:
        canvas[y0:y1, x0:x1] = blocks[y0 - top:y1 - top, x0 - left:x1 - left]
    return canvas


def probability_map() -> np.ndarray:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7))
    return np.exp(logits) / np.exp(logits).sum(0)


def test_cells_are_painted_over_their_window_centres() -> None:
    values = np.arange(35, dtype=float).reshape(5, 7)
    painted = paint_map(values, GEOMETRY, IMAGE)
    # cell (i, j): window starts at (2i, 2j), its centre 2x2 block at (2i + 5, 2j + 5)
    for i, j in [(0, 0), (2, 3), (4, 6)]:
        block = painted[2 * i + 5:2 * i + 7, 2 * j + 5:2 * j + 7]
        assert np.all(block == values[i, j])
    assert np.isnan(painted[:5]).all() and np.isnan(painted[:, :5]).all()
    assert np.isnan(painted[15:]).all() and np.isnan(painted[:, 19:]).all()
    assert not np.isnan(painted[5:15, 5:19]).any()


@pytest.mark.parametrize(("window", "stride", "offset", "size"), [
    ((12, 12), (2, 2), (0, 0), (20, 24)),
    ((16, 12), (4, 2), (0, 0), (37, 30)),  # non-square stride and window
    ((12, 9), (3, 2), (-5, -2), (33, 19)),  # odd window - stride: a half-pixel centre
    ((7, 9), (7, 9), (-3, 4), (50, 41)),
    ((5, 5), (1, 1), (-2, -2), (9, 13)),
], ids=["square", "non-square", "negative-offset-odd", "stride-is-window", "stride-1"])
def test_scale_one_paints_the_integer_blocks(window: tuple[int, int], stride: tuple[int, int],
                                             offset: tuple[int, int], size: tuple[int, int]) -> None:
    g = geometry(window, stride, offset)
    rows, cols = (max(1, (n - offset[k] - window[k]) // stride[k] + 2) for k, n in enumerate(size))
    values = np.random.default_rng(1).random((rows, cols))  # one cell too many: cut at the edge
    expected = block_painting(values, g, size)
    assert np.array_equal(paint_map(values, g, size, scale=(1, 1)), expected, equal_nan=True)
    assert np.array_equal(paint_map(values, g, size), expected, equal_nan=True)
    assert not np.isnan(expected).all()


def test_a_thumbnail_paints_each_cell_over_its_shrunk_block() -> None:
    # a 1600 x 1600 image at 1/8: stride 16 is 2 thumbnail pixels, cell i's block [8 + 16i, 24 + 16i)
    values = np.arange(99 * 99, dtype=float).reshape(99, 99)
    painted = paint_map(values, geometry((32, 32), (16, 16), (0, 0)), (200, 200), scale=(1 / 8, 1 / 8))
    for i, j in [(0, 0), (3, 7), (98, 98)]:
        assert np.all(painted[1 + 2 * i:3 + 2 * i, 1 + 2 * j:3 + 2 * j] == values[i, j])
    assert np.isnan(painted[0]).all() and np.isnan(painted[:, 0]).all()
    assert np.isnan(painted[199]).all() and not np.isnan(painted[1:199, 1:199]).any()


def test_a_scaled_geometry_paints_as_the_model_does_on_the_resized_image() -> None:
    # a pyramid level at factor 0.5: cells of the model's 8 x 8 window, stride 4 on the half image
    model = geometry((8, 8), (4, 4), (-2, 1))
    level = ScaledGeometry(model, (0.5, 0.5))
    values = np.random.default_rng(2).random((10, 12))
    on_resized = paint_map(values, model, (44, 52))
    assert np.array_equal(paint_map(values, level, (44, 52), scale=0.5), on_resized, equal_nan=True)
    # at 1:1: window 16, stride 8, offset (-4, 2): cell (i, j) over [8i, 8i + 8) x [8j + 6, 8j + 14)
    original = paint_map(values, level, (88, 104))
    assert np.all(original[0:8, 6:14] == values[0, 0]) and np.all(original[32:40, 22:30] == values[4, 2])
    assert np.isnan(original[:, :6]).all() and np.isnan(original[80:]).all()


def test_nan_cells_are_left_unpainted() -> None:
    values = np.full((5, 7), 0.9)
    values[1:3, 2:5] = np.nan  # skipped background tiles
    painted = paint_map(values, GEOMETRY, IMAGE)
    assert np.isnan(painted[7:11, 9:15]).all() and (painted[5:7, 5:19] == 0.9).all()
    grey = np.full(IMAGE, 0.4)
    pixels = np.asarray(overlay(grey, values, GEOMETRY), np.int16)
    assert (pixels[7:11, 9:15] == round(255 * (0.35 + 0.65 * 0.4))).all()  # the image only
    assert (pixels[5, 5] != pixels[7, 9]).any()
    probs = np.stack([values, 1 - values])
    assert heatmap(grey, probs, GEOMETRY, top=2).size == (2 * (IMAGE[1] + STRIP) + 4, IMAGE[0])
    assert rank_classes(probs, 2) == [0, 1]


def test_a_bad_scale_is_refused() -> None:
    with pytest.raises(ValueError, match=r"scale must be a positive finite factor .* got \(0.5, 0\)"):
        paint_map(np.ones((5, 7)), GEOMETRY, IMAGE, scale=(0.5, 0))


def test_heatmap_is_the_image_and_a_colour_scale_strip() -> None:
    image = Image.new("L", (IMAGE[1], IMAGE[0]), 200)
    picture = heatmap(image, probability_map(), GEOMETRY, class_index=1, labels=["a", "b", "c"])
    assert picture.size == (IMAGE[1] + STRIP, IMAGE[0])


@pytest.mark.parametrize("size", [(29, 57), (120, 96), (300, 1200)], ids=["small", "medium", "wide"])
def test_the_colour_scale_leaves_the_image_uncovered(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(3)
    image, values = rng.random(size), rng.random(GEOMETRY.cells(*size))
    picture = np.asarray(overlay(image, values, GEOMETRY, title="P(a)"))
    bare = np.asarray(overlay(image, values, GEOMETRY, title="P(a)", colorbar=False))
    height, width = size
    assert bare.shape == (height, width, 3) and picture.shape[0] == height
    assert picture.shape[1] - width >= max(STRIP, 0.03 * width)
    assert np.array_equal(picture[:, :width], bare)  # the image area, pixel for pixel
    strip = picture[:, width:]
    assert (strip != 255).any(axis=2).sum() > 0.2 * height  # the bar and its labels
    assert (strip[:, -2:] == 255).all()  # the tick labels fit
    # the right-most columns (no title there): the painted cells blended over the image at 1:1
    painted = paint_map(values, GEOMETRY, size)[:, -8:]
    alpha = np.where(np.isnan(painted), 0.0, 0.1 + 0.85 * np.nan_to_num(painted))[..., None]
    grey = 0.35 + 0.65 * np.round(image[:, -8:] * 255) / 255
    expected = (1 - alpha) * grey[..., None] + alpha * colormaps["turbo"](np.nan_to_num(painted))[..., :3]
    assert np.abs(picture[:, width - 8:width] - np.round(255 * expected)).max() <= 1


def test_top_draws_one_panel_per_class() -> None:
    image = np.ones((64, 80), np.float32)
    probs = np.zeros((3, 27, 35))
    probs[2] = 1.0
    geometry = GEOMETRY
    picture = heatmap(image, probs, geometry, top=2, background_class=2, any_object=True)
    assert picture.size == (3 * (80 + STRIP) + 2 * 4, 64)


def test_rank_skips_background() -> None:
    probs = np.zeros((3, 2, 2))
    probs[0, 0, 0], probs[1, 1, 1], probs[2] = 0.3, 0.6, 0.9
    assert rank_classes(probs, 2, background_class=2) == [1, 0]
    with pytest.raises(ValueError, match="top must be at least 1, got 0"):
        rank_classes(probs, 0)


def test_unknown_class_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown class 3: the model has 3 classes"):
        heatmap(np.ones(IMAGE), probability_map(), GEOMETRY, class_index=3)


def test_draw_detections_marks_the_boxes() -> None:
    image = Image.new("L", (64, 48), 255)
    picture = draw_detections(image, [Detection(1, 0.9, (10, 20, 26, 36))], ["zero", "one"], zoom=2)
    assert picture.size == (128, 96) and picture.mode == "RGB"
    pixels = np.asarray(picture)
    assert (pixels[40:72, 20] != 255).any()  # the box's left edge is drawn
    assert (pixels[60, 30:40] == 255).all()  # inside the box the page shows through
