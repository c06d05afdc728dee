"""Detection: planted peaks become the right boxes, NMS removes duplicates, empty maps give
nothing, bad options are refused naming the value; across scales (an image pyramid), squares
of three sizes are found with their exact windows in the image's pixels; box regression moves
the boxes exactly as MTCNN's formula says; the CLI's ``--scales`` and ``--box-output``."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from convolutionalize import Geometry, convolutionalize
from convolutionalize.cli import main
from convolutionalize.detect import (
    BOX_DECODERS,
    Detection,
    box_iou,
    detect,
    detect_objects,
    detection_maps,
    mtcnn_boxes,
)
from convolutionalize.inference import ScaledGeometry, ScaledMap

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


# --------------------------------------------------------------------------- across scales
# A hand-weighted detector, so the expected boxes are known exactly.

WINDOW, K, CUT = 10, 20.0, 0.7  # the detector: 10x10 window, an 8x8 bright square in a dark ring


class SquareDetector(nn.Module):
    """Padding-free, hand-weighted: class 1 fires on a bright 8x8 square centred in a dark 10x10
    window (mean inside minus twice the mean of the 1-pixel ring, above ``CUT``); a window inside
    a larger square (bright ring) or on a smaller one scores low. Returns ``(scores, box)``; the
    box head is a constant: zero weights, bias ``(0.1, 0.2, -0.1, -0.2)``.

    At module level so that ``torch.load`` can unpickle the CLI test's model file.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 1, 1)
        self.scores = nn.Linear(WINDOW * WINDOW, 2)
        self.box = nn.Linear(WINDOW * WINDOW, 4)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
            self.features.bias.zero_()
            inner = torch.zeros(WINDOW, WINDOW)
            inner[1:-1, 1:-1] = 1.0
            ring = 1.0 - inner
            self.scores.weight.zero_()
            self.scores.bias.zero_()
            self.scores.weight[1] = (K * (inner / inner.sum() - 2 * ring / ring.sum())).flatten()
            self.scores.bias[1] = -K * CUT
            self.box.weight.zero_()
            self.box.bias.copy_(torch.tensor([0.1, 0.2, -0.1, -0.2]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = torch.flatten(self.features(x), 1)
        return self.scores(flat), self.box(flat)


TRUTH = [(8, 8, 16, 16), (30, 30, 42, 42), (64, 20, 80, 36)]  # 1x, 1.5x, 2x the 8x8 square
SCALES = (1.0, 1 / 1.5, 0.5)
# each square's window at the scale that shrinks it to 8x8, in original pixels
WINDOWS = [(7, 7, 17, 17), (28.5, 28.5, 43.5, 43.5), (62, 18, 82, 38)]


def squares_image() -> torch.Tensor:
    image = torch.zeros(1, 60, 96)  # 60 and 96: 2/3 and 1/2 of them are whole pixels
    for x0, y0, x1, y1 in TRUTH:
        image[0, y0:y1, x0:x1] = 1.0
    return image


@pytest.fixture(scope="module")
def detector() -> nn.Module:
    return convolutionalize(SquareDetector().eval(), (WINDOW, WINDOW))


def test_squares_of_three_sizes_are_found_in_original_pixels(detector: nn.Module) -> None:
    found = detect_objects(detector, squares_image(), scales=SCALES, background_class=0)
    assert [d.box for d in found] == WINDOWS  # best first: the exact fit, then the resized ones
    for det, truth in zip(found, TRUTH):
        assert det.label == 1 and box_iou(det.box, truth) >= 0.5
    assert found[0].box == (7, 7, 17, 17) and all(type(v) is int for v in found[0].box)


def test_one_scale_finds_only_the_squares_of_the_windows_size(detector: nn.Module) -> None:
    found = detect_objects(detector, squares_image(), background_class=0)
    assert [d.box for d in found] == [WINDOWS[0]]


def test_one_suppression_runs_over_all_scales(detector: nn.Module) -> None:
    probs, _ = detection_maps(detector, squares_image(), scales=SCALES)
    twice = [*probs, probs[2]]  # the 2x square found twice, at two "scales" with the same map
    assert len(detect(twice, background_class=0)) == 3
    assert len(detect(twice, background_class=0, iou=1.0)) == 4


def test_detection_maps_are_probabilities_per_scale(detector: nn.Module) -> None:
    probs, boxes = detection_maps(detector, squares_image(), scales=SCALES, output=0)
    assert boxes is None and [p.scale for p in probs] == list(SCALES)
    for level in probs:
        np.testing.assert_allclose(level.map.sum(0), 1.0, rtol=1e-12)


# --------------------------------------------------------------------------- box regression


def mtcnn(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """The box the constant offsets (0.1, 0.2, -0.1, -0.2) make of a window, MTCNN's formula."""
    dx0, dy0, dx1, dy1 = (float(v) for v in np.float32([0.1, 0.2, -0.1, -0.2]))
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return (x0 + dx0 * w, y0 + dy0 * h, x1 + dx1 * w, y1 + dy1 * h)


def test_box_regression_moves_every_box_as_the_offsets_say(detector: nn.Module) -> None:
    found = detect_objects(detector, squares_image(), scales=SCALES, box_output=1, background_class=0)
    assert [d.box for d in found] == [mtcnn(w) for w in WINDOWS]
    for det, truth in zip(found, TRUTH):
        assert box_iou(det.box, truth) >= 0.5


def test_box_output_by_name_and_the_default_scores() -> None:
    class Named(SquareDetector):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
            scores, box = super().forward(x)
            return {"box": box, "logits": scores}

    fcn = convolutionalize(Named().eval(), (WINDOW, WINDOW))
    found = detect_objects(fcn, squares_image(), box_output="box", background_class=0)
    assert [d.box for d in found] == [mtcnn(WINDOWS[0])]


def test_a_box_decoder_can_be_plugged_in(detector: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def shift(windows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        seen.append((windows, offsets))
        return windows + 1.0

    found = detect_objects(detector, squares_image(), box_output=1, box_decoder=shift, background_class=0)
    assert [d.box for d in found] == [(8, 8, 18, 18)]
    windows, offsets = seen[0]
    assert windows.dtype == torch.float64 and offsets.shape == (len(windows), 4)
    monkeypatch.setitem(BOX_DECODERS, "shift", shift)
    again = detect_objects(detector, squares_image(), box_output=1, box_decoder="shift", background_class=0)
    assert again == found


def test_mtcnn_boxes_is_the_formula() -> None:
    windows = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 6.0, 9.0, 8.0]], dtype=torch.float64)
    offsets = torch.tensor([[0.1, 0.2, -0.1, -0.2], [0.0, -0.5, 1.0, 0.25]], dtype=torch.float64)
    np.testing.assert_array_equal(mtcnn_boxes(windows, offsets).numpy(),
                                  [[1.0, 4.0, 9.0, 16.0], [5.0, 5.0, 13.0, 8.5]])


SMALL = Geometry(window=(4, 4), stride=(2, 2), offset=(0, 0), receptive_field=(4, 4),
                 crop_equivalent=True, input_size=(4, 4), feature_size=(1, 1))


def one_peak() -> np.ndarray:
    probs = np.zeros((2, 5, 6))
    probs[0] = 1.0
    probs[:, 2, 3] = (0.1, 0.9)
    return probs


@pytest.mark.parametrize(("options", "match"), [
    ({"boxes": np.zeros((4, 5, 5))}, r"the box map has shape \(4, 5, 5\) but the class map \(2, 5, 6\)"),
    ({"boxes": np.zeros((3, 5, 6))}, "the 'mtcnn' box convention reads 4 offsets per cell"),
    ({"boxes": np.zeros((4, 5, 6)), "box_decoder": "yolo"},
     "unknown box_decoder 'yolo': pass one of 'mtcnn'"),
    ({"boxes": np.zeros((4, 5, 6)), "box_decoder": lambda w, o: w[:, :2]},
     r"returned shape \(1, 2\) for 1 windows; it must return \(1, 4\) boxes"),
])
def test_bad_box_maps_and_decoders_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        detect(one_peak(), SMALL, background_class=0, **options)


def test_a_single_map_with_boxes_and_pyramid_argument_errors() -> None:
    offsets = np.zeros((4, 5, 6))
    offsets[:, 2, 3] = (0.25, 0.0, 0.0, 0.5)
    assert detect(one_peak(), SMALL, background_class=0, boxes=offsets) == [
        Detection(1, pytest.approx(0.9), (7, 4, 10, 10))]
    level = ScaledMap(one_peak(), ScaledGeometry(SMALL, (0.5, 0.5)), 0.5, (10, 12))
    assert detect([level], background_class=0)[0].box == (12, 8, 20, 16)
    with pytest.raises(ValueError, match="carry their own geometry"):
        detect([level], SMALL)
    with pytest.raises(ValueError, match="needs the geometry"):
        detect(one_peak())
    with pytest.raises(ValueError, match="one box map per scale: 1 scales, 2 box maps"):
        detect([level], boxes=[offsets, offsets])
    with pytest.raises(ValueError, match="the pyramid has no maps"):
        detect([])


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pyramid")
    torch.save(SquareDetector().eval(), root / "squares.pt")
    page = (squares_image()[0].numpy() * 255).astype(np.uint8)
    Image.fromarray(page).save(root / "page.png")
    return root


def cli(files: Path, out: Path, *args: str) -> list[str]:
    return ["detect", str(files / "squares.pt"), "--trust-pickle", "--input-size", str(WINDOW),
            str(WINDOW), str(files / "page.png"), "-o", str(out), "--background-class", "0", *args]


def test_cli_detect_across_scales_with_box_regression(cli_files: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "found.json"
    assert main(cli(cli_files, out, "--scales", "1", "0.5", "--box-output", "1", "--draw",
                    str(tmp_path / "found.png"))) == 0
    assert "2 detections" in capsys.readouterr().out
    records = json.loads(out.read_text())
    assert [r["box"] for r in records] == [list(mtcnn(WINDOWS[0])), list(mtcnn(WINDOWS[2]))]
    assert [r["name"] for r in records] == ["class 1", "class 1"]
    assert Image.open(tmp_path / "found.png").size == (96, 60)


def test_cli_detect_without_scales_keeps_whole_pixel_windows(cli_files: Path, tmp_path: Path) -> None:
    out = tmp_path / "found.json"
    assert main(cli(cli_files, out)) == 0
    assert [r["box"] for r in json.loads(out.read_text())] == [[7, 7, 17, 17]]


@pytest.mark.parametrize(("args", "match"), [
    (["--scales", "0"], "argument --scales: '0' must be a positive number"),
    (["--scales", "1", "-0.5"], "argument --scales: '-0.5' must be a positive number"),
    (["--scales", "nan"], "'nan' must be a positive number"),
    (["--scales", "half"], "'half' is not a number"),
    (["--scales"], "argument --scales: expected at least one argument"),
    (["--scales", "0.05"], "every scale in (0.05,) makes the 60x96 image smaller than the 10x10 window"),
    (["--box-output", "2"], "output index 2 is out of range"),
])
def test_cli_bad_scales_are_one_line_exit_2_and_no_file(cli_files: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         args: list[str], match: str) -> None:
    code = main(cli(cli_files, tmp_path / "found.json", *args))  # warnings stay off stderr
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("convolutionalize: error: ")
    assert match in err
    assert list(tmp_path.iterdir()) == []


def test_the_documented_decoder_example_runs() -> None:
    """``convolutionalize.detect``'s docstring shows how to plug in a decoder: run it."""
    import convolutionalize.detect as module

    doc = module.__doc__ or ""
    example = textwrap.dedent(doc[doc.index("::\n") + 3:])
    offsets = np.zeros((4, 5, 6))
    offsets[:, 2, 3] = (0.0, 0.0, np.log(2.0), 0.0)  # twice as wide, same centre
    names = {"torch": torch, "detect": detect, "BOX_DECODERS": BOX_DECODERS, "probabilities": one_peak(),
             "geometry": SMALL, "box_map": offsets}
    try:
        exec(example.replace("detect(probabilities", "found = detect(probabilities"), names)
    finally:
        BOX_DECODERS.pop("centre-size", None)
    assert [d for d in names["found"] if d.label == 1] == [Detection(1, pytest.approx(0.9), (4, 4, 12, 8))]
