"""Property test: random padding-free CNN classifiers, every head form, equal on true crops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from convolutionalize import convolutionalize

from conftest import cells_and_crops, flattened_linears, rel_error

FLATTEN_FORMS = ["nn.Flatten", "torch.flatten", "view", "reshape"]
POOL_FORMS = ["mean", "mean-keepdim", "adaptive_avg_pool2d", "AdaptiveMaxPool2d", "amax",
              "AdaptiveAvgPool2d-squeeze"]
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tensor.relu": lambda x: x.relu(),
               "hardswish": F.hardswish, "none": lambda x: x}


class RandomClassifier(nn.Module):
    def __init__(self, body: nn.Sequential, form: str, pre: nn.Sequential, act: str,
                 post: nn.Sequential) -> None:
        super().__init__()
        self.body, self.form, self.pre, self.act, self.post = body, form, pre, act, post
        self.flatten = nn.Flatten()
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pool_flatten(self, self.body(x), self.form)
        x = self.pre(x)
        x = ACTIVATIONS[self.act](x)
        return self.post(x)


def _pool_flatten(net: RandomClassifier, x: torch.Tensor, form: str) -> torch.Tensor:
    """The head forms users write between the last map and the first Linear."""
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
    native = (draw(st.integers(10, 20)), draw(st.integers(10, 20)))
    try:
        with torch.no_grad():
            feature = body(torch.zeros(1, channels, *native)).shape
    except RuntimeError:  # the random body shrinks the native input to nothing
        assume(False)
    form = draw(st.sampled_from(FLATTEN_FORMS + POOL_FORMS))
    flat = form in FLATTEN_FORMS
    assume(not flat or feature[2] * feature[3] <= 36)
    width = c * feature[2] * feature[3] if flat else c
    hidden = draw(st.integers(3, 8))
    pre: list[nn.Module] = []
    if not flat and draw(st.booleans()):
        norm = draw(st.sampled_from(["bn", "ln"]))
        pre.append(nn.BatchNorm1d(width) if norm == "bn" else nn.LayerNorm(width))
        if norm == "bn":
            pre[-1].running_mean.uniform_(-0.5, 0.5)  # type: ignore[operator]
    pre += [nn.Dropout(0.3), nn.Linear(width, hidden)]
    post: list[nn.Module] = [draw(st.sampled_from([nn.ReLU(), nn.Identity(), nn.Hardswish()]))]
    if draw(st.booleans()):
        post += [nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
    post.append(nn.Linear(hidden, draw(st.integers(2, 5))))
    model = RandomClassifier(body, form, nn.Sequential(*pre),
                             draw(st.sampled_from(sorted(ACTIVATIONS))), nn.Sequential(*post))
    return model.eval(), native, channels


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
        assert tuple(fcn(image).shape[-2:]) == geo.cells(*size)
    dense, expected = cells_and_crops(model, fcn, image)
    assert rel_error(dense, expected) < 1e-4
