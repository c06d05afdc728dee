"""The stem in strips: large tiles run their first layers strip by strip, to the same map."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from convolutionalize import convolutionalize, dense_map
from convolutionalize.inference._runner import TileRunner
from convolutionalize.inference._strips import StripNet, plan_strips

from conftest import rel_error


def _randomized(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize(("name", "stride", "field"), [
    ("shufflenet_v2_x0_5", 4, 7), ("resnet18", 4, 11), ("mobilenet_v2", 4, 11), ("vgg11", 4, 10)])
def test_the_stem_in_strips_gives_the_one_pass_output(name: str, stride: int, field: int) -> None:
    torch.manual_seed(0)
    native = 224 if name == "vgg11" else 64  # VGG's adaptive pool to 7x7 needs a 7x7 feature map
    fcn = convolutionalize(_randomized(torchvision.models.get_model(name, num_classes=7)), native)
    plan = plan_strips(fcn.net)
    assert plan is not None and (plan.stride, plan.field) == (stride, field)
    strips = StripNet(fcn.net, plan, min_rows=0)
    sizes = ((301, 97), (64, 64), (129, 200)) if native == 64 else ((301, 230), (224, 224))
    for size in sizes:  # odd sizes: the last strip ends at the image's edge
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = fcn.net(x)
            assert rel_error(strips(x), expected) <= 1e-6
            assert strips.strips(x).shape == strips.stem(x).shape


def test_no_stem_without_a_plain_chain_to_stride_4() -> None:
    torch.manual_seed(0)
    squeeze = convolutionalize(torchvision.models.efficientnet_b0(num_classes=3).eval(), 64)
    assert plan_strips(squeeze.net) is None  # squeeze-excitation right after the stride-2 stem

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 3, 2, 1), nn.Conv2d(3, 3, 3, 2, 1)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.head(self.b(y + y.relu()))

    assert plan_strips(convolutionalize(Residual().eval(), 16).net) is None


def test_dense_map_with_strips_equals_without(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    fcn = convolutionalize(_randomized(torchvision.models.resnet18(num_classes=5)), 64)
    image = torch.randn(3, 700, 300)  # more rows than a strip: the runner runs its stem in strips
    runs: list[str] = []
    original = StripNet.strips
    monkeypatch.setattr(StripNet, "strips", lambda self, x: runs.append("strips") or original(self, x))
    with_strips = dense_map(fcn, image)
    assert runs
    monkeypatch.setenv("CONVOLUTIONALIZE_STRIPS", "0")
    runs.clear()
    without = dense_map(fcn, image)
    assert not runs
    assert rel_error(torch.from_numpy(with_strips), torch.from_numpy(without)) <= 1e-6
    assert not isinstance(TileRunner(fcn, "fp32", torch.device("cpu"), strips=False).model.net, StripNet)
