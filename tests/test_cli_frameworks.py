"""The CLI takes Keras (.keras) and ONNX (.onnx) model files like PyTorch ones."""

from __future__ import annotations

from pathlib import Path

import keras
import onnx
import pytest
import torch
from torch import nn

from convolutionalize import geometry_of
from convolutionalize.cli import main


def _keras_file(tmp_path: Path) -> Path:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((12, 12, 2)), keras.layers.Conv2D(4, 3), keras.layers.ReLU(),
        keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dense(6, activation="relu"),
        keras.layers.Dense(3),
    ])
    path = tmp_path / "small.keras"
    model.save(path)
    return path


def _onnx_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    path = tmp_path / "small.onnx"
    # a static graph (batch 1 included), as many exported classifiers are
    torch.onnx.export(model, (torch.randn(1, 2, 12, 12),), str(path), dynamo=False)
    return path


MAKERS = {"keras": (_keras_file, ".keras"), "onnx": (_onnx_file, ".onnx")}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_inspect_model_file(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, _ = MAKERS[kind]
    assert main(["inspect", str(make(tmp_path)), "--image-size", "20", "24"]) == 0
    out = capsys.readouterr().out
    assert "crop equivalent: yes" in out
    assert "linear" in out and "map: 5x7 cells" in out


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_convert_model_file_keeps_its_format(kind: str, tmp_path: Path) -> None:
    make, suffix = MAKERS[kind]
    out = tmp_path / f"fcn{suffix}"
    assert main(["convert", str(make(tmp_path)), "-o", str(out)]) == 0
    loaded = keras.saving.load_model(out) if kind == "keras" else onnx.load(str(out))
    if kind == "keras":
        from convolutionalize.frameworks.keras.model import load_keras

        loaded = load_keras(out)
    assert geometry_of(loaded).window == (12, 12)


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_convert_to_a_foreign_format_is_refused(kind: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    make, _ = MAKERS[kind]
    out = tmp_path / "fcn.pt2"
    assert main(["convert", str(make(tmp_path)), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is saved as" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_verify_model_file(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, _ = MAKERS[kind]
    assert main(["verify", str(make(tmp_path)), "--samples", "6"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_weights_option_does_not_apply_to_model_files(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(_onnx_file(tmp_path)), "--weights", "random"]) == 2
    assert "does not apply" in capsys.readouterr().err
