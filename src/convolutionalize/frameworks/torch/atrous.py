"""Output strides below the network's own: the à trous rewrite of a PyTorch body (DeepLab).

A network of total stride S scores one window every S pixels. To score one every ``s``
pixels (``s`` dividing S), the strided layers whose input already has a cell spacing of
``s`` or more run at stride 1, and every window operation after them — convolutions,
pools, the head's window pool and its first HxW convolution — has its taps spread by the
factor the removed strides had accumulated before it (its dilation, and its padding,
multiplied by ``input spacing / s``). The weights do not change. Cell ``(i, j)`` is then the
classifier on the native window at ``(i·s, j·s)``: exactly the original on its crop for a
padding-free network, and the shift-and-stitch maps interleaved everywhere the receptive
field stays inside the image.

Possible strides are the cell spacings at which a strided layer starts (ResNet: 1, 2, 4, 8,
16, 32). A layer whose meaning changes with a denser map — a global-context block (its mean
would cover other positions), an operation whose locality is not proven, an average pool
with ``divisor_override`` — refuses the strides that would put it downstream of a removed
stride, naming it and the strides that remain possible.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from ...errors import NotConvolutionalizable
from ...geometry import BodyGeometry, Span, possible_output_strides
from ...plan import HeadPlan
from .geometry import CONVS, window_args
from .graph import arg, op_name, tensor_inputs
from .layers import DilatedAvgPool2d
from .quantized import QUANTIZED_CONVS

__all__ = ["Atrous", "plan_atrous"]

Pair = tuple[int, int]


@dataclass(frozen=True)
class Atrous:
    """What changes for one output stride: per body node, (stride to 1?, dilation factor)."""

    stride: Pair  # the output stride
    head_dilation: Pair  # network stride / output stride: the head's window pool and kernel
    nodes: dict[str, tuple[bool, Pair]]  # node -> (its stride becomes 1, its taps' factor)

    def apply(self, gm: fx.GraphModule) -> None:
        """Rewrite the body of ``gm`` (the adapter's private copy) in place."""
        modules = dict(gm.named_modules())
        uses: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                uses[str(node.target)] = uses.get(str(node.target), 0) + 1
        for node in list(gm.graph.nodes):
            if node.name in self.nodes:
                unstride, factor = self.nodes[node.name]
                _rewrite_node(gm, node, modules, uses, unstride, factor)
        gm.graph.lint()
        gm.recompile()


def plan_atrous(gm: fx.GraphModule, plan: HeadPlan, body: BodyGeometry,
                spans: dict[fx.Node, tuple[Span, Span]], output_stride: int,
                modules: dict[str, nn.Module]) -> Atrous:
    """The à trous rewrite for ``output_stride``, or a refusal naming what prevents it."""
    network = (body.y.jump, body.x.jump)
    if plan.adaptive_pool is not None and plan.adaptive_pool.pool_to != plan.feature.size:
        raise NotConvolutionalizable(f"output_stride: the head's adaptive pool '{plan.adaptive_pool.node}' "
                                     "becomes a strided fixed pool; only the network stride is possible")
    strided = {n: _input_jump(n, spans) for n in spans
               if _is_window(n, modules) and _stride(n, modules) != (1, 1)}
    possible = possible_output_strides(network, strided.values(), output_stride)
    s = output_stride
    blocked = {*body.global_context, *body.unproven}
    nodes: dict[str, tuple[bool, Pair]] = {}
    for node, (ys, xs) in _inputs(spans).items():
        factor = (max(ys.jump // s, 1), max(xs.jump // s, 1))
        unstride = node in strided and ys.jump >= s
        if factor == (1, 1) and not unstride:
            continue
        if node.name in blocked:
            allowed = [p for p in possible if p >= max(ys.jump, xs.jump)]
            raise NotConvolutionalizable(
                f"output_stride={s}: '{node.name}' ({op_name(node, modules)}) sees the whole map or "
                "is not proven local, so it would compute something else on a denser map; possible "
                f"output strides: {', '.join(map(str, allowed))}")
        if _is_window(node, modules):
            nodes[node.name] = (unstride, factor)
        elif op_name(node, modules) == "pad":
            nodes[node.name] = (False, factor)
    return Atrous((s, s), (network[0] // s, network[1] // s), nodes)


def _inputs(spans: dict[fx.Node, tuple[Span, Span]]) -> dict[fx.Node, tuple[Span, Span]]:
    """Each body node's input span (its first spatial input's)."""
    out = {}
    for node in spans:
        ins = tensor_inputs(node, spans)
        if ins:
            out[node] = spans[ins[0]]
    return out


def _input_jump(node: fx.Node, spans: dict[fx.Node, tuple[Span, Span]]) -> Pair:
    ys, xs = spans[tensor_inputs(node, spans)[0]]
    return (ys.jump, xs.jump)


def _is_window(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    return op_name(node, modules) in CONVS or isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d,
                                                                  *QUANTIZED_CONVS))


def _stride(node: fx.Node, modules: dict[str, nn.Module]) -> Pair:
    return window_args(node, op_name(node, modules), modules)[1]


def _scale(value: object, factor: Pair) -> object:
    if isinstance(value, str):  # "same" / "valid": the layer computes it for the new dilation
        return value
    y, x = (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[arg-type]
    return (y * factor[0], x * factor[1])


def _rewrite_node(gm: fx.GraphModule, node: fx.Node, modules: dict[str, nn.Module],
                  uses: dict[str, int], unstride: bool, factor: Pair) -> None:
    name = op_name(node, modules)
    if node.op == "call_module":
        module = modules[str(node.target)]
        if uses[str(node.target)] > 1:
            raise NotConvolutionalizable(f"output_stride: module '{node.target}' is called at several "
                                         "places; its dilation cannot differ between them")
        _rewrite_module(gm, node, module, unstride, factor)
        return
    if name == "pad":
        pads = list(arg(node, 1, "pad"))
        scaled = [p * factor[1] if i < 2 else p * factor[0] if i < 4 else p for i, p in enumerate(pads)]
        node.args = (node.args[0], scaled, *node.args[2:])
        return
    if name in ("conv2d", "max_pool2d"):  # torch.export graphs: rewrite the call's arguments
        kernel, stride, _, dilation, ceil, _ = window_args(node, name, {})
        stride = (1, 1) if unstride else stride
        padding = _scale(arg(node, 4 if name == "conv2d" else 3, "padding", 0), factor)
        dilation = (dilation[0] * factor[0], dilation[1] * factor[1])
        if name == "conv2d":
            node.args = (node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias"), stride, padding,
                         dilation, arg(node, 6, "groups", 1))
        else:
            node.args = (node.args[0], kernel, stride, padding, dilation, ceil)
        node.kwargs = {}
        return
    raise NotConvolutionalizable(f"output_stride: '{node.name}' ({name}) has no dilated form here; "
                                 "only the network stride is possible")


def _rewrite_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, unstride: bool,
                    factor: Pair) -> None:
    if isinstance(module, QUANTIZED_CONVS):
        raise NotConvolutionalizable(f"output_stride: '{node.target}' is a quantized convolution "
                                     f"({type(module).__name__}), whose stride and dilation are packed "
                                     "with its weights; only the network stride is possible")
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
        if unstride:
            module.stride = (1, 1) if isinstance(module, nn.Conv2d) else 1
        dilation = module.dilation if isinstance(module.dilation, tuple) else (module.dilation,) * 2
        module.dilation = (dilation[0] * factor[0], dilation[1] * factor[1])
        module.padding = _scale(module.padding, factor)  # type: ignore[assignment]
        return
    if isinstance(module, nn.AvgPool2d) and type(module) is nn.AvgPool2d:
        if module.divisor_override:
            raise NotConvolutionalizable(f"output_stride: average pool '{node.target}' has "
                                         "divisor_override; only the network stride is possible")
        kernel = _pair(module.kernel_size)
        stride = (1, 1) if unstride else _pair(module.stride or module.kernel_size)
        if stride != (1, 1):
            raise NotConvolutionalizable(f"output_stride: average pool '{node.target}' would need "
                                         "a stride and a dilation at once")
        padding = _pair(module.padding)
        extra = (0, 0)
        if module.ceil_mode and unstride:  # its last window may hang off the end: keep them all
            extra = tuple(f * (k - 1 - 2 * p) for f, k, p in zip(factor, kernel, padding))  # type: ignore[assignment]
            if min(extra) < 0:
                raise NotConvolutionalizable(f"output_stride: average pool '{node.target}' (ceil_mode, "
                                             "padding over half its kernel) has no stride-1 form here")
        replacement = DilatedAvgPool2d(kernel, factor, _scale(padding, factor),  # type: ignore[arg-type]
                                       bool(module.count_include_pad), extra)
        parent, _, child = str(node.target).rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, child, replacement)
        return
    raise NotConvolutionalizable(f"output_stride: '{node.target}' ({type(module).__name__}) has no "
                                 "dilated form here; only the network stride is possible")


def _pair(v: object) -> Pair:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))  # type: ignore[index]
