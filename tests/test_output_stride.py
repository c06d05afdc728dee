"""Output strides below the network's own (à trous) on real architectures.

A padded network's à trous map equals the shift-and-stitch maps (the stride-S map of the
image shifted by every multiple of ``s`` below S, interleaved) at every cell whose receptive
field lies inside both images; border cells differ because the padding sits at other places.
Both are measured here; the README quotes the border numbers.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from convolutionalize import NotConvolutionalizable, convolutionalize

from conftest import cells_and_crops, rel_error


def _randomize_norms(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def shift_and_stitch(base: nn.Module, image: torch.Tensor, stride: int, network: int,
                     shape: tuple[int, ...]) -> torch.Tensor:
    """The network-stride maps of ``image`` shifted by multiples of ``stride``, interleaved into
    a map of ``shape`` (cells no shifted map reaches stay NaN)."""
    k = network // stride
    stitched = torch.full(shape, float("nan"))
    with torch.no_grad():
        for py in range(k):
            for px in range(k):
                part = base(image[..., py * stride:, px * stride:])
                target = stitched[..., py::k, px::k]
                h, w = min(part.shape[-2], target.shape[-2]), min(part.shape[-1], target.shape[-1])
                target[..., :h, :w] = part[..., :h, :w]
    return stitched


def interior(fcn: nn.Module, shape: tuple[int, ...], image: tuple[int, int], network: int) -> torch.Tensor:
    """Cells whose receptive field lies inside the image and inside their shifted image."""
    geo = fcn.geometry
    (s, _), (ry, rx), (oy, ox) = geo.stride, geo.receptive_field, geo.receptive_offset
    k = network // s
    rows, cols = shape[-2:]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        for j in range(cols):
            y0, x0 = i * s + oy, j * s + ox
            mask[i, j] = (y0 >= (i % k) * s and x0 >= (j % k) * s
                          and y0 + ry <= image[0] and x0 + rx <= image[1])
    return mask


CASES = [
    pytest.param(lambda: torchvision.models.resnet18(num_classes=5), (64, 64), 16, id="resnet18-16"),
    pytest.param(lambda: torchvision.models.resnet18(num_classes=5), (64, 64), 8, id="resnet18-8"),
    pytest.param(lambda: torchvision.models.mobilenet_v2(num_classes=5), (64, 64), 16, id="mobilenet_v2-16"),
    pytest.param(lambda: torchvision.models.mobilenet_v2(num_classes=5), (64, 64), 8, id="mobilenet_v2-8"),
]


def _interior_and_border_errors(base: nn.Module, fcn: nn.Module, stride: int, columns: int = 4,
                                logits: bool = False) -> tuple[float, float]:
    """Relative max differences (to the dense map's largest score) between the à trous map and
    shift-and-stitch, over interior cells and over border cells, on an image a receptive field
    plus 3 (rows) and ``columns`` network strides large."""
    network, (ry, rx) = base.geometry.stride[0], fcn.geometry.receptive_field
    size = (ry + 3 * network, rx + columns * network)
    image = torch.randn(1, 3, *size)
    with torch.no_grad():
        dense = fcn(image)
    if logits:
        dense, base = dense.logits, _Logits(base)
    assert dense.shape[-2:] == fcn.geometry.cells(*size)
    stitched = shift_and_stitch(base, image, stride, network, tuple(dense.shape))
    inside = interior(fcn, tuple(dense.shape), size, network)
    assert inside.sum() >= 4
    error = (dense - stitched).abs().amax(1)[0] / dense.abs().max()
    return float(error[inside].max()), float(torch.nan_to_num(error[~inside]).max())


@pytest.mark.parametrize(("factory", "native", "stride"), CASES)
def test_padded_network_interior_equals_shift_and_stitch(factory, native, stride) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = _randomize_norms(factory())
    base = convolutionalize(model, native)
    fcn = convolutionalize(model, native, output_stride=stride)
    assert fcn.geometry.stride == (stride, stride) and not fcn.geometry.crop_equivalent
    assert any("output stride" in note for note in fcn.geometry.notes)
    inside, border = _interior_and_border_errors(base, fcn, stride)
    assert inside <= 1e-5
    assert border > 1e-3  # the border really differs (measured)


@pytest.mark.parametrize("stride", [16, 8])
def test_densenet_interior_equals_shift_and_stitch(stride: int) -> None:
    """DenseNet's dilated transition averages and final relu + average pool, interior vs
    shift-and-stitch. On a reduced DenseNet (same layer kinds: dense layers of BN-ReLU-1x1 and
    BN-ReLU-3x3 convs with concatenation, BN-ReLU-1x1-AvgPool2d(2, 2) transitions, final
    BN + relu + adaptive average pool + Linear), because DenseNet-121's receptive field is
    2071 px per feature cell (2103 px for a 64 px native window; 58 3x3 convs, 16 of them at
    stride 32): an interior cell needs a ~2200 px image, a stride-32 pass over it takes ~6 s on
    2 cores and shift-and-stitch needs 4 + 16 of them. Even DenseNet-121's block configuration
    at growth rate 4 took 36 s (stride 16) and 108 s (stride 8). This one's receptive field is
    311 px at a 64 px native size (border difference measured: ~0.13 of the largest score)."""
    torch.manual_seed(0)
    model = _randomize_norms(torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2),
                                                         num_init_features=16, num_classes=5))
    base = convolutionalize(model, (64, 64))
    fcn = convolutionalize(model, (64, 64), output_stride=stride)
    assert base.geometry.stride == (32, 32) and fcn.geometry.stride == (stride, stride)
    assert fcn.geometry.receptive_field == (311, 311)
    assert any(type(m).__name__ == "DilatedAvgPool2d" for m in fcn.modules())
    inside, border = _interior_and_border_errors(base, fcn, stride)
    assert inside <= 1e-5
    assert border > 1e-3  # the border really differs (measured)


TRANSFORMERS_CASES = [
    pytest.param([8, 16], 4, id="two-stages-4"),
    pytest.param([8, 16, 16, 16], 16, id="four-stages-16"),
    pytest.param([8, 16, 16, 16], 8, id="four-stages-8"),
]


@pytest.mark.parametrize(("hidden_sizes", "stride"), TRANSFORMERS_CASES)
def test_transformers_cnn_interior_equals_shift_and_stitch(hidden_sizes: list[int], stride: int) -> None:
    """A tiny transformers ResNet (network stride 8 with two stages, 32 with four), random
    weights and norm statistics, traced through torch.export."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=hidden_sizes,
                                    depths=[1] * len(hidden_sizes), layer_type="basic", num_labels=5)
    model = _randomize_norms(transformers.ResNetForImageClassification(cfg))
    base = convolutionalize(model, (32, 32))
    fcn = convolutionalize(model, (32, 32), output_stride=stride)
    assert "torch.export" in fcn.plan.describe()
    assert base.geometry.stride[0] == 2 ** (len(hidden_sizes) + 1) and fcn.geometry.stride == (stride, stride)
    inside, border = _interior_and_border_errors(base, fcn, stride, columns=5, logits=True)
    assert inside <= 1e-5
    assert border > 1e-3  # the border really differs (measured)


class _Logits(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).logits


def test_densenet_average_pools_become_dilated_and_stay_exact_at_native_size() -> None:
    """DenseNet's transitions are AvgPool2d(2, 2): below their stride they become dilated
    depthwise averages. Its receptive field (2103 px at a 64 px native size) is too large for an
    interior check on CPU (a reduced DenseNet has one above); the self-check (native size, map
    size at a larger non-square input) holds."""
    torch.manual_seed(0)
    model = _randomize_norms(torchvision.models.densenet121(num_classes=5))
    fcn = convolutionalize(model, (64, 64), output_stride=8)
    assert fcn.native_error is not None and fcn.native_error <= 1e-4
    assert fcn.self_check.cells == fcn.geometry.cells(*fcn.self_check.size)
    assert any(type(m).__name__ == "DilatedAvgPool2d" for m in fcn.modules())


def test_global_context_after_a_removed_stride_is_refused_naming_it() -> None:
    """EfficientNet's squeeze-excitation means would cover other positions on a denser map."""
    model = torchvision.models.efficientnet_b0(num_classes=5).eval()
    with pytest.raises(NotConvolutionalizable, match=r"output_stride=16: '.*' .*possible output strides: 32"):
        convolutionalize(model, (64, 64), output_stride=16)


def test_impossible_output_stride_names_the_possible_ones() -> None:
    model = torchvision.models.resnet18(num_classes=5).eval()
    with pytest.raises(NotConvolutionalizable, match=r"allow 1, 2, 4, 8, 16, 32"):
        convolutionalize(model, (64, 64), output_stride=3)


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-2, ValueError), (2.0, TypeError),
                                              (True, TypeError)])
def test_bad_output_stride_values(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="output_stride"):
        convolutionalize(torchvision.models.resnet18(num_classes=5), (64, 64), output_stride=value)  # type: ignore[arg-type]


def test_output_stride_with_global_pool_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="pool='window' or pool='none'"):
        convolutionalize(torchvision.models.resnet18(num_classes=5), (64, 64), pool="global",
                         output_stride=16)


def test_padding_free_network_at_output_stride_1_equals_every_crop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, stride=2),
                          nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(8, 8, 3), nn.Flatten(),
                          nn.Linear(8 * 2 * 3, 4)).eval()
    fcn = convolutionalize(model, (36, 44), output_stride=1)
    assert fcn.geometry.stride == (1, 1) and fcn.geometry.crop_equivalent
    dense, expected = cells_and_crops(model, fcn, torch.randn(1, 3, 41, 47))
    assert dense.shape[0] == 6 * 4
    assert rel_error(dense, expected) <= 1e-4


def test_dense_map_at_output_stride_8_tiled_equals_whole_and_out_of_core(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Tiles start on multiples of the output stride and carry halos from the receptive field:
    tiled == whole at output stride 8, in memory and written to zarr."""
    import numpy as np

    from convolutionalize import dense_map

    torch.manual_seed(0)
    model = _randomize_norms(torchvision.models.resnet18(num_classes=5))
    image = torch.randn(3, 200, 232)
    whole = dense_map(model, image, input_size=(64, 64), output_stride=8)
    tiled = dense_map(model, image, input_size=(64, 64), output_stride=8, tile=64)
    stored = dense_map(model, image, input_size=(64, 64), output_stride=8, tile=96,
                       out=tmp_path / "map.zarr")
    fcn = convolutionalize(model, (64, 64), output_stride=8)
    assert whole.shape == (5, *fcn.geometry.cells(200, 232))
    scale = np.abs(whole).max()
    assert np.abs(tiled - whole).max() <= 1e-5 * scale
    assert np.abs(np.asarray(stored) - whole).max() <= 1e-5 * scale
    with pytest.raises(ValueError, match="output_stride=16 differs"):
        dense_map(fcn, image, output_stride=16)


def test_cli_predict_at_an_output_stride(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from convolutionalize.cli import main

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=5).eval(), tmp_path / "r18.pt")
    np.save(tmp_path / "image.npy", np.random.default_rng(0).standard_normal((3, 96, 128)).astype(np.float32))
    code = main(["predict", str(tmp_path / "r18.pt"), "--trust-pickle", str(tmp_path / "image.npy"),
                 "--input-size", "64", "64", "--output-stride", "8", "-o", str(tmp_path / "map.npy"),
                 "--no-progress"])
    assert code == 0
    assert np.load(tmp_path / "map.npy").shape == (5, (96 - 64) // 8 + 1, (128 - 64) // 8 + 1)


def test_runner_folds_batch_norms_of_an_output_stride_model() -> None:
    """The tile runner folds batch norms into convolutions from the converted graph itself:
    re-tracing it failed on the dilated average pool, which left ResNet-50 at stride 16
    unfolded and unfused (1.3 s instead of 0.9 s at 1024^2). Folded, it still equals the model."""
    from convolutionalize.inference._runner import runner_for

    torch.manual_seed(0)
    model = _randomize_norms(torchvision.models.resnet18(num_classes=4))
    fcn = convolutionalize(model, (64, 64), output_stride=8)
    runner = runner_for(fcn, "fp32", torch.device("cpu"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in runner.model.modules())
    x = torch.randn(1, 3, 80, 96)
    with torch.no_grad():
        expected = fcn(x).numpy()
    assert rel_error(torch.from_numpy(runner(x)), torch.from_numpy(expected)) <= 1e-5


@pytest.mark.parametrize("stride", [16, 8])
def test_ceil_mode_average_pool_downsample_interior_equals_shift_and_stitch(stride: int) -> None:
    """timm's ResNet-D (``resnet26d``) downsamples its shortcuts with
    ``AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)``: below its stride the pool's
    last window hangs off the end and counts only the pixels inside, so the shortcut keeps
    the main branch's size (this was refused with a shape mismatch before)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _randomize_norms(timm.create_model("resnet26d", pretrained=False, num_classes=6))
    base = convolutionalize(model, 64)
    fcn = convolutionalize(model, 64, output_stride=stride)
    pools = [m for m in fcn.modules() if type(m).__name__ == "DilatedAvgPool2d"]
    assert pools and all(m.extra != (0, 0) for m in pools)
    inside, border = _interior_and_border_errors(base, fcn, stride)
    assert inside <= 1e-5
    assert border > 1e-3
