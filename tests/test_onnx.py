"""The ONNX adapter: every head form on hand-built graphs, refusals, and the torchvision zoo.

Hand-built graphs have a padding-free body (13x13 -> 11x11 -> 5x5, 6 channels, stride 2), so
every cell of a converted map must equal the original graph run on that cell's 13x13 crop.
Tolerance: relative 1e-4 (``NATIVE_RTOL``): onnxruntime's Conv and Gemm sum in different orders.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from _reference import feature_size, onnx_feature, onnx_split, window_map  # noqa: E402
from convolutionalize import NotConvolutionalizable, convolutionalize, dense_map, geometry_of  # noqa: E402
from convolutionalize.frameworks.onnx.graph import attr_value  # noqa: E402
from convolutionalize.frameworks.onnx.model import (  # noqa: E402
    NATIVE_ERROR_KEY,
    PLAN_KEY,
    Predictor,
    convolutionalize_onnx,
    load_onnx,
    predict_nchw,
    save_onnx,
)

RTOL = 1e-4
NATIVE = (13, 13)
C, FH, FW = 6, 5, 5
CLASSES = 4
HIDDEN = 7


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-30))


# --------------------------------------------------------------------------- graph building


class Builder:
    """A padding-free conv body plus whatever head a test appends."""

    def __init__(self, opset: int = 18, nhwc_input: bool = False, seed: int = 0,
                 shuffle: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset, self.nodes, self.inits, self.count = opset, [], [], 0
        shape = [1, *NATIVE, 3] if nhwc_input else [1, 3, *NATIVE]
        self.input = helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)
        x = "image"
        if nhwc_input:
            x = self.op("Transpose", [x], perm=[0, 3, 1, 2])
        x = self.op("Conv", [x, self.w(4, 3, 3, 3), self.w(4)], kernel_shape=[3, 3])
        x = self.op("Relu", [x])
        x = self.op("Conv", [x, self.w(C, 4, 3, 3), self.w(C)], kernel_shape=[3, 3], strides=[2, 2])
        self.feature = self.op("Relu", [x])
        if shuffle:  # a channel shuffle with constant shapes, as exporters write it
            x = self.op("Reshape", [self.feature, self.ints([1, 2, C // 2, FH, FW])])
            x = self.op("Transpose", [x], perm=[0, 2, 1, 3, 4])
            x = self.op("Reshape", [x, self.ints([1, C, FH, FW])])
            self.feature = self.op("Relu", [x])

    def w(self, *shape: int, array: np.ndarray | None = None) -> str:
        name = f"w{len(self.inits)}"
        value = self.rng.standard_normal(shape).astype(np.float32) if array is None else array
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def ints(self, values: list[int]) -> str:
        return self.w(array=np.array(values, np.int64))

    def op(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"n{self.count}_{op_type}",
                                           **attrs))
        return out

    def model(self, output: str, shape: tuple[int, ...] = (1, CLASSES)) -> onnx.ModelProto:
        out = helper.make_tensor_value_info(output, TensorProto.FLOAT, list(shape))
        graph = helper.make_graph(self.nodes, "net", [self.input], [out], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 9
        onnx.checker.check_model(model, full_check=True)
        return model


def gap_gemm(b: Builder) -> str:
    x = b.op("Flatten", [b.op("GlobalAveragePool", [b.feature])])
    return b.op("Gemm", [x, b.w(CLASSES, C), b.w(CLASSES)], transB=1)


def gmp_gemm_alpha_beta(b: Builder) -> str:
    x = b.op("Flatten", [b.op("GlobalMaxPool", [b.feature])], axis=1)
    return b.op("Gemm", [x, b.w(C, CLASSES), b.w(1, CLASSES)], alpha=0.5, beta=2.0)


def reducemean_attr_axes(b: Builder) -> str:  # opset 17: axes is an attribute
    x = b.op("ReduceMean", [b.feature], axes=[2, 3], keepdims=0)
    return b.op("Gemm", [x, b.w(CLASSES, C), b.w(CLASSES)], transB=1)


def reducemean_input_axes_squeeze_matmul(b: Builder) -> str:  # opset 18: axes is an input
    x = b.op("ReduceMean", [b.feature, b.ints([-2, -1])], keepdims=1)
    x = b.op("Squeeze", [x, b.ints([2, 3])])
    return b.op("Add", [b.op("MatMul", [x, b.w(C, CLASSES)]), b.w(CLASSES)])


def averagepool_reshape(b: Builder) -> str:  # an exported AdaptiveAvgPool2d(1)
    x = b.op("AveragePool", [b.feature], kernel_shape=[FH, FW], strides=[FH, FW])
    x = b.op("Reshape", [x, b.ints([1, -1])])
    return b.op("Gemm", [x, b.w(CLASSES, C), b.w(CLASSES)], transB=1)


def flatten_mlp(b: Builder) -> str:
    x = b.op("Flatten", [b.feature])
    x = b.op("Relu", [b.op("Gemm", [x, b.w(HIDDEN, C * FH * FW), b.w(HIDDEN)], transB=1)])
    return b.op("Gemm", [x, b.w(CLASSES, HIDDEN), b.w(CLASSES)], transB=1)


def computed_reshape(b: Builder) -> str:  # x.view(x.size(0), -1), legacy exporter style
    batch = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [b.feature]), b.ints([0])],
                                    axis=0), b.ints([0])])
    batch = b.op("Reshape", [batch, b.ints([1])])
    shape = b.op("Concat", [batch, b.ints([-1])], axis=0)
    x = b.op("Reshape", [b.feature, shape])
    return b.op("Gemm", [x, b.w(CLASSES, C * FH * FW), b.w(CLASSES)], transB=1)


def bn_dropout_identity_softmax(b: Builder) -> str:
    x = b.op("Gemm", [b.op("Flatten", [b.feature]), b.w(HIDDEN, C * FH * FW)], transB=1)
    scale = b.w(array=b.rng.uniform(0.5, 2, HIDDEN).astype(np.float32))
    var = b.w(array=b.rng.uniform(0.5, 2, HIDDEN).astype(np.float32))
    x = b.op("BatchNormalization", [x, scale, b.w(HIDDEN), b.w(HIDDEN), var])
    x = b.op("Identity", [b.op("Dropout", [x])])
    x = b.op("Gemm", [b.op("HardSwish", [x]), b.w(CLASSES, HIDDEN), b.w(CLASSES)], transB=1)
    return b.op("Softmax", [x], axis=-1)


def layernorm_constant_operands(b: Builder) -> str:
    x = b.op("GlobalAveragePool", [b.feature])
    x = b.op("Gemm", [b.op("Flatten", [x]), b.w(HIDDEN, C), b.w(HIDDEN)], transB=1)
    x = b.op("LayerNormalization", [x, b.w(HIDDEN), b.w(HIDDEN)], axis=-1)
    x = b.op("Mul", [x, b.w(HIDDEN)])
    x = b.op("Add", [b.w(1, HIDDEN), b.op("Mul", [x, b.w(array=np.float32(0.5))])])
    return b.op("MatMul", [b.op("Gelu", [x]), b.w(HIDDEN, CLASSES)])


def convnext_pooled_layernorm(b: Builder) -> str:
    x = b.op("ReduceMean", [b.feature, b.ints([2, 3])], keepdims=1)
    x = b.op("Transpose", [x], perm=[0, 2, 3, 1])
    x = b.op("LayerNormalization", [x, b.w(C), b.w(C)], axis=-1)
    x = b.op("Flatten", [b.op("Transpose", [x], perm=[0, 3, 1, 2])])
    return b.op("Gemm", [x, b.w(CLASSES, C), b.w(CLASSES)], transB=1)


def tf2onnx_nhwc_flatten(b: Builder) -> str:
    x = b.op("Transpose", [b.feature], perm=[0, 2, 3, 1])
    x = b.op("Reshape", [x, b.ints([-1, C * FH * FW])])
    return b.op("Add", [b.op("MatMul", [x, b.w(C * FH * FW, CLASSES)]), b.w(CLASSES)])


def tf2onnx_nhwc_reducemean(b: Builder) -> str:
    x = b.op("Transpose", [b.feature], perm=[0, 2, 3, 1])
    x = b.op("ReduceMean", [x, b.ints([1, 2])], keepdims=0)
    return b.op("Add", [b.op("MatMul", [x, b.w(C, CLASSES)]), b.w(CLASSES)])


def tf2onnx_nhwc_reducemax_keepdims(b: Builder) -> str:
    x = b.op("Transpose", [b.feature], perm=[0, 2, 3, 1])
    x = b.op("ReduceMax", [x, b.ints([1, 2])], keepdims=1)
    x = b.op("Relu", [b.op("MatMul", [x, b.w(C, HIDDEN)])])  # per location on (N, 1, 1, C)
    x = b.op("Reshape", [x, b.ints([-1, HIDDEN])])
    return b.op("Gemm", [x, b.w(CLASSES, HIDDEN), b.w(CLASSES)], transB=1)


def decomposed_hardswish_and_swish(b: Builder) -> str:  # opset <= 13 exports: x * HardSigmoid(x)
    x = b.op("GlobalAveragePool", [b.feature])
    x = b.op("Mul", [b.op("Sigmoid", [x]), x])  # a swish on the pooled map
    x = b.op("Gemm", [b.op("Flatten", [x]), b.w(HIDDEN, C), b.w(HIDDEN)], transB=1)
    x = b.op("Mul", [x, b.op("HardSigmoid", [x], alpha=1 / 6, beta=0.5)])
    return b.op("Gemm", [x, b.w(CLASSES, HIDDEN), b.w(CLASSES)], transB=1)


HEADS: dict[str, Callable[[Builder], str]] = {
    "gap_gemm": gap_gemm,
    "gmp_gemm_alpha_beta": gmp_gemm_alpha_beta,
    "reducemean_attr_axes": reducemean_attr_axes,
    "reducemean_input_axes_squeeze_matmul": reducemean_input_axes_squeeze_matmul,
    "averagepool_reshape": averagepool_reshape,
    "flatten_mlp": flatten_mlp,
    "computed_reshape": computed_reshape,
    "bn_dropout_identity_softmax": bn_dropout_identity_softmax,
    "layernorm_constant_operands": layernorm_constant_operands,
    "convnext_pooled_layernorm": convnext_pooled_layernorm,
    "tf2onnx_nhwc_flatten": tf2onnx_nhwc_flatten,
    "tf2onnx_nhwc_reducemean": tf2onnx_nhwc_reducemean,
    "tf2onnx_nhwc_reducemax_keepdims": tf2onnx_nhwc_reducemax_keepdims,
    "decomposed_hardswish_and_swish": decomposed_hardswish_and_swish,
}
OPSET = {"reducemean_attr_axes": 17, "layernorm_constant_operands": 20}
GLOBAL_HEADS = {"gap_gemm", "gmp_gemm_alpha_beta", "reducemean_attr_axes",
                "reducemean_input_axes_squeeze_matmul", "averagepool_reshape",
                "layernorm_constant_operands", "convnext_pooled_layernorm",
                "tf2onnx_nhwc_reducemean", "tf2onnx_nhwc_reducemax_keepdims",
                "decomposed_hardswish_and_swish"}


def build(head: str, nhwc_input: bool = False) -> onnx.ModelProto:
    b = Builder(OPSET.get(head, 18), nhwc_input)
    return b.model(HEADS[head](b))


def crop_logits(model: onnx.ModelProto, x: np.ndarray, geometry, rows: int, cols: int) -> np.ndarray:
    """The original graph on each cell's window: (1, classes, rows, cols)."""
    predict = Predictor(model)
    crops = [[predict(x[:, :, y0:y1, x0:x1])[0]
              for x0, y0, x1, y1 in (geometry.box(i, j) for j in range(cols))]
             for i in range(rows)]
    return np.array(crops).transpose(2, 0, 1)[None]


def random_image(size: tuple[int, int], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, *size)).astype(np.float32)


# --------------------------------------------------------------------------- head forms


@pytest.mark.parametrize("head", list(HEADS))
def test_head_form_converts_exactly(head: str) -> None:
    model = build(head)
    fcn = convolutionalize_onnx(model, None, "window")
    onnx.checker.check_model(fcn, full_check=True)
    x = random_image((17, 19))  # two and three strides larger
    out = predict_nchw(fcn, x)
    geometry = geometry_of(fcn)
    assert out.shape == (1, CLASSES, 3, 4) and geometry.cells(17, 19) == (3, 4)
    assert geometry.window == NATIVE and geometry.stride == (2, 2) and geometry.crop_equivalent
    assert rel_error(out, crop_logits(model, x, geometry, 3, 4)) < RTOL
    # structural: no Gemm/MatMul/Flatten reads a vector any more; H and W are symbolic
    ops = {n.op_type for n in fcn.graph.node}
    assert not ops & {"Gemm", "Flatten", "Squeeze", "Reshape", "Shape"}, ops
    dims = fcn.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["height", "width"]
    assert float(dict((p.key, p.value) for p in fcn.metadata_props)[NATIVE_ERROR_KEY]) < RTOL


def test_nhwc_input_graph_converts() -> None:
    model = build("tf2onnx_nhwc_flatten", nhwc_input=True)
    fcn = convolutionalize_onnx(model, None, "window")
    x = random_image((15, 17))
    expected = crop_logits(model, x, geometry_of(fcn), 2, 3)
    assert rel_error(predict_nchw(fcn, x), expected) < RTOL
    assert [d.dim_param for d in fcn.graph.input[0].type.tensor_type.shape.dim[1:3]] == [
        "height", "width"]


@pytest.mark.parametrize("head", sorted(GLOBAL_HEADS - {"layernorm_constant_operands",
                                                         "convnext_pooled_layernorm",
                                                         "tf2onnx_nhwc_reducemax_keepdims",
                                                         "decomposed_hardswish_and_swish"}))
def test_pool_none_mean_is_the_logits(head: str) -> None:
    model = build(head)
    fcn = convolutionalize_onnx(model, None, "none")
    x = random_image(NATIVE)
    out = predict_nchw(fcn, x)
    assert out.shape == (1, CLASSES, FH, FW)
    if head != "gmp_gemm_alpha_beta":  # a max pool does not commute with the mean
        assert rel_error(out.mean((2, 3)), predict_nchw(model, x)) < RTOL


@pytest.mark.parametrize("head", ["gap_gemm", "flatten_mlp"])
def test_pool_global_gives_one_prediction(head: str) -> None:
    model = build(head)
    fcn = convolutionalize_onnx(model, None, "global")
    window = convolutionalize_onnx(model, None, "window")
    x = random_image((21, 17))
    out = predict_nchw(fcn, x)
    assert out.shape == (1, CLASSES)
    if head == "flatten_mlp":  # the mean of the window map
        assert rel_error(out, predict_nchw(window, x).mean((2, 3))) < RTOL
    assert geometry_of(fcn).pool == "global"


def test_batch_and_body_reshapes_become_dynamic() -> None:
    b = Builder(shuffle=True)
    model = b.model(gap_gemm(b))
    fcn = convolutionalize_onnx(model, None, "window")
    reshapes = [n for n in fcn.graph.node if n.op_type == "Reshape"]
    assert len(reshapes) == 2 and not {n.input[1] for n in reshapes} & {i.name for i in fcn.graph.initializer}
    assert fcn.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = np.concatenate([random_image((17, 15), seed) for seed in (1, 2)])
    out = predict_nchw(fcn, x)
    assert out.shape == (2, CLASSES, 3, 2)
    expected = np.concatenate([crop_logits(model, x[i:i + 1], geometry_of(fcn), 3, 2) for i in (0, 1)])
    assert rel_error(out, expected) < RTOL


def test_geometry_from_pads_ceil_mode_and_same_padding() -> None:
    b = Builder()
    b.nodes.clear()
    b.input = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 12, 12])
    x = b.op("Conv", ["image", b.w(4, 3, 3, 3)], kernel_shape=[3, 3], pads=[1, 1, 1, 1])  # 12
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)  # 6, not 5
    x = b.op("Conv", [x, b.w(C, 4, 3, 3)], auto_pad="SAME_UPPER", strides=[2, 2])  # 3
    x = b.op("Flatten", [x])
    model = b.model(b.op("Gemm", [x, b.w(CLASSES, C * 9)], transB=1))
    geometry = geometry_of(convolutionalize_onnx(model, None, "window"))
    # spans: conv [-1, 1] jump 1; pool [-1, 3] jump 2; SAME conv (pad 0 before) [-1, 7] jump 4
    assert geometry.stride == (4, 4) and geometry.window == (12, 12)
    assert geometry.receptive_field == (9 + 2 * 4, 9 + 2 * 4)
    assert not geometry.crop_equivalent
    padded = next(n for n in geometry.notes if n.startswith("padding in"))
    assert all(f"n{i}_" in padded for i in (5, 6, 7))  # pads, ceil_mode, SAME (after the body)


def test_global_context_is_noted() -> None:
    b = Builder()
    gate = b.op("Sigmoid", [b.op("GlobalAveragePool", [b.feature])])  # squeeze-excitation
    b.feature = b.op("Mul", [b.feature, gate])
    geometry = geometry_of(convolutionalize_onnx(b.model(gap_gemm(b)), None, "window"))
    assert geometry.receptive_field is None and not geometry.crop_equivalent
    assert any(n.startswith("global context") for n in geometry.notes)


def test_bad_options_are_value_errors() -> None:
    with pytest.raises(ValueError, match="differs from the ONNX input's static 13x13"):
        convolutionalize_onnx(build("gap_gemm"), (15, 15), "window")
    with pytest.raises(ValueError, match="pool must be one of"):
        convolutionalize_onnx(build("gap_gemm"), None, "sliding")  # type: ignore[arg-type]


def test_plan_and_geometry_are_stored() -> None:
    fcn = convolutionalize(build("flatten_mlp"))
    props = {p.key: p.value for p in fcn.metadata_props}
    assert "flatten 6x5x5 (CHW)" in props[PLAN_KEY] and "kernel 5x5" in props[PLAN_KEY]
    assert geometry_of(fcn).receptive_field == NATIVE


def test_tf2onnx_plan_names_hwc_layout() -> None:
    fcn = convolutionalize_onnx(build("tf2onnx_nhwc_flatten"), None, "window")
    assert "(HWC)" in {p.key: p.value for p in fcn.metadata_props}[PLAN_KEY]


def test_input_proto_is_not_mutated() -> None:
    model = build("computed_reshape")
    before = model.SerializeToString()
    convolutionalize_onnx(model, None, "window")
    assert model.SerializeToString() == before


def test_dynamic_input_needs_input_size() -> None:
    model = build("gap_gemm")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    with pytest.raises(ValueError, match="input_size is required"):
        convolutionalize_onnx(model, None, "window")
    fcn = convolutionalize_onnx(model, (13, 13), "window")
    assert geometry_of(fcn).input_size == NATIVE


# --------------------------------------------------------------------------- refusals and files


def test_no_classifier_head_is_refused() -> None:
    b = Builder()
    with pytest.raises(NotConvolutionalizable, match="no classifier head"):
        convolutionalize_onnx(b.model(b.feature, (1, C, FH, FW)), None, "window")


def test_op_on_flattened_map_is_refused_by_name() -> None:
    b = Builder()
    x = b.op("Softmax", [b.op("Flatten", [b.feature])], axis=1)
    out = b.op("Gemm", [x, b.w(CLASSES, C * FH * FW)], transB=1)
    with pytest.raises(NotConvolutionalizable, match=r"n\d+_Softmax.*flattened map"):
        convolutionalize_onnx(b.model(out), None, "window")


def test_weight_that_is_not_an_initializer_is_refused() -> None:
    b = Builder()
    x = b.op("Flatten", [b.op("GlobalAveragePool", [b.feature])])
    weight = b.op("RandomNormal", [], shape=[CLASSES, C])
    out = b.op("Gemm", [x, weight], transB=1)
    with pytest.raises(NotConvolutionalizable, match=r"n\d+_Gemm.*not an initializer"):
        convolutionalize_onnx(b.model(out), None, "window")


def test_shared_head_tensor_is_refused_by_name() -> None:
    b = Builder()
    x = b.op("Flatten", [b.op("GlobalAveragePool", [b.feature])])
    hidden = b.op("Relu", [b.op("Gemm", [x, b.w(HIDDEN, C)], transB=1)])
    out = b.op("Add", [b.op("Gemm", [hidden, b.w(CLASSES, HIDDEN)], transB=1),
                       b.op("Gemm", [hidden, b.w(CLASSES, HIDDEN)], transB=1)])
    with pytest.raises(NotConvolutionalizable, match=r"n\d+_Add"):
        convolutionalize_onnx(b.model(out), None, "window")


def test_not_onnx_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_text("this is not an ONNX model\n")
    with pytest.raises(ValueError, match=r"model\.onnx"):
        load_onnx(path)
    with pytest.raises(ValueError, match=r"model\.onnx"):
        convolutionalize(path)


def test_truncated_file(tmp_path: Path) -> None:
    data = build("gap_gemm").SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"cut\.onnx"):
        load_onnx(path)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    fcn = convolutionalize_onnx(build("flatten_mlp"), None, "window")
    path = save_onnx(fcn, tmp_path / "fcn.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["fcn.onnx"]
    assert geometry_of(load_onnx(path)) == geometry_of(fcn)


def test_path_is_converted(tmp_path: Path) -> None:
    path = save_onnx(build("gap_gemm"), tmp_path / "original.onnx")
    fcn = convolutionalize(path, pool="window")
    assert isinstance(fcn, onnx.ModelProto) and geometry_of(fcn).stride == (2, 2)


# --------------------------------------------------------------------------- both routes agree


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pytorch_route_and_onnx_route_give_the_same_map(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    from convolutionalize.export import save

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 5 * 5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    save(convolutionalize(net, NATIVE), tmp_path / "torch_route.onnx")
    legacy = tmp_path / "original.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(net, (torch.randn(1, 3, *NATIVE),), str(legacy), dynamo=False)
    onnx_route = convolutionalize(legacy)
    x = random_image((19, 21))
    expected = predict_nchw(load_onnx(tmp_path / "torch_route.onnx"), x)
    assert expected.shape == (1, 3, 4, 5)
    assert rel_error(predict_nchw(onnx_route, x), expected) < RTOL


# --------------------------------------------------------------------------- torchvision zoo

ZOO = ["resnet18", "vgg11", "alexnet", "mobilenet_v3_small", "densenet121", "efficientnet_b0",
       "squeezenet1_1", "regnet_y_400mf", "shufflenet_v2_x0_5", "convnext_tiny"]


@pytest.mark.zoo
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", ZOO)
def test_torchvision_zoo(name: str, exporter: str, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None).eval()
    if name.startswith("shufflenet"):  # its initial weights leave cells 5e-5 apart: He init
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path / f"{name}.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(net, (torch.randn(1, 3, 224, 224),), str(path),
                          dynamo=exporter == "dynamo", external_data=False)
    fcn = convolutionalize(path)
    onnx.checker.check_model(fcn, full_check=True)
    x = random_image((224, 224))
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    assert rel_error(predict_nchw(fcn, x)[:, :, 0, 0], logits) < RTOL
    big = random_image((320, 416))
    torch_fcn = convolutionalize(net, (224, 224))
    with torch.no_grad():
        expected = torch_fcn(torch.from_numpy(big)).numpy()
    ours = geometry_of(fcn)
    for key in ("window", "stride", "offset", "receptive_field", "crop_equivalent", "feature_size"):
        assert getattr(ours, key) == getattr(torch_fcn.geometry, key), key
    out = predict_nchw(fcn, big)
    # squeezenet's ceil_mode pools give a 20x26 feature map at 320x416 (stride 16)
    assert out.shape == expected.shape == ((1, 1000, 7, 13) if name.startswith("squeeze")
                                           else (1, 1000, 4, 7))
    assert rel_error(out, expected) < RTOL
    # the exact reference: the original graph cut where the head starts (onnxruntime)
    split = onnx_split(onnx.load(path), onnx_feature(fcn))
    window = feature_size(split[0], (224, 224))
    if name.startswith("shufflenet"):  # the shuffles' Reshape constants spell out 224's sizes:
        path = tmp_path / "larger.onnx"  # the same network exported for the larger size
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(net, (torch.from_numpy(big),), str(path), dynamo=exporter == "dynamo",
                              external_data=False)
        split = onnx_split(onnx.load(path), onnx_feature(fcn))
    reference = window_map(split, window, torch.from_numpy(big)).numpy()
    # ceil_mode pools leave squeezenet a last feature window that reaches past the image
    assert rel_error(out, reference[..., :out.shape[-2], :out.shape[-1]]) < RTOL


@pytest.mark.zoo
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_opset_13_export_of_hardswish_head(tmp_path: Path) -> None:
    """Below opset 14 the exporter writes the classifier's Hardswish as x * HardSigmoid(x)."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(weights=None).eval()
    path = tmp_path / "mobilenet_v3_small.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(net, (torch.randn(1, 3, 224, 224),), str(path), opset_version=13, dynamo=False)
    exported = onnx.load(path)
    assert {"HardSigmoid", "Mul"} <= {n.op_type for n in exported.graph.node}
    assert "HardSwish" not in {n.op_type for n in exported.graph.node}
    fcn = convolutionalize(exported)
    big = random_image((320, 416))
    with torch.no_grad():
        expected = convolutionalize(net, (224, 224))(torch.from_numpy(big)).numpy()
    out = predict_nchw(fcn, big)
    assert out.shape == expected.shape == (1, 1000, 4, 7)
    assert rel_error(out, expected) < RTOL


def test_strided_same_padding_keeps_the_cells_in_place_at_any_size() -> None:
    """auto_pad="SAME_*" pads by how the input's size falls on the stride; fixed at its native
    pads, one more row at the bottom moves no cell and tiles equal the whole image."""
    b = Builder()
    b.nodes.clear()
    b.input = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])
    x = b.op("Conv", ["image", b.w(4, 3, 3, 3)], auto_pad="SAME_UPPER", strides=[2, 2])  # 16
    x = b.op("MaxPool", [b.op("Relu", [x])], kernel_shape=[3, 3], auto_pad="SAME_LOWER",
             strides=[2, 2])  # 8
    x = b.op("Conv", [x, b.w(C, 4, 3, 3)], auto_pad="SAME_UPPER", strides=[2, 2])  # 4
    model = b.model(b.op("Gemm", [b.op("Flatten", [x]), b.w(CLASSES, C * 16)], transB=1))
    fcn = convolutionalize_onnx(model, None, "window")
    assert not [n for n in fcn.graph.node if str(attr_value(n, "auto_pad", "NOTSET")).startswith("SAME")]
    image = random_image((32 + 8 * 6 + 1, 32 + 8 * 5 + 3))
    odd, even = predict_nchw(fcn, image), predict_nchw(fcn, image[:, :, :-1])
    assert odd.shape[-2:] == geometry_of(fcn).cells(*image.shape[-2:]) == (7, 6)
    assert rel_error(odd[..., :6, :], even[..., :6, :]) < 1e-6  # every cell moved before
    array = np.ascontiguousarray((image[0].transpose(1, 2, 0) * 40 + 128).clip(0, 255).astype(np.uint8))
    whole, tiled = dense_map(fcn, array), dense_map(fcn, array, tile=48)
    assert rel_error(tiled, whole) < 1e-5
