"""pt2e-quantized graphs (``torch.export`` -> ``prepare_pt2e`` -> calibrate -> ``convert_pt2e``,
``torchao.quantization.pt2e``): what their quantize / dequantize operators are to the analysis,
and the quantized convolution a quantized linear head becomes.

Such a graph computes in float between ``quantized_decomposed`` operators: an activation is
``quantize_per_tensor`` (round to an 8-bit integer) then ``dequantize_per_tensor`` (back to
float), each element on its own, so they slide as they are; a weight is an int8 constant read
through ``dequantize_per_channel`` (or ``dequantize_per_tensor``) into ``aten.conv2d`` /
``aten.linear``. The head's ``dequantize(int8 W) -> linear`` becomes ``dequantize(int8 K) ->
conv2d``: ``K`` holds the same integers laid out as the kernel (no rounding), read with the
same scales and zero points (per output channel: the Linear's rows are the kernel's filters),
so the converted graph is quantized exactly as the original, with no float weight in it.

The float sums of a convolution and of a linear run in different orders; an activation whose
value falls within a float rounding of a quantization boundary may then round the other way
(``selfcheck.TOLERANCES["pt2e"]`` states what that allows, measured).

Dynamic quantization (``choose_qparams``: the scale measured on each whole input) has no exact
sliding form and is refused by name.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx

from ...errors import NotConvolutionalizable
from ...weights import linear_to_oihw

__all__ = ["PT2E", "PT2E_OPS", "Pt2eTracer", "dequantized_weight", "is_pt2e", "pt2e_conv_from_linear",
           "pt2e_refusal", "requantize_mean"]

PT2E = "pt2e"  # the self-check's precision for such a graph
NAMESPACE = "quantized_decomposed"
# an activation's quantize / dequantize per tensor: each element on its own
PT2E_OPS = frozenset({"quantize_per_tensor", "dequantize_per_tensor"})
DYNAMIC = frozenset({"choose_qparams", "choose_qparams_symmetric", "choose_qparams_per_token",
                     "choose_qparams_per_token_asymmetric", "choose_qparams_affine"})
WEIGHT_DEQUANTIZE = frozenset({"dequantize_per_tensor", "dequantize_per_channel"})


def _decomposed(node: object, names: frozenset[str]) -> bool:
    target = getattr(node, "target", None)
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and isinstance(target, torch._ops.OpOverload) and target.namespace == NAMESPACE
            and target.overloadpacket.__name__ in names)


class Pt2eTracer(fx.Tracer):
    """Re-traces a pt2e graph when it is unpickled (``torch.load`` of a GraphModule traces its
    code again) with buffers read as ``get_attr`` nodes: an int8 weight stays an int8 constant
    dequantized in the graph instead of being folded into a float tensor."""

    proxy_buffer_attributes = True


def requantize_mean(x: torch.Tensor, scale: float, zero_point: int, count: int, qmin: int,
                    qmax: int) -> torch.Tensor:
    """The mean ``x`` of ``count`` values of a quantized map (in float) rounded back to that map's
    integer grid as a quantized average pool rounds it: the sum of the integers is recovered
    exactly, divided by ``count`` and rounded half to even."""
    total = torch.round(x * (count / scale))
    q = torch.round(total / count) + zero_point
    return (q.clamp(qmin, qmax) - zero_point) * scale


def is_pt2e(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` holds pt2e's quantize / dequantize operators."""
    return any(_decomposed(n, PT2E_OPS | WEIGHT_DEQUANTIZE | DYNAMIC) for n in gm.graph.nodes)


def pt2e_refusal(gm: fx.GraphModule) -> str | None:
    """Why a pt2e graph cannot slide (dynamic quantization), or None."""
    node = next((n for n in gm.graph.nodes if _decomposed(n, DYNAMIC)), None)
    if node is None:
        return None
    return (f"'{node.name}' ({node.target}) is pt2e dynamic quantization: it measures the "
            "activation's scale on each whole input, so a cell of a larger map would be quantized "
            "with the scale of the whole map, not of its crop; no sliding form gives the same "
            "numbers (quantize it statically)")


def dequantized_weight(node: object) -> fx.Node | None:
    """The int8 constant (a ``get_attr``) that ``node`` dequantizes, when ``node`` is a
    weight's ``dequantize_per_tensor`` / ``dequantize_per_channel`` on axis 0; else None."""
    if not _decomposed(node, WEIGHT_DEQUANTIZE):
        return None
    assert isinstance(node, fx.Node)
    source = node.args[0]
    if not (isinstance(source, fx.Node) and source.op == "get_attr"):
        return None
    if node.target.overloadpacket.__name__ == "dequantize_per_channel" and node.args[3] != 0:  # type: ignore[union-attr]
        return None
    return source


def pt2e_conv_from_linear(gm: fx.GraphModule, node: fx.Node, kernel: tuple[int, int], layout: str,
                          dilation: tuple[int, int], name: str) -> None:
    """Replace ``aten.linear(x, dequantize(int8 W), b)`` by ``aten.conv2d(x, dequantize(int8 K),
    b)`` with ``K`` the same integers laid out as a ``kernel`` over a map flattened in
    ``layout`` order, registered as the buffer ``name``."""
    weight = node.args[1]
    source = dequantized_weight(weight)
    if source is None:
        raise NotConvolutionalizable(f"the quantized linear '{node.name}' reads its weight through "
                                     f"{weight}, not a per-tensor or per-output-channel dequantize "
                                     "of an integer constant")
    assert isinstance(weight, fx.Node)
    integers = _attr(gm, str(source.target))
    in_features = integers.shape[1]
    kh, kw = kernel
    channels = in_features // (kh * kw)
    reordered = linear_to_oihw(integers.cpu().numpy(), channels, kh, kw, layout)
    gm.register_buffer(name, torch.from_numpy(np.ascontiguousarray(reordered)).to(integers.device))
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    graph = gm.graph
    with graph.inserting_before(node):
        constant = graph.get_attr(name)
        dequantized = graph.call_function(weight.target, (constant, *weight.args[1:]), dict(weight.kwargs))
        conv = graph.call_function(torch.ops.aten.conv2d.default,
                                   (node.args[0], dequantized, bias, [1, 1], [0, 0], list(dilation)))
    conv.meta = {k: v for k, v in node.meta.items() if k != "tensor_meta"}
    node.replace_all_uses_with(conv)
    graph.erase_node(node)


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    module_path, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(module_path) if module_path else gm, name)
