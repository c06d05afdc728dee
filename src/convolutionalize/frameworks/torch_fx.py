"""PyTorch adapter: trace with torch.fx, find the head, rewrite it into convolutions.

The pass follows ``torch.fx.experimental.optimization.fuse``: copy the model, trace it,
propagate shapes at the native input size, analyse (``find_head`` -> HeadPlan), then
rewrite node by node (one function per step kind), ``graph.lint()``, ``recompile()``,
and check the result against the original at the native size.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import fx, nn

from ..errors import NotConvolutionalizable
from ..geometry import Geometry, PoolMode, geometry_from_plan
from ..plan import HeadPlan, HeadStep
from ..weights import linear_to_oihw
from . import _torch_graph as g
from ._torch_geometry import body_geometry
from ._torch_head import find_head, propagate_kinds
from .torch_layers import ChannelLayerNorm, ConvolutionalizedModule, WindowPool, channel_layer_norm

__all__ = ["analyse", "convolutionalize_module", "native_input_size", "rewrite"]

NATIVE_RTOL = 1e-4


def native_input_size(model: nn.Module, input_size: object) -> tuple[int, int]:
    """The model's training input size: given, or from timm's ``pretrained_cfg``."""
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return (int(cfg["input_size"][-2]), int(cfg["input_size"][-1]))
        raise ValueError(
            f"input_size is required for {type(model).__name__}: pass the native (training) "
            "input size, e.g. convolutionalize(model, input_size=(224, 224))"
        )
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"input_size must be two positive ints (height, width), got {input_size!r}")
    return (int(size[0]), int(size[1]))


def _in_channels(model: nn.Module, gm: fx.GraphModule, modules: dict[str, nn.Module],
                 input_size: tuple[int, int]) -> int:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][0])
    channels = g.first_in_channels(gm, modules, input_size)
    if channels is None:
        raise NotConvolutionalizable(
            f"cannot tell how many image channels {type(model).__name__} takes: it has no "
            "Conv2d and its first Linear does not divide by the input area"
        )
    return channels


class Analysis:
    """A traced private copy of the model, its shapes at the native size, and its plan."""

    def __init__(self, model: nn.Module, input_size: tuple[int, int]) -> None:
        private = copy.deepcopy(model).eval()
        self.gm = g.trace(private)
        self.modules = dict(self.gm.named_modules())
        self.in_channels = _in_channels(model, self.gm, self.modules, input_size)
        param = next(private.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        gen = torch.Generator().manual_seed(0)
        self.example = torch.randn(1, self.in_channels, *input_size, generator=gen).to(device, dtype)
        try:
            self.expected = g.propagate_shapes(self.gm, self.example)
        except Exception as exc:
            raise NotConvolutionalizable(
                f"{type(model).__name__} does not run at the native input size "
                f"{input_size[0]}x{input_size[1]}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
            ) from exc
        self.values = propagate_kinds(self.gm, self.modules)
        self.plan = find_head(self.gm, self.values, self.modules, input_size, self.in_channels)
        self.nodes = {n.name: n for n in self.gm.graph.nodes}

    def geometry(self, pool: PoolMode) -> Geometry:
        feature = self.nodes[self.plan.feature.node]
        body = body_geometry(self.gm, self.values, feature, self.modules, g.ancestors(feature))
        return geometry_from_plan(self.plan, pool, body)


# --------------------------------------------------------------------------- rewriting

Rewriter = Callable[["_Rewrite", fx.Node, HeadStep], None]


class _Rewrite:
    """Applies a HeadPlan to the traced graph, one registered function per step kind."""

    def __init__(self, gm: fx.GraphModule, plan: HeadPlan, pool: PoolMode) -> None:
        self.gm, self.plan, self.pool = gm, plan, pool
        self.modules = dict(gm.named_modules())
        self.feature = next(n for n in gm.graph.nodes if n.name == plan.feature.node)
        self.counter = 0

    def add_module(self, module: nn.Module) -> str:
        name = f"convolutionalize_{self.counter}"
        self.counter += 1
        self.gm.add_submodule(name, module)
        return name

    def swap(self, node: fx.Node, target: str) -> None:
        """Replace ``node`` by a call of module ``target`` on its first input."""
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(target, (node.args[0],))
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)

    def bypass(self, node: fx.Node) -> None:
        node.replace_all_uses_with(node.args[0])
        self.gm.graph.erase_node(node)


def _global_pool(rw: _Rewrite, node: fx.Node, step: HeadStep) -> None:
    kernel = rw.plan.feature.size if rw.pool == "window" else None
    assert step.reduce is not None
    pool = WindowPool(step.reduce, kernel, channels_last_input=rw.plan.feature.layout == "NHWC")
    node.args = (rw.feature, *node.args[1:])
    rw.swap(node, rw.add_module(pool))


def _adaptive_pool(rw: _Rewrite, node: fx.Node, step: HeadStep) -> None:
    assert step.pool_to is not None
    (fh, fw), (kh, kw) = rw.plan.feature.size, step.pool_to
    if (fh, fw) == (kh, kw):
        rw.bypass(node)
        return
    kernel = (fh // kh, fw // kw)
    fixed = nn.MaxPool2d(kernel, kernel) if step.reduce == "max" else nn.AvgPool2d(kernel, kernel)
    rw.swap(node, rw.add_module(fixed))


def _flatten(rw: _Rewrite, node: fx.Node, step: HeadStep) -> None:
    source = node.args[0]
    if rw.plan.feature.layout == "NHWC" and rw.plan.global_pooling is False:
        with rw.gm.graph.inserting_after(node):
            permuted = rw.gm.graph.call_method("permute", (source, 0, 3, 1, 2))
        node.replace_all_uses_with(permuted)
        rw.gm.graph.erase_node(node)
        return
    rw.bypass(node)


def _linear(rw: _Rewrite, node: fx.Node, step: HeadStep) -> None:
    linear = rw.modules[str(node.target)]
    assert isinstance(linear, nn.Linear) and step.kernel is not None
    kh, kw = step.kernel
    channels = linear.in_features // (kh * kw)
    conv = nn.Conv2d(channels, linear.out_features, (kh, kw), bias=linear.bias is not None)
    conv = conv.to(device=linear.weight.device, dtype=linear.weight.dtype)
    layout = "HWC" if rw.plan.feature.layout == "NHWC" and step.kernel != (1, 1) else "CHW"
    weight = linear.weight.detach()
    kernel = linear_to_oihw(weight.cpu().float().numpy() if weight.dtype == torch.bfloat16
                            else weight.cpu().numpy(), channels, kh, kw, layout)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    g.replace_module(rw.gm, str(node.target), conv)


def _batchnorm(rw: _Rewrite, node: fx.Node, step: HeadStep) -> None:
    bn1d = rw.modules[str(node.target)]
    assert isinstance(bn1d, nn.BatchNorm1d)
    bn2d = nn.BatchNorm2d(bn1d.num_features, bn1d.eps, bn1d.momentum, bn1d.affine,
                          bn1d.track_running_stats)
    bn2d.load_state_dict(bn1d.state_dict())
    g.replace_module(rw.gm, str(node.target), bn2d.to(next(bn1d.buffers()).device).eval())


def _layernorm(rw: _Rewrite, node: fx.Node, step: HeadStep) -> None:
    if node.op == "call_module":
        norm = rw.modules[str(node.target)]
        assert isinstance(norm, nn.LayerNorm)
        g.replace_module(rw.gm, str(node.target), ChannelLayerNorm.from_layer_norm(norm))
    else:
        node.target = channel_layer_norm


def _set_dim(node: fx.Node, index: int, value: int = 1) -> None:
    if "dim" in node.kwargs:
        node.kwargs = {**node.kwargs, "dim": value}
    else:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)


def _softmax(rw: _Rewrite, node: fx.Node, step: HeadStep) -> None:
    if node.op == "call_module":
        module = rw.modules[str(node.target)]
        g.replace_module(rw.gm, str(node.target), type(module)(dim=1))
    else:
        _set_dim(node, 1)


def _concat(rw: _Rewrite, node: fx.Node, step: HeadStep) -> None:
    _set_dim(node, 1)


REWRITES: dict[str, Rewriter] = {
    "global_pool": _global_pool,
    "adaptive_pool": _adaptive_pool,
    "flatten": _flatten,
    "linear": _linear,
    "batchnorm": _batchnorm,
    "layernorm": _layernorm,
    "softmax": _softmax,
    "concat": _concat,
    "keep": lambda rw, node, step: None,
}


def rewrite(gm: fx.GraphModule, plan: HeadPlan, pool: PoolMode) -> fx.GraphModule:
    """Rewrite the head of ``gm`` (in place: ``gm`` is the adapter's private copy)."""
    if pool == "global" and plan.global_pooling:
        return gm  # a global-pool head already runs at any size: nothing to change
    rw = _Rewrite(gm, plan, "window" if pool == "global" else pool)
    nodes = {n.name: n for n in gm.graph.nodes}
    for step in plan.steps:
        REWRITES[step.op](rw, nodes[step.node], step)
    if pool == "global":  # flatten head: the mean of the window map
        output = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(output):
            mean = gm.graph.call_method("mean", (output.args[0], (2, 3)))
        output.args = (mean,)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


# --------------------------------------------------------------------------- entry point


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (float64)."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def analyse(model: nn.Module, input_size: object = None) -> Analysis:
    """Trace ``model`` and find its head, without changing anything."""
    return Analysis(model, native_input_size(model, input_size))


def convolutionalize_module(model: nn.Module, input_size: object = None,
                            pool: PoolMode = "window") -> ConvolutionalizedModule:
    """Convert a PyTorch classifier; see :func:`convolutionalize.convolutionalize`."""
    analysis = analyse(model, input_size)
    geometry = analysis.geometry(pool)
    net = rewrite(analysis.gm, analysis.plan, pool)
    with torch.no_grad():
        out = net(analysis.example)
    error = _native_error(out, analysis.expected, analysis.plan, geometry.pool)
    if error is not None and error > NATIVE_RTOL:
        raise NotConvolutionalizable(
            f"the rewritten {type(model).__name__} differs from the original at the native size "
            f"(max relative error {error:.2e}); a head operation has no exact sliding form"
        )
    return ConvolutionalizedModule(net, geometry, analysis.plan, error).eval()


def _native_error(out: torch.Tensor, expected: torch.Tensor, plan: HeadPlan,
                  pool: PoolMode) -> float | None:
    """Native-size agreement: the 1x1 window map (or global output) equals the logits;
    with pool='none' the mean of the map does when the head is affine."""
    if pool == "window":
        if out.shape[-2:] != (1, 1):
            raise NotConvolutionalizable(f"at the native size the map is {tuple(out.shape[-2:])},"
                                         " not 1x1; the head's geometry was misread")
        return relative_error(out.flatten(1), expected)
    if pool == "global":
        return relative_error(out, expected)
    affine = all(s.op in ("global_pool", "flatten", "linear", "batchnorm") or (
        s.op == "keep" and "ropout" in s.detail) for s in plan.steps)
    avg = all(s.reduce != "max" for s in plan.steps_of("global_pool"))
    return relative_error(out.mean((2, 3)), expected) if affine and avg else None
