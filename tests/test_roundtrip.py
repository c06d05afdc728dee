"""Converted models come back: every file ``convert`` writes carries its conversion.

For each output format (``.pt2``, ``.pt`` and ``.onnx`` from PyTorch, ``.onnx`` from ONNX,
``.keras`` from Keras) the model is converted and saved by the command line, then
``predict`` runs on the file in a fresh process with no ``--input-size``: its map equals the
in-memory converted model's map of the same image. ``inspect``, ``verify`` and ``heatmap``
run on each file with no extra flag, and the library reads the geometry back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from PIL import Image

import convolutionalize as cz
from convolutionalize.cli import main
from convolutionalize.models import load_model

from _tiny import INPUT_SIZE, TinyNet

TESTS = Path(__file__).parent
RTOL = 1e-4  # onnxruntime and PyTorch sum in different orders


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The original models as files: a pickled module, an ONNX export, a Keras file."""
    folder = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    model = TinyNet().eval()
    torch.save(model, folder / "tiny.pt")
    torch.onnx.export(model, (torch.randn(1, 1, *INPUT_SIZE),), str(folder / "tiny.onnx"), dynamo=False)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((*INPUT_SIZE, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.Dense(10)(keras.layers.Flatten()(x))
    keras.Model(inputs, x, name="tiny").save(folder / "tiny.keras")
    return {"pt": folder / "tiny.pt", "onnx": folder / "tiny.onnx", "keras": folder / "tiny.keras"}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "page.png"
    pixels = np.random.default_rng(0).integers(0, 256, (26, 34), dtype=np.uint8)  # non-square
    Image.fromarray(pixels).save(path)
    return path


# (source, output suffix): every format convert writes
CASES = [("pt", ".pt2"), ("pt", ".pt"), ("pt", ".onnx"), ("onnx", ".onnx"), ("keras", ".keras")]
IDS = ["torch-pt2", "torch-pt", "torch-onnx", "onnx-onnx", "keras-keras"]


def _trust(path: Path) -> list[str]:
    return ["--trust-pickle"] if path.suffix == ".pt" else []


@pytest.fixture(scope="module")
def converted(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("converted")
    out = {}
    for (source, suffix), name in zip(CASES, IDS):
        path = folder / f"{name}{suffix}"
        args = ["convert", str(sources[source]), *_trust(sources[source]), "-o", str(path)]
        if source == "pt":
            args += ["--input-size", *map(str, INPUT_SIZE)]
        assert main(args) == 0, name
        out[name] = path
    return out


@pytest.mark.parametrize("name", IDS)
def test_predict_in_a_fresh_process_equals_the_converted_model(name: str, converted: dict[str, Path],
                                                                image: Path, tmp_path: Path) -> None:
    path = converted[name]
    fcn = load_model(str(path), trust_pickle=True)  # read back as a converted model
    expected = np.asarray(cz.dense_map(fcn, image))
    out = tmp_path / "map.npy"
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "convolutionalize", "predict", str(path), str(image),
                             *_trust(path), "-o", str(out), "--no-progress"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    got = np.load(out)
    geometry = cz.geometry_of(fcn)
    assert got.shape[-2:] == geometry.cells(26, 34) == (8, 12)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= RTOL * np.abs(expected).max()


@pytest.mark.parametrize("name", IDS)
def test_the_file_carries_its_conversion(name: str, converted: dict[str, Path]) -> None:
    fcn = load_model(str(converted[name]), trust_pickle=True)
    geometry = cz.geometry_of(fcn)
    assert (geometry.input_size, geometry.window, geometry.stride) == (INPUT_SIZE, INPUT_SIZE, (2, 2))
    assert geometry.crop_equivalent
    assert cz.convolutionalize(fcn) is fcn  # recognised: not converted again
    with pytest.raises(ValueError, match="already converted with pool='window'"):
        cz.convolutionalize(fcn, pool="none")


@pytest.mark.parametrize("name", IDS)
def test_every_command_reads_the_file_without_flags(name: str, converted: dict[str, Path], image: Path,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = converted[name]
    trust = _trust(path)
    assert main(["inspect", str(path), *trust]) == 0
    shown = capsys.readouterr().out
    assert "window: 12x12  stride: 2x2" in shown and "self-check at" in shown
    assert main(["verify", str(path), *trust]) == 0
    assert capsys.readouterr().out.rstrip().endswith("PASS")
    heatmap = tmp_path / "h.png"
    assert main(["heatmap", str(path), str(image), *trust, "-o", str(heatmap), "--no-progress"]) == 0
    assert heatmap.stat().st_size > 0
    found = tmp_path / "d.json"
    assert main(["detect", str(path), str(image), *trust, "-o", str(found), "--no-progress"]) == 0
    assert found.stat().st_size > 0


def test_a_file_converted_with_another_pool_keeps_it(sources: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cam.onnx"
    assert main(["convert", str(sources["onnx"]), "--pool", "global", "-o", str(path)]) == 0
    assert main(["inspect", str(path)]) == 0  # no --pool: the file's own
    assert "pool: global" in capsys.readouterr().out
    assert main(["inspect", str(path), "--pool", "window"]) == 2
    assert "already converted with --pool global" in capsys.readouterr().err
