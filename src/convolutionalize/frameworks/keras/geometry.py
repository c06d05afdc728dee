"""Body geometry of a Keras model: spans composed over its convolutions and pools (Keras/TF
"same" padding included), with zero padding and global-context layers named."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...geometry import BodyGeometry, Span, same_padding
from .graph import ELEMENTWISE, GLOBAL_OPS, SPATIAL_OPS, Call, axis_of

if TYPE_CHECKING:
    from .head import Analysis


def body_geometry(a: Analysis) -> BodyGeometry:
    """Compose spans from the input to the feature map, collecting padding / context notes."""
    return body_spans(a)[0]


def body_spans(a: Analysis) -> tuple[BodyGeometry, dict[int, tuple[Span, Span]]]:
    """The body geometry and every body tensor's spans (by ``id`` of the tensor)."""
    spans: dict[int, tuple[Span, Span]] = {id(a.graph.input): (Span(), Span())}
    geo = BodyGeometry(Span(), Span())
    head = {id(c) for c in a.head}
    for call in a.graph.calls:
        if id(call) in head or any(id(t) not in a.values for t in call.inputs):
            continue
        maps = [t for t in call.inputs if a.values[id(t)].kind == "map" and id(t) in spans]
        if not maps:
            continue
        ys = Span.union([spans[id(t)][0] for t in maps])
        xs = Span.union([spans[id(t)][1] for t in maps])
        if ys is None or xs is None:
            geo.unproven.append(call.name)
            ys = max((spans[id(t)][0] for t in maps), key=lambda s: s.jump)
            xs = max((spans[id(t)][1] for t in maps), key=lambda s: s.jump)
        span = _apply(a, call, ys, xs, geo)
        for t in call.outputs:
            spans[id(t)] = span
    geo.y, geo.x = spans[id(a.feature)]
    return geo, spans


def window_of(call: Call) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The kernel, strides and dilation of a convolution or pooling call."""
    op, pooling = call.op, "Pooling" in call.kind
    kernel = tuple(op.pool_size if pooling else op.kernel_size)
    return kernel, tuple(op.strides or kernel), (1, 1) if pooling else tuple(op.dilation_rate)


def same_pads(a: Analysis, call: Call) -> tuple[tuple[int, int], ...]:
    """The zeros (before, after) along height and width that a ``padding="same"`` call adds
    to its input at the native size."""
    kernel, stride, dil = window_of(call)
    in_shape = a.shapes[id(call.inputs[0])]
    return tuple(same_padding(in_shape[ax], k, s, d) for ax, k, s, d in zip(a.axes, kernel, stride, dil))


def _apply(a: Analysis, call: Call, ys: Span, xs: Span, geo: BodyGeometry) -> tuple[Span, Span]:
    op, kind = call.op, call.kind
    out_value = a.values[id(call.outputs[0])]
    if kind in SPATIAL_OPS:
        kernel, stride, dil = window_of(call)
        pad = (0, 0)
        if op.padding == "same":
            pad = tuple(before for before, _ in same_pads(a, call))
            if any(k > 1 for k in kernel):
                geo.padded.append(call.name)
        return (ys.conv(kernel[0], stride[0], pad[0], dil[0]), xs.conv(kernel[1], stride[1], pad[1], dil[1]))
    if kind in ("ZeroPadding2D", "Cropping2D"):
        (top, _), (left, _) = op.padding if kind == "ZeroPadding2D" else op.cropping
        sign = 1 if kind == "ZeroPadding2D" else -1
        if kind == "ZeroPadding2D" and any(any(p) for p in op.padding):
            geo.padded.append(call.name)
        return (Span(ys.lo - sign * top * ys.jump, ys.hi - sign * top * ys.jump, ys.jump),
                Span(xs.lo - sign * left * xs.jump, xs.hi - sign * left * xs.jump, xs.jump))
    if kind in GLOBAL_OPS or out_value.kind != "map":
        geo.global_context.append(call.name)  # e.g. a squeeze-excitation GlobalAveragePooling2D
        return ys, xs
    if not _local(a, call):
        geo.unproven.append(call.name)
    return ys, xs


def _local(a: Analysis, call: Call) -> bool:
    """Per-location layers: elementwise, channel-only, acting on the channel axis, or moving axes."""
    kind, op = call.kind, call.op
    if kind in ("Dense", "EinsumDense"):
        return a.layout == "NHWC"
    if kind in ("BatchNormalization", "LayerNormalization", "Normalization", "Softmax", "Concatenate"):
        axis = axis_of(op)
        axes = axis if isinstance(axis, (list, tuple)) else [axis]
        return [x % 4 for x in axes] == [a.channel_axis]
    if kind == "Conv2D" or kind in ELEMENTWISE:
        return True
    if kind == "Permute":  # spans follow the image axes, wherever the permute puts them
        return True
    return False
