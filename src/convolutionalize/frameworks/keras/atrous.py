"""Output strides below the network's for Keras models: the à trous rewrite with
``dilation_rate`` (see the PyTorch adapter's :mod:`convolutionalize.frameworks.torch.atrous`
for the math).

The strided layers whose input already has a cell spacing of ``s`` or more are rebuilt at
``strides=1``; every later convolution gets its ``dilation_rate`` multiplied by ``input
spacing / s`` (Keras convolutions cannot be strided and dilated at once, and here they never
need to be), ``ZeroPadding2D``/``Cropping2D`` their amounts. Keras pools have no dilation: a
dilated max pool is the ``Maximum`` of shifted ``Cropping2D`` views, a dilated average pool a
``DepthwiseConv2D`` with constant taps ``1/k``. Trailing cells whose window passes the
image's far edge are cut by :class:`WindowCells`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from ...errors import NotConvolutionalizable
from ...geometry import possible_output_strides
from .geometry import window_of
from .graph import GLOBAL_OPS, Call

if TYPE_CHECKING:
    from .head import Analysis

__all__ = ["Atrous", "WindowCells", "dilated_pool", "plan_atrous"]

Pair = tuple[int, int]
CONVS = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D")
POOLS = ("MaxPooling2D", "AveragePooling2D")


@dataclass(frozen=True)
class Atrous:
    """What changes for one output stride: per body call id, (stride to 1?, dilation factor)."""

    stride: Pair
    head_dilation: Pair
    calls: dict[int, tuple[bool, Pair]]

    def rebuild(self, a: Analysis, call: Call, ins: list[Any]) -> Any | None:
        """The call's new output, or None when it replays unchanged."""
        if id(call) not in self.calls:
            return None
        unstride, factor = self.calls[id(call)]
        op, kind = call.op, call.kind
        config = op.get_config()
        config["name"] = f"{call.name}_atrous"
        if kind in ("ZeroPadding2D", "Cropping2D"):
            key = "padding" if kind == "ZeroPadding2D" else "cropping"
            config[key] = tuple(tuple(int(v) * f for v in pair) for pair, f in zip(config[key], factor))
            return type(op).from_config(config)(ins[0])
        if kind in CONVS:
            if unstride:
                config["strides"] = (1, 1)
            config["dilation_rate"] = tuple(int(d) * f for d, f in zip(config["dilation_rate"], factor))
            layer = type(op).from_config(config)
            out = layer(ins[0])
            layer.set_weights(op.get_weights())
            return out
        if factor == (1, 1):  # an unstrided pool
            config["strides"] = (1, 1)
            return type(op).from_config(config)(ins[0])
        channels = a.shapes[id(call.inputs[0])][a.channel_axis]
        return dilated_pool(ins[0], "max" if kind == "MaxPooling2D" else "avg", tuple(op.pool_size),
                            factor, a.layout, channels, call.name)


def dilated_pool(x: Any, reduce: str, kernel: tuple[int, ...], dilation: Pair, layout: str,
                 channels: int, name: str) -> Any:
    """A valid stride-1 pool with its taps ``dilation`` apart, from Keras layers only."""
    data_format = "channels_last" if layout == "NHWC" else "channels_first"
    kh, kw = int(kernel[0]), int(kernel[1])
    if reduce != "max":
        layer = keras.layers.DepthwiseConv2D((kh, kw), dilation_rate=dilation, use_bias=False,
                                             data_format=data_format, name=f"{name}_dilated_mean")
        out = layer(x)
        layer.set_weights([np.full((kh, kw, channels, 1), 1.0 / (kh * kw), np.float32)])
        return out
    if kh * kw == 1:
        return x
    views = [keras.layers.Cropping2D(((a * dilation[0], (kh - 1 - a) * dilation[0]),
                                      (b * dilation[1], (kw - 1 - b) * dilation[1])),
                                     data_format=data_format, name=f"{name}_tap_{a}_{b}")(x)
             for a in range(kh) for b in range(kw)]
    return keras.layers.Maximum(name=f"{name}_dilated_max")(views)


def plan_atrous(a: Analysis, spans: dict[int, tuple[Any, Any]], output_stride: int,
                network: Pair, global_context: list[str], unproven: list[str]) -> Atrous:
    """The à trous rewrite for ``output_stride``, or a refusal naming what prevents it."""
    plan = a.plan
    if plan.adaptive_pool is not None and plan.adaptive_pool.pool_to != plan.feature.size:
        raise NotConvolutionalizable("output_stride: the head's adaptive pool becomes a strided fixed "
                                     "pool; only the network stride is possible")
    head = {id(c) for c in a.head}
    inputs = {}
    for call in a.graph.calls:
        if id(call) in head or not call.inputs or id(call.inputs[0]) not in spans:
            continue
        if not any(id(t) in spans for t in call.outputs):
            continue
        inputs[id(call)] = (call, spans[id(call.inputs[0])])
    strided = {key: (ys.jump, xs.jump) for key, (call, (ys, xs)) in inputs.items()
               if call.kind in (*CONVS, *POOLS) and _stride(call) != (1, 1)}
    possible = possible_output_strides(network, strided.values(), output_stride)
    s = output_stride
    blocked = {*global_context, *unproven}
    calls: dict[int, tuple[bool, Pair]] = {}
    for key, (call, (ys, xs)) in inputs.items():
        factor = (max(ys.jump // s, 1), max(xs.jump // s, 1))
        unstride = key in strided and ys.jump >= s
        if factor == (1, 1) and not unstride:
            continue
        jump = max(ys.jump, xs.jump)  # at s == jump a layer keeps its taps but loses its stride
        allowed = ", ".join(map(str, (p for p in possible if p > jump or (p == jump and not unstride))))
        if call.name in blocked or call.kind in GLOBAL_OPS:
            raise NotConvolutionalizable(
                f"output_stride={s}: layer '{call.name}' ({call.kind}) sees the whole map or is not "
                f"proven local, so it would compute something else on a denser map; possible output "
                f"strides: {allowed}")
        if call.kind in (*CONVS, *POOLS):
            _check_padding(call, unstride, factor, s, allowed)
            calls[key] = (unstride, factor)
        elif call.kind in ("ZeroPadding2D", "Cropping2D"):
            calls[key] = (False, factor)
    return Atrous((s, s), (network[0] // s, network[1] // s), calls)


def _stride(call: Call) -> Pair:
    stride = window_of(call)[1]
    return (int(stride[0]), int(stride[1]))


def _check_padding(call: Call, unstride: bool, factor: Pair, s: int, allowed: str) -> None:
    op = call.op
    if op.padding != "same":
        return
    kernel = window_of(call)[0]
    if all(k == 1 for k in kernel):
        return
    if unstride or "Pooling" in call.kind or any(k % 2 == 0 for k in kernel):
        raise NotConvolutionalizable(
            f"output_stride={s}: layer '{call.name}' ({call.kind}) has padding='same' that changes "
            f"with its stride or dilation (use ZeroPadding2D and 'valid'); possible output strides: "
            f"{allowed}")


@keras.saving.register_keras_serializable(package="convolutionalize")
class WindowCells(keras.layers.Layer):
    """Keeps the cells whose native-size window lies inside the image (``(scores, image)``)."""

    def __init__(self, window: Pair, stride: Pair, channels_last: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.window, self.stride, self.channels_last = tuple(window), tuple(stride), channels_last

    def call(self, scores: Any, image: Any) -> Any:
        shape = keras.ops.shape(image)
        h, w = (shape[1], shape[2]) if self.channels_last else (shape[2], shape[3])
        rows = (h - self.window[0]) // self.stride[0] + 1
        cols = (w - self.window[1]) // self.stride[1] + 1
        return scores[:, :rows, :cols, :] if self.channels_last else scores[:, :, :rows, :cols]

    def compute_output_shape(self, scores_shape: Any, image_shape: Any) -> Any:
        h, w = (image_shape[1], image_shape[2]) if self.channels_last else (image_shape[2], image_shape[3])
        rows = None if h is None else (h - self.window[0]) // self.stride[0] + 1
        cols = None if w is None else (w - self.window[1]) // self.stride[1] + 1
        if self.channels_last:
            return (scores_shape[0], rows, cols, scores_shape[3])
        return (scores_shape[0], scores_shape[1], rows, cols)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "window": list(self.window), "stride": list(self.stride),
                "channels_last": self.channels_last}
