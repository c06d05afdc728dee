"""Head analysis of an ONNX graph: the chain from the last feature map to the output, each
node classified and turned into a :class:`~convolutionalize.plan.HeadStep`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from onnx import helper

from ...errors import NotConvolutionalizable
from ...plan import FeatureMap, HeadPlan, HeadStep
from ...weights import FlattenLayout
from .graph import (
    BINARY,
    ELEMENTWISE,
    SHAPE_OPS,
    Graph,
    Kind,
    Layout,
    attr_value,
    describe_node,
    dims_of,
    first_line,
    image_input,
    input_layout,
)


@dataclass(frozen=True)
class Value:
    """What a head tensor is: a spatial map, a 1x1 pooled map, a flattened map or a vector."""

    kind: Kind
    layout: Layout = "NCHW"
    flat: tuple[int, int, int] | None = None
    flat_layout: FlattenLayout = "CHW"


@dataclass
class HeadNode:
    node: onnx.NodeProto
    step: HeadStep
    before: Value
    after: Value
    run_end: bool = True


@dataclass
class Head:
    """The analysed head: the feature tensor and each head node with its kinds."""

    feature: str
    nodes: list[HeadNode] = field(default_factory=list)


def _global_reduce(graph: Graph, node: onnx.NodeProto) -> Literal["avg", "max"] | None:
    """``avg``/``max`` when ``node`` pools a 4-D map over its whole H x W."""
    if not node.input or graph.rank(node.input[0]) != 4:
        return None
    op = node.op_type
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        return "avg" if op == "GlobalAveragePool" else "max"
    if op in ("ReduceMean", "ReduceMax"):
        axes = attr_value(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = graph.const(node.input[1])
            axes = None if value is None else value.tolist()
        if axes is not None and sorted(a % 4 for a in axes) in ([2, 3], [1, 2]):
            if sorted(a % 4 for a in axes) == [1, 2] and not _to_nhwc(graph, node.input[0]):
                return None
            return "avg" if op == "ReduceMean" else "max"
        return None
    if op in ("AveragePool", "MaxPool"):
        shape, out = graph.shape(node.input[0]), graph.shape(node.output[0])
        pads = list(attr_value(node, "pads", [0, 0, 0, 0]))  # type: ignore[call-overload]
        kernel = tuple(attr_value(node, "kernel_shape", ()))  # type: ignore[call-overload]
        if (shape and out and out[2:] == (1, 1) and kernel == shape[2:] and not any(pads)
                and attr_value(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID")):
            return "avg" if op == "AveragePool" else "max"
    return None


def _to_nhwc(graph: Graph, name: str) -> onnx.NodeProto | None:
    """The ``Transpose(perm=[0, 2, 3, 1])`` that produces ``name`` from an NCHW map, if any
    (tf2onnx-style graphs pool channels-last)."""
    node = graph.producer.get(name)
    if node is not None and node.op_type == "Transpose" and list(attr_value(node, "perm", [])) == [
            0, 2, 3, 1] and len(graph.users(name)) == 1:  # type: ignore[call-overload]
        return node
    return None


def _chain(graph: Graph) -> list[onnx.NodeProto]:
    """Single-input nodes from the output back to the first global pool or branch."""
    outputs = graph.model.graph.output
    if len(outputs) != 1:
        raise NotConvolutionalizable(f"the graph has {len(outputs)} outputs; a classifier has one")
    name, chain = outputs[0].name, []
    while (node := graph.producer.get(name)) is not None:
        chain.append(node)
        ins = graph.data_inputs(node)
        if node.op_type in ("Gemm", "MatMul") and len(ins) > 1:
            raise NotConvolutionalizable(f"{describe_node(node)}: its weight is not an initializer")
        if _global_reduce(graph, node):
            if (transpose := _to_nhwc(graph, node.input[0])) is not None:
                chain.append(transpose)
            break
        if len(ins) != 1:
            graph.stop = f"node '{node.name}' ({node.op_type}) has {len(ins)} data inputs"
            break
        if len(users := graph.users(ins[0])) != 1:
            graph.stop = (f"'{ins[0]}', the input of node '{node.name}' ({node.op_type}), has "
                          f"{len(users)} consumers")
            break
        name = ins[0]
    return chain[::-1]


def _head_start(graph: Graph, chain: list[onnx.NodeProto]) -> int:
    if chain and _global_reduce(graph, chain[0]):
        return 0
    if len(chain) > 1 and _to_nhwc(graph, chain[0].output[0]) and _global_reduce(graph, chain[1]):
        return 0
    for i, node in enumerate(chain):
        ins = graph.data_inputs(node)
        if len(ins) == 1 and graph.rank(ins[0]) == 4 and graph.rank(node.output[0]) == 2:
            while i > 0 and chain[i - 1].op_type in ("Transpose", "Identity"):
                i -= 1
            return i
    out = graph.model.graph.output[0].name
    stop = f"; walking back from it, {graph.stop}" if graph.stop else ""
    raise NotConvolutionalizable(
        f"no classifier head: no global pool or flatten of a 4-D feature map leads to the output "
        f"'{out}'{stop}")


def analyse(model: onnx.ModelProto, input_size: object = None) -> tuple[Graph, HeadPlan, Head]:
    """Copy ``model``, infer its shapes at the native size and find its head."""
    private = onnx.ModelProto()
    private.CopyFrom(model)
    layout = input_layout(private)
    size, channels = _native_size(private, input_size, layout)
    graph = Graph(private, size, layout)
    chain = _chain(graph)
    start = _head_start(graph, chain)
    feature = graph.data_inputs(chain[start])[0]
    fshape = graph.shape(feature)
    if fshape is None or len(fshape) != 4 or None in fshape:
        raise NotConvolutionalizable(f"the feature map '{feature}' has no known 4-D shape")
    channels_f, fh, fw = (int(v or 0) for v in fshape[1:])
    producer = graph.producer.get(feature)
    fmap = FeatureMap(producer.name if producer else feature, channels_f, (fh, fw))
    head = _classify(graph, chain[start:], feature, fmap)
    plan = HeadPlan("onnx", size, channels, fmap, tuple(h.step for h in head.nodes))
    return graph, plan, head


def _native_size(model: onnx.ModelProto, input_size: object,
                 layout: Layout) -> tuple[tuple[int, int], int]:
    image = image_input(model.graph)
    dims = dims_of(image)
    if dims is None or len(dims) != 4:
        raise NotConvolutionalizable(f"image input '{image.name}' is not 4-D")
    c_axis, axes = (1, (2, 3)) if layout == "NCHW" else (3, (1, 2))
    channels = dims[c_axis]
    if channels is None:
        raise NotConvolutionalizable(f"image input '{image.name}' has no static channel count")
    static = (dims[axes[0]], dims[axes[1]])
    if input_size is None:
        if None in static:
            raise ValueError(f"input_size is required: the ONNX input '{image.name}' has dynamic "
                             "height/width; pass the native (training) size, e.g. (224, 224)")
        return (static[0], static[1]), channels  # type: ignore[return-value]
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"input_size must be two positive ints (height, width), got {input_size!r}")
    if None not in static and tuple(size) != static:
        raise ValueError(f"input_size {size[0]}x{size[1]} differs from the ONNX input's static "
                         f"{static[0]}x{static[1]}")
    return (int(size[0]), int(size[1])), channels


def _classify(graph: Graph, nodes: list[onnx.NodeProto], feature: str, fmap: FeatureMap) -> Head:
    """Walk the head forward, giving every node a kind before and after, and a HeadStep."""
    head = Head(feature)
    value = Value("map")
    i = 0
    while i < len(nodes):
        node = nodes[i]
        if i == 0 and len(nodes) > 1 and _to_nhwc(graph, node.output[0]) and _global_reduce(
                graph, nodes[1]):
            head.nodes.append(HeadNode(node, HeadStep(node.name, "keep", "Transpose to NHWC "
                                                      "before the pool -> folded into it"),
                                       value, Value("map", "NHWC")))
            value, i = Value("map", "NHWC"), 1
            continue
        if node.op_type in SHAPE_OPS:
            j = i
            while j + 1 < len(nodes) and nodes[j + 1].op_type in SHAPE_OPS:
                j += 1
            after = _shape_run(graph, nodes[i:j + 1], value, fmap)
            desc = _run_detail(value, after, fmap)
            for k in range(i, j + 1):
                detail = desc if k == i else "(same shape run)"
                head.nodes.append(HeadNode(nodes[k], HeadStep(nodes[k].name, "flatten", detail),
                                           value, after, run_end=k == j))
            value, i = after, j + 1
            continue
        step, after = _step(graph, node, value, fmap, first=not any(
            h.step.op != "keep" for h in head.nodes))
        head.nodes.append(HeadNode(node, step, value, after))
        value, i = after, i + 1
    if value.kind in ("map", "flat"):
        raise NotConvolutionalizable(f"the head ends in a {value.kind} tensor (no Linear after "
                                     f"the flatten of '{feature}'); nothing to convolutionalize")
    return head


def _run_detail(before: Value, after: Value, fmap: FeatureMap) -> str:
    if after.kind == "flat":
        c, h, w = fmap.channels, *fmap.size
        return f"flatten {c}x{h}x{w} ({after.flat_layout}) -> removed"
    if after.kind == "pooled":
        same = after.layout == before.layout
        return f"pooled {before.layout} -> {after.layout}" + (" (no-op)" if same else " (transpose)")
    move = " (transpose to NCHW)" if before.kind == "pooled" and before.layout == "NHWC" else ""
    return f"flatten 1x1 {before.kind} map -> removed{move}"


def _step(graph: Graph, node: onnx.NodeProto, value: Value, fmap: FeatureMap,
          first: bool) -> tuple[HeadStep, Value]:
    """The HeadStep of one non-shape head node and the kind of its output."""
    op, where = node.op_type, describe_node(node)
    reduce = _global_reduce(graph, node) if value.kind == "map" else None
    if reduce is not None and first:
        keep = op.startswith(("Global", "Average", "Max")) or attr_value(node, "keepdims", 1) == 1
        return (HeadStep(node.name, "global_pool", f"{op}: global {reduce} pool over "
                         f"{fmap.size[0]}x{fmap.size[1]} ({value.layout})", reduce=reduce),
                Value("pooled", value.layout) if keep else Value("vector"))
    if value.kind == "map":
        raise NotConvolutionalizable(f"{where} acts on the feature map before it is pooled or "
                                     "flattened; it is not part of a classifier head")
    if op in ("Gemm", "MatMul") and value.kind in ("flat", "vector"):
        return _linear_step(graph, node, value), Value("vector")
    if op in ELEMENTWISE:
        _check_constants(graph, node, value)
        return HeadStep(node.name, "keep", f"{op} (elementwise)"), value
    if value.kind == "flat":
        raise NotConvolutionalizable(f"{where} acts on the flattened map before any Linear; it "
                                     "has no sliding equivalent")
    if value.kind == "vector":
        return _vector_step(graph, node, value)
    return _pooled_step(graph, node, value)


def _check_constants(graph: Graph, node: onnx.NodeProto, value: Value) -> None:
    """Constant operands of elementwise ops must broadcast the same way over a map."""
    if node.op_type not in BINARY:
        return
    for name in node.input:
        if not name or name not in graph.static:
            continue
        array = graph.const(name)
        if array is None:
            raise NotConvolutionalizable(
                f"{describe_node(node)}: operand '{name}' is computed, not a constant")
        if array.size == 1:
            continue
        if value.kind == "vector" and array.ndim <= 2 and array.shape[-1] == array.size:
            continue  # (F,) or (1, F): reshaped to (F, 1, 1) by the rewrite
        if value.kind == "pooled":
            full = (1,) * (4 - array.ndim) + array.shape
            spatial = full[2:] if value.layout == "NCHW" else full[1:3]
            if array.ndim <= 4 and spatial == (1, 1):
                continue
        raise NotConvolutionalizable(f"{describe_node(node)} combines the {value.kind} features with a "
                                     f"constant of shape {array.shape}; it cannot slide")


def _linear_step(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    weight = linear_weight(graph, node)
    out_f, in_f = weight.shape
    if value.kind == "flat":
        assert value.flat is not None
        c, h, w = value.flat
        return HeadStep(node.name, "linear", f"{node.op_type} {in_f}->{out_f} -> Conv {c}->{out_f} "
                        f"kernel {h}x{w} ({value.flat_layout})", kernel=(h, w))
    return HeadStep(node.name, "linear", f"{node.op_type} {in_f}->{out_f} -> Conv 1x1",
                    kernel=(1, 1))


def linear_weight(graph: Graph, node: onnx.NodeProto) -> np.ndarray:
    """The ``(out, in)`` weight of a Gemm or MatMul (alpha applied), or a refusal."""
    where = describe_node(node)
    if node.op_type == "Gemm" and attr_value(node, "transA", 0):
        raise NotConvolutionalizable(f"{where} has transA=1; the features must be the rows")
    if graph.data_inputs(node) != [node.input[0]]:
        raise NotConvolutionalizable(f"{where}: its weight is not an initializer (or the features "
                                     "are not its first input)")
    weight = graph.const(node.input[1])
    if weight is None or weight.ndim != 2:
        raise NotConvolutionalizable(f"{where}: weight '{node.input[1]}' is not a 2-D initializer")
    if node.op_type == "MatMul" or not attr_value(node, "transB", 0):
        weight = weight.T
    alpha = float(attr_value(node, "alpha", 1.0))  # type: ignore[arg-type]
    if alpha != 1.0:
        weight = (weight * alpha).astype(weight.dtype)
    return np.ascontiguousarray(weight)


def _vector_step(graph: Graph, node: onnx.NodeProto, value: Value) -> tuple[HeadStep, Value]:
    op, where = node.op_type, describe_node(node)
    if op == "BatchNormalization":
        return HeadStep(node.name, "batchnorm", "BatchNormalization over features -> over "
                        "channels (unchanged)"), value
    if op == "LayerNormalization" and attr_value(node, "axis", -1) in (-1, 1):
        return HeadStep(node.name, "layernorm", "LayerNormalization -> over channels"), value
    if op in ("Softmax", "LogSoftmax") and attr_value(node, "axis", -1) in (-1, 1):
        if graph.opset < 13:
            raise NotConvolutionalizable(f"{where}: opset {graph.opset} {op} coerces to 2-D; "
                                         "needs opset 13+")
        return HeadStep(node.name, "softmax", f"{op} over classes -> over channels"), value
    raise NotConvolutionalizable(
        f"{where} has no known per-location equivalent on a feature vector; supported: pooling, "
        "flatten, Gemm/MatMul, BatchNormalization, LayerNormalization, Softmax, elementwise ops")


def _pooled_step(graph: Graph, node: onnx.NodeProto, value: Value) -> tuple[HeadStep, Value]:
    """Ops on a 1x1 pooled map that act on each location alike, at any size."""
    op, nchw = node.op_type, value.layout == "NCHW"
    channel_axis = (1,) if nchw else (-1, 3)
    ok = (op == "BatchNormalization" and nchw) or (
        op == "LayerNormalization" and not nchw and attr_value(node, "axis", -1) in (-1, 3)) or (
        op in ("Softmax", "LogSoftmax") and graph.opset >= 13
        and attr_value(node, "axis", -1) in channel_axis) or (
        op == "MatMul" and not nchw and graph.data_inputs(node) == [node.input[0]]) or (
        op == "Conv" and nchw and _pointwise_conv(graph, node))
    if not ok:
        raise NotConvolutionalizable(f"{describe_node(node)} has no known per-location equivalent on a "
                                     f"pooled {value.layout} map")
    return HeadStep(node.name, "keep", f"{op} (per location)"), value


def _pointwise_conv(graph: Graph, node: onnx.NodeProto) -> bool:
    weight = graph.shape(node.input[1]) if len(node.input) > 1 else None
    return (weight is not None and tuple(weight[2:]) == (1, 1)
            and not any(attr_value(node, "pads", [0]))  # type: ignore[arg-type]
            and set(attr_value(node, "strides", [1])) == {1}  # type: ignore[arg-type]
            and attr_value(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID"))


def _shape_run(graph: Graph, run: list[onnx.NodeProto], value: Value, fmap: FeatureMap) -> Value:
    """Classify a run of shape ops by evaluating it on ``arange`` data."""
    start = graph.data_inputs(run[0])
    where = f"head nodes {', '.join(repr(n.name) for n in run)}"
    in_shape = graph.shape(start[0]) if len(start) == 1 else None
    if not in_shape or None in in_shape:
        raise NotConvolutionalizable(f"{where}: the input shape is not known at the native size")
    count = math.prod(in_shape)  # type: ignore[arg-type]
    probe = np.arange(count, dtype=np.float32).reshape(in_shape)  # type: ignore[arg-type]
    try:
        evaluated = _evaluate(graph, run, start[0], probe)
    except Exception as exc:
        raise NotConvolutionalizable(f"{where}: cannot evaluate the shape run "
                                     f"({first_line(exc)})") from exc
    out_shape, result = evaluated.shape, evaluated.reshape(-1)
    order = probe.reshape(-1)
    if value.kind == "map":
        c, (h, w) = fmap.channels, fmap.size
        if len(out_shape) == 2 and np.array_equal(result, order):
            return Value("flat", flat=(c, h, w), flat_layout="CHW")
        hwc = probe.transpose(0, 2, 3, 1).reshape(-1)
        if len(out_shape) == 2 and np.array_equal(result, hwc):
            return Value("flat", flat=(c, h, w), flat_layout="HWC")
        raise NotConvolutionalizable(f"{where} reorder the feature map into neither CHW nor HWC "
                                     "flatten order; the permutation has no sliding form")
    if value.kind == "flat" or not np.array_equal(result, order):
        raise NotConvolutionalizable(f"{where} reorder the {value.kind} features; cannot slide")
    channels = count
    if len(out_shape) == 2:
        return Value("vector")
    if len(out_shape) == 4 and out_shape[1] == channels:
        return Value("pooled", "NCHW")
    if len(out_shape) == 4 and out_shape[3] == channels:
        return Value("pooled", "NHWC")
    raise NotConvolutionalizable(f"{where} give a {out_shape} tensor; expected (N, C), "
                                 "(N, C, 1, 1) or (N, 1, 1, C)")


def _evaluate(graph: Graph, run: list[onnx.NodeProto], start: str, probe: np.ndarray) -> np.ndarray:
    """Run ``run`` (and the shape arithmetic it reads) with onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    nodes = {n.name: n for n in run}
    feeds: dict[str, np.ndarray] = {start: probe}
    inits: dict[str, onnx.TensorProto] = {}
    stack = [n for node in run for n in node.input if n]
    while stack:
        name = stack.pop()
        if name in feeds or name in inits or any(name in n.output for n in nodes.values()):
            continue
        if name in graph.inits:
            inits[name] = graph.inits[name]
            continue
        producer = graph.producer.get(name)
        if producer is not None and name in graph.static:
            nodes[producer.name] = producer
            stack.extend(n for n in producer.input if n)
            continue
        shape = graph.shape(name)  # read only by Shape: zeros of the right size will do
        if shape is None or None in shape:
            raise ValueError(f"the shape of '{name}' is not known")
        dtype = helper.tensor_dtype_to_np_dtype(graph.types.get(name) or onnx.TensorProto.FLOAT)
        feeds[name] = np.zeros(shape, dtype=dtype)
    ordered = sorted(nodes.values(), key=lambda n: graph.order[n.name])
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for k, v in feeds.items()]
    outputs = [helper.make_tensor_value_info(run[-1].output[0], onnx.TensorProto.FLOAT, None)]
    sub = helper.make_model(helper.make_graph(ordered, "run", inputs, outputs, list(inits.values())),
                            opset_imports=list(graph.model.opset_import))
    (out,) = ReferenceEvaluator(sub).run(None, feeds)
    return np.asarray(out)
