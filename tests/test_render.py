"""Heatmaps and detection pictures: cells painted at their window centres, PNGs of the
image's size, boxes drawn."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from convolutionalize import Geometry
from convolutionalize.detect import Detection
from convolutionalize.render import draw_detections, heatmap, paint_map, rank_classes

GEOMETRY = Geometry(window=(12, 12), stride=(2, 2), offset=(0, 0), receptive_field=(12, 12),
                    crop_equivalent=True, input_size=(12, 12), feature_size=(4, 4))
IMAGE = (20, 24)  # a 5x7 map


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


def test_heatmap_has_the_image_size() -> None:
    image = Image.new("L", (IMAGE[1], IMAGE[0]), 200)
    picture = heatmap(image, probability_map(), GEOMETRY, class_index=1, labels=["a", "b", "c"])
    assert picture.size == (IMAGE[1], IMAGE[0])


def test_top_draws_one_panel_per_class() -> None:
    image = np.ones((64, 80), np.float32)
    probs = np.zeros((3, 27, 35))
    probs[2] = 1.0
    geometry = GEOMETRY
    picture = heatmap(image, probs, geometry, top=2, background_class=2, any_object=True)
    assert picture.size == (3 * 80 + 2 * 4, 64)


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
