"""A TensorFlow graph read back as a Keras 3 functional model of the same computation.

A SavedModel (Keras 3 ``model.export``, tf_keras ``save_format="tf"``, ``tf.saved_model.save``
of a ``tf.Module``) keeps no Keras configuration we can rely on, only a TensorFlow graph. Its
serving function is frozen (variables become constants,
``convert_variables_to_constants_v2``), every tensor that does not depend on the image is
computed once (weights, BatchNorm's folded scales, shape arithmetic), and each remaining
operation becomes one standard Keras layer with those constants as weights, by one function
per op type (:data:`OPS`). The result runs on any Keras backend and is converted by the Keras
adapter; :mod:`.model` checks it against the SavedModel's own function first.

Biases (``BiasAdd``, or an ``AddV2`` of a constant right after the layer that made the tensor)
go into the preceding Conv2D / Dense / BatchNormalization; a per-channel constant product or
sum elsewhere becomes a BatchNormalization with that scale and offset (statistics 0 and 1,
epsilon 0): exactly ``x * scale + offset``. An op without an entry is refused by its name
and type.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from ...errors import NotConvolutionalizable
from . import import_tensorflow

__all__ = ["OPS", "rebuild_graph"]

PASS_THROUGH = frozenset({"Identity", "IdentityN", "StopGradient", "PreventGradient", "Snapshot",
                          "EnsureShape", "CheckNumerics"})
ACTIVATIONS = {"Relu": "relu", "Elu": "elu", "Selu": "selu", "Sigmoid": "sigmoid", "Tanh": "tanh",
               "Softplus": "softplus", "Softsign": "softsign", "Softmax": "softmax", "Gelu": "gelu"}


@dataclass
class Rebuild:
    """The Keras tensors made so far (by TF tensor name), the constants, and the layers whose
    bias a following constant addition may still join."""

    constants: dict[str, np.ndarray]
    tensors: dict[str, Any] = field(default_factory=dict)
    owners: dict[str, Any] = field(default_factory=dict)  # TF tensor -> the layer that made it
    consumers: dict[str, int] = field(default_factory=dict)  # TF tensor -> how many ops read it

    def data(self, op: Any) -> list[Any]:
        return [t for t in op.inputs if t.name not in self.constants]

    def const(self, op: Any) -> list[np.ndarray]:
        return [self.constants[t.name] for t in op.inputs if t.name in self.constants]


_NAMES: ContextVar[set[str]] = ContextVar("names")  # the layer names given in the current rebuild
Handler = Callable[[Rebuild, Any], Any]
OPS: dict[str, Handler] = {}


def handles(*types: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in types:
            OPS[name] = fn
        return fn
    return register


def _name(op: Any) -> str:
    """A Keras layer name for ``op``: its TF name without the function-call scopes TensorFlow
    adds (``StatefulPartitionedCall/``), which inspect and error messages would repeat."""
    parts = [p for p in op.name.split("/") if not re.fullmatch(r"(Stateful)?PartitionedCall(_\d+)?", p)]
    name = "_".join(parts or [op.name]).replace(":", "_")[-120:]
    if name in _NAMES.get():
        name = op.name.replace("/", "_").replace(":", "_")[-120:]  # the full name is unique in a graph
    _NAMES.get().add(name)
    return name


def _padding(op: Any) -> str:
    padding = op.get_attr("padding").decode()
    if padding not in ("SAME", "VALID"):
        raise NotConvolutionalizable(f"TensorFlow op '{op.name}' ({op.type}) has {padding} padding")
    return padding.lower()


def _nhwc(op: Any) -> None:
    if op.get_attr("data_format").decode() not in ("NHWC", "NDHWC"):
        raise NotConvolutionalizable(f"TensorFlow op '{op.name}' ({op.type}) works on "
                                     f"{op.get_attr('data_format').decode()} tensors; NHWC graphs convert")


def _layer(r: Rebuild, op: Any, layer: Any, x: Any, weights: list[np.ndarray] | None = None) -> Any:
    out = layer(x)
    if weights is not None:
        layer.set_weights(weights)
    r.owners[op.outputs[0].name] = layer
    return out


@handles("Conv2D", "DepthwiseConv2dNative")
def _conv(r: Rebuild, op: Any) -> Any:
    _nhwc(op)
    (x,), (kernel,) = r.data(op), r.const(op)
    strides, dilations = op.get_attr("strides")[1:3], op.get_attr("dilations")[1:3]
    kh, kw = kernel.shape[:2]
    if op.type == "Conv2D":
        layer = keras.layers.Conv2D(kernel.shape[3], (kh, kw), strides=strides, padding=_padding(op),
                                    dilation_rate=dilations, use_bias=False, name=_name(op))
    else:
        layer = keras.layers.DepthwiseConv2D((kh, kw), strides=strides, padding=_padding(op),
                                             depth_multiplier=kernel.shape[3], dilation_rate=dilations,
                                             use_bias=False, name=_name(op))
    return _layer(r, op, layer, r.tensors[x.name], [kernel])


@handles("MatMul")
def _matmul(r: Rebuild, op: Any) -> Any:
    data, consts = r.data(op), r.const(op)
    if len(data) == 1 and r.tensors[data[0].name].shape[-1] is None:
        raise NotConvolutionalizable(
            f"TensorFlow op '{op.name}' (MatMul) reads features whose number is not fixed: the graph's "
            "input has no static height and width; save the function with the native input size, "
            "input_signature=[tf.TensorSpec((None, H, W, C))]")
    if len(data) != 1 or len(consts) != 1 or op.inputs[0].name in r.constants or op.get_attr("transpose_a"):
        raise NotConvolutionalizable(f"TensorFlow op '{op.name}' (MatMul) is not a dense layer "
                                     "(data times constant weights)")
    kernel = consts[0].T if op.get_attr("transpose_b") else consts[0]
    layer = keras.layers.Dense(kernel.shape[1], use_bias=False, name=_name(op))
    return _layer(r, op, layer, r.tensors[data[0].name], [kernel])


@handles("BiasAdd", "AddV2", "Add", "Sub", "Mul", "RealDiv")
def _arithmetic(r: Rebuild, op: Any) -> Any:
    data = r.data(op)
    if len(data) == 2:
        merge = {"AddV2": keras.layers.Add, "Add": keras.layers.Add, "Sub": keras.layers.Subtract,
                 "Mul": keras.layers.Multiply}.get(op.type)
        if merge is None:
            raise NotConvolutionalizable(f"TensorFlow op '{op.name}' ({op.type}) of two computed tensors")
        return merge(name=_name(op))([r.tensors[t.name] for t in op.inputs])
    (x,), (c,) = data, r.const(op)
    if op.type == "Sub" and op.inputs[0].name in r.constants:  # c - x
        raise NotConvolutionalizable(f"TensorFlow op '{op.name}' (Sub) subtracts the image data from a "
                                     "constant")
    c = np.asarray(c, np.float32)
    ones, zeros = np.ones_like(c), np.zeros_like(c)
    if op.type == "RealDiv" and not np.all(c):
        raise NotConvolutionalizable(f"TensorFlow op '{op.name}' (RealDiv) divides by zero")
    scale, offset = {"Mul": (c, zeros), "RealDiv": (ones / np.where(c == 0, 1, c), zeros),
                     "Sub": (ones, -c)}.get(op.type, (ones, c))
    channels = int(x.shape[-1]) if x.shape.rank else None
    if c.size not in (1, channels) or (c.ndim and c.shape[-1] != c.size):
        raise NotConvolutionalizable(f"TensorFlow op '{op.name}' ({op.type}) with a constant of shape "
                                     f"{c.shape}: only scalars and per-channel vectors convert")
    return _affine(r, op, x, np.broadcast_to(scale.reshape(-1), (channels,)),
                   np.broadcast_to(offset.reshape(-1), (channels,)))


def _affine(r: Rebuild, op: Any, x: Any, scale: np.ndarray, offset: np.ndarray) -> Any:
    """``x * scale + offset`` per channel: into the bias of the layer that made ``x`` when the
    scale is 1 and nothing else reads ``x``, else a BatchNormalization that computes exactly it."""
    owner = r.owners.get(x.name)
    if np.all(scale == 1) and owner is not None and r.consumers.get(x.name) == 1:
        weights = owner.get_weights()
        if isinstance(owner, keras.layers.BatchNormalization):
            weights[1] = weights[1] + offset
            owner.set_weights(weights)
            r.owners[op.outputs[0].name] = owner
            return r.tensors[x.name]
        if getattr(owner, "use_bias", True) is False and len(weights) == 1:
            return _with_bias(r, op, owner, x, weights[0], offset)
    layer = keras.layers.BatchNormalization(epsilon=0.0, name=_name(op))
    channels = scale.shape[0]
    return _layer(r, op, layer, r.tensors[x.name], [np.asarray(scale, np.float32),
                                                    np.asarray(offset, np.float32),
                                                    np.zeros(channels, np.float32),
                                                    np.ones(channels, np.float32)])


def _with_bias(r: Rebuild, op: Any, owner: Any, x: Any, kernel: np.ndarray, bias: np.ndarray) -> Any:
    """The layer ``owner`` again, with a bias: its output tensor is replaced (nothing read it yet)."""
    config = {**owner.get_config(), "use_bias": True}
    layer = type(owner).from_config(config)
    source = owner._inbound_nodes[-1].input_tensors[0]  # the Keras tensor ``owner`` was called on
    out = layer(source)
    layer.set_weights([kernel, np.asarray(bias, np.float32)])
    r.owners[op.outputs[0].name] = layer
    return out


@handles("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
def _batch_norm(r: Rebuild, op: Any) -> Any:
    _nhwc(op)
    (x,), (gamma, beta, mean, var) = r.data(op), r.const(op)
    layer = keras.layers.BatchNormalization(epsilon=float(op.get_attr("epsilon")), name=_name(op))
    return _layer(r, op, layer, r.tensors[x.name], [gamma, beta, mean, var])


@handles(*ACTIVATIONS)
def _activation(r: Rebuild, op: Any) -> Any:
    return keras.layers.Activation(ACTIVATIONS[op.type], name=_name(op))(r.tensors[r.data(op)[0].name])


@handles("Relu6")
def _relu6(r: Rebuild, op: Any) -> Any:
    return keras.layers.ReLU(max_value=6.0, name=_name(op))(r.tensors[r.data(op)[0].name])


@handles("LeakyRelu")
def _leaky(r: Rebuild, op: Any) -> Any:
    slope = float(op.get_attr("alpha"))
    return keras.layers.LeakyReLU(negative_slope=slope, name=_name(op))(r.tensors[r.data(op)[0].name])


@handles("Neg")
def _neg(r: Rebuild, op: Any) -> Any:
    return keras.layers.Rescaling(-1.0, name=_name(op))(r.tensors[r.data(op)[0].name])


@handles("MaxPool", "AvgPool")
def _pool(r: Rebuild, op: Any) -> Any:
    _nhwc(op)
    pool = keras.layers.MaxPooling2D if op.type == "MaxPool" else keras.layers.AveragePooling2D
    layer = pool(tuple(op.get_attr("ksize")[1:3]), strides=tuple(op.get_attr("strides")[1:3]),
                 padding=_padding(op), name=_name(op))
    return layer(r.tensors[r.data(op)[0].name])


@handles("Mean", "Max")
def _reduce(r: Rebuild, op: Any) -> Any:
    (x,), (axes,) = r.data(op), r.const(op)
    rank = x.shape.rank
    if rank != 4 or sorted(int(a) % 4 for a in np.ravel(axes)) != [1, 2]:
        raise NotConvolutionalizable(f"TensorFlow op '{op.name}' ({op.type}) reduces axes "
                                     f"{np.ravel(axes).tolist()}; only global pooling over height and "
                                     "width converts")
    pool = keras.layers.GlobalAveragePooling2D if op.type == "Mean" else keras.layers.GlobalMaxPooling2D
    return pool(keepdims=bool(op.get_attr("keep_dims")), name=_name(op))(r.tensors[x.name])


@handles("Reshape", "Squeeze")
def _reshape(r: Rebuild, op: Any) -> Any:
    x, out = r.data(op)[0], op.outputs[0]
    if out.shape.rank is None or None in out.shape.as_list()[1:]:
        raise NotConvolutionalizable(f"TensorFlow op '{op.name}' ({op.type}) gives a tensor of unknown "
                                     f"shape {out.shape}; save the model with a signature of the native "
                                     "input size")
    if out.shape.rank == 2 and x.shape.rank == 4:
        return keras.layers.Flatten(name=_name(op))(r.tensors[x.name])
    return keras.layers.Reshape(tuple(out.shape.as_list()[1:]), name=_name(op))(r.tensors[x.name])


@handles("ConcatV2")
def _concat(r: Rebuild, op: Any) -> Any:
    axis = int(r.constants[op.inputs[-1].name])
    return keras.layers.Concatenate(axis=axis, name=_name(op))([r.tensors[t.name] for t in op.inputs[:-1]])


@handles("Pad", "PadV2")
def _pad(r: Rebuild, op: Any) -> Any:
    x, pads = r.data(op)[0], r.constants[op.inputs[1].name]
    value = float(r.constants[op.inputs[2].name]) if op.type == "PadV2" else 0.0
    if value != 0.0 or pads.shape != (4, 2) or pads[0].any() or pads[3].any():
        raise NotConvolutionalizable(f"TensorFlow op '{op.name}' ({op.type}) pads other than zeros "
                                     "around height and width")
    padding = ((int(pads[1, 0]), int(pads[1, 1])), (int(pads[2, 0]), int(pads[2, 1])))
    return keras.layers.ZeroPadding2D(padding, name=_name(op))(r.tensors[x.name])


@handles("Cast")
def _cast(r: Rebuild, op: Any) -> Any:
    if op.outputs[0].dtype.name != "float32":
        raise NotConvolutionalizable(f"TensorFlow op '{op.name}' (Cast) to {op.outputs[0].dtype.name}")
    return r.tensors[r.data(op)[0].name]


def rebuild_graph(function: Any, name: str) -> keras.Model:
    """The Keras 3 model computing the frozen concrete ``function`` (one NHWC image input)."""
    graph = function.graph
    inputs = [t for t in function.inputs if t.dtype.is_floating]
    if len(inputs) != 1 or inputs[0].shape.rank != 4:
        shapes = ", ".join(str(t.shape) for t in function.inputs)
        raise NotConvolutionalizable(f"TensorFlow function '{name}' takes ({shapes}); only a classifier "
                                     "of one (N, H, W, C) image batch can slide")
    _NAMES.set(set())
    image = inputs[0]
    live, meta = _depending_on(graph, image)
    r = Rebuild(_constants(graph, live | meta))
    r.tensors[image.name] = keras.Input(tuple(image.shape.as_list()[1:]), name="image")
    for op in graph.get_operations():
        for t in op.inputs:
            r.consumers[t.name] = r.consumers.get(t.name, 0) + 1
    for op in graph.get_operations():
        if op.type == "Placeholder" or not any(t.name in live for t in op.outputs):
            continue
        r.tensors[op.outputs[0].name] = _one(r, op)
    outputs = [r.tensors[t.name] for t in function.outputs]
    return keras.Model(r.tensors[image.name], outputs if len(outputs) > 1 else outputs[0], name=name)


def _one(r: Rebuild, op: Any) -> Any:
    if op.type in PASS_THROUGH:
        return r.tensors[r.data(op)[0].name]
    handler = OPS.get(op.type)
    if handler is None:
        raise NotConvolutionalizable(f"TensorFlow op '{op.name}' ({op.type}) has no Keras equivalent here; "
                                     f"ops that convert: {', '.join(sorted({*OPS, *PASS_THROUGH}))}")
    try:
        return handler(r, op)
    except NotConvolutionalizable:
        raise
    except Exception as exc:
        raise NotConvolutionalizable(f"TensorFlow op '{op.name}' ({op.type}) cannot be rebuilt: "
                                     f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                                     ) from exc


SHAPE_OPS = frozenset({"Shape", "ShapeN", "Size", "Rank"})


def _depending_on(graph: Any, image: Any) -> tuple[set[str], set[str]]:
    """The names of every tensor computed from ``image``'s values, and of those computed from its
    shape only (``Reshape``'s target, read from the static output shape instead)."""
    live, meta = {image.name}, set()
    for op in graph.get_operations():  # in topological order
        if op.type in SHAPE_OPS and any(t.name in live for t in op.inputs):
            meta.update(t.name for t in op.outputs)
        elif any(t.name in live for t in op.inputs):
            live.update(t.name for t in op.outputs)
        elif any(t.name in meta for t in op.inputs):
            meta.update(t.name for t in op.outputs)
    return live, meta


def _constants(graph: Any, live: set[str]) -> dict[str, np.ndarray]:
    """The value of every tensor an op on the image reads that does not depend on the image
    (``live``: the tensors that do, by value or by shape)."""
    tf = import_tensorflow("reading a TensorFlow graph")
    wanted = [t for op in graph.get_operations() if any(o.name in live for o in op.outputs)
              for t in op.inputs if t.name not in live and t.dtype != tf.resource]
    wanted = list({t.name: t for t in wanted}.values())
    if not wanted:
        return {}
    with tf.compat.v1.Session(graph=graph) as session:
        values = session.run(wanted)
    return {t.name: np.asarray(v) for t, v in zip(wanted, values)}
