"""ONNX adapter: find a classifier head in an ONNX graph and rewrite it into convolutions.

The head is the chain of single-input nodes that leads from the last spatial feature map
to the graph's output: a global pool (``GlobalAveragePool``, ``ReduceMean`` over H, W, an
``AveragePool`` that covers the whole map) or a flatten, then ``Gemm`` / ``MatMul``
(+ ``Add``), normalizations and elementwise ops. Runs of pure shape operations
(``Flatten``, ``Reshape`` with constant or computed shapes, ``Squeeze``, ``Transpose``,
``Gather``) are classified by evaluating them on ``arange`` data: a run must turn the map
into a vector in CHW or HWC order (or keep a 1x1 pooled map), otherwise it is refused.

Like the other adapters it works in two steps joined by a
:class:`~convolutionalize.plan.HeadPlan`: analysis (``analyse``) on a private copy of the
proto with shapes inferred at the native size, then ``rewrite`` with one function per ONNX
op type, followed by clean-up: dead nodes and initializers removed, size-specific body
``Reshape`` shapes made dynamic, input and output height and width made symbolic,
``value_info`` refreshed by shape inference, nodes topologically sorted and the result
checked with ``onnx.checker.check_model(full_check=True)`` and with onnxruntime against the
original at the native size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .._files import atomic_path
from ..api import GEOMETRY_KEY, check_pool
from ..errors import NotConvolutionalizable
from ..geometry import BodyGeometry, Geometry, PoolMode, Span, geometry_from_plan
from ..plan import FeatureMap, HeadPlan, HeadStep
from ..weights import FlattenLayout, linear_to_oihw

__all__ = [
    "NATIVE_ERROR_KEY",
    "NATIVE_RTOL",
    "PLAN_KEY",
    "Predictor",
    "activation_shapes",
    "analyse",
    "convolutionalize_onnx",
    "input_channels",
    "load_onnx",
    "metadata_of",
    "model_digest",
    "predict_nchw",
    "save_onnx",
]

logger = logging.getLogger(__name__)

NATIVE_RTOL = 1e-4  # onnxruntime sums in a different order than the original graph's kernels
PLAN_KEY = "convolutionalize.plan"
NATIVE_ERROR_KEY = "convolutionalize.native_error"

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


# --------------------------------------------------------------------------- files and running


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX model file; ``ValueError`` (one line) when it is not a readable model."""
    path = Path(path)
    try:
        model = onnx.load_model(str(path))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ...
        raise ValueError(f"cannot read {path.name} as an ONNX model: {_first_line(exc)}") from exc
    if not model.graph.node or not model.graph.output:
        raise ValueError(f"cannot read {path.name} as an ONNX model: it has no graph "
                         "(not an ONNX file, or truncated)")
    try:  # by path: works past protobuf's 2 GiB limit and with external data
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ValueError(f"{path.name} is not a valid ONNX model (truncated?): "
                         f"{_first_line(exc)}") from exc
    return model


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    logger.info("wrote %s", path)
    return path


def _session(model: onnx.ModelProto):  # -> onnxruntime.InferenceSession
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


def _input_layout(model: onnx.ModelProto) -> Layout:
    """NHWC when the image input is transposed to NCHW before anything else reads it."""
    name = _image_input(model.graph).name
    users = [n for n in model.graph.node if name in n.input]
    if len(users) == 1 and users[0].op_type == "Transpose" and list(
            helper.get_attribute_value(_attr(users[0], "perm"))) == [0, 3, 1, 2]:
        return "NHWC"
    return "NCHW"


class Predictor:
    """An onnxruntime session over ``model`` for repeated NCHW float32 predictions (verify,
    dense maps): one session, many calls. NHWC graphs get the batch transposed."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.session = _session(model)
        self.layout = _input_layout(model)
        image = self.session.get_inputs()[0]
        self.input = image.name
        self.dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(
            image.type, np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if self.layout == "NHWC":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return np.asarray(self.session.run(None, {self.input: x})[0])


def predict_nchw(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Run ``model`` once in onnxruntime on an NCHW float32 batch (see :class:`Predictor`)."""
    return Predictor(model)(x)


def input_channels(model: onnx.ModelProto) -> int:
    """The image channels the graph's input takes (from its declared shape)."""
    dims = _dims(_image_input(model.graph)) or ()
    axis = 3 if _input_layout(model) == "NHWC" else 1
    if len(dims) != 4 or not dims[axis]:
        raise ValueError(f"the graph's image input has shape {dims}; a 4-D input with a known "
                         "channel count is needed")
    return int(dims[axis])


def model_digest(model: onnx.ModelProto) -> str:
    """A short hash of the serialized graph (structure, weights and metadata)."""
    return hashlib.sha1(model.SerializeToString(deterministic=True)).hexdigest()[:16]


def activation_shapes(model: onnx.ModelProto, size: tuple[int, int]
                      ) -> tuple[tuple[int, ...], list[int]]:
    """The output shape (without batch, classes first) for one ``size`` input, and the element
    count of every intermediate tensor, without running the model.

    Uses onnxruntime's symbolic shape inference, which follows the Shape -> Gather -> Concat
    -> Reshape chains a converted graph computes its channel shuffles with (``onnx``'s own
    inference gives up there).
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    layout = _input_layout(model)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    image = _image_input(fixed.graph)
    channels = input_channels(model)
    values = (1, *size, channels) if layout == "NHWC" else (1, channels, *size)
    for dim, value in zip(image.type.tensor_type.shape.dim, values):
        dim.Clear()
        dim.dim_value = value
    for output in fixed.graph.output:
        output.type.tensor_type.ClearField("shape")
    del fixed.graph.value_info[:]
    try:
        inferred = SymbolicShapeInference.infer_shapes(fixed)
    except Exception as exc:  # an op the inference does not know
        raise ValueError(f"cannot infer the map size at {size[0]}x{size[1]}: {_first_line(exc)}") from exc
    out = _dims(inferred.graph.output[0]) or ()
    if not out or not all(out):
        raise ValueError(f"cannot infer the map size at {size[0]}x{size[1]} (output shape {out})")
    counts = [int(np.prod(dims)) for v in inferred.graph.value_info
              if (dims := _dims(v)) and all(dims)]
    return tuple(int(d) for d in out[1:]), counts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- graph facts


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto | None:
    return next((a for a in node.attribute if a.name == name), None)


def _get(node: onnx.NodeProto, name: str, default: object = None) -> object:
    found = _attr(node, name)
    if found is None:
        return default
    value = helper.get_attribute_value(found)
    return value.decode() if isinstance(value, bytes) else value


def _image_input(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise NotConvolutionalizable(f"the graph has {len(inputs)} inputs "
                                     f"({', '.join(i.name for i in inputs)}); one image input needed")
    return inputs[0]


def _dims(value: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
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
        image = _image_input(g)
        self.image = image.name
        self.batch = (_dims(image) or (1,))[0] or 1  # the static batch size, if any
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
                                         f"{input_size[0]}x{input_size[1]}: {_first_line(exc)}") from exc
        g = inferred.graph
        shapes, types = {}, {}
        for value in [*g.input, *g.value_info, *g.output]:
            shapes[value.name] = _dims(value)
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
            attr = _attr(node, key)
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


def _where(node: onnx.NodeProto) -> str:
    return f"head node '{node.name}' ({node.op_type})"


# --------------------------------------------------------------------------- head analysis


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
        axes = _get(node, "axes")
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
        pads = list(_get(node, "pads", [0, 0, 0, 0]))  # type: ignore[call-overload]
        kernel = tuple(_get(node, "kernel_shape", ()))  # type: ignore[call-overload]
        if (shape and out and out[2:] == (1, 1) and kernel == shape[2:] and not any(pads)
                and _get(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID")):
            return "avg" if op == "AveragePool" else "max"
    return None


def _to_nhwc(graph: Graph, name: str) -> onnx.NodeProto | None:
    """The ``Transpose(perm=[0, 2, 3, 1])`` that produces ``name`` from an NCHW map, if any
    (tf2onnx-style graphs pool channels-last)."""
    node = graph.producer.get(name)
    if node is not None and node.op_type == "Transpose" and list(_get(node, "perm", [])) == [
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
            raise NotConvolutionalizable(f"{_where(node)}: its weight is not an initializer")
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
    layout = _input_layout(private)
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
    image = _image_input(model.graph)
    dims = _dims(image)
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
    op, where = node.op_type, _where(node)
    reduce = _global_reduce(graph, node) if value.kind == "map" else None
    if reduce is not None and first:
        keep = op.startswith(("Global", "Average", "Max")) or _get(node, "keepdims", 1) == 1
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
            raise NotConvolutionalizable(f"{_where(node)}: operand '{name}' is computed, not a constant")
        if array.size == 1:
            continue
        if value.kind == "vector" and array.ndim <= 2 and array.shape[-1] == array.size:
            continue  # (F,) or (1, F): reshaped to (F, 1, 1) by the rewrite
        if value.kind == "pooled":
            full = (1,) * (4 - array.ndim) + array.shape
            spatial = full[2:] if value.layout == "NCHW" else full[1:3]
            if array.ndim <= 4 and spatial == (1, 1):
                continue
        raise NotConvolutionalizable(f"{_where(node)} combines the {value.kind} features with a "
                                     f"constant of shape {array.shape}; it cannot slide")


def _linear_step(graph: Graph, node: onnx.NodeProto, value: Value) -> HeadStep:
    weight = _linear_weight(graph, node)
    out_f, in_f = weight.shape
    if value.kind == "flat":
        assert value.flat is not None
        c, h, w = value.flat
        return HeadStep(node.name, "linear", f"{node.op_type} {in_f}->{out_f} -> Conv {c}->{out_f} "
                        f"kernel {h}x{w} ({value.flat_layout})", kernel=(h, w))
    return HeadStep(node.name, "linear", f"{node.op_type} {in_f}->{out_f} -> Conv 1x1",
                    kernel=(1, 1))


def _linear_weight(graph: Graph, node: onnx.NodeProto) -> np.ndarray:
    """The ``(out, in)`` weight of a Gemm or MatMul (alpha applied), or a refusal."""
    where = _where(node)
    if node.op_type == "Gemm" and _get(node, "transA", 0):
        raise NotConvolutionalizable(f"{where} has transA=1; the features must be the rows")
    if graph.data_inputs(node) != [node.input[0]]:
        raise NotConvolutionalizable(f"{where}: its weight is not an initializer (or the features "
                                     "are not its first input)")
    weight = graph.const(node.input[1])
    if weight is None or weight.ndim != 2:
        raise NotConvolutionalizable(f"{where}: weight '{node.input[1]}' is not a 2-D initializer")
    if node.op_type == "MatMul" or not _get(node, "transB", 0):
        weight = weight.T
    alpha = float(_get(node, "alpha", 1.0))  # type: ignore[arg-type]
    if alpha != 1.0:
        weight = (weight * alpha).astype(weight.dtype)
    return np.ascontiguousarray(weight)


def _vector_step(graph: Graph, node: onnx.NodeProto, value: Value) -> tuple[HeadStep, Value]:
    op, where = node.op_type, _where(node)
    if op == "BatchNormalization":
        return HeadStep(node.name, "batchnorm", "BatchNormalization over features -> over "
                        "channels (unchanged)"), value
    if op == "LayerNormalization" and _get(node, "axis", -1) in (-1, 1):
        return HeadStep(node.name, "layernorm", "LayerNormalization -> over channels"), value
    if op in ("Softmax", "LogSoftmax") and _get(node, "axis", -1) in (-1, 1):
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
        op == "LayerNormalization" and not nchw and _get(node, "axis", -1) in (-1, 3)) or (
        op in ("Softmax", "LogSoftmax") and graph.opset >= 13
        and _get(node, "axis", -1) in channel_axis) or (
        op == "MatMul" and not nchw and graph.data_inputs(node) == [node.input[0]]) or (
        op == "Conv" and nchw and _pointwise_conv(graph, node))
    if not ok:
        raise NotConvolutionalizable(f"{_where(node)} has no known per-location equivalent on a "
                                     f"pooled {value.layout} map")
    return HeadStep(node.name, "keep", f"{op} (per location)"), value


def _pointwise_conv(graph: Graph, node: onnx.NodeProto) -> bool:
    weight = graph.shape(node.input[1]) if len(node.input) > 1 else None
    return (weight is not None and tuple(weight[2:]) == (1, 1)
            and not any(_get(node, "pads", [0]))  # type: ignore[arg-type]
            and set(_get(node, "strides", [1])) == {1}  # type: ignore[arg-type]
            and _get(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID"))


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
                                     f"({_first_line(exc)})") from exc
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


# --------------------------------------------------------------------------- body geometry


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


def _same_pad(size: int, k: int, s: int, d: int, lower: bool) -> tuple[int, int]:
    """TF-SAME padding along one axis: (before, total)."""
    total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return (total - total // 2 if lower else total // 2), total


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
        perm = list(_get(node, "perm", range(rank - 1, -1, -1)))  # type: ignore[call-overload]
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
        first = int(_get(node, "axis", -1)) % rank  # type: ignore[call-overload]
        return any(a >= first for a in axes)
    if node.op_type in ("Softmax", "LogSoftmax", "LpNormalization"):
        return int(_get(node, "axis", -1)) % rank in axes  # type: ignore[call-overload]
    return False


def _rescale(span: Span, ratio: float) -> Span:
    if ratio >= 1:
        return Span(span.lo, span.hi, span.jump * round(ratio))
    return Span(span.lo, span.hi, max(1, span.jump // round(1 / ratio)))


def _window(graph: Graph, node: onnx.NodeProto, in_shape, out_shape, ys: Span, xs: Span,
            geo: BodyGeometry) -> tuple[Span, Span]:
    kernel = _get(node, "kernel_shape")
    if kernel is None and len(node.input) > 1:
        kernel = (graph.shape(node.input[1]) or (0, 0, 1, 1))[2:]
    k = _pair(kernel, 1)
    s, d = _pair(_get(node, "strides"), 1), _pair(_get(node, "dilations"), 1)
    pads = list(_get(node, "pads", [0, 0, 0, 0]))  # type: ignore[call-overload]
    begin = (int(pads[0]), int(pads[1])) if len(pads) == 4 else (0, 0)
    auto = str(_get(node, "auto_pad", "NOTSET"))
    same_total = 0
    if auto.startswith("SAME") and in_shape and None not in in_shape[2:]:
        same = [_same_pad(in_shape[2 + a], k[a], s[a], d[a], auto == "SAME_LOWER") for a in (0, 1)]
        begin, same_total = (same[0][0], same[1][0]), same[0][1] + same[1][1]
    if any(pads) or same_total:
        geo.padded.append(node.name)
    if _get(node, "ceil_mode", 0) and in_shape and out_shape and None not in in_shape + out_shape:
        for a in (0, 1):
            size = in_shape[2 + a] + int(pads[a]) + int(pads[a + 2]) if len(pads) == 4 else in_shape[2 + a]
            if out_shape[2 + a] != (size - d[a] * (k[a] - 1) - 1) // s[a] + 1:
                geo.padded.append(node.name)
                break
    return ys.conv(k[0], s[0], begin[0], d[0]), xs.conv(k[1], s[1], begin[1], d[1])


def _pad(graph: Graph, node: onnx.NodeProto, ys: Span, xs: Span,
         geo: BodyGeometry) -> tuple[Span, Span]:
    pads = _get(node, "pads")
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


# --------------------------------------------------------------------------- rewriting


class _Rewrite:
    """New nodes and initializers replacing the head, one registered function per op type."""

    def __init__(self, graph: Graph, plan: HeadPlan, pool: PoolMode) -> None:
        self.graph, self.plan, self.pool = graph, plan, pool
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
    else:
        op = "MaxPool" if hn.step.reduce == "max" else "AveragePool"
        rw.add(op, [src], [pooled], kernel_shape=list(rw.plan.feature.size), strides=[1, 1])
    if nhwc:
        rw.add("Transpose", [pooled], [out], perm=[0, 2, 3, 1])


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
    weight = _linear_weight(rw.graph, hn.node)
    out_f = weight.shape[0]
    if hn.before.kind == "flat":
        assert hn.before.flat is not None
        kernel = linear_to_oihw(weight, *hn.before.flat, layout=hn.before.flat_layout)
    else:
        kernel = weight.reshape(out_f, -1, 1, 1)
    inputs = [rw.src(hn.node.input[0]), rw.constant("weight", kernel)]
    if hn.node.op_type == "Gemm" and len(hn.node.input) > 2 and hn.node.input[2]:
        inputs.append(rw.constant("bias", _gemm_bias(rw.graph, hn.node, out_f)))
    rw.add("Conv", inputs, [hn.node.output[0]], kernel_shape=list(kernel.shape[2:]))


def _gemm_bias(graph: Graph, node: onnx.NodeProto, out_f: int) -> np.ndarray:
    bias = graph.const(node.input[2])
    if bias is None or bias.size not in (1, out_f) or (bias.ndim == 2 and bias.shape[0] != 1):
        raise NotConvolutionalizable(f"{_where(node)}: bias '{node.input[2]}' is not a constant "
                                     f"of {out_f} values")
    beta = float(_get(node, "beta", 1.0))  # type: ignore[arg-type]
    bias = np.broadcast_to(bias.reshape(-1), (out_f,))
    return (bias * beta).astype(bias.dtype) if beta != 1.0 else np.array(bias)


def _rewrite_keep(rw: _Rewrite, hn: HeadNode) -> None:
    """Elementwise and per-location ops: unchanged, a feature-vector constant as (F, 1, 1)."""
    inputs = [rw.src(n) for n in hn.node.input]
    if hn.before.kind == "vector" and hn.node.op_type in BINARY:
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
    _set_int(rw.nodes[-1], "axis", -1)
    rw.add("Transpose", [normed], [hn.node.output[0]], perm=[0, 3, 1, 2])


def _rewrite_softmax(rw: _Rewrite, hn: HeadNode) -> None:
    rw.keep(hn)
    if hn.before.kind == "vector":
        _set_int(rw.nodes[-1], "axis", 1)


def _set_int(node: onnx.NodeProto, name: str, value: int) -> None:
    for attr in node.attribute:
        if attr.name == name:
            node.attribute.remove(attr)
            break
    node.attribute.append(helper.make_attribute(name, value))


REWRITES: dict[str, Rewriter] = {
    **{op: _rewrite_pool for op in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
                                    "ReduceMax", "AveragePool", "MaxPool")},
    **{op: _rewrite_shape for op in SHAPE_OPS},
    **{op: _rewrite_keep for op in ELEMENTWISE | {"BatchNormalization", "Conv"}},
    "Gemm": _rewrite_linear,
    "MatMul": _rewrite_linear,
    "LayerNormalization": _rewrite_layernorm,
    "Softmax": _rewrite_softmax,
    "LogSoftmax": _rewrite_softmax,
}


def rewrite(graph: Graph, plan: HeadPlan, head: Head, pool: PoolMode,
            spans: dict[str, tuple[Span, Span]]) -> onnx.ModelProto:
    """Replace the head of ``graph.model`` (the adapter's private copy) and clean up."""
    model, g = graph.model, graph.model.graph
    output = g.output[0]
    rw = _Rewrite(graph, plan, "window" if pool == "global" else pool)
    out_value = head.nodes[-1].after
    if not (pool == "global" and plan.global_pooling):
        head_names = {hn.node.name for hn in head.nodes}
        for hn in head.nodes:
            handler = REWRITES.get(hn.node.op_type)
            if handler is None:
                raise NotConvolutionalizable(f"no rewrite for {_where(hn.node)}")
            handler(rw, hn)
        last = head.nodes[-1].node.output[0]
        if pool == "global":  # a flatten head: the mean of the window map
            _append_mean(rw, graph.opset, _rename_output(rw, output.name), output.name)
        elif rw.src(last) != last:
            rw.add("Identity", [rw.src(last)], [output.name])
        kept = [n for n in g.node if n.name not in head_names]
        del g.node[:]
        g.node.extend(kept + rw.nodes)
        g.initializer.extend(rw.inits)
    _dynamic_body_reshapes(graph, rw, spans, {hn.node.name for hn in head.nodes})
    _set_io_dims(graph, plan, pool, out_value)
    _toposort(g)
    _remove_dead(model)
    del g.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


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
    if opset >= 18:
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
    out = rw.fresh("dims")
    rw.add("Slice", [src, rw.constant("start", np.array([start], np.int64)),
                     rw.constant("end", np.array([end], np.int64))], [out])
    return out


def _set_io_dims(graph: Graph, plan: HeadPlan, pool: PoolMode, out_value: Value) -> None:
    g = graph.model.graph
    image = next(i for i in g.input if i.name == graph.image)
    axes = (2, 3) if graph.layout == "NCHW" else (1, 2)
    dims = image.type.tensor_type.shape.dim
    for axis, param in zip((0, *axes), ("batch", "height", "width")):
        if not dims[axis].HasField("dim_param"):
            dims[axis].Clear()
            dims[axis].dim_param = param
    output = g.output[0]
    t = output.type.tensor_type
    batch, classes = onnx.TensorShapeProto.Dimension(), onnx.TensorShapeProto.Dimension()
    batch.CopyFrom(dims[0])
    native = graph.shape(output.name)
    if native and native[-1] is not None and out_value.kind == "vector":
        classes.dim_value = native[-1]
    t.ClearField("shape")
    t.shape.dim.append(batch)
    if pool == "global":
        t.shape.dim.append(classes)
        return
    rows, cols = onnx.TensorShapeProto.Dimension(), onnx.TensorShapeProto.Dimension()
    rows.dim_param, cols.dim_param = "rows", "cols"
    last = out_value.kind == "pooled" and out_value.layout == "NHWC"
    t.shape.dim.extend([rows, cols, classes] if last else [classes, rows, cols])


def _remove_dead(model: onnx.ModelProto) -> None:
    g = model.graph
    live = {o.name for o in g.output}
    kept = []
    for node in reversed(g.node):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(_all_inputs(node))
    del g.node[:]
    g.node.extend(reversed(kept))
    inits = [i for i in g.initializer if i.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)


def _all_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """A node's inputs and the outer names its subgraphs read."""
    yield from (n for n in node.input if n)
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in sub.node:
                yield from _all_inputs(inner)


def _toposort(g: onnx.GraphProto) -> None:
    """Kahn's algorithm, keeping the original order among ready nodes."""
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    produced = {o for n in g.node for o in n.output}
    pending = list(g.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            needs = [n for n in _all_inputs(node) if n in produced]
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


# --------------------------------------------------------------------------- entry point


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max |actual - expected| / max |expected|`` (float64)."""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    return float(np.abs(a - e).max() / max(float(np.abs(e).max()), 1e-30))


def convolutionalize_onnx(model: onnx.ModelProto, input_size: object = None,
                          pool: PoolMode = "window") -> onnx.ModelProto:
    """Convert an ONNX classifier; see :func:`convolutionalize.convolutionalize`.

    The result has symbolic input height and width and carries its geometry, plan and
    native-size error in ``metadata_props``.
    """
    pool = check_pool(pool)
    graph, plan, head = analyse(model, input_size)
    body, spans = body_geometry(graph, head.feature)
    geometry = geometry_from_plan(plan, pool, body)
    logger.debug("ONNX head:\n%s", plan.describe())
    converted = rewrite(graph, plan, head, pool, spans)
    try:
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:
        raise NotConvolutionalizable(f"the rewritten graph fails the ONNX checker: "
                                     f"{_first_line(exc)}") from exc
    error = _check_native(model, converted, plan, geometry)
    try:
        _check_larger(converted, plan, geometry, batch=2)
    except NotConvolutionalizable as exc:  # a body node fixes the batch size: keep it fixed
        logger.info("batch stays %d: %s", graph.batch, exc)
        converted = _pin_batch(converted, graph.batch)
        _check_larger(converted, plan, geometry, batch=1)
    props = {GEOMETRY_KEY: geometry.to_json(), PLAN_KEY: plan.describe(),
             NATIVE_ERROR_KEY: json.dumps(error)}
    kept = [p for p in converted.metadata_props if p.key not in props]
    del converted.metadata_props[:]
    converted.metadata_props.extend(kept)
    for key, value in props.items():
        converted.metadata_props.add(key=key, value=value)
    return converted


def _example(plan: HeadPlan, size: tuple[int, int], batch: int = 1) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, plan.in_channels, *size)).astype(np.float32)


def _pin_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """Give the input and output back the static batch size of the original graph."""
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


def _check_native(original: onnx.ModelProto, converted: onnx.ModelProto, plan: HeadPlan,
                  geometry: Geometry) -> float | None:
    """The converted graph equals the original at the native size (max relative error)."""
    x = _example(plan, plan.input_size)
    expected, out = predict_nchw(original, x), predict_nchw(converted, x)
    if geometry.pool == "window":
        if out.shape[-2:] != (1, 1):
            raise NotConvolutionalizable(f"at the native size the map is {out.shape[-2:]}, not 1x1; "
                                         "the head's geometry was misread")
        error: float | None = relative_error(out.reshape(expected.shape), expected)
    elif geometry.pool == "global":
        error = relative_error(out, expected)
    else:
        affine = all(s.op in ("global_pool", "flatten", "linear", "batchnorm") or (
            s.op == "keep" and s.detail.startswith(("Dropout", "Identity"))) for s in plan.steps)
        avg = all(s.reduce != "max" for s in plan.steps_of("global_pool"))
        error = relative_error(out.mean((2, 3)), expected) if affine and avg else None
    if error is not None and error > NATIVE_RTOL:
        raise NotConvolutionalizable(f"the rewritten graph differs from the original at the native "
                                     f"size (max relative error {error:.2e})")
    return error


def _check_larger(converted: onnx.ModelProto, plan: HeadPlan, geometry: Geometry,
                  batch: int) -> None:
    """The converted graph runs two strides larger and gives the map size the geometry says."""
    size = (plan.input_size[0] + 2 * geometry.stride[0], plan.input_size[1] + 2 * geometry.stride[1])
    try:
        out = predict_nchw(converted, _example(plan, size, batch))
    except Exception as exc:
        raise NotConvolutionalizable(f"the rewritten graph does not run at {batch}x{size[0]}x{size[1]}; "
                                     f"a body node is specific to the native size: "
                                     f"{_first_line(exc)}") from exc
    if geometry.pool != "global":
        cells = geometry.cells(*size)
        got = tuple(out.shape[2:]) if out.ndim == 4 else None
        if got != cells and tuple(out.shape[1:3]) != cells:
            raise NotConvolutionalizable(f"at {size[0]}x{size[1]} the map is {got}, the geometry "
                                         f"says {cells}")


def metadata_of(model: onnx.ModelProto) -> dict[str, str]:
    """The ``convolutionalize.*`` metadata a converted ONNX model carries (plan, geometry,
    native error), for ``inspect``."""
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("convolutionalize.")}
