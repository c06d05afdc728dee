"""Large tiles in less memory: the network's first layers run in horizontal strips.

A tile's peak memory is set by the first layers, which run at the input's resolution (a
ResNet's or ShuffleNet's stem convolution holds 24-64 channels at half the input's size: 6-16
floats per input pixel, against 3 for the input and well under 1 after the stem). Tiles must
fit the memory budget, and every tile recomputes the halo its cells' receptive field needs
(263 + 232 pixels a side for ShuffleNetV2), so small tiles waste much of their work.

:func:`plan_strips` finds the stem of a traced body: the chain of layers from the input up to
the first tensor at a quarter of its resolution (convolutions, pools, batch norms and
pointwise activations, each feeding only the next), and that chain's composed stride,
padding and receptive field along the rows. :class:`StripNet` then runs the stem over a large
input in horizontal strips, each reading the rows its outputs' receptive field covers
(starting on the stem's stride, so its grid is the whole input's), keeping the rows computed
from real pixels only (or from the input's own border), into one buffer at a quarter of the
resolution, and runs the rest of the network on that buffer: the same numbers as one pass
(the zero padding of a strip's edges reaches none of the rows kept), with the stem's
activations never held for the whole tile. A tile can then be about twice as large a side in
the same memory, recomputing a smaller share of halo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._onednn import FusedConv

__all__ = ["STRIP_ROWS", "StripNet", "StripPlan", "plan_strips"]

STRIP_ROWS = 256  # input rows per strip (about): the stem's activations for 256 x W at a time
MIN_STRIDE = 4  # the stem ends at the first tensor this many times coarser than the input
POINTWISE_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.GELU,
                     nn.LeakyReLU, nn.Identity)
POINTWISE_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.silu, F.hardswish, F.gelu)


@dataclass(frozen=True)
class StripPlan:
    """A body's stem: its last node, how many modules it holds, and along the rows its stride,
    padding, receptive field and layers ``(kernel, stride, padding, dilation)``."""

    cut: str
    modules: int
    stride: int
    padding: int
    field: int
    layers: tuple[tuple[int, int, int, int], ...]

    def rows_out(self, rows: int) -> int:
        """Rows of the stem's output for ``rows`` input rows."""
        for k, s, p, d in self.layers:
            rows = (rows + 2 * p - d * (k - 1) - 1) // s + 1
        return rows


def plan_strips(net: nn.Module) -> StripPlan | None:
    """The stem of ``net`` (a ``torch.fx.GraphModule``), or ``None`` where it has none that
    strips can run (no chain of known layers reaching ``MIN_STRIDE``)."""
    if not isinstance(net, fx.GraphModule):
        return None
    modules = dict(net.named_modules())
    nodes = list(net.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None
    current, layers, count, stride = inputs[0], [], 0, 1
    for node in nodes[nodes.index(current) + 1:]:
        if node.op == "output" or current not in node.all_input_nodes:
            break
        others = [n for n in node.all_input_nodes if n is not current]
        if others or (current.op != "placeholder" and len(current.users) != 1):
            break  # not a chain: a residual, a concatenation, a second user
        layer = _layer(node, modules)
        if layer is None:
            break
        if layer != (1, 1, 0, 1):
            layers.append(layer)
            stride *= layer[1]
        count += node.op == "call_module"
        current = node
        if stride >= MIN_STRIDE:
            field, padding, step = 1, 0, 1
            for kernel, step_of_layer, pad, dilation in layers:
                field += (kernel - 1) * dilation * step
                padding += pad * step
                step *= step_of_layer
            return StripPlan(node.name, count, stride, padding, field, tuple(layers))
    return None


def _layer(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[int, int, int, int] | None:
    """A node's ``(kernel, stride, padding, dilation)`` along the rows; ``(1, 1, 0, 1)`` for a
    pointwise one; ``None`` for anything else."""
    if node.op == "call_function" and node.target in POINTWISE_FUNCTIONS:
        return (1, 1, 0, 1)
    if node.op != "call_module":
        return None
    module = modules[node.target]  # type: ignore[index]
    if isinstance(module, FusedConv) and module.residual:
        return None
    conv = module.conv if isinstance(module, FusedConv) else module
    if isinstance(conv, nn.Conv2d):
        if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            return None
        return (conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0])
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        if module.ceil_mode or (isinstance(module, nn.AvgPool2d) and not module.count_include_pad):
            return None
        pair = [(v if isinstance(v, int) else v[0]) for v in
                (module.kernel_size, module.stride or module.kernel_size, module.padding,
                 getattr(module, "dilation", 1))]
        return (pair[0], pair[1], pair[2], pair[3])
    if isinstance(module, POINTWISE_MODULES):
        return (1, 1, 0, 1)
    return None


class StripNet(nn.Module):
    """``net`` with its stem run in strips on inputs of more than ``min_rows`` rows (see the
    module docstring); smaller inputs run in one pass."""

    def __init__(self, net: fx.GraphModule, plan: StripPlan, min_rows: int = 2 * STRIP_ROWS) -> None:
        super().__init__()
        self.plan, self.min_rows = plan, min_rows
        self.stem, self.rest = _split(net, plan.cut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < self.min_rows:
            return self.rest(self.stem(x), x)
        return self.rest(self.strips(x), x)

    def strips(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's output for ``x``, computed strip by strip into one buffer."""
        plan, height = self.plan, x.shape[-2]
        rows = plan.rows_out(height)
        per_strip = max(STRIP_ROWS // plan.stride, 1)
        out = None
        for a in range(0, rows, per_strip):
            b = min(a + per_strip, rows)
            lo = max(a * plan.stride - plan.padding, 0) // plan.stride * plan.stride
            hi = min((b - 1) * plan.stride - plan.padding + plan.field, height)
            part = self.stem(x[:, :, lo:hi])
            first = a - lo // plan.stride
            if out is None:
                layout = torch.channels_last if part.is_contiguous(memory_format=torch.channels_last) \
                    else torch.contiguous_format
                out = torch.empty((*part.shape[:2], rows, part.shape[3]), dtype=part.dtype,
                                  device=part.device, memory_format=layout)
            out[:, :, a:b] = part[:, :, first:first + b - a]
        assert out is not None
        return out


def _split(net: fx.GraphModule, cut: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """``net`` as two graphs: input -> ``cut``, and (``cut``'s value, input) -> output."""
    stem, rest = fx.Graph(), fx.Graph()
    env_stem: dict[fx.Node, fx.Node] = {}
    env_rest: dict[fx.Node, fx.Node] = {}
    nodes = list(net.graph.nodes)
    index = next(i for i, n in enumerate(nodes) if n.name == cut)
    placeholder = next(n for n in nodes if n.op == "placeholder")
    for node in nodes[:index + 1]:
        env_stem[node] = stem.node_copy(node, lambda n: env_stem[n])
    stem.output(env_stem[nodes[index]])
    env_rest[nodes[index]] = rest.placeholder("stem")
    env_rest[placeholder] = rest.placeholder(placeholder.name)
    for node in nodes[index + 1:]:
        env_rest[node] = rest.node_copy(node, lambda n: env_rest[n])
    return fx.GraphModule(net, stem), fx.GraphModule(net, rest)
