"""Body geometry of an ONNX graph: stride, receptive field and offset from the Conv/Pool/Pad
attributes and the inferred shapes, with zero padding and global-context ops named."""

from __future__ import annotations

import onnx

from ...errors import NotConvolutionalizable
from ...geometry import BodyGeometry, Span, same_padding
from .graph import GLOBAL_OPS, PER_LOCATION, SHAPE_OPS, WINDOW_OPS, Axes, Graph, attr_value


def body_geometry(graph: Graph, feature: str) -> tuple[BodyGeometry, dict[str, tuple[Span, Span]]]:
    """Compose spans from the image input to ``feature`` over the graph's Conv/Pool nodes."""
    keep = graph.ancestors(feature)
    spans: dict[str, tuple[Span, Span]] = {graph.image: (Span(), Span())}
    axes: dict[str, Axes] = {graph.image: (2, 3) if graph.layout == "NCHW" else (1, 2)}
    pooled: set[str] = set()
    geo = BodyGeometry(Span(), Span())
    for node in graph.model.graph.node:
        if node.name not in keep or node.op_type in ("Shape", "Size", "Constant"):
            continue
        ins = [n for n in node.input if n in spans]
        if not ins:
            if any(n in pooled for n in node.input):
                pooled.update(node.output)
            continue
        ys = Span.union([spans[n][0] for n in ins])
        xs = Span.union([spans[n][1] for n in ins])
        if ys is None or xs is None:
            geo.unproven.append(node.name)
            ys = max((spans[n][0] for n in ins), key=lambda s: s.jump)
            xs = max((spans[n][1] for n in ins), key=lambda s: s.jump)
        result, out_axes = _apply(graph, node, ins[0], ys, xs, geo, axes[ins[0]])
        if result is None:
            pooled.update(node.output)
        else:
            spans.update({o: result for o in node.output if o})
            axes.update({o: out_axes for o in node.output if o})
        if feature in node.output:
            break
    if feature not in spans:
        raise NotConvolutionalizable(f"the feature map '{feature}' does not depend on the image "
                                     "through spatial operations")
    geo.y, geo.x = spans[feature]
    return geo, spans


def _pair(values: object, default: int) -> tuple[int, int]:
    seq = list(values) if values is not None else []  # type: ignore[call-overload]
    return (int(seq[0]), int(seq[1])) if len(seq) >= 2 else (default, default)


def _apply(graph: Graph, node: onnx.NodeProto, src: str, ys: Span, xs: Span, geo: BodyGeometry,
           axes: Axes) -> tuple[tuple[Span, Span] | None, Axes]:
    """Spans and spatial axes after ``node``; spans None when its output no longer is a map
    (a global pool)."""
    op = node.op_type
    in_shape, out_shape = graph.shape(src), graph.shape(node.output[0])
    if op in WINDOW_OPS:
        return _window(graph, node, in_shape, out_shape, ys, xs, geo), (2, 3)
    if op == "Pad":
        return _pad(graph, node, ys, xs, geo), axes
    out_axes = _out_axes(node, axes, in_shape, out_shape)
    spatial_in, spatial_out = _at(in_shape, axes), _at(out_shape, out_axes)
    if op in GLOBAL_OPS or (op.startswith("Reduce") and spatial_out != spatial_in) or (
            op == "MatMul" and len(graph.data_inputs(node)) > 1) or _mixes_space(node, axes,
                                                                                  in_shape):
        geo.global_context.append(node.name)
        gone = spatial_in != (1, 1) and spatial_out in ((1, 1), None)
        return (None if gone else (ys, xs)), out_axes
    if op not in PER_LOCATION:
        geo.unproven.append(node.name)
    if spatial_in and spatial_out and None not in spatial_in + spatial_out and (
            spatial_in != spatial_out):
        if node.name not in geo.unproven:
            geo.unproven.append(node.name)
        ry, rx = (spatial_in[0] / spatial_out[0], spatial_in[1] / spatial_out[1])  # type: ignore[operator]
        return (_rescale(ys, ry), _rescale(xs, rx)), out_axes
    return (ys, xs), out_axes


def _at(shape: tuple[int | None, ...] | None, axes: Axes) -> tuple[int | None, int | None] | None:
    if shape is None or axes is None or len(shape) <= max(axes):
        return None
    return (shape[axes[0]], shape[axes[1]])


def _out_axes(node: onnx.NodeProto, axes: Axes, in_shape, out_shape) -> Axes:
    """Where the spatial axes are in ``node``'s output (tracked through transposes and
    reshapes, e.g. ConvNeXt's channels-last blocks or a channel shuffle)."""
    if axes is None:
        return None
    if node.op_type == "Transpose":
        rank = len(in_shape) if in_shape else max(axes) + 1
        perm = list(attr_value(node, "perm", range(rank - 1, -1, -1)))  # type: ignore[call-overload]
        return (perm.index(axes[0]), perm.index(axes[1]))
    same_rank = in_shape is not None and out_shape is not None and len(in_shape) == len(out_shape)
    if node.op_type not in SHAPE_OPS and (same_rank or out_shape is None):
        return axes
    spatial = _at(in_shape, axes)
    if out_shape and len(out_shape) >= 2 and (spatial is None or tuple(out_shape[-2:]) == spatial):
        return (len(out_shape) - 2, len(out_shape) - 1)
    return axes if same_rank and spatial == _at(out_shape, axes) else None


def _mixes_space(node: onnx.NodeProto, axes: Axes, in_shape) -> bool:
    """A normalization or softmax whose reduced axes include a spatial one."""
    if axes is None or not in_shape:
        return False
    rank = len(in_shape)
    if node.op_type == "LayerNormalization":
        first = int(attr_value(node, "axis", -1)) % rank  # type: ignore[call-overload]
        return any(a >= first for a in axes)
    if node.op_type in ("Softmax", "LogSoftmax", "LpNormalization"):
        return int(attr_value(node, "axis", -1)) % rank in axes  # type: ignore[call-overload]
    return False


def _rescale(span: Span, ratio: float) -> Span:
    if ratio >= 1:
        return Span(span.lo, span.hi, span.jump * round(ratio))
    return Span(span.lo, span.hi, max(1, span.jump // round(1 / ratio)))


def _window_args(graph: Graph, node: onnx.NodeProto) -> tuple[tuple[int, int], ...]:
    """The kernel, strides and dilations of a window node."""
    kernel = attr_value(node, "kernel_shape")
    weight = 3 if node.op_type == "QLinearConv" else 1  # QLinearConv: x, its scale, zero point, w
    if kernel is None and len(node.input) > weight:
        kernel = (graph.shape(node.input[weight]) or (0, 0, 1, 1))[2:]
    return (_pair(kernel, 1), _pair(attr_value(node, "strides"), 1), _pair(attr_value(node, "dilations"), 1))


def same_pads(graph: Graph, node: onnx.NodeProto) -> list[int] | None:
    """The ``pads`` (top, left, bottom, right) an ``auto_pad="SAME_*"`` window node adds to
    its input at the native size; None for other nodes or an unknown input size."""
    auto = str(attr_value(node, "auto_pad", "NOTSET"))
    in_shape = graph.shape(node.input[0]) if node.input else None
    if not auto.startswith("SAME") or not in_shape or len(in_shape) != 4 or None in in_shape[2:]:
        return None
    k, s, d = _window_args(graph, node)
    same = [same_padding(int(in_shape[2 + a]), k[a], s[a], d[a]) for a in (0, 1)]  # type: ignore[arg-type]
    if auto == "SAME_LOWER":  # the odd zero goes before
        same = [pad[::-1] for pad in same]
    return [same[0][0], same[1][0], same[0][1], same[1][1]]


def _window(graph: Graph, node: onnx.NodeProto, in_shape, out_shape, ys: Span, xs: Span,
            geo: BodyGeometry) -> tuple[Span, Span]:
    k, s, d = _window_args(graph, node)
    pads = list(attr_value(node, "pads", [0, 0, 0, 0]))  # type: ignore[call-overload]
    begin = (int(pads[0]), int(pads[1])) if len(pads) == 4 else (0, 0)
    same = same_pads(graph, node)
    if same is not None:
        begin = (same[0], same[1])
    if any(pads) or (same is not None and any(same)):
        geo.padded.append(node.name)
    if attr_value(node, "ceil_mode", 0) and in_shape and out_shape and None not in in_shape + out_shape:
        for a in (0, 1):
            size = in_shape[2 + a] + int(pads[a]) + int(pads[a + 2]) if len(pads) == 4 else in_shape[2 + a]
            if out_shape[2 + a] != (size - d[a] * (k[a] - 1) - 1) // s[a] + 1:
                geo.padded.append(node.name)
                break
    return ys.conv(k[0], s[0], begin[0], d[0]), xs.conv(k[1], s[1], begin[1], d[1])


def _pad(graph: Graph, node: onnx.NodeProto, ys: Span, xs: Span,
         geo: BodyGeometry) -> tuple[Span, Span]:
    pads = attr_value(node, "pads")
    if pads is None and len(node.input) > 1:
        value = graph.const(node.input[1])
        pads = None if value is None else value.tolist()
    if pads is None or len(pads) != 8 or (len(node.input) > 3 and node.input[3]):  # type: ignore[arg-type]
        geo.unproven.append(node.name)
        return ys, xs
    pads = [int(p) for p in pads]  # type: ignore[union-attr]
    if any(pads):
        geo.padded.append(node.name)
    return (Span(ys.lo - pads[2] * ys.jump, ys.hi, ys.jump),
            Span(xs.lo - pads[3] * xs.jump, xs.hi, xs.jump))
