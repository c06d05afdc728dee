"""Rewrite a traced PyTorch head into convolutions, one registered function per HeadStep kind.

Follows ``torch.fx.experimental.optimization.fuse``: swap modules via their parent, replace
uses, erase nodes, then ``graph.lint()`` and ``recompile()``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import fx, nn

from ...geometry import PoolMode
from ...plan import HeadPlan, HeadStep
from ...weights import linear_to_oihw
from . import graph as g
from .layers import ChannelLayerNorm, WindowCells, WindowPool, channel_layer_norm
from .pt2e import dequantized_weight, pt2e_conv_from_linear
from .quantized import is_quantized_linear, quantized_conv_from_linear

__all__ = ["REWRITES", "crop_to_windows", "rewrite"]

Rewriter = Callable[["_Rewrite", fx.Node, HeadStep], None]


class _Rewrite:
    """Applies a HeadPlan to the traced graph, one registered function per step kind."""

    def __init__(self, gm: fx.GraphModule, plan: HeadPlan, pool: PoolMode,
                 dilation: tuple[int, int] = (1, 1)) -> None:
        self.gm, self.plan, self.pool, self.dilation = gm, plan, pool, dilation
        self.modules = dict(gm.named_modules())
        self.feature = next(n for n in gm.graph.nodes if n.name == plan.feature.node)
        self.counter = 0

    def add_module(self, module: nn.Module) -> str:
        name = self.new_name()
        self.gm.add_submodule(name, module)
        return name

    def new_name(self) -> str:
        """A fresh name for an added submodule or buffer."""
        name = f"convolutionalize_{self.counter}"
        self.counter += 1
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


def to_nchw(layout: str) -> tuple[int, int, int, int] | None:
    """The permutation that brings a map of ``layout`` (e.g. ``"NWHC"``) to NCHW; None for NCHW."""
    return None if layout == "NCHW" else tuple(layout.index(a) for a in "NCHW")  # type: ignore[return-value]


def _global_pool(rw: _Rewrite, node: fx.Node, step: HeadStep) -> None:
    kernel = rw.plan.feature.size if rw.pool == "window" else None
    assert step.reduce is not None
    pool = WindowPool(step.reduce, kernel, permute=to_nchw(rw.plan.feature.layout), dilation=rw.dilation)
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
    """The flatten goes; a map in another axis order is brought to NCHW in its place (the
    Linear's kernel is reordered to match), so the map's rows follow the image's height."""
    permutation = to_nchw(rw.plan.feature.layout)
    if permutation is not None and node.args[0] is rw.feature:  # (a pooled map is NCHW already)
        with rw.gm.graph.inserting_after(node):
            permuted = rw.gm.graph.call_method("permute", (node.args[0], *permutation))
        node.replace_all_uses_with(permuted)
        rw.gm.graph.erase_node(node)
        return
    rw.bypass(node)


def _linear(rw: _Rewrite, node: fx.Node, step: HeadStep) -> None:
    """nn.Linear, F.linear or aten.linear on parameters -> Conv2d with the kernel reordered;
    a quantized Linear -> the quantized Conv2d with the same integers (:mod:`.quantized`); a
    pt2e linear on a dequantized int8 weight -> conv2d on the same integers (:mod:`.pt2e`)."""
    assert step.kernel is not None
    module = rw.modules[str(node.target)] if node.op == "call_module" else None
    if is_quantized_linear(module):
        layout = rw.plan.feature.layout[1:] if step.kernel != (1, 1) else "CHW"
        dilation = rw.dilation if step.kernel != (1, 1) else (1, 1)
        g.replace_module(rw.gm, str(node.target), quantized_conv_from_linear(
            module, step.kernel, layout, dilation))  # type: ignore[arg-type]
        return
    if module is None and dequantized_weight(g.arg(node, 1, "weight")) is not None:
        layout = rw.plan.feature.layout[1:] if step.kernel != (1, 1) else "CHW"
        dilation = rw.dilation if step.kernel != (1, 1) else (1, 1)
        pt2e_conv_from_linear(rw.gm, node, step.kernel, layout, dilation, rw.new_name())
        return
    if isinstance(module, nn.Linear):
        weight, bias = module.weight.detach(), module.bias
    else:
        weight = g.attr(rw.gm, g.arg(node, 1, "weight")).detach()
        bias_node = g.arg(node, 2, "bias")
        bias = None if bias_node is None else g.attr(rw.gm, bias_node)
    kh, kw = step.kernel
    out_features, in_features = weight.shape
    channels = in_features // (kh * kw)
    dilation = rw.dilation if step.kernel != (1, 1) else (1, 1)
    conv = nn.Conv2d(channels, out_features, (kh, kw), bias=bias is not None, dilation=dilation)
    conv = conv.to(device=weight.device, dtype=weight.dtype)
    layout = rw.plan.feature.layout[1:] if step.kernel != (1, 1) else "CHW"
    kernel = linear_to_oihw(weight.cpu().float().numpy() if weight.dtype == torch.bfloat16
                            else weight.cpu().numpy(), channels, kh, kw, layout)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
        if bias is not None:
            conv.bias.copy_(bias)
    if module is not None:
        g.replace_module(rw.gm, str(node.target), conv)
    else:
        rw.swap(node, rw.add_module(conv))


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
    else:  # F.layer_norm or aten.layer_norm (which has a trailing cudnn_enable)
        node.target = channel_layer_norm
        node.args = node.args[:5]


def _set_dim(node: fx.Node, index: int, value: int = 1) -> None:
    if "dim" in node.kwargs:
        node.kwargs = {**node.kwargs, "dim": value}
    else:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)


def _softmax(rw: _Rewrite, node: fx.Node, step: HeadStep) -> None:
    if node.op == "call_module":
        module = copy.copy(rw.modules[str(node.target)])  # a quantized Softmax keeps its scale
        module.dim = 1
        g.replace_module(rw.gm, str(node.target), module)
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
    "reshape": lambda rw, node, step: rw.bypass(node),
    "keep": lambda rw, node, step: None,
}


def rewrite(gm: fx.GraphModule, plan: HeadPlan, pool: PoolMode,
            dilation: tuple[int, int] = (1, 1)) -> fx.GraphModule:
    """Rewrite the head of ``gm`` (in place: ``gm`` is the adapter's private copy); a
    ``dilation`` > 1 (an output stride below the network's) spreads the taps of the window
    pool and of the first HxW convolution."""
    if pool == "global" and plan.global_pooling:
        return gm  # a global-pool head already runs at any size: nothing to change
    rw = _Rewrite(gm, plan, "window" if pool == "global" else pool, dilation)
    nodes = {n.name: n for n in gm.graph.nodes}
    for step in plan.steps:
        REWRITES[step.op](rw, nodes[step.node], step)
    if pool == "global":  # flatten head: the mean of each window map
        output = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(output):
            output.args = fx.node.map_arg(output.args,
                                          lambda n: gm.graph.call_method("mean", (n, (2, 3))))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def crop_to_windows(gm: fx.GraphModule, window: tuple[int, int], stride: tuple[int, int]) -> None:
    """Cut every output map to the cells whose window lies inside the image (see WindowCells)."""
    image = next(n for n in gm.graph.nodes if n.op == "placeholder")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    gm.add_submodule("convolutionalize_cells", WindowCells(window, stride))
    with gm.graph.inserting_before(output):
        output.args = fx.node.map_arg(
            output.args, lambda n: gm.graph.call_module("convolutionalize_cells", (n, image)))
    gm.graph.lint()
    gm.recompile()
