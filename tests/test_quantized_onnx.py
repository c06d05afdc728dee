"""Quantized ONNX graphs as onnxruntime's quantize_static writes them. QDQ (its default): the
head's ``DequantizeLinear -> Gemm`` becomes ``DequantizeLinear -> Conv`` over the same integers,
QuantizeLinear/DequantizeLinear slide as they are. QOperator: ``QGemm``/``QLinearMatMul``
become ``QLinearConv`` over the same integers and scales, ``QLinearGlobalAveragePool`` a
stride-1 ``QLinearAveragePool``, ``QLinearAdd`` and friends stay; the converted graph computes
the same integers (bit-exact, measured). Either way the result stays quantized. Dynamic
quantization (a scale computed over the whole tensor) is refused naming why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from convolutionalize import NotConvolutionalizable, convolutionalize, geometry_of
from convolutionalize.api import conversion_info
from convolutionalize.cli import main

from _tiny import INPUT_SIZE, STRIDE, TinyNet

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnxruntime import quantization as q  # noqa: E402

LARGER = (INPUT_SIZE[0] + 3 * STRIDE[0], INPUT_SIZE[1] + 5 * STRIDE[1])  # 4x6 cells


class _Batches(q.CalibrationDataReader):
    def __init__(self, shape: tuple[int, ...] = (1, 1, *INPUT_SIZE), count: int = 8) -> None:
        rng = np.random.default_rng(0)
        self.batches = iter([{"image": rng.standard_normal(shape).astype(np.float32)}
                             for _ in range(count)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def _float_model(tmp_path: Path, net: torch.nn.Module | None = None,
                 shape: tuple[int, ...] = (1, 1, *INPUT_SIZE)) -> Path:
    torch.manual_seed(0)
    net = TinyNet() if net is None else net
    path = tmp_path / "float.onnx"
    torch.onnx.export(net.eval(), (torch.randn(*shape),), str(path), dynamo=False,
                      input_names=["image"], output_names=["scores"], opset_version=13,
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}})
    return path


def _run(model, image: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": image})[0]


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_qdq_graph_converts_and_stays_quantized(per_channel: bool, tmp_path: Path) -> None:
    quantized = tmp_path / "tiny_qdq.onnx"
    q.quantize_static(str(_float_model(tmp_path)), str(quantized), _Batches(),
                      quant_format=q.QuantFormat.QDQ, per_channel=per_channel)
    model = onnx.load(str(quantized))
    fcn = convolutionalize(model, INPUT_SIZE)
    onnx.checker.check_model(fcn, full_check=True)
    info = conversion_info(fcn)
    assert info.native_error is not None and info.native_error < 1e-4
    ops = [n.op_type for n in fcn.graph.node]
    assert "Gemm" not in ops and "MatMul" not in ops
    inits = {i.name: i for i in fcn.graph.initializer}
    for conv in (n for n in fcn.graph.node if n.op_type == "Conv"):  # every kernel dequantized from int8
        weight = next(n for n in fcn.graph.node if conv.input[1] in n.output)
        assert weight.op_type == "DequantizeLinear"
        assert inits[weight.input[0]].data_type == onnx.TensorProto.INT8
    image = np.random.default_rng(1).standard_normal((1, 1, *LARGER)).astype(np.float32)
    dense = _run(fcn, image)[0]
    (h, w), (sy, sx) = INPUT_SIZE, STRIDE
    crops = np.stack([np.stack([_run(model, np.ascontiguousarray(image[..., i * sy:i * sy + h,
                                                                       j * sx:j * sx + w]))[0]
                                for j in range(6)], -1) for i in range(4)], -2)
    assert dense.shape == crops.shape == (10, 4, 6)
    step = np.abs(np.diff(np.unique(crops))).min()  # the output's quantization step
    assert np.abs(dense - crops).max() <= step * 1.001  # within one quantization step of the output


def test_dynamic_quantization_is_refused_naming_why(tmp_path: Path) -> None:
    quantized = tmp_path / "tiny_dynamic.onnx"
    q.quantize_dynamic(str(_float_model(tmp_path)), str(quantized))
    with pytest.raises(NotConvolutionalizable, match="DynamicQuantizeLinear"):
        convolutionalize(onnx.load(str(quantized)), INPUT_SIZE)


# --------------------------------------------------------------------------- QOperator

RESNET_SIZE = (64, 64)
NOT_QUANTIZED = {"Gemm", "MatMul", "Conv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger"}
# head -> the activation in TinyNet's body and head, whether its Linears are MatMul + Add, and
# the QLinear op the activation becomes (a ReLU is folded into the requantization before it)
HEADS = {"qgemm": ("relu", False, None), "qlinearmatmul": ("relu", True, None),
         "qlinearleakyrelu": ("leakyrelu", False, "QLinearLeakyRelu"),
         "qlinearsigmoid": ("sigmoid", False, "QLinearSigmoid")}


def _tiny(activation: str) -> torch.nn.Module:
    """TinyNet with ``activation`` in its body and between its Linears: the quantizer folds a
    ReLU into the requantization before it; a LeakyReLU or Sigmoid stays a QLinear op."""
    torch.manual_seed(0)
    net = TinyNet()
    make = {"relu": torch.nn.ReLU, "leakyrelu": lambda: torch.nn.LeakyReLU(0.1),
            "sigmoid": torch.nn.Sigmoid}[activation]
    net.features[1], net.features[3], net.classifier[2] = make(), make(), make()
    return net


def _as_matmul(path: Path) -> Path:
    """The float graph with each ``Gemm(transB=1)`` written as ``MatMul + Add`` (as other
    exporters write a Linear), which quantize_static turns into QLinearMatMul + QLinearAdd."""
    model = onnx.load(str(path))
    weights = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Gemm":
            nodes.append(node)
            continue
        weight = weights.pop(node.input[1])
        model.graph.initializer.remove(weight)
        transposed = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight).T.copy(), weight.name)
        model.graph.initializer.append(transposed)
        product = f"{node.output[0]}_product"
        nodes += [onnx.helper.make_node("MatMul", node.input[:2], [product], name=f"{node.name}_matmul"),
                  onnx.helper.make_node("Add", [product, node.input[2]], node.output[:1],
                                        name=f"{node.name}_add")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(path))
    return path


def _qoperator(tmp_path: Path, float_path: Path, per_channel: bool,
               shape: tuple[int, ...] = (1, 1, *INPUT_SIZE),
               activations: q.QuantType = q.QuantType.QInt8) -> onnx.ModelProto:
    out = tmp_path / "qoperator.onnx"
    q.quantize_static(str(float_path), str(out), _Batches(shape, count=4),
                      quant_format=q.QuantFormat.QOperator, per_channel=per_channel,
                      activation_type=activations)
    return onnx.load(str(out))


def _quantized_convs(fcn) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Check that ``fcn`` stays quantized; each QLinearConv's int8 kernel and weight scale."""
    onnx.checker.check_model(fcn, full_check=True)
    assert not NOT_QUANTIZED & {n.op_type for n in fcn.graph.node}
    inits = {i.name: i for i in fcn.graph.initializer}
    convs = {}
    for conv in (n for n in fcn.graph.node if n.op_type == "QLinearConv"):
        assert inits[conv.input[3]].data_type == onnx.TensorProto.INT8
        convs[conv.name] = tuple(onnx.numpy_helper.to_array(inits[n]) for n in conv.input[3:5])
    return convs


def _true_crops(model, image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    (h, w), (sy, sx) = INPUT_SIZE, STRIDE
    return np.stack([np.stack([_run(model, np.ascontiguousarray(image[..., i * sy:i * sy + h,
                                                                    j * sx:j * sx + w]))[0]
                               for j in range(cols)], -1) for i in range(rows)], -2)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_qoperator_graph_converts_bit_exact_and_stays_quantized(head: str, per_channel: bool,
                                                                tmp_path: Path) -> None:
    activation, matmul, kept = HEADS[head]
    path = _float_model(tmp_path, _tiny(activation))
    model = _qoperator(tmp_path, _as_matmul(path) if matmul else path, per_channel)
    assert ("QLinearMatMul" if matmul else "QGemm") in {n.op_type for n in model.graph.node}
    fcn = convolutionalize(model, INPUT_SIZE)
    kernels = {tuple(k.shape): scale.size for k, scale in _quantized_convs(fcn).values()}
    # the Linears' int8 weights as 4x4 and 1x1 kernels, scales per output channel kept
    assert kernels[32, 8, 4, 4] == (32 if per_channel else 1)
    assert kernels[10, 32, 1, 1] == (10 if per_channel else 1)
    if kept is not None:
        assert sum(n.op_type == kept for n in fcn.graph.node) == 3  # twice in the body, once in the head
    assert geometry_of(fcn).crop_equivalent  # the QLinear body ops are read as local
    assert conversion_info(fcn).native_error == 0.0  # the same integers as the original
    image = np.random.default_rng(1).standard_normal((1, 1, *LARGER)).astype(np.float32)
    dense = _run(fcn, image)[0]
    assert dense.shape == (10, 4, 6)
    np.testing.assert_array_equal(dense, _true_crops(model, image, 4, 6))  # bit-exact


class _Reshaped(TinyNet):
    """TinyNet flattened by ``reshape(batch, -1)``: Shape -> Gather -> Concat -> Reshape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier[1:](x.reshape(x.shape[0], -1))


def test_qoperator_uint8_activations_through_a_computed_reshape(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _qoperator(tmp_path, _float_model(tmp_path, _Reshaped()), True,
                       activations=q.QuantType.QUInt8)
    assert "Reshape" in {n.op_type for n in model.graph.node}
    fcn = convolutionalize(model, INPUT_SIZE)
    assert len(_quantized_convs(fcn)) == 4
    assert conversion_info(fcn).native_error == 0.0
    image = np.random.default_rng(1).standard_normal((1, 1, *LARGER)).astype(np.float32)
    np.testing.assert_array_equal(_run(fcn, image)[0], _true_crops(model, image, 4, 6))


def _resnet18() -> torch.nn.Module:
    """torchvision's ResNet-18 with random weights and BatchNorm statistics as trained ones
    have them (torch's initial ones fold into all-zero biases, which the exporter shares
    through Identity nodes that quantize_static cannot read)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("pool", ["window", "none"])
def test_qoperator_resnet18_equals_the_original_and_maps_a_larger_image(pool: str,
                                                                        tmp_path: Path) -> None:
    shape = (1, 3, *RESNET_SIZE)
    model = _qoperator(tmp_path, _float_model(tmp_path, _resnet18(), shape), True, shape)
    assert {"QLinearGlobalAveragePool", "QLinearAdd", "QGemm"} <= {n.op_type for n in model.graph.node}
    fcn = convolutionalize(model, RESNET_SIZE, pool=pool)
    _quantized_convs(fcn)
    (window,) = [n for n in fcn.graph.node if n.op_type == "QLinearAveragePool"]
    kernel = onnx.helper.get_attribute_value(next(a for a in window.attribute if a.name == "kernel_shape"))
    assert list(kernel) == ([2, 2] if pool == "window" else [1, 1])  # the 2x2 feature map at 64x64
    rng = np.random.default_rng(1)
    if pool == "window":
        native = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(_run(fcn, native)[..., 0, 0], _run(model, native))
    larger = rng.standard_normal((1, 3, 96, 160)).astype(np.float32)
    cells = geometry_of(fcn).cells(96, 160)
    assert cells == ((2, 4) if pool == "window" else (3, 5))
    assert _run(fcn, larger).shape == (1, 10, *cells)


def test_qgemm_with_float_output_is_refused_naming_why(tmp_path: Path) -> None:
    model = _qoperator(tmp_path, _float_model(tmp_path), False)
    dequantize = model.graph.node[-1]
    qgemm = next(n for n in model.graph.node if dequantize.input[0] in n.output)
    assert (dequantize.op_type, qgemm.op_type) == ("DequantizeLinear", "QGemm")
    del qgemm.input[7:]  # no y_scale: the product comes out in float32
    qgemm.output[0] = dequantize.output[0]
    model.graph.node.remove(dequantize)
    with pytest.raises(NotConvolutionalizable, match=r"\(QGemm\) returns floats"):
        convolutionalize(model, INPUT_SIZE)


def test_cli_convert_keeps_a_qoperator_graph_quantized(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    source, out = tmp_path / "q.onnx", tmp_path / "out.onnx"
    onnx.save(_qoperator(tmp_path, _float_model(tmp_path), True), str(source))
    code = main(["convert", str(source), "-o", str(out), "--input-size", *map(str, INPUT_SIZE)])
    assert code == 0, capsys.readouterr().err
    fcn = onnx.load(str(out))
    assert len(_quantized_convs(fcn)) == 4
    assert conversion_info(fcn).native_error == 0.0
    assert geometry_of(fcn).stride == STRIDE
