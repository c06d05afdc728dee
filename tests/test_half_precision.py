"""Half precision converts, checked within a tolerance that fits it (selfcheck.TOLERANCES:
float16 1e-2, bfloat16 5e-2 relative), never refused for rounding: float16 and bfloat16
PyTorch modules, float16 ONNX graphs with float16 or float32 inputs and outputs (onnxconverter-
common's converter, as people make them). Cells of crop-equivalent models are compared with
the original on true crops at a larger non-square size."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from convolutionalize import convolutionalize
from convolutionalize.api import conversion_info
from convolutionalize.selfcheck import TOLERANCES

from _tiny import INPUT_SIZE, STRIDE, TinyNet

float16 = pytest.importorskip("onnxconverter_common.float16",
                              reason="onnxconverter-common is in the dev extra")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

LARGER = (INPUT_SIZE[0] + 3 * STRIDE[0], INPUT_SIZE[1] + 5 * STRIDE[1])  # 4x6 cells


def _rel(actual: np.ndarray, expected: np.ndarray) -> float:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(a - e).max() / np.abs(e).max())


def _crops(run, image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``run`` on each cell's 12x12 crop: (classes, rows, cols)."""
    (h, w), (sy, sx) = INPUT_SIZE, STRIDE
    return np.stack([np.stack([np.asarray(run(image[..., i * sy:i * sy + h, j * sx:j * sx + w]))
                               .reshape(-1) for j in range(cols)], -1) for i in range(rows)], -2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_module_cells_equal_crops(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = TinyNet().eval().to(dtype)
    fcn = convolutionalize(model, INPUT_SIZE)
    limit = TOLERANCES[str(dtype).removeprefix("torch.")]
    assert fcn.native_error is not None and fcn.native_error <= limit
    assert fcn.self_check.crop_error is not None and fcn.self_check.crop_error <= limit
    image = torch.randn(1, 1, *LARGER).to(dtype)
    with torch.no_grad():
        dense = fcn(image)[0].float().numpy()
        expected = _crops(lambda x: model(x).float().numpy(), image, 4, 6)
    assert dense.shape == expected.shape == (10, 4, 6)
    assert _rel(dense, expected) <= limit


@pytest.mark.parametrize("keep_io_types", [False, True], ids=["float16-io", "float32-io"])
def test_float16_onnx_cells_equal_crops(keep_io_types: bool) -> None:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(TinyNet().eval(), (torch.randn(1, 1, *INPUT_SIZE),), buffer, dynamo=False,
                      input_names=["image"], output_names=["scores"],
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}})
    half = float16.convert_float_to_float16(onnx.load_from_string(buffer.getvalue()),
                                            keep_io_types=keep_io_types)
    converted = convolutionalize(half, INPUT_SIZE)
    info = conversion_info(converted)
    assert info.native_error is not None and info.native_error <= TOLERANCES["float16"]
    assert "cells vs true crops" in info.self_check
    io_type = np.float32 if keep_io_types else np.float16
    original = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    dense_run = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).standard_normal((1, 1, *LARGER)).astype(io_type)
    dense = dense_run.run(None, {"image": image})[0][0]
    expected = _crops(lambda x: original.run(None, {"image": x})[0], image, 4, 6)
    assert dense.dtype == io_type and dense.shape == expected.shape == (10, 4, 6)
    assert _rel(dense, expected) <= TOLERANCES["float16"]
