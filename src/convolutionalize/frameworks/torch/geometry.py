"""Geometry of a traced PyTorch body: stride, receptive field, and what breaks crop equality.

Walks the nodes that feed the feature map in graph order and composes one
:class:`~convolutionalize.geometry.Span` per spatial axis. Convolutions and pools
compose by the usual arithmetic; elementwise and channel-wise operations pass spans
through; branches merge by union. Three kinds of evidence are collected, each naming
its node: zero padding (a crop sees zeros where the dense map sees pixels), global
context (squeeze-excitation means, GroupNorm, attention: the receptive field is the
whole image) and operations whose locality is not known (treated like global context:
nothing is claimed that is not proven).
"""

from __future__ import annotations

from torch import fx, nn

from ...errors import NotConvolutionalizable
from ...geometry import BodyGeometry, Span, same_padding
from .graph import (
    ELEMENTWISE,
    ELEMENTWISE_MODULES,
    arg,
    int_at_native,
    is_spatial_size_of,
    op_name,
    shape_of,
    tensor_inputs,
)
from .head import REDUCTIONS, Value
from .quantized import QUANTIZED_CONVS

__all__ = ["CONVS", "body_geometry", "body_spans", "window_args"]

CONVS = ("Conv2d", "conv2d", "MaxPool2d", "max_pool2d", "AvgPool2d", "avg_pool2d",
         "max_pool2d_with_indices", "Conv2dSame", "StdConv2d", "StdConv2dSame",
         "ScaledStdConv2d", "ScaledStdConv2dSame", "MaxPool2dSame", "AvgPool2dSame",
         "CondConv2d", "ConvMlp")
GLOBAL_OPS = frozenset({"GroupNorm", "group_norm", "InstanceNorm2d", "instance_norm",
                        "AdaptiveAvgPool2d", "adaptive_avg_pool2d", "AdaptiveMaxPool2d",
                        "adaptive_max_pool2d", "MultiheadAttention",
                        "scaled_dot_product_attention", "matmul", "bmm", "baddbmm", "einsum"})
SHAPE_KEEPING = frozenset({"getitem", "chunk", "split", "cat", "stack", "permute", "transpose", "view",
                           "reshape", "flatten", "unflatten", "BatchNorm2d", "BatchNormAct2d",
                           "FrozenBatchNorm2d", "FrozenBatchNormAct2d", "ChannelShuffle",
                           "StochasticDepth", "stochastic_depth", "drop_path", "DropPath",
                           "LayerScale", "LayerScale2d", "Flatten"})


# Padding modules (left, right, top, bottom), as efficientnet_pytorch's static "same" padding uses them.
PAD_MODULES = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d)


def _pair(v: object, default: int = 0) -> tuple[int, int]:
    if v is None:
        return (default, default)
    if isinstance(v, int):
        return (v, v)
    seq = list(v)  # type: ignore[call-overload]
    return (int(seq[0]), int(seq[-1])) if seq else (default, default)


def window_args(node: fx.Node, name: str, modules: dict[str, nn.Module]):
    """(kernel, stride, padding, dilation, ceil_mode, same) of a conv or pool node."""
    if node.op == "call_module":
        m = modules[str(node.target)]
        if name == "ConvMlp":  # timm's leaf: a conv "fc1" (the old fc6 as a 7x7 conv), then 1x1
            m = m.fc1
        kernel = _pair(m.kernel_size)
        stride = _pair(m.stride or m.kernel_size)
        padding = m.padding
        dilation = _pair(getattr(m, "dilation", 1), 1)
        ceil = bool(getattr(m, "ceil_mode", False))
        same = name.endswith("Same")
    else:
        is_conv = name == "conv2d"
        if is_conv:
            w = shape_of(arg(node, 1, "weight"))
            kernel = (w[2], w[3]) if w else (1, 1)
            stride = _pair(arg(node, 3, "stride", 1), 1)
            padding = arg(node, 4, "padding", 0)
            dilation = _pair(arg(node, 5, "dilation", 1), 1)
            ceil = False
        else:
            kernel = _pair(arg(node, 1, "kernel_size"))
            stride = _pair(arg(node, 2, "stride") or kernel)
            padding = arg(node, 3, "padding", 0)
            dilation = _pair(arg(node, 4, "dilation", 1), 1) if "max" in name else (1, 1)
            ceil = bool(arg(node, 5 if "max" in name else 4, "ceil_mode", False))
        same = False
    if padding == "same":
        same, padding = True, (0, 0)
    elif padding == "valid":
        padding = (0, 0)
    return kernel, stride, _pair(padding), dilation, ceil, same


def body_geometry(gm: fx.GraphModule, values: dict[fx.Node, Value], feature: fx.Node,
                  modules: dict[str, nn.Module], keep: set[fx.Node]) -> BodyGeometry:
    """Compose spans from the input to ``feature`` over the nodes in ``keep``."""
    return body_spans(gm, values, feature, modules, keep)[0]


def body_spans(gm: fx.GraphModule, values: dict[fx.Node, Value], feature: fx.Node,
               modules: dict[str, nn.Module], keep: set[fx.Node]
               ) -> tuple[BodyGeometry, dict[fx.Node, tuple[Span, Span]]]:
    """:func:`body_geometry` and the (y, x) span of every body node's output."""
    spans: dict[fx.Node, tuple[Span, Span]] = {}
    geo = BodyGeometry(Span(), Span())
    for node in gm.graph.nodes:
        if node not in keep or node not in values:
            continue
        if node.op == "placeholder":
            spans[node] = (Span(), Span())
            continue
        ins = tensor_inputs(node, spans)
        if not ins:
            continue
        ys = Span.union([spans[n][0] for n in ins])
        xs = Span.union([spans[n][1] for n in ins])
        if ys is None or xs is None:  # branches at different strides (e.g. upsampled FPN)
            geo.unproven.append(node.name)
            ys = max((spans[n][0] for n in ins), key=lambda s: s.jump)
            xs = max((spans[n][1] for n in ins), key=lambda s: s.jump)
        spans[node] = _apply(node, values, modules, ins, ys, xs, geo)
        if node is feature:
            break
    geo.y, geo.x = spans[feature]
    return geo, spans


def _apply(node: fx.Node, values: dict[fx.Node, Value], modules: dict[str, nn.Module],
           ins: list[fx.Node], ys: Span, xs: Span, geo: BodyGeometry) -> tuple[Span, Span]:
    name = op_name(node, modules)
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    value, src = values[node], values[ins[0]]
    in_shape, out_shape = shape_of(ins[0]), shape_of(node)
    if name in ("avg_pool2d", "max_pool2d") and is_spatial_size_of(arg(node, 1, "kernel_size"), node.args[0]):
        geo.global_context.append(node.name)  # F.avg_pool2d(x, x.shape[2:]) in a squeeze-excitation
        return ys, xs
    if name in CONVS or isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, *QUANTIZED_CONVS)):
        kernel, stride, pad, dil, ceil, same = window_args(node, name, modules)
        if same and in_shape is not None and src.axes is not None:
            pad = tuple(same_padding(in_shape[a], k, s, d)[0]  # type: ignore[assignment]
                        for a, k, s, d in zip(src.axes, kernel, stride, dil))
        if any(pad) or same:
            geo.padded.append(node.name)
        if ceil and in_shape and out_shape and src.axes and _ceil_took_effect(
                in_shape, out_shape, src.axes, kernel, stride, pad, dil):
            geo.padded.append(node.name)
        return (ys.conv(kernel[0], stride[0], pad[0], dil[0]),
                xs.conv(kernel[1], stride[1], pad[1], dil[1]))
    if name == "getitem" and isinstance(node.args[1], tuple) and src.axes and in_shape:
        index = _expand_index(node.args[1], len(in_shape))
        if index is None:
            geo.unproven.append(node.name)
            return ys, xs
        ay, ax = src.axes
        if all(isinstance(index[a], slice) and index[a].stop is None for a in (ay, ax)):
            return _slice_span(ys, index[ay]), _slice_span(xs, index[ax])
        geo.unproven.append(node.name)
        return ys, xs
    if name == "pad" or isinstance(module, PAD_MODULES):
        # F.pad's amounts, computed from the input's size (TF "SAME"), as they were at the native size
        given = list(module.padding) if isinstance(module, PAD_MODULES) else list(arg(node, 1, "pad", ()))
        pads = [int_at_native(p) for p in given]
        if None in pads:
            raise NotConvolutionalizable(f"the padding of '{node.name}' is computed in a way the "
                                         "conversion cannot read at the native size")
        if any(pads) or any(isinstance(p, fx.Node) for p in given):
            geo.padded.append(node.name)
        left, _, top = [*pads, 0, 0, 0, 0][:3]
        return Span(ys.lo - top * ys.jump, ys.hi, ys.jump), Span(xs.lo - left * xs.jump, xs.hi,
                                                                  xs.jump)
    if name in GLOBAL_OPS or (src.kind == "map" and value.kind != "map"):
        geo.global_context.append(node.name)  # e.g. a squeeze-excitation mean
        return ys, xs
    if any(values[n].kind != "map" for n in ins):  # the pooled branch, or its gating product
        return ys, xs
    if not _channelwise(node, name, module, src):
        geo.unproven.append(node.name)
    return _resampled(node, src, value, in_shape, out_shape, ys, xs, geo)


def _resampled(node: fx.Node, src: Value, value: Value, in_shape, out_shape, ys: Span, xs: Span,
               geo: BodyGeometry) -> tuple[Span, Span]:
    """Spans through an operation not known to resample; if its output's spatial size shows
    that it does (a wrapped patch-merging function, say), scale the cell spacing by the
    measured ratio and record that locality is not proven."""
    if not (in_shape and out_shape and src.axes and value.axes):
        return ys, xs
    ratios = [in_shape[a] / out_shape[b] for a, b in zip(src.axes, value.axes)]
    if ratios == [1.0, 1.0]:
        return ys, xs
    if node.name not in geo.unproven:
        geo.unproven.append(node.name)
    return _rescale(ys, ratios[0]), _rescale(xs, ratios[1])


def _rescale(span: Span, ratio: float) -> Span:
    """Cell spacing times ``ratio`` (in/out size): > 1 downsamples, < 1 upsamples."""
    if ratio >= 1:
        return Span(span.lo, span.hi, span.jump * round(ratio))
    factor = round(1 / ratio)
    return Span(span.lo, span.hi, max(1, span.jump // factor))


def _channelwise(node: fx.Node, name: str, module: nn.Module | None, src: Value) -> bool:
    """Elementwise, per-location or channel-only operations (spans pass through)."""
    if isinstance(module, (*ELEMENTWISE_MODULES, nn.BatchNorm2d)) or name in ELEMENTWISE:
        return True
    last_is_channel = src.axes is not None and src.axes[1] != (len(shape_of(node) or ()) - 1)
    if isinstance(module, nn.Linear) or name == "linear":
        return last_is_channel
    if isinstance(module, nn.LayerNorm) or name == "layer_norm":
        shape = module.normalized_shape if module is not None else arg(node, 1, "normalized_shape")
        return last_is_channel and len(tuple(shape)) == 1
    if name in ("softmax", "log_softmax", "Softmax"):
        dim = module.dim if module is not None else arg(node, 1, "dim")
        return isinstance(dim, int) and src.axes is not None and dim % 4 not in src.axes
    if name == "getitem":  # an element of a tuple (chunk, split), or a channel index
        return True
    if name in REDUCTIONS:  # over branches or channels (a map stays a map: head.py checked)
        return True
    return name in SHAPE_KEEPING


def _ceil_took_effect(in_shape, out_shape, axes, kernel, stride, pad, dil) -> bool:
    for a, k, s, p, d in zip(axes, kernel, stride, pad, dil):
        floor_out = (in_shape[a] + 2 * p - d * (k - 1) - 1) // s + 1
        if out_shape[a] != floor_out:
            return True
    return False


def _expand_index(index: tuple, rank: int) -> list[object] | None:
    """A getitem index with ``...`` expanded to one entry per axis (None if not simple)."""
    if any(i is None or not isinstance(i, (slice, int, type(Ellipsis))) for i in index):
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        fill = [slice(None)] * (rank - len(index) + 1)
        return [*index[:at], *fill, *index[at + 1:]]
    return [*index, *([slice(None)] * (rank - len(index)))]


def _slice_span(span: Span, index: object) -> Span:
    """Span after ``x[start::step]`` along a spatial axis (cell i is old cell start + i*step)."""
    assert isinstance(index, slice)
    start, step = index.start or 0, index.step or 1
    return Span(span.lo + start * span.jump, span.hi + start * span.jump, span.jump * step)
