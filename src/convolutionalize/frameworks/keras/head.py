"""Kinds, shapes and the HeadPlan of a Keras model: where the body ends and what each head call
becomes.

The head is everything between the one feature map and the outputs (a model with several
outputs, MTCNN's face/box/landmark heads, has one head per output, all reading that map). A
``Permute`` of the map (MTCNN's ``Permute((3, 2, 1))`` before its ``Flatten``) keeps it a map
whose axis order is recorded (``Value.order``, then ``FeatureMap.layout``): the Dense kernel
is read in that flatten order and the rewrite permutes the map back to the model's layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import keras

from ...errors import ArgumentError, NotConvolutionalizable
from ...geometry import Geometry, PoolMode, geometry_from_plan
from ...plan import FeatureMap, HeadPlan, HeadStep
from .geometry import body_geometry
from .graph import (
    ELEMENTWISE,
    GLOBAL_POOLS,
    NO_OPS,
    Call,
    Graph,
    Kind,
    axis_of,
    layout_of_calls,
    private_copy,
    reason,
)


@dataclass(frozen=True)
class Value:
    """The kind of one tensor; ``order`` names a map's axes when a ``Permute`` moved them
    (``"NCWH"`` after ``Permute((3, 2, 1))`` of an NHWC map; None: the model's layout)."""

    kind: Kind
    reduce: Literal["avg", "max"] | None = None
    flat: tuple[int, int, int, str] | None = None  # (C, H, W, order) of a flattened map
    order: str | None = None


class Analysis:
    """Kinds, shapes and the HeadPlan of a private copy of a Keras model."""

    def __init__(self, model: keras.Model, input_size: object) -> None:
        self.model = private_copy(model)  # runs as "the original" in the self-check
        self.graph = Graph(self.model)
        self.layout = layout_of_calls(self.graph.calls)
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
                f"{self.input_size[0]}x{self.input_size[1]}: {reason(exc)}") from exc
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
            raise ArgumentError(f"input_size must be two positive ints (height, width), got {input_size!r}")
        if None not in static:
            if given is not None and tuple(given) != static:
                raise ArgumentError(f"input_size {tuple(given)} differs from the static input size "
                                 f"{static} of model '{model.name}'; pass input_size=None")
            return (int(static[0]), int(static[1])), int(c)
        if given is None:
            raise ArgumentError(f"input_size is required for model '{model.name}': its input has no static "
                             "height and width; pass the native (training) size, e.g. input_size=(224, 224)")
        return (int(given[0]), int(given[1])), int(c)

    # ---- kinds

    def _kinds(self) -> dict[int, Value]:
        values = {id(self.graph.input): Value("map")}
        for call in self.graph.calls:
            if any(id(t) not in values for t in call.inputs):
                continue
            value = self._value(call, [values[id(t)] for t in call.inputs])
            for t in call.outputs:
                values[id(t)] = value
        return values

    def _value(self, call: Call, ins: list[Value]) -> Value:
        out = self.shapes[id(call.outputs[0])]
        kinds = {v.kind for v in ins}
        if "seq" in kinds:
            return Value("seq")
        if "map" in kinds:
            maps = [v for v in ins if v.kind == "map"]
            orders = {self.order(v) for v in maps}
            if len(orders) > 1:
                return Value("seq")  # maps in different axis orders: no common spatial axes
            if len(ins) > 1:
                per_element = maps[0].order is None or not _channel_op(call.op)
                return Value("map", order=maps[0].order) if len(out) == 4 and per_element else (
                    Value("seq"))
            return self._from_map(call, ins[0], out)
        in_shape = self.shapes[id(call.inputs[0])]
        src = ins[0]
        if src.kind == "flat":
            if call.kind == "Dense":
                return Value("vector")
            return src if out == in_shape else Value("seq")
        if len(out) == 2:
            return Value("vector")
        if len(out) == 4 and (out[self.axes[0]], out[self.axes[1]]) == (1, 1):
            return Value("pooled")
        return Value("seq")

    def order(self, value: Value) -> str:
        """The axis order of a map tensor: the model's layout unless a ``Permute`` moved it."""
        return value.order or self.layout

    def _from_map(self, call: Call, src: Value, out: tuple[int, ...]) -> Value:
        """The value of a call whose one input is a map (in the model's layout or permuted)."""
        in_shape, order, kind = self.shapes[id(call.inputs[0])], self.order(src), call.kind
        if kind in ("Flatten", "Reshape") and len(out) == 2:
            c, h, w = (in_shape[order.index(a)] for a in "CHW")
            transposes = kind == "Flatten" and getattr(call.op, "_channels_first", False)
            flat = order[2:] + order[1] if transposes else order[1:]  # Keras moves axis 1 last
            return Value("flat", flat=(c, h, w, flat))
        if kind == "Permute" and len(out) == 4:
            permuted = "N" + "".join(order[d] for d in call.op.dims)
            return Value("map", order=None if permuted == self.layout else permuted)
        if kind == "PReLU" and _per_pixel(call.op, order):
            raise NotConvolutionalizable(
                f"layer '{call.name}' (PReLU) has a slope per pixel of the "
                f"{in_shape[order.index('H')]}x{in_shape[order.index('W')]} map, which cannot slide; "
                "rebuild it with shared_axes over height and width (e.g. shared_axes=[1, 2])")
        if src.order is not None:  # a permuted map: only per-element layers keep its meaning
            per_element = kind in ELEMENTWISE and not _channel_op(call.op)
            return Value("map", order=src.order) if per_element and len(out) == 4 else Value("seq")
        if kind in GLOBAL_POOLS:
            return Value("pooled" if len(out) == 4 else "vector", reduce=GLOBAL_POOLS[kind])
        return Value("map") if len(out) == 4 and kind not in ("Reshape", "Permute") else Value("seq")

    def _head(self) -> tuple[list[Call], Any]:
        """The head's calls (graph order) from every output back to the one map they read."""
        producer = {id(t): c for c in self.graph.calls for t in c.outputs}
        for out in self.graph.outputs:
            value = self.values.get(id(out))
            if value is None:
                raise NotConvolutionalizable("the model's output does not depend on its input image")
            if value.kind == "map":
                name = producer[id(out)].name if id(out) in producer else "the input"
                if all(self.values.get(id(o), value).kind == "map" for o in self.graph.outputs):
                    raise NotConvolutionalizable(f"the output of '{name}' is already a spatial map: the "
                                                 "model is fully convolutional, there is no head")
                raise NotConvolutionalizable(
                    f"the output of '{name}' is a feature map of the body, returned beside the "
                    "classifier's scores; only models whose every output is a classifier head "
                    "convert (convert a model that returns the scores alone)")
        head: set[int] = set()
        features: dict[int, Any] = {}
        stack = list(self.graph.outputs)
        while stack:
            t = stack.pop()
            v = self.values[id(t)]
            if v.kind == "map" or id(t) == id(self.graph.input):
                features[id(t)] = t
                continue
            call = producer[id(t)]
            if v.kind == "seq":
                first = next(c for c in self.graph.calls
                             if self.values.get(id(c.outputs[0]), Value("map")).kind == "seq")
                raise NotConvolutionalizable(
                    f"layer '{first.name}' ({first.kind}) turns the spatial map into tokens or windows, "
                    "so the classifier cannot slide as convolutions; evaluate it crop by crop")
            if id(call) not in head:
                head.add(id(call))
                stack.extend(call.inputs)
        if len(features) != 1:
            names = ", ".join(f"'{producer[k].name}'" for k in features if k in producer)
            raise NotConvolutionalizable(f"the head reads several feature maps ({names}); "
                                         "only a head over one map can slide")
        return [c for c in self.graph.calls if id(c) in head], next(iter(features.values()))

    # ---- plan

    def _plan(self) -> HeadPlan:
        shape = self.shapes[id(self.feature)]
        producer = {id(t): c.name for c in self.graph.calls for t in c.outputs}
        name = producer.get(id(self.feature), self.graph.input._keras_history[0].name)
        order = self.order(self.values[id(self.feature)])
        c, h, w = (int(shape[order.index(a)]) for a in "CHW")
        fmap = FeatureMap(name, c, (h, w), order)
        steps = tuple(self._step(call, fmap) for call in self.head)
        outputs = tuple(producer[id(t)] for t in self.graph.outputs)
        return HeadPlan("keras", self.input_size, self.in_channels, fmap, steps, outputs=outputs)

    def _step(self, call: Call, fmap: FeatureMap) -> HeadStep:
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
            if kind in NO_OPS or (kind in ELEMENTWISE and not _channel_op(op) and kind != "PReLU"):
                return HeadStep(name, "keep", f"{kind} (elementwise)")
            raise NotConvolutionalizable(f"{where} acts on the flattened map before any Dense; "
                                         "it has no sliding equivalent")
        vector = src.kind == "vector"
        axis = axis_of(op)
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
        if kind == "PReLU" and vector:
            return HeadStep(name, "keep", "PReLU per feature -> per channel (slopes shared over the map)")
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
        body = body_geometry(self)
        return geometry_from_plan(self.plan, pool, body)


def _softmax(op: Any) -> bool:
    if type(op).__name__ == "Softmax":
        return True
    fn = getattr(op, "activation", None)
    return type(op).__name__ == "Activation" and getattr(fn, "__name__", "") == "softmax"


def _per_pixel(op: Any, order: str) -> bool:
    """A PReLU built with one slope per spatial position (no ``shared_axes`` over H and W)."""
    alpha = getattr(op, "alpha", None)
    shape = tuple(alpha.shape) if alpha is not None else ()
    if len(shape) != 3:
        return False
    return any(shape[order.index(a) - 1] != 1 for a in "HW")


def _channel_op(op: Any) -> bool:
    """Elementwise-looking layers that actually mix channels (softmax, concat)."""
    return _softmax(op) or type(op).__name__ == "Concatenate" or (
        type(op).__name__ == "Activation" and getattr(op.activation, "__name__", "") == "log_softmax")
