"""Legacy HDF5 Keras files (``.h5`` / ``.hdf5``) load by path in the library and the CLI, like
``.keras``: files that Keras 3 writes with ``model.save("x.h5")``, and files laid out as
``tf.keras`` 2.x wrote them (Keras 2 layer configs, ``name:0`` weight names), which is how
many packages still ship their models (MTCNN's R-Net here: ``Permute((3, 2, 1))`` before
the ``Flatten``, two heads).

Numbers: the converted model against the loaded original at the native size and on the
true crops of every cell of a larger non-square input, relative 1e-4 (``CHECK_RTOL``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np
import pytest
from keras import layers

import convolutionalize as cz
from convolutionalize.api import conversion_info
from convolutionalize.cli import main
from convolutionalize.frameworks.keras.model import load_keras
from convolutionalize.models import load_model

# tf.keras files list their one input ([input_1]); calling the loaded model on a bare array warns
pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs` doesn't match:UserWarning")

RTOL = 1e-4
NATIVE = (24, 20)  # R-Net-like, non-square: map 3x2 (16 channels), stride 4
LARGER = (NATIVE[0] + 3 * 4, NATIVE[1] + 1 * 4)  # 36x24: 4 rows, 2 columns


def outputs(model: keras.Model, x: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in keras.tree.flatten(model(x, training=False))]


def rel(actual: np.ndarray, expected: np.ndarray) -> float:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-30))


def rand(*shape: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def check_conversion(fcn: keras.Model, original: keras.Model) -> None:
    """Native size equal, and every cell of a larger non-square input equal to its true crop."""
    g = cz.geometry_of(fcn)
    assert g.window == NATIVE and g.stride == (4, 4) and g.crop_equivalent
    x = rand(2, *NATIVE, 3)
    for m, e in zip(outputs(fcn, x), outputs(original, x), strict=True):
        assert rel(m[:, 0, 0], e) < RTOL
    x = rand(1, *LARGER, 3)
    maps = outputs(fcn, x)
    assert [m.shape[1:3] for m in maps] == [g.cells(*LARGER)] * 2 == [(4, 2)] * 2
    for i in range(4):
        for j in range(2):
            x0, y0, x1, y1 = g.box(i, j)
            for m, e in zip(maps, outputs(original, x[:, y0:y1, x0:x1]), strict=True):
                assert rel(m[0, i, j], e[0]) < RTOL


# --------------------------------------------------------------------------- files


def rnet() -> keras.Model:
    """MTCNN's R-Net shape, padding-free and smaller (Keras 3 layers)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((*NATIVE, 3))
    x = layers.MaxPooling2D(2)(layers.PReLU(shared_axes=[1, 2])(layers.Conv2D(8, 3)(inputs)))
    x = layers.MaxPooling2D(3, 2)(layers.PReLU(shared_axes=[1, 2])(layers.Conv2D(12, 3)(x)))
    x = layers.PReLU(shared_axes=[1, 2])(layers.Conv2D(16, 2)(x))
    x = layers.PReLU()(layers.Dense(16)(layers.Flatten()(layers.Permute((3, 2, 1))(x))))
    return keras.Model(inputs, [layers.Dense(2, activation="softmax")(x), layers.Dense(4)(x)], name="rnet")


def _k2(cls: str, name: str, inbound: str | None, **config: Any) -> dict[str, Any]:
    """One layer of a tf.keras 2.x functional config (its 2.x keys, list-style inbound nodes)."""
    layer = {"class_name": cls, "config": {"name": name, "trainable": True, "dtype": "float32", **config},
             "name": name, "inbound_nodes": [[[inbound, 0, 0, {}]]] if inbound else []}
    return layer


def _conv(name: str, inbound: str, filters: int, kernel: int) -> dict[str, Any]:
    return _k2("Conv2D", name, inbound, filters=filters, kernel_size=[kernel, kernel], strides=[1, 1],
               padding="valid", data_format="channels_last", dilation_rate=[1, 1], groups=1,
               activation="linear", use_bias=True,
               kernel_initializer={"class_name": "GlorotUniform", "config": {"seed": None}},
               bias_initializer={"class_name": "Zeros", "config": {}}, kernel_regularizer=None,
               bias_regularizer=None, activity_regularizer=None, kernel_constraint=None, bias_constraint=None)


def _dense(name: str, inbound: str, units: int, activation: str = "linear") -> dict[str, Any]:
    return _k2("Dense", name, inbound, units=units, activation=activation, use_bias=True,
               kernel_initializer={"class_name": "GlorotUniform", "config": {"seed": None}},
               bias_initializer={"class_name": "Zeros", "config": {}}, kernel_regularizer=None,
               bias_regularizer=None, activity_regularizer=None, kernel_constraint=None, bias_constraint=None)


def _prelu(name: str, inbound: str, shared: list[int] | None) -> dict[str, Any]:
    return _k2("PReLU", name, inbound, alpha_initializer={"class_name": "Zeros", "config": {}},
               alpha_regularizer=None, alpha_constraint=None, shared_axes=shared)


def _pool(name: str, inbound: str, size: int, stride: int) -> dict[str, Any]:
    return _k2("MaxPooling2D", name, inbound, pool_size=[size, size], padding="valid",
               strides=[stride, stride], data_format="channels_last")


def write_tf_keras_h5(path: Path, version: str = "2.15.0") -> dict[str, list[np.ndarray]]:
    """An R-Net as ``tf.keras`` 2.15 ``model.save("rnet.h5")`` lays it out (standalone Keras 2.2
    named the functional class ``Model``); returns its weights."""
    rng = np.random.default_rng(0)
    layer_list = [
        {"class_name": "InputLayer", "config": {"batch_input_shape": [None, *NATIVE, 3], "dtype": "float32",
                                                "sparse": False, "ragged": False, "name": "input_1"},
         "name": "input_1", "inbound_nodes": []},
        _conv("conv1", "input_1", 8, 3), _prelu("prelu1", "conv1", [1, 2]), _pool("pool1", "prelu1", 2, 2),
        _conv("conv2", "pool1", 12, 3), _prelu("prelu2", "conv2", [1, 2]), _pool("pool2", "prelu2", 3, 2),
        _conv("conv3", "pool2", 16, 2), _prelu("prelu3", "conv3", [1, 2]),
        _k2("Permute", "permute", "prelu3", dims=[3, 2, 1]),
        _k2("Flatten", "flatten", "permute", data_format="channels_last"),
        _dense("conv4", "flatten", 16), _prelu("prelu4", "conv4", None),
        _dense("conv5-1", "prelu4", 2, "softmax"), _dense("conv5-2", "prelu4", 4),
    ]
    shapes = {"conv1": [(3, 3, 3, 8), (8,)], "prelu1": [(1, 1, 8)], "conv2": [(3, 3, 8, 12), (12,)],
              "prelu2": [(1, 1, 12)], "conv3": [(2, 2, 12, 16), (16,)], "prelu3": [(1, 1, 16)],
              "conv4": [(16 * 2 * 3, 16), (16,)], "prelu4": [(16,)], "conv5-1": [(16, 2), (2,)],
              "conv5-2": [(16, 4), (4,)]}
    weights = {name: [(0.3 * rng.standard_normal(s)).astype(np.float32) for s in ss]
               for name, ss in shapes.items()}
    config = {"class_name": "Model" if version.startswith("2.2") else "Functional", "config": {
        "name": "rnet", "trainable": True, "layers": layer_list, "input_layers": [["input_1", 0, 0]],
        "output_layers": [["conv5-1", 0, 0], ["conv5-2", 0, 0]]},
        "keras_version": version, "backend": "tensorflow"}
    with h5py.File(path, "w") as f:
        f.attrs["backend"], f.attrs["keras_version"] = "tensorflow", version
        f.attrs["model_config"] = json.dumps(config)
        group = f.create_group("model_weights")
        group.attrs["backend"], group.attrs["keras_version"] = b"tensorflow", version.encode()
        group.attrs["layer_names"] = np.array([la["name"].encode() for la in layer_list])
        for layer in layer_list:
            name, values = layer["name"], weights.get(layer["name"], [])
            kinds = ["kernel", "bias"] if layer["class_name"] in ("Conv2D", "Dense") else ["alpha"]
            names = [f"{name}/{kind}:0" for kind in kinds[:len(values)]]
            sub = group.create_group(name)
            sub.attrs["weight_names"] = np.array([n.encode() for n in names]) if names else np.asarray([])
            for weight_name, value in zip(names, values):
                sub.create_dataset(weight_name, data=value)
    return weights


@pytest.fixture()
def tf_keras_h5(tmp_path: Path) -> Path:
    path = tmp_path / "rnet.h5"
    write_tf_keras_h5(path)
    return path


@pytest.fixture()
def keras3_h5(tmp_path: Path) -> Path:
    path = tmp_path / "rnet_k3.hdf5"
    rnet().save(path)
    return path


# --------------------------------------------------------------------------- library


def test_tf_keras_h5_loads_with_its_weights(tmp_path: Path) -> None:
    weights = write_tf_keras_h5(tmp_path / "rnet.h5")
    model = load_keras(tmp_path / "rnet.h5")
    assert model.name == "rnet" and len(model.outputs) == 2
    for name, values in weights.items():
        loaded = model.get_layer(name).get_weights()
        assert all(np.array_equal(a, b) for a, b in zip(loaded, values, strict=True))


@pytest.mark.parametrize("version", ["2.15.0", "2.2.4"], ids=["tf-keras-2.15", "keras-2.2"])
def test_tf_keras_h5_converts_by_path(version: str, tmp_path: Path) -> None:
    tf_keras_h5 = tmp_path / "rnet.h5"
    write_tf_keras_h5(tf_keras_h5, version)
    fcn = cz.convolutionalize(tf_keras_h5)
    assert fcn.plan.feature.layout == "NCWH" and fcn.plan.outputs == ("conv5-1", "conv5-2")
    assert fcn.self_check.crop_error is not None and fcn.self_check.crop_error < RTOL
    check_conversion(fcn, load_keras(tf_keras_h5))


def test_keras3_hdf5_round_trip(keras3_h5: Path) -> None:
    original = rnet()
    loaded = load_keras(keras3_h5)
    pairs = zip(loaded.get_weights(), original.get_weights(), strict=True)
    assert all(np.array_equal(a, b) for a, b in pairs)
    check_conversion(cz.convolutionalize(keras3_h5), original)


def test_cli_model_loader_takes_h5(tf_keras_h5: Path) -> None:
    assert isinstance(load_model(str(tf_keras_h5)), keras.Model)
    with pytest.raises(ValueError, match=r"does not apply to the model file rnet\.h5"):
        load_model(str(tf_keras_h5), weights="random")


def test_weights_only_h5_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "rnet.weights.h5"
    rnet().save_weights(path)
    with pytest.raises(ValueError, match=r"holds weights only .*load_weights"):
        load_keras(path)


def test_corrupt_h5_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.h5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"cannot read broken\.h5 as a Keras model: not an HDF5") as info:
        cz.convolutionalize(path)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- CLI


def test_cli_inspect_h5(tf_keras_h5: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tf_keras_h5), "--image-size", *map(str, LARGER)]) == 0
    out = capsys.readouterr().out
    assert "outputs: 2 maps on one geometry (conv5-1, conv5-2)" in out
    assert "(NCWH)" in out and "crop equivalent: yes" in out
    assert "self-check at 32x32: map 3x4 as predicted, cells vs true crops" in out
    assert "map: 4x2 cells" in out


def test_cli_convert_h5_to_keras(tf_keras_h5: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.keras"
    assert main(["convert", str(tf_keras_h5), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    fcn = load_keras(out)
    assert cz.geometry_of(fcn).window == NATIVE and fcn.self_check is not None
    assert conversion_info(fcn).self_check == fcn.self_check.describe()
    check_conversion(fcn, load_keras(tf_keras_h5))


def test_cli_convert_to_h5_is_refused(tf_keras_h5: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(tf_keras_h5), "-o", str(tmp_path / "out.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is saved as .keras" in err[0]
