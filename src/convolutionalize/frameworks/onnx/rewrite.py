"""Rewriting an analysed ONNX graph: one function per head op, registered by
``(op_type, since_version)`` (see :mod:`.registry`), then dynamic body reshapes, symbolic
input/output dims, dead-node removal and a topological sort."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import NotConvolutionalizable
from ...geometry import PoolMode, Span
from ...plan import HeadPlan
from ...weights import linear_to_oihw
from .geometry import same_pads
from .graph import (
    BINARY,
    ELEMENTWISE,
    QDQ,
    QLINEAR_BINARY,
    QLINEAR_ELEMENTWISE,
    QLINEAR_LINEAR,
    SHAPE_OPS,
    Graph,
    Quantized,
    all_inputs,
    attr_value,
    describe_node,
    set_attribute,
)
from .head import SOFTMAX_OPS, Head, HeadNode, Value, linear_weight
from .registry import Registry, since_version

logger = logging.getLogger(__name__)


class _Rewrite:
    """New nodes and initializers replacing the head, one registered function per op type."""

    def __init__(self, graph: Graph, plan: HeadPlan, pool: PoolMode,
                 dilation: tuple[int, int] = (1, 1)) -> None:
        self.graph, self.plan, self.pool = graph, plan, pool
        self.dilation = dilation  # the head's window pool and first HxW kernel (output_stride)
        self.alias: dict[str, str] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.taken = set(graph.producer) | set(graph.inits) | {i.name for i in graph.model.graph.input}
        self.counter = 0

    def fresh(self, stem: str) -> str:
        while True:
            name = f"convolutionalize_{stem}_{self.counter}"
            self.counter += 1
            if name not in self.taken:
                self.taken.add(name)
                return name

    def src(self, name: str) -> str:
        return self.alias.get(name, name)

    def constant(self, stem: str, array: np.ndarray) -> str:
        name = self.fresh(stem)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def add(self, op: str, inputs: list[str], outputs: list[str], **attrs: object) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.fresh(op.lower()), **attrs))

    def bypass(self, hn: HeadNode) -> None:
        self.alias[hn.node.output[0]] = self.src(self.graph.data_inputs(hn.node)[0])

    def keep(self, hn: HeadNode, inputs: list[str] | None = None) -> None:
        new = onnx.NodeProto()
        new.CopyFrom(hn.node)
        del new.input[:]
        new.input.extend(inputs if inputs is not None else [self.src(n) for n in hn.node.input])
        self.nodes.append(new)


Rewriter = Callable[[_Rewrite, HeadNode], None]


def _rewrite_pool(rw: _Rewrite, hn: HeadNode) -> None:
    """A global pool -> a stride-1 window pool or nothing; the map stays NCHW unless the
    original pooled map was channels-last (then a Transpose follows)."""
    src, out = rw.src(hn.node.input[0]), hn.node.output[0]
    nhwc = hn.after.kind == "pooled" and hn.after.layout == "NHWC"
    if rw.pool == "none" and not nhwc:
        rw.bypass(hn)
        return
    pooled = rw.fresh("pooled") if nhwc else out
    if rw.pool == "none":
        pooled = src
    elif rw.dilation != (1, 1):
        _dilated_window_pool(rw, hn, src, pooled)
    else:
        op = "MaxPool" if hn.step.reduce == "max" else "AveragePool"
        rw.add(op, [src], [pooled], kernel_shape=list(rw.plan.feature.size), strides=[1, 1])
    if nhwc:
        rw.add("Transpose", [pooled], [out], perm=[0, 2, 3, 1])


def _dilated_window_pool(rw: _Rewrite, hn: HeadNode, src: str, out: str) -> None:
    """The window pool at an output stride: a dilated MaxPool, or for a mean a depthwise
    Conv with taps ``1/k`` (no padding: every window is whole)."""
    kernel, dilations = list(rw.plan.feature.size), list(rw.dilation)
    if hn.step.reduce == "max":
        rw.add("MaxPool", [src], [out], kernel_shape=kernel, strides=[1, 1], dilations=dilations)
        return
    shape = rw.graph.shape(hn.node.input[0])
    channels = shape[1] if shape and len(shape) == 4 else None
    if not channels:
        raise NotConvolutionalizable(f"output_stride: {describe_node(hn.node)}: the pooled map's "
                                     "channel count is unknown")
    dtype = helper.tensor_dtype_to_np_dtype(rw.graph.types.get(hn.node.input[0]) or onnx.TensorProto.FLOAT)
    weight = np.full((channels, 1, *kernel), 1.0 / (kernel[0] * kernel[1]), dtype)
    rw.add("Conv", [src, rw.constant("window_mean", weight)], [out], kernel_shape=kernel,
           dilations=dilations, group=channels)


def _rewrite_quantized_pool(rw: _Rewrite, hn: HeadNode) -> None:
    """QLinearGlobalAveragePool -> onnxruntime's QLinearAveragePool over the native feature
    size at stride 1, with the same scales and zero points: it averages the same integers and
    requantizes them alike (measured: the same integers on random int8 maps). With pool="none"
    a 1x1 window, which still requantizes each cell to the pooled scale the head reads."""
    if rw.dilation != (1, 1):
        raise NotConvolutionalizable(f"output_stride: {describe_node(hn.node)} has no dilated form")
    kernel = [1, 1] if rw.pool == "none" else list(rw.plan.feature.size)
    node = helper.make_node("QLinearAveragePool", [rw.src(n) for n in hn.node.input], [hn.node.output[0]],
                            name=rw.fresh("qlinearaveragepool"), domain="com.microsoft",
                            kernel_shape=kernel, strides=[1, 1])
    rw.nodes.append(node)


def _rewrite_shape(rw: _Rewrite, hn: HeadNode) -> None:
    """A shape run disappears; only a pooled map's layout change survives as a Transpose."""
    if not hn.run_end:
        rw.bypass(hn)
        return
    src = rw.src(_run_input(rw, hn))
    have = hn.before.layout if hn.before.kind == "pooled" else "NCHW"
    want = hn.after.layout if hn.after.kind == "pooled" else "NCHW"
    if have == want:
        rw.alias[hn.node.output[0]] = src
        return
    perm = [0, 2, 3, 1] if want == "NHWC" else [0, 3, 1, 2]
    rw.add("Transpose", [src], [hn.node.output[0]], perm=perm)


def _run_input(rw: _Rewrite, hn: HeadNode) -> str:
    return rw.graph.data_inputs(hn.node)[0]


def _rewrite_linear(rw: _Rewrite, hn: HeadNode) -> None:
    if hn.before.kind == "pooled":  # MatMul on a channels-last pooled map: per location
        rw.keep(hn)
        return
    if hn.node.op_type in QLINEAR_LINEAR:
        _rewrite_qoperator_linear(rw, hn)
        return
    weight = linear_weight(rw.graph, hn.node)
    out_f = weight.shape[0]
    quantized = rw.graph.quantized(hn.node.input[1])
    kernel, kernel_shape = (_kernel(rw, hn, weight) if quantized is None
                            else _quantized_kernel(rw, hn, quantized))
    inputs = [rw.src(hn.node.input[0]), kernel]
    if hn.node.op_type == "Gemm" and len(hn.node.input) > 2 and hn.node.input[2]:
        bias = rw.graph.quantized(hn.node.input[2])
        beta = float(attr_value(hn.node, "beta", 1.0))  # type: ignore[arg-type]
        if bias is not None and beta == 1.0 and bias.per_tensor and bias.values.size == out_f:
            inputs.append(_dequantized(rw, "bias", bias.values.reshape(-1), bias, 0))
        else:
            inputs.append(rw.constant("bias", _gemm_bias(rw.graph, hn.node, out_f)))
    dilated = {"dilations": list(rw.dilation)} if rw.dilation != (1, 1) and hn.before.kind == "flat" else {}
    rw.add("Conv", inputs, [hn.node.output[0]], kernel_shape=kernel_shape, **dilated)


def _rewrite_qoperator_linear(rw: _Rewrite, hn: HeadNode) -> None:
    """QGemm/QLinearMatMul -> QLinearConv: the same int8 integers laid out as the kernel, the
    same input, weight and output scales and zero points (per output channel stays per output
    channel). QGemm's int32 bias C is quantized with scale a_scale * b_scale and zero point 0,
    as QLinearConv's B is: it carries over as it is."""
    node, graph = hn.node, rw.graph
    quantized = graph.qoperator_weight(node)
    assert quantized is not None  # the analysis refused it otherwise
    values = quantized.values if quantized.axis == 0 else quantized.values.T
    kernel = _oihw(hn, np.ascontiguousarray(values))
    x, x_scale, x_zero = (rw.src(n) for n in node.input[:3])
    w_scale, w_zero = node.input[4], node.input[5] if len(node.input) > 5 else ""
    if not w_zero:
        w_zero = rw.constant("weight_zero_point", np.zeros_like(quantized.scale, kernel.dtype))
    y_scale, y_zero = (node.input[7:9] if node.op_type == "QGemm" else node.input[6:8])
    inputs = [x, x_scale, x_zero, rw.constant("weight_quantized", kernel), w_scale, w_zero, y_scale,
              y_zero]
    if node.op_type == "QGemm" and len(node.input) > 6 and node.input[6]:
        inputs.append(rw.constant("bias_quantized", _qgemm_bias(graph, node, kernel.shape[0])))
    dilated = {"dilations": list(rw.dilation)} if rw.dilation != (1, 1) and hn.before.kind == "flat" else {}
    rw.add("QLinearConv", inputs, [node.output[0]], kernel_shape=list(kernel.shape[2:]), **dilated)


def _qgemm_bias(graph: Graph, node: onnx.NodeProto, out_f: int) -> np.ndarray:
    bias = graph.inits.get(node.input[6])
    array = None if bias is None else numpy_helper.to_array(bias)
    if array is None or array.dtype != np.int32 or array.size not in (1, out_f):
        raise NotConvolutionalizable(f"{describe_node(node)}: bias '{node.input[6]}' is not an int32 "
                                     f"initializer of {out_f} values")
    return np.ascontiguousarray(np.broadcast_to(array.reshape(-1), (out_f,)))


def _oihw(hn: HeadNode, weight: np.ndarray) -> np.ndarray:
    """The ``(out, in)`` Linear weight as the Conv kernel of the head's input."""
    if hn.before.kind == "flat":
        assert hn.before.flat is not None
        return linear_to_oihw(weight, *hn.before.flat, layout=hn.before.flat_layout)
    return weight.reshape(weight.shape[0], -1, 1, 1)


def _kernel(rw: _Rewrite, hn: HeadNode, weight: np.ndarray) -> tuple[str, list[int]]:
    """The float kernel and its (height, width)."""
    kernel = _oihw(hn, weight)
    return rw.constant("weight", kernel), list(kernel.shape[2:])


def _quantized_kernel(rw: _Rewrite, hn: HeadNode, quantized: Quantized) -> tuple[str, list[int]]:
    """A quantized weight stays quantized: its integers laid out as the kernel (the same moves
    as the float weight), dequantized per tensor or per output channel (axis 0)."""
    node = hn.node
    trans_b = node.op_type == "Gemm" and bool(attr_value(node, "transB", 0))
    out_axis = 0 if trans_b else 1  # where the outputs are in the stored weight
    if float(attr_value(node, "alpha", 1.0)) != 1.0 or not (  # type: ignore[arg-type]
            quantized.per_tensor or quantized.axis % 2 == out_axis):
        raise NotConvolutionalizable(f"{describe_node(node)}: its quantized weight is scaled by alpha "
                                     "or quantized per input feature; only per-tensor or per-output "
                                     "quantization keeps the kernel quantized")
    kernel = _oihw(hn, np.ascontiguousarray(quantized.values if trans_b else quantized.values.T))
    return _dequantized(rw, "weight", kernel, quantized, 0), list(kernel.shape[2:])


def _dequantized(rw: _Rewrite, name: str, values: np.ndarray, quantized: Quantized, axis: int) -> str:
    out = rw.fresh(f"{name}_dequantized")
    inputs = [rw.constant(f"{name}_quantized", values), rw.constant(f"{name}_scale", quantized.scale),
              rw.constant(f"{name}_zero_point", quantized.zero_point)]
    rw.add("DequantizeLinear", inputs, [out], **({} if quantized.per_tensor else {"axis": axis}))
    return out


def _gemm_bias(graph: Graph, node: onnx.NodeProto, out_f: int) -> np.ndarray:
    bias = graph.const(node.input[2])
    if bias is None or bias.size not in (1, out_f) or (bias.ndim == 2 and bias.shape[0] != 1):
        raise NotConvolutionalizable(f"{describe_node(node)}: bias '{node.input[2]}' is not a constant "
                                     f"of {out_f} values")
    beta = float(attr_value(node, "beta", 1.0))  # type: ignore[arg-type]
    bias = np.broadcast_to(bias.reshape(-1), (out_f,))
    return (bias * beta).astype(bias.dtype) if beta != 1.0 else np.array(bias)


def _rewrite_keep(rw: _Rewrite, hn: HeadNode) -> None:
    """Elementwise and per-location ops: unchanged, a feature-vector constant as (F, 1, 1)."""
    inputs = [rw.src(n) for n in hn.node.input]
    if hn.before.kind == "vector" and hn.node.op_type in BINARY | QLINEAR_BINARY:
        for i, name in enumerate(hn.node.input):
            array = rw.graph.const(name) if name in rw.graph.static else None
            if array is not None and array.size > 1:
                inputs[i] = rw.constant("operand", array.reshape(-1, 1, 1))
    rw.keep(hn, inputs)


def _rewrite_layernorm(rw: _Rewrite, hn: HeadNode) -> None:
    if hn.before.kind == "pooled":
        rw.keep(hn)
        return
    last, normed = rw.fresh("nhwc"), rw.fresh("normed")
    rw.add("Transpose", [rw.src(hn.node.input[0])], [last], perm=[0, 2, 3, 1])
    rw.keep(hn, [last, *hn.node.input[1:]])
    rw.nodes[-1].output[0] = normed
    set_attribute(rw.nodes[-1], "axis", -1)
    rw.add("Transpose", [normed], [hn.node.output[0]], perm=[0, 3, 1, 2])


def _rewrite_softmax(rw: _Rewrite, hn: HeadNode) -> None:
    """Opset 13+: a softmax over the classes axis; on the map that is axis 1 (NCHW)."""
    rw.keep(hn)
    if hn.before.kind == "vector":
        set_attribute(rw.nodes[-1], "axis", 1)


def _rewrite_softmax_coerced(rw: _Rewrite, hn: HeadNode) -> None:
    """Opsets 1-12 flatten the input to 2-D at ``axis``: on channels-last data with ``axis=3``
    that is ``(N*H*W, C)``, one softmax over the channels per location."""
    if hn.before.kind == "pooled" and hn.before.layout == "NHWC":
        rw.keep(hn)
        set_attribute(rw.nodes[-1], "axis", 3)
        return
    last, done = rw.fresh("nhwc"), rw.fresh(hn.node.op_type.lower())
    rw.add("Transpose", [rw.src(hn.node.input[0])], [last], perm=[0, 2, 3, 1])
    rw.keep(hn, [last])
    rw.nodes[-1].output[0] = done
    set_attribute(rw.nodes[-1], "axis", 3)
    rw.add("Transpose", [done], [hn.node.output[0]], perm=[0, 3, 1, 2])


def _rewrite_quantize(rw: _Rewrite, hn: HeadNode) -> None:
    """Unchanged; per channel of a vector, the channels are axis 1 of the map."""
    rw.keep(hn)
    if hn.before.kind == "vector" and attr_value(hn.node, "axis") is not None:
        set_attribute(rw.nodes[-1], "axis", 1)


def _rewrite_dropout(rw: _Rewrite, hn: HeadNode) -> None:
    """The identity at inference (its mask, unused, goes with it)."""
    rw.bypass(hn)


def _rewrite_batchnorm(rw: _Rewrite, hn: HeadNode) -> None:
    """Unchanged on the map, without the (unused) training outputs."""
    rw.keep(hn)
    del rw.nodes[-1].output[1:]


def _rewrite_batchnorm_spatial(rw: _Rewrite, hn: HeadNode) -> None:
    """Opsets 7-8: ``spatial`` dropped; with ``spatial=0`` the per-activation statistics of a
    vector or 1x1 map are one per channel, stored 1-D."""
    inputs = [rw.src(hn.node.input[0])]
    for name in hn.node.input[1:5]:
        array = rw.graph.const(name)
        inputs.append(name if array is None or array.ndim == 1 else
                      rw.constant("statistic", array.reshape(-1)))
    rw.keep(hn, inputs)
    node = rw.nodes[-1]
    del node.output[1:]
    kept = [a for a in node.attribute if a.name != "spatial"]
    del node.attribute[:]
    node.attribute.extend(kept)


REWRITES: Registry[Rewriter] = Registry("head rewrite")
REWRITES.register("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "AveragePool",
                  "MaxPool")(_rewrite_pool)
REWRITES.register(*SHAPE_OPS)(_rewrite_shape)
REWRITES.register(*(ELEMENTWISE - {"Dropout"}), *QLINEAR_ELEMENTWISE, "Conv", "LRN")(_rewrite_keep)
REWRITES.register("QLinearGlobalAveragePool")(_rewrite_quantized_pool)
REWRITES.register("Dropout", versions=(7, 10, 12, 13, 22))(_rewrite_dropout)
REWRITES.register(*sorted(QDQ))(_rewrite_quantize)
REWRITES.register("Gemm", "MatMul", *QLINEAR_LINEAR)(_rewrite_linear)
REWRITES.register("LayerNormalization", versions=(17,))(_rewrite_layernorm)
REWRITES.register(*SOFTMAX_OPS, versions=(1, 11))(_rewrite_softmax_coerced)
REWRITES.register(*SOFTMAX_OPS, versions=(13,))(_rewrite_softmax)
REWRITES.register("BatchNormalization", versions=(7,))(_rewrite_batchnorm_spatial)
REWRITES.register("BatchNormalization", versions=(9, 14, 15))(_rewrite_batchnorm)


def rewrite(graph: Graph, plan: HeadPlan, head: Head, pool: PoolMode,
            spans: dict[str, tuple[Span, Span]], dilation: tuple[int, int] = (1, 1),
            body: Callable[[onnx.ModelProto], None] | None = None) -> onnx.ModelProto:
    """Replace the head of ``graph.model`` (the adapter's private copy) and clean up: every
    graph output becomes a map, in the original order. ``dilation`` spreads the head's
    window pool and first HxW kernel (an output stride below the network's); ``body``
    rewrites the body nodes (the à trous rewrite) before the clean-up."""
    model, g = graph.model, graph.model.graph
    rw = _Rewrite(graph, plan, "window" if pool == "global" else pool, dilation)
    if not (pool == "global" and plan.global_pooling):
        head_names = {hn.node.name for hn in head.nodes}
        for hn in head.nodes:
            handler = REWRITES.lookup(hn.node.op_type, graph.opset)
            if handler is None:
                raise NotConvolutionalizable(f"no rewrite for {describe_node(hn.node)}, "
                                             f"{REWRITES.describe(hn.node.op_type, graph.opset)}")
            handler(rw, hn)
        for name, _ in head.outputs:
            if pool == "global":  # a flatten head: the mean of the window map
                _append_mean(rw, graph.opset, _rename_output(rw, name), name)
            elif rw.src(name) != name:
                rw.add("Identity", [rw.src(name)], [name])
        kept = [n for n in g.node if n.name not in head_names]
        del g.node[:]
        g.node.extend(kept + rw.nodes)
        g.initializer.extend(rw.inits)
    _native_same_pads(graph)
    _dynamic_body_reshapes(graph, rw, spans, {hn.node.name for hn in head.nodes})
    _set_io_dims(graph, pool, head)
    if body is not None:
        body(model)
    _toposort(g)
    _remove_dead(model)
    del g.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


def _native_same_pads(graph: Graph) -> None:
    """Strided ``auto_pad="SAME_*"`` windows get the explicit pads they add at the native size:
    "SAME" pads by how the input's size falls on the stride, so on images of other sizes
    every cell would move and tiles would disagree (as in ``frameworks/torch/padding.py``)."""
    for node in graph.model.graph.node:
        pads = same_pads(graph, node)
        if pads is not None and any(s > 1 for s in attr_value(node, "strides", [1, 1])):  # type: ignore[attr-defined]
            set_attribute(node, "auto_pad", "NOTSET")
            set_attribute(node, "pads", pads)


def _rename_output(rw: _Rewrite, name: str) -> str:
    """Give the new node that writes the graph output ``name`` a fresh output name."""
    src = rw.src(name)
    if src != name:
        return src
    fresh = rw.fresh("map")
    for node in rw.nodes:
        for i, out in enumerate(node.output):
            if out == name:
                node.output[i] = fresh
    return fresh


def _append_mean(rw: _Rewrite, opset: int, src: str, out: str) -> None:
    """The mean over the map (ReduceMean takes its axes as an input from opset 18)."""
    if (since_version("ReduceMean", opset) or 0) >= 18:
        rw.add("ReduceMean", [src, rw.constant("axes", np.array([2, 3], np.int64))], [out],
               keepdims=0)
    else:
        rw.add("ReduceMean", [src], [out], axes=[2, 3], keepdims=0)


def _dynamic_body_reshapes(graph: Graph, rw: _Rewrite, spans: dict[str, tuple[Span, Span]],
                           head: set[str]) -> None:
    """Body Reshapes with a constant shape that spells out H and W: read H, W at run time."""
    g = graph.model.graph
    first_node, first_init = len(rw.nodes), len(rw.inits)
    for node in list(g.node):
        if node.op_type != "Reshape" or node.name in head or node.input[0] not in spans:
            continue
        target = graph.const(node.input[1])
        in_shape = graph.shape(node.input[0])
        if not in_shape or None in in_shape[-2:]:  # shape inference lost it: H, W are kept
            in_shape = (1, None, *target[-2:]) if target is not None and len(target) >= 3 else None
        if target is None or not in_shape or len(target) < 3 or tuple(target[-2:]) != tuple(
                in_shape[-2:]) or tuple(in_shape[-2:]) == (1, 1):
            continue
        shape_of, parts = rw.fresh("shape"), []
        rw.add("Shape", [node.input[0]], [shape_of])
        head_dims = [int(v) for v in target[:-2]]
        batch = head_dims[0] == in_shape[0]
        if batch:
            parts.append(_slice(rw, shape_of, 0, 1))
        rest = head_dims[1:] if batch else head_dims
        if rest:
            parts.append(rw.constant("dims", np.array(rest, np.int64)))
        parts.append(_slice(rw, shape_of, -2, 2**62))
        dynamic = rw.fresh("dynamic_shape")
        rw.add("Concat", parts, [dynamic], axis=0)
        node.input[1] = dynamic
        logger.debug("body Reshape '%s' reads H, W at run time", node.name)
    g.node.extend(rw.nodes[first_node:])
    g.initializer.extend(rw.inits[first_init:])


def _slice(rw: _Rewrite, src: str, start: int, end: int) -> str:
    """``src[start:end]`` of a 1-D tensor (Slice-1, before opset 10, takes attributes)."""
    out = rw.fresh("dims")
    if since_version("Slice", rw.graph.opset) == 1:
        rw.add("Slice", [src], [out], starts=[start], ends=[end], axes=[0])
    else:
        rw.add("Slice", [src, rw.constant("start", np.array([start], np.int64)),
                         rw.constant("end", np.array([end], np.int64))], [out])
    return out


IO_NAMES = ("batch", "height", "width")


def _set_io_dims(graph: Graph, pool: PoolMode, head: Head) -> None:
    """Batch, height and width of the input symbolic (a name the graph gave them is kept when
    it is one name per axis), and every output a map of (batch, classes, rows, cols)."""
    g = graph.model.graph
    image = next(i for i in g.input if i.name == graph.image)
    axes = (2, 3) if graph.layout == "NCHW" else (1, 2)
    dims = image.type.tensor_type.shape.dim
    given = [dims[a].dim_param for a in (0, *axes)]
    for axis, param, name in zip((0, *axes), IO_NAMES, given):
        if not name or name == "?" or name.lstrip("-").isdigit() or given.count(name) > 1:
            dims[axis].Clear()
            dims[axis].dim_param = param
    by_name = {o.name: o for o in g.output}
    for name, value in head.outputs:
        _set_output_dims(by_name[name], dims[0], graph.shape(name), pool, value)


def _set_output_dims(output: onnx.ValueInfoProto, batch_dim: onnx.TensorShapeProto.Dimension,
                     native: tuple[int | None, ...] | None, pool: PoolMode, value: Value) -> None:
    t = output.type.tensor_type
    batch, classes = onnx.TensorShapeProto.Dimension(), onnx.TensorShapeProto.Dimension()
    batch.CopyFrom(batch_dim)
    last = value.kind == "pooled" and value.layout == "NHWC"
    count = native[-1 if value.kind == "vector" or last else 1] if native else None
    if count is not None:
        classes.dim_value = count
    t.ClearField("shape")
    t.shape.dim.append(batch)
    if pool == "global" and value.kind == "vector":
        t.shape.dim.append(classes)
        return
    if pool == "global":  # a pooled head kept as it was: (N, C, 1, 1) or (N, 1, 1, C)
        ones = [onnx.TensorShapeProto.Dimension(dim_value=1) for _ in range(2)]
        t.shape.dim.extend([*ones, classes] if last else [classes, *ones])
        return
    rows, cols = onnx.TensorShapeProto.Dimension(), onnx.TensorShapeProto.Dimension()
    rows.dim_param, cols.dim_param = "rows", "cols"
    t.shape.dim.extend([rows, cols, classes] if last else [classes, rows, cols])


def _remove_dead(model: onnx.ModelProto) -> None:
    g = model.graph
    live = {o.name for o in g.output}
    kept = []
    for node in reversed(g.node):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(all_inputs(node))
    del g.node[:]
    g.node.extend(reversed(kept))
    inits = [i for i in g.initializer if i.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)


def _toposort(g: onnx.GraphProto) -> None:
    """Kahn's algorithm, keeping the original order among ready nodes."""
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    produced = {o for n in g.node for o in n.output}
    pending = list(g.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            needs = [n for n in all_inputs(node) if n in produced]
            if all(n in ready for n in needs):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise NotConvolutionalizable(f"the rewritten graph has a cycle at node '{rest[0].name}'")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
