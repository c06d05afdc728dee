"""The CPU fast path: convolutions with packed weights and fused ReLU / residual adds (oneDNN).

The rewrite must never change what a model computes: the reference is the unrewritten graph,
and float32 clamps and adds fused as post-ops are the same roundings (equal bit for bit);
SiLU is oneDNN's own (relative 1e-6).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from convolutionalize import convolutionalize
from convolutionalize.inference import _onednn, _runner
from convolutionalize.inference._onednn import FusedConv, fuse_convolutions

from conftest import fingerprint, rel_error


class Block(nn.Module):
    """What the pass sees in real networks: conv-ReLU, a residual add then a shared ReLU
    (torchvision's BasicBlock), ReLU6, SiLU, F.relu, a depthwise conv, a conv without bias,
    a conv called twice (weight sharing: left alone) and a broadcast residual (runs unfused)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.six = nn.ReLU6()
        self.c = nn.Conv2d(8, 8, 1)
        self.silu = nn.SiLU()
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 8, 3, stride=2, dilation=2, padding=2)
        self.gate = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        x = self.relu(self.a(x) + x)
        x = self.six(self.b(x))
        x = self.silu(self.c(x))
        x = F.relu(self.shared(self.shared(x)))
        return self.d(x) + self.gate


def rewritten(model: nn.Module) -> tuple[fx.GraphModule, int]:
    graph_module = fx.symbolic_trace(copy.deepcopy(model))
    return graph_module, fuse_convolutions(graph_module)


def test_fusion_rewrites_the_graph_and_keeps_the_values() -> None:
    torch.manual_seed(0)
    model = Block().eval()
    before = fingerprint(model)
    graph_module, count = rewritten(model)
    fused = {name: m for name, m in graph_module.named_modules() if isinstance(m, FusedConv)}
    assert count == len(fused) == 5  # all but the shared conv
    assert fused["a"].residual and isinstance(fused["a"].activation, nn.ReLU)
    assert isinstance(fused["stem"].activation, nn.ReLU) and not fused["stem"].residual
    assert isinstance(fused["b"].activation, nn.ReLU6) and isinstance(fused["c"].activation, nn.SiLU)
    assert fused["d"].residual  # the gate: broadcast, so it runs unfused (checked by value below)
    assert type(graph_module.shared) is nn.Conv2d
    with torch.inference_mode():
        channels_last = torch.randn(1, 3, 9, 40).contiguous(memory_format=torch.channels_last)
        for x in (torch.randn(2, 3, 23, 29), channels_last):
            assert rel_error(graph_module(x), model(x)) < 1e-6
    assert fingerprint(model) == before


def test_clamps_and_adds_are_exact_in_float32() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU6()).eval()
    graph_module, count = rewritten(model)
    assert count == 2
    x = torch.randn(3, 3, 31, 17)
    with torch.inference_mode():
        assert torch.equal(graph_module(x), model(x))


def test_packed_weights_are_kept_per_input_shape_and_dropped_on_pickle() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    graph_module, _ = rewritten(model)
    conv = graph_module.get_submodule("0")
    with torch.inference_mode():
        for size in range(10, 10 + _onednn.PACKED_SHAPES + 2):
            graph_module(torch.randn(1, 3, size, size))
        assert len(conv._packed) == _onednn.PACKED_SHAPES  # oldest shapes dropped
        x = torch.randn(2, 3, 12, 12)
        copy_ = pickle.loads(pickle.dumps(graph_module))
        assert copy_.get_submodule("0")._packed == {}
        assert torch.equal(copy_(x), graph_module(x))


def test_a_failing_fused_op_falls_back_to_the_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    graph_module, _ = rewritten(model)

    def unavailable(self: FusedConv, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        raise RuntimeError("no bf16 support on this CPU")

    monkeypatch.setattr(FusedConv, "_fused", unavailable)
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(graph_module(x), model(x))
    assert not graph_module.get_submodule("0")._usable


def test_cpu_runners_fuse_and_match_the_converted_model() -> None:
    import torchvision

    torch.manual_seed(4)
    fcn = convolutionalize(torchvision.models.resnet18(num_classes=7).eval(), (64, 64))
    x = torch.randn(2, 3, 96, 80)
    with torch.inference_mode():
        expected = fcn(x)
    fp32 = _runner.TileRunner(fcn, "fp32", torch.device("cpu"))
    convs = [m for m in fp32.model.modules() if isinstance(m, FusedConv)]
    assert len(convs) == 21 and sum(m.residual for m in convs) == 8
    assert rel_error(torch.from_numpy(fp32(x)), expected) < 1e-5
    bf16 = _runner.TileRunner(fcn, "bf16", torch.device("cpu"))
    assert rel_error(torch.from_numpy(bf16(x)), expected) < 2e-2


def test_the_environment_switch_turns_fusion_off(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    fcn = convolutionalize(model, (8, 8))
    cpu = torch.device("cpu")
    assert any(isinstance(m, FusedConv) for m in _runner.runner_for(fcn, "fp32", cpu).model.modules())
    monkeypatch.setenv("CONVOLUTIONALIZE_FUSION", "0")
    plain = _runner.runner_for(fcn, "fp32", cpu)
    assert not any(isinstance(m, FusedConv) for m in plain.model.modules())
    x = torch.randn(1, 3, 20, 20)
    with torch.inference_mode():
        assert rel_error(torch.from_numpy(plain(x)), fcn(x)) < 1e-6
