"""Head analysis of an ONNX graph: from each graph output back to the last feature map, every
node classified and turned into a :class:`~convolutionalize.plan.HeadStep`.

The per-op rules for head nodes that are neither shape operations nor Linears are registered
by ``(op_type, since_version)`` in ``HEAD_OPS`` (see :mod:`.registry`): ``Softmax`` before
opset 13 coerces its input to 2-D, ``BatchNormalization`` before 9 has ``spatial``, ``Dropout``
from 12 takes ``training_mode`` as an input, each one more registered function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from onnx import helper

from ...errors import ArgumentError, NotConvolutionalizable, first_line
from ...plan import FeatureMap, HeadPlan, HeadStep
from ...weights import FlattenLayout
from .graph import (
    BINARY,
    ELEMENTWISE,
    QDQ,
    QLINEAR_BINARY,
    QLINEAR_ELEMENTWISE,
    QLINEAR_LINEAR,
    SHAPE_OPS,
    Graph,
    Kind,
    Layout,
    attr_value,
    describe_node,
    dims_of,
    image_input,
    input_layout,
)
from .prepare import prepare
from .registry import Registry


@dataclass(frozen=True)
class Value:
    """What a head tensor is: a spatial map, a 1x1 pooled map, a flattened map or a vector.

    ``transposed``: a flattened map or vector laid out ``(features, batch)``, which only a
    ``Gemm`` with ``transA=1`` reads.
    """

    kind: Kind
    layout: Layout = "NCHW"
    flat: tuple[int, int, int] | None = None
    flat_layout: FlattenLayout = "CHW"
    transposed: bool = False


@dataclass
class HeadNode:
    node: onnx.NodeProto
    step: HeadStep
    before: Value
    after: Value
    run_end: bool = True


@dataclass
class Head:
    """The analysed head: the feature tensor, each head node (graph order) with its kinds,
    and every graph output with the kind of tensor it is."""

    feature: str
    nodes: list[HeadNode] = field(default_factory=list)
    outputs: list[tuple[str, Value]] = field(default_factory=list)


def _global_reduce(graph: Graph, node: onnx.NodeProto) -> Literal["avg", "max"] | None:
    """``avg``/``max`` when ``node`` pools a 4-D map over its whole H x W."""
    if not node.input or graph.rank(node.input[0]) != 4:
        return None
    op = node.op_type
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        return "avg" if op == "GlobalAveragePool" else "max"
    if op == "QLinearGlobalAveragePool" and not attr_value(node, "channels_last", 0):
        return "avg"
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


def _chains(graph: Graph) -> dict[str, tuple[list[onnx.NodeProto], str]]:
    """For each graph output, the single-input nodes that lead to it from the first global pool
    or branch (input side first), and why the walk back stopped there.

    A tensor read by several nodes ends a chain unless every reader is on some output's chain
    (one pooled vector feeding a class head and a box head)."""
    walks = {o.name: _walk(graph, o.name) for o in graph.model.graph.output}
    on_chain = {n.name for chain, _ in walks.values() for n in chain} | {"<graph output>"}
    chains = {name: _cut(graph, chain, stop, on_chain) for name, (chain, stop) in walks.items()}
    for chain, _ in chains.values():
        if chain and chain[0].op_type in ("Gemm", "MatMul") and len(graph.data_inputs(chain[0])) > 1:
            raise NotConvolutionalizable(f"{describe_node(chain[0])}: its weight is not an initializer")
    return chains


def _walk(graph: Graph, name: str) -> tuple[list[onnx.NodeProto], str]:
    chain: list[onnx.NodeProto] = []
    while (node := graph.producer.get(name)) is not None:
        chain.append(node)
        ins = graph.data_inputs(node)
        if _global_reduce(graph, node):
            if (transpose := _to_nhwc(graph, node.input[0])) is not None:
                chain.append(transpose)
            break
        if len(ins) > 1 and node.op_type in BINARY and (branches := _one_source(graph, ins)) is not None:
            nodes, name = branches
            chain.extend(nodes)
            continue
        if len(ins) != 1:
            return chain, f"node '{node.name}' ({node.op_type}) has {len(ins)} data inputs"
        name = ins[0]
    return chain, ""


def _one_source(graph: Graph, names: list[str]) -> tuple[list[onnx.NodeProto], str] | None:
    """Where the data inputs ``names`` of an elementwise node all come from one tensor through
    single-input elementwise nodes (an exported ``x * HardSigmoid(x)``, ``x * Sigmoid(x)``):
    those nodes, the output side first, and that tensor; else None. The node is then as
    elementwise as they are: per feature, so per location once the head slides."""
    paths = []
    for name in names:
        path = [name]
        while ((node := graph.producer.get(path[-1])) is not None and node.op_type in ELEMENTWISE
               and len(ins := graph.data_inputs(node)) == 1):
            path.append(ins[0])
        paths.append(path)
    source = next((t for t in paths[0] if all(t in p for p in paths[1:])), None)
    if source is None:
        return None
    nodes = {graph.producer[t].name: graph.producer[t] for p in paths for t in p[:p.index(source)]}
    return sorted(nodes.values(), key=lambda n: -graph.order[n.name]), source


def _cut(graph: Graph, chain: list[onnx.NodeProto], stop: str,
         on_chain: set[str]) -> tuple[list[onnx.NodeProto], str]:
    for k, node in enumerate(chain[:-1]):
        src = graph.data_inputs(node)[0]
        users = graph.users(src)
        if any(u.name not in on_chain for u in users):
            return chain[k::-1], (f"'{src}', the input of node '{node.name}' ({node.op_type}), has "
                                  f"{len(users)} consumers")
    return chain[::-1], stop


def _head_start(graph: Graph, chain: list[onnx.NodeProto], output: str, stop: str) -> int:
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
    dynamic = next((n for n in graph.model.graph.node if n.op_type == "DynamicQuantizeLinear"), None)
    if dynamic is not None:  # its scale and zero point feed the head as a second data input
        raise _dynamic_refusal(dynamic)
    stop = f"; walking back from it, {stop}" if stop else ""
    raise NotConvolutionalizable(
        f"no classifier head: no global pool or flatten of a 4-D feature map leads to the output "
        f"'{output}'{stop}")


def analyse(model: onnx.ModelProto, input_size: object = None) -> tuple[Graph, HeadPlan, Head]:
    """Copy ``model`` (older forms prepared), infer its shapes at the native size and find its
    head: one per graph output, all reading one feature map."""
    private = prepare(model)
    layout = input_layout(private)
    size, channels = _native_size(private, input_size, layout)
    graph = Graph(private, size, layout)
    starts = {}
    for output, (chain, stop) in _chains(graph).items():
        start = _head_start(graph, chain, output, stop)
        starts[output] = (chain[start:], graph.data_inputs(chain[start])[0])
    features = dict.fromkeys(feature for _, feature in starts.values())
    if len(features) > 1:
        read = ", ".join(f"'{o}' reads '{f}'" for o, (_, f) in starts.items())
        raise NotConvolutionalizable(f"the outputs start from different feature maps ({read}); "
                                     "several outputs convert when they share one")
    feature = next(iter(features))
    fshape = graph.shape(feature)
    if fshape is None or len(fshape) != 4 or None in fshape:
        raise NotConvolutionalizable(f"the feature map '{feature}' has no known 4-D shape")
    channels_f, fh, fw = (int(v or 0) for v in fshape[1:])
    producer = graph.producer.get(feature)
    fmap = FeatureMap(producer.name if producer else feature, channels_f, (fh, fw))
    heads = {o: _classify(graph, nodes, feature, fmap, o) for o, (nodes, _) in starts.items()}
    head = _merge(graph, feature, heads)
    plan = HeadPlan("onnx", size, channels, fmap, tuple(h.step for h in head.nodes),
                    outputs=tuple(heads))
    return graph, plan, head


def _merge(graph: Graph, feature: str, heads: dict[str, tuple[list[HeadNode], Value]]) -> Head:
    """One head from every output's: shared nodes must be read alike by all outputs."""
    by_name: dict[str, HeadNode] = {}
    for nodes, _ in heads.values():
        for hn in nodes:
            if by_name.setdefault(hn.node.name, hn) != hn:
                raise NotConvolutionalizable(f"{describe_node(hn.node)} is shared by several outputs "
                                             "that read it differently")
    if len({any(hn.step.op == "global_pool" for hn in nodes) for nodes, _ in heads.values()}) > 1:
        raise NotConvolutionalizable("some outputs pool the feature map globally and others flatten "
                                     "it; several outputs convert when they read it alike")
    nodes = sorted(by_name.values(), key=lambda hn: graph.order[hn.node.name])
    return Head(feature, nodes, [(o, value) for o, (_, value) in heads.items()])


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
            raise ArgumentError(f"input_size is required: the ONNX input '{image.name}' has dynamic "
                             "height/width; pass the native (training) size, e.g. (224, 224)")
        return (static[0], static[1]), channels  # type: ignore[return-value]
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ArgumentError(f"input_size must be two positive ints (height, width), got {input_size!r}")
    if None not in static and tuple(size) != static:
        raise ArgumentError(f"input_size {size[0]}x{size[1]} differs from the ONNX input's static "
                         f"{static[0]}x{static[1]}")
    return (int(size[0]), int(size[1])), channels


def _classify(graph: Graph, nodes: list[onnx.NodeProto], feature: str, fmap: FeatureMap,
              output: str) -> tuple[list[HeadNode], Value]:
    """Walk one output's head forward, giving every node a kind before and after, and a HeadStep."""
    head: list[HeadNode] = []
    value = Value("map")
    i = 0
    while i < len(nodes):
        node = nodes[i]
        if i == 0 and len(nodes) > 1 and _to_nhwc(graph, node.output[0]) and _global_reduce(
                graph, nodes[1]):
            head.append(HeadNode(node, HeadStep(node.name, "keep", "Transpose to NHWC before the "
                                                "pool -> folded into it"), value, Value("map", "NHWC")))
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
                head.append(HeadNode(nodes[k], HeadStep(nodes[k].name, "flatten", detail),
                                     value, after, run_end=k == j))
            value, i = after, j + 1
            continue
        step, after = _step(graph, node, value, fmap, first=not any(h.step.op != "keep" for h in head))
        head.append(HeadNode(node, step, value, after))
        value, i = after, i + 1
    if value.kind in ("map", "flat") or value.transposed:
        what = "transposed" if value.transposed else value.kind
        raise NotConvolutionalizable(f"the head of output '{output}' ends in a {what} tensor (no "
                                     f"Linear after the flatten of '{feature}'); nothing to "
                                     "convolutionalize")
    return head, value


def _run_detail(before: Value, after: Value, fmap: FeatureMap) -> str:
    turned = " (features as rows: read by Gemm transA=1)" if after.transposed else ""
    if after.kind == "flat":
        c, h, w = fmap.channels, *fmap.size
        return f"flatten {c}x{h}x{w} ({after.flat_layout}) -> removed{turned}"
    if after.kind == "pooled":
        same = after.layout == before.layout
        return f"pooled {before.layout} -> {after.layout}" + (" (no-op)" if same else " (transpose)")
    move = " (transpose to NCHW)" if before.kind == "pooled" and before.layout == "NHWC" else ""
    return f"flatten 1x1 {before.kind} map -> removed{move}{turned}"


def _step(graph: Graph, node: onnx.NodeProto, value: Value, fmap: FeatureMap,
          first: bool) -> tuple[HeadStep, Value]:
    """The HeadStep of one non-shape head node and the kind of its output."""
    op, where = node.op_type, describe_node(node)
    reduce = _global_reduce(graph, node) if value.kind == "map" else None
    if reduce is not None and first:
        keep = op.startswith(("Global", "Average", "Max", "QLinear")) or attr_value(node, "keepdims", 1) == 1
        return (HeadStep(node.name, "global_pool", f"{op}: global {reduce} pool over "
                         f"{fmap.size[0]}x{fmap.size[1]} ({value.layout})", reduce=reduce),
                Value("pooled", value.layout) if keep else Value("vector"))
    if op in QOPERATOR or (op.startswith("QLinear") and op not in QLINEAR_ELEMENTWISE | QLINEAR_LINEAR):
        raise NotConvolutionalizable(
            f"{where} is a quantized operator that the head rewrite does not read; QOperator heads "
            f"convert through {', '.join(sorted(QLINEAR_LINEAR | QLINEAR_ELEMENTWISE))} and "
            "QLinearGlobalAveragePool, and QDQ graphs (quantize_static's default) convert")
    if value.kind == "map":
        raise NotConvolutionalizable(f"{where} acts on the feature map before it is pooled or "
                                     "flattened; it is not part of a classifier head")
    if op in ("Gemm", "MatMul", *QLINEAR_LINEAR) and value.kind in ("flat", "vector"):
        return _linear_step(graph, node, value), Value("vector")
    if value.transposed:
        raise NotConvolutionalizable(f"{where} reads the features laid out (features, batch); only a "
                                     "Gemm with transA=1 can")
    if value.kind == "flat" and op not in ELEMENTWISE | QDQ | QLINEAR_ELEMENTWISE:
        raise NotConvolutionalizable(f"{where} acts on the flattened map before any Linear; it "
                                     "has no sliding equivalent")
    rule = HEAD_OPS.lookup(op, graph.opset)
    if rule is None:
        raise _no_equivalent(graph, node, value)
    return rule(graph, node, value), value


def _no_equivalent(graph: Graph, node: onnx.NodeProto, value: Value) -> NotConvolutionalizable:
    what = "a feature vector" if value.kind == "vector" else f"a pooled {value.layout} map"
    return NotConvolutionalizable(
        f"{describe_node(node)} has no known per-location equivalent on {what} "
        f"({HEAD_OPS.describe(node.op_type, graph.opset)}); supported: pooling, flatten, Gemm/MatMul, "
        "BatchNormalization, LayerNormalization, Softmax/LogSoftmax/Hardmax, elementwise ops")


def _linear_step(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    where = describe_node(node)
    trans_a = node.op_type in ("Gemm", "QGemm") and bool(attr_value(node, "transA", 0))
    if trans_a and not value.transposed:
        raise NotConvolutionalizable(f"{where} has transA=1 but its features are laid out (batch, "
                                     "features); the features must be the rows")
    if value.transposed and not trans_a:
        raise NotConvolutionalizable(f"{where} reads the features laid out (features, batch) "
                                     "without transA=1")
    weight = linear_weight(graph, node)
    out_f, in_f = weight.shape
    if value.kind == "flat":
        assert value.flat is not None
        c, h, w = value.flat
        if in_f != c * h * w:
            raise NotConvolutionalizable(f"{where} has {in_f} inputs, but the flattened map is "
                                         f"{c}x{h}x{w} = {c * h * w}")
        return HeadStep(node.name, "linear", f"{node.op_type} {in_f}->{out_f} -> Conv {c}->{out_f} "
                        f"kernel {h}x{w} ({value.flat_layout})", kernel=(h, w))
    return HeadStep(node.name, "linear", f"{node.op_type} {in_f}->{out_f} -> Conv 1x1",
                    kernel=(1, 1))


def linear_weight(graph: Graph, node: onnx.NodeProto) -> np.ndarray:
    """The ``(out, in)`` weight of a Gemm or MatMul (alpha applied), or of a QGemm or
    QLinearMatMul (dequantized), or a refusal. ``transA`` only says how the features are laid
    out, not the weight."""
    where = describe_node(node)
    if graph.data_inputs(node) != [node.input[0]]:
        raise NotConvolutionalizable(f"{where}: its weight is not an initializer (or the features "
                                     "are not its first input)")
    if node.op_type in QLINEAR_LINEAR:
        return _qoperator_weight(graph, node)
    weight = graph.const(node.input[1])
    if weight is None or weight.ndim != 2:
        raise NotConvolutionalizable(f"{where}: weight '{node.input[1]}' is not a 2-D initializer")
    if node.op_type == "MatMul" or not attr_value(node, "transB", 0):
        weight = weight.T
    alpha = float(attr_value(node, "alpha", 1.0))  # type: ignore[arg-type]
    if alpha != 1.0:
        weight = (weight * alpha).astype(weight.dtype)
    return np.ascontiguousarray(weight)


def _qoperator_weight(graph: Graph, node: onnx.NodeProto) -> np.ndarray:
    """A QGemm/QLinearMatMul's ``(out, in)`` weight, dequantized, where the rewrite can give
    it to a QLinearConv as it is: integers quantized per tensor or per output, no alpha, and a
    quantized output (a QGemm without ``y_scale`` returns floats, which QLinearConv cannot)."""
    where, quantized = describe_node(node), graph.qoperator_weight(node)
    if quantized is None or quantized.values.ndim != 2:
        raise NotConvolutionalizable(f"{where}: its weight, scale and zero point are not "
                                     "initializers of a 2-D integer weight")
    out_axis = quantized.axis  # QGemm transB=1: (out, in); otherwise (in, out)
    if not quantized.per_tensor and quantized.scale.size != quantized.values.shape[out_axis]:
        raise NotConvolutionalizable(f"{where} quantizes its weight per input feature; only "
                                     "per-tensor or per-output quantization keeps the kernel quantized")
    if float(attr_value(node, "alpha", 1.0)) != 1.0:  # type: ignore[arg-type]
        raise NotConvolutionalizable(f"{where} scales its product by alpha, which QLinearConv cannot")
    y_scale = 7 if node.op_type == "QGemm" else 6
    if len(node.input) <= y_scale or not node.input[y_scale]:
        raise NotConvolutionalizable(f"{where} returns floats (no y_scale), which QLinearConv cannot")
    weight = quantized.dequantized()
    return np.ascontiguousarray(weight if out_axis == 0 else weight.T)


# --------------------------------------------------------------------------- per-op rules

QOPERATOR = frozenset({"MatMulInteger", "ConvInteger", "QAttention"})  # no sliding rewrite here
HeadRule = Callable[[Graph, onnx.NodeProto, Value], HeadStep]
HEAD_OPS: Registry[HeadRule] = Registry("head rule")
SOFTMAX_OPS = ("Softmax", "LogSoftmax", "Hardmax")


def _channel_axis(value: Value) -> int:
    """Where the classes / channels are in a vector (N, F) or a pooled map."""
    return 3 if value.kind == "pooled" and value.layout == "NHWC" else 1


def _rank(value: Value) -> int:
    return 2 if value.kind == "vector" else 4


@HEAD_OPS.register(*sorted(ELEMENTWISE - {"Dropout"}), *sorted(QLINEAR_ELEMENTWISE))
def _elementwise(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    _check_constants(graph, node, value)
    return HeadStep(node.name, "keep", f"{node.op_type} (elementwise)")


def _check_constants(graph: Graph, node: onnx.NodeProto, value: Value) -> None:
    """Constant operands of elementwise ops must broadcast the same way over a map."""
    if node.op_type not in BINARY | QLINEAR_BINARY:
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


def _unused_extra_outputs(graph: Graph, node: onnx.NodeProto, what: str) -> None:
    """Outputs past the first (Dropout's mask, BatchNormalization's statistics) must be unused."""
    for extra in node.output[1:]:
        if extra and graph.users(extra):
            raise NotConvolutionalizable(f"{describe_node(node)}: its {what} output '{extra}' is "
                                         "used; only the inference output has a sliding form")


@HEAD_OPS.register(*sorted(QDQ))
def _quantize(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    """(De)quantization: per element with one scale; per channel where the axis is the
    features' (a vector's or a pooled map's channels), which stay the channels of the map."""
    scale = graph.const(node.input[1])
    if scale is None:
        raise NotConvolutionalizable(f"{describe_node(node)}: its scale '{node.input[1]}' is "
                                     "computed, not a constant")
    if scale.size == 1:
        return HeadStep(node.name, "keep", f"{node.op_type} (per tensor: elementwise)")
    axis = int(attr_value(node, "axis", 1))  # type: ignore[arg-type]
    if value.kind != "flat" and axis % _rank(value) == _channel_axis(value):
        return HeadStep(node.name, "keep", f"{node.op_type} (per channel)")
    where = "the flattened map" if value.kind == "flat" else f"axis {axis}, not the channels"
    raise NotConvolutionalizable(f"{describe_node(node)} quantizes per slice of {where}; only "
                                 "per-tensor or per-channel quantization can slide")


@HEAD_OPS.register("DynamicQuantizeLinear")
def _dynamic_quantize(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    raise _dynamic_refusal(node)


def _dynamic_refusal(node: onnx.NodeProto) -> NotConvolutionalizable:
    return NotConvolutionalizable(
        f"{describe_node(node)} computes its scale from the whole tensor it quantizes: on a map "
        "that is every window at once, so no window would be quantized as the original "
        "quantizes its one crop; quantize the model statically (onnxruntime quantize_static)")


@HEAD_OPS.register("Dropout", versions=(7, 10))
def _dropout(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    """Opsets 7-11: ``ratio`` is an attribute; at inference Dropout is the identity."""
    _unused_extra_outputs(graph, node, "mask")
    return HeadStep(node.name, "keep", "Dropout (the identity at inference) -> removed")


@HEAD_OPS.register("Dropout", versions=(12, 13, 22))
def _dropout_training_input(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    """Opset 12+: ``training_mode`` is an optional input; it must be a constant False."""
    if len(node.input) > 2 and node.input[2]:
        flag = graph.const(node.input[2])
        if flag is None or bool(flag.reshape(-1)[0]):
            raise NotConvolutionalizable(f"{describe_node(node)} runs in training mode (or its "
                                         "training_mode is not a constant False)")
    return _dropout(graph, node, value)


@HEAD_OPS.register("BatchNormalization", versions=(7,))
def _batchnorm_spatial(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    """Opsets 7-8: ``spatial=0`` normalizes each activation with its own statistics, which on a
    vector or a 1x1 pooled map are one per channel; the rewrite drops the attribute."""
    if not attr_value(node, "spatial", 1):
        channels = (graph.shape(node.input[0]) or (0, 0))[1]
        sizes = [graph.const(n) for n in node.input[1:5]]
        if any(v is None or v.size != channels for v in sizes):
            raise NotConvolutionalizable(f"{describe_node(node)}: spatial=0 with statistics that are "
                                         "not one per channel")
    return _batchnorm(graph, node, value)


@HEAD_OPS.register("BatchNormalization", versions=(9, 14, 15))
def _batchnorm(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    if attr_value(node, "training_mode", 0):
        raise NotConvolutionalizable(f"{describe_node(node)} runs in training mode (batch statistics)")
    _unused_extra_outputs(graph, node, "training statistics")
    if value.kind == "vector":
        return HeadStep(node.name, "batchnorm", "BatchNormalization over features -> over "
                        "channels (unchanged)")
    if value.layout == "NCHW":
        return HeadStep(node.name, "keep", "BatchNormalization (per location)")
    raise _no_equivalent(graph, node, value)


@HEAD_OPS.register("LayerNormalization", versions=(17,))
def _layernorm(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    axis = int(attr_value(node, "axis", -1)) % _rank(value)  # type: ignore[call-overload]
    if value.kind == "vector" and axis == 1:
        return HeadStep(node.name, "layernorm", "LayerNormalization -> over channels")
    if value.layout == "NHWC" and axis == 3:
        return HeadStep(node.name, "keep", "LayerNormalization (per location)")
    raise _no_equivalent(graph, node, value)


@HEAD_OPS.register(*SOFTMAX_OPS, versions=(1, 11))
def _softmax_coerced(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    """Opsets 1-12: the input is coerced to 2-D at ``axis`` (default 1) and the op runs over
    axes ``axis..rank-1`` together: over the classes alone when those are the classes axis
    and 1x1 spatial axes. The rewrite runs it on channels-last data, whose last axis alone
    is then the channels at each location."""
    axis = int(attr_value(node, "axis", 1)) % _rank(value)  # type: ignore[call-overload]
    if not 1 <= axis <= _channel_axis(value):
        raise NotConvolutionalizable(
            f"{describe_node(node)}: opset {graph.opset} {node.op_type} with axis={axis} runs over "
            f"{'the batch' if axis == 0 else 'the spatial axes'} of the {value.kind} features, not "
            "over the classes")
    return HeadStep(node.name, "softmax", f"{node.op_type} (opset {graph.opset}: coerced to 2-D at "
                    f"axis {axis}) over classes -> over channels at each location")


@HEAD_OPS.register(*SOFTMAX_OPS, versions=(13,))
def _softmax(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    axis = int(attr_value(node, "axis", -1)) % _rank(value)  # type: ignore[call-overload]
    if axis != _channel_axis(value):
        raise NotConvolutionalizable(f"{describe_node(node)}: axis {axis} is not the classes axis "
                                     f"of the {value.kind} features")
    if value.kind == "vector":
        return HeadStep(node.name, "softmax", f"{node.op_type} over classes -> over channels")
    return HeadStep(node.name, "keep", f"{node.op_type} (per location)")


@HEAD_OPS.register("MatMul")
def _matmul_per_location(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    """A MatMul on a channels-last 1x1 map acts on each location alike."""
    if value.layout == "NHWC" and graph.data_inputs(node) == [node.input[0]]:
        return HeadStep(node.name, "keep", "MatMul (per location)")
    raise _no_equivalent(graph, node, value)


@HEAD_OPS.register("Conv")
def _pointwise_conv(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    """A 1x1, stride-1, unpadded Conv on a pooled NCHW map (DenseNet's and SqueezeNet-style
    classifiers) acts on each location alike."""
    weight = graph.shape(node.input[1]) if len(node.input) > 1 else None
    if (value.layout == "NCHW" and weight is not None and tuple(weight[2:]) == (1, 1)
            and not any(attr_value(node, "pads", [0]))  # type: ignore[arg-type]
            and set(attr_value(node, "strides", [1])) == {1}  # type: ignore[arg-type]
            and set(attr_value(node, "dilations", [1])) == {1}  # type: ignore[arg-type]
            and attr_value(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID")):
        return HeadStep(node.name, "keep", "Conv 1x1 (per location)")
    raise _no_equivalent(graph, node, value)


@HEAD_OPS.register("LRN")
def _lrn(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    """Local response normalization mixes channels at one location only."""
    if value.kind == "pooled" and value.layout == "NCHW":
        return HeadStep(node.name, "keep", "LRN (per location)")
    raise _no_equivalent(graph, node, value)


# --------------------------------------------------------------------------- shape runs


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
    out_shape, result = tuple(evaluated.shape), evaluated.reshape(-1)
    batch = int(in_shape[0])  # type: ignore[arg-type]
    if value.kind == "map":
        c, (h, w) = fmap.channels, fmap.size
        for layout, rows in (("CHW", probe.reshape(batch, -1)),
                             ("HWC", probe.transpose(0, 2, 3, 1).reshape(batch, -1))):
            transposed = _as_rows(out_shape, result, rows)
            if transposed is not None:
                return Value("flat", flat=(c, h, w), flat_layout=layout, transposed=transposed)
        raise NotConvolutionalizable(f"{where} reorder the feature map into neither CHW nor HWC "
                                     f"flatten order of (batch, features); the result is {out_shape}")
    rows = probe.reshape(batch, -1)
    if value.kind == "flat" or value.transposed:
        raise NotConvolutionalizable(f"{where} reorder the {value.kind} features; cannot slide")
    if len(out_shape) == 2:
        transposed = _as_rows(out_shape, result, rows)
        if transposed is None:
            raise NotConvolutionalizable(f"{where} give a {out_shape} tensor that mixes the batch "
                                         "into the features; cannot slide")
        return Value("vector", transposed=transposed)
    channels = rows.shape[1]
    if not np.array_equal(result, rows.reshape(-1)):
        raise NotConvolutionalizable(f"{where} reorder the {value.kind} features; cannot slide")
    if out_shape == (batch, channels, 1, 1):
        return Value("pooled", "NCHW")
    if out_shape == (batch, 1, 1, channels):
        return Value("pooled", "NHWC")
    raise NotConvolutionalizable(f"{where} give a {out_shape} tensor; expected (N, C), "
                                 "(N, C, 1, 1) or (N, 1, 1, C)")


def _as_rows(out_shape: tuple[int, ...], result: np.ndarray, rows: np.ndarray) -> bool | None:
    """False when ``result`` is ``rows`` (batch, features), True when it is their transpose
    (features, batch: a ``Gemm`` with ``transA=1`` reads it), None otherwise."""
    if out_shape == rows.shape and np.array_equal(result, rows.reshape(-1)):
        return False
    if out_shape == rows.shape[::-1] and np.array_equal(result, rows.T.reshape(-1)):
        return True
    return None


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
