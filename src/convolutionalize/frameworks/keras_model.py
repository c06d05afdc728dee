"""Keras 3 adapter: read a functional or Sequential model, find the head, rebuild it as convolutions.

A Keras model is a graph of operation calls on symbolic tensors. The adapter copies the
model (``clone_model`` + ``set_weights``: the caller's is never touched), flattens nested
models into one list of calls, replays it once at the native input size to learn every
tensor's static shape, and gives each tensor a *kind* (``map``, ``pooled``, ``vector``,
``flat``, ``seq``, as in the PyTorch adapter). The head is everything between the last map
and the output; each head call becomes a :class:`~convolutionalize.plan.HeadStep`.
The rewrite replays the calls once more on an input of unknown height and width: body
calls unchanged, head calls by one registered function per step kind (``Dense`` after a
flatten -> ``Conv2D`` with the feature map's size as kernel, later ``Dense`` -> 1x1,
global pooling -> stride-1 window pool / nothing / kept). Only Keras layers are built,
so the result runs on any backend. The head works in the model's own data format: the
result maps are ``(N, rows, cols, classes)`` for channels_last models and
``(N, classes, rows, cols)`` for channels_first ones (:func:`predict_nchw` hides this).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np

from .._files import atomic_path
from ..errors import NotConvolutionalizable
from ..geometry import BodyGeometry, Geometry, PoolMode, Span, geometry_from_plan
from ..plan import FeatureMap, HeadPlan, HeadStep
from ..weights import dense_to_hwio

__all__ = ["activation_shapes", "convolutionalize_keras", "input_channels", "load_keras", "model_digest",
           "predict_nchw", "save_keras"]

log = logging.getLogger(__name__)

NATIVE_RTOL = 1e-4
META_FILE = "convolutionalize.json"  # geometry and plan, stored inside a saved .keras zip

Kind = Literal["map", "pooled", "vector", "flat", "seq"]
Layout = Literal["NHWC", "NCHW"]

SPATIAL_OPS = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D")
GLOBAL_POOLS = {"GlobalAveragePooling2D": "avg", "GlobalMaxPooling2D": "max"}
GLOBAL_OPS = frozenset({"GroupNormalization", "MultiHeadAttention", "Attention", "AdditiveAttention",
                        "GroupQueryAttention", "UnitNormalization"})
ELEMENTWISE = frozenset({
    # layers
    "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "Dropout", "SpatialDropout2D",
    "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity",
    "Rescaling", "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate",
    "StochasticDepth", "LayerScale",
    # keras.ops called on symbolic tensors (x + 3.0, ops.relu6(x), ...)
    "Divide", "TrueDivide", "Negative", "Abs", "Square", "Sqrt", "Power", "Exp", "Log", "Clip",
    "Relu", "Relu6", "Sigmoid", "HardSigmoid", "HardSwish", "HardSilu", "Silu", "Swish", "Gelu",
    "Tanh", "Softplus", "Softsign", "Elu", "Selu", "LeakyRelu", "Mish", "Cast",
})
NO_OPS = frozenset({"Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
                    "ActivityRegularization", "Identity"})


# --------------------------------------------------------------------------- the graph


@dataclass
class _Call:
    """One operation call of the (flattened) graph: inputs canonical, outputs as created."""

    op: Any
    node: Any
    inputs: list[Any]
    outputs: list[Any]

    @property
    def name(self) -> str:
        return str(self.op.name)

    @property
    def kind(self) -> str:
        return type(self.op).__name__


def _graph_of(op: Any) -> Any | None:
    """The Functional graph inside a (nested) model, or None for a plain layer / op."""
    if isinstance(op, keras.Sequential):
        return getattr(op, "_functional", None)
    if isinstance(op, keras.Model) and hasattr(op, "_nodes_by_depth"):
        return op
    return None


def _flatten_graph(fn: Any, inputs: list[Any], canon: dict[int, Any], calls: list[_Call]) -> list[Any]:
    """Append ``fn``'s calls (nested models inlined) to ``calls``; return its canonical outputs."""
    for inner, outer in zip(fn.inputs, inputs):
        canon[id(inner)] = outer
    for depth in sorted(fn._nodes_by_depth, reverse=True):
        for node in fn._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            ins = [canon.get(id(t), t) for t in node.input_tensors]
            nested = _graph_of(node.operation)
            if nested is not None:
                if len(nested.inputs) != len(ins):
                    raise NotConvolutionalizable(f"nested model '{node.operation.name}' is called "
                                                 "with a structure it does not take")
                outs = _flatten_graph(nested, ins, canon, calls)
                for t, inner in zip(node.outputs, outs):
                    canon[id(t)] = inner
                continue
            calls.append(_Call(node.operation, node, ins, list(node.outputs)))
    return [canon.get(id(t), t) for t in fn.outputs]


def _fill(call: _Call, new: dict[int, Any], canon: dict[int, Any]) -> tuple[list, dict]:
    """The call's arguments with each symbolic input replaced by its new tensor."""
    table = {id(t): new[id(canon.get(id(t), t))] for t in call.node.input_tensors}
    args, kwargs = call.node.arguments.fill_in(table)
    return list(args), dict(kwargs)


class _Graph:
    """A private copy of a Keras model as a flat call list, and its shapes at the native size."""

    def __init__(self, model: keras.Model) -> None:
        fn = _graph_of(model)
        if fn is None or not getattr(model, "built", False) or not model.inputs:
            raise ValueError(f"{type(model).__name__} '{model.name}' has no symbolic graph: build a "
                             "functional model, or give the Sequential an Input((H, W, C)) first")
        if len(fn.inputs) != 1 or len(fn.outputs) != 1:
            raise NotConvolutionalizable(
                f"model '{model.name}' has {len(fn.inputs)} inputs and {len(fn.outputs)} outputs; "
                "only a single-image classifier with one output can slide")
        self.input = fn.inputs[0]
        self.canon: dict[int, Any] = {}
        self.calls: list[_Call] = []
        self.output = _flatten_graph(fn, [self.input], self.canon, self.calls)[0]

    def replay(self, new_input: Any, handle: Callable[[_Call, dict[int, Any]], list[Any] | None]
               ) -> dict[int, Any]:
        """Call every operation again on new tensors; ``handle`` may replace a call's outputs."""
        new: dict[int, Any] = {id(self.input): new_input}
        for call in self.calls:
            if any(id(t) not in new for t in call.inputs):
                continue  # not connected to the image input (a constant branch)
            outs = handle(call, new)
            if outs is None:
                args, kwargs = _fill(call, new, self.canon)
                outs = keras.tree.flatten(call.op(*args, **kwargs))
            for t, out in zip(call.outputs, outs):
                new[id(t)] = out
        return new


def _private_copy(model: keras.Model) -> keras.Model:
    try:
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
    except Exception as exc:  # custom layers without a working get_config, say
        raise NotConvolutionalizable(f"cannot copy model '{model.name}' (the original is never "
                                     f"modified): {str(exc).splitlines()[0] if str(exc) else exc!r}"
                                     ) from exc
    return clone


# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class _Value:
    kind: Kind
    reduce: Literal["avg", "max"] | None = None
    flat: tuple[int, int, int, str] | None = None  # (C, H, W, order) of a flattened map


def _layout(calls: list[_Call]) -> Layout:
    formats = {getattr(c.op, "data_format", None) for c in calls
               if c.kind in (*SPATIAL_OPS, *GLOBAL_POOLS, "ZeroPadding2D", "Cropping2D")}
    if formats == {"channels_first"}:
        return "NCHW"
    if "channels_first" in formats:
        raise NotConvolutionalizable("the model mixes channels_first and channels_last layers; "
                                     "cannot tell where its spatial axes are")
    return "NHWC"


class _Analysis:
    """Kinds, shapes and the HeadPlan of a private copy of a Keras model."""

    def __init__(self, model: keras.Model, input_size: object) -> None:
        self.graph = _Graph(_private_copy(model))
        self.layout = _layout(self.graph.calls)
        self.axes = (1, 2) if self.layout == "NHWC" else (2, 3)
        self.channel_axis = 3 if self.layout == "NHWC" else 1
        self.input_size, self.in_channels = self._native(model, input_size)
        shape = ((*self.input_size, self.in_channels) if self.layout == "NHWC"
                 else (self.in_channels, *self.input_size))
        try:
            native = self.graph.replay(keras.Input(shape), lambda call, new: None)
        except Exception as exc:
            raise NotConvolutionalizable(
                f"model '{model.name}' does not run at the native input size "
                f"{self.input_size[0]}x{self.input_size[1]}: {str(exc).splitlines()[0]}") from exc
        self.shapes = {key: tuple(t.shape) for key, t in native.items()}
        self.values = self._kinds()
        self.head, self.feature = self._head()
        self.plan = self._plan()

    def _native(self, model: keras.Model, input_size: object) -> tuple[tuple[int, int], int]:
        shape = tuple(self.graph.input.shape)
        if len(shape) != 4:
            raise NotConvolutionalizable(f"model '{model.name}' takes a rank-{len(shape)} input, "
                                         "not images (N, H, W, C) / (N, C, H, W)")
        (ay, ax), c = self.axes, shape[self.channel_axis]
        if c is None:
            raise NotConvolutionalizable(f"model '{model.name}' has no static channel count")
        static = (shape[ay], shape[ax])
        given = (input_size, input_size) if isinstance(input_size, int) else input_size
        if given is not None and (not isinstance(given, (tuple, list)) or len(given) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in given)):
            raise ValueError(f"input_size must be two positive ints (height, width), got {input_size!r}")
        if None not in static:
            if given is not None and tuple(given) != static:
                raise ValueError(f"input_size {tuple(given)} differs from the static input size "
                                 f"{static} of model '{model.name}'; pass input_size=None")
            return (int(static[0]), int(static[1])), int(c)
        if given is None:
            raise ValueError(f"input_size is required for model '{model.name}': its input has no static "
                             "height and width; pass the native (training) size, e.g. input_size=(224, 224)")
        return (int(given[0]), int(given[1])), int(c)

    # ---- kinds

    def _kinds(self) -> dict[int, _Value]:
        values = {id(self.graph.input): _Value("map")}
        for call in self.graph.calls:
            if any(id(t) not in values for t in call.inputs):
                continue
            value = self._value(call, [values[id(t)] for t in call.inputs])
            for t in call.outputs:
                values[id(t)] = value
        return values

    def _value(self, call: _Call, ins: list[_Value]) -> _Value:
        out = self.shapes[id(call.outputs[0])]
        in_shape = self.shapes[id(call.inputs[0])]
        kinds = {v.kind for v in ins}
        if "seq" in kinds:
            return _Value("seq")
        if "map" in kinds:
            if len(ins) > 1:
                return _Value("map") if len(out) == 4 else _Value("seq")
            if call.kind in GLOBAL_POOLS:
                return _Value("pooled" if len(out) == 4 else "vector", reduce=GLOBAL_POOLS[call.kind])
            if call.kind in ("Flatten", "Reshape") and len(out) == 2:
                c, (h, w) = in_shape[self.channel_axis], (in_shape[self.axes[0]], in_shape[self.axes[1]])
                transposes = call.kind == "Flatten" and getattr(call.op, "_channels_first", False)
                order = "HWC" if self.layout == "NHWC" or transposes else "CHW"
                return _Value("flat", flat=(c, h, w, order))
            return _Value("map") if len(out) == 4 and call.kind not in ("Reshape", "Permute") else (
                _Value("seq"))
        src = ins[0]
        if src.kind == "flat":
            if call.kind == "Dense":
                return _Value("vector")
            return src if out == in_shape else _Value("seq")
        if len(out) == 2:
            return _Value("vector")
        if len(out) == 4 and (out[self.axes[0]], out[self.axes[1]]) == (1, 1):
            return _Value("pooled")
        return _Value("seq")

    def _head(self) -> tuple[list[_Call], Any]:
        producer = {id(t): c for c in self.graph.calls for t in c.outputs}
        out = self.graph.output
        value = self.values.get(id(out))
        if value is None:
            raise NotConvolutionalizable("the model's output does not depend on its input image")
        if value.kind == "map":
            raise NotConvolutionalizable(f"the output of '{producer[id(out)].name}' is already a spatial "
                                         "map: the model is fully convolutional, there is no head")
        head: dict[int, _Call] = {}
        features: dict[int, Any] = {}
        stack = [out]
        while stack:
            t = stack.pop()
            v = self.values[id(t)]
            if v.kind == "map" or id(t) == id(self.graph.input):
                features[id(t)] = t
                continue
            call = producer[id(t)]
            if v.kind == "seq":
                call = next(c for c in self.graph.calls
                            if self.values.get(id(c.outputs[0]), _Value("map")).kind == "seq")
                raise NotConvolutionalizable(
                    f"layer '{call.name}' ({call.kind}) turns the spatial map into tokens or windows, "
                    "so the classifier cannot slide as convolutions; evaluate it crop by crop")
            if id(call) not in {id(c) for c in head.values()}:
                head[id(t)] = call
                stack.extend(call.inputs)
        if len(features) != 1:
            names = ", ".join(f"'{producer[k].name}'" for k in features if k in producer)
            raise NotConvolutionalizable(f"the head reads several feature maps ({names}); "
                                         "only a head over one map can slide")
        calls = {id(c): c for c in head.values()}
        return [c for c in self.graph.calls if id(c) in calls], next(iter(features.values()))

    # ---- plan

    def _plan(self) -> HeadPlan:
        shape = self.shapes[id(self.feature)]
        producer = next((c for c in self.graph.calls if any(t is self.feature for t in c.outputs)), None)
        name = producer.name if producer else self.graph.input._keras_history[0].name
        fmap = FeatureMap(name, int(shape[self.channel_axis]),
                          (int(shape[self.axes[0]]), int(shape[self.axes[1]])), self.layout)
        steps = tuple(self._step(call, fmap) for call in self.head)
        return HeadPlan("keras", self.input_size, self.in_channels, fmap, steps)

    def _step(self, call: _Call, fmap: FeatureMap) -> HeadStep:
        src = self.values[id(call.inputs[0])]
        value = self.values[id(call.outputs[0])]
        op, kind, name = call.op, call.kind, call.name
        where = f"head layer '{name}' ({kind})"
        if src.kind == "map":
            if value.reduce is not None:
                return HeadStep(name, "global_pool", f"global {value.reduce} pool over "
                                f"{fmap.size[0]}x{fmap.size[1]}", reduce=value.reduce)
            assert value.flat is not None
            c, h, w, order = value.flat
            return HeadStep(name, "flatten", f"{kind} {c}x{h}x{w} ({order}) -> removed")
        if kind in ("Flatten", "Reshape") and src.kind == "pooled" and value.kind == "vector":
            return HeadStep(name, "flatten", f"{kind} of a 1x1 pooled map -> removed")
        if kind == "Reshape" and src.kind == "vector" and value.kind == "pooled":
            return HeadStep(name, "flatten", f"{kind} of a vector to 1x1 -> removed")
        if kind == "Dense":
            units = op.units
            if src.kind == "flat":
                assert src.flat is not None
                c, h, w, _ = src.flat
                return HeadStep(name, "linear", f"Dense {c * h * w}->{units} -> Conv2D {c}->{units} "
                                f"kernel {h}x{w}", kernel=(h, w))
            if src.kind == "vector":
                return HeadStep(name, "linear", f"Dense {op.kernel.shape[0]}->{units} -> Conv2D 1x1",
                                kernel=(1, 1))
            if self.layout == "NHWC":
                return HeadStep(name, "keep", "Dense on a channels-last map (per location)")
            raise NotConvolutionalizable(f"{where} acts on the last axis of a channels_first map")
        if src.kind == "flat":
            if kind in NO_OPS or (kind in ELEMENTWISE and not _channel_op(op)):
                return HeadStep(name, "keep", f"{kind} (elementwise)")
            raise NotConvolutionalizable(f"{where} acts on the flattened map before any Dense; "
                                         "it has no sliding equivalent")
        vector = src.kind == "vector"
        axis = _axis(op)
        if kind == "BatchNormalization" and (vector or axis % 4 == self.channel_axis):
            return HeadStep(name, "batchnorm" if vector else "keep", "BatchNormalization over channels")
        if kind == "LayerNormalization":
            axes = tuple(a % (2 if vector else 4) for a in (axis if isinstance(axis, (list, tuple))
                                                             else [axis]))
            if axes == ((1,) if vector else (self.channel_axis,)):
                return HeadStep(name, "layernorm" if vector else "keep", "LayerNormalization over channels")
            raise NotConvolutionalizable(f"{where} normalizes over axes {axes}, not the features")
        if _softmax(op) and (vector or axis % 4 == self.channel_axis):
            return HeadStep(name, "softmax" if vector else "keep", f"{kind} softmax over classes")
        if kind == "Concatenate" and (axis % 2 == 1 if vector else axis % 4 == self.channel_axis):
            return HeadStep(name, "concat" if vector else "keep", "Concatenate features")
        if kind in ELEMENTWISE and not _channel_op(op):
            return HeadStep(name, "keep", f"{kind} (elementwise)")
        if not vector and kind == "Conv2D" and tuple(op.kernel_size) == (1, 1) and tuple(op.strides) == (
                1, 1) and tuple(op.dilation_rate) == (1, 1):
            return HeadStep(name, "keep", "Conv2D 1x1 (per location)")
        raise NotConvolutionalizable(
            f"{where} has no known per-location equivalent on a {src.kind} tensor; supported head "
            "layers: pooling, Flatten/Reshape, Dense, BatchNormalization, LayerNormalization, "
            "softmax, Concatenate, 1x1 Conv2D and elementwise activations/dropout")

    # ---- geometry

    def geometry(self, pool: PoolMode) -> Geometry:
        body = _body_geometry(self)
        return geometry_from_plan(self.plan, pool, body)


def _axis(op: Any) -> Any:
    axis = getattr(op, "axis", -1)
    return axis if axis is not None else -1


def _softmax(op: Any) -> bool:
    if type(op).__name__ == "Softmax":
        return True
    fn = getattr(op, "activation", None)
    return type(op).__name__ == "Activation" and getattr(fn, "__name__", "") == "softmax"


def _channel_op(op: Any) -> bool:
    """Elementwise-looking layers that actually mix channels (softmax, concat)."""
    return _softmax(op) or type(op).__name__ == "Concatenate" or (
        type(op).__name__ == "Activation" and getattr(op.activation, "__name__", "") == "log_softmax")


# --------------------------------------------------------------------------- body geometry


def _same_pad(size: int, k: int, s: int, d: int) -> int:
    """Leading padding of Keras/TF ``padding="same"`` for an input of ``size``."""
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2


def _body_geometry(a: _Analysis) -> BodyGeometry:
    """Compose spans from the input to the feature map, collecting padding / context notes."""
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
    return geo


def _apply(a: _Analysis, call: _Call, ys: Span, xs: Span, geo: BodyGeometry) -> tuple[Span, Span]:
    op, kind = call.op, call.kind
    in_shape = a.shapes[id(call.inputs[0])]
    out_value = a.values[id(call.outputs[0])]
    if kind in SPATIAL_OPS:
        pooling = "Pooling" in kind
        kernel = tuple(op.pool_size if pooling else op.kernel_size)
        stride = tuple(op.strides or kernel)
        dil = (1, 1) if pooling else tuple(op.dilation_rate)
        pad = (0, 0)
        if op.padding == "same":
            pad = tuple(_same_pad(in_shape[ax], k, s, d) for ax, k, s, d in zip(a.axes, kernel, stride, dil))
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


def _local(a: _Analysis, call: _Call) -> bool:
    """Per-location layers: elementwise, channel-only, or acting on the channel axis."""
    kind, op = call.kind, call.op
    if kind in ("Dense", "EinsumDense"):
        return a.layout == "NHWC"
    if kind in ("BatchNormalization", "LayerNormalization", "Normalization", "Softmax", "Concatenate"):
        axis = _axis(op)
        axes = axis if isinstance(axis, (list, tuple)) else [axis]
        return [x % 4 for x in axes] == [a.channel_axis]
    if kind == "Conv2D" or kind in ELEMENTWISE:
        return True
    return False


# --------------------------------------------------------------------------- rewriting

Rewriter = Callable[["_Rewrite", _Call, HeadStep, list[Any]], Any]


class _Rewrite:
    """State of one rebuild: the plan, the pool mode and the model's layout."""

    def __init__(self, analysis: _Analysis, pool: PoolMode) -> None:
        self.a, self.plan, self.pool = analysis, analysis.plan, pool
        self.data_format = "channels_last" if analysis.layout == "NHWC" else "channels_first"


def _w_global_pool(rw: _Rewrite, call: _Call, step: HeadStep, ins: list[Any]) -> Any:
    if rw.pool == "none":
        return ins[0]
    pool_cls = keras.layers.MaxPooling2D if step.reduce == "max" else keras.layers.AveragePooling2D
    return pool_cls(pool_size=rw.plan.feature.size, strides=1, padding="valid",
                    data_format=rw.data_format, name=call.name)(ins[0])


def _w_flatten(rw: _Rewrite, call: _Call, step: HeadStep, ins: list[Any]) -> Any:
    return ins[0]


def _w_linear(rw: _Rewrite, call: _Call, step: HeadStep, ins: list[Any]) -> Any:
    dense = call.op
    assert step.kernel is not None
    kh, kw = step.kernel
    kernel = np.asarray(keras.ops.convert_to_numpy(dense.kernel))
    channels = kernel.shape[0] // (kh * kw)
    src = rw.a.values[id(call.inputs[0])]
    order = src.flat[3] if src.flat is not None else "HWC"
    activation = getattr(dense.activation, "__name__", "")
    softmax_first = rw.data_format == "channels_first" and activation == "softmax"  # over channels
    conv = keras.layers.Conv2D(dense.units, (kh, kw), data_format=rw.data_format, use_bias=dense.use_bias,
                               activation=None if softmax_first else dense.activation,
                               dtype=dense.dtype_policy, name=call.name)
    out = conv(ins[0])
    if softmax_first:
        out = keras.layers.Softmax(axis=1, name=f"{call.name}_softmax")(out)
    weights = [dense_to_hwio(kernel, channels, kh, kw, order)]  # type: ignore[arg-type]
    if dense.use_bias:
        weights.append(np.asarray(keras.ops.convert_to_numpy(dense.bias)))
    conv.set_weights(weights)
    return out


def _w_channel_layer(rw: _Rewrite, call: _Call, step: HeadStep, ins: list[Any]) -> Any:
    """BatchNormalization / LayerNormalization / Softmax / Concatenate over the channel axis."""
    op = call.op
    if type(op).__name__ == "Activation":  # softmax over the last axis of a vector
        layer = keras.layers.Softmax(axis=rw.a.channel_axis, name=call.name)
        return layer(ins[0])
    config = op.get_config()
    config["axis"] = rw.a.channel_axis
    layer = type(op).from_config(config)
    out = layer(ins if type(op).__name__ == "Concatenate" else ins[0])
    if op.get_weights():
        layer.set_weights(op.get_weights())
    return out


REWRITES: dict[str, Rewriter] = {
    "global_pool": _w_global_pool,
    "flatten": _w_flatten,
    "linear": _w_linear,
    "batchnorm": _w_channel_layer,
    "layernorm": _w_channel_layer,
    "softmax": _w_channel_layer,
    "concat": _w_channel_layer,
}


def rebuild(analysis: _Analysis, pool: PoolMode, name: str) -> keras.Model:
    """A new Keras model: the body on an input of unknown size, the head as convolutions."""
    a, rw = analysis, _Rewrite(analysis, "window" if pool == "global" else pool)
    shape = (None, None, a.in_channels) if a.layout == "NHWC" else (a.in_channels, None, None)
    image = keras.Input(shape, name="image")
    steps = {s.node: s for s in a.plan.steps}
    keep_head = pool == "global" and a.plan.global_pooling  # already runs at any size

    def handle(call: _Call, new: dict[int, Any]) -> list[Any] | None:
        step = steps.get(call.name) if any(call is c for c in a.head) else None
        if step is None or keep_head or step.op == "keep":
            return None
        ins = [new[id(t)] for t in call.inputs]
        return [REWRITES[step.op](rw, call, step, ins)]

    new = a.graph.replay(image, handle)
    out = new[id(a.graph.output)]
    if pool == "global" and not a.plan.global_pooling:  # flatten head: the mean of the window map
        out = keras.layers.GlobalAveragePooling2D(data_format=rw.data_format, name="window_mean")(out)
    return keras.Model(image, out, name=f"{name}_fcn")


# --------------------------------------------------------------------------- entry points


def _run(model: keras.Model, x: np.ndarray) -> np.ndarray:
    # predict_on_batch: inference mode without gradient tracking on every backend (a plain call
    # on the torch backend records autograd: 25% slower, activations kept)
    return np.asarray(model.predict_on_batch(x), dtype=np.float64)


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def _native_error(a: _Analysis, original: keras.Model, fcn: keras.Model, pool: PoolMode) -> float | None:
    shape = ((1, *a.input_size, a.in_channels) if a.layout == "NHWC"
             else (1, a.in_channels, *a.input_size))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected, out = _run(original, x), _run(fcn, x)
    if pool == "global" or out.ndim == 2:
        return _relative_error(out.reshape(expected.shape), expected)
    spatial = out.shape[1:3] if a.layout == "NHWC" else out.shape[2:4]
    if pool == "window" or not a.plan.global_pooling:
        if tuple(spatial) != (1, 1):
            raise NotConvolutionalizable(f"at the native size the map is {tuple(spatial)}, not 1x1; "
                                         "the head's geometry was misread")
        return _relative_error(out.reshape(expected.shape), expected)
    affine = all(s.op in ("global_pool", "flatten", "linear", "batchnorm") or (
        s.op == "keep" and any(k in s.detail for k in NO_OPS)) for s in a.plan.steps)
    if not affine or any(s.reduce == "max" for s in a.plan.steps_of("global_pool")):
        return None
    mean = out.mean(axis=(1, 2) if a.layout == "NHWC" else (2, 3))
    return _relative_error(mean.reshape(expected.shape), expected)


def convolutionalize_keras(model: keras.Model, input_size: object = None,
                           pool: PoolMode = "window") -> keras.Model:
    """Convert a Keras classifier; see :func:`convolutionalize.convolutionalize`.

    Returns a new ``keras.Model`` with input ``(None, None, C)`` (``(C, None, None)`` for
    channels_first) carrying ``geometry``, ``plan`` and ``native_error`` attributes.
    """
    analysis = _Analysis(model, input_size)
    geometry = analysis.geometry(pool)
    fcn = rebuild(analysis, pool, model.name)
    error = _native_error(analysis, model, fcn, geometry.pool)
    if error is not None and error > NATIVE_RTOL:
        raise NotConvolutionalizable(
            f"the rewritten '{model.name}' differs from the original at the native size (max relative "
            f"error {error:.2e}); a head layer has no exact sliding form")
    log.info("converted keras model '%s': %s", model.name, ", ".join(s.op for s in analysis.plan.steps))
    _attach(fcn, geometry, analysis.plan, error)
    return fcn


def _attach(fcn: keras.Model, geometry: Geometry, plan: HeadPlan, error: float | None) -> None:
    """Plain attributes: frozen dataclasses and floats are not tracked by Keras."""
    fcn.geometry = geometry
    fcn.plan = plan
    fcn.native_error = error


def _layout_of(model: keras.Model) -> Layout:
    plan = getattr(model, "plan", None)
    if isinstance(plan, HeadPlan):
        return plan.feature.layout
    fn = _graph_of(model)
    if fn is None:
        return "NHWC"
    calls: list[_Call] = []
    _flatten_graph(fn, list(fn.inputs), {}, calls)
    return _layout(calls)


def predict_nchw(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Run a (converted) Keras model on ``x (N, C, H, W)``; return ``(N, classes, rows, cols)``.

    Channels_last models get ``x`` transposed to NHWC and their map transposed back; a
    ``(N, classes)`` output (``pool="global"``) comes back as ``(N, classes, 1, 1)``.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"predict_nchw takes a (N, C, H, W) array, got shape {x.shape}")
    nhwc = _layout_of(model) == "NHWC"
    out = _run(model, np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if nhwc else x).astype(np.float32)
    if out.ndim == 2:
        return out[:, :, None, None]
    return out.transpose(0, 3, 1, 2) if nhwc else out


def input_channels(model: keras.Model) -> int:
    """The image channels the model's input takes."""
    plan = getattr(model, "plan", None)
    if isinstance(plan, HeadPlan):
        return plan.in_channels
    shape = tuple(model.inputs[0].shape)
    channels = shape[3 if _layout_of(model) == "NHWC" else 1] if len(shape) == 4 else None
    if channels is None:
        raise ValueError(f"model '{model.name}' has input shape {shape}; a 4-D input with a known "
                         "channel count is needed")
    return int(channels)


def activation_shapes(model: keras.Model, size: tuple[int, int]) -> tuple[tuple[int, ...], list[int]]:
    """The output shape (without batch, classes first) for one ``size`` input, and the element
    count of every layer output, symbolically: each layer's ``compute_output_spec`` (nothing
    is computed and the model gains no new nodes)."""
    graph = _Graph(model)
    layout, channels = _layout_of(model), input_channels(model)
    shape = (1, *size, channels) if layout == "NHWC" else (1, channels, *size)

    def spec(call: _Call, new: dict[int, Any]) -> list[Any]:
        args, kwargs = _fill(call, new, graph.canon)
        return keras.tree.flatten(call.op.compute_output_spec(*args, **kwargs))

    new = graph.replay(keras.KerasTensor(shape), spec)
    out = tuple(int(d) for d in new[id(graph.output)].shape[1:])
    counts = [int(np.prod(t.shape)) for t in new.values() if None not in t.shape]
    return (out[2], out[0], out[1]) if len(out) == 3 and layout == "NHWC" else out, counts


def model_digest(model: keras.Model) -> str:
    """A short hash of a model's configuration and weights."""
    digest = hashlib.sha1(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- files


def _plan_from_dict(data: dict[str, Any]) -> HeadPlan:
    feature = data["feature"]
    feature = FeatureMap(feature["node"], feature["channels"], tuple(feature["size"]), feature["layout"])
    steps = tuple(HeadStep(**{**s, "kernel": tuple(s["kernel"]) if s["kernel"] else None,
                              "pool_to": tuple(s["pool_to"]) if s["pool_to"] else None})
                  for s in data["steps"])
    return HeadPlan(data["framework"], tuple(data["input_size"]), data["in_channels"], feature, steps)


def save_keras(fcn: keras.Model, path: str | os.PathLike[str]) -> Path:
    """Write ``fcn`` to a ``.keras`` file atomically (temporary file, then rename).

    A converted model's geometry and plan travel inside the zip (``convolutionalize.json``);
    :func:`load_keras` attaches them again.
    """
    path = Path(path)
    if path.suffix.lower() != ".keras":
        raise ValueError(f"a Keras model is saved as .keras, got {path.name}")
    with atomic_path(path) as tmp:
        fcn.save(tmp)
        geometry, plan = getattr(fcn, "geometry", None), getattr(fcn, "plan", None)
        if isinstance(geometry, Geometry) and isinstance(plan, HeadPlan):
            meta = {"geometry": json.loads(geometry.to_json()), "plan": asdict(plan),
                    "native_error": getattr(fcn, "native_error", None)}
            with zipfile.ZipFile(tmp, "a") as archive:
                archive.writestr(META_FILE, json.dumps(meta))
    return path


def load_keras(path: str | os.PathLike[str]) -> keras.Model:
    """Load a ``.keras`` file; a converted model gets its geometry and plan back.

    Raises ValueError (one line) for a missing, corrupt or non-Keras file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file {path} does not exist")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read {path.name} as a Keras model: {reason}") from None
    if not isinstance(model, keras.Model):
        raise ValueError(f"{path.name} holds a {type(model).__name__}, not a keras.Model")
    try:
        with zipfile.ZipFile(path) as archive:
            meta = json.loads(archive.read(META_FILE)) if META_FILE in archive.namelist() else None
    except (zipfile.BadZipFile, json.JSONDecodeError, KeyError):
        meta = None
    if meta is not None:
        _attach(model, Geometry.from_json(json.dumps(meta["geometry"])), _plan_from_dict(meta["plan"]),
                meta.get("native_error"))
    return model
