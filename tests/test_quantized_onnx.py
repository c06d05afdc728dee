"""Quantized ONNX graphs as onnxruntime's quantize_static writes them (QDQ, its default): the
head's ``DequantizeLinear -> Gemm`` becomes ``DequantizeLinear -> Conv`` over the same integers,
QuantizeLinear/DequantizeLinear slide as they are; the result stays quantized. Dynamic
quantization (a scale computed over the whole tensor) is refused naming why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from convolutionalize import NotConvolutionalizable, convolutionalize
from convolutionalize.api import conversion_info

from _tiny import INPUT_SIZE, STRIDE, TinyNet

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnxruntime import quantization as q  # noqa: E402

LARGER = (INPUT_SIZE[0] + 3 * STRIDE[0], INPUT_SIZE[1] + 5 * STRIDE[1])  # 4x6 cells


class _Batches(q.CalibrationDataReader):
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.batches = iter([{"image": rng.standard_normal((1, 1, *INPUT_SIZE)).astype(np.float32)}
                             for _ in range(8)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def _float_model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(TinyNet().eval(), (torch.randn(1, 1, *INPUT_SIZE),), str(path), dynamo=False,
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


def test_qoperator_graphs_are_refused_naming_the_op(tmp_path: Path) -> None:
    quantized = tmp_path / "tiny_qop.onnx"
    q.quantize_static(str(_float_model(tmp_path)), str(quantized), _Batches(),
                      quant_format=q.QuantFormat.QOperator)
    with pytest.raises(NotConvolutionalizable, match=r"\(QGemm\) is a quantized operator of .*QOperator"):
        convolutionalize(onnx.load(str(quantized)), INPUT_SIZE)
