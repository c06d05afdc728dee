"""Eager-mode quantized PyTorch classifiers (torch.ao.quantization prepare -> calibrate -> convert).

A statically quantized Linear head becomes a quantized convolution holding the same int8
weights (per-tensor or per-channel), the same bias and output scale; quantized convolutions,
Quantize/DeQuantize and QFunctional's add/add_relu/cat are read as what they are. Quantized
arithmetic is integer arithmetic: the converted model gives the same integers as the original,
so the stated tolerance (``selfcheck.TOLERANCES["quantized"]``) is exactness, and the tests
measure errors in steps of the output's scale (0 everywhere, on every engine tried).

Random weights, seeded, calibrated on a few random batches; small inputs keep the file quick.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.ao.quantization as tq
import torchvision
from torch import nn

from convolutionalize import NotConvolutionalizable, convolutionalize, geometry_of
from convolutionalize.cli import main
from convolutionalize.export import save
from convolutionalize.frameworks.torch.model import analyse
from convolutionalize.models import load_model
from convolutionalize.selfcheck import tolerance

NATIVE = (14, 14)


@pytest.fixture(autouse=True)
def x86_engine() -> Iterator[None]:
    """The x86 engine (the default on x86 CPUs), restored afterwards; torch's deprecation
    warnings about eager-mode quantization are not this library's."""
    saved = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.backends.quantized.engine = saved


class ValidBody(nn.Module):
    """Padding-free: QuantStub -> conv -> relu -> conv/2 -> relu (16 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1, self.relu1 = nn.Conv2d(3, 8, 3), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 16, 3, stride=2), nn.ReLU()
        self.dequant = tq.DeQuantStub()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.relu1(self.conv1(self.quant(x)))))

    def fuse(self) -> None:
        tq.fuse_modules(self, [["conv1", "relu1"], ["conv2", "relu2"]], inplace=True)


class ValidCNN(ValidBody):
    """The padding-free body -> flatten -> fc -> relu -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1, self.relu3 = nn.Linear(16 * 5 * 5, 32), nn.ReLU()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc2(self.relu3(self.fc1(self.flatten(self.features(x))))))

    def fuse(self) -> None:
        super().fuse()
        tq.fuse_modules(self, [["fc1", "relu3"]], inplace=True)


class ValidGapCNN(ValidBody):
    """The padding-free body with a global average pool head: the pool becomes a quantized
    window pool."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(torch.flatten(self.pool(self.features(x)), 1)))


QCONFIGS = {"per-channel": lambda: tq.get_default_qconfig("x86"), "per-tensor": lambda: tq.default_qconfig}


def quantized(model: nn.Module, size: tuple[int, int], fuse: Callable[[], None],
              qconfig: str = "per-channel") -> nn.Module:
    """``model`` statically quantized in eager mode: fused, prepared, calibrated, converted."""
    model.eval()
    fuse()
    model.qconfig = QCONFIGS[qconfig]()
    tq.prepare(model, inplace=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(2, 3, *size, generator=gen))
    tq.convert(model, inplace=True)
    return model


def valid_cnn(cls: type[nn.Module] = ValidCNN, qconfig: str = "per-channel") -> nn.Module:
    torch.manual_seed(0)
    model = cls()
    return quantized(model, NATIVE, model.fuse, qconfig)  # type: ignore[arg-type]


def torchvision_quantized(name: str, size: tuple[int, int]) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models.quantization, name)(weights=None, quantize=False)
    return quantized(model, size, lambda: model.fuse_model())


def qfingerprint(model: nn.Module) -> str:
    """Structure, modes, and every tensor of a quantized model's state (a quantized tensor by
    its integers and quantization parameters; packed Linear weights are tuples)."""
    digest = hashlib.sha256(repr(model).encode())

    def add(value: object) -> None:
        if isinstance(value, (tuple, list)):
            for v in value:
                add(v)
        elif isinstance(value, torch.Tensor) and value.is_quantized:
            add(value.int_repr())
            params = ((value.q_scale(), value.q_zero_point()) if value.qscheme() == torch.per_tensor_affine
                      else (value.q_per_channel_scales(), value.q_per_channel_zero_points()))
            add(list(params))
        elif isinstance(value, torch.Tensor):
            digest.update(value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())

    for name, value in model.state_dict().items():
        digest.update(name.encode())
        add(value)
    return digest.hexdigest() + "".join("T" if m.training else "E" for m in model.modules())


def steps(actual: torch.Tensor, expected: torch.Tensor, scale: float) -> float:
    """The largest difference in steps of the output's quantization scale."""
    return float((actual.double() - expected.double()).abs().max() / scale)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def assert_stays_quantized(fcn: nn.Module) -> None:
    """Quantized convolutions throughout, the head among them; no float or quantized Linear and
    no float Conv2d left."""
    kinds = [type(m) for m in fcn.modules()]
    assert any(issubclass(k, nnq.Conv2d) for k in kinds)
    assert not any(issubclass(k, (nn.Linear, nnq.Linear, nn.Conv2d)) for k in kinds), kinds


@pytest.mark.parametrize("qconfig", list(QCONFIGS))
def test_quantized_valid_cnn_cells_equal_crops(qconfig: str) -> None:
    model = valid_cnn(ValidCNN, qconfig)
    before = qfingerprint(model)
    probe = torch.randn(4, 3, *NATIVE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(probe)

    fcn = convolutionalize(model, input_size=NATIVE)

    assert qfingerprint(model) == before  # the caller's model is left alone
    with torch.no_grad():
        assert torch.equal(model(probe), reference)
    assert_stays_quantized(fcn)
    assert isinstance(fcn.net.fc1, nniq.ConvReLU2d) and fcn.net.fc1.kernel_size == (5, 5)
    assert type(fcn.net.fc2) is nnq.Conv2d and fcn.net.fc2.kernel_size == (1, 1)
    assert (fcn.net.fc2.scale, fcn.net.fc2.zero_point) == (model.fc2.scale, model.fc2.zero_point)
    weight = fcn.net.fc1.weight()
    assert weight.qscheme() == model.fc1.weight().qscheme()
    assert torch.equal(weight.int_repr().flatten(1), model.fc1.weight().int_repr())  # the same integers
    assert fcn.geometry.crop_equivalent and fcn.geometry.stride == (2, 2)
    assert fcn.self_check.native_error == 0.0 and fcn.self_check.crop_error == 0.0
    assert tolerance("quantized") < 1 / 255  # below one step of any 8-bit output: exactness

    scale = model.fc2.scale
    with torch.no_grad():
        native = fcn(probe)
    assert native.shape == (4, 10, 1, 1)
    assert steps(native.flatten(1), reference, scale) == 0  # measured: 0 steps
    assert relative(native.flatten(1), reference) <= tolerance("quantized")

    size = (NATIVE[0] + 2 * 2, NATIVE[1] + 3 * 2)  # native + 2 strides down, 3 across
    image = 1.5 * torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = fcn(image)
        assert dense.shape[-2:] == fcn.geometry.cells(*size) == (3, 4)
        for i in range(3):
            for j in range(4):
                x0, y0, x1, y1 = fcn.geometry.box(i, j)
                crop = model(image[:, :, y0:y1, x0:x1])
                assert steps(dense[:, :, i, j], crop, scale) == 0, (i, j)
                assert relative(dense[:, :, i, j], crop) <= tolerance("quantized")


def test_quantized_global_pool_head_is_a_quantized_window_pool() -> None:
    """The quantized adaptive average pool becomes a stride-1 quantized average pool over the
    native feature window; each cell equals the original on its crop, integer for integer."""
    model = valid_cnn(ValidGapCNN)
    fcn = convolutionalize(model, input_size=NATIVE)
    assert_stays_quantized(fcn)
    assert [s.op for s in fcn.plan.steps][:2] == ["global_pool", "flatten"]
    assert fcn.geometry.crop_equivalent and fcn.geometry.window == NATIVE
    assert fcn.self_check.native_error == 0.0 and fcn.self_check.crop_error == 0.0
    size = (NATIVE[0] + 4, NATIVE[1] + 6)
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        dense = fcn(image)
        assert dense.shape[-2:] == (3, 4)
        for i, j in [(0, 0), (1, 2), (2, 3)]:
            x0, y0, x1, y1 = fcn.geometry.box(i, j)
            assert steps(dense[:, :, i, j], model(image[:, :, y0:y1, x0:x1]), model.fc.scale) == 0


@pytest.mark.parametrize("pool", ["none", "global"])
def test_quantized_pool_modes(pool: str) -> None:
    model = valid_cnn()
    fcn = convolutionalize(model, input_size=NATIVE, pool=pool)
    assert_stays_quantized(fcn)
    probe = torch.randn(2, 3, *NATIVE, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out, reference = fcn(probe), model(probe)
    # a flatten head has only the window meaning: "none" is the window map, "global" its mean
    assert steps(out.reshape(reference.shape), reference, model.fc2.scale) == 0
    with torch.no_grad():
        bigger = fcn(torch.randn(1, 3, 18, 20))
    assert bigger.shape == ((1, 10, 3, 4) if pool == "none" else (1, 10))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_large"])
def test_torchvision_quantized_classifiers_convert(name: str) -> None:
    size = (64, 64)
    model = torchvision_quantized(name, size)
    before = qfingerprint(model)
    probe = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = model(probe)

    assert analyse(model, size).precision == "quantized"
    fcn = convolutionalize(model, input_size=size)

    assert qfingerprint(model) == before
    assert_stays_quantized(fcn)
    linear = [s for s in fcn.plan.steps if s.op == "linear"]
    assert linear and all(s.kernel == (1, 1) and "quantized" in s.detail for s in linear)
    assert fcn.geometry.stride == (32, 32) and fcn.self_check.native_error == 0.0
    scale = model.fc.scale if name == "resnet18" else model.classifier[-1].scale
    with torch.no_grad():
        native = fcn(probe)
        assert steps(native.flatten(1), reference, scale) == 0
        larger = (size[0] + 2 * 32, size[1] + 3 * 32)
        assert fcn.geometry.cells(*larger) == (3, 4)
        assert fcn(torch.randn(1, 3, *larger)).shape == (1, 1000, 3, 4)


def test_dynamically_quantized_linear_is_refused_by_name() -> None:
    """A dynamic Linear quantizes its input with a scale measured on the whole input: a cell
    of a large map would get the whole map's scale, not its crop's; no exact sliding form."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 12 * 12, 5)).eval()
    dynamic = tq.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(NotConvolutionalizable, match=r"'_2' \(Linear\) is dynamically quantized"):
        convolutionalize(dynamic, input_size=NATIVE)


def test_quantized_output_stride_is_refused_by_name() -> None:
    with pytest.raises(NotConvolutionalizable, match=r"'conv2' is a quantized convolution \(ConvReLU2d\)"):
        convolutionalize(valid_cnn(), input_size=NATIVE, output_stride=1)


def test_quantized_output_without_dequantize_stays_quantized() -> None:
    """A model that returns its quantized scores (no final DeQuantize) is checked by the values
    its integers stand for, and returns a quantized map."""
    model = valid_cnn()
    model.dequant = nn.Identity()
    fcn = convolutionalize(model, input_size=NATIVE)
    assert fcn.self_check.native_error == 0.0 and fcn.self_check.crop_error == 0.0
    image = torch.randn(1, 3, 18, 20, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        dense = fcn(image)
        crop = model(image[:, :, 2:16, 4:18])  # cell (1, 2): the window at (2, 4)
    assert dense.is_quantized and dense.shape == (1, 10, 3, 4)
    assert torch.equal(dense[:, :, 1, 2].int_repr(), crop.int_repr())


def test_quantized_class_activation_map_is_the_linear_at_every_cell() -> None:
    """pool="none" on a global-pool head ending in a quantized Linear: each cell is the quantized
    Linear on that feature cell (integer for integer). The mean of those rounded scores is not
    the rounded logits, so the self-check does not compare it with them (native_error None)."""
    model = valid_cnn(ValidGapCNN)
    model.dequant = nn.Identity()  # the head ends in the quantized Linear itself
    fcn = convolutionalize(model, input_size=NATIVE, pool="none")
    assert fcn.self_check.native_error is None
    assert_stays_quantized(fcn)
    image = torch.randn(1, 3, 18, 20, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        cam = fcn(image)
        features = model.conv2(model.conv1(model.quant(image)))  # fused: the ReLUs are inside
        assert cam.shape[-2:] == features.shape[-2:] == (7, 8)
        for i, j in [(0, 0), (3, 5), (6, 7)]:
            expected = model.fc(features[:, :, i, j].contiguous())
            assert torch.equal(cam[:, :, i, j].int_repr(), expected.int_repr()), (i, j)


# --------------------------------------------------------------------------- quantized TorchScript

def _scripted(model: nn.Module, form: str, size: tuple[int, int], tmp_path: Path | None = None
              ) -> torch.jit.ScriptModule:
    """``model`` scripted or traced, read back from a ``.pt`` archive when ``tmp_path`` is given."""
    scripted = (torch.jit.trace(model, torch.randn(1, 3, *size)) if form == "trace"
                else torch.jit.script(model))
    if tmp_path is None:
        return scripted
    torch.jit.save(scripted, str(tmp_path / "q.pt"))
    return load_model(str(tmp_path / "q.pt"))


def _head_kernels(fcn: nn.Module) -> list[torch.Tensor]:
    """The int8 kernels the converted head's convolutions dequantize in the graph."""
    decomposed = torch.ops.quantized_decomposed
    kernels = []
    for node in fcn.net.graph.nodes:
        weight = node.args[1] if node.target == torch.ops.aten.conv2d.default else None
        if weight is not None and weight.target in (decomposed.dequantize_per_channel.default,
                                                    decomposed.dequantize_per_tensor.default):
            kernels.append(getattr(fcn.net, weight.args[0].target))
    return kernels


@pytest.mark.parametrize("archive", [False, True], ids=["object", "archive"])
@pytest.mark.parametrize("form", ["script", "trace"])
def test_quantized_torchscript_cells_equal_crops(form: str, archive: bool, tmp_path: Path) -> None:
    """An eager-quantized model scripted or traced (quantized::conv2d / linear on packed
    parameters) converts through torch's TorchScript converter; the weights are its int8 integers
    dequantized in the graph, the head a convolution on the Linear's integers. Cells equal the
    ScriptModule on true crops within one step of its output scale (measured: 0)."""
    model = valid_cnn()
    scripted = _scripted(model, form, NATIVE, tmp_path if archive else None)
    fcn = convolutionalize(scripted, input_size=NATIVE)
    assert fcn.source_format == "torchscript"
    assert not any(n.target == torch.ops.aten.linear.default for n in fcn.net.graph.nodes)
    kernels = _head_kernels(fcn)
    assert [k.dtype for k in kernels] == [torch.int8] * 4  # conv1, conv2 and the two head layers
    assert torch.equal(kernels[2].flatten(1), model.fc1.weight().int_repr())  # the same integers
    assert kernels[2].shape == (32, 16, 5, 5) and kernels[3].shape == (10, 32, 1, 1)
    assert fcn.geometry.crop_equivalent and fcn.geometry.stride == (2, 2)
    assert fcn.self_check.crop_error is not None and fcn.self_check.crop_error <= tolerance("pt2e")
    scale = model.fc2.scale
    size = (NATIVE[0] + 2 * 2, NATIVE[1] + 3 * 2)
    image = 1.5 * torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        native = fcn(image[:, :, :14, :14])
        assert steps(native.flatten(1), scripted(image[:, :, :14, :14]), scale) <= 1.001
        dense = fcn(image)
        assert dense.shape[-2:] == (3, 4)
        for i in range(3):
            for j in range(4):
                x0, y0, x1, y1 = fcn.geometry.box(i, j)
                crop = scripted(image[:, :, y0:y1, x0:x1])
                assert steps(dense[:, :, i, j], crop, scale) <= 1.001, (i, j)
                assert relative(dense[:, :, i, j], crop) <= tolerance("pt2e")


def test_quantized_torchscript_global_pool_rounds_like_the_quantized_pool() -> None:
    """A quantized average pool rounds its mean to its input's integer grid; the lifted float
    pool is followed by that rounding, so the cells equal the ScriptModule on true crops integer
    for integer (without it the lift was off by 1.5e-2 at the native size)."""
    model = valid_cnn(ValidGapCNN)
    scripted = _scripted(model, "trace", NATIVE)
    fcn = convolutionalize(scripted, input_size=NATIVE)
    assert [n.target.__name__ for n in fcn.net.graph.nodes
            if n.op == "call_function" and "requantize" in getattr(n.target, "__name__", "")] == [
        "requantize_mean"]
    image = torch.randn(1, 3, 18, 20, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        dense = fcn(image)
        assert dense.shape[-2:] == (3, 4)
        for i, j in [(0, 0), (1, 2), (2, 3)]:
            x0, y0, x1, y1 = fcn.geometry.box(i, j)
            assert steps(dense[:, :, i, j], scripted(image[:, :, y0:y1, x0:x1]), model.fc.scale) == 0


@pytest.mark.zoo
def test_quantized_torchscript_resnet18_is_refused_naming_the_lift(tmp_path: Path) -> None:
    """torchvision's quantized ResNet-18 traced to an archive: torch's converter lifts it to float
    convolutions whose sums round at quantization boundaries where the integer kernels do not
    (one step here and there in the body), 2 steps of the output scale at the native size
    (3.2e-2 of the largest score, measured), more than the pt2e tolerance; the refusal says so
    and what converts instead (the eager model: exact)."""
    size = (64, 64)
    scripted = _scripted(torchvision_quantized("resnet18", size), "trace", size, tmp_path)
    with pytest.raises(NotConvolutionalizable, match=r"quantized TorchScript: .*packed parameters.*"
                                                     r"quantized::linear.*do not round"):
        convolutionalize(scripted, input_size=size)


# --------------------------------------------------------------------------- saved quantized models

def _decomposed_int8_kernels(graph: torch.fx.GraphModule) -> list[torch.Tensor]:
    """Every convolution kernel that the graph dequantizes from int8 (in any module of it)."""
    decomposed = torch.ops.quantized_decomposed
    kernels = []
    for node in graph.graph.nodes:
        weight = node.args[1] if node.target == torch.ops.aten.conv2d.default else None
        if weight is not None and weight.target in (decomposed.dequantize_per_channel.default,
                                                    decomposed.dequantize_per_tensor.default):
            owner = graph
            *path, name = str(weight.args[0].target).split(".")
            for part in path:
                owner = getattr(owner, part)
            kernels.append(getattr(owner, name))
    return kernels


@pytest.mark.parametrize("suffix", [".pt", ".pt2", ".onnx"])
def test_saved_eager_quantized_model_stays_quantized(suffix: str, tmp_path: Path) -> None:
    """Quantized in, quantized out: .pt is TorchScript (torch.load cannot rebuild pickled
    quantized modules), .pt2 and .onnx the model lifted to a graph with its int8 weights
    dequantized in it; each carries the geometry and reads back converted, within one output
    step of the eager model."""
    model = valid_cnn()
    fcn = convolutionalize(model, input_size=NATIVE)
    path = save(fcn, tmp_path / f"out{suffix}")
    back = load_model(str(path))
    assert geometry_of(back) == fcn.geometry
    image = torch.randn(1, 3, 18, 20, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = fcn(image)
    if suffix == ".onnx":
        ops = {n.op_type for n in back.graph.node}
        assert "DequantizeLinear" in ops and "Conv" in ops and not {"Gemm", "MatMul"} & ops
        int8 = [t for t in back.graph.initializer if t.data_type == 3]  # TensorProto.INT8
        assert {tuple(t.dims) for t in int8} >= {(32, 16, 5, 5), (10, 32, 1, 1)}
        return
    if suffix == ".pt":
        assert isinstance(torch.jit.load(str(path)), torch.jit.ScriptModule)  # TorchScript, no pickle
    with torch.no_grad():
        got = back(image)
    assert steps(got, expected, model.fc2.scale) <= 1.001
    kernels = _decomposed_int8_kernels(back.net)
    assert {k.dtype for k in kernels} == {torch.int8}
    assert {tuple(k.shape) for k in kernels} >= {(32, 16, 5, 5), (10, 32, 1, 1)}


@pytest.mark.parametrize("suffix", [".pt", ".pt2", ".onnx"])
def test_cli_round_trip_of_a_quantized_torchscript_archive(suffix: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """convert q.pt (quantized TorchScript) -o out.pt/.pt2/.onnx, then inspect and predict read
    the file back without --input-size."""
    import numpy as np
    from PIL import Image

    torch.jit.save(torch.jit.script(valid_cnn()), str(tmp_path / "q.pt"))
    out = tmp_path / f"out{suffix}"
    assert main(["convert", str(tmp_path / "q.pt"), "--input-size", "14", "14", "-o", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    assert "stride: 2x2" in capsys.readouterr().out
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (18, 20, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    scores = tmp_path / "map.npy"
    assert main(["predict", str(out), str(tmp_path / "image.png"), "-o", str(scores), "--no-progress"]) == 0
    assert np.load(scores).shape == (10, 3, 4)
