"""The Keras 3 adapter: seed 001 in Keras, padding-free CNNs against true crops (and a
property test over random ones), both data formats, pool modes, the caller's model left
alone, refusals, .keras files, the same weights in PyTorch and Keras, and (``-m zoo``)
``keras.applications`` with random weights.

Tolerances: relative 1e-5 where the rewrite only reorders sums of one window; 1e-4 where
a window pool averages many cells or two frameworks sum differently (as ``verify.CROP_RTOL``).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import layers
from torch import nn

import convolutionalize as cz
from convolutionalize import NotConvolutionalizable
from convolutionalize.frameworks.keras.model import (
    convolutionalize_keras,
    load_keras,
    predict_nchw,
    save_keras,
)

RTOL = 1e-5
CROP_RTOL = 1e-4
CLASSES = 5


def rel(actual: np.ndarray, expected: np.ndarray) -> float:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-30))


def run(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))


def rand(*shape: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def layer_kinds(model: keras.Model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


def flat_denses(model: keras.Model) -> list[str]:
    """Dense layers of ``model``'s graph that still read a vector (per-pixel Dense reads 4-D)."""
    return [node.operation.name for nodes in model._nodes_by_depth.values() for node in nodes
            if isinstance(node.operation, layers.Dense) and len(node.input_tensors[0].shape) != 4]


def snapshot(model: keras.Model) -> tuple[list[str], list[bool], list[bytes], str]:
    """Layers, trainable flags and weights of a model, to prove a conversion left it alone."""
    return ([layer.name for layer in model.layers], [layer.trainable for layer in model.layers],
            [w.tobytes() for w in model.get_weights()], repr(model.inputs[0].shape))


def crop_error(fcn: keras.Model, original: keras.Model, x: np.ndarray, native: tuple[int, int]) -> float:
    """Max relative error of every cell of ``fcn``'s map against the original on its crop
    (channels_last ``x``)."""
    dense = run(fcn, x)
    g = cz.geometry_of(fcn)
    worst = 0.0
    for i in range(dense.shape[1]):
        for j in range(dense.shape[2]):
            x0, y0, _, _ = g.box(i, j)
            crop = x[:, y0:y0 + native[0], x0:x0 + native[1]]
            worst = max(worst, rel(dense[:, i, j], run(original, crop)))
    return worst


# --------------------------------------------------------------------------- tiny models


def seed001() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((4, 4, 256)), layers.Flatten(),
                             layers.Dense(1024, activation="relu"), layers.Dense(10)], name="seed001")


def valid_cnn(data_format: str = "channels_last", flatten_format: str | None = None) -> keras.Model:
    """Padding-free: 13x13 -> 11x11 -> 5x5 (6 channels), stride 2; Flatten/Dense/Dropout head."""
    keras.utils.set_random_seed(0)
    shape = (13, 13, 3) if data_format == "channels_last" else (3, 13, 13)
    inputs = keras.Input(shape)
    x = layers.Conv2D(4, 3, activation="relu", data_format=data_format)(inputs)
    x = layers.Conv2D(6, 3, strides=2, activation="relu", data_format=data_format)(x)
    x = layers.Flatten(data_format=flatten_format)(x)
    x = layers.Dense(16, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    return keras.Model(inputs, layers.Dense(CLASSES)(x), name="valid_cnn")


def gap_cnn(keepdims: bool = False, pool: str = "avg") -> keras.Model:
    """Zero-padded body, global pooling, BatchNorm / LayerNorm / Dense head."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    gp = layers.GlobalAveragePooling2D if pool == "avg" else layers.GlobalMaxPooling2D
    x = gp(keepdims=keepdims)(x)
    if keepdims:
        x = layers.Reshape((8,))(x)
    x = layers.BatchNormalization()(x)
    x = layers.Dense(12, activation="gelu")(x)
    x = layers.LayerNormalization()(x)
    return keras.Model(inputs, layers.Dense(CLASSES)(x), name="gap_cnn")


# --------------------------------------------------------------------------- seed 001


def test_seed001_becomes_two_convs_and_matches_crops() -> None:
    model = seed001()
    fcn = convolutionalize_keras(model)
    convs = [layer for layer in fcn.layers if isinstance(layer, layers.Conv2D)]
    assert layer_kinds(fcn) == ["InputLayer", "Conv2D", "Conv2D"]  # no Dense, no Flatten left
    assert [c.kernel_size for c in convs] == [(4, 4), (1, 1)]
    x = rand(1, 8, 8, 256)
    assert run(fcn, x).shape == (1, 5, 5, 10)
    assert crop_error(fcn, model, x, (4, 4)) < RTOL
    assert fcn.native_error < RTOL
    assert cz.geometry_of(fcn).crop_equivalent


# --------------------------------------------------------------------------- padding-free CNNs


def test_valid_cnn_is_crop_equivalent() -> None:
    model = valid_cnn()
    fcn = convolutionalize_keras(model)
    g = cz.geometry_of(fcn)
    assert (g.window, g.stride, g.receptive_field, g.crop_equivalent) == ((13, 13), (2, 2), (13, 13), True)
    assert [s.op for s in fcn.plan.steps] == ["flatten", "linear", "keep", "linear"]
    assert fcn.plan.framework == "keras"
    assert flat_denses(fcn) == [] and "Flatten" not in layer_kinds(fcn)
    x = rand(2, 19, 21, 3)
    assert run(fcn, x).shape == (2, *g.cells(19, 21), CLASSES)
    assert crop_error(fcn, model, x, (13, 13)) < RTOL


@pytest.mark.parametrize("flatten_format", [None, "channels_first"])
def test_channels_first_matches_channels_last(flatten_format: str | None) -> None:
    """The same weights in both layouts give the same map; Flatten(data_format=...) decides
    whether Keras flattens CHW or (transposing first) HWC."""
    last, first = valid_cnn(), valid_cnn("channels_first", flatten_format)
    first.set_weights(last.get_weights())  # conv kernels are HWIO in both layouts
    if flatten_format is None:  # CHW flatten order: permute the first Dense's rows to match
        k, b = last.layers[4].get_weights()
        first.layers[4].set_weights([k.reshape(5, 5, 6, 16).transpose(2, 0, 1, 3).reshape(150, 16), b])
    x = rand(1, 21, 17, 3)
    fcn_first = convolutionalize_keras(first)
    assert fcn_first.plan.feature.layout == "NCHW"
    assert fcn_first.inputs[0].shape == (None, 3, None, None)
    expected = predict_nchw(convolutionalize_keras(last), x.transpose(0, 3, 1, 2))
    assert rel(predict_nchw(fcn_first, x.transpose(0, 3, 1, 2)), expected) < RTOL
    assert rel(run(first, x[:, :13, :13].transpose(0, 3, 1, 2)), expected[:, :, 0, 0]) < RTOL


def gap_softmax(data_format: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3) if data_format == "channels_last" else (3, 16, 16))
    x = layers.Conv2D(8, 3, strides=2, padding="same", data_format=data_format)(inputs)
    x = layers.GlobalAveragePooling2D(data_format=data_format)(x)
    x = layers.BatchNormalization()(layers.Dense(12, activation="relu")(x))
    return keras.Model(inputs, layers.Dense(CLASSES, activation="softmax")(x))


def test_channels_first_gap_softmax_head() -> None:
    """Softmax, BatchNorm and 1x1 convs of a channels_first head act on axis 1 (the classes)."""
    first, last = gap_softmax("channels_first"), gap_softmax("channels_last")
    last.set_weights(first.get_weights())
    image = rand(2, 3, 24, 20)
    fcn = convolutionalize_keras(first)
    assert [s.op for s in fcn.plan.steps] == ["global_pool", "linear", "batchnorm", "linear"]
    out = predict_nchw(fcn, image)
    assert out.shape == (2, CLASSES, 5, 3)
    assert np.allclose(out.sum(1), 1.0, atol=1e-5)
    assert rel(out, predict_nchw(convolutionalize_keras(last), image)) < RTOL


@st.composite
def valid_specs(draw: st.DrawFn) -> dict:
    """Random padding-free CNNs (convs and pools, any kernel/stride) with a Flatten head."""
    specs = [(draw(st.sampled_from(["conv", "max", "avg"])), draw(st.integers(1, 3)),
              draw(st.integers(1, 2)), draw(st.integers(1, 4))) for _ in range(draw(st.integers(1, 3)))]
    size, stride = draw(st.integers(1, 3)), 1  # feature cells
    for _, k, s, _ in reversed(specs):  # the smallest native size giving that many cells
        size = (size - 1) * s + k
    for _, _, s, _ in specs:
        stride *= s
    return {"seed": draw(st.integers(0, 1000)), "layers": specs, "stride": stride,
            "native": (size + draw(st.integers(0, 1)), size), "hidden": draw(st.integers(1, 6))}


def build_valid(spec: dict) -> keras.Model:
    keras.utils.set_random_seed(spec["seed"])
    inputs = keras.Input((*spec["native"], 2))
    x = inputs
    for kind, k, s, filters in spec["layers"]:
        if kind == "conv":
            x = layers.Conv2D(filters, k, strides=s, activation="relu")(x)
        else:
            x = (layers.MaxPooling2D if kind == "max" else layers.AveragePooling2D)(k, strides=s)(x)
    x = layers.Dropout(0.3)(layers.Dense(spec["hidden"], activation="tanh")(layers.Flatten()(x)))
    return keras.Model(inputs, layers.Dense(3)(x))


@settings(max_examples=20)
@given(valid_specs())
def test_property_random_valid_cnns_equal_crops(spec: dict) -> None:
    model, native, stride = build_valid(spec), spec["native"], spec["stride"]
    fcn = convolutionalize_keras(model)
    g = cz.geometry_of(fcn)
    assert g.crop_equivalent and g.stride == (stride, stride) and g.window == native
    assert flat_denses(fcn) == []
    x = rand(1, native[0] + 2 * stride, native[1] + stride, 2)
    assert run(fcn, x).shape[1:3] == g.cells(*x.shape[1:3])
    assert crop_error(fcn, model, x, native) < CROP_RTOL


# --------------------------------------------------------------------------- pool modes and heads


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("reduce", ["avg", "max"])
def test_gap_head_window_mode(keepdims: bool, reduce: str) -> None:
    model = gap_cnn(keepdims, reduce)
    fcn = convolutionalize_keras(model)
    g = cz.geometry_of(fcn)
    assert (g.stride, g.window, g.crop_equivalent) == ((2, 2), (16, 16), False)
    assert any(n.startswith("padding in") for n in g.notes)
    pools = [la for la in fcn.layers if isinstance(la, (layers.AveragePooling2D, layers.MaxPooling2D))]
    assert len(pools) == 1 and pools[0].pool_size == (8, 8) and pools[0].strides == (1, 1)
    x = rand(1, 20, 24, 3)
    dense = run(fcn, x)
    assert dense.shape == (1, 3, 5, CLASSES)
    assert fcn.native_error < CROP_RTOL


def test_pool_none_mean_is_logits_and_global_keeps_any_size() -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same")(inputs)
    x = layers.Dense(CLASSES)(layers.Dropout(0.2)(layers.GlobalAveragePooling2D()(x)))
    model = keras.Model(inputs, x)
    cam = convolutionalize_keras(model, pool="none")
    x = rand(1, 16, 16, 3)
    assert run(cam, x).shape == (1, 8, 8, CLASSES)
    assert rel(run(cam, x).mean((1, 2)), run(model, x)) < RTOL
    glob = convolutionalize_keras(model, pool="global")
    assert run(glob, rand(2, 40, 24, 3)).shape == (2, CLASSES)
    assert cz.geometry_of(glob).pool == "global"


def test_flatten_head_global_is_mean_of_window_map() -> None:
    model = valid_cnn()
    window, glob = convolutionalize_keras(model), convolutionalize_keras(model, pool="global")
    x = rand(1, 17, 17, 3)
    assert rel(run(glob, x), run(window, x).mean((1, 2))) < RTOL


def test_nested_model_and_softmax_head() -> None:
    """Transfer-learning shape: Sequential([base model, GAP, Dense softmax])."""
    keras.utils.set_random_seed(0)
    base_in = keras.Input((12, 12, 3))
    base = keras.Model(base_in, layers.Conv2D(6, 3, strides=3)(base_in), name="base")
    model = keras.Sequential([keras.Input((12, 12, 3)), base, layers.GlobalAveragePooling2D(),
                              layers.Dense(CLASSES, activation="softmax")])
    fcn = convolutionalize_keras(model)
    assert fcn.plan.feature.size == (4, 4)
    x = rand(1, 18, 15, 3)
    out = run(fcn, x)
    assert out.shape == (1, 3, 2, CLASSES)
    assert np.allclose(out.sum(-1), 1.0, atol=1e-5)  # softmax over the class channels
    assert rel(out[0, 1, 1], run(model, x[:, 3:15, 3:15])[0]) < RTOL


def test_concat_of_avg_and_max_pool_head() -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 10, 3))
    feature = layers.Conv2D(4, 3)(inputs)
    x = layers.Concatenate()([layers.GlobalAveragePooling2D()(feature), layers.GlobalMaxPooling2D()(feature)])
    model = keras.Model(inputs, layers.Dense(CLASSES)(x))
    fcn = convolutionalize_keras(model)
    assert sorted(s.op for s in fcn.plan.steps) == ["concat", "global_pool", "global_pool", "linear"]
    x = rand(1, 13, 12, 3)
    assert crop_error(fcn, model, x, (10, 10)) < CROP_RTOL and cz.geometry_of(fcn).crop_equivalent


def test_dynamic_input_needs_input_size() -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = layers.Dense(CLASSES)(layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3, strides=2)(inputs)))
    model = keras.Model(inputs, x)
    with pytest.raises(ValueError, match="input_size is required"):
        convolutionalize_keras(model)
    fcn = convolutionalize_keras(model, input_size=(11, 11))
    assert cz.geometry_of(fcn).feature_size == (5, 5) and cz.geometry_of(fcn).crop_equivalent


# --------------------------------------------------------------------------- contract


def test_caller_model_unchanged() -> None:
    model = gap_cnn(True)
    model.layers[1].trainable = False
    before = snapshot(model)
    fcn = convolutionalize_keras(model)
    fcn.layers[1].set_weights([w * 0 for w in fcn.layers[1].get_weights()])
    assert snapshot(model) == before
    assert all(a is not b for a in fcn.layers for b in model.layers)


def test_attributes_survive_and_geometry_of() -> None:
    fcn = convolutionalize_keras(valid_cnn())
    assert isinstance(fcn.geometry, cz.Geometry) and isinstance(fcn.plan, cz.HeadPlan)
    assert isinstance(fcn.native_error, float)
    assert cz.geometry_of(fcn) is fcn.geometry
    assert not any(isinstance(v, (cz.Geometry, cz.HeadPlan)) for v in fcn.variables)


def test_save_and_load_roundtrip(tmp_path: Path) -> None:
    fcn = convolutionalize_keras(valid_cnn())
    path = save_keras(fcn, tmp_path / "fcn.keras")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fcn.keras"]  # no temp file left
    loaded = load_keras(path)
    assert loaded.geometry == fcn.geometry and loaded.plan == fcn.plan
    x = rand(1, 15, 17, 3)
    assert rel(run(loaded, x), run(fcn, x)) < RTOL
    save_keras(valid_cnn(), tmp_path / "orig.keras")
    assert rel(run(convolutionalize_keras(load_keras(tmp_path / "orig.keras")), x), run(fcn, x)) < RTOL


def test_load_keras_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"cannot read bad\.keras as a Keras model"):
        load_keras(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_keras(tmp_path / "missing.keras")
    with pytest.raises(ValueError, match=r"saved as \.keras"):
        save_keras(valid_cnn(), tmp_path / "x.h5")


# --------------------------------------------------------------------------- refusals


def _two_inputs() -> keras.Model:
    image, meta = keras.Input((8, 8, 3)), keras.Input((4,))
    x = layers.Flatten()(layers.Conv2D(2, 3)(image))
    return keras.Model([image, meta], layers.Dense(2)(layers.Concatenate()([x, meta])), name="two_inputs")


def _tokens() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = layers.Reshape((16, 12))(layers.Conv2D(12, 2, strides=2)(inputs))
    x = layers.MultiHeadAttention(2, 6)(x, x)
    return keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling1D()(x)))


def _fully_conv() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, layers.Conv2D(2, 3)(inputs))


def _two_features() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    a = layers.GlobalAveragePooling2D()(layers.Conv2D(2, 3, name="left")(inputs))
    b = layers.GlobalAveragePooling2D()(layers.Conv2D(2, 1, name="right")(inputs))
    return keras.Model(inputs, layers.Dense(2)(layers.Concatenate()([a, b])))


def _flat_norm() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = layers.LayerNormalization(name="flat_norm")(layers.Flatten()(layers.Conv2D(2, 3)(inputs)))
    return keras.Model(inputs, layers.Dense(2)(x))


@pytest.mark.parametrize("build, match", [
    (_two_inputs, "'two_inputs' has 2 inputs"),
    (_tokens, "layer 'reshape.*tokens"),
    (_fully_conv, "fully convolutional"),
    (_two_features, "several feature maps.*'left'.*'right'|several feature maps.*'right'.*'left'"),
    (_flat_norm, "head layer 'flat_norm'.*before any Dense"),
], ids=["two-inputs", "tokens", "fully-conv", "two-features", "norm-on-flat"])
def test_refusals_name_the_layer(build, match: str) -> None:
    with pytest.raises(NotConvolutionalizable, match=match):
        convolutionalize_keras(build())


def test_public_api_dispatches_keras_models() -> None:
    fcn = cz.convolutionalize(valid_cnn())
    assert cz.geometry_of(fcn).window == (13, 13) and fcn.plan.framework == "keras"


def test_bad_options() -> None:
    with pytest.raises(ValueError, match=r"differs from the static input size"):
        convolutionalize_keras(valid_cnn(), input_size=(32, 32))
    unbuilt = keras.Sequential([layers.Dense(2)])
    with pytest.raises(ValueError, match="no symbolic graph"):
        convolutionalize_keras(unbuilt)


# --------------------------------------------------------------------------- PyTorch == Keras


def test_same_weights_in_torch_and_keras_give_the_same_map() -> None:
    torch.manual_seed(0)
    tm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(),
                       nn.Flatten(), nn.Linear(150, 16), nn.ReLU(), nn.Linear(16, CLASSES)).eval()
    km = valid_cnn()
    conv1, conv2, fc1, fc2 = tm[0], tm[2], tm[5], tm[7]
    hwio = [c.weight.detach().numpy().transpose(2, 3, 1, 0) for c in (conv1, conv2)]
    # torch flattens (C, H, W), Keras (H, W, C): reorder fc1's inputs
    fc1_k = fc1.weight.detach().numpy().reshape(16, 6, 5, 5).transpose(0, 2, 3, 1).reshape(16, 150).T
    km.set_weights([hwio[0], conv1.bias.detach().numpy(), hwio[1], conv2.bias.detach().numpy(), fc1_k,
                    fc1.bias.detach().numpy(), fc2.weight.detach().numpy().T, fc2.bias.detach().numpy()])
    image = rand(1, 3, 23, 19)
    t_map = cz.convolutionalize(tm, input_size=(13, 13))(torch.from_numpy(image)).detach().numpy()
    k_fcn = convolutionalize_keras(km)
    assert t_map.shape == (1, CLASSES, 6, 4)
    assert rel(predict_nchw(k_fcn, image), t_map) < CROP_RTOL
    assert cz.geometry_of(k_fcn).window == cz.geometry_of(cz.convolutionalize(tm, input_size=13)).window


# --------------------------------------------------------------------------- keras.applications

ZOO = {  # name: native size (the smallest each accepts is 32..75; the native size keeps runs short)
    "VGG16": 64, "ResNet50": 64, "MobileNetV2": 96, "MobileNetV3Small": 96, "EfficientNetB0": 64,
    "DenseNet121": 64, "Xception": 71, "InceptionV3": 75, "ConvNeXtTiny": 64,
    "ResNet50V2": 64, "EfficientNetV2B0": 64,
}


@pytest.mark.zoo
@pytest.mark.parametrize("name", sorted(ZOO))
def test_keras_applications(name: str) -> None:
    size = ZOO[name]
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10,
                                              classifier_activation=None)
    fcn = convolutionalize_keras(model)
    g = cz.geometry_of(fcn)
    assert fcn.native_error < CROP_RTOL
    assert flat_denses(fcn) == []  # no Dense reads a vector any more (per-pixel ones read 4-D)
    x = rand(1, size, size, 3)
    native = run(fcn, x)
    assert native.shape == (1, 1, 1, 10)
    assert rel(native[0, 0, 0], run(model, x)[0]) < CROP_RTOL
    big = (size + 2 * g.stride[0], size + 2 * g.stride[1])
    assert run(fcn, rand(1, *big, 3)).shape == (1, 3, 3, 10) == (1, *g.cells(*big), 10)
    assert fcn.self_check.cells == g.cells(*fcn.self_check.size)  # checked at a non-square size


def test_strided_same_padding_keeps_the_cells_in_place_at_any_size(tmp_path: Path) -> None:
    """Strided padding="same" convolutions and max pools pad by how the input's size falls on
    the stride; fixed at their native pads, one more row at the bottom moves no cell and tiles
    equal the whole image (before: the map had other cells than the geometry's, relative 1.2)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    x = layers.SeparableConv2D(6, 3, strides=2, padding="same")(x)
    model = keras.Model(inputs, layers.Dense(5)(layers.Flatten()(x)))
    fcn = convolutionalize_keras(model)
    image = np.random.default_rng(0).integers(0, 255, (32 + 8 * 6 + 1, 32 + 8 * 5 + 3, 3), dtype=np.uint8)
    whole, tiled = cz.dense_map(fcn, image), cz.dense_map(fcn, image, tile=48)
    shorter = cz.dense_map(fcn, image[:-1])
    assert whole.shape == (5, *fcn.geometry.cells(*image.shape[:2])) == (5, 7, 6)
    assert np.abs(tiled - whole).max() <= 1e-5 * np.abs(whole).max()
    assert np.abs(shorter[:, :6] - whole[:, :6]).max() <= 1e-5 * np.abs(whole).max()
    path = save_keras(fcn, tmp_path / "same.keras")  # the -inf padding layer saves and loads
    assert np.abs(cz.dense_map(load_keras(path), image) - whole).max() <= 1e-6 * np.abs(whole).max()


def test_strided_same_average_pool_is_refused_by_name() -> None:
    inputs = keras.Input((32, 32, 3))
    x = layers.AveragePooling2D(3, strides=2, padding="same", name="pool")(layers.Conv2D(4, 3)(inputs))
    model = keras.Model(inputs, layers.Dense(5)(layers.Flatten()(x)))
    with pytest.raises(NotConvolutionalizable, match=r"layer 'pool' \(AveragePooling2D, padding='same'"):
        convolutionalize_keras(model)
