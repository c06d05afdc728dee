"""Keras heads of issue 12: a ``Permute`` before the ``Flatten`` (MTCNN's stages), ``Reshape``
used as a flatten, and several Dense heads on one trunk (MTCNN's O-Net has three).

Each case is checked at the native size (relative 1e-4 against the original) and at a larger
non-square input: the map has the rows and columns the geometry predicts and, for the
padding-free models, every cell equals the original on its true crop (relative 1e-4, as
``selfcheck.CHECK_RTOL``: a Dense over a whole window sums in another order than a conv).
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import layers

import convolutionalize as cz
from convolutionalize.frameworks.keras.model import convolutionalize_keras, predict_nchw

RTOL = 1e-4


def outputs(model: keras.Model, x: np.ndarray) -> list[np.ndarray]:
    """Every output of ``model`` on ``x`` (a dict of outputs in its sorted key order)."""
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in keras.tree.flatten(model(x, training=False))]


def rel(actual: np.ndarray, expected: np.ndarray) -> float:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-30))


def rand(*shape: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def native_error(fcn: keras.Model, model: keras.Model, x: np.ndarray, channels_last: bool = True) -> float:
    """Max relative error of the converted model's 1x1 maps against the original at the native size."""
    maps, expected = outputs(fcn, x), outputs(model, x)
    assert len(maps) == len(expected)
    return max(rel(m[:, 0, 0] if channels_last else m[:, :, 0, 0], e) for m, e in zip(maps, expected))


def crop_error(fcn: keras.Model, model: keras.Model, x: np.ndarray, channels_last: bool = True) -> float:
    """Max relative error of every cell of every output map against the original run on the
    cell's true crop (one batch of crops)."""
    g = cz.geometry_of(fcn)
    (h, w), maps = g.window, outputs(fcn, x)
    rows, cols = g.cells(*(x.shape[1:3] if channels_last else x.shape[2:4]))
    cells = [(i, j) for i in range(rows) for j in range(cols)]
    crops = []
    for i, j in cells:
        x0, y0, _, _ = g.box(i, j)
        crops.append(x[:, y0:y0 + h, x0:x0 + w] if channels_last else x[:, :, y0:y0 + h, x0:x0 + w])
    expected = outputs(model, np.concatenate(crops))
    return max(rel(m[0, i, j] if channels_last else m[0, :, i, j], e[k])
               for m, e in zip(maps, expected) for k, (i, j) in enumerate(cells))


def map_sizes(fcn: keras.Model, x: np.ndarray, channels_last: bool = True) -> list[tuple[int, int]]:
    return [tuple(m.shape[1:3] if channels_last else m.shape[2:4]) for m in outputs(fcn, x)]


def kinds(model: keras.Model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


def flat_denses(model: keras.Model) -> list[str]:
    """Dense layers that still read a vector (per-pixel Dense reads 4-D)."""
    return [node.operation.name for nodes in model._nodes_by_depth.values() for node in nodes
            if isinstance(node.operation, layers.Dense) and len(node.input_tensors[0].shape) != 4]


# --------------------------------------------------------------------------- models


def trunk(inputs: keras.KerasTensor, data_format: str = "channels_last") -> keras.KerasTensor:
    """Padding-free, non-square: 14x11 -> 12x9 -> 5x4 map (5 channels), stride 2."""
    x = layers.Conv2D(4, 3, data_format=data_format)(inputs)
    x = layers.PReLU(shared_axes=[1, 2] if data_format == "channels_last" else [2, 3])(x)
    return layers.Conv2D(5, 3, strides=2, activation="relu", data_format=data_format)(x)


def permuted(dims: tuple[int, int, int], flatten: str = "Flatten", flatten_format: str | None = None,
             data_format: str = "channels_last") -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((14, 11, 3) if data_format == "channels_last" else (3, 14, 11))
    x = layers.Permute(dims)(trunk(inputs, data_format))
    x = layers.Flatten(data_format=flatten_format)(x) if flatten == "Flatten" else layers.Reshape((-1,))(x)
    x = layers.Dense(8, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(3)(x), name="permuted")


def onet_like(outputs_as: str = "list") -> keras.Model:
    """MTCNN's O-Net shape, padding-free and non-square (26x22, stride 4): PReLU trunk,
    ``Permute((3, 2, 1))``, Flatten, Dense + PReLU, then three heads: face softmax, box, landmarks."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((26, 22, 3))
    x = inputs
    for filters, kernel, pool in ((8, 3, 2), (8, 3, 2), (12, 2, None)):
        x = layers.PReLU(shared_axes=[1, 2])(layers.Conv2D(filters, kernel)(x))
        x = layers.MaxPooling2D(pool)(x) if pool else x
    x = layers.Flatten()(layers.Permute((3, 2, 1))(x))
    x = layers.Dropout(0.25)(layers.PReLU()(layers.Dense(16)(x)))
    heads = [layers.Dense(2, activation="softmax", name="face")(x), layers.Dense(4, name="box")(x),
             layers.Dense(10, name="landmarks")(x)]
    if outputs_as == "dict":
        return keras.Model(inputs, {"face": heads[0], "box": heads[1], "landmarks": heads[2]}, name="onet")
    return keras.Model(inputs, heads, name="onet")


def mtcnn_onet() -> keras.Model:
    """MTCNN's O-Net as its Keras ports build it (48x48, a "same"-padded first pool)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((48, 48, 3))
    x = layers.PReLU(shared_axes=[1, 2])(layers.Conv2D(32, 3)(inputs))
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    x = layers.MaxPooling2D(3, strides=2)(layers.PReLU(shared_axes=[1, 2])(layers.Conv2D(64, 3)(x)))
    x = layers.MaxPooling2D(2)(layers.PReLU(shared_axes=[1, 2])(layers.Conv2D(64, 3)(x)))
    x = layers.PReLU(shared_axes=[1, 2])(layers.Conv2D(128, 2)(x))
    x = layers.PReLU()(layers.Dense(256)(layers.Flatten()(layers.Permute((3, 2, 1))(x))))
    return keras.Model(inputs, [layers.Dense(2, activation="softmax")(x), layers.Dense(4)(x),
                                layers.Dense(10)(x)], name="mtcnn_onet")


# --------------------------------------------------------------------------- Permute before Flatten


@pytest.mark.parametrize("flatten_format", [None, "channels_first"], ids=["flatten-last", "flatten-first"])
@pytest.mark.parametrize("dims, layout", [((3, 2, 1), "NCWH"), ((2, 1, 3), "NWHC")], ids=["321", "213"])
def test_permute_before_flatten(dims: tuple[int, int, int], layout: str, flatten_format: str | None) -> None:
    model = permuted(dims, flatten_format=flatten_format)
    fcn = convolutionalize_keras(model)
    g = cz.geometry_of(fcn)
    assert fcn.plan.feature.layout == layout and fcn.plan.feature.size == (5, 4)
    assert (g.window, g.stride, g.crop_equivalent) == ((14, 11), (2, 2), True)
    assert "Flatten" not in kinds(fcn) and flat_denses(fcn) == []
    assert [la.dims for la in fcn.layers if isinstance(la, layers.Permute)] == [dims, dims]  # an involution
    assert native_error(fcn, model, rand(2, 14, 11, 3)) < RTOL
    x = rand(1, 14 + 3 * 2, 11 + 1 * 2, 3)  # 20x13: 4 rows, 2 columns
    assert map_sizes(fcn, x) == [(4, 2)] == [g.cells(20, 13)]
    assert crop_error(fcn, model, x) < RTOL


@pytest.mark.parametrize("dims, layout", [((1, 3, 2), "NCWH"), ((3, 2, 1), "NWHC")], ids=["132", "321"])
def test_permute_before_flatten_channels_first(dims: tuple[int, int, int], layout: str) -> None:
    """Permute dims count (C, H, W) for channels_first; the map comes back as (N, K, rows, cols)."""
    model = permuted(dims, data_format="channels_first")
    fcn = convolutionalize_keras(model)
    assert fcn.plan.feature.layout == layout
    assert native_error(fcn, model, rand(2, 3, 14, 11), channels_last=False) < RTOL
    x = rand(1, 3, 20, 13)
    assert map_sizes(fcn, x, channels_last=False) == [(4, 2)]
    assert crop_error(fcn, model, x, channels_last=False) < RTOL


def test_permute_then_conv_is_refused() -> None:
    """A spatial layer on a permuted map would slide over the wrong axes: refused, named."""
    inputs = keras.Input((8, 6, 3))
    x = layers.Conv2D(2, 3, name="after_permute")(layers.Permute((2, 1, 3))(inputs))
    model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))
    with pytest.raises(cz.NotConvolutionalizable, match="'after_permute'"):
        convolutionalize_keras(model)


def test_per_pixel_prelu_is_refused() -> None:
    inputs = keras.Input((8, 6, 3))
    x = layers.PReLU(name="pixel_slopes")(layers.Conv2D(2, 3)(inputs))
    model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))
    with pytest.raises(cz.NotConvolutionalizable, match=r"'pixel_slopes'.*shared_axes"):
        convolutionalize_keras(model)


# --------------------------------------------------------------------------- Reshape as a flatten


@pytest.mark.parametrize("dims", [None, (3, 2, 1)], ids=["plain", "permuted-321"])
def test_reshape_as_flatten(dims: tuple[int, int, int] | None) -> None:
    if dims is None:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((14, 11, 3))
        x = layers.Dense(8, activation="relu")(layers.Reshape((5 * 4 * 5,))(trunk(inputs)))
        model = keras.Model(inputs, layers.Dense(3)(x))
    else:
        model = permuted(dims, flatten="Reshape")
    fcn = convolutionalize_keras(model)
    assert [s.op for s in fcn.plan.steps][:2] == ["flatten", "linear"]
    assert "Reshape" not in kinds(fcn) and flat_denses(fcn) == []
    assert native_error(fcn, model, rand(2, 14, 11, 3)) < RTOL
    x = rand(1, 20, 13, 3)
    assert map_sizes(fcn, x) == [(4, 2)]
    assert crop_error(fcn, model, x) < RTOL


# --------------------------------------------------------------------------- several outputs


def test_three_outputs_in_order_on_one_geometry() -> None:
    model = onet_like()
    fcn = convolutionalize_keras(model)
    g = cz.geometry_of(fcn)
    assert (g.window, g.stride, g.crop_equivalent) == ((26, 22), (4, 4), True)
    assert fcn.plan.outputs == ("face", "box", "landmarks")
    assert fcn.plan.feature.layout == "NCWH" and fcn.plan.feature.size == (4, 3)
    assert len(fcn.outputs) == 3 and flat_denses(fcn) == []
    assert native_error(fcn, model, rand(2, 26, 22, 3)) < RTOL
    x = rand(1, 26 + 3 * 4, 22 + 1 * 4, 3)  # 38x26: 4 rows, 2 columns
    maps = outputs(fcn, x)
    assert [m.shape for m in maps] == [(1, 4, 2, 2), (1, 4, 2, 4), (1, 4, 2, 10)]
    assert np.allclose(maps[0].sum(-1), 1.0, atol=1e-5)  # softmax over the face classes
    assert crop_error(fcn, model, x) < RTOL
    assert "outputs: 3 maps on one geometry (face, box, landmarks)" in fcn.plan.describe()


def test_dict_outputs_keep_their_keys() -> None:
    model = onet_like("dict")
    fcn = convolutionalize_keras(model)
    out = fcn(rand(1, 30, 30, 3), training=False)
    assert isinstance(out, dict) and sorted(out) == ["box", "face", "landmarks"]
    assert tuple(out["landmarks"].shape) == (1, 2, 3, 10)
    assert crop_error(fcn, model, rand(1, 30, 30, 3)) < RTOL


def test_mtcnn_onet_with_same_padding() -> None:
    """The published O-Net: converts, equals the original at 48x48, and its maps have the
    predicted rows and columns (a "same" pool: no crop equality to check)."""
    model = mtcnn_onet()
    fcn = convolutionalize_keras(model)
    g = cz.geometry_of(fcn)
    assert g.stride == (8, 8) and not g.crop_equivalent
    assert any(note.startswith("padding in") for note in g.notes)
    assert fcn.self_check.crop_error is None
    assert native_error(fcn, model, rand(1, 48, 48, 3)) < RTOL
    assert map_sizes(fcn, rand(1, 48 + 3 * 8, 48 + 1 * 8, 3)) == [(4, 2)] * 3


def test_several_outputs_pool_global_and_none() -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 10, 3))
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(6, 3, strides=2, padding="same")(inputs))
    model = keras.Model(inputs, [layers.Dense(3, name="a")(x), layers.Dense(2, name="b")(x)])
    x = rand(1, 12, 10, 3)
    cam = convolutionalize_keras(model, pool="none")
    for m, e in zip(outputs(cam, x), outputs(model, x)):
        assert m.shape[1:3] == (6, 5) and rel(m.mean((1, 2)), e) < RTOL
    glob = convolutionalize_keras(model, pool="global")
    assert [m.shape for m in outputs(glob, rand(2, 30, 18, 3))] == [(2, 3), (2, 2)]


def test_flatten_heads_pool_global_is_the_mean_of_each_window_map() -> None:
    model = onet_like()
    window, glob = convolutionalize_keras(model), convolutionalize_keras(model, pool="global")
    x = rand(1, 34, 30, 3)
    for m, mean in zip(outputs(glob, x), outputs(window, x)):
        assert rel(m, mean.mean((1, 2))) < 1e-5


def test_an_output_that_is_a_map_is_refused() -> None:
    inputs = keras.Input((8, 8, 3))
    feature = layers.Conv2D(2, 3, name="seg")(inputs)
    model = keras.Model(inputs, [layers.Dense(2)(layers.Flatten()(feature)), feature])
    with pytest.raises(cz.NotConvolutionalizable, match="'seg' is a feature map of the body, returned"):
        convolutionalize_keras(model)


# --------------------------------------------------------------------------- property


@st.composite
def head_specs(draw: st.DrawFn) -> dict:
    """Random padding-free trunks (native size non-square), any permutation of (H, W, C) before
    a Flatten / channels_first Flatten / Reshape, and one to three Dense heads."""
    convs = [(draw(st.integers(1, 3)), draw(st.integers(1, 2))) for _ in range(draw(st.integers(1, 2)))]
    rows, cols, stride = draw(st.integers(1, 3)), draw(st.integers(1, 3)), 1
    for k, s in reversed(convs):  # the smallest native size giving that many feature cells
        rows, cols = (rows - 1) * s + k, (cols - 1) * s + k
    for _, s in convs:
        stride *= s
    return {"seed": draw(st.integers(0, 1000)), "convs": convs, "stride": stride, "native": (rows, cols),
            "dims": draw(st.sampled_from(list(itertools.permutations((1, 2, 3))))),
            "flatten": draw(st.sampled_from(["Flatten", "Flatten-first", "Reshape"])),
            "heads": draw(st.integers(1, 3)), "grow": (draw(st.integers(0, 3)), draw(st.integers(0, 3)))}


def build_head(spec: dict) -> keras.Model:
    keras.utils.set_random_seed(spec["seed"])
    inputs = keras.Input((*spec["native"], 2))
    x = inputs
    for k, s in spec["convs"]:
        x = layers.Conv2D(3, k, strides=s, activation="tanh")(x)
    x = layers.Permute(spec["dims"])(x)
    if spec["flatten"] == "Reshape":
        x = layers.Reshape((-1,))(x)
    else:
        x = layers.Flatten(data_format="channels_first" if spec["flatten"] == "Flatten-first" else None)(x)
    x = layers.Dense(4, activation="relu")(x)
    return keras.Model(inputs, [layers.Dense(2 + k)(x) for k in range(spec["heads"])])


@settings(max_examples=20)
@given(head_specs())
def test_property_permuted_multi_head_models_equal_crops(spec: dict) -> None:
    model, (h, w), s = build_head(spec), spec["native"], spec["stride"]
    fcn = convolutionalize_keras(model)
    g = cz.geometry_of(fcn)
    assert g.crop_equivalent and g.stride == (s, s) and g.window == (h, w)
    assert flat_denses(fcn) == [] and len(fcn.outputs) == spec["heads"]
    assert fcn.self_check.crop_error is not None and fcn.self_check.crop_error < RTOL
    x = rand(1, h + spec["grow"][0] * s, w + spec["grow"][1] * s, 2)
    assert map_sizes(fcn, x) == [g.cells(*x.shape[1:3])] * spec["heads"]
    assert crop_error(fcn, model, x) < RTOL


def test_predict_nchw_gives_one_output_of_several() -> None:
    fcn = convolutionalize_keras(onet_like())
    x = rand(1, 3, 30, 30)
    assert predict_nchw(fcn, x).shape == (1, 2, 2, 3)  # the first output unless told
    landmarks = predict_nchw(fcn, x, output=2)
    assert rel(landmarks, outputs(fcn, x.transpose(0, 2, 3, 1))[2].transpose(0, 3, 1, 2)) == 0.0
    with pytest.raises(ValueError, match="has 3 outputs; output=3 is not one"):
        predict_nchw(fcn, x, output=3)
