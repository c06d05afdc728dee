"""``convolutionalize`` on tiny hand-written PyTorch classifiers: every head form, pool mode,
refusal, bad option, and what the converted module must work with.

Tolerances: float32 paths compare with relative 1e-5 (RTOL) unless stated: the rewrite only
reorders sums. Crop comparisons use ``verify.CROP_RTOL`` (1e-4) where a window pool averages
many cells, ONNX ``export.ONNX_RTOL`` (1e-4, onnxruntime sums differently), bfloat16 2e-2.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convolutionalize as cz
from convolutionalize import NotConvolutionalizable, convolutionalize
from convolutionalize.export import ONNX_RTOL, export_program, save
from convolutionalize.verify import CROP_RTOL

from conftest import cells_and_crops, fingerprint, flattened_linears, rel_error

RTOL = 1e-5
CLASSES = 5

# --------------------------------------------------------------------------- tiny models


def valid_body(in_channels: int = 3) -> nn.Sequential:
    """Padding-free: 13x13 -> 11x11 -> 5x5 (6 channels), stride 2."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                         nn.ReLU())


def padded_body() -> nn.Sequential:
    """Zero-padded: 16x16 -> 16x16 -> 8x8 (6 channels), stride 2."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())


VALID = (13, 13)  # native size of valid_body models (feature 5x5, stride 2)
PADDED = (16, 16)  # native size of padded_body models (feature 8x8, stride 2)


class GapNet(nn.Module):
    """Conv body, AdaptiveAvgPool2d(1), flatten, Linear: runs at any input size."""

    def __init__(self, body: nn.Module | None = None) -> None:
        super().__init__()
        self.body = padded_body() if body is None else body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


class FlattenNet(nn.Module):
    """Padding-free body, nn.Flatten -> Linear -> ReLU -> Linear over the 6x5x5 map."""

    def __init__(self) -> None:
        super().__init__()
        self.body = valid_body()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 5 * 5, 16), nn.ReLU(),
                                  nn.Linear(16, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class AvgPool7Net(nn.Module):
    """The classic head: AvgPool2d(7) over a 7x7 map (its stride defaults to 7), flatten, fc."""

    def __init__(self, form: str = "module") -> None:
        super().__init__()
        self.form = form
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU())  # 15x15 -> 7x7
        self.pool = nn.AvgPool2d(7)
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        x = F.avg_pool2d(x, 7) if self.form == "functional" else self.pool(x)
        if self.form == "view-size":  # the classic torchvision idiom
            return self.fc(x.view(x.size(0), -1))
        return self.fc(torch.flatten(x, 1))


class AdaptiveNet(nn.Module):
    """VGG-like: AdaptiveAvgPool2d((k, k)) before the flatten."""

    def __init__(self, convs: int, pool_to: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 4, 3), nn.ReLU()]
        for _ in range(convs - 1):
            layers += [nn.Conv2d(4, 4, 3), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((pool_to, pool_to))
        self.fc = nn.Linear(4 * pool_to * pool_to, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.body(x)), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class NhwcNet(nn.Module):
    """A channels-last body (ConvNeXt-like): permute to NHWC, an optional per-pixel Linear,
    then a mean over (1, 2) or a flatten of the NHWC map, then a Linear."""

    def __init__(self, head: str, pixel_linear: bool = False) -> None:
        super().__init__()
        self.head = head
        self.body = valid_body()
        self.pixel = nn.Linear(6, 6) if pixel_linear else nn.Identity()
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(5 * 5 * 6 if head == "flatten" else 6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pixel(self.body(x).permute(0, 2, 3, 1))
        if self.head == "mean":
            return self.fc(x.mean((1, 2)))
        if self.head == "mean-norm":
            return self.fc(self.norm(x.mean((1, 2))))
        return self.fc(x.flatten(1))


def _randomize_bn(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)


def _avg(x: torch.Tensor) -> torch.Tensor:
    return x.mean((2, 3))


HeadForm = Callable[["HeadOpNet", torch.Tensor], torch.Tensor]
HEAD_OPS: dict[str, HeadForm] = {
    "layernorm-module": lambda n, f: n.fc(n.ln(_avg(f))),
    "layernorm-functional": lambda n, f: n.fc(F.layer_norm(_avg(f), (6,), n.ln.weight, n.ln.bias)),
    "layernorm-functional-plain": lambda n, f: n.fc(F.layer_norm(_avg(f), (6,))),
    "batchnorm1d": lambda n, f: n.fc(n.bn(_avg(f))),
    "batchnorm1d-between-linears": lambda n, f: n.fc(n.bn(n.hidden(torch.flatten(f, 1))).relu()),
    "softmax-module-dim1": lambda n, f: n.softmax1(n.fc(_avg(f))),
    "softmax-module-dim-1": lambda n, f: n.softmax_last(n.fc(_avg(f))),
    "log_softmax-module-dim1": lambda n, f: n.log_softmax1(n.fc(_avg(f))),
    "softmax-functional-dim1": lambda n, f: F.softmax(n.fc(_avg(f)), dim=1),
    "softmax-functional-dim-1": lambda n, f: F.softmax(n.fc(_avg(f)), -1),
    "log_softmax-functional-dim1": lambda n, f: F.log_softmax(n.fc(_avg(f)), 1),
    "log_softmax-functional-dim-1": lambda n, f: F.log_softmax(n.fc(_avg(f)), dim=-1),
    "softmax-method-dim-1": lambda n, f: n.fc(_avg(f)).softmax(-1),
    "torch.softmax-dim-1": lambda n, f: torch.softmax(n.fc(_avg(f)), dim=-1),
    "cat-avg-max-dim1": lambda n, f: n.fc12(torch.cat([_avg(f), f.amax((2, 3))], dim=1)),
    "cat-avg-max-dim-1": lambda n, f: n.fc12(torch.cat((f.mean((-2, -1)), f.amax((2, 3))), -1)),
    "dropout-module": lambda n, f: n.fc(n.dropout(_avg(f))),
    "dropout-functional": lambda n, f: n.fc(F.dropout(_avg(f), 0.5, n.training)),
    "gelu": lambda n, f: n.fc(F.gelu(n.hidden6(_avg(f)))),
    "torch.relu": lambda n, f: n.fc(torch.relu(n.hidden6(_avg(f)))),
    "tensor.relu": lambda n, f: n.fc(n.hidden6(_avg(f)).relu()),
    "scalar-arithmetic": lambda n, f: n.fc(_avg(f) * 2.0 + 1.0) / 3.0,
    "flatten-hidden-gelu": lambda n, f: n.fc(F.gelu(n.hidden(f.flatten(1)))),
}


class HeadOpNet(nn.Module):
    """Padding-free body and a head built from one of ``HEAD_OPS``."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.body = valid_body()
        self.ln = nn.LayerNorm(6)
        self.bn = nn.BatchNorm1d(6)
        _randomize_bn(self.bn)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.5, 0.5)
        self.hidden = nn.Linear(6 * 5 * 5, 6)
        self.hidden6 = nn.Linear(6, 6)
        self.fc = nn.Linear(6, CLASSES)
        self.fc12 = nn.Linear(12, CLASSES)
        self.dropout = nn.Dropout(0.5)
        self.softmax1 = nn.Softmax(dim=1)
        self.softmax_last = nn.Softmax(dim=-1)
        self.log_softmax1 = nn.LogSoftmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return HEAD_OPS[self.op](self, self.body(x))


# --------------------------------------------------------------------------- helpers


def _build(cls: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


def _image(size: tuple[int, int], channels: int = 3, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(seed))


def _larger(geometry: cz.Geometry, rows: int, cols: int) -> tuple[int, int]:
    """The input size whose window map is ``rows x cols`` (native + k * stride)."""
    h, w = geometry.input_size
    return (h + (rows - 1) * geometry.stride[0], w + (cols - 1) * geometry.stride[1])


def _native(model: nn.Module, fcn: nn.Module, size: tuple[int, int],
            channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    x = _image(size, channels, batch=2)
    with torch.no_grad():
        return fcn(x), model(x)


# --------------------------------------------------------------------------- pool modes, GAP head


@pytest.fixture(scope="module")
def gap_model() -> nn.Module:
    return _build(GapNet)


def test_gap_window_is_1x1_logits_at_native(gap_model: nn.Module) -> None:
    fcn = convolutionalize(gap_model, PADDED, pool="window")
    out, logits = _native(gap_model, fcn, PADDED)
    assert out.shape == (2, CLASSES, 1, 1)
    assert rel_error(out.flatten(1), logits) < RTOL
    assert flattened_linears(fcn, PADDED) == []


def test_gap_window_map_grows_with_the_input(gap_model: nn.Module) -> None:
    fcn = convolutionalize(gap_model, PADDED, pool="window")
    with torch.no_grad():
        out = fcn(_image((16 + 2 * 3, 16 + 2 * 5)))
    assert out.shape == (1, CLASSES, 4, 6)
    assert fcn.geometry.window == PADDED and fcn.geometry.stride == (2, 2)


def test_gap_none_is_the_feature_map_and_its_mean_is_the_logits(gap_model: nn.Module) -> None:
    fcn = convolutionalize(gap_model, PADDED, pool="none")
    out, logits = _native(gap_model, fcn, PADDED)
    assert out.shape == (2, CLASSES, 8, 8)
    assert rel_error(out.mean((2, 3)), logits) < RTOL
    assert fcn.geometry.pool == "none" and fcn.geometry.window == (2, 2)


@pytest.mark.parametrize("size", [PADDED, (16 + 7, 16 + 12), (9, 30)],
                         ids=["native", "larger", "other-aspect"])
def test_gap_global_equals_the_original_at_any_size(gap_model: nn.Module,
                                                    size: tuple[int, int]) -> None:
    fcn = convolutionalize(gap_model, PADDED, pool="global")
    x = _image(size, batch=2)
    with torch.no_grad():
        out, logits = fcn(x), gap_model(x)
    assert out.shape == (2, CLASSES)
    assert rel_error(out, logits) < RTOL


def test_gap_global_geometry(gap_model: nn.Module) -> None:
    geo = convolutionalize(gap_model, PADDED, pool="global").geometry
    assert geo.pool == "global" and geo.receptive_field is None and not geo.crop_equivalent
    assert any("one prediction per image" in note for note in geo.notes)


# --------------------------------------------------------------------------- flatten head


@pytest.fixture(scope="module")
def flatten_model() -> nn.Module:
    return _build(FlattenNet)


def test_flatten_window_cells_equal_crops(flatten_model: nn.Module) -> None:
    fcn = convolutionalize(flatten_model, VALID)
    dense, expected = cells_and_crops(flatten_model, fcn, _image(_larger(fcn.geometry, 3, 4)))
    assert dense.shape == (12, CLASSES)
    assert rel_error(dense, expected) < RTOL
    assert flattened_linears(fcn, VALID) == []


def test_flatten_global_is_the_mean_of_the_window_map(flatten_model: nn.Module) -> None:
    window = convolutionalize(flatten_model, VALID, pool="window")
    global_ = convolutionalize(flatten_model, VALID, pool="global")
    x = _image(_larger(window.geometry, 3, 4), batch=2)
    with torch.no_grad():
        out, expected = global_(x), window(x).mean((2, 3))
    assert out.shape == (2, CLASSES)
    assert rel_error(out, expected) < RTOL


def test_flatten_none_equals_window(flatten_model: nn.Module) -> None:
    window = convolutionalize(flatten_model, VALID, pool="window")
    none = convolutionalize(flatten_model, VALID, pool="none")
    x = _image(_larger(window.geometry, 2, 3))
    with torch.no_grad():
        torch.testing.assert_close(none(x), window(x), rtol=0, atol=0)


def test_flatten_none_says_so_in_the_notes(flatten_model: nn.Module) -> None:
    geometry = convolutionalize(flatten_model, VALID, pool="none").geometry
    assert geometry.pool == "window" and geometry.window == VALID
    assert "a flatten head has no pooling to drop: pool='none' equals 'window'" in geometry.notes


# --------------------------------------------------------------------------- AvgPool2d(7) head


AVGPOOL7_FORMS = [
    "module",
    "functional",
    "view-size",
]


@pytest.mark.parametrize("form", AVGPOOL7_FORMS)
def test_avgpool7_becomes_a_stride_1_window_pool(form: str) -> None:
    fcn = convolutionalize(_build(lambda: AvgPool7Net(form)), (15, 15))
    with torch.no_grad():
        out = fcn(_image((15 + 2 * 2, 15 + 2 * 2)))  # native + 2 * stride
    assert fcn.geometry.stride == (2, 2) and out.shape == (1, CLASSES, 3, 3)


@pytest.mark.parametrize("form", ["module", "functional", "view-size"])
def test_avgpool7_cells_equal_crops(form: str) -> None:
    model = _build(lambda: AvgPool7Net(form))
    fcn = convolutionalize(model, (15, 15))
    dense, expected = cells_and_crops(model, fcn, _image((15 + 2 * 2, 15 + 2 * 2)))
    assert rel_error(dense, expected) < CROP_RTOL  # the window pool averages 49 cells


def test_avgpool7_original_would_not_slide() -> None:
    """The reason the rewrite exists: the original's stride-7 pool gives a 1x1 map at 19x19."""
    model = _build(AvgPool7Net)
    with torch.no_grad():
        assert model.pool(model.body(_image((19, 19)))).shape[-2:] == (1, 1)
    assert not any(isinstance(m, nn.AvgPool2d) and m.stride == 7
                   for m in convolutionalize(model, (15, 15)).modules())


# --------------------------------------------------------------------------- adaptive pool (k, k)


def test_adaptive_pool_identity_at_native_is_removed() -> None:
    model = _build(lambda: AdaptiveNet(convs=2, pool_to=5))  # 9x9 -> 5x5, pool to (5, 5)
    fcn = convolutionalize(model, (9, 9))
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in fcn.modules())
    assert fcn.geometry.stride == (1, 1)
    assert "identity at the native size" in fcn.plan.adaptive_pool.detail


def test_adaptive_pool_identity_cells_equal_crops() -> None:
    model = _build(lambda: AdaptiveNet(convs=2, pool_to=5))
    fcn = convolutionalize(model, (9, 9))
    dense, expected = cells_and_crops(model, fcn, _image((12, 11)))
    assert dense.shape == (4 * 3, CLASSES)
    assert rel_error(dense, expected) < RTOL


def test_adaptive_pool_multiple_is_noted() -> None:
    fcn = convolutionalize(_build(lambda: AdaptiveNet(convs=1, pool_to=4)), (10, 10))
    assert any("became a fixed 2x2 pool" in note for note in fcn.geometry.notes)
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in fcn.modules())


def test_adaptive_pool_multiple_map_size() -> None:
    """The map itself slides with stride 2 (body stride 1 times the 2x2 pool)."""
    fcn = convolutionalize(_build(lambda: AdaptiveNet(convs=1, pool_to=4)), (10, 10))
    with torch.no_grad():
        assert fcn(_image((10 + 2 * 2, 10 + 2 * 3))).shape == (1, CLASSES, 3, 4)


def test_adaptive_pool_multiple_map_equals_crops_at_stride_2() -> None:
    """The rewritten map is right (only its geometry is not): cell (i, j) is the crop at
    (2i, 2j), boxes computed here by hand rather than by ``geometry.box``."""
    model = _build(lambda: AdaptiveNet(convs=1, pool_to=4))
    fcn = convolutionalize(model, (10, 10))
    image = _image((10 + 2 * 2, 10 + 2 * 3))
    with torch.no_grad():
        dense = fcn(image)[0].flatten(1).T
        crops = [image[:, :, 2 * i:2 * i + 10, 2 * j:2 * j + 10] for i in range(3) for j in range(4)]
        expected = model(torch.cat(crops))
    assert rel_error(dense, expected) < RTOL


def test_adaptive_pool_multiple_becomes_a_fixed_pool_doubling_the_stride() -> None:
    model = _build(lambda: AdaptiveNet(convs=1, pool_to=4))  # 10x10 -> 8x8, pool to (4, 4)
    fcn = convolutionalize(model, (10, 10))
    assert fcn.geometry.stride == (2, 2) and fcn.geometry.crop_equivalent


def test_adaptive_pool_multiple_geometry_cells_equal_the_real_map() -> None:
    fcn = convolutionalize(_build(lambda: AdaptiveNet(convs=1, pool_to=4)), (10, 10))
    assert fcn.geometry.cells(10 + 2 * 2, 10 + 2 * 3) == (3, 4)


def test_adaptive_pool_multiple_cells_equal_crops() -> None:
    model = _build(lambda: AdaptiveNet(convs=1, pool_to=4))
    fcn = convolutionalize(model, (10, 10))
    dense, expected = cells_and_crops(model, fcn, _image((10 + 2 * 2, 10 + 2 * 3)))
    assert dense.shape == (3 * 4, CLASSES)
    assert rel_error(dense, expected) < RTOL


def test_adaptive_pool_multiple_verify_passes() -> None:
    report = cz.verify(_build(lambda: AdaptiveNet(convs=1, pool_to=4)), (10, 10))
    assert report.passed and report.crop_equivalent


def test_adaptive_pool_not_divisible_is_refused() -> None:
    model = _build(lambda: AdaptiveNet(convs=2, pool_to=3))  # 11x11 -> 7x7, pool to (3, 3)
    with pytest.raises(NotConvolutionalizable,
                       match=r"adaptive pool 'avgpool' maps the native 7x7 feature map to 3x3, "
                             r"which no fixed sliding pool reproduces"):
        convolutionalize(model, (11, 11))


# --------------------------------------------------------------------------- crop equivalence flags


class SqueezeExciteNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*valid_body(), SqueezeExcite(6))
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*valid_body(), nn.GroupNorm(2, 6))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 5 * 5, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


GLOBAL_CONTEXT = {"squeeze-excite": (SqueezeExciteNet, "mean"),
                  "groupnorm": (GroupNormNet, "body_4")}


@pytest.mark.parametrize(("cls", "node"), list(GLOBAL_CONTEXT.values()), ids=list(GLOBAL_CONTEXT))
def test_global_context_converts_exactly_at_native(cls: type[nn.Module], node: str) -> None:
    model = _build(cls)
    fcn = convolutionalize(model, VALID)
    out, logits = _native(model, fcn, VALID)
    assert rel_error(out.flatten(1), logits) < RTOL


@pytest.mark.parametrize(("cls", "node"), list(GLOBAL_CONTEXT.values()), ids=list(GLOBAL_CONTEXT))
def test_global_context_is_not_crop_equivalent(cls: type[nn.Module], node: str) -> None:
    geometry = convolutionalize(_build(cls), VALID).geometry
    assert not geometry.crop_equivalent and geometry.receptive_field is None
    assert any(note.startswith("global context") and f"'{node}'" in note
               for note in geometry.notes), geometry.notes


def test_global_context_note_names_the_traced_node() -> None:
    """The note's name is the fx node name of the squeeze-excitation mean."""
    graph = torch.fx.symbolic_trace(_build(SqueezeExciteNet)).graph
    se_mean = next(n for n in graph.nodes if n.target == "mean")
    assert se_mean.name == GLOBAL_CONTEXT["squeeze-excite"][1]


def test_padding_is_not_crop_equivalent(gap_model: nn.Module) -> None:
    geometry = convolutionalize(gap_model, PADDED).geometry
    assert not geometry.crop_equivalent
    assert any("padding in" in note and "'body_0'" in note for note in geometry.notes)


def test_padding_free_is_crop_equivalent(flatten_model: nn.Module) -> None:
    geometry = convolutionalize(flatten_model, VALID).geometry
    assert geometry.crop_equivalent and geometry.notes == ()
    assert geometry.receptive_field is not None
    assert all(r <= w for r, w in zip(geometry.receptive_field, geometry.window))


def test_padded_dense_map_differs_from_crops(gap_model: nn.Module) -> None:
    """What crop_equivalent=False warns about is real: border context changes the scores."""
    fcn = convolutionalize(gap_model, PADDED)
    dense, expected = cells_and_crops(gap_model, fcn, _image((16 + 2 * 2, 16 + 2 * 2)))
    assert rel_error(dense, expected) > 1e-3


# --------------------------------------------------------------------------- channels-last bodies

NHWC = {"mean": ("mean", False), "mean-layernorm": ("mean-norm", False),
        "flatten-hwc": ("flatten", False), "pixel-linear-mean": ("mean", True),
        "pixel-linear-flatten": ("flatten", True)}


@pytest.mark.parametrize(("head", "pixel"), list(NHWC.values()), ids=list(NHWC))
def test_nhwc_window_map_at_native_equals_logits(head: str, pixel: bool) -> None:
    model = _build(lambda: NhwcNet(head, pixel))
    fcn = convolutionalize(model, VALID)
    out, logits = _native(model, fcn, VALID)
    assert out.shape == (2, CLASSES, 1, 1)
    assert rel_error(out.flatten(1), logits) < RTOL


@pytest.mark.parametrize(("head", "pixel"), list(NHWC.values()), ids=list(NHWC))
def test_nhwc_cells_equal_crops(head: str, pixel: bool) -> None:
    model = _build(lambda: NhwcNet(head, pixel))
    fcn = convolutionalize(model, VALID)
    dense, expected = cells_and_crops(model, fcn, _image(_larger(fcn.geometry, 3, 2)))
    assert dense.shape == (6, CLASSES)
    assert rel_error(dense, expected) < CROP_RTOL  # window pools average 25 cells


@pytest.mark.parametrize(("head", "pixel"), list(NHWC.values()), ids=list(NHWC))
def test_nhwc_plan_and_structure(head: str, pixel: bool) -> None:
    fcn = convolutionalize(_build(lambda: NhwcNet(head, pixel)), VALID)
    assert fcn.plan.feature.layout == "NHWC" and fcn.geometry.crop_equivalent
    assert flattened_linears(fcn, VALID) == []  # the per-pixel Linear reads 4-D tensors


def test_nhwc_flatten_uses_the_hwc_layout() -> None:
    fcn = convolutionalize(_build(lambda: NhwcNet("flatten")), VALID)
    assert "(HWC)" in fcn.plan.steps_of("flatten")[0].detail


# --------------------------------------------------------------------------- head operations


@pytest.mark.parametrize("op", list(HEAD_OPS))
def test_head_op_matches_at_native(op: str) -> None:
    model = _build(lambda: HeadOpNet(op))
    fcn = convolutionalize(model, VALID)
    out, logits = _native(model, fcn, VALID)
    assert out.shape == (2, CLASSES, 1, 1)
    assert rel_error(out.flatten(1), logits) < RTOL


@pytest.mark.parametrize("op", list(HEAD_OPS))
def test_head_op_cells_equal_crops(op: str) -> None:
    model = _build(lambda: HeadOpNet(op))
    fcn = convolutionalize(model, VALID)
    dense, expected = cells_and_crops(model, fcn, _image(_larger(fcn.geometry, 2, 3)))
    assert dense.shape == (6, CLASSES)
    assert rel_error(dense, expected) < CROP_RTOL  # window pools average 25 cells


@pytest.mark.parametrize("op", list(HEAD_OPS))
def test_head_op_leaves_no_flat_linear(op: str) -> None:
    fcn = convolutionalize(_build(lambda: HeadOpNet(op)), VALID)
    assert flattened_linears(fcn, VALID) == []


def test_batchnorm1d_becomes_batchnorm2d() -> None:
    fcn = convolutionalize(_build(lambda: HeadOpNet("batchnorm1d")), VALID)
    kinds = {type(m) for m in fcn.modules()}
    assert nn.BatchNorm2d in kinds and nn.BatchNorm1d not in kinds


class PooledConvHead(nn.Module):
    """MobileNetV3-like: pool keeping 1x1, a 1x1 conv and Hardswish on the pooled map, flatten, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.body = valid_body()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(6, 8, 1)
        self.act = nn.Hardswish()
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.act(self.conv(self.pool(self.body(x)))), 1))


def test_pooled_conv_head_window_cells_equal_crops() -> None:
    model = _build(PooledConvHead)
    fcn = convolutionalize(model, VALID)
    dense, expected = cells_and_crops(model, fcn, _image(_larger(fcn.geometry, 3, 2)))
    assert rel_error(dense, expected) < CROP_RTOL  # the window pool averages 25 cells


def test_pooled_conv_head_none_keeps_every_feature_cell() -> None:
    fcn = convolutionalize(_build(PooledConvHead), VALID, pool="none")
    with torch.no_grad():
        assert fcn(_image(VALID)).shape == (1, CLASSES, 5, 5)
    assert fcn.native_error is None  # Hardswish between pool and fc: the mean is not the logits


def test_pooled_conv_head_global_at_a_larger_size() -> None:
    model = _build(PooledConvHead)
    fcn = convolutionalize(model, VALID, pool="global")
    x = _image((21, 26), batch=2)
    with torch.no_grad():
        assert rel_error(fcn(x), model(x)) < RTOL


def test_batchnorm_head_none_mean_is_the_logits() -> None:
    model = _build(lambda: HeadOpNet("batchnorm1d"))
    fcn = convolutionalize(model, VALID, pool="none")
    out, logits = _native(model, fcn, VALID)
    assert out.shape == (2, CLASSES, 5, 5)
    assert rel_error(out.mean((2, 3)), logits) < RTOL


class PermutedPooledLinear(nn.Module):
    """A Linear over the channels of a pooled map permuted to channels-last in the head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = valid_body()
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.body(x).mean((2, 3), keepdim=True)  # (N, 6, 1, 1)
        return self.fc(pooled.permute(0, 2, 3, 1)).flatten(1)  # (N, 1, 1, 6) -> Linear


def test_linear_on_permuted_pooled_map_converts_or_is_refused() -> None:
    model = _build(PermutedPooledLinear)
    try:
        fcn = convolutionalize(model, VALID)
    except NotConvolutionalizable:
        return  # a clean refusal is acceptable
    out, logits = _native(model, fcn, VALID)
    assert rel_error(out.flatten(1), logits) < RTOL


# --------------------------------------------------------------------------- refusals


class TupleOut(GapNet):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        features = self.body(x)
        return self.fc(features.mean((2, 3))), features


class FullyConvolutional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = valid_body()
        self.classifier = nn.Conv2d(6, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


class SlicedFeatures(GapNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.body(x).mean((2, 3))
        return self.fc(torch.cat([v[:, :3], v[:, :3]], 1))


class ScaledFeatures(GapNet):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)) * self.scale)


class TinyViT(nn.Module):
    """Patch embedding, tokens, mean over tokens, Linear: no sliding form."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (N, L, D)
        return self.fc(self.norm(tokens).mean(1))


class Branchy(GapNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return super().forward(x)


class SqueezedAll(nn.Module):
    """``adaptive_avg_pool2d(x, 1).squeeze()``: at batch size 1 the batch axis goes too."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.fc = nn.Conv2d(3, 6, 3), nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.body(x), 1).squeeze())


class FlattenedOnly(nn.Module):
    """A feature extractor: the classifier replaced by nn.Identity after the flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.classifier = nn.Conv2d(3, 6, 3), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x).flatten(1))


class ResizedInput(nn.Module):
    """The input resized to the native size first: the map cannot grow."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.fc = nn.Conv2d(3, 6, 3), nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(F.interpolate(x, size=PADDED)).mean((2, 3)))


class GatedTokens(nn.Module):
    """A gate from the pooled map times the flattened map (its second operand), averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.gate, self.fc = nn.Conv2d(3, 6, 3), nn.Linear(6, 6), nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        gate = torch.sigmoid(self.gate(x.mean((2, 3)))).unsqueeze(-1)
        return self.fc((gate * x.flatten(2)).mean(-1))


class TwoMaps(nn.Module):
    """A multi-scale head: pools from two different feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3)
        self.b = nn.Conv2d(6, 6, 3, stride=2)
        self.fc = nn.Linear(12, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        b = self.b(a)
        return self.fc(torch.cat([a.mean((2, 3)), b.mean((2, 3))], 1))


REFUSALS = {
    "tuple-output": (TupleOut, r"the output 'body_3' is a feature map of the body, returned beside the "
                                r"classifier's scores"),  # logits and features
    "squeeze()": (SqueezedAll, r"head node 'squeeze' .* the batch axis too at batch size 1"),
    "identity-classifier": (FlattenedOnly, r"the output 'classifier' is the flattened feature map itself"),
    "fixed-size-resize": (ResizedInput, r"its map does not grow with the input, so something in the body "
                                        r"brings every input to one size"),
    "fully-convolutional": (FullyConvolutional, r"the output 'classifier' is already a spatial map"),
    "sliced-vector": (SlicedFeatures, r"head node 'getitem' \(getitem\) has no known per-location "
                                      r"equivalent on a vector tensor"),
    "scaled-by-parameter": (ScaledFeatures, r"head node 'mul' \(mul\) combines the features with a "
                                           r"constant tensor"),
    "vit-like": (TinyViT, r"node 'flatten' .* reshapes the spatial map into tokens or windows"),
    "untraceable": (Branchy, r"^torch\.fx cannot trace Branchy: "),
    "gated-tokens": (GatedTokens, r"node 'flatten' .* reshapes the spatial map into tokens"),
    "two-feature-maps": (TwoMaps, r"the head reads several feature maps \('a', 'b'\)"),
}


@pytest.mark.parametrize(("cls", "message"), list(REFUSALS.values()), ids=list(REFUSALS))
def test_refused_with_a_named_reason(cls: Callable[[], nn.Module], message: str) -> None:
    with pytest.raises(NotConvolutionalizable, match=message):
        convolutionalize(_build(cls), PADDED)


def test_not_convolutionalizable_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"already a spatial map"):
        convolutionalize(_build(FullyConvolutional), VALID)


# --------------------------------------------------------------------------- bad options


def test_bad_pool_lists_the_choices(gap_model: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"pool must be one of 'window', 'none', 'global', got 'avg'"):
        convolutionalize(gap_model, PADDED, pool="avg")  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [(0, 5), (224,), "big", (16, -1), (16.0, 16), (True, 16),
                                  (16, 16, 3), 0],
                         ids=["zero", "one-value", "string", "negative", "float", "bool", "three",
                              "zero-int"])
def test_bad_input_size(gap_model: nn.Module, size: object) -> None:
    with pytest.raises(ValueError, match=r"input_size must be two positive ints \(height, width\), "
                                         r"got "):
        convolutionalize(gap_model, size)  # type: ignore[arg-type]


def test_missing_input_size(gap_model: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"input_size is required for GapNet"):
        convolutionalize(gap_model)


@pytest.mark.parametrize("model", [{"fc": nn.Linear(2, 2)}, None], ids=["dict", "none"])
def test_non_module_is_a_type_error(model: object) -> None:
    with pytest.raises(TypeError, match=r"convolutionalize takes a torch\.nn\.Module, .* got "
                       + type(model).__name__):
        convolutionalize(model, PADDED)  # type: ignore[arg-type]


def test_missing_model_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        convolutionalize(tmp_path / "model.onnx", PADDED)


def test_pytorch_file_path_is_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="load PyTorch models yourself"):
        convolutionalize(path, PADDED)


def test_int_input_size_means_square(gap_model: nn.Module) -> None:
    assert convolutionalize(gap_model, 16).geometry.input_size == (16, 16)


# --------------------------------------------------------------------------- the caller's model


class TrainingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 11 * 11, 8), nn.BatchNorm1d(8),
                                  nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.fixture
def training_model() -> nn.Module:
    torch.manual_seed(0)
    model = TrainingNet().train()
    _randomize_bn(model.head[2])
    _randomize_bn(model.body[1])
    return model


def test_training_model_is_not_mutated(training_model: nn.Module) -> None:
    before = fingerprint(training_model)
    convolutionalize(training_model, VALID)
    assert fingerprint(training_model) == before


def test_training_model_stays_in_training_mode(training_model: nn.Module) -> None:
    convolutionalize(training_model, VALID)
    assert training_model.training and all(m.training for m in training_model.modules())


def test_training_model_converts_its_eval_behaviour(training_model: nn.Module) -> None:
    fcn = convolutionalize(training_model, VALID)
    x = _image(VALID, batch=2)
    reference = copy.deepcopy(training_model).eval()
    with torch.no_grad():
        assert rel_error(fcn(x).flatten(1), reference(x)) < RTOL


def test_verify_does_not_mutate_a_training_model(training_model: nn.Module) -> None:
    before = fingerprint(training_model)
    cz.verify(training_model, VALID)
    assert fingerprint(training_model) == before


# --------------------------------------------------------------------------- the converted module


@pytest.fixture(scope="module")
def flatten_fcn(flatten_model: nn.Module) -> nn.Module:
    return convolutionalize(flatten_model, VALID)


@pytest.fixture(scope="module")
def gap_fcn(gap_model: nn.Module) -> nn.Module:
    return convolutionalize(gap_model, PADDED)


@pytest.mark.parametrize("pool", ["window", "none", "global"])
def test_converted_is_in_eval_mode(gap_model: nn.Module, pool: str) -> None:
    fcn = convolutionalize(gap_model, PADDED, pool=pool)  # type: ignore[arg-type]
    assert not any(m.training for m in fcn.modules())


def test_converted_is_a_module_with_geometry(flatten_fcn: nn.Module) -> None:
    assert isinstance(flatten_fcn, nn.Module)
    assert cz.geometry_of(flatten_fcn) is flatten_fcn.geometry


def test_geometry_of_a_plain_module_is_a_type_error(flatten_model: nn.Module) -> None:
    with pytest.raises(TypeError, match=r"FlattenNet is not a convolutionalized model"):
        cz.geometry_of(flatten_model)


OUTPUT_SIZES = {
    "window-native": ("window", (16, 16)), "window-larger": ("window", (22, 30)),
    "window-odd": ("window", (17, 23)), "none-native": ("none", (16, 16)),
    "none-odd": ("none", (19, 40)), "global-odd": ("global", (21, 33)),
}


@pytest.mark.parametrize(("pool", "size"), list(OUTPUT_SIZES.values()), ids=list(OUTPUT_SIZES))
def test_output_size_equals_the_real_shape(gap_model: nn.Module, pool: str,
                                           size: tuple[int, int]) -> None:
    fcn = convolutionalize(gap_model, PADDED, pool=pool)  # type: ignore[arg-type]
    with torch.no_grad():
        real = fcn(_image(size)).shape[1:]
    assert fcn.output_size(*size) == tuple(real)


@pytest.mark.parametrize("size", [(13, 13), (17, 20), (14, 16)], ids=["native", "larger", "odd"])
def test_output_size_flatten_head(flatten_fcn: nn.Module, size: tuple[int, int]) -> None:
    with torch.no_grad():
        real = flatten_fcn(_image(size)).shape[1:]
    assert flatten_fcn.output_size(*size) == tuple(real)


def test_output_size_falls_back_to_fake_tensors(gap_model: nn.Module,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.func

    from convolutionalize.frameworks.torch.layers import activation_shapes

    fcn = convolutionalize(gap_model, PADDED)
    with torch.no_grad():
        real = tuple(fcn(_image((21, 17))).shape[1:])
    meta_shape, sizes = activation_shapes(fcn, 3, (21, 17))
    assert meta_shape == real and sizes  # the meta run, with every leaf's output size

    def no_meta_kernel(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("no meta kernel for a custom op")

    monkeypatch.setattr(torch.func, "functional_call", no_meta_kernel)
    assert fcn.output_size(21, 17) == real
    assert activation_shapes(fcn, 3, (21, 17)) == (real, [])  # fake tensors: no leaf sizes


@pytest.mark.parametrize("size", [VALID, (13 + 2 * 3, 13 + 2 * 2)], ids=["native", "larger"])
def test_torch_compile_eager(flatten_fcn: nn.Module, size: tuple[int, int]) -> None:
    compiled = torch.compile(flatten_fcn, backend="eager")
    x = _image(size)
    with torch.no_grad():
        assert rel_error(compiled(x), flatten_fcn(x)) < RTOL


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on CPU compiles C++ and no C++ compiler is installed")
def test_torch_compile_inductor(flatten_fcn: nn.Module) -> None:
    """The default backend; compiling the tiny model takes 10-30 s on 2 CPU cores here."""
    torch._dynamo.reset()
    compiled = torch.compile(flatten_fcn)
    x = _image((13 + 2 * 3, 13 + 2 * 2))
    with torch.no_grad():
        assert rel_error(compiled(x), flatten_fcn(x)) < RTOL


@pytest.mark.parametrize("fixture", ["flatten_fcn", "gap_fcn"])
def test_channels_last(request: pytest.FixtureRequest, fixture: str) -> None:
    fcn = request.getfixturevalue(fixture)
    cl = copy.deepcopy(fcn).to(memory_format=torch.channels_last)
    x = _image(_larger(fcn.geometry, 3, 4))
    with torch.no_grad():
        out, expected = cl(x.contiguous(memory_format=torch.channels_last)), fcn(x)
    torch.testing.assert_close(out.contiguous(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture", ["flatten_fcn", "gap_fcn"])
def test_autocast_bfloat16(request: pytest.FixtureRequest, fixture: str) -> None:
    fcn = request.getfixturevalue(fixture)
    x = _image(_larger(fcn.geometry, 3, 4))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fcn(x)
        expected = fcn(x)
    assert low.shape == expected.shape
    assert rel_error(low.float(), expected) < 2e-2


@pytest.fixture(scope="module")
def onnx_session(flatten_fcn: nn.Module, tmp_path_factory: pytest.TempPathFactory):
    ort = pytest.importorskip("onnxruntime")
    path = save(flatten_fcn, tmp_path_factory.mktemp("onnx") / "m.onnx")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("size", [VALID, (13 + 2 * 4, 13 + 2 * 1), (14, 18)],
                         ids=["native", "larger", "odd"])
def test_onnx_runs_at_any_size(flatten_fcn: nn.Module, onnx_session, size: tuple[int, int]) -> None:
    x = _image(size, batch=2)
    (actual,) = onnx_session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = flatten_fcn(x)
    assert tuple(actual.shape) == tuple(expected.shape)
    assert rel_error(torch.from_numpy(actual), expected) < ONNX_RTOL


def test_onnx_save_returns_the_path(flatten_fcn: nn.Module, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    path = save(flatten_fcn, tmp_path / "m.onnx")
    assert path == tmp_path / "m.onnx" and path.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind


@pytest.fixture(scope="module")
def exported(flatten_fcn: nn.Module) -> nn.Module:
    return export_program(flatten_fcn).module()


@pytest.mark.parametrize("size", [VALID, (13 + 2 * 4, 13 + 2 * 1), (16, 14)],
                         ids=["native", "larger", "odd"])
def test_export_program_runs_at_any_size(flatten_fcn: nn.Module, exported: nn.Module,
                                         size: tuple[int, int]) -> None:
    x = _image(size, batch=3)
    with torch.no_grad():
        assert rel_error(exported(x), flatten_fcn(x)) < RTOL


def test_export_program_of_a_gap_model(gap_fcn: nn.Module) -> None:
    module = export_program(gap_fcn).module()
    x = _image((16 + 2 * 5, 16 + 2 * 2))
    with torch.no_grad():
        assert rel_error(module(x), gap_fcn(x)) < RTOL


# --------------------------------------------------------------------------- verify


def test_verify_padding_free_passes_on_crops(flatten_model: nn.Module) -> None:
    report = cz.verify(flatten_model, VALID)
    assert report.passed and report.crop_equivalent
    assert report.crop_error is not None and report.crop_error < 1e-4
    assert report.native_error < 1e-4


def test_verify_padded_is_not_crop_equivalent_but_passes(gap_model: nn.Module) -> None:
    report = cz.verify(gap_model, PADDED)
    assert report.passed and not report.crop_equivalent
    assert report.native_error < 1e-4


def test_verify_reports_the_padded_crop_error(gap_model: nn.Module) -> None:
    """A padded model's crop error is measured and reported, not hidden."""
    report = cz.verify(gap_model, PADDED)
    assert report.crop_error is not None and report.crop_error > 1e-3
    assert report.image_size == (16 + 3 * 2, 16 + 3 * 2) and report.samples == 8


@pytest.mark.parametrize("samples", [0, -3], ids=["zero", "negative"])
def test_verify_rejects_bad_samples(flatten_model: nn.Module, samples: int) -> None:
    with pytest.raises(ValueError, match=rf"samples must be at least 1, got {samples}"):
        cz.verify(flatten_model, VALID, samples=samples)


class MultiplesOnly(nn.Module):
    """Runs only on inputs whose sides are multiples of 10 (as window-partitioning blocks do)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 14 * 14, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[-2] % 10 == 0, "the height must be a multiple of 10")
        return self.fc(self.conv(x).flatten(1))


def test_a_model_that_runs_at_multiples_only_says_where_it_does_not_run() -> None:
    torch.manual_seed(0)
    model = MultiplesOnly().eval()
    fcn = convolutionalize(model, 30)
    check = fcn.self_check
    assert check.size == (90, 120) and check.crop_error is not None and check.crop_error < CROP_RTOL
    assert check.refused == ("at 34x36: the height must be a multiple of 10",)
    assert "it does not run at 34x36: the height must be a multiple of 10" in check.describe()
    with pytest.raises(ValueError, match=r"does not run at 36x36 \(the height must be a multiple of 10\).*"
                                         r"self-check at 90x120"):
        cz.verify(model, 30)  # the default image: native + 3 strides
    assert cz.verify(model, 30, image_size=(40, 50)).passed


class SpaceToDepthStem(nn.Module):
    """A stem that folds 2x2 pixels into channels first: the first Conv2d takes 12 channels
    of a 3-channel image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(12, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 7 * 7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(F.pixel_unshuffle(x, 2)).flatten(1))


def test_image_channels_are_found_where_the_first_conv_does_not_read_the_image() -> None:
    torch.manual_seed(0)
    model = SpaceToDepthStem().eval()
    fcn = convolutionalize(model, 32)
    assert fcn.plan.in_channels == 3 and fcn.native_error < CROP_RTOL
    report = cz.verify(model, 32, image_size=(40, 56))
    assert report.passed and report.crop_error is not None and report.crop_error < CROP_RTOL


class TestTimePooled(nn.Module):
    """Test-time pooling: a stride-1 average pool of the native feature size, a 1x1 conv
    classifier, then a global pool of the class map (timm's TestTimePoolHead, avg, max or
    their mean)."""

    def __init__(self, reduce: str) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
        self.fc = nn.Conv2d(16, 5, 1)
        self.reduce = reduce

    def class_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.avg_pool2d(self.body(x), 6, stride=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.class_map(x)
        pools = {"avg": y.mean((2, 3)), "max": y.amax((2, 3)),
                 "avgmax": 0.5 * (F.adaptive_avg_pool2d(y, 1) + F.adaptive_max_pool2d(y, 1)).flatten(1)}
        return pools[self.reduce]


@pytest.mark.parametrize("reduce", ["avg", "max", "avgmax"])
def test_test_time_pooling_gives_the_class_map_before_its_global_pool(reduce: str) -> None:
    torch.manual_seed(0)
    model = TestTimePooled(reduce).eval()
    fcn = convolutionalize(model, 15)
    image = torch.randn(1, 3, 15 + 2 * 2, 15 + 3 * 2)
    with torch.no_grad():
        dense, expected = fcn(image), model.class_map(image)
    assert dense.shape == expected.shape == (1, 5, 3, 4)
    assert rel_error(dense, expected) < 1e-4
    assert fcn.geometry.crop_equivalent and fcn.self_check.crop_error < 1e-4
