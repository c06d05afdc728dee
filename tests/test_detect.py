"""Detection: planted peaks become the right boxes, NMS removes duplicates, empty maps give
nothing, bad options are refused naming the value."""

from __future__ import annotations

import json

import numpy as np
import pytest

from convolutionalize import Geometry
from convolutionalize.detect import Detection, box_iou, detect

GEOMETRY = Geometry(window=(16, 16), stride=(2, 2), offset=(0, 0), receptive_field=(16, 16),
                    crop_equivalent=True, input_size=(16, 16), feature_size=(4, 4))
CLASSES, BACKGROUND, ROWS, COLS = 4, 3, 20, 24


def empty_map() -> np.ndarray:
    probs = np.full((CLASSES, ROWS, COLS), 0.01)
    probs[BACKGROUND] = 1.0 - 0.01 * (CLASSES - 1)
    return probs


def plant(probs: np.ndarray, label: int, i: int, j: int, peak: float) -> None:
    """A blob of ``label`` centred on cell (i, j): ``peak`` there, less around it."""
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            p = peak if di == dj == 0 else peak * 0.7
            probs[label, i + di, j + dj] = max(probs[label, i + di, j + dj], p)
            probs[BACKGROUND, i + di, j + dj] = 1.0 - p


def test_planted_peaks_give_their_windows() -> None:
    probs = empty_map()
    plant(probs, 0, 5, 7, 0.9)
    plant(probs, 2, 15, 3, 0.8)
    found = detect(probs, GEOMETRY, background_class=BACKGROUND)
    assert found == [Detection(0, pytest.approx(0.9), GEOMETRY.box(5, 7)),
                     Detection(2, pytest.approx(0.8), GEOMETRY.box(15, 3))]
    assert found[0].box == (14, 10, 30, 26)


def test_no_objects_no_detections() -> None:
    assert detect(empty_map(), GEOMETRY, background_class=BACKGROUND) == []


def test_background_class_is_never_reported() -> None:
    found = detect(empty_map(), GEOMETRY, threshold=0.5)
    assert found and {d.label for d in found} == {BACKGROUND}


def test_nms_removes_duplicates_of_a_class() -> None:
    probs = empty_map()
    plant(probs, 1, 8, 8, 0.95)
    plant(probs, 1, 8, 11, 0.85)  # two local maxima, windows 6 pixels apart: IoU 0.45
    assert box_iou(GEOMETRY.box(8, 8), GEOMETRY.box(8, 11)) > 0.3
    found = detect(probs, GEOMETRY, background_class=BACKGROUND)
    assert [(d.label, d.box) for d in found] == [(1, GEOMETRY.box(8, 8))]
    assert len(detect(probs, GEOMETRY, background_class=BACKGROUND, iou=0.5)) == 2


def test_exclusive_iou_suppresses_other_classes_in_the_same_place() -> None:
    probs = empty_map()
    plant(probs, 0, 8, 8, 0.95)
    probs[2, 8, 9] = 0.6  # a second class on a neighbouring cell
    assert len(detect(probs, GEOMETRY, background_class=BACKGROUND)) == 2
    found = detect(probs, GEOMETRY, background_class=BACKGROUND, exclusive_iou=0.5)
    assert [d.label for d in found] == [0]


def test_saturated_plateau_resolves_to_its_centre() -> None:
    probs = empty_map()
    probs[0, 4:7, 9:12] = 1.0  # a 3x3 plateau of equal probabilities
    found = detect(probs, GEOMETRY, background_class=BACKGROUND)
    assert [d.box for d in found] == [GEOMETRY.box(5, 10)]


def test_to_dict_is_json() -> None:
    record = Detection(3, 0.5, (1, 2, 3, 4)).to_dict()
    assert json.loads(json.dumps(record)) == {"label": 3, "score": 0.5, "box": [1, 2, 3, 4]}


@pytest.mark.parametrize(("options", "message"), [
    ({"threshold": 0.0}, "threshold must be in \\(0, 1\\], got 0.0"),
    ({"threshold": 1.5}, "threshold must be in \\(0, 1\\], got 1.5"),
    ({"background_class": 4}, "background class 4 is out of range"),
    ({"iou": -0.1}, "iou must be in \\[0, 1\\], got -0.1"),
])
def test_bad_options(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        detect(empty_map(), GEOMETRY, **options)  # type: ignore[arg-type]


def test_map_must_be_three_dimensional() -> None:
    with pytest.raises(ValueError, match="must be \\(classes, rows, cols\\)"):
        detect(np.zeros((4, 5)), GEOMETRY)
