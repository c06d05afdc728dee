"""output_stride for ONNX graphs (``dilations``/``strides``/``pads``) and Keras models
(``dilation_rate``): the à trous rewrite of the PyTorch adapter.

A padding-free network (exported from PyTorch, or built from Keras layers with the same
weights) must give, at every possible output stride, cells equal to the original on their true
crops, a map of exactly ``geometry.cells`` at a larger non-square size, and a refusal naming
the possible strides otherwise; the three frameworks give the same stride-8 map; a padded
network with an average pool (``count_include_pad=False``) gives PyTorch's own à trous map.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from convolutionalize import NotConvolutionalizable, convolutionalize, geometry_of
from convolutionalize.frameworks.keras.model import predict_nchw
from convolutionalize.frameworks.onnx.model import Predictor

from conftest import rel

NATIVE = (44, 44)


class Plain(nn.Module):
    """No padding anywhere: stride 16 from a max pool, strided convs and an average pool."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.head = head
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(16, 12, 3, stride=2),
        )
        self.fc = nn.Linear(12 * 2 * 2 if head == "flatten" else 12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.fc(f.flatten(1) if self.head == "flatten" else f.mean((2, 3)))


class Padded(nn.Module):
    """Zero padding and an average pool that does not count it, after the strided layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), nn.Conv2d(16, 12, 3, padding=1),
        )
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).amax((2, 3)))


def export(model: nn.Module, path: Path, size: tuple[int, int] = NATIVE) -> onnx.ModelProto:
    torch.onnx.export(model, (torch.randn(1, 3, *size),), str(path), dynamo=False)
    return onnx.load(str(path))


def keras_plain(model: Plain) -> keras.Model:
    """The same network and weights in Keras (channels_last)."""
    layers = keras.layers
    x = inputs = keras.Input((*NATIVE, 3))
    x = layers.Conv2D(8, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = layers.AveragePooling2D(2)(x)
    x = layers.Conv2D(12, 3, strides=2)(x)
    x = layers.Flatten()(x) if model.head == "flatten" else layers.GlobalAveragePooling2D()(x)
    out = keras.Model(inputs, layers.Dense(5)(x))
    weights = []
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        weights += [conv.weight.detach().permute(2, 3, 1, 0).numpy(), conv.bias.detach().numpy()]
    fc = model.fc.weight.detach().numpy()
    if model.head == "flatten":  # torch flattens (C, H, W), channels_last Keras (H, W, C)
        fc = fc.reshape(5, 12, 2, 2).transpose(0, 2, 3, 1).reshape(5, -1)
    out.set_weights([*weights, fc.T, model.fc.bias.detach().numpy()])
    return out


@pytest.fixture(scope="module", params=["flatten", "gap"])
def torch_plain(request: pytest.FixtureRequest) -> Plain:
    torch.manual_seed(0)
    return Plain(request.param).eval()


@pytest.fixture(scope="module")
def plain(torch_plain: Plain, tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    return export(torch_plain, tmp_path_factory.mktemp("onnx") / "plain.onnx")


def run(model: object, x: np.ndarray) -> np.ndarray:
    """NCHW in, (N, classes, rows, cols) or (N, classes) out, for ONNX and Keras models."""
    if isinstance(model, onnx.ModelProto):
        return Predictor(model)(x)
    return predict_nchw(model, x)


STRIDES = [1, 2, 4, 8, 16]
LARGER = (NATIVE[0] + 2 * 16 + 5, NATIVE[1] + 3 * 16 + 3)


@pytest.mark.parametrize("framework", ["onnx", "keras"])
@pytest.mark.parametrize("stride", STRIDES)
def test_cells_equal_the_original_on_true_crops(torch_plain: Plain, plain: onnx.ModelProto,
                                                framework: str, stride: int) -> None:
    model = plain if framework == "onnx" else keras_plain(torch_plain)
    fcn = convolutionalize(model, output_stride=stride)
    if framework == "onnx":
        onnx.checker.check_model(fcn, full_check=True)
    geometry = geometry_of(fcn)
    assert geometry.stride == (stride, stride)
    assert geometry.window == NATIVE and geometry.crop_equivalent
    x = np.random.default_rng(1).standard_normal((1, 3, *LARGER)).astype(np.float32)
    scores = run(fcn, x)
    assert scores.shape[-2:] == geometry.cells(*LARGER)
    rows, cols = scores.shape[-2:]
    cells = {(i, j) for i in range(0, rows, max(rows // 4, 1)) for j in range(0, cols, max(cols // 4, 1))}
    cells |= {(rows - 1, cols - 1), (0, cols - 1), (rows - 1, 0)}
    for i, j in sorted(cells):
        x0, y0, x1, y1 = geometry.box(i, j)
        assert (y0, x0) == (i * stride, j * stride)
        expected = run(model, x[..., y0:y1, x0:x1]).reshape(-1)
        assert rel(scores[0, :, i, j], expected) < 1e-4, (i, j)


@pytest.mark.parametrize("framework", ["onnx", "keras"])
def test_impossible_output_stride_names_the_possible_ones(torch_plain: Plain, plain: onnx.ModelProto,
                                                          framework: str) -> None:
    model = plain if framework == "onnx" else keras_plain(torch_plain)
    with pytest.raises(NotConvolutionalizable, match=r"output_stride=3 .* allow 1, 2, 4, 8, 16"):
        convolutionalize(model, output_stride=3)


def test_network_stride_is_the_plain_conversion(plain: onnx.ModelProto) -> None:
    x = np.random.default_rng(2).standard_normal((1, 3, 77, 93)).astype(np.float32)
    same = Predictor(convolutionalize(plain, output_stride=16))(x)
    assert rel(same, Predictor(convolutionalize(plain))(x)) < 1e-6


@pytest.mark.parametrize("framework", ["onnx", "keras"])
def test_pool_none_at_a_denser_stride(torch_plain: Plain, plain: onnx.ModelProto, framework: str) -> None:
    model = plain if framework == "onnx" else keras_plain(torch_plain)
    if torch_plain.head == "flatten":
        pytest.skip("pool='none' is for global-pool heads")
    fcn = convolutionalize(model, pool="none", output_stride=2)
    size = (61, 70)
    x = np.random.default_rng(3).standard_normal((1, 3, *size)).astype(np.float32)
    assert run(fcn, x).shape[-2:] == geometry_of(fcn).cells(*size)


def test_the_three_frameworks_give_the_same_stride_8_map(torch_plain: Plain, plain: onnx.ModelProto) -> None:
    x = np.random.default_rng(5).standard_normal((1, 3, *LARGER)).astype(np.float32)
    with torch.no_grad():
        reference = convolutionalize(torch_plain, NATIVE, output_stride=8)(torch.from_numpy(x)).numpy()
    assert rel(run(convolutionalize(plain, output_stride=8), x), reference) < 1e-4
    assert rel(run(convolutionalize(keras_plain(torch_plain), output_stride=8), x), reference) < 1e-4


def test_onnx_equals_pytorch_at_output_stride_2_with_padding_and_an_exclusive_average(
        tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Padded().eval()
    graph = export(model, tmp_path / "padded.onnx", (32, 32))
    fcn = convolutionalize(graph, output_stride=2)
    ops = {n.op_type for n in fcn.graph.node}
    assert "AveragePool" not in ops and {"ConstantOfShape", "Div"} <= ops
    reference = convolutionalize(model, (32, 32), output_stride=2)
    for size in ((32, 32), (45, 58)):
        x = np.random.default_rng(4).standard_normal((1, 3, *size)).astype(np.float32)
        with torch.no_grad():
            expected = reference(torch.from_numpy(x)).numpy()
        assert rel(Predictor(fcn)(x), expected) < 1e-4


def test_keras_refuses_a_same_padded_strided_layer_it_would_unstride() -> None:
    x = inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(x)
    x = keras.layers.Conv2D(4, 3, strides=2)(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
    with pytest.raises(NotConvolutionalizable, match=r"output_stride=1: layer '.*' \(Conv2D\) has "
                                                     r"padding='same'.*possible output strides: 2, 4"):
        convolutionalize(model, output_stride=1)


def test_onnx_refuses_an_auto_pad_strided_node_it_would_unstride() -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal((4, 4, 3, 3))
    fc = rng.standard_normal((4, 3))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], strides=[2, 2],
                          auto_pad="SAME_UPPER"),
         helper.make_node("Conv", ["a", "w2"], ["b"], kernel_shape=[3, 3], strides=[2, 2]),
         helper.make_node("GlobalAveragePool", ["b"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("MatMul", ["f", "fc"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(v.astype(np.float32), n) for n, v in (("w1", w1), ("w2", w2), ("fc", fc))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert geometry_of(convolutionalize(model, output_stride=2)).stride == (2, 2)
    with pytest.raises(NotConvolutionalizable, match=r"output_stride=1: .*auto_pad=SAME_UPPER.*"
                                                     r"possible output strides: 2, 4"):
        convolutionalize(model, output_stride=1)


@pytest.mark.parametrize("framework", ["onnx", "keras"])
def test_dense_map_at_output_stride_4_tiled_equals_whole(torch_plain: Plain, plain: onnx.ModelProto,
                                                          framework: str) -> None:
    from convolutionalize import dense_map

    model = plain if framework == "onnx" else keras_plain(torch_plain)
    image = np.random.default_rng(6).standard_normal((3, 101, 123)).astype(np.float32)
    whole = dense_map(model, image, output_stride=4)
    tiled = dense_map(model, image, output_stride=4, tile=64)
    assert whole.shape == (5, *geometry_of(convolutionalize(model, output_stride=4)).cells(101, 123))
    assert rel(tiled, whole) < 1e-5


def test_keras_model_at_an_output_stride_saves_and_loads(torch_plain: Plain, tmp_path: Path) -> None:
    from convolutionalize.frameworks.keras.model import load_keras, save_keras

    fcn = convolutionalize(keras_plain(torch_plain), output_stride=2)
    loaded = load_keras(save_keras(fcn, tmp_path / "fcn.keras"))
    x = np.random.default_rng(7).standard_normal((1, 3, 63, 71)).astype(np.float32)
    assert geometry_of(loaded).stride == (2, 2)
    assert rel(predict_nchw(loaded, x), predict_nchw(fcn, x)) < 1e-6


@pytest.mark.parametrize("stride", [1, 2])
def test_padded_network_gives_the_pytorch_map_in_keras_and_onnx(stride: int, tmp_path: Path) -> None:
    from test_dense_frameworks import NATIVE as PADDED_NATIVE
    from test_dense_frameworks import Padded as DensePadded
    from test_dense_frameworks import keras_padded

    torch.manual_seed(0)
    model = DensePadded().eval()
    x = np.random.default_rng(8).standard_normal((1, 3, 37, 50)).astype(np.float32)
    with torch.no_grad():
        reference = convolutionalize(model, PADDED_NATIVE, output_stride=stride)(torch.from_numpy(x)).numpy()
    graph = export(model, tmp_path / "padded.onnx", PADDED_NATIVE)
    assert rel(run(convolutionalize(graph, output_stride=stride), x), reference) < 1e-4
    assert rel(run(convolutionalize(keras_padded(model), output_stride=stride), x), reference) < 1e-4


class WithPad(nn.Module):
    """An explicit Pad node (ONNX ``Pad`` with its pads as an input) after a strided layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 8, 3, stride=2)
        self.c, self.fc = nn.Conv2d(8, 8, 3), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(torch.relu(self.a(x)), (1, 2, 0, 1))
        return self.fc(self.c(torch.nn.functional.pad(self.b(x), (1, 1, 1, 1))).amax((2, 3)))


@pytest.mark.parametrize("stride", [1, 2])
def test_onnx_pad_nodes_are_scaled_as_in_pytorch(stride: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = WithPad().eval()
    graph = export(model, tmp_path / "pad.onnx", (32, 32))
    assert "Pad" in {n.op_type for n in graph.graph.node}
    x = np.random.default_rng(9).standard_normal((1, 3, 45, 58)).astype(np.float32)
    with torch.no_grad():
        reference = convolutionalize(model, (32, 32), output_stride=stride)(torch.from_numpy(x)).numpy()
    assert rel(run(convolutionalize(graph, output_stride=stride), x), reference) < 1e-4
