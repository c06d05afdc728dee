"""Subclassed Keras models (the ``mtcnn`` package's P/R/O-Net stages): traced into a functional
graph of the same layers, then converted; a ``call`` that cannot run on a symbolic input is
refused by that name, never as "tokens".

The MTCNN-shaped model here is an R-Net: valid convolutions and max pools with PReLU, a
``Permute((3, 2, 1))`` before its ``Flatten`` (the map is flattened width-first), a Dense trunk
and three heads (face softmax, box, landmarks). Its maps at 64x48 are checked cell by cell
against the original subclassed model on the true crops: a transposed map cannot pass.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch
from keras import layers

import convolutionalize as cz
from convolutionalize.errors import ArgumentError
from convolutionalize.selfcheck import check_cells, relative_error

RTOL = 1e-4  # float32: the project's tolerance (sums in another order)
NATIVE = (24, 24)
LARGER = (64, 48)  # non-square: rows and columns differ


class RNet(keras.Model):
    """MTCNN's refinement stage, subclassed, with a Permute before its flatten."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.conv1, self.prelu1 = layers.Conv2D(8, 3), layers.PReLU(shared_axes=[1, 2])
        self.pool1 = layers.MaxPooling2D(3, 2)
        self.conv2, self.prelu2 = layers.Conv2D(12, 3), layers.PReLU(shared_axes=[1, 2])
        self.permute, self.flatten = layers.Permute((3, 2, 1)), layers.Flatten()
        self.dense, self.prelu3 = layers.Dense(16), layers.PReLU()
        self.face = layers.Dense(2, activation="softmax")
        self.box, self.landmarks = layers.Dense(4), layers.Dense(10)

    def call(self, x: keras.KerasTensor) -> tuple[keras.KerasTensor, ...]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.dense(self.flatten(self.permute(x))))
        return self.face(x), self.box(x), self.landmarks(x)


class PNet(keras.Model):
    """MTCNN's proposal stage: already fully convolutional (1x1 convolution heads)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.conv1, self.prelu1 = layers.Conv2D(10, 3), layers.PReLU(shared_axes=[1, 2])
        self.pool1, self.conv2 = layers.MaxPooling2D(2), layers.Conv2D(16, 3)
        self.face, self.box = layers.Conv2D(2, 1, activation="softmax"), layers.Conv2D(4, 1)

    def call(self, x: keras.KerasTensor) -> tuple[keras.KerasTensor, ...]:
        x = self.conv2(self.pool1(self.prelu1(self.conv1(x))))
        return self.face(x), self.box(x)


class ComputesOutsideKeras(RNet):
    """A call() that needs a concrete tensor: a torch function on the input."""

    def call(self, x: keras.KerasTensor) -> tuple[keras.KerasTensor, ...]:
        return super().call(torch.relu(x))


def rnet(cls: type[RNet] = RNet) -> RNet:
    keras.utils.set_random_seed(0)
    model = cls(name="rnet")
    model(np.zeros((1, *NATIVE, 3), "float32"))  # built as a user builds it: called once
    return model


def run(model: keras.Model, x: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(keras.ops.convert_to_numpy(o), np.float64)
            for o in keras.tree.flatten(model.predict_on_batch(x))]


@pytest.fixture(scope="module")
def converted() -> tuple[RNet, keras.Model]:
    model = rnet()
    return model, cz.convolutionalize(model)


def test_traced_into_standard_layers(converted: tuple[RNet, keras.Model]) -> None:
    model, fcn = converted
    assert isinstance(fcn, keras.Model) and fcn is not model
    kinds = {type(layer).__name__ for layer in fcn.layers}
    assert "Dense" not in kinds and "Flatten" not in kinds and "Conv2D" in kinds  # structural
    assert all(type(layer).__module__.startswith("keras.") for layer in fcn.layers)
    g = cz.geometry_of(fcn)
    assert (g.window, g.stride, g.crop_equivalent) == (NATIVE, (2, 2), True)


def test_native_size_equals_the_subclassed_original(converted: tuple[RNet, keras.Model]) -> None:
    model, fcn = converted
    x = np.random.default_rng(1).standard_normal((2, *NATIVE, 3)).astype("float32")
    for got, want in zip(run(fcn, x), run(model, x), strict=True):
        assert got.shape == (2, 1, 1, want.shape[-1])
        assert relative_error(got[:, 0, 0], want) <= RTOL


@pytest.mark.parametrize("output, classes", [(0, 2), (1, 4), (2, 10)], ids=["face", "box", "landmarks"])
def test_maps_at_64x48_are_in_image_orientation(converted: tuple[RNet, keras.Model], output: int,
                                                 classes: int) -> None:
    """Every cell of each head's map equals the original on its crop (window at i*stride, j*stride)."""
    model, fcn = converted
    g = cz.geometry_of(fcn)
    x = np.random.default_rng(2).standard_normal((1, *LARGER, 3)).astype("float32")
    dense = run(fcn, x)[output]
    rows, cols = g.cells(*LARGER)
    assert dense.shape == (1, rows, cols, classes) and (rows, cols) == (21, 13)
    cells = [(i, j) for i in range(rows) for j in range(cols)]
    crops = np.concatenate([x[:, i * 2:i * 2 + NATIVE[0], j * 2:j * 2 + NATIVE[1]] for i, j in cells])
    want = run(model, crops)[output]
    got = np.stack([dense[0, i, j] for i, j in cells])
    assert relative_error(got, want) <= RTOL
    assert check_cells(g, LARGER)  # the self-check's own cells lie inside this image too


def test_a_subclassed_model_inside_a_functional_one_converts() -> None:
    """Wrapped in a functional model (the workaround people try): traced inline, no "tokens"."""
    model = rnet()
    inputs = keras.Input((*NATIVE, 3))
    wrapped = keras.Model(inputs, model(inputs), name="wrapped")
    fcn = cz.convolutionalize(wrapped)
    x = np.random.default_rng(3).standard_normal((1, *NATIVE, 3)).astype("float32")
    for got, want in zip(run(fcn, x), run(model, x), strict=True):
        assert relative_error(got[:, 0, 0], want) <= RTOL


def test_caller_model_is_unchanged() -> None:
    model = rnet()
    x = np.random.default_rng(4).standard_normal((1, *NATIVE, 3)).astype("float32")
    before, weights = run(model, x), [w.copy() for w in model.get_weights()]
    cz.convolutionalize(model)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(run(model, x), before, strict=True))


def test_untraceable_call_is_refused_by_name() -> None:
    with pytest.raises(cz.NotConvolutionalizable,
                       match=r"^keras model 'rnet' is a subclassed model whose call\(\) cannot be traced "
                             r"with a symbolic input \(TypeError: .*KerasTensor") as info:
        cz.convolutionalize(rnet(ComputesOutsideKeras))
    assert "token" not in str(info.value)


def test_unbuilt_subclassed_model_is_asked_to_be_built() -> None:
    with pytest.raises(ArgumentError, match=r"subclassed model that was not built .* model.build"):
        cz.convolutionalize(RNet(name="rnet"))


def test_fully_convolutional_subclassed_model_is_told_it_has_no_head() -> None:
    """Traced like any other; the refusal names the real cause (it already runs at any size)."""
    keras.utils.set_random_seed(0)
    model = PNet(name="pnet")
    model(np.zeros((1, 12, 12, 3), "float32"))
    with pytest.raises(cz.NotConvolutionalizable, match=r"is already a spatial map: the model is fully "
                                                        r"convolutional, there is no head"):
        cz.convolutionalize(model)
