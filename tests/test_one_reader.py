"""One image reader for the library and the command line.

``heatmap``, ``detect`` and ``predict`` read a PNG through ``inference/images.py`` with one
normalization rule (the caller's ``--mean``/``--std``, else the model's ``pretrained_cfg``,
else ImageNet's for 3-channel models, else none), so the same PNG gives the model the same
input tensor in every command; the CLI has no reader of its own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convolutionalize.render
from convolutionalize import cli
from convolutionalize.cli import main
from convolutionalize.inference import images

from _tiny import TinyNet

CFG_MEAN, CFG_STD = (0.5, 0.4, 0.3), (0.1, 0.2, 0.3)  # not ImageNet's
SIZE = ["--input-size", "12", "12"]
RULE = ("default: the model's own, from its pretrained_cfg (timm's), else ImageNet's for 3-channel "
        "models, else none")
CLI_DIR = Path(cli.__file__).parent


def rgb_net(cfg: bool) -> nn.Module:
    """A padding-free 3x12x12 classifier (stride 2), with a timm-style ``pretrained_cfg`` when
    ``cfg``; ``nn.Sequential`` pickles without a test class to import."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    if cfg:
        net.pretrained_cfg = {"mean": CFG_MEAN, "std": CFG_STD, "input_size": (3, 12, 12)}
    return net


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models (pickled, and converted by the CLI to .pt) and a colour 20x24 PNG."""
    root = tmp_path_factory.mktemp("one_reader")
    torch.save(rgb_net(cfg=True), root / "cfg.pt")
    torch.save(rgb_net(cfg=False), root / "imagenet.pt")
    torch.manual_seed(0)
    torch.save(TinyNet().eval(), root / "grey.pt")
    converted = str(root / "cfg_fcn.pt")
    assert main(["convert", str(root / "cfg.pt"), "--trust-pickle", *SIZE, "-o", converted]) == 0
    pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "page.png")
    return root


@pytest.fixture()
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, Any, Any, torch.Tensor]]:
    """``(pixels?, mean, std, whole input tensor)`` of every input the library's reader opens
    meanwhile: image pixels, or a model-ready tensor passed on as it is."""
    seen: list[tuple[bool, Any, Any, torch.Tensor]] = []
    real = images.open_image

    def spy(*args: Any, **kwargs: Any) -> images.ImageSource:
        source = real(*args, **kwargs)
        whole = source.read(0, source.height, 0, source.width)
        seen.append((source.is_image, source.mean, source.std, whole))
        return source

    monkeypatch.setattr(images, "open_image", spy)
    return seen


MODELS = {  # file, the normalization every command must use
    "pretrained-cfg": ("cfg.pt", CFG_MEAN, CFG_STD),
    "converted-pretrained-cfg": ("cfg_fcn.pt", CFG_MEAN, CFG_STD),
    "imagenet": ("imagenet.pt", images.IMAGENET_MEAN, images.IMAGENET_STD),
    "grey": ("grey.pt", (0.0,), (1.0,)),
}


def command(files: Path, name: str, model: str, out: Path, *extra: str) -> list[str]:
    output = {"predict": "map.npy", "heatmap": "heat.png", "detect": "found.json"}[name]
    options = ["--no-progress"] if name == "predict" else []
    return [name, str(files / model), "--trust-pickle", *SIZE, str(files / "page.png"),
            "-o", str(out / output), *options, *extra]


@pytest.mark.parametrize("other", ["heatmap", "detect"])
@pytest.mark.parametrize(("model", "mean", "std"), list(MODELS.values()), ids=list(MODELS))
def test_every_command_gives_the_model_the_same_input(files: Path, tmp_path: Path, reads: list[Any],
                                                      capsys: pytest.CaptureFixture[str], model: str,
                                                      mean: tuple[float, ...], std: tuple[float, ...],
                                                      other: str) -> None:
    assert main(command(files, "predict", model, tmp_path)) == 0
    assert main(command(files, other, model, tmp_path)) == 0, capsys.readouterr().err
    pixels = [read for read in reads if read[0]]
    assert len(pixels) == 2  # the PNG read once by each command, both through the library's reader
    (_, mean_p, std_p, predicted), (_, mean_o, std_o, drawn) = pixels
    assert (mean_p, std_p) == (mean_o, std_o) == (mean, std)
    assert torch.equal(predicted, drawn)
    for _, _, _, passed_on in reads[2:]:  # detect hands its tensor to dense_map as it is
        assert torch.equal(passed_on, drawn)


@pytest.mark.parametrize("options", [[], ["--mean", "0.2", "--std", "0.7"]], ids=["model's", "given"])
@pytest.mark.parametrize("model", ["cfg.pt", "cfg_fcn.pt", "imagenet.pt", "grey.pt"])
def test_heatmap_draws_the_map_predict_writes(files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              model: str, options: list[str]) -> None:
    drawn: list[np.ndarray] = []

    def record(picture: Any, probabilities: np.ndarray, *args: Any, **kwargs: Any) -> Image.Image:
        drawn.append(np.asarray(probabilities))
        return picture

    monkeypatch.setattr(convolutionalize.render, "heatmap", record)
    assert main(command(files, "predict", model, tmp_path, *options)) == 0
    assert main(command(files, "heatmap", model, tmp_path, *options)) == 0
    logits = np.load(tmp_path / "map.npy").astype(np.float64)
    expected = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    (probabilities,) = drawn
    assert probabilities.shape == expected.shape == (5 if model != "grey.pt" else 10, 5, 7)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["heatmap", "detect", "predict"])
def test_help_states_the_one_normalization_rule(capsys: pytest.CaptureFixture[str], name: str) -> None:
    assert main([name, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--mean M [M ...]", "--std S [S ...]"):
        help_text = text.split(option + " ", 2)[-1]
        assert help_text.startswith("per-channel")
        assert RULE in help_text[:400]


def test_the_command_line_has_no_image_reader_of_its_own() -> None:
    assert not hasattr(cli.render, "load_image")
    for module in sorted(CLI_DIR.glob("*.py")):
        code = module.read_text()
        assert not re.search(r"Image\.open|imread|IMAGENET|UnidentifiedImageError", code), module.name


# --------------------------------------------------------------------------- open_picture


def test_a_pillow_image_is_read_once_and_drawn_in_its_own_colours(files: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Path] = []
    real = images._open_pillow

    def spy(path: Path) -> Any:
        opened.append(path)
        return real(path)

    monkeypatch.setattr(images, "_open_pillow", spy)
    source, picture = images.open_picture(files / "page.png", 1, model=TinyNet())
    colour = Image.open(files / "page.png").convert("RGB")
    assert opened == [files / "page.png"]
    assert picture.mode == "RGB" and np.array_equal(np.asarray(picture), np.asarray(colour))
    grey = np.asarray(colour.convert("L"), np.float32) / 255
    assert torch.equal(source.read(0, 20, 0, 24), torch.from_numpy(grey)[None])


def test_pixel_arrays_are_drawn_as_the_model_reads_them(tmp_path: Path) -> None:
    pixels = np.arange(20 * 24, dtype=np.uint16).reshape(20, 24, 1) * 100
    np.save(tmp_path / "page.npy", pixels)
    source, picture = images.open_picture(tmp_path / "page.npy", 1)
    assert (source.height, source.width, source.scale) == (20, 24, 65535.0)
    expected = np.round(pixels[:, :, 0] / 65535 * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(picture), np.repeat(expected[:, :, None], 3, axis=2))


def test_a_model_ready_float_input_has_no_picture(tmp_path: Path) -> None:
    np.save(tmp_path / "ready.npy", np.zeros((3, 20, 24), np.float32))
    with pytest.raises(ValueError, match="model-ready float input has no pixels to draw on"):
        images.open_picture(tmp_path / "ready.npy", 3)


@pytest.mark.parametrize(("name", "match"), [("missing.png", "does not exist"),
                                             ("broken.png", "cannot read image")])
def test_open_picture_refuses_what_open_image_refuses(tmp_path: Path, name: str, match: str) -> None:
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=match):
        images.open_picture(tmp_path / name, 3)
