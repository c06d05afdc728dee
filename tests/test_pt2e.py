"""pt2e-quantized PyTorch graphs (torch.export -> torchao's prepare_pt2e -> calibrate -> convert_pt2e).

The head's ``dequantize(int8 W) -> linear`` becomes ``dequantize(int8 K) -> conv2d`` over the same
integers; activation quantize/dequantize pairs slide as they are. Such a graph computes in float
between its 8-bit roundings, so a conversion may round a value at a quantization boundary the other
way: the tests measure errors in steps of the output's scale (0 at the native size; at most one
step on true crops) and hold them to the one tolerance table (``selfcheck.TOLERANCES["pt2e"]``).

Random weights, seeded, calibrated on a few random batches; small inputs keep the file quick.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import fx, nn

pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e",
                           reason="pt2e quantization lives in torchao (the dev extra installs it)")
x86 = pytest.importorskip("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
xnnpack = pytest.importorskip("torchao.testing.pt2e._xnnpack_quantizer")

from convolutionalize import NotConvolutionalizable, convolutionalize, geometry_of  # noqa: E402
from convolutionalize.cli import main  # noqa: E402
from convolutionalize.export import save  # noqa: E402
from convolutionalize.models import load_model  # noqa: E402
from convolutionalize.selfcheck import tolerance  # noqa: E402

NATIVE = (14, 14)
DECOMPOSED = torch.ops.quantized_decomposed
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")


class ValidCNN(nn.Module):
    """Padding-free: conv -> relu -> conv/2 -> relu -> flatten -> fc -> relu -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3, stride=2)
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


QUANTIZERS: dict[str, Callable[[], object]] = {
    # X86 Inductor's default: uint8 activations, per-channel int8 weights, float output
    "x86": lambda: x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config()),
    # XNNPACK, symmetric: int8 activations and output, per-channel or per-tensor int8 weights
    "xnnpack": lambda: xnnpack.XNNPACKQuantizer().set_global(
        xnnpack.get_symmetric_quantization_config(is_per_channel=True)),
    "xnnpack-per-tensor": lambda: xnnpack.XNNPACKQuantizer().set_global(
        xnnpack.get_symmetric_quantization_config(is_per_channel=False)),
}


def quantized(model: nn.Module, size: tuple[int, int], quantizer: str = "xnnpack",
              batches: int = 4, **config: bool) -> fx.GraphModule:
    """``model`` quantized with pt2e: exported, prepared, calibrated on random batches, converted."""
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.export.export(model.eval(), (torch.randn(2, 3, *size, generator=gen),)).module()
        q = (QUANTIZERS[quantizer]() if not config else xnnpack.XNNPACKQuantizer().set_global(
            xnnpack.get_symmetric_quantization_config(**config)))
        prepared = pt2e.prepare_pt2e(graph, q)
        with torch.no_grad():
            for _ in range(batches):
                prepared(torch.randn(2, 3, *size, generator=gen))
        return pt2e.convert_pt2e(prepared)


@functools.cache  # quantizing takes seconds; the tests leave the model alone (one checks that)
def valid_cnn(quantizer: str = "xnnpack") -> fx.GraphModule:
    torch.manual_seed(0)
    return quantized(ValidCNN(), NATIVE, quantizer)


def output_scale(model: fx.GraphModule) -> float | None:
    """The scale of the last dequantize before the output (None: a float output)."""
    output = next(n for n in model.graph.nodes if n.op == "output")
    last = output.args[0][0]
    return float(last.args[1]) if last.target == DECOMPOSED.dequantize_per_tensor.default else None


def steps(actual: torch.Tensor, expected: torch.Tensor, scale: float) -> float:
    return float((actual.double() - expected.double()).abs().max() / scale)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def head_convolutions(fcn: nn.Module) -> list[fx.Node]:
    return [n for n in fcn.net.graph.nodes if n.target == torch.ops.aten.conv2d.default
            and n.args[1].target == DECOMPOSED.dequantize_per_channel.default
            and str(n.args[1].args[0].target).startswith("convolutionalize_")] + [
        n for n in fcn.net.graph.nodes if n.target == torch.ops.aten.conv2d.default
        and n.args[1].target == DECOMPOSED.dequantize_per_tensor.default
        and str(n.args[1].args[0].target).startswith("convolutionalize_")]


def assert_stays_quantized(fcn: nn.Module) -> None:
    """Every convolution's kernel is an int8 constant dequantized in the graph; no linear left,
    no float kernel."""
    nodes = list(fcn.net.graph.nodes)
    assert not any(n.target == torch.ops.aten.linear.default for n in nodes)
    for conv in (n for n in nodes if n.target == torch.ops.aten.conv2d.default):
        weight = conv.args[1]
        assert weight.op == "call_function" and weight.target.namespace == "quantized_decomposed"
        constant = weight.args[0]
        assert constant.op == "get_attr" and getattr(fcn.net, constant.target).dtype == torch.int8


@pytest.mark.parametrize("quantizer", list(QUANTIZERS))
def test_pt2e_valid_cnn_cells_equal_crops(quantizer: str) -> None:
    model = valid_cnn(quantizer)
    probe = torch.randn(2, 3, *NATIVE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(probe)

    fcn = convolutionalize(model, input_size=NATIVE)

    with torch.no_grad():
        assert torch.equal(model(probe), reference)  # the caller's graph is left alone
    assert_stays_quantized(fcn)
    fc1, fc2 = head_convolutions(fcn)
    assert getattr(fcn.net, fc1.args[1].args[0].target).shape == (32, 16, 5, 5)
    assert getattr(fcn.net, fc2.args[1].args[0].target).shape == (10, 32, 1, 1)
    original = {n.name: n for n in model.graph.nodes}["linear"].args[1]  # dequantize(int8 W)
    integers = getattr(model, original.args[0].target)
    assert torch.equal(getattr(fcn.net, fc1.args[1].args[0].target).flatten(1), integers)  # same ints
    assert fcn.geometry.crop_equivalent and fcn.geometry.stride == (2, 2)
    assert fcn.self_check.native_error is not None and fcn.self_check.native_error < 1e-6
    assert fcn.self_check.crop_error is not None and fcn.self_check.crop_error <= tolerance("pt2e")

    scale = output_scale(model)
    with torch.no_grad():
        native = fcn(probe)
    assert native.shape == (2, 10, 1, 1)
    assert relative(native.flatten(1), reference) < 1e-6  # measured: 0 (float output 3e-7)
    if scale is not None:
        assert steps(native.flatten(1), reference, scale) == 0

    size = (NATIVE[0] + 2 * 2, NATIVE[1] + 3 * 2)  # native + 2 strides down, 3 across
    image = 1.5 * torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = fcn(image)
        assert dense.shape[-2:] == fcn.geometry.cells(*size) == (3, 4)
        for i in range(3):
            for j in range(4):
                x0, y0, x1, y1 = fcn.geometry.box(i, j)
                crop = model(image[:, :, y0:y1, x0:x1])
                assert relative(dense[:, :, i, j], crop) <= tolerance("pt2e"), (i, j)
                if scale is not None:
                    assert steps(dense[:, :, i, j], crop, scale) <= 1.001, (i, j)


def test_a_misread_head_is_beyond_the_pt2e_tolerance() -> None:
    """The tolerance allows a step of rounding, not a wrong kernel: the same integers laid out
    in the wrong flatten order (HWC for CHW) are off by far more."""
    model = valid_cnn()
    fcn = convolutionalize(model, input_size=NATIVE)
    kernel = getattr(fcn.net, head_convolutions(fcn)[0].args[1].args[0].target)
    kernel.copy_(kernel.permute(0, 2, 3, 1).reshape(kernel.shape))
    probe = torch.randn(2, 3, *NATIVE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative(fcn(probe).flatten(1), model(probe)) > 10 * tolerance("pt2e")


@pytest.mark.parametrize("pool", ["none", "global"])
def test_pt2e_pool_modes(pool: str) -> None:
    model = valid_cnn()
    fcn = convolutionalize(model, input_size=NATIVE, pool=pool)
    assert_stays_quantized(fcn)
    probe = torch.randn(2, 3, *NATIVE, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out, reference = fcn(probe), model(probe)
        assert steps(out.reshape(reference.shape), reference, output_scale(model)) == 0
        bigger = fcn(torch.randn(1, 3, 18, 20))
    assert bigger.shape == ((1, 10, 3, 4) if pool == "none" else (1, 10))


def test_pt2e_dynamic_quantization_is_refused_by_name() -> None:
    """Dynamic quantization measures the activation's scale on each whole input
    (``choose_qparams``): a cell of a larger map would get the whole map's scale."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 12 * 12, 5))
    dynamic = quantized(model, NATIVE, is_per_channel=True, is_dynamic=True)
    with pytest.raises(NotConvolutionalizable, match=r"choose_qparams.*pt2e dynamic quantization"):
        convolutionalize(dynamic, input_size=NATIVE)


@pytest.mark.zoo
def test_pt2e_resnet18() -> None:
    """torchvision's ResNet-18 (random weights) quantized with XNNPACK's quantizer: equal at the
    native size, a map of the predicted size at a larger non-square size; the 1000-class head a
    1x1 convolution on int8 weights. (X86 Inductor's quantizer fails inside torchao on this
    graph: 'Input partition has more than one output node'.)"""
    size = (64, 64)
    torch.manual_seed(0)
    model = quantized(torchvision.models.resnet18(), size, batches=2)
    fcn = convolutionalize(model, input_size=size)
    assert_stays_quantized(fcn)
    assert fcn.geometry.stride == (32, 32) and fcn.self_check.native_error == 0.0
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert steps(fcn(x).flatten(1), model(x), output_scale(model)) == 0
        larger = (size[0] + 2 * 32, size[1] + 3 * 32)
        assert fcn(torch.randn(1, 3, *larger)).shape == (1, 1000, 3, 4)


@pytest.mark.parametrize("suffix", [".pt2", ".pt", ".onnx"])
def test_saved_pt2e_model_stays_quantized_and_carries_its_geometry(suffix: str, tmp_path: Path) -> None:
    model = valid_cnn()
    fcn = convolutionalize(model, input_size=NATIVE)
    path = save(fcn, tmp_path / f"out{suffix}")
    back = load_model(str(path), trust_pickle=True)
    assert geometry_of(back) == fcn.geometry
    image = torch.randn(1, 3, 18, 20, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = fcn(image)
    if suffix == ".onnx":
        graph = back.graph
        assert {"DequantizeLinear", "QuantizeLinear", "Conv"} <= {n.op_type for n in graph.node}
        assert not {"Gemm", "MatMul"} & {n.op_type for n in graph.node}
        return
    with torch.no_grad():
        got = back(image)
    assert relative(got, expected) <= tolerance("pt2e")
    assert_stays_quantized(back if suffix == ".pt" else fcn)


def test_cli_round_trip_of_a_pt2e_program(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A pt2e-quantized program saved with torch.export.save converts on the command line to
    .pt2, which inspect and predict read back without --input-size."""
    model = valid_cnn()
    program = torch.export.export(model, (torch.randn(2, 3, *NATIVE),))
    torch.export.save(program, str(tmp_path / "q.pt2"))
    size = ["--input-size", *map(str, NATIVE)]
    assert main(["convert", str(tmp_path / "q.pt2"), *size, "-o", str(tmp_path / "out.pt2")]) == 0
    assert main(["inspect", str(tmp_path / "out.pt2")]) == 0
    assert "stride: 2x2" in capsys.readouterr().out
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (18, 20, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    out = tmp_path / "map.npy"
    assert main(["predict", str(tmp_path / "out.pt2"), str(tmp_path / "image.png"), "-o", str(out),
                 "--no-progress"]) == 0
    assert np.load(out).shape == (10, 3, 4)
