"""The Caffe2-era ONNX model zoo, in small: AlexNet, VGG-19, ResNet-50, Inception v1 and v2,
ShuffleNet, ZFNet-512, SqueezeNet and DenseNet-121 rebuilt with onnx.helper in the zoo files'
forms (no downloads here): IR version 3, every initializer also listed among the graph
inputs, opset 9 (7 and 8 for the models the zoo also shipped there, BatchNormalization with
``spatial``), ``Sum`` for residual adds, ``LRN``, ``Dropout`` with its mask output, concat
blocks, a channel shuffle with constant shapes, ``Reshape`` to ``[1, -1]`` + ``Gemm`` heads,
``Softmax`` at the end, SqueezeNet's ``GlobalAveragePool -> Softmax`` on the 4-D map and
DenseNet's 1x1 ``Conv`` classifier, and weights made by constant subgraphs. Random weights,
fewer channels and blocks, smaller inputs; the same op patterns.

Each converts; the result passes the full checker, equals the original at the native size
(relative 1e-4, onnxruntime) and gives maps of the predicted size at larger non-square inputs.
The bodies pad, so the maps are "the classifier with context", not crop scores: every cell is
checked against the exact reference of :mod:`_reference` (the original graph cut where the head
starts, the body once over the image, the head on every window of the native feature size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from _onnx_graphs import Net, random_image, rel_error  # noqa: E402
from _reference import feature_size, onnx_feature, onnx_split, window_map  # noqa: E402
from convolutionalize import geometry_of  # noqa: E402
from convolutionalize.frameworks.onnx.model import (  # noqa: E402
    Predictor,
    convolutionalize_onnx,
    self_check_of,
)
from convolutionalize.selfcheck import CHECK_RTOL  # noqa: E402

CLASSES = 10


def lrn(n: Net, x: str) -> str:
    return n.op("LRN", [x], size=5, alpha=1e-4, beta=0.75, bias=1.0)


def relu_conv(n: Net, x: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0,
              group: int = 1) -> str:
    return n.op("Relu", [n.conv(x, cin, cout, k, stride, pad, group)])


def bn_relu_conv(n: Net, x: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0,
                 spatial: bool = False) -> str:
    """Conv + BatchNormalization + Relu (BN-Inception, ResNet); ``spatial=1`` written out at
    opsets 7-8 as the Caffe2 exporter did."""
    extra = {"spatial": 1} if spatial else {}
    return n.op("Relu", [n.bn(n.conv(x, cin, cout, k, stride, pad), cout, epsilon=1e-5, **extra)])


def maxpool(n: Net, x: str, k: int = 3, stride: int = 2, pads: tuple[int, ...] = (0, 0, 0, 0)) -> str:
    return n.op("MaxPool", [x], kernel_shape=[k, k], strides=[stride, stride], pads=list(pads))


def dropout(n: Net, x: str) -> str:
    """Dropout with its mask output (unused), as the zoo files have it."""
    return n.op("Dropout", [x], outputs=2, ratio=0.5)


def fc_head(n: Net, x: str, features: int, hidden: int, reshape: bool = True) -> str:
    """AlexNet / VGG / ZFNet: Reshape [1, -1] (or Flatten), then Gemm, Relu, Dropout twice
    and Gemm, Softmax."""
    x = n.op("Reshape", [x, n.ints([1, -1])]) if reshape else n.op("Flatten", [x])
    x = dropout(n, n.op("Relu", [n.gemm(x, features, hidden)]))
    x = dropout(n, n.op("Relu", [n.gemm(x, hidden, hidden)]))
    return n.op("Softmax", [n.gemm(x, hidden, CLASSES)])


def alexnet(n: Net) -> str:  # 99 -> 23 -> 11 -> 5 -> 2, stride 32
    x = maxpool(n, lrn(n, relu_conv(n, "image", 3, 8, 11, stride=4)))
    x = maxpool(n, lrn(n, relu_conv(n, x, 8, 16, 5, pad=2, group=2)))
    x = relu_conv(n, x, 16, 24, 3, pad=1)
    x = relu_conv(n, x, 24, 24, 3, pad=1, group=2)
    x = maxpool(n, relu_conv(n, x, 24, 16, 3, pad=1, group=2))
    return fc_head(n, x, 16 * 2 * 2, 32)


def zfnet512(n: Net) -> str:  # 115 -> 56 -> 28 -> 12 -> 6 -> 2, stride 32
    x = maxpool(n, lrn(n, relu_conv(n, "image", 3, 8, 7, stride=2, pad=1)), pads=(1, 1, 1, 1))
    x = maxpool(n, lrn(n, relu_conv(n, x, 8, 16, 5, stride=2)), pads=(1, 1, 1, 1))
    for cin, cout in ((16, 24), (24, 24), (24, 16)):
        x = relu_conv(n, x, cin, cout, 3, pad=1)
    return fc_head(n, maxpool(n, x), 16 * 2 * 2, 32)


def vgg19(n: Net) -> str:  # 64 -> 32 -> 16 -> 8 -> 4 -> 2, stride 32
    x, cin = "image", 3
    for convs, cout in ((2, 4), (2, 8), (4, 8), (4, 8), (4, 8)):
        for _ in range(convs):
            x, cin = relu_conv(n, x, cin, cout, 3, pad=1), cout
        x = maxpool(n, x, k=2)
    # the first Gemm's bias made by ConstantOfShape, its weight by Constant + Reshape
    features, hidden = 8 * 2 * 2, 32
    weight = n.rng.standard_normal(hidden * features).astype(np.float32) * features ** -0.5
    flat = n.op("Constant", [], value=helper.make_tensor("fc6_flat", TensorProto.FLOAT,
                                                           [hidden * features], weight))
    bias = n.op("ConstantOfShape", [n.ints([hidden])],
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.1]))
    x = n.op("Gemm", [n.op("Flatten", [x]), n.op("Reshape", [flat, n.ints([hidden, features])]), bias],
             transB=1)
    x = dropout(n, n.op("Relu", [dropout(n, n.op("Relu", [x]))]))
    x = dropout(n, n.op("Relu", [n.gemm(x, hidden, hidden)]))
    return n.op("Softmax", [n.gemm(x, hidden, CLASSES)])


def bottleneck(n: Net, x: str, cin: int, mid: int, cout: int, stride: int, spatial: bool) -> str:
    y = bn_relu_conv(n, x, cin, mid, 1, stride=stride, spatial=spatial)  # Caffe: stride on the 1x1
    y = bn_relu_conv(n, y, mid, mid, 3, pad=1, spatial=spatial)
    y = n.bn(n.conv(y, mid, cout, 1), cout, **({"spatial": 1} if spatial else {}))
    short = x if cin == cout and stride == 1 else n.bn(n.conv(x, cin, cout, 1, stride=stride), cout)
    return n.op("Relu", [n.op("Sum", [y, short])])


def resnet50(n: Net) -> str:  # 64 -> 32 -> 16 -> 16 -> 8 -> 4, stride 16
    spatial = n.opset < 9
    x = maxpool(n, bn_relu_conv(n, "image", 3, 8, 7, stride=2, pad=3, spatial=spatial),
                pads=(1, 1, 1, 1))
    x = bottleneck(n, x, 8, 4, 16, 1, spatial)
    x = bottleneck(n, x, 16, 8, 24, 2, spatial)
    x = bottleneck(n, x, 24, 8, 24, 1, spatial)
    x = bottleneck(n, x, 24, 8, 32, 2, spatial)
    x = n.op("AveragePool", [x], kernel_shape=[4, 4], strides=[1, 1])  # Caffe2's global pool
    # the reshape's shape from a Constant node, the Gemm's bias a float16 initializer Cast
    shape = n.op("Constant", [], value=helper.make_tensor("s", TensorProto.INT64, [2], [1, -1])) if (
        n.opset >= 9) else n.ints([1, -1])  # Constant-1 holds floats only
    bias = n.op("Cast", [n.w(array=(n.rng.standard_normal(CLASSES) * 0.1).astype(np.float16))],
                to=TensorProto.FLOAT)
    x = n.op("Gemm", [n.op("Reshape", [x, shape]), n.w(CLASSES, 32, scale=32 ** -0.5), bias],
             transB=1)
    return n.op("Softmax", [x])


def inception(n: Net, x: str, cin: int, c1: int, c3: int, c5: int, cp: int, bn: bool = False) -> str:
    """GoogLeNet's block: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max pool -> 1x1, concatenated."""
    unit = (lambda x, i, o, k, pad=0: bn_relu_conv(n, x, i, o, k, pad=pad)) if bn else (
        lambda x, i, o, k, pad=0: relu_conv(n, x, i, o, k, pad=pad))
    branches = [unit(x, cin, c1, 1),
                unit(unit(x, cin, c3, 1), c3, c3, 3, 1),
                unit(unit(x, cin, c5, 1), c5, c5, 5 if not bn else 3, 2 if not bn else 1),
                unit(maxpool(n, x, stride=1, pads=(1, 1, 1, 1)), cin, cp, 1)]
    return n.op("Concat", branches, axis=1)


def inception_v1(n: Net) -> str:  # 64 -> 32 -> 16 -> 8 -> 4, stride 16
    ceil = (0, 0, 1, 1)  # Caffe's ceil-mode pools, exported as asymmetric pads
    x = lrn(n, maxpool(n, relu_conv(n, "image", 3, 8, 7, stride=2, pad=3), pads=ceil))
    x = relu_conv(n, relu_conv(n, x, 8, 8, 1), 8, 16, 3, pad=1)
    x = maxpool(n, lrn(n, x), pads=ceil)
    x = inception(n, inception(n, x, 16, 4, 8, 2, 2), 16, 8, 8, 4, 4)  # -> 24 channels
    x = inception(n, maxpool(n, x, pads=ceil), 24, 8, 8, 4, 4)  # -> 24 channels
    x = dropout(n, n.op("AveragePool", [x], kernel_shape=[4, 4], strides=[1, 1]))
    # the Gemm weight a float16 initializer Cast to float, as converted fp16 files have it
    weight = n.op("Cast", [n.w(array=(n.rng.standard_normal((CLASSES, 24)) * 0.2).astype(np.float16))],
                  to=TensorProto.FLOAT)
    x = n.op("Gemm", [n.op("Reshape", [x, n.ints([1, -1])]), weight, n.w(CLASSES)], transB=1)
    return n.op("Softmax", [x])


def inception_v2(n: Net) -> str:  # 64 -> 32 -> 16 -> 8 -> 4, stride 16
    x = maxpool(n, bn_relu_conv(n, "image", 3, 8, 7, stride=2, pad=3, spatial=n.opset < 9),
                pads=(1, 1, 1, 1))
    x = bn_relu_conv(n, bn_relu_conv(n, x, 8, 8, 1), 8, 16, 3, pad=1)
    x = inception(n, maxpool(n, x, pads=(1, 1, 1, 1)), 16, 4, 8, 2, 2, bn=True)  # 16 channels
    reduced = [bn_relu_conv(n, bn_relu_conv(n, x, 16, 8, 1), 8, 8, 3, stride=2, pad=1),
               bn_relu_conv(n, bn_relu_conv(n, bn_relu_conv(n, x, 16, 4, 1), 4, 8, 3, pad=1),
                            8, 8, 3, stride=2, pad=1),
               maxpool(n, x, pads=(1, 1, 1, 1))]
    x = inception(n, n.op("Concat", reduced, axis=1), 32, 8, 8, 4, 4, bn=True)  # 24 channels
    x = n.op("AveragePool", [x], kernel_shape=[4, 4], strides=[1, 1])
    return n.op("Softmax", [n.gemm(n.op("Reshape", [x, n.ints([1, -1])]), 24, CLASSES)])


def shuffle(n: Net, x: str, c: int, groups: int, size: tuple[int, int]) -> str:
    """Caffe2's channel shuffle: constant shapes that spell out H and W."""
    x = n.op("Reshape", [x, n.ints([1, groups, c // groups, *size])])
    x = n.op("Transpose", [x], perm=[0, 2, 1, 3, 4])
    return n.op("Reshape", [x, n.ints([1, c, *size])])


def shuffle_unit(n: Net, x: str, cin: int, cout: int, stride: int, size: tuple[int, int]) -> str:
    mid, groups = 8, 2
    y = n.op("Relu", [n.bn(n.conv(x, cin, mid, 1, group=groups), mid)])
    y = shuffle(n, y, mid, groups, size)
    y = n.bn(n.conv(y, mid, mid, 3, stride=stride, pad=1, group=mid), mid)  # depthwise
    if stride == 1:
        y = n.bn(n.conv(y, mid, cout, 1, group=groups), cout)
        return n.op("Relu", [n.op("Sum", [x, y])])
    y = n.bn(n.conv(y, mid, cout - cin, 1, group=groups), cout - cin)
    short = n.op("AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    return n.op("Relu", [n.op("Concat", [short, y], axis=1)])


def shufflenet(n: Net) -> str:  # 64 -> 32 -> 16 -> 8 -> 4, stride 16
    h, w = (d.dim_value for d in n.input.type.tensor_type.shape.dim[2:])  # the shuffles spell them out
    x = maxpool(n, relu_conv(n, "image", 3, 8, 3, stride=2, pad=1), pads=(1, 1, 1, 1))
    x = shuffle_unit(n, x, 8, 16, 2, (h // 4, w // 4))
    x = shuffle_unit(n, x, 16, 16, 1, (h // 8, w // 8))
    x = shuffle_unit(n, x, 16, 24, 2, (h // 8, w // 8))
    x = n.op("AveragePool", [x], kernel_shape=[4, 4], strides=[1, 1])
    return n.op("Softmax", [n.gemm(n.op("Reshape", [x, n.ints([1, -1])]), 24, CLASSES)])


def fire(n: Net, x: str, cin: int, squeeze: int, expand: int) -> str:
    s = relu_conv(n, x, cin, squeeze, 1)
    return n.op("Concat", [relu_conv(n, s, squeeze, expand, 1),
                           relu_conv(n, s, squeeze, expand, 3, pad=1)], axis=1)


def squeezenet(n: Net) -> str:  # 63 -> 31 -> 15 -> 7, stride 8
    x = maxpool(n, relu_conv(n, "image", 3, 8, 3, stride=2))
    x = maxpool(n, fire(n, fire(n, x, 8, 4, 8), 16, 4, 8))
    x = dropout(n, fire(n, x, 16, 4, 8))
    x = relu_conv(n, x, 16, CLASSES, 1)
    return n.op("Softmax", [n.op("GlobalAveragePool", [x])])  # on the 4-D (1, C, 1, 1) map


def dense_block(n: Net, x: str, cin: int, layers: int, growth: int, spatial: bool) -> tuple[str, int]:
    extra = {"spatial": 1} if spatial else {}
    for _ in range(layers):
        y = n.op("Relu", [n.bn(x, cin, **extra)])
        y = n.op("Relu", [n.bn(n.conv(y, cin, 2 * growth, 1), 2 * growth, **extra)])
        x, cin = n.op("Concat", [x, n.conv(y, 2 * growth, growth, 3, pad=1)], axis=1), cin + growth
    return x, cin


def densenet121(n: Net) -> str:  # 64 -> 32 -> 16 -> 8, stride 8
    spatial = n.opset < 9
    x = maxpool(n, bn_relu_conv(n, "image", 3, 8, 7, stride=2, pad=3, spatial=spatial),
                pads=(1, 1, 1, 1))
    x, c = dense_block(n, x, 8, 2, 4, spatial)
    x = n.conv(n.op("Relu", [n.bn(x, c)]), c, 8, 1)  # transition
    x = n.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x, c = dense_block(n, x, 8, 2, 4, spatial)
    x = n.op("AveragePool", [n.op("Relu", [n.bn(x, c)])], kernel_shape=[8, 8], strides=[1, 1])
    return n.conv(x, c, CLASSES, 1)  # fc6: a 1x1 conv, the output stays (1, classes, 1, 1)


@dataclass(frozen=True)
class ZooModel:
    build: Callable[[Net], str]
    native: int
    stride: int
    opsets: tuple[int, ...] = (9,)


ZOO = {
    "alexnet": ZooModel(alexnet, 99, 32),
    "vgg19": ZooModel(vgg19, 64, 32),
    "resnet50": ZooModel(resnet50, 64, 16, (7, 8, 9)),
    "inception_v1": ZooModel(inception_v1, 64, 16, (8, 9)),
    "inception_v2": ZooModel(inception_v2, 64, 16, (7, 9)),
    "shufflenet": ZooModel(shufflenet, 64, 16),
    "zfnet512": ZooModel(zfnet512, 115, 32),
    "squeezenet": ZooModel(squeezenet, 63, 8, (7, 9)),
    "densenet121": ZooModel(densenet121, 64, 8, (7, 9)),
}
CASES = [(name, opset) for name, spec in ZOO.items() for opset in spec.opsets]


def build(name: str, opset: int, size: tuple[int, int] | None = None) -> onnx.ModelProto:
    """The zoo graph for its native input size (or ``size``: the same weights, and the same ops
    with ShuffleNet's constant shapes written for that size, as its zoo file would be)."""
    spec = ZOO[name]
    n = Net(opset, ir=3, dims=(1, 3, *(size or (spec.native, spec.native))))
    return n.model(spec.build(n))


def reference_map(name: str, opset: int, model: onnx.ModelProto, fcn: onnx.ModelProto,
                  image: np.ndarray) -> np.ndarray:
    """The exact reference (:mod:`_reference`): the original graph cut where the head starts,
    its body once over ``image``, its head on every window of the native feature size."""
    native = ZOO[name].native
    split = onnx_split(model, onnx_feature(fcn))
    window = feature_size(split[0], (native, native))
    if name == "shufflenet":  # its Reshapes fix the native size: the graph written for this one
        larger = build(name, opset, image.shape[-2:])
        floats = [(i.name, i.raw_data) for i in larger.graph.initializer if i.data_type == TensorProto.FLOAT]
        assert floats == [(i.name, i.raw_data) for i in model.graph.initializer
                          if i.data_type == TensorProto.FLOAT]
        split = onnx_split(larger, onnx_feature(fcn))
    return window_map(split, window, torch.from_numpy(image)).numpy()


@pytest.mark.parametrize(("name", "opset"), CASES, ids=[f"{n}-opset{o}" for n, o in CASES])
def test_caffe2_zoo_graph_converts(name: str, opset: int) -> None:
    spec = ZOO[name]
    model = build(name, opset)
    assert model.ir_version == 3
    assert {i.name for i in model.graph.initializer} <= {i.name for i in model.graph.input}
    fcn = convolutionalize_onnx(model, None, "window")
    onnx.checker.check_model(fcn, full_check=True)
    assert [i.name for i in fcn.graph.input] == ["image"]
    native = random_image((spec.native, spec.native), seed=5)
    expected, out = Predictor(model)(native), Predictor(fcn)(native)
    assert out.shape[-2:] == (1, 1) and rel_error(out.reshape(expected.shape), expected) < CHECK_RTOL
    geometry = geometry_of(fcn)
    assert geometry.stride == (spec.stride, spec.stride) and geometry.window == (spec.native,) * 2
    s = spec.stride
    for size, cells in (((spec.native + 2 * s, spec.native + 3 * s), (3, 4)),
                        ((spec.native + 3 * s, spec.native + s), (4, 2))):
        image = random_image(size)
        maps = Predictor(fcn)(image)
        assert maps.shape == (1, CLASSES, *cells) == (1, CLASSES, *geometry.cells(*size))
        assert rel_error(maps, reference_map(name, opset, model, fcn, image)) < CHECK_RTOL
    if name != "densenet121":  # every cell a softmax over the classes
        np.testing.assert_allclose(maps.sum(1), 1.0, rtol=1e-5)
    check = self_check_of(fcn)
    assert check is not None and check.cells == (3, 4) and check.native_error < CHECK_RTOL
    assert not geometry.crop_equivalent and check.crop_error is None  # the bodies pad
