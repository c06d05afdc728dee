"""TF "SAME" padding fixed at its native amounts, so that the body slides.

A strided layer with "SAME" padding (timm's ``Conv2dSame``, ``StdConv2dSame``,
``MaxPool2dSame``, ``AvgPool2dSame``; an ``F.pad`` by amounts computed from the input's size,
as Hugging Face's BiT does) pads by how its input's size falls on its stride: one zero more
above an odd-sized input than an even one. On an image of another size than the native one
(plus whole strides) every cell of the map then moves, and two tiles of one image disagree.
Here each such padding becomes the constant one it was at the native size: at the native size
(and at native plus whole strides) the network is what it was, and at any size its cells stay
where the geometry says, as in a network with ordinary padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...geometry import same_padding
from .geometry import window_args
from .graph import arg, int_at_native, op_name, shape_of

__all__ = ["NativePadded", "fix_same_padding"]

SAME_MODULES = ("Conv2dSame", "StdConv2dSame", "ScaledStdConv2dSame", "MaxPool2dSame", "AvgPool2dSame")


class NativePadded(nn.Module):
    """``layer`` after a constant padding ``pads`` (left, right, top, bottom) of ``value``."""

    def __init__(self, pads: tuple[int, int, int, int], value: float, layer: nn.Module) -> None:
        super().__init__()
        self.pads, self.value, self.layer = pads, value, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(F.pad(x, self.pads, value=self.value))

    def extra_repr(self) -> str:
        return f"pads={self.pads}, value={self.value}"


def fix_same_padding(gm: fx.GraphModule, size_dependent_pads: bool = True) -> list[str]:
    """Give every strided "SAME" layer of ``gm`` (shapes propagated at the native size) its
    native padding, and (``size_dependent_pads``) every ``F.pad`` its amounts at the native
    size; the names of the nodes changed."""
    modules = dict(gm.named_modules())
    changed = []
    for node in gm.graph.nodes:
        name = op_name(node, modules)
        if node.op == "call_module" and name in SAME_MODULES:
            replacement = _native(node, name, modules)
            if replacement is not None:
                parent, _, child = str(node.target).rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, child, replacement)
                changed.append(node.name)
        elif size_dependent_pads and name == "pad":
            given = arg(node, 1, "pad", ())
            if isinstance(given, (list, tuple)) and any(isinstance(p, fx.Node) for p in given):
                native = [int_at_native(p) for p in given]
                if None not in native:
                    node.args = (node.args[0], native, *node.args[2:])
                    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "pad"}
                    changed.append(node.name)
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed


def _native(node: fx.Node, name: str, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The layer of ``node`` with the padding it had at the native size, or None at stride 1
    (where "SAME" pads alike at every size)."""
    module, in_shape = modules[str(node.target)], shape_of(node.args[0])
    kernel, stride, _, dilation, _, _ = window_args(node, name, modules)
    if in_shape is None or stride == (1, 1):
        return None
    (top, bottom), (left, right) = (same_padding(n, k, s, d) for n, k, s, d in
                                    zip(in_shape[-2:], kernel, stride, dilation))
    pads = (left, right, top, bottom)
    if name == "Conv2dSame":
        conv = nn.Conv2d(module.in_channels, module.out_channels, kernel, stride, 0, dilation,  # type: ignore[arg-type]
                         module.groups, module.bias is not None)  # type: ignore[arg-type]
        conv.weight, conv.bias = module.weight, module.bias  # type: ignore[assignment]
        return NativePadded(pads, 0.0, conv)
    if name == "MaxPool2dSame":
        pool = nn.MaxPool2d(kernel, stride, 0, dilation, ceil_mode=module.ceil_mode)  # type: ignore[arg-type]
        return NativePadded(pads, -math.inf, pool)
    if name == "AvgPool2dSame":
        avg = nn.AvgPool2d(kernel, stride, 0, module.ceil_mode, module.count_include_pad)  # type: ignore[arg-type]
        return NativePadded(pads, 0.0, avg)
    module.same_pad = False  # StdConv2dSame, ScaledStdConv2dSame: weight standardization kept
    return NativePadded(pads, 0.0, module)
