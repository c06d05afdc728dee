"""The digits demo, fast: trains, converts crop-equivalently, detects digits of three sizes
across scales, scores them per size and overall and writes its outputs (the side-by-side
stride picture included); its model (``demo:digits --weights digits.pth``, no
``--trust-pickle``) works from the command line, which refuses bad input with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convolutionalize import convolutionalize
from convolutionalize.cli import main
from convolutionalize.demo import (
    DemoConfig,
    DemoResult,
    Page,
    digits_classifier,
    run_demo,
    score,
    score_by_size,
)
from convolutionalize.detect import Detection
from convolutionalize.models import load_model

MODEL = ["demo:digits", "--weights", "{weights}"]  # the demo's trained state_dict
# trained just enough (seed 0) to find digits of all three sizes (16, 24, 32 px) on its two
# pages: one of each per page, the 32 px ones at scores above 0.98
FAST = DemoConfig(seed=0, epochs=6, train_pages=300, pages=2, page_size=96, digits_per_page=3,
                  pictures=1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoResult]:
    output = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    # ~240 small training batches: on one thread a few seconds; on two threads of shared,
    # busy cores each op waits for the other thread, ten times slower (same numbers either way)
    torch.set_num_threads(1)
    try:
        return output, run_demo(output, FAST)
    finally:
        torch.set_num_threads(threads)


def test_fast_demo_writes_its_outputs(demo: tuple[Path, DemoResult]) -> None:
    output, result = demo
    for name in ("digits.pth", "metrics.json", "page00.png", "page00_heatmap.png",
                 "page00_detections.png", "strides.png"):
        assert (output / name).is_file(), name
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["crop_equivalent"] is True and metrics["pages"] == 2
    assert 0 <= metrics["f1"] <= 1 and metrics["digits"] == result.digits > 0
    assert result.metrics_line().startswith("precision ")
    assert Image.open(output / "page00.png").size == (96, 96)
    assert metrics["scales"] == pytest.approx([1, 2 / 3, 1 / 2])


def test_fast_demo_scores_every_size(demo: tuple[Path, DemoResult]) -> None:
    output, result = demo
    per_size = json.loads((output / "metrics.json").read_text())["per_size"]
    assert [entry["size"] for entry in per_size] == [16, 24, 32]
    for entry in per_size:
        assert all(0 <= entry[key] <= 1 for key in ("precision", "recall", "f1")), entry
    for key in ("digits", "detections", "true_positives"):
        assert sum(entry[key] for entry in per_size) == getattr(result, key) > 0
    assert len(result.metrics_line().splitlines()) == 4  # overall, then one line per size


def test_fast_demo_finds_the_larger_digits_across_scales(demo: tuple[Path, DemoResult]) -> None:
    # a window-sized (16 px) box cannot match a 32 px digit (IoU <= 0.25): these are found
    # on the pages shrunk to 1/2 (or 2/3)
    largest = demo[1].per_size[-1]
    assert largest.size == 32 and largest.digits == 2 and largest.true_positives >= 1


def test_stride_picture_is_two_panels(demo: tuple[Path, DemoResult]) -> None:
    picture = Image.open(demo[0] / "strides.png")
    assert str(demo[0] / "strides.png") in demo[1].files
    strip = 56  # the colorbar's, right of each 384 px panel
    assert picture.size == (2 * (6 * 64 + strip) + 4, 6 * 64)  # 64 px around a digit, enlarged 6 times
    pixels = np.asarray(picture.convert("RGB"), np.int16)
    second = 384 + strip + 4
    coarse, fine = pixels[40:, :384], pixels[40:, second:second + 384]  # below the titles
    assert (coarse != fine).any()  # the stride-1 map is not the stride-2 one


def test_score_by_size_adds_up_to_score() -> None:
    page = Page(np.ones((96, 96), np.float32), [3, 5, 7],
                [(0, 0, 16, 16), (20, 20, 44, 44), (50, 50, 82, 82)])
    found = [[Detection(3, 0.9, (1, 0, 17, 16)),  # the 16 px 3
              Detection(5, 0.8, (20, 20, 52, 52)),  # the 24 px 5 (IoU 0.56) found at 32 px
              Detection(7, 0.7, (52, 52, 68, 68)),  # part of the 32 px 7: a 16 px false positive
              Detection(2, 0.6, (50, 50, 74, 74))]]  # wrong label: a 24 px false positive
    by_size = score_by_size([page], found, [16, 24, 32])
    assert by_size == {16: (1, 2, 1), 24: (1, 2, 1), 32: (0, 0, 1)}
    assert tuple(map(sum, zip(*by_size.values()))) == score([page], found) == (2, 4, 3)


@pytest.mark.parametrize("trained", [False, True], ids=["seeded", "trained"])
def test_dense_map_equals_crop_by_crop(demo: tuple[Path, DemoResult], trained: bool) -> None:
    if trained:
        model = load_model("demo:digits", str(demo[0] / "digits.pth"))
    else:
        torch.manual_seed(1)
        model = digits_classifier(2).eval()
    fcn = convolutionalize(model, input_size=(16, 16))
    assert fcn.geometry.crop_equivalent
    assert not any(isinstance(m, torch.nn.Linear) for m in fcn.modules())
    image = torch.rand(1, 1, 40, 46, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        dense = fcn(image)[0]
        rows, cols = dense.shape[1:]
        crops = []
        for i in range(rows):
            for j in range(cols):
                x0, y0, x1, y1 = fcn.geometry.box(i, j)
                crops.append(image[:, :, y0:y1, x0:x1])
        crop_map = model(torch.cat(crops)).T.reshape(-1, rows, cols)
    error = float((dense - crop_map).abs().max() / crop_map.abs().max())
    assert error < 1e-5


def test_cli_detect_and_heatmap_on_a_page(demo: tuple[Path, DemoResult], tmp_path: Path) -> None:
    output = demo[0]
    model = ["demo:digits", "--weights", str(output / "digits.pth")]
    page = str(output / "page00.png")
    assert main(["detect", *model, page, "-o", str(tmp_path / "d.json"), "--draw",
                 str(tmp_path / "d.png"), "--input-size", "16", "16"]) == 0
    records = json.loads((tmp_path / "d.json").read_text())
    assert all(set(r) == {"label", "name", "score", "box"} for r in records)
    assert (tmp_path / "d.png").is_file()
    assert main(["heatmap", *model, page, "-o", str(tmp_path / "h.png"), "--class", "3"]) == 0
    assert Image.open(tmp_path / "h.png").size == (96 + 40, 96)  # the image and the colorbar's strip


def bad_cases(root: Path) -> dict[str, tuple[list[str], str]]:
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(root / "small.png")
    (root / "fake.png").write_bytes(b"not an image at all")
    return {
        "missing image": (["detect", *MODEL, str(root / "nope.png")], "does not exist"),
        "not an image": (["detect", *MODEL, str(root / "fake.png")], "cannot read image"),
        "smaller than window": (["detect", *MODEL, str(root / "small.png")], "smaller than"),
        "unknown class": (["heatmap", *MODEL, "{page}", "--class", "11"], "unknown class 11"),
        "unknown background": (["detect", *MODEL, "{page}", "--background-class", "12"],
                               "unknown background class 12"),
        "labels unreadable": (["heatmap", *MODEL, "{page}", "--labels", str(root / "no.txt")],
                              "cannot read the labels file"),
        "unwritable output": (["detect", *MODEL, "{page}", "-o", str(root / "no" / "x.json")],
                              "does not exist"),
        "bad threshold": (["detect", *MODEL, "{page}", "--threshold", "0"],
                          "--threshold: '0' must be in (0, 1]"),
    }


@pytest.mark.parametrize("case", [
    "missing image", "not an image", "smaller than window", "unknown class",
    "unknown background", "labels unreadable", "unwritable output", "bad threshold"])
def test_bad_input_exits_2_with_one_line(demo: tuple[Path, DemoResult], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str], case: str) -> None:
    args, message = bad_cases(tmp_path)[case]
    args = [a.format(weights=demo[0] / "digits.pth", page=demo[0] / "page00.png") for a in args]
    if "-o" not in args:  # the output's suffix picks its format: heatmap draws PNG
        args += ["-o", str(tmp_path / ("out.png" if args[0] == "heatmap" else "out.json"))]
    before = set(tmp_path.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("convolutionalize: error:")
    assert message in err
    assert set(tmp_path.rglob("*")) == before
