"""Property test: random padding-free CNN classifiers, every head form, equal on true crops.

The random nets have non-square native sizes, any axis permutation before a flatten, and
one to three outputs (a softmax on one of them) after a shared hidden layer: every output's
map must have the predicted cells and equal the original on each cell's true crop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from convolutionalize import NotConvolutionalizable, convolutionalize

from conftest import cells_and_crops, flattened_linears, rel_error

FLATTEN_FORMS = ["nn.Flatten", "torch.flatten", "view", "reshape"]
POOL_FORMS = ["mean", "mean-keepdim", "adaptive_avg_pool2d", "AdaptiveMaxPool2d", "amax",
              "AdaptiveAvgPool2d-squeeze", "nhwc-mean"]
PERMUTATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda x: x,
    "permute(0,2,3,1)": lambda x: x.permute(0, 2, 3, 1),
    "permute(0,3,2,1)": lambda x: x.permute(0, 3, 2, 1),
    "transpose(2,3)": lambda x: x.transpose(2, 3),
    "transpose(-1,-2)": lambda x: x.transpose(-1, -2),
}
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tensor.relu": lambda x: x.relu(),
               "hardswish": F.hardswish, "none": lambda x: x}


class RandomClassifier(nn.Module):
    """body -> pool or (permute, contiguous) flatten -> pre -> act -> one ``post`` per output,
    a softmax over classes on output ``softmax``; several outputs come back as a tuple."""

    def __init__(self, body: nn.Sequential, form: str, permute: tuple[str, bool], pre: nn.Sequential,
                 act: str, posts: list[nn.Sequential], softmax: int | None) -> None:
        super().__init__()
        self.body, self.form, self.pre, self.act = body, form, pre, act
        self.permute, self.contiguous = permute
        self.posts, self.softmax = nn.ModuleList(posts), softmax
        self.flatten = nn.Flatten()
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = self.body(x)
        if self.form in FLATTEN_FORMS:
            x = PERMUTATIONS[self.permute](x)
            x = x.contiguous() if self.contiguous else x
        x = _pool_flatten(self, x, self.form)
        x = self.pre(x)
        x = ACTIVATIONS[self.act](x)
        outs = [post(x) for post in self.posts]
        if self.softmax is not None:
            outs[self.softmax] = F.softmax(outs[self.softmax], dim=1)
        return outs[0] if len(outs) == 1 else tuple(outs)


class Output(nn.Module):
    """Output ``index`` of a model with one or several outputs, with the model's geometry
    (if converted), so that ``cells_and_crops`` checks one output at a time."""

    def __init__(self, net: nn.Module, index: int) -> None:
        super().__init__()
        self.net, self.index = net, index
        self.geometry = getattr(net, "geometry", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out if isinstance(out, torch.Tensor) else out[self.index]


def _pool_flatten(net: RandomClassifier, x: torch.Tensor, form: str) -> torch.Tensor:
    """The head forms users write between the last map and the first Linear."""
    if form == "nhwc-mean":
        return x.permute(0, 2, 3, 1).mean((1, 2))
    if form == "nn.Flatten":
        return net.flatten(x)
    if form == "torch.flatten":
        return torch.flatten(x, 1)
    if form == "view":
        return x.view(x.size(0), -1)
    if form == "reshape":
        return x.reshape(x.shape[0], -1)
    if form == "mean":
        return x.mean((2, 3))
    if form == "mean-keepdim":
        return x.mean(dim=(-2, -1), keepdim=True).flatten(1)
    if form == "adaptive_avg_pool2d":
        return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
    if form == "AdaptiveMaxPool2d":
        return net.max_pool(x).squeeze(-1).squeeze(-1)
    if form == "amax":
        return x.amax((2, 3))
    if form == "AdaptiveAvgPool2d-squeeze":
        return net.avg_pool(x).view(-1, x.shape[1])
    raise AssertionError(form)


@st.composite
def classifiers(draw: st.DrawFn) -> tuple[RandomClassifier, tuple[int, int], int]:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    channels = draw(st.integers(1, 3))
    layers: list[nn.Module] = []
    c = channels
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(2, 6))
        k = draw(st.integers(1, 3))
        layers.append(nn.Conv2d(c, out, k, stride=draw(st.integers(1, 2)),
                                dilation=draw(st.integers(1, 2)) if k > 1 else 1))
        if draw(st.booleans()):
            bn = nn.BatchNorm2d(out)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            layers.append(bn)
        layers.append(draw(st.sampled_from([nn.ReLU(), nn.GELU(), nn.SiLU(), nn.Tanh()])))
        if draw(st.booleans()):
            layers.append(draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2),
                                                nn.MaxPool2d(3, stride=1)])))
        c = out
    body = nn.Sequential(*layers).eval()
    height = draw(st.integers(10, 20))
    native = (height, 10 + (height - 10 + draw(st.integers(1, 10))) % 11)  # non-square, 10..20
    try:
        with torch.no_grad():
            feature = body(torch.zeros(1, channels, *native)).shape
    except RuntimeError:  # the random body shrinks the native input to nothing
        assume(False)
    form = draw(st.sampled_from(FLATTEN_FORMS + POOL_FORMS))
    flat = form in FLATTEN_FORMS
    assume(not flat or feature[2] * feature[3] <= 36)
    permute = draw(st.sampled_from(sorted(PERMUTATIONS))) if flat else "none"
    # PyTorch cannot ``view`` a permuted, non-contiguous map: such a model does not run
    contiguous = (form == "view" and permute != "none") or draw(st.booleans())
    width = c * feature[2] * feature[3] if flat else c
    hidden = draw(st.integers(3, 8))
    pre: list[nn.Module] = []
    if not flat and draw(st.booleans()):
        norm = draw(st.sampled_from(["bn", "ln"]))
        pre.append(nn.BatchNorm1d(width) if norm == "bn" else nn.LayerNorm(width))
        if norm == "bn":
            pre[-1].running_mean.uniform_(-0.5, 0.5)  # type: ignore[operator]
    pre += [nn.Dropout(0.3), nn.Linear(width, hidden)]
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    posts = [_post(draw, hidden) for _ in range(draw(st.sampled_from([1, 2, 3])))]
    softmax = draw(st.integers(0, len(posts) - 1)) if len(posts) > 1 else None
    model = RandomClassifier(body, form, (permute, contiguous), nn.Sequential(*pre), act, posts,
                             softmax)
    return model.eval(), native, channels


def _post(draw: st.DrawFn, hidden: int) -> nn.Sequential:
    """One output's head after the shared hidden layer."""
    post: list[nn.Module] = [draw(st.sampled_from([nn.ReLU(), nn.Identity(), nn.Hardswish()]))]
    if draw(st.booleans()):
        post += [nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
    post.append(nn.Linear(hidden, draw(st.integers(2, 5))))
    return nn.Sequential(*post)


@settings(max_examples=60)
@given(classifiers(), st.integers(1, 3), st.integers(0, 2))
def test_random_padding_free_classifiers_equal_their_crops(
    case: tuple[RandomClassifier, tuple[int, int], int], extra_y: int, extra_x: int
) -> None:
    model, native, channels = case
    fcn = convolutionalize(model, native)
    geo = fcn.geometry
    assert geo.crop_equivalent, geo.notes
    assert geo.window == native
    assert flattened_linears(fcn, native, channels) == []
    size = (native[0] + extra_y * geo.stride[0], native[1] + extra_x * geo.stride[1])
    image = torch.randn(1, channels, *size)
    with torch.no_grad():
        out, original = fcn(image), model(image[..., :native[0], :native[1]])
    assert type(out) is type(original)
    maps = [out] if isinstance(out, torch.Tensor) else list(out)
    assert len(maps) == len(model.posts)
    assert all(tuple(m.shape[-2:]) == geo.cells(*size) for m in maps)
    for index in range(len(maps)):
        dense, expected = cells_and_crops(Output(model, index), Output(fcn, index), image)
        assert rel_error(dense, expected) < 1e-4, f"output {index}"


@settings(max_examples=25)
@given(classifiers(), st.integers(1, 2), st.integers(1, 3))
def test_random_padding_free_classifiers_at_every_output_stride_equal_their_crops(
    case: tuple[RandomClassifier, tuple[int, int], int], extra_y: int, extra_x: int
) -> None:
    """At every output stride the strided layers allow (1 always is), each output's map has the
    predicted cells and every cell equals the original on its true crop."""
    model, native, channels = case
    network = convolutionalize(model, native).geometry.stride
    assume(network[0] == network[1])
    strides = [s for s in range(1, network[0] + 1) if network[0] % s == 0]
    converted = 0
    for s in strides:
        try:
            fcn = convolutionalize(model, native, output_stride=s)
        except NotConvolutionalizable as error:
            assert "is not possible" in str(error) and s != 1, str(error)
            continue
        converted += 1
        geo = fcn.geometry
        assert geo.stride == (s, s) and geo.window == native and geo.crop_equivalent
        size = (native[0] + extra_y * network[0], native[1] + extra_x * network[1])
        image = torch.randn(1, channels, *size)
        with torch.no_grad():
            out = fcn(image)
        maps = [out] if isinstance(out, torch.Tensor) else list(out)
        assert all(tuple(m.shape[-2:]) == geo.cells(*size) for m in maps)
        for index in range(len(maps)):
            dense, expected = cells_and_crops(Output(model, index), Output(fcn, index), image)
            assert rel_error(dense, expected) < 1e-4, f"output {index} at output stride {s}"
    assert converted >= (2 if network[0] > 1 else 1)  # the network stride and 1
