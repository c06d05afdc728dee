"""The Keras conversion checks itself before returning (as the PyTorch one does): equal to
the original at the native size, and at native + (2·sy, 3·sx) the map has the rows and
columns the geometry predicts and, when crop-equivalent, a few cells equal the original on
their true crops. What it measured is ``fcn.self_check``, next to ``fcn.geometry``; each
kind of failure raises ``NotConvolutionalizable`` saying what differed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from keras import layers

import convolutionalize as cz
from convolutionalize.api import conversion_info
from convolutionalize.frameworks.keras import head, rewrite
from convolutionalize.frameworks.keras.model import convolutionalize_keras, load_keras, save_keras
from convolutionalize.selfcheck import CHECK_RTOL, SelfCheck, check_sizes


def valid_cnn() -> keras.Model:
    """Padding-free 13x13 -> 5x5, stride 2, Flatten/Dense head."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((13, 13, 3))
    x = layers.Conv2D(6, 3, strides=2, activation="relu")(layers.Conv2D(4, 3)(inputs))
    x = layers.Dense(8, activation="relu")(layers.Flatten()(x))
    return keras.Model(inputs, layers.Dense(5, name="logits")(x), name="valid_cnn")


def padded_cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(6, 3, strides=2, padding="same")(inputs)
    return keras.Model(inputs, layers.Dense(5)(layers.Flatten()(x)), name="padded_cnn")


@keras.saving.register_keras_serializable(package="test_keras_selfcheck")
class PositionBias(keras.layers.Layer):
    """A learned bias per pixel: runs at the native size only."""

    def build(self, input_shape: tuple[int, ...]) -> None:
        self.bias = self.add_weight(shape=tuple(input_shape[1:]), initializer="ones")

    def call(self, x: Any) -> Any:
        return x + self.bias


@keras.saving.register_keras_serializable(package="test_keras_selfcheck")
class ShapedPositionBias(PositionBias):
    """The same, declaring its output shape: it builds at any size and fails when run."""

    def compute_output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return input_shape


def test_crop_equivalent_model_records_the_check() -> None:
    fcn = convolutionalize_keras(valid_cnn())
    g, check = cz.geometry_of(fcn), fcn.self_check
    assert isinstance(check, SelfCheck)
    assert check.size == check_sizes(g)[0] == (13 + 2 * 2, 13 + 3 * 2)  # non-square
    assert check.cells == g.cells(*check.size) == (3, 4)
    assert check.crop_error is not None and check.crop_error < CHECK_RTOL
    assert check.native_error == fcn.native_error and fcn.native_error < CHECK_RTOL
    assert conversion_info(fcn).self_check == check.describe()
    assert "map 3x4 as predicted, cells vs true crops" in check.describe()


def test_padded_model_checks_rows_and_columns_only() -> None:
    fcn = convolutionalize_keras(padded_cnn())
    assert not cz.geometry_of(fcn).crop_equivalent
    assert fcn.self_check.cells == (3, 4) and fcn.self_check.crop_error is None
    assert "not compared with crops" in fcn.self_check.describe()


def test_pool_global_checks_one_prediction() -> None:
    fcn = convolutionalize_keras(valid_cnn(), pool="global")
    assert fcn.self_check.cells == (1, 1) and fcn.self_check.crop_error is None


def test_self_check_survives_save_and_load(tmp_path: Path) -> None:
    fcn = convolutionalize_keras(valid_cnn())
    loaded = load_keras(save_keras(fcn, tmp_path / "fcn.keras"))
    assert loaded.self_check == fcn.self_check and loaded.native_error == fcn.native_error
    assert conversion_info(loaded).self_check == fcn.self_check.describe()


@pytest.mark.parametrize("layer, match", [
    (PositionBias, r"does not run on an image of unknown size.*'pixel_bias' \(PositionBias\)"),
    (ShapedPositionBias, r"does not run at sizes larger than the native one \(at 12x13: "),
], ids=["fails-to-build", "fails-when-run"])
def test_model_that_runs_at_the_native_size_only_is_refused(layer: type, match: str) -> None:
    inputs = keras.Input((10, 10, 3))
    x = layer(name="pixel_bias")(layers.Conv2D(4, 3)(inputs))
    model = keras.Model(inputs, layers.Dense(3)(layers.Flatten()(x)))
    with pytest.raises(cz.NotConvolutionalizable, match=match):
        convolutionalize_keras(model)


def test_misread_stride_is_caught_by_the_map_size(monkeypatch: pytest.MonkeyPatch) -> None:
    real = head.Analysis.geometry
    monkeypatch.setattr(head.Analysis, "geometry",
                        lambda self, pool: dataclasses.replace(real(self, pool), stride=(2, 3)))
    with pytest.raises(cz.NotConvolutionalizable, match=r"at 17x22 .*\(1, 5, 3, 5\).*predicts 3x4 cells"):
        convolutionalize_keras(valid_cnn())


def test_transposed_map_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A map with rows and columns swapped equals the original at 1x1; the non-square size
    catches it."""
    real = rewrite.REWRITES["linear"]

    def transposed(rw: Any, call: Any, step: Any, ins: list[Any]) -> Any:
        out = real(rw, call, step, ins)
        return layers.Permute((2, 1, 3))(out) if call.name == "logits" else out

    monkeypatch.setitem(rewrite.REWRITES, "linear", transposed)
    with pytest.raises(cz.NotConvolutionalizable, match=r"\(1, 5, 4, 3\).*predicts 3x4 cells.*transposed"):
        convolutionalize_keras(valid_cnn())


def test_cells_that_differ_from_their_crops_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A padded model claimed crop-equivalent: its border cells see real neighbours, not zeros."""
    real = head.Analysis.geometry
    monkeypatch.setattr(head.Analysis, "geometry",
                        lambda self, pool: dataclasses.replace(real(self, pool), crop_equivalent=True))
    with pytest.raises(cz.NotConvolutionalizable, match="at 16x18 differs from the original on the true"):
        convolutionalize_keras(padded_cnn())


def test_probe_leaves_the_caller_model_alone() -> None:
    model = valid_cnn()
    before = [w.copy() for w in model.get_weights()]
    convolutionalize_keras(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert getattr(model, "predict_function", None) is None  # the private copy ran, not the caller's
