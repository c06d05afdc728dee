"""The ONNX adapter's view of a graph: op families, attribute access, and :class:`Graph`,
a private copy with producers, consumers, constants and the shapes at the native size."""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import NotConvolutionalizable

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
                        "QLinearConv"})
GLOBAL_OPS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
                        "InstanceNormalization", "GroupNormalization",
                        "MeanVarianceNormalization", "Einsum", "Attention"})
PER_LOCATION = ELEMENTWISE | SHAPE_OPS | frozenset({
    "BatchNormalization", "Concat", "Split", "LayerNormalization", "Softmax", "LogSoftmax",
    "Slice", "Expand", "Where", "MatMul", "Gemm", "QuantizeLinear", "DequantizeLinear"})


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


def attr_value(node: onnx.NodeProto, name: str, default: object = None) -> object:
    found = attr_proto(node, name)
    if found is None:
        return default
    value = helper.get_attribute_value(found)
    return value.decode() if isinstance(value, bytes) else value


def image_input(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise NotConvolutionalizable(f"the graph has {len(inputs)} inputs "
                                     f"({', '.join(i.name for i in inputs)}); one image input needed")
    return inputs[0]


def dims_of(value: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)


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
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        image = image_input(g)
        self.image = image.name
        self.batch = (dims_of(image) or (1,))[0] or 1  # the static batch size, if any
        self.layout = layout
        self.inits = {i.name: i for i in g.initializer}
        self.const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
        self.producer = {out: node for node in g.node for out in node.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in g.node:
            for name in set(node.input):
                self.consumers[name].append(node)
        self.order = {node.name: i for i, node in enumerate(g.node)}
        self.stop = ""  # why the walk back from the output stopped (for error messages)
        self.static = self._static_values()
        self.shapes, self.types = self._infer(input_size)

    def _static_values(self) -> set[str]:
        """Tensors that do not depend on the image's values (constants and shape arithmetic)."""
        static = set(self.inits) | set(self.const_nodes)
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
            if axis != 0 or not dims[0].HasField("dim_value"):
                dims[axis].Clear()
                dims[axis].dim_value = value
        for out in fixed.graph.output:
            out.type.tensor_type.ClearField("shape")
        try:
            inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
        except Exception as exc:
            raise NotConvolutionalizable(f"shape inference fails at the native size "
                                         f"{input_size[0]}x{input_size[1]}: {first_line(exc)}") from exc
        g = inferred.graph
        shapes, types = {}, {}
        for value in [*g.input, *g.value_info, *g.output]:
            shapes[value.name] = dims_of(value)
            types[value.name] = value.type.tensor_type.elem_type
        for init in g.initializer:
            shapes[init.name] = tuple(init.dims)
            types[init.name] = init.data_type
        return shapes, types

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or ``Constant`` output, else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.const_nodes.get(name)
        if node is None:
            return self._fold(name)
        for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            attr = attr_proto(node, key)
            if attr is not None:
                value = helper.get_attribute_value(attr)
                return numpy_helper.to_array(value) if key == "value" else np.array(value)
        return None

    def _fold(self, name: str) -> np.ndarray | None:
        """Constant-fold one node whose inputs are all constants (e.g. a deduplicated
        initializer behind an ``Identity``)."""
        node = self.producer.get(name)
        if node is None or name not in self.static or node.op_type in ("Shape", "Size"):
            return None
        values = {n: self.const(n) for n in node.input if n}
        if any(v is None for v in values.values()):
            return None
        if node.op_type == "Identity":
            return values[node.input[0]]
        from onnx.reference import ReferenceEvaluator

        inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                  for k, v in values.items() if v is not None]
        outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                   for o in node.output]
        sub = helper.make_model(helper.make_graph([node], "fold", inputs, outputs),
                                opset_imports=list(self.model.opset_import))
        results = ReferenceEvaluator(sub).run(None, values)
        return np.asarray(results[list(node.output).index(name)])

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


def describe_node(node: onnx.NodeProto) -> str:
    return f"head node '{node.name}' ({node.op_type})"
