"""``convolutionalize`` on PyTorch models shaped like ones people deploy: MTCNN's R-Net and
O-Net (a ``permute(0, 3, 2, 1)`` before the flatten, several outputs), every axis permutation
before a flatten on a non-square map, multi-output heads (tuple, list, dict, dataclass),
global-context blocks inside the body (squeeze-excitation, ECA, GCNet, selective kernel,
split attention), reshaped logits, refusals, and mutations the self-check must catch.

All weights are random (seeded); nothing is downloaded. Tolerance: relative 1e-4
(``CROP_RTOL``, the self-check's own): a cell sums up to 1152 products in another order
than the original's Linear, and softmax / log-softmax outputs amplify that a little.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

import convolutionalize.frameworks.torch.model as torch_model
import convolutionalize.frameworks.torch.rewrite as torch_rewrite
from convolutionalize import NotConvolutionalizable, convolutionalize
from convolutionalize import dense_map as cz_dense_map
from convolutionalize.selfcheck import Reference, SelfCheck
from convolutionalize.verify import CROP_RTOL

from conftest import cells_and_crops, fingerprint, flattened_linears, rel_error

# --------------------------------------------------------------------------- helpers


def _build(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory().eval()


def _image(size: tuple[int, int], batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output in order (a tensor, tuple, list, dict or dataclass)."""
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _structure(out: Any) -> tuple[str, Any]:
    """The container type of an output and its keys / fields / length (not the tensors)."""
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return type(out).__name__, tuple(f.name for f in dataclasses.fields(out))
    if isinstance(out, dict):
        return "dict", tuple((k, _structure(v)) for k, v in out.items())
    if isinstance(out, (tuple, list)):
        return type(out).__name__, tuple(_structure(v) for v in out)
    return type(out).__name__, None


def _crop_errors(model: nn.Module, fcn: nn.Module, image: torch.Tensor,
                 cells: list[tuple[int, int]] | None = None) -> list[float]:
    """Per output: max relative error of the map's cells (all, or ``cells``) against the
    original run on each cell's true crop ``image[..., y0:y1, x0:x1]`` of ``geometry.box``."""
    with torch.no_grad():
        maps = _tensors(fcn(image))
        rows, cols = maps[0].shape[-2:]
        cells = [(i, j) for i in range(rows) for j in range(cols)] if cells is None else cells
        crops = []
        for i, j in cells:
            x0, y0, x1, y1 = fcn.geometry.box(i, j)
            assert 0 <= y0 < y1 <= image.shape[-2] and 0 <= x0 < x1 <= image.shape[-1]
            crops.append(image[..., y0:y1, x0:x1])
        expected = _tensors(model(torch.cat(crops)))
    assert len(maps) == len(expected)
    return [rel_error(torch.stack([m[0, :, i, j] for i, j in cells]), e.flatten(1))
            for m, e in zip(maps, expected)]


def _native_errors(model: nn.Module, fcn: nn.Module, size: tuple[int, int]) -> list[float]:
    x = _image(size, batch=2)
    with torch.no_grad():
        maps, logits = _tensors(fcn(x)), _tensors(model(x))
    assert len(maps) == len(logits)
    assert all(m.shape[-2:] == (1, 1) for m in maps)
    return [rel_error(m.flatten(1), e.flatten(1)) for m, e in zip(maps, logits)]


# --------------------------------------------------------------------------- axis permutations

PERMUTATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "permute(0,2,3,1)": lambda f: f.permute(0, 2, 3, 1),
    "permute(0,3,2,1)": lambda f: f.permute(0, 3, 2, 1),
    "transpose(2,3)": lambda f: f.transpose(2, 3),
    "transpose(-1,-2)": lambda f: f.transpose(-1, -2),
    "permute(0,2,1,3)": lambda f: f.permute(0, 2, 1, 3),
    "permute(0,3,1,2)": lambda f: f.permute(0, 3, 1, 2),
    "none": lambda f: f,
}
LAYOUTS = {"permute(0,2,3,1)": "NHWC", "permute(0,3,2,1)": "NWHC", "transpose(2,3)": "NCWH",
           "transpose(-1,-2)": "NCWH", "permute(0,2,1,3)": "NHCW", "permute(0,3,1,2)": "NWCH",
           "none": "NCHW"}
FLATTENS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "view": lambda f: f.view(f.shape[0], -1),
    "reshape": lambda f: f.reshape(f.size(0), -1),
    "flatten": lambda f: f.flatten(1),
}


def _flatten_as(form: str, contiguous: bool, flatten: str, f: torch.Tensor) -> torch.Tensor:
    f = PERMUTATIONS[form](f)
    return FLATTENS[flatten](f.contiguous() if contiguous else f)


# ``view`` of a permuted, non-contiguous map fails in PyTorch itself: not a form users can write
FORMS = [(p, c, f) for p in PERMUTATIONS for c in (False, True) for f in FLATTENS
         if c or f != "view" or p == "none"]
FORM_IDS = [f"{p}-{'contiguous-' if c else ''}{f}" for p, c, f in FORMS]

# --------------------------------------------------------------------------- MTCNN


def _mtcnn_pool(ceil: bool, kernel: int = 3) -> nn.MaxPool2d:
    """MTCNN's ``MaxPool2d(k, 2, ceil_mode=True)``, or a ``MaxPool2d(2, 2)`` that has no
    ceil effect (crop-equivalent: every window sits on the pool grid)."""
    return nn.MaxPool2d(kernel, 2, ceil_mode=True) if ceil else nn.MaxPool2d(2, 2)


class RNet(nn.Module):
    """MTCNN's refinement net at 24x24: 64x3x3 features permuted to (N, W, H, C), flattened,
    Linear(576, 128) + PReLU shared by the box (4) and face-probability (2, softmax) heads."""

    def __init__(self, ceil: bool = True, form: str = "permute(0,3,2,1)", contiguous: bool = True,
                 flatten: str = "view") -> None:
        super().__init__()
        self.form, self.contiguous, self.flatten = form, contiguous, flatten
        self.body = nn.Sequential(nn.Conv2d(3, 28, 3), nn.PReLU(28), _mtcnn_pool(ceil),
                                  nn.Conv2d(28, 48, 3), nn.PReLU(48), _mtcnn_pool(ceil),
                                  nn.Conv2d(48, 64, 2), nn.PReLU(64))
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _flatten_as(self.form, self.contiguous, self.flatten, self.body(x))
        x = self.prelu4(self.dense4(x))
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """MTCNN's output net at 48x48: 128x3x3 features (``permute(0, 3, 2, 1)``), Linear(1152,
    256) + PReLU, then face probability (softmax), box (4) and five landmarks (10)."""

    def __init__(self, ceil: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3), nn.PReLU(32), _mtcnn_pool(ceil),
                                  nn.Conv2d(32, 64, 3), nn.PReLU(64), _mtcnn_pool(ceil),
                                  nn.Conv2d(64, 64, 3), nn.PReLU(64), _mtcnn_pool(ceil, kernel=2),
                                  nn.Conv2d(64, 128, 2), nn.PReLU(128))
        self.dense5 = nn.Linear(128 * 3 * 3, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.body(x).permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return F.softmax(self.dense6_1(x), dim=1), self.dense6_2(x), self.dense6_3(x)


class PNet(nn.Module):
    """MTCNN's proposal net: fully convolutional already (1x1 conv heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 10, 3), nn.PReLU(10), nn.MaxPool2d(2, 2, ceil_mode=True),
                                  nn.Conv2d(10, 16, 3), nn.PReLU(16), nn.Conv2d(16, 32, 3), nn.PReLU(32))
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.body(x)
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)


MTCNN = {  # factory, native size, larger non-square size, its cells, output channels
    "rnet": (RNet, (24, 24), (64, 48), (11, 7), (4, 2)),
    "onet": (ONet, (48, 48), (80, 64), (5, 3), (2, 4, 10)),
}
MTCNN_VARIANTS = {f"{name}-{pool}": (name, pool == "ceil") for name in MTCNN for pool in ("ceil", "floor")}


@pytest.fixture(scope="module", params=list(MTCNN_VARIANTS), ids=list(MTCNN_VARIANTS))
def mtcnn(request: pytest.FixtureRequest) -> tuple[str, nn.Module, nn.Module]:
    name, ceil = MTCNN_VARIANTS[request.param]
    model = _build(lambda: MTCNN[name][0](ceil=ceil))
    return name, model, convolutionalize(model, MTCNN[name][1])


def test_mtcnn_returns_a_tuple_of_maps(mtcnn: tuple[str, nn.Module, nn.Module]) -> None:
    name, _, fcn = mtcnn
    _, _, size, cells, channels = MTCNN[name]
    with torch.no_grad():
        out = fcn(_image(size))
    assert isinstance(out, tuple)
    assert [tuple(m.shape) for m in out] == [(1, c, *cells) for c in channels]


def test_mtcnn_native_maps_equal_the_original(mtcnn: tuple[str, nn.Module, nn.Module]) -> None:
    name, model, fcn = mtcnn
    errors = _native_errors(model, fcn, MTCNN[name][1])
    assert len(errors) == len(MTCNN[name][4])
    assert max(errors) < CROP_RTOL, errors
    assert fcn.self_check.native_error is not None and fcn.self_check.native_error < CROP_RTOL


def test_mtcnn_map_rows_follow_the_image_height(mtcnn: tuple[str, nn.Module, nn.Module]) -> None:
    name, _, fcn = mtcnn
    _, _, (h, w), cells, _ = MTCNN[name]
    assert h != w and cells[0] != cells[1]
    with torch.no_grad():
        maps = fcn(_image((h, w)))
    assert all(tuple(m.shape[-2:]) == fcn.geometry.cells(h, w) == cells for m in maps)


def test_mtcnn_leaves_no_flat_linear(mtcnn: tuple[str, nn.Module, nn.Module]) -> None:
    name, _, fcn = mtcnn
    assert flattened_linears(fcn, MTCNN[name][1]) == []
    assert fcn.plan.feature.layout == "NWHC"


@pytest.mark.parametrize("name", list(MTCNN))
def test_mtcnn_conversion_leaves_the_model_alone(name: str) -> None:
    model = _build(MTCNN[name][0])
    before = fingerprint(model)
    convolutionalize(model, MTCNN[name][1])
    assert fingerprint(model) == before


@pytest.mark.parametrize("name", list(MTCNN))
def test_mtcnn_ceil_mode_pool_is_not_crop_equivalent(name: str) -> None:
    """MTCNN's first pool covers 22 (R-Net) or 46 (O-Net) cells with ceil_mode: its last
    window hangs over the edge at the native size, so border cells differ from crops."""
    geometry = convolutionalize(_build(MTCNN[name][0]), MTCNN[name][1]).geometry
    assert not geometry.crop_equivalent
    assert any("'body_2'" in note for note in geometry.notes), geometry.notes


@pytest.mark.parametrize("name", list(MTCNN))
def test_mtcnn_floor_pool_is_crop_equivalent(name: str) -> None:
    fcn = convolutionalize(_build(lambda: MTCNN[name][0](ceil=False)), MTCNN[name][1])
    assert fcn.geometry.crop_equivalent and fcn.geometry.notes == ()
    check = fcn.self_check
    assert check.size[0] != check.size[1] and check.cells == fcn.geometry.cells(*check.size)
    assert check.crop_error is not None and check.crop_error < CROP_RTOL


# cells with i != j on the non-square image: a transposed map cannot pass
RNET_CELLS = [(0, 1), (1, 0), (2, 5), (9, 3), (10, 6), (6, 2)]
ONET_CELLS = [(0, 1), (1, 0), (4, 2), (3, 0), (2, 1)]


@pytest.mark.parametrize(("name", "cells"), [("rnet", RNET_CELLS), ("onet", ONET_CELLS)],
                         ids=["rnet", "onet"])
def test_mtcnn_floor_pool_cells_equal_true_crops(name: str, cells: list[tuple[int, int]]) -> None:
    model = _build(lambda: MTCNN[name][0](ceil=False))
    fcn = convolutionalize(model, MTCNN[name][1])
    errors = _crop_errors(model, fcn, _image(MTCNN[name][2]), cells)
    assert len(errors) == len(MTCNN[name][4])
    assert max(errors) < CROP_RTOL, errors


@pytest.mark.parametrize(("form", "contiguous", "flatten"), FORMS, ids=FORM_IDS)
def test_rnet_every_permutation_form_cells_equal_true_crops(form: str, contiguous: bool,
                                                            flatten: str) -> None:
    model = _build(lambda: RNet(ceil=False, form=form, contiguous=contiguous, flatten=flatten))
    fcn = convolutionalize(model, (24, 24))
    assert fcn.plan.feature.layout == LAYOUTS[form]
    errors = _crop_errors(model, fcn, _image((64, 48)), RNET_CELLS)
    assert max(errors) < CROP_RTOL, errors


def test_pnet_is_refused_as_already_fully_convolutional() -> None:
    with pytest.raises(NotConvolutionalizable,
                       match=r"the output 'conv4_2' is already a spatial map: the model is fully "
                             r"convolutional"):
        convolutionalize(_build(PNet), (12, 12))


# --------------------------------------------------------------------------- permutations, non-square map

PERMUTED_NATIVE = (20, 28)  # padding-free body: 20x28 -> 18x26 -> 8x12 (5 channels), stride 2
PERMUTED_LARGER = (20 + 3 * 2, 28 + 2 * 2)  # 4 x 3 cells
CLASSES = 3


def _valid_body() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2), nn.ReLU())


class PermutedNet(nn.Module):
    """A padding-free body with a non-square 8x12 map, permuted, flattened, two Linears."""

    def __init__(self, form: str, contiguous: bool, flatten: str) -> None:
        super().__init__()
        self.form, self.contiguous, self.flatten = form, contiguous, flatten
        self.body = _valid_body()
        self.fc1 = nn.Linear(5 * 8 * 12, 6)
        self.fc2 = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _flatten_as(self.form, self.contiguous, self.flatten, self.body(x))
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize(("form", "contiguous", "flatten"), FORMS, ids=FORM_IDS)
def test_permutation_form_cells_equal_true_crops(form: str, contiguous: bool, flatten: str) -> None:
    model = _build(lambda: PermutedNet(form, contiguous, flatten))
    fcn = convolutionalize(model, PERMUTED_NATIVE)
    assert fcn.geometry.crop_equivalent and fcn.plan.feature.layout == LAYOUTS[form]
    image = _image(PERMUTED_LARGER)
    with torch.no_grad():
        assert tuple(fcn(image).shape) == (1, CLASSES, 4, 3) == (1, CLASSES,
                                                                 *fcn.geometry.cells(*PERMUTED_LARGER))
    dense, expected = cells_and_crops(model, fcn, image)
    assert dense.shape == (12, CLASSES)
    assert rel_error(dense, expected) < CROP_RTOL


# --------------------------------------------------------------------------- pools read off the map

POOL_FORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {  # each a global pool of the map
    "flatten(2).max(-1)[0]": lambda f: f.flatten(2).max(-1)[0],
    "view(b, c, -1).max(2).values": lambda f: f.view(f.size(0), f.size(1), -1).max(2).values,
    "avg_pool2d(x, x.shape[-2:])": lambda f: F.avg_pool2d(f, f.shape[-2:]).flatten(1),
    "avg_pool2d(x, x.size()[2:])": lambda f: F.avg_pool2d(f, f.size()[2:]).view(f.size(0), -1),
    "avg_pool2d(x, (x.size(2), x.size(3)))": lambda f: F.avg_pool2d(f, (f.size(2), f.size(3))).flatten(1),
    "max_pool2d(x, kernel_size=x.shape[2:])": lambda f: F.max_pool2d(f, kernel_size=f.shape[2:]).flatten(1),
    "mean(3).mean(2)": lambda f: f.mean(3).mean(2),
    "mean(-1).mean(-1)": lambda f: f.mean(-1).mean(-1),
    "amax(2).amax(-1)": lambda f: f.amax(2).amax(-1),
}
NOT_POOLS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {  # refused, by name
    "logsumexp": (lambda f: torch.logsumexp(f.flatten(2), -1), "'logsumexp'.*neither a global average"),
    "max's indices": (lambda f: f.flatten(2).max(-1)[1].float(), "neither a global average"),
    "max over W, then over H": (lambda f: f.max(-1)[0].max(-1).values, "'max_1'.*neither a global"),
    "amax over W, then the mean over H": (lambda f: f.amax(3).mean(2), "'mean'.*reduced over one"),
    "the mean over H, flattened": (lambda f: f.mean(2).flatten(1)[:, :5], "reduced over one spatial axis"),
}


class PooledNet(nn.Module):
    """A padding-free body (an 8x12 map at 20x28), ``pool`` of it, a Linear."""

    def __init__(self, pool: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.pool, self.body, self.fc = pool, _valid_body(), nn.Linear(5, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(x)))


@pytest.mark.parametrize("form", list(POOL_FORMS))
def test_pool_form_cells_equal_true_crops(form: str) -> None:
    model = _build(lambda: PooledNet(POOL_FORMS[form]))
    fcn = convolutionalize(model, PERMUTED_NATIVE)
    assert fcn.geometry.crop_equivalent
    assert [s.op for s in fcn.plan.steps if s.op == "global_pool"] == ["global_pool"]
    assert max(_native_errors(model, fcn, PERMUTED_NATIVE)) < CROP_RTOL
    image = _image(PERMUTED_LARGER)
    dense, expected = cells_and_crops(model, fcn, image)
    assert dense.shape == (12, CLASSES)
    assert rel_error(dense, expected) < CROP_RTOL


class FullKernelConvHead(nn.Module):
    """The classifier as a convolution whose kernel is the whole map, then a flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.classifier = _valid_body(), nn.Conv2d(5, CLASSES, (8, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x)).flatten(1)


def test_a_full_kernel_conv_head_then_flatten_slides() -> None:
    model = _build(FullKernelConvHead)
    fcn = convolutionalize(model, PERMUTED_NATIVE)
    assert max(_native_errors(model, fcn, PERMUTED_NATIVE)) < CROP_RTOL
    dense, expected = cells_and_crops(model, fcn, _image(PERMUTED_LARGER))
    assert dense.shape == (12, CLASSES) and rel_error(dense, expected) < CROP_RTOL


@pytest.mark.parametrize("form", list(NOT_POOLS))
def test_reduction_that_is_no_global_pool_is_refused_by_name(form: str) -> None:
    pool, message = NOT_POOLS[form]
    with pytest.raises(NotConvolutionalizable, match=message):
        convolutionalize(_build(lambda: PooledNet(pool)), PERMUTED_NATIVE)


@pytest.mark.parametrize(("form", "contiguous", "flatten"), FORMS, ids=FORM_IDS)
def test_permutation_form_native_and_structure(form: str, contiguous: bool, flatten: str) -> None:
    model = _build(lambda: PermutedNet(form, contiguous, flatten))
    fcn = convolutionalize(model, PERMUTED_NATIVE)
    assert max(_native_errors(model, fcn, PERMUTED_NATIVE)) < CROP_RTOL
    assert flattened_linears(fcn, PERMUTED_NATIVE) == []


@pytest.mark.parametrize("form", [p for p in PERMUTATIONS if p != "none"])
def test_view_of_a_non_contiguous_permuted_map_is_refused(form: str) -> None:
    """PyTorch itself cannot ``view`` it: the model does not run, and that is what is said."""
    model = _build(lambda: PermutedNet(form, contiguous=False, flatten="view"))
    with pytest.raises(NotConvolutionalizable,
                       match=r"PermutedNet does not run at the native input size 20x28"):
        convolutionalize(model, PERMUTED_NATIVE)


# --------------------------------------------------------------------------- several outputs


@dataclasses.dataclass
class Detection:
    logits: torch.Tensor
    box: torch.Tensor


class MultiHead(nn.Module):
    """A shared hidden layer over the (permuted) flattened 8x12 map, and heads on it."""

    def __init__(self, form: str, permute: str = "none") -> None:
        super().__init__()
        self.form, self.permute = form, permute
        self.body = _valid_body()
        self.hidden = nn.Linear(5 * 8 * 12, 8)
        self.act = nn.PReLU()
        self.cls = nn.Linear(8, CLASSES)
        self.box = nn.Linear(8, 4)
        self.points = nn.Linear(8, 10)
        self.other = nn.Linear(5 * 8 * 12, 6)
        self.gap_fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> Any:
        f = PERMUTATIONS[self.permute](self.body(x))
        flat = f.flatten(1)
        h = self.act(self.hidden(flat))
        return MULTI_OUTPUTS[self.form](self, h, flat, f)


MultiForm = Callable[[MultiHead, torch.Tensor, torch.Tensor, torch.Tensor], Any]
MULTI_OUTPUTS: dict[str, MultiForm] = {
    "tuple-shared-hidden": lambda n, h, flat, f: (n.cls(h), n.box(h)),
    "tuple-three-softmax": lambda n, h, flat, f: (F.softmax(n.cls(h), dim=1), n.box(h), n.points(h)),
    "list-three-log-softmax": lambda n, h, flat, f: [n.box(h), F.log_softmax(n.cls(h), -1), n.points(h)],
    "dict": lambda n, h, flat, f: {"scores": F.softmax(n.cls(h), dim=-1), "box": n.box(h)},
    "dict-nested": lambda n, h, flat, f: {"scores": n.cls(h), "aux": (n.box(h), n.points(h))},
    "dataclass": lambda n, h, flat, f: Detection(n.cls(h), n.box(h)),
    "separate-hidden": lambda n, h, flat, f: (n.cls(h), F.relu(n.other(flat))),
    "gap-and-flatten": lambda n, h, flat, f: (n.gap_fc(f.mean(tuple(
        i for i, a in enumerate(LAYOUTS[n.permute]) if a in "HW"))), n.box(h)),
}
MULTI = {form: (form, "none") for form in MULTI_OUTPUTS}
MULTI |= {"tuple-three-softmax-nwhc": ("tuple-three-softmax", "permute(0,3,2,1)"),
          "dict-nhwc": ("dict", "permute(0,2,3,1)"),
          "gap-and-flatten-nhwc": ("gap-and-flatten", "permute(0,2,3,1)")}


@pytest.mark.parametrize(("form", "permute"), list(MULTI.values()), ids=list(MULTI))
def test_several_outputs_come_back_in_the_same_structure(form: str, permute: str) -> None:
    model = _build(lambda: MultiHead(form, permute))
    fcn = convolutionalize(model, PERMUTED_NATIVE)
    x = _image(PERMUTED_LARGER)
    with torch.no_grad():
        out = fcn(x)
        original = model(x[..., :PERMUTED_NATIVE[0], :PERMUTED_NATIVE[1]])
    assert _structure(out) == _structure(original)
    assert all(m.dim() == 4 and tuple(m.shape[-2:]) == fcn.geometry.cells(*PERMUTED_LARGER) == (4, 3)
               for m in _tensors(out))


@pytest.mark.parametrize(("form", "permute"), list(MULTI.values()), ids=list(MULTI))
def test_several_outputs_every_map_equals_true_crops(form: str, permute: str) -> None:
    model = _build(lambda: MultiHead(form, permute))
    fcn = convolutionalize(model, PERMUTED_NATIVE)
    assert fcn.geometry.crop_equivalent
    assert max(_native_errors(model, fcn, PERMUTED_NATIVE)) < CROP_RTOL
    errors = _crop_errors(model, fcn, _image(PERMUTED_LARGER))
    assert len(errors) == len(_tensors(model(_image(PERMUTED_NATIVE))))
    assert max(errors) < CROP_RTOL, errors


# --------------------------------------------------------------------------- global-context blocks


class SqueezeExciteLinear(nn.Module):
    """SENet's block as written in most repositories: Linear layers on ``x.view(b, c)``."""

    def __init__(self, channels: int, back: str, reduction: int = 2) -> None:
        super().__init__()
        self.back = back
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        y = self.fc(self.avg_pool(x).view(b, c))
        return x * (y.view(b, c, 1, 1) if self.back == "view" else y[..., None, None])


class SqueezeExciteSizedPool(nn.Module):
    """Squeeze-excitation whose pool is ``F.avg_pool2d(x, x.size()[2:])``, as older code writes it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.gate(F.avg_pool2d(x, x.size()[2:])))


class RowGate(nn.Module):
    """A gate per row from the row's mean (``x.mean(3)``, as coordinate attention does)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.gate(x.mean(3).unsqueeze(-1)))


class EfficientChannelAttention(nn.Module):
    """ECA-Net: a Conv1d across the pooled channels, a sigmoid gate."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.avg_pool(x)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * torch.sigmoid(y).expand_as(x)


class GlobalContextBlock(nn.Module):
    """GCNet's context block: softmax attention over H*W, a weighted sum by matmul, a
    bottleneck transform of the (N, C, 1, 1) context added back to every location."""

    def __init__(self, channels: int, planes: int = 4) -> None:
        super().__init__()
        self.conv_mask = nn.Conv2d(channels, 1, 1)
        self.softmax = nn.Softmax(dim=2)
        self.channel_add = nn.Sequential(nn.Conv2d(channels, planes, 1), nn.LayerNorm([planes, 1, 1]),
                                         nn.ReLU(inplace=True), nn.Conv2d(planes, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channel, height, width = x.size()
        values = x.view(batch, channel, height * width).unsqueeze(1)  # N, 1, C, HW
        mask = self.softmax(self.conv_mask(x).view(batch, 1, height * width)).unsqueeze(-1)
        context = torch.matmul(values, mask).view(batch, channel, 1, 1)
        return x + self.channel_add(context)


class SelectiveKernel(nn.Module):
    """SKNet: 3x3 and dilated 3x3 branches stacked, summed, pooled, an MLP, softmax over
    the branches, the branches weighted and summed."""

    def __init__(self, channels: int, branches: int = 2, hidden: int = 4) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1 + i,
                                                           dilation=1 + i), nn.ReLU())
                                   for i in range(branches))
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU())
        self.fcs = nn.ModuleList(nn.Linear(hidden, channels) for _ in range(branches))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = torch.stack([conv(x) for conv in self.convs], dim=1)  # N, M, C, H, W
        z = self.fc(feats.sum(dim=1).mean((2, 3)))
        attention = torch.stack([fc(z) for fc in self.fcs], dim=1).softmax(dim=1)  # N, M, C
        return (feats * attention[..., None, None]).sum(dim=1)


class SplitAttention(nn.Module):
    """ResNeSt's split attention (radix 2): a grouped conv, the radix splits summed and
    pooled, 1x1 convs, a softmax over the splits, the splits weighted and summed."""

    def __init__(self, channels: int, radix: int = 2, hidden: int = 4) -> None:
        super().__init__()
        self.radix = radix
        self.conv = nn.Conv2d(channels, channels * radix, 3, padding=1, groups=radix)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels * radix, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        b, rc, h, w = x.shape
        x = x.reshape(b, self.radix, rc // self.radix, h, w)
        gap = x.sum(dim=1).mean((2, 3), keepdim=True)
        attention = self.fc2(F.relu(self.fc1(gap)))
        attention = attention.view(b, self.radix, -1).softmax(dim=1).reshape(b, -1, 1, 1)
        return (x * attention.reshape(b, self.radix, rc // self.radix, 1, 1)).sum(dim=1)


class ContextNet(nn.Module):
    """conv, the block, a stride-2 conv, GAP + Linear (padded or padding-free)."""

    def __init__(self, block: nn.Module, padded: bool) -> None:
        super().__init__()
        pad = int(padded)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=pad), nn.ReLU(), block,
                                  nn.Conv2d(8, 8, 3, stride=2, padding=pad), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


CONTEXT_BLOCKS = {  # block, padded, the node the global-context note names
    "se-linear-view": (lambda: SqueezeExciteLinear(8, "view"), False, "body_2_avg_pool"),
    "se-linear-none-none": (lambda: SqueezeExciteLinear(8, "none"), False, "body_2_avg_pool"),
    "se-sized-pool": (lambda: SqueezeExciteSizedPool(8), False, "avg_pool2d"),
    "row-gate": (lambda: RowGate(8), False, "mean"),
    "eca": (EfficientChannelAttention, False, "body_2_avg_pool"),
    "gcnet": (lambda: GlobalContextBlock(8), False, "matmul"),
    "selective-kernel": (lambda: SelectiveKernel(8), True, "mean"),
    "split-attention": (lambda: SplitAttention(8), True, "mean"),
}
CONTEXT_NATIVE = {False: (15, 17), True: (16, 14)}  # non-square native sizes


def _context_case(name: str) -> tuple[nn.Module, nn.Module, tuple[int, int]]:
    block, padded, _ = CONTEXT_BLOCKS[name]
    model = _build(lambda: ContextNet(block(), padded))
    size = CONTEXT_NATIVE[padded]
    return model, convolutionalize(model, size), size


@pytest.mark.parametrize("name", list(CONTEXT_BLOCKS))
def test_global_context_block_converts_exactly_at_native(name: str) -> None:
    model, fcn, size = _context_case(name)
    assert max(_native_errors(model, fcn, size)) < CROP_RTOL
    # the block's own Linears read its pooled vector and stay; the head's fc is gone
    assert [n for n in flattened_linears(fcn, size) if not n.startswith("net.body.")] == []
    assert isinstance(fcn.net.fc, nn.Conv2d)


@pytest.mark.parametrize("name", list(CONTEXT_BLOCKS))
def test_global_context_block_geometry_says_so(name: str) -> None:
    _, fcn, _ = _context_case(name)
    geometry = fcn.geometry
    assert geometry.crop_equivalent is False and geometry.receptive_field is None
    node = CONTEXT_BLOCKS[name][2]
    assert any(note.startswith("global context") and f"'{node}'" in note for note in geometry.notes), (
        geometry.notes)
    assert fcn.self_check.crop_error is None  # not compared with crops: it is not claimed


@pytest.mark.parametrize("name", list(CONTEXT_BLOCKS))
def test_global_context_block_slides_at_a_larger_non_square_size(name: str) -> None:
    """Each cell is the classifier *with context*: the head applied to a stride-1 window
    average of the body's map over the whole image (not to a crop)."""
    model, fcn, (h, w) = _context_case(name)
    size = (h + 2 * 3, w + 2 * 5)
    image = _image(size)
    with torch.no_grad():
        dense = fcn(image)
        window_mean = F.avg_pool2d(model.body(image), fcn.geometry.feature_size, stride=1)
        expected = model.fc(window_mean.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert tuple(dense.shape) == (1, 5, *fcn.geometry.cells(*size)) == (1, 5, 4, 6)
    assert rel_error(dense, expected) < CROP_RTOL


# --------------------------------------------------------------------------- mutations: a transposed map

def _transposed_plan(find_head: Callable[..., Any]) -> Callable[..., Any]:
    """``find_head`` that misreads the map's axes: height and width swapped in the layout,
    the feature size and the Linear's kernel. Self-consistent, so the native-size output
    is exact; at any other size the map comes out transposed (cols x rows)."""
    swap = str.maketrans("HW", "WH")

    def misread(*args: Any, **kwargs: Any) -> Any:
        plan = find_head(*args, **kwargs)
        feature = dataclasses.replace(plan.feature, layout=plan.feature.layout.translate(swap),
                                      size=plan.feature.size[::-1])
        steps = tuple(dataclasses.replace(s, kernel=s.kernel[::-1]) if s.op == "linear" and s.kernel
                      else s for s in plan.steps)
        return dataclasses.replace(plan, feature=feature, steps=steps)

    return misread


def _nwhc_model() -> nn.Module:
    """The non-square 8x12 map permuted to NWHC: a transposed kernel or map cannot pass."""
    return _build(lambda: PermutedNet("permute(0,3,2,1)", contiguous=True, flatten="view"))


def test_unmutated_nwhc_conversion_passes_its_self_check() -> None:
    """The sibling of the mutation tests: the honest conversion of the same model passes."""
    fcn = convolutionalize(_nwhc_model(), PERMUTED_NATIVE)
    check = fcn.self_check
    assert check.cells == fcn.geometry.cells(*check.size) and check.size[0] != check.size[1]
    assert check.crop_error is not None and check.crop_error < CROP_RTOL


def test_self_check_catches_a_transposed_map(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_model, "find_head", _transposed_plan(torch_model.find_head))
    with pytest.raises(NotConvolutionalizable,
                       match=r"at 24x34 the converted model returns a map of shape \(1, 3, 4, 3\), but "
                             r"its geometry predicts 3x4 cells; the map is transposed"):
        convolutionalize(_nwhc_model(), PERMUTED_NATIVE)


def test_the_transposed_mutant_really_is_the_transpose(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeps the mutation honest: with the larger-size check switched off, the mutant
    converts, is exact at the native size, and its map is the correct map transposed."""
    model = _nwhc_model()
    correct = convolutionalize(model, PERMUTED_NATIVE)
    monkeypatch.setattr(torch_model, "find_head", _transposed_plan(torch_model.find_head))
    monkeypatch.setattr(Reference, "check", lambda self, converted, batch=1: SelfCheck(
        self.native_error(converted(self.native_input)), (0, 0), (0, 0), None))
    mutant = convolutionalize(model, PERMUTED_NATIVE)
    assert mutant.native_error is not None and mutant.native_error < CROP_RTOL
    image = _image(PERMUTED_LARGER)
    with torch.no_grad():
        assert rel_error(mutant(image), correct(image).transpose(-1, -2)) < CROP_RTOL


class SquarePermutedNet(nn.Module):
    """``permute(0, 3, 2, 1)`` of a square 8x8 map, flattened, one Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _valid_body()
        self.fc = nn.Linear(5 * 8 * 8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).permute(0, 3, 2, 1).reshape(x.shape[0], -1))


def test_self_check_catches_a_map_left_in_width_height_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """``to_nchw`` mutated to bring an NWHC map to (N, C, W, H): the kernel (reordered for
    NCHW) now meets a transposed map; on a square map it runs, and the native check fails."""
    swap = str.maketrans("HW", "WH")
    original = torch_rewrite.to_nchw
    monkeypatch.setattr(torch_rewrite, "to_nchw",
                        lambda layout: None if layout == "NCHW" else original(layout.translate(swap)))
    square = _build(SquarePermutedNet)
    with pytest.raises(NotConvolutionalizable,
                       match=r"the rewritten model differs from the original at the "
                             r"native size \(max relative error"):
        convolutionalize(square, (20, 20))


def test_unmutated_square_nwhc_conversion_passes() -> None:
    fcn = convolutionalize(_build(SquarePermutedNet), (20, 20))
    assert fcn.native_error is not None and fcn.native_error < CROP_RTOL
    assert fcn.self_check.crop_error is not None and fcn.self_check.crop_error < CROP_RTOL


# --------------------------------------------------------------------------- reshaped logits, log-softmax


class LogitsNet(nn.Module):
    """A permuted (NWHC) flatten head whose logits are reshaped or log-softmaxed."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.body = _valid_body()
        self.fc1 = nn.Linear(5 * 8 * 12, 6)
        self.fc2 = nn.Linear(6, CLASSES)
        self.log_softmax = nn.LogSoftmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x).permute(0, 3, 2, 1).flatten(1)
        return LOGIT_FORMS[self.form](self, self.fc2(F.relu(self.fc1(f))), x.shape[0])


LogitForm = Callable[[LogitsNet, torch.Tensor, Any], torch.Tensor]
LOGIT_FORMS: dict[str, LogitForm] = {
    "view(N,classes)": lambda n, z, b: z.view(b, CLASSES),
    "view(size(0),-1)": lambda n, z, b: z.view(z.size(0), -1),
    "reshape(-1,classes)": lambda n, z, b: z.reshape(-1, CLASSES),
    "flatten(1)": lambda n, z, b: z.flatten(1),
    "log_softmax(dim=1)": lambda n, z, b: F.log_softmax(z, dim=1),
    "log_softmax(dim=-1)": lambda n, z, b: z.log_softmax(-1),
    "LogSoftmax-module": lambda n, z, b: n.log_softmax(z),
    "view-then-log_softmax": lambda n, z, b: F.log_softmax(z.view(b, -1), dim=1),
    "log_softmax-then-reshape": lambda n, z, b: F.log_softmax(z, dim=1).reshape(-1, CLASSES),
}


@pytest.mark.parametrize("form", list(LOGIT_FORMS))
def test_reshaped_logits_cells_equal_true_crops(form: str) -> None:
    model = _build(lambda: LogitsNet(form))
    fcn = convolutionalize(model, PERMUTED_NATIVE)
    assert fcn.geometry.crop_equivalent
    assert max(_native_errors(model, fcn, PERMUTED_NATIVE)) < CROP_RTOL
    image = _image(PERMUTED_LARGER)
    dense, expected = cells_and_crops(model, fcn, image)
    assert dense.shape == (12, CLASSES)
    assert rel_error(dense, expected) < CROP_RTOL
    assert flattened_linears(fcn, PERMUTED_NATIVE) == []


# --------------------------------------------------------------------------- refusals not in test_convert


class PositionalViT(nn.Module):
    """Patch tokens plus a learned position embedding, self-attention, mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.pos_embed = nn.Parameter(torch.randn(1, 16, 8) * 0.02)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos_embed
        tokens = tokens + self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return self.head(self.norm(tokens).mean(1))


class ClassTokenViT(PositionalViT):
    """A class token, a position embedding, hand-written attention, the class token's head."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, 8) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], 1) + self.pos_embed
        weights = (tokens @ tokens.transpose(1, 2) / 8 ** 0.5).softmax(-1)
        return self.head(self.norm(weights @ tokens)[:, 0])


class OutputsFromTwoMaps(nn.Module):
    """Two outputs, each pooled from a different feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3)
        self.b = nn.Conv2d(6, 6, 3, stride=2)
        self.fa = nn.Linear(6, 2)
        self.fb = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = F.relu(self.a(x))
        return self.fa(a.mean((2, 3))), self.fb(self.b(a).mean((2, 3)))


class FlattenPlusEarlierPool(OutputsFromTwoMaps):
    """One Linear over a flattened map concatenated with the max-pool of an earlier map."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6 * 7 * 7 + 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        a = F.relu(self.a(x))
        return self.fc(torch.cat([self.b(a).flatten(1), a.amax((2, 3))], 1))


class HeadBranch(nn.Module):
    """Data-dependent control flow in the head (fx cannot trace it, export cannot either)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _valid_body()
        self.fc = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.body(x).mean((2, 3))
        if v.max() > 0:
            v = v * 2
        return self.fc(v)


class ComputedWeight(nn.Module):
    """``F.linear`` on a weight (or bias) computed in forward: no fixed kernel."""

    def __init__(self, computed: str) -> None:
        super().__init__()
        self.computed = computed
        self.body = _valid_body()
        self.weight = nn.Parameter(torch.randn(5, 5))
        self.bias = nn.Parameter(torch.zeros(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.body(x).mean((2, 3))
        if self.computed == "weight":
            return F.linear(v, self.weight * 2, self.bias)
        return F.linear(v, self.weight, self.bias.tanh())


class ConstantOutput(nn.Module):
    """Runs the body, returns a Linear of a parameter (or of its batch-expanded copy)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.body = _valid_body()
        self.fc = nn.Linear(5, 5)
        self.const = nn.Parameter(torch.randn(1, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        if self.form == "ignored":
            return self.fc(self.const)
        return self.fc(self.const.expand(f.shape[0], -1))  # depends on the batch size only


REFUSALS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int], str]] = {
    "vit-position-embedding-attention": (
        PositionalViT, (16, 16), r"node 'flatten' .* reshapes the spatial map into tokens or windows"),
    "vit-class-token": (
        ClassTokenViT, (16, 16), r"node 'flatten' .* reshapes the spatial map into tokens or windows"),
    "outputs-from-two-maps": (
        OutputsFromTwoMaps, (13, 13), r"the head reads several feature maps \('b', 'relu'\)"),
    "flatten-plus-earlier-pool": (
        FlattenPlusEarlierPool, (17, 17), r"the head reads several feature maps \('b', 'relu'\)"),
    "branch-in-head": (
        HeadBranch, (20, 28), r"^torch\.fx cannot trace HeadBranch: .*; torch\.export cannot capture it "
                              r"either: "),
    "computed-weight": (
        lambda: ComputedWeight("weight"), (20, 28),
        r"head node 'linear' \(linear\): a functional linear whose weight or bias is computed"),
    "computed-bias": (
        lambda: ComputedWeight("bias"), (20, 28),
        r"head node 'linear' \(linear\): a functional linear whose weight or bias is computed"),
    "output-ignores-the-image": (
        lambda: ConstantOutput("ignored"), (20, 28),
        r"output .*does not depend on (its|the) input image"),
    "output-depends-on-batch-size-only": (
        lambda: ConstantOutput("expanded"), (20, 28),
        r"output .*does not depend on (its|the) input image"),
}


@pytest.mark.parametrize(("factory", "size", "message"), list(REFUSALS.values()), ids=list(REFUSALS))
def test_refused_with_a_named_reason(factory: Callable[[], nn.Module], size: tuple[int, int],
                                     message: str) -> None:
    with pytest.raises(NotConvolutionalizable, match=message):
        convolutionalize(_build(factory), size)


class OneConstantOutput(nn.Module):
    """Two outputs: class scores of the image, and a Linear of a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _valid_body()
        self.fc = nn.Linear(5, 5)
        self.prior = nn.Linear(5, 5)
        self.const = nn.Parameter(torch.randn(1, 5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(self.body(x).mean((2, 3))), self.prior(self.const)


def test_an_output_that_ignores_the_image_is_refused_by_name() -> None:
    """One of two outputs does not depend on the image: the refusal says so (it is not a
    misread geometry)."""
    with pytest.raises(NotConvolutionalizable, match=r"output .*does not depend on (its|the) input"):
        convolutionalize(_build(OneConstantOutput), (20, 28))


# --------------------------------------------------------------------------- code fx cannot trace


class ReadsSizeIntoInt(nn.Module):
    """``int(x.shape[-1])`` in forward (older zoo code): fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        return self.fc(f.view(f.shape[0], int(f.shape[1]), -1).mean(-1))


class UnregisteredModules(nn.Module):
    """Modules made in forward and kept in a plain list (not submodules): fx refuses them."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = [nn.Conv2d(3, 6, 3), nn.Conv2d(6, 8, 3)]  # a list, not an nn.ModuleList
        self.fc = nn.Linear(8 * 6 * 10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = nn.ReLU()(conv(x))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("cls", [ReadsSizeIntoInt, UnregisteredModules], ids=["int-of-size", "unregistered"])
def test_code_fx_cannot_trace_converts_through_torch_export(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    with pytest.raises(NotConvolutionalizable):
        from convolutionalize.frameworks.torch.graph import trace

        trace(model)
    fcn = convolutionalize(model, input_size=(10, 14))
    assert "capture: torch.export" in fcn.plan.describe()
    x = torch.randn(2, 3, 10, 14)
    with torch.no_grad():
        assert rel_error(fcn(x).flatten(1), model(x)) <= 1e-4
        big = torch.randn(1, 3, 10 + 2 * fcn.geometry.stride[0], 14 + 3 * fcn.geometry.stride[1])
        assert fcn(big).shape[-2:] == fcn.geometry.cells(*big.shape[-2:]) == (3, 4)


# --------------------------------------------------------------------------- TF "SAME" padding

def _same_padded() -> nn.Module:
    """timm's TF-"SAME" layers at stride 2 (their padding depends on the input's size) in a
    body without other padding, a flatten and a Linear (native 64x64, stride 16)."""
    layers = pytest.importorskip("timm.layers")
    pools = pytest.importorskip("timm.layers.pool2d_same")
    body = nn.Sequential(layers.Conv2dSame(3, 8, 3, 2), nn.ReLU(), pools.MaxPool2dSame(3, 2),
                         layers.StdConv2dSame(8, 8, 3, 2), nn.ReLU(), pools.AvgPool2dSame(3, 2))
    return nn.Sequential(body, nn.Flatten(), nn.Linear(8 * 4 * 4, CLASSES))


def test_same_padding_keeps_the_cells_in_place_at_any_size() -> None:
    """One more row at the bottom of an image moves no cell (only the last row sees it),
    the map has the cells the geometry counts, and tiles equal the whole image."""
    model = _build(_same_padded)
    fcn = convolutionalize(model, (64, 64))
    assert max(_native_errors(model, fcn, (64, 64))) < CROP_RTOL
    image = _image((64 + 8 * 16 + 1, 64 + 9 * 16 + 3))
    with torch.no_grad():
        even, odd = fcn(image[..., :-1, :]), fcn(image)
    assert tuple(odd.shape[-2:]) == fcn.geometry.cells(*image.shape[-2:]) == (9, 10)
    assert rel_error(odd[..., :8, :], even[..., :8, :]) < 1e-6  # was ~0.5: every cell moved
    array = (image[0].permute(1, 2, 0).numpy() * 40 + 128).clip(0, 255).astype("uint8")
    whole, tiled = cz_dense_map(fcn, array), cz_dense_map(fcn, array, tile=96)
    assert rel_error(torch.from_numpy(tiled), torch.from_numpy(whole)) < 1e-5


class StaticSamePadded(nn.Module):
    """efficientnet_pytorch's static "same" padding: an nn.ZeroPad2d module before each
    strided convolution (native 24x24, stride 8)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, 4), (4, 6), (6, 8)):
            layers += [nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c_in, c_out, 3, 2), nn.ReLU()]
        self.body, self.fc = nn.Sequential(*layers), nn.Linear(8 * 3 * 3, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def test_padding_modules_are_padding_in_the_geometry() -> None:
    """nn.ZeroPad2d is read like F.pad: the stride stays the network's (an unknown resampling
    measured 25/24 here and shrank it) and the note says padding, not unproven locality."""
    model = _build(StaticSamePadded)
    fcn = convolutionalize(model, (24, 24))
    geometry = fcn.geometry
    assert geometry.stride == (8, 8) and not geometry.crop_equivalent
    assert [n for n in geometry.notes if n.startswith("padding in")] and not [
        n for n in geometry.notes if n.startswith("locality")]
    with torch.no_grad():
        assert tuple(fcn(_image((24 + 3 * 8, 24 + 5 * 8))).shape[-2:]) == geometry.cells(48, 64) == (4, 6)
