"""The ONNX adapter's view of a graph: op families, attribute access, and :class:`Graph`,
a private copy with producers, consumers, constants and the shapes at the native size."""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import NotConvolutionalizable, first_line

Kind = Literal["map", "pooled", "flat", "vector"]
Axes = tuple[int, int] | None  # positions of H and W in a body tensor, None when unknown
Layout = Literal["NCHW", "NHWC"]

ELEMENTWISE = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Celu", "Gelu", "Softplus", "Softsign", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt",
    "Reciprocal", "Mish", "ThresholdedRelu", "Clip", "Dropout", "Add", "Sub", "Mul", "Div",
    "Pow", "Max", "Min", "Sum", "Mean", "Cast", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"})
SHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Gather",
                       "Identity"})
WINDOW_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool", "ConvInteger",
                        "QLinearConv", "QLinearAveragePool"})
GLOBAL_OPS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
                        "InstanceNormalization", "GroupNormalization",
                        "MeanVarianceNormalization", "Einsum", "Attention",
                        "QLinearGlobalAveragePool", "QAttention"})
QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
# onnxruntime's QOperator format: ops on quantized tensors that requantize their result with
# the output scale and zero point they take as inputs (com.microsoft, but QLinearMatMul/Conv)
QLINEAR_BINARY = frozenset({"QLinearAdd", "QLinearMul"})
QLINEAR_ELEMENTWISE = QLINEAR_BINARY | frozenset({"QLinearSigmoid", "QLinearLeakyRelu"})
QLINEAR_LINEAR = frozenset({"QGemm", "QLinearMatMul"})  # weight at input 3, its scale and zero point after
PER_LOCATION = ELEMENTWISE | SHAPE_OPS | QLINEAR_ELEMENTWISE | frozenset({
    "BatchNormalization", "Concat", "Split", "LayerNormalization", "Softmax", "LogSoftmax",
    "Hardmax", "LRN", "QLinearConcat",
    "Slice", "Expand", "Where", "MatMul", "Gemm", "QuantizeLinear", "DequantizeLinear"})


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the graph computes on quantized tensors (QDQ or QOperator, static or dynamic)."""
    return any(n.op_type in QDQ | QLINEAR_LINEAR | {"DynamicQuantizeLinear", "MatMulInteger",
                                                    "ConvInteger"} or n.op_type.startswith("QLinear")
               for n in model.graph.node)


def input_layout(model: onnx.ModelProto) -> Layout:
    """NHWC when the image input is transposed to NCHW before anything else reads it."""
    name = image_input(model.graph).name
    users = [n for n in model.graph.node if name in n.input]
    if len(users) == 1 and users[0].op_type == "Transpose" and list(
            helper.get_attribute_value(attr_proto(users[0], "perm"))) == [0, 3, 1, 2]:
        return "NHWC"
    return "NCHW"


def attr_proto(node: onnx.NodeProto, name: str) -> onnx.AttributeProto | None:
    return next((a for a in node.attribute if a.name == name), None)


def set_attribute(node: onnx.NodeProto, name: str, value: object) -> None:
    """Give ``node`` attribute ``name`` = ``value``, replacing the one it had."""
    for attr in node.attribute:
        if attr.name == name:
            node.attribute.remove(attr)
            break
    node.attribute.append(helper.make_attribute(name, value))


def attr_value(node: onnx.NodeProto, name: str, default: object = None) -> object:
    found = attr_proto(node, name)
    if found is None:
        return default
    value = helper.get_attribute_value(found)
    return value.decode() if isinstance(value, bytes) else value


def opset_of(model: onnx.ModelProto) -> int:
    """The graph's ``ai.onnx`` opset (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def image_input(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        weights = "; weights must be initializers (constants), not runtime inputs" if inputs else ""
        raise NotConvolutionalizable(f"the graph has {len(inputs)} inputs "
                                     f"({', '.join(i.name for i in inputs)}); one image input "
                                     f"needed{weights}")
    return inputs[0]


def dims_of(value: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    """Static dims, None for symbolic ones (a name, ``?``, or exporters' ``-1``)."""
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                 for d in t.shape.dim)


@dataclass(frozen=True)
class Quantized:
    """A quantized weight: ``(values - zero_point) * scale``, per tensor (scalar scale) or per
    slice along ``axis``."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    def dequantized(self) -> np.ndarray:
        shape = [1] * self.values.ndim
        if not self.per_tensor:
            shape[self.axis % self.values.ndim] = -1
        values = self.values.astype(np.float32) - self.zero_point.astype(np.float32).reshape(shape)
        return (values * self.scale.reshape(shape)).astype(self.scale.dtype)


class Graph:
    """A private copy of the model, with producers, consumers, constants and native shapes."""

    def __init__(self, model: onnx.ModelProto, input_size: tuple[int, int], layout: Layout) -> None:
        self.model = model
        g = model.graph
        seen: set[str] = set()
        for i, node in enumerate(g.node):
            if not node.name or node.name in seen:
                node.name = f"{node.name or node.op_type}_{i}"
            seen.add(node.name)
        self.opset = opset_of(model)
        image = image_input(g)
        self.image = image.name
        self.batch = (dims_of(image) or (1,))[0] or 1  # the static batch size, if any
        self.layout = layout
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {out: node for node in g.node for out in node.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in g.node:
            for name in set(node.input):
                self.consumers[name].append(node)
        self.order = {node.name: i for i, node in enumerate(g.node)}
        self.static = self._static_values()
        self.shapes, self.types = self._infer(input_size)

    def _static_values(self) -> set[str]:
        """Tensors that do not depend on the image's values (constants and shape arithmetic)."""
        static = set(self.inits)
        for node in self.model.graph.node:
            ins = [n for n in node.input if n]
            if node.op_type in ("Shape", "Size") or (ins and all(n in static for n in ins)):
                static.update(o for o in node.output if o)
        return static

    def _infer(self, input_size: tuple[int, int]) -> tuple[dict, dict]:
        fixed = onnx.ModelProto()
        fixed.CopyFrom(self.model)
        del fixed.graph.value_info[:]
        image = next(i for i in fixed.graph.input if i.name == self.image)
        dims = image.type.tensor_type.shape.dim
        axes = (2, 3) if self.layout == "NCHW" else (1, 2)
        if len(dims) != 4:
            raise NotConvolutionalizable(f"image input '{self.image}' has rank {len(dims)}, not 4")
        for axis, value in zip((0, *axes), (1, *input_size)):
            if axis != 0 or not dims[0].dim_value > 0:
                dims[axis].Clear()
                dims[axis].dim_value = value
        for out in fixed.graph.output:
            out.type.tensor_type.ClearField("shape")
        _shape_proxies(fixed.graph)
        try:
            inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
        except Exception as exc:
            raise NotConvolutionalizable(f"shape inference fails at the native size "
                                         f"{input_size[0]}x{input_size[1]}: {first_line(exc)}") from exc
        shapes, types = _shapes_of(inferred.graph)
        if any(shapes.get(o) is None for n in fixed.graph.node for o in n.output if o):
            for name, shape in _symbolic_shapes(fixed).items():  # computed reshapes onnx loses
                if shapes.get(name) is None:
                    shapes[name] = shape
        return shapes, types

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer (constant subgraphs were folded into initializers
        before the analysis) or of a quantized weight's ``DequantizeLinear``, else None."""
        init = self.inits.get(name)
        if init is not None:
            return numpy_helper.to_array(init)
        quantized = self.quantized(name)
        return None if quantized is None else quantized.dequantized()

    def quantized(self, name: str) -> Quantized | None:
        """``name`` as a quantized weight (``DequantizeLinear`` of integer initializers, which
        the preparation keeps so that the graph stays quantized), else None."""
        node = self.producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or not all(
                n in self.inits for n in node.input if n):
            return None
        arrays = [numpy_helper.to_array(self.inits[n]) for n in node.input if n]
        zero = arrays[2] if len(arrays) > 2 else np.zeros_like(arrays[1], dtype=arrays[0].dtype)
        return Quantized(arrays[0], arrays[1], zero, int(attr_value(node, "axis", 1)))  # type: ignore[arg-type]

    def qoperator_weight(self, node: onnx.NodeProto) -> Quantized | None:
        """The integer weight of a ``QGemm``/``QLinearMatMul`` with its scale and zero point
        (inputs 3-5), per tensor or per output column; None when they are not initializers."""
        names = list(node.input[3:6])
        if node.op_type not in QLINEAR_LINEAR or len(names) < 2 or not all(
                n in self.inits for n in names if n):
            return None
        values, scale = (numpy_helper.to_array(self.inits[n]) for n in names[:2])
        zero = (numpy_helper.to_array(self.inits[names[2]]) if len(names) > 2 and names[2]
                else np.zeros_like(scale, dtype=values.dtype))
        trans_b = node.op_type == "QGemm" and bool(attr_value(node, "transB", 0))
        return Quantized(values, scale, zero, 0 if trans_b else 1)

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def data_inputs(self, node: onnx.NodeProto) -> list[str]:
        """Inputs that carry image-dependent values (not weights, not shape arithmetic)."""
        return [n for n in node.input if n and n not in self.static]

    def users(self, name: str) -> list[onnx.NodeProto]:
        """Consumers of ``name`` that read its values (``Shape`` only reads its size)."""
        outputs = {o.name for o in self.model.graph.output}
        users = [n for n in self.consumers.get(name, []) if n.op_type not in ("Shape", "Size")]
        return users + ([onnx.NodeProto(name="<graph output>")] if name in outputs else [])

    def ancestors(self, name: str) -> set[str]:
        """Names of the nodes that ``name`` depends on."""
        seen: set[str] = set()
        stack = [name]
        while stack:
            node = self.producer.get(stack.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            stack.extend(n for n in node.input if n)
        return seen


def _shape_proxies(g: onnx.GraphProto) -> None:
    """Replace onnxruntime's com.microsoft QOperator ops, which neither onnx's nor
    onnxruntime's shape inference knows, by standard ops with the same output shapes (in a
    copy made for the inference only)."""
    for node in g.node:
        proxy = _shape_proxy(node)
        if proxy is not None:
            proxy.name = node.name
            node.CopyFrom(proxy)


def _shape_proxy(node: onnx.NodeProto) -> onnx.NodeProto | None:
    if node.domain != "com.microsoft" or attr_value(node, "channels_last", 0):
        return None
    ins, outs, op = list(node.input), list(node.output[:1]), node.op_type
    kept = [a for a in node.attribute if a.name not in ("channels_last", "alpha", "opset")]
    if op in QLINEAR_BINARY:
        return helper.make_node("Add", [ins[0], ins[3]], outs)
    if op in ("QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax"):
        return helper.make_node("Identity", ins[:1], outs)
    if op in ("QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool", "QGemm"):
        standard = {"QLinearConcat": ("Concat", ins[2::3]), "QGemm": ("Gemm", ins[0:4:3]),
                    "QLinearGlobalAveragePool": ("GlobalAveragePool", ins[:1]),
                    "QLinearAveragePool": ("AveragePool", ins[:1])}[op]
        proxy = helper.make_node(standard[0], standard[1], outs)
        proxy.attribute.extend(kept)
        return proxy
    return None


def _shapes_of(g: onnx.GraphProto) -> tuple[dict, dict]:
    shapes, types = {}, {}
    for value in [*g.input, *g.value_info, *g.output]:
        shapes[value.name] = dims_of(value)
        types[value.name] = value.type.tensor_type.elem_type
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
        types[init.name] = init.data_type
    return shapes, types


def _symbolic_shapes(fixed: onnx.ModelProto) -> dict[str, tuple[int | None, ...] | None]:
    """Shapes from onnxruntime's symbolic shape inference, which evaluates the shape arithmetic
    of computed reshapes (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` at opsets
    before 13) where onnx's data propagation stops; empty when it cannot run."""
    try:
        inferred = symbolic_shape_inference(fixed)
    except Exception:  # an op it does not know: onnx's shapes are all there is
        return {}
    return _shapes_of(inferred.graph)[0]


_CWD_LOCK = threading.Lock()


def symbolic_shape_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's ``SymbolicShapeInference.infer_shapes``, run in a temporary directory: when
    it cannot infer everything it saves the model (and its weights as ``<uuid>.data``) into the
    current directory before raising, which must not litter the caller's folder."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    with _CWD_LOCK, tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        return SymbolicShapeInference.infer_shapes(model)


def all_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """A node's inputs and the outer names its subgraphs read."""
    yield from (n for n in node.input if n)
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in sub.node:
                yield from all_inputs(inner)


def describe_node(node: onnx.NodeProto) -> str:
    return f"head node '{node.name}' ({node.op_type})"
