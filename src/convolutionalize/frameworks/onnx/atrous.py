"""Output strides below the network's for ONNX graphs: the à trous rewrite (see the PyTorch
adapter's :mod:`convolutionalize.frameworks.torch.atrous` for the math).

The strided Conv/MaxPool/AveragePool nodes whose input already has a cell spacing of ``s`` or
more get ``strides`` 1, and every window node after them has its ``dilations`` and ``pads``
multiplied by ``input spacing / s`` (a ``Pad`` node's pads too). An AveragePool that must be
dilated becomes a depthwise Conv with constant weights ``1/k`` (with ``count_include_pad=0``
and pads: a sum divided by a second Conv counting the real pixels). The head's window pool
and its first HxW convolution are dilated by ``network stride / s`` (see :mod:`.rewrite`), and
the trailing cells whose window passes the image's far edge are cut by a Slice computed from
the input's Shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import NotConvolutionalizable
from ...geometry import BodyGeometry, Span, possible_output_strides
from ...plan import HeadPlan
from .graph import Graph, attr_value, describe_node, set_attribute

__all__ = ["Atrous", "crop_to_windows", "plan_atrous"]

Pair = tuple[int, int]
WINDOWS = ("Conv", "MaxPool", "AveragePool")


@dataclass(frozen=True)
class Atrous:
    """What changes for one output stride: per body node name, (stride to 1?, dilation factor)."""

    stride: Pair
    head_dilation: Pair
    nodes: dict[str, tuple[bool, Pair]]

    def apply(self, model: onnx.ModelProto, graph: Graph) -> None:
        """Rewrite the body nodes of ``model`` (the converted graph) in place."""
        g = model.graph
        new_nodes: list[onnx.NodeProto] = []
        counter = [0]

        def fresh(stem: str) -> str:
            counter[0] += 1
            return f"convolutionalize_atrous_{stem}_{counter[0]}"

        for node in list(g.node):
            if node.name not in self.nodes:
                continue
            unstride, factor = self.nodes[node.name]
            if node.op_type == "Pad":
                _scale_pad(graph, model, node, factor, fresh)
            elif node.op_type == "AveragePool":
                new_nodes += _avg_as_conv(graph, model, node, unstride, factor, fresh)
                g.node.remove(node)
            else:
                _dilate(node, unstride, factor)
        g.node.extend(new_nodes)


def plan_atrous(graph: Graph, plan: HeadPlan, body: BodyGeometry,
                spans: dict[str, tuple[Span, Span]], output_stride: int) -> Atrous:
    """The à trous rewrite for ``output_stride``, or a refusal naming what prevents it."""
    network = (body.y.jump, body.x.jump)
    if plan.adaptive_pool is not None and plan.adaptive_pool.pool_to != plan.feature.size:
        raise NotConvolutionalizable(f"output_stride: the head's adaptive pool '{plan.adaptive_pool.node}' "
                                     "becomes a strided fixed pool; only the network stride is possible")
    inputs = _inputs(graph, spans)
    strided = {name: (ys.jump, xs.jump) for name, (node, (ys, xs)) in inputs.items()
               if node.op_type in WINDOWS and _pair(attr_value(node, "strides"), 1) != (1, 1)}
    possible = possible_output_strides(network, strided.values(), output_stride)
    s = output_stride
    if graph.opset < 10:
        raise NotConvolutionalizable(f"output_stride={s}: the graph's opset {graph.opset} predates "
                                     "MaxPool dilations and Slice with inputs (10); only the network "
                                     f"stride {network[0]} is possible")
    blocked = {*body.global_context, *body.unproven}
    nodes: dict[str, tuple[bool, Pair]] = {}
    for name, (node, (ys, xs)) in inputs.items():
        factor = (max(ys.jump // s, 1), max(xs.jump // s, 1))
        unstride = name in strided and ys.jump >= s
        if factor == (1, 1) and not unstride:
            continue
        jump = max(ys.jump, xs.jump)  # at s == jump a node keeps its taps but loses its stride
        allowed = [p for p in possible if p > jump or (p == jump and not unstride)]
        if name in blocked:
            raise NotConvolutionalizable(
                f"output_stride={s}: {describe_node(node)} sees the whole map or is not proven "
                "local, so it would compute something else on a denser map; possible output "
                f"strides: {', '.join(map(str, allowed))}")
        if node.op_type in WINDOWS:
            _check_window(node, unstride, factor, s, allowed)
            nodes[name] = (unstride, factor)
        elif node.op_type == "Pad":
            nodes[name] = (False, factor)
        elif node.op_type in ("LpPool", "ConvInteger", "QLinearConv", "QLinearAveragePool",
                              "ConvTranspose", "MaxUnpool"):
            raise NotConvolutionalizable(
                f"output_stride={s}: {describe_node(node)} has no dilated form here; possible "
                f"output strides: {', '.join(map(str, allowed))}")
    return Atrous((s, s), (network[0] // s, network[1] // s), nodes)


def _check_window(node: onnx.NodeProto, unstride: bool, factor: Pair, s: int, allowed: list[int]) -> None:
    auto = str(attr_value(node, "auto_pad", "NOTSET"))
    if auto in ("NOTSET", "VALID"):
        return
    kernel = _pair(attr_value(node, "kernel_shape"), 1)
    if unstride or any(k % 2 == 0 for k in kernel):
        raise NotConvolutionalizable(
            f"output_stride={s}: {describe_node(node)} has auto_pad={auto}, whose padding changes "
            f"with its stride; possible output strides: {', '.join(map(str, allowed))}")


def _inputs(graph: Graph, spans: dict[str, tuple[Span, Span]]
            ) -> dict[str, tuple[onnx.NodeProto, tuple[Span, Span]]]:
    """Each body node's first spatial input span, by node name."""
    out = {}
    for node in graph.model.graph.node:
        ins = [n for n in node.input if n in spans]
        if ins and any(o in spans for o in node.output):
            out[node.name] = (node, spans[ins[0]])
    return out


def _pair(values: object, default: int) -> Pair:
    seq = list(values) if values is not None else []  # type: ignore[call-overload]
    return (int(seq[0]), int(seq[1])) if len(seq) >= 2 else (default, default)


def _pads(node: onnx.NodeProto) -> list[int]:
    pads = [int(p) for p in attr_value(node, "pads", [0, 0, 0, 0])]  # type: ignore[union-attr]
    return pads if len(pads) == 4 else [0, 0, 0, 0]


def _scaled(pads: list[int], factor: Pair) -> list[int]:
    return [p * factor[i % 2] for i, p in enumerate(pads)]


def _dilate(node: onnx.NodeProto, unstride: bool, factor: Pair) -> None:
    if unstride:
        set_attribute(node, "strides", [1, 1])
    d = _pair(attr_value(node, "dilations"), 1)
    set_attribute(node, "dilations", [d[0] * factor[0], d[1] * factor[1]])
    if str(attr_value(node, "auto_pad", "NOTSET")) == "NOTSET":
        set_attribute(node, "pads", _scaled(_pads(node), factor))


def _scale_pad(graph: Graph, model: onnx.ModelProto, node: onnx.NodeProto, factor: Pair,
               fresh) -> None:  # type: ignore[no-untyped-def]
    """A Pad node's spatial pads (axes 2, 3: at 2, 3, 6, 7) times the factor."""
    pads = attr_value(node, "pads")
    value = None if pads is not None or len(node.input) < 2 else graph.const(node.input[1])
    raw = [int(p) for p in (pads if pads is not None else value.tolist())]  # type: ignore[union-attr]
    scaled = list(raw)
    for a, f in zip((2, 3), factor):  # as body_geometry reads them
        scaled[a], scaled[a + 4] = raw[a] * f, raw[a + 4] * f
    if pads is not None:
        set_attribute(node, "pads", scaled)
    else:
        name = fresh("pads")
        model.graph.initializer.append(numpy_helper.from_array(np.array(scaled, np.int64), name))
        node.input[1] = name


def _avg_as_conv(graph: Graph, model: onnx.ModelProto, node: onnx.NodeProto, unstride: bool,
                 factor: Pair, fresh) -> list[onnx.NodeProto]:  # type: ignore[no-untyped-def]
    """A dilated stride-1 AveragePool as a depthwise Conv (taps ``1/k``); with
    ``count_include_pad=0`` and pads, the sum divided by a Conv counting the real pixels."""
    kernel = _pair(attr_value(node, "kernel_shape"), 1)
    stride = (1, 1) if unstride else _pair(attr_value(node, "strides"), 1)
    if stride != (1, 1) or str(attr_value(node, "auto_pad", "NOTSET")) != "NOTSET" or attr_value(
            node, "ceil_mode", 0):
        raise NotConvolutionalizable(f"output_stride: {describe_node(node)} would need a stride, "
                                     "auto_pad or ceil_mode with a dilation")
    shape = graph.shape(node.input[0])
    channels = shape[1] if shape and len(shape) == 4 else None
    if not channels:
        raise NotConvolutionalizable(f"output_stride: {describe_node(node)}: channel count unknown")
    d = _pair(attr_value(node, "dilations"), 1)
    dilations = [d[0] * factor[0], d[1] * factor[1]]
    pads = _scaled(_pads(node), factor)
    count = kernel[0] * kernel[1]
    include = bool(attr_value(node, "count_include_pad", 0))
    dtype = helper.tensor_dtype_to_np_dtype(graph.types.get(node.input[0]) or onnx.TensorProto.FLOAT)
    conv = {"kernel_shape": list(kernel), "dilations": dilations, "pads": pads, "group": channels}
    divide = any(pads) and not include
    weight = np.full((channels, 1, *kernel), 1.0 if divide else 1.0 / count, dtype)
    w_name = fresh("avg_weight")
    model.graph.initializer.append(numpy_helper.from_array(weight, w_name))
    out = node.output[0]
    if not divide:
        return [helper.make_node("Conv", [node.input[0], w_name], [out], name=node.name, **conv)]
    summed, shape_of, ones, counted = fresh("sum"), fresh("shape"), fresh("ones"), fresh("count")
    one = helper.make_tensor(fresh("one"), helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [1], [1])
    return [helper.make_node("Conv", [node.input[0], w_name], [summed], name=node.name, **conv),
            helper.make_node("Shape", [node.input[0]], [shape_of], name=fresh("shape_node")),
            helper.make_node("ConstantOfShape", [shape_of], [ones], name=fresh("ones_node"), value=one),
            helper.make_node("Conv", [ones, w_name], [counted], name=fresh("count_node"), **conv),
            helper.make_node("Div", [summed, counted], [out], name=fresh("div_node"))]


def crop_to_windows(model: onnx.ModelProto, graph: Graph, outputs: list[tuple[str, bool]],
                    window: Pair, stride: Pair) -> None:
    """Cut every output map to the cells whose window lies inside the image: rows
    ``(H - wh) // sy + 1`` from the input's Shape (``outputs``: name, channels-last?)."""
    g = model.graph
    axes = [2, 3] if graph.layout == "NCHW" else [1, 2]

    def const(stem: str, values: list[int]) -> str:
        name = f"convolutionalize_cells_{stem}"
        g.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    shape_of, hw, cells, minus, divided = (f"convolutionalize_cells_{stem}"
                                           for stem in ("shape", "hw", "end", "minus", "div"))
    nodes = [helper.make_node("Shape", [graph.image], [shape_of], name="convolutionalize_cells_shape_node"),
             helper.make_node("Gather", [shape_of, const("axes_in", axes)], [hw], axis=0,
                              name="convolutionalize_cells_gather"),
             helper.make_node("Sub", [hw, const("window", list(window))], [minus],
                              name="convolutionalize_cells_sub"),
             helper.make_node("Div", [minus, const("stride", list(stride))], [divided],
                              name="convolutionalize_cells_divide"),
             helper.make_node("Add", [divided, const("one", [1, 1])], [cells],
                              name="convolutionalize_cells_add")]
    starts = const("starts", [0, 0])
    for i, (name, last) in enumerate(outputs):
        src = f"convolutionalize_cells_uncut_{i}"
        for node in g.node:
            for k, out in enumerate(node.output):
                if out == name:
                    node.output[k] = src
            for k, inp in enumerate(node.input):
                if inp == name:
                    node.input[k] = src
        axes_out = const(f"axes_{i}", [1, 2] if last else [2, 3])
        nodes.append(helper.make_node("Slice", [src, starts, cells, axes_out], [name],
                                      name=f"convolutionalize_cells_slice_{i}"))
    g.node.extend(nodes)
