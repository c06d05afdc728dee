"""TensorFlow as people have it: SavedModel directories (Keras 3 ``model.export``, tf_keras
``save_format="tf"``, ``tf.saved_model.save`` of a ``tf.Module``), tf_keras (Keras 2) model
objects and files, by path in the library and on the command line; and the converted model
served by ``model.export()`` with any height and width under the TensorFlow backend.

Every case is a padding-free CNN (so every cell must equal the original on its crop) checked
against the original as TensorFlow runs it: at the native size and, cell by cell, at a larger
non-square size, float32 relative 1e-4 (the project's tolerance). The tests run with
``KERAS_BACKEND=torch`` (conftest); what needs Keras on TensorFlow runs in one subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras  # before tensorflow: keras' torch backend imports triton, which crashes after tensorflow
import numpy as np
import pytest

from convolutionalize.frameworks.tensorflow import import_tensorflow

tf = pytest.importorskip("tensorflow", reason="the [tensorflow] extra (tensorflow-cpu, tf-keras) is not "
                         "installed")
import_tensorflow("the tests")  # (the same module, imported in the safe order)
tf_keras = pytest.importorskip("tf_keras", reason="tf-keras (the [tensorflow] extra) is not installed")

import convolutionalize as cz  # noqa: E402
from convolutionalize.cli import main  # noqa: E402
from convolutionalize.selfcheck import relative_error  # noqa: E402

RTOL = 1e-4  # float32; the original runs on TensorFlow, the converted model on Keras' torch backend
NATIVE = (16, 16)
STRIDE = (2, 2)
LARGER = (NATIVE[0] + 2 * 2 + 2, NATIVE[1] + 3 * 2 + 7)  # 22x29: non-square, not a multiple of the stride

Run = Callable[[np.ndarray], list[np.ndarray]]  # NHWC batch -> every output


def outputs(value: Any) -> list[np.ndarray]:
    return [np.asarray(keras.ops.convert_to_numpy(t) if not isinstance(t, tf.Tensor) else t.numpy(),
                       np.float64) for t in keras.tree.flatten(value)]


def keras_run(model: keras.Model) -> Run:
    return lambda x: outputs(model.predict_on_batch(x))


def signature_run(folder: Path) -> Run:
    function = tf.saved_model.load(str(folder)).signatures["serving_default"]
    name = next(iter(function.structured_input_signature[1]))
    return lambda x: outputs(function(**{name: tf.constant(x)}))


def assert_equals_original(fcn: keras.Model, original: Run, native: tuple[int, int] = NATIVE,
                           stride: tuple[int, int] = STRIDE) -> None:
    """Native size: the 1x1 map equals the original. Larger non-square size: the map has the
    predicted rows and columns and every cell equals the original on its crop."""
    g = cz.geometry_of(fcn)
    assert (g.window, g.stride, g.crop_equivalent) == (native, stride, True)
    assert all(type(layer).__module__.startswith("keras.") for layer in fcn.layers)  # Keras 3 layers only
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, *native, 3)).astype("float32")
    for got, want in zip(keras_run(fcn)(x), original(x), strict=True):
        assert got.shape[1:3] == (1, 1) and relative_error(got[:, 0, 0], want) <= RTOL
    big = rng.standard_normal((1, *LARGER, 3)).astype("float32")
    rows, cols = g.cells(*LARGER)
    cells = [(i, j) for i in range(rows) for j in range(cols)]
    crops = np.concatenate([big[:, i * stride[0]:i * stride[0] + native[0],
                                j * stride[1]:j * stride[1] + native[1]] for i, j in cells])
    for got, want in zip(keras_run(fcn)(big), original(crops), strict=True):
        assert got.shape[:3] == (1, rows, cols) and rows != cols
        assert relative_error(np.stack([got[0, i, j] for i, j in cells]), want) <= RTOL


# --------------------------------------------------------------------------- models, built here


def tf_keras_cnn() -> Any:
    """Valid conv + PReLU + BatchNorm + max pool, conv, Flatten -> Dense -> ReLU -> Dense."""
    tf_keras.utils.set_random_seed(0)
    L = tf_keras.layers
    inputs = tf_keras.Input((*NATIVE, 3))
    x = L.PReLU(shared_axes=[1, 2])(L.Conv2D(6, 3)(inputs))
    x = L.MaxPooling2D(2)(L.BatchNormalization()(x))
    x = L.Conv2D(8, 3, activation="relu")(x)
    x = L.Dense(12, activation="relu")(L.Flatten()(x))
    model = tf_keras.Model(inputs, L.Dense(5)(x), name="tfk_cnn")
    bn = model.layers[3]
    bn.set_weights([w + np.linspace(0.5, 1.5, w.shape[0], dtype="float32") for w in bn.get_weights()])
    return model


class TfKerasSubclassed(tf_keras.Model):
    def __init__(self) -> None:
        super().__init__(name="tfk_sub")
        L = tf_keras.layers
        self.conv, self.pool = L.Conv2D(4, 3, activation="relu"), L.MaxPooling2D(2)
        self.flat, self.dense = L.Flatten(), L.Dense(3)

    def call(self, x: Any) -> Any:
        return self.dense(self.flat(self.pool(self.conv(x))))


class Classifier(tf.Module):
    """A plain tf.Module: conv, ReLU, max pool, reshape, matmul, bias, softmax."""

    def __init__(self) -> None:
        super().__init__(name="classifier")
        rng = np.random.default_rng(0)
        self.kernel = tf.Variable(rng.standard_normal((3, 3, 3, 4)).astype("float32") * 0.3)
        self.weights = tf.Variable(rng.standard_normal((7 * 7 * 4, 5)).astype("float32") * 0.1)
        self.bias = tf.Variable(rng.standard_normal(5).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec((None, *NATIVE, 3), tf.float32)])
    def __call__(self, x: Any) -> Any:
        y = tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(x, self.kernel, 1, "VALID")), 2, 2, "VALID")
        return tf.nn.softmax(tf.matmul(tf.reshape(y, (-1, 7 * 7 * 4)), self.weights) + self.bias)


class AnySize(Classifier):
    """Traced for any height and width: the flattened features it multiplies have no fixed size."""

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)])
    def __call__(self, x: Any) -> Any:
        y = tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(x, self.kernel, 1, "VALID")), 2, 2, "VALID")
        return tf.matmul(tf.reshape(y, (-1, 7 * 7 * 4)), self.weights)


class Untraced(tf.Module):
    def __call__(self, x: Any) -> Any:
        return x


class LocalResponseNorm(tf.Module):
    """AlexNet's local response normalisation: no Keras layer computes it."""

    def __init__(self) -> None:
        super().__init__(name="lrn")
        self.kernel = tf.Variable(np.ones((3, 3, 3, 4), "float32"))

    @tf.function(input_signature=[tf.TensorSpec((None, *NATIVE, 3), tf.float32)])
    def __call__(self, x: Any) -> Any:
        return tf.reduce_mean(tf.nn.local_response_normalization(tf.nn.conv2d(x, self.kernel, 1, "VALID")),
                              axis=[1, 2])


KERAS3_ON_TENSORFLOW = """
import json, sys
from pathlib import Path
import numpy as np
import keras
from keras import layers
import tensorflow as tf
import convolutionalize as cz

out = Path(sys.argv[1])
keras.utils.set_random_seed(0)
inputs = keras.Input((16, 16, 3))
x = layers.PReLU(shared_axes=[1, 2])(layers.Conv2D(6, 3)(inputs))
x = layers.BatchNormalization()(layers.MaxPooling2D(2)(x))
x = layers.Conv2D(8, 3, activation="relu")(x)
model = keras.Model(inputs, layers.Dense(5)(layers.Dense(12, activation="relu")(layers.Flatten()(x))))
model.export(out / "original", verbose=False)

fcn = cz.convolutionalize(model)
fcn.export(out / "converted", verbose=False)
serve = tf.saved_model.load(str(out / "converted")).signatures["serving_default"]
rng = np.random.default_rng(3)
result = {"backend": keras.config.backend(), "inputs": {k: str(v.shape) for k, v in
          serve.structured_input_signature[1].items()}}
for size in [(16, 16), (26, 29)]:
    x = rng.standard_normal((1, *size, 3)).astype("float32")
    served = next(iter(serve(tf.constant(x)).values())).numpy()
    np.save(out / f"x{size[0]}.npy", x)
    np.save(out / f"served{size[0]}.npy", served)
    np.save(out / f"fcn{size[0]}.npy", np.asarray(fcn.predict_on_batch(x)))
(out / "result.json").write_text(json.dumps(result))
"""


@pytest.fixture(scope="module")
def keras3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Keras 3 model exported on the TensorFlow backend, and its conversion exported there too."""
    out = tmp_path_factory.mktemp("keras3")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", KERAS3_ON_TENSORFLOW, str(out)], env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# --------------------------------------------------------------------------- SavedModels by path


def test_keras3_export_directory_converts(keras3: Path) -> None:
    folder = keras3 / "original"
    assert (folder / "saved_model.pb").is_file() and not (folder / "keras_metadata.pb").exists()
    assert_equals_original(cz.convolutionalize(folder), signature_run(folder))


def test_tf_keras_saved_model_directory_converts(tmp_path: Path) -> None:
    model, folder = tf_keras_cnn(), tmp_path / "exported model"  # no suffix, a space: found by its files
    model.save(str(folder), save_format="tf")
    assert_equals_original(cz.convolutionalize(folder), signature_run(folder))


def test_tf_module_saved_model_converts(tmp_path: Path) -> None:
    module = Classifier()
    tf.saved_model.save(module, str(tmp_path / "module"))
    assert_equals_original(cz.convolutionalize(tmp_path / "module" / "saved_model.pb"),
                           lambda x: outputs(module(tf.constant(x))))


def test_cli_converts_a_saved_model_directory(keras3: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.keras"
    assert main(["convert", str(keras3 / "original"), "-o", str(out)]) == 0
    fcn = cz.convolutionalize(out)  # read back: already converted, its geometry carried
    assert_equals_original(fcn, signature_run(keras3 / "original"))


# --------------------------------------------------------------------------- tf_keras objects and files


def test_tf_keras_model_object_converts() -> None:
    model = tf_keras_cnn()
    fcn = cz.convolutionalize(model)
    assert isinstance(fcn, keras.Model)
    assert_equals_original(fcn, lambda x: outputs(model(x, training=False)))


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file:UserWarning")
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_tf_keras_files_convert(suffix: str, tmp_path: Path) -> None:
    model = tf_keras_cnn()
    model.save(str(tmp_path / f"model{suffix}"))
    assert_equals_original(cz.convolutionalize(tmp_path / f"model{suffix}"),
                           lambda x: outputs(model(x, training=False)))


def test_subclassed_tf_keras_model_converts_through_its_graph() -> None:
    tf_keras.utils.set_random_seed(0)
    model = TfKerasSubclassed()
    model(np.zeros((1, *NATIVE, 3), "float32"))
    assert_equals_original(cz.convolutionalize(model), lambda x: outputs(model(x, training=False)))


def test_tf_module_object_converts() -> None:
    module = Classifier()
    assert_equals_original(cz.convolutionalize(module), lambda x: outputs(module(tf.constant(x))))


# --------------------------------------------------------------------------- served by model.export()


def test_converted_model_is_served_by_export_at_any_size(keras3: Path) -> None:
    """Under TensorFlow, ``fcn.export()`` writes a SavedModel whose input has free height and width
    and whose maps equal the converted Keras model's, at the native size and at 26x29."""
    result = json.loads((keras3 / "result.json").read_text())
    assert result["backend"] == "tensorflow"
    assert list(result["inputs"].values()) == ["(None, None, None, 3)"]
    original = signature_run(keras3 / "original")
    for size, cells in [(16, (1, 1)), (26, (6, 7))]:
        served, fcn = np.load(keras3 / f"served{size}.npy"), np.load(keras3 / f"fcn{size}.npy")
        assert served.shape == (1, *cells, 5) and relative_error(served, fcn) <= RTOL
    x, served = np.load(keras3 / "x26.npy"), np.load(keras3 / "served26.npy")
    crops = np.concatenate([x[:, 2 * i:2 * i + 16, 2 * j:2 * j + 16] for i in range(6) for j in range(7)])
    assert relative_error(served[0].reshape(42, 5), original(crops)[0]) <= RTOL


# --------------------------------------------------------------------------- refusals name the cause


def test_untraced_tf_module_is_refused_by_what_it_needs() -> None:
    with pytest.raises(cz.NotConvolutionalizable, match=r"has no traced __call__ graphs; decorate __call__ "
                                                        r"with @tf.function\(input_signature="):
        cz.convolutionalize(Untraced())


def test_graph_traced_for_any_size_is_asked_for_the_native_one() -> None:
    with pytest.raises(cz.NotConvolutionalizable, match=r"\(MatMul\) reads features whose number is not "
                                                        r"fixed: the graph's input has no static height"):
        cz.convolutionalize(AnySize(), (16, 16))


def test_op_without_a_keras_equivalent_is_refused_by_name() -> None:
    with pytest.raises(cz.NotConvolutionalizable,
                       match=r"TensorFlow op '.*' \(LRN\) has no Keras equivalent"):
        cz.convolutionalize(LocalResponseNorm())


def test_directory_without_saved_model_pb_is_not_a_saved_model(tmp_path: Path) -> None:
    (tmp_path / "variables").mkdir()
    with pytest.raises(ValueError, match=r"cannot load "):
        cz.convolutionalize(tmp_path)
