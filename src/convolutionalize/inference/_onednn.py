"""The CPU fast path: oneDNN convolutions with weights packed once, ReLU and residual adds fused.

Eager PyTorch reorders every convolution's weights into oneDNN's blocked layout on every call
(8-10 % of a bfloat16 ResNet-18 pass at 768x768 on this machine) and runs each ReLU and each
residual add as one more pass over the activations. :func:`fuse_convolutions` rewrites a traced
body (``torch.fx``) so that each ``nn.Conv2d`` runs oneDNN's fused convolution
(``torch.ops.mkldnn._convolution_pointwise``, the op torch.compile's Inductor emits on CPU)
with its weights packed once per process, the residual add that consumes it and the ReLU /
ReLU6 / Hardtanh / SiLU that follows it done as post-ops on the accumulator. Measured side by
side (``benchmarks/dense.py --unfused``): see the README's benchmark section.

In float32 the fused clamps and adds give the unfused results bit for bit (the same
roundings), SiLU to relative 1e-6 (oneDNN's own); in bfloat16 the fused results are slightly
closer to float32 (the add is done before the rounding). Wherever the fused op does not apply
at run time (another dtype or shape of the residual, another device, a CPU or build without
the op), the module runs its original layers instead. ``CONVOLUTIONALIZE_FUSION=0`` in the
environment leaves models unrewritten (see ``runner_for``).
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["FusedConv", "fuse_convolutions"]

logger = logging.getLogger(__name__)

PACKED_SHAPES = 4  # input shapes a convolution keeps packed weights for (a map's tiles have few)
_ADDS = (operator.add, torch.add)
_RELU_FUNCTIONS = (F.relu, torch.relu)


class FusedConv(nn.Module):
    """``activation(conv(x) [+ residual])`` as one oneDNN convolution with packed weights."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.activation: nn.Module | None = None
        self.residual = False
        self._packed: dict[tuple[int, ...], torch.Tensor] = {}  # oneDNN-layout weights per input shape
        self._usable = True

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        conv = self.conv
        if x.dtype != conv.weight.dtype:  # as autocast would cast for a convolution
            x = x.to(conv.weight.dtype)
        if self._usable and x.device.type == "cpu" and self._fits(x, residual):
            try:
                return self._fused(x, residual)
            except RuntimeError as exc:  # a CPU or build without this oneDNN path: run the layers
                logger.info("oneDNN fused convolution unavailable (%s); running the layers", exc)
                self._usable = False
        out = conv(x)
        if residual is not None:
            out = out + residual
        return out if self.activation is None else self.activation(out)

    def _fits(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether the residual is exactly what the fused add takes (no broadcast, same dtype)."""
        if residual is None:
            return True
        conv = self.conv
        size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                zip(x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride)]
        return residual.dtype == x.dtype and list(residual.shape) == [x.shape[0], conv.out_channels, *size]

    def _fused(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        conv = self.conv
        geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        key = tuple(x.shape)
        weight = self._packed.get(key)
        if weight is None:  # oneDNN picks the layout for the input shape: pack per shape, a few kept
            weight = torch.ops.mkldnn._reorder_convolution_weight(conv.weight.detach(), *geometry, list(key))
            packed = dict(self._packed)  # copy, then swap: threads (dask's) may map tiles at once
            if len(packed) >= PACKED_SHAPES:
                del packed[next(iter(packed))]
            self._packed = {**packed, key: weight}
        bias = None if conv.bias is None else conv.bias.detach()
        unary, scalars = _post_op(self.activation)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *geometry, unary, scalars, "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, weight, bias, *geometry, "add", None,
            None if unary == "none" else unary, scalars, "")

    def __getstate__(self) -> dict[str, Any]:  # packed weights are per process (and CPU): repack
        state = self.__dict__.copy()
        state["_packed"] = {}
        return state


def _post_op(activation: nn.Module | None) -> tuple[str, list[float]]:
    if activation is None:
        return "none", []
    if isinstance(activation, nn.Hardtanh):  # ReLU6 included
        return "hardtanh", [activation.min_val, activation.max_val]
    if isinstance(activation, nn.SiLU):
        return "swish", []
    return "relu", []


def _activation(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The clamp ``node`` applies to its one input (a module to run when not fused), or None."""
    if node.op == "call_module" and type(modules[node.target]) in (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU):
        return modules[node.target]
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS and len(node.args) == 1:
        return nn.ReLU()
    return None


def fuse_convolutions(graph_module: fx.GraphModule) -> int:
    """Rewrite ``graph_module`` in place as described above; returns how many convolutions now
    run fused (each ``nn.Conv2d`` called once, with zero padding given in pixels)."""
    modules = dict(graph_module.named_modules())
    graph = graph_module.graph
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    fused: dict[fx.Node, FusedConv] = {}
    for node in graph.nodes:
        conv = modules.get(node.target) if node.op == "call_module" else None
        if (type(conv) is nn.Conv2d and calls[node.target] == 1 and conv.padding_mode == "zeros"
                and not isinstance(conv.padding, str) and len(node.args) == 1 and not node.kwargs):
            fused[node] = FusedConv(conv)
    for node in list(graph.nodes):  # conv(x) + residual -> one node, the conv's only use
        if node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 or node.kwargs:
            continue
        for conv_node, residual in (node.args, node.args[::-1]):
            module = fused.get(conv_node)
            if (module is not None and not module.residual and len(conv_node.users) == 1
                    and isinstance(residual, fx.Node) and residual is not conv_node):
                module.residual = True
                conv_node.args = (conv_node.args[0], residual)
                node.prepend(conv_node)  # after both inputs
                node.replace_all_uses_with(conv_node)
                graph.erase_node(node)
                break
    for node in list(graph.nodes):  # activation(conv(...)) -> the conv node
        activation = _activation(node, modules)
        module = fused.get(node.args[0]) if activation is not None else None
        if module is not None and module.activation is None and len(node.args[0].users) == 1:
            module.activation = activation
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for node, module in fused.items():
        parent, _, name = node.target.rpartition(".")
        setattr(graph_module.get_submodule(parent), name, module)
    graph.lint()
    graph_module.recompile()
    return len(fused)
