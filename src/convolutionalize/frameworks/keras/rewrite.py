"""Rebuild a Keras model with its head as convolutions: one function per HeadStep kind, built
from Keras layers only (so the result runs on any backend)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from ...errors import NotConvolutionalizable
from ...geometry import PoolMode
from ...plan import HeadStep
from ...weights import dense_to_hwio
from .atrous import Atrous, WindowCells, dilated_pool
from .geometry import same_pads
from .graph import Call
from .head import Analysis

Rewriter = Callable[["_Rewrite", Call, HeadStep, list[Any]], Any]


class _Rewrite:
    """State of one rebuild: the plan, the pool mode and the model's layout."""

    def __init__(self, analysis: Analysis, pool: PoolMode, dilation: tuple[int, int] = (1, 1)) -> None:
        self.a, self.plan, self.pool = analysis, analysis.plan, pool
        self.dilation = dilation  # the head's window pool and first HxW kernel (output_stride)
        self.data_format = "channels_last" if analysis.layout == "NHWC" else "channels_first"


def _w_global_pool(rw: _Rewrite, call: Call, step: HeadStep, ins: list[Any]) -> Any:
    if rw.pool == "none":
        return ins[0]
    if rw.dilation != (1, 1):
        return dilated_pool(ins[0], step.reduce or "avg", rw.plan.feature.size, rw.dilation, rw.a.layout,
                            rw.plan.feature.channels, call.name)
    pool_cls = keras.layers.MaxPooling2D if step.reduce == "max" else keras.layers.AveragePooling2D
    return pool_cls(pool_size=rw.plan.feature.size, strides=1, padding="valid",
                    data_format=rw.data_format, name=call.name)(ins[0])


def _w_flatten(rw: _Rewrite, call: Call, step: HeadStep, ins: list[Any]) -> Any:
    """The flatten goes; a map that a ``Permute`` put in another axis order is permuted back to
    the model's layout in its place (the Dense kernel is reordered to match), so the map's
    rows follow the image's height."""
    order = rw.plan.feature.layout
    if rw.a.values[id(call.inputs[0])].kind != "map" or order == rw.a.layout:
        return ins[0]
    dims = tuple(order.index(axis) for axis in rw.a.layout[1:])  # 1-based, as Permute counts
    return keras.layers.Permute(dims, name=f"{call.name}_to_{rw.a.layout.lower()}")(ins[0])


def _w_linear(rw: _Rewrite, call: Call, step: HeadStep, ins: list[Any]) -> Any:
    dense = call.op
    assert step.kernel is not None
    kh, kw = step.kernel
    kernel = np.asarray(keras.ops.convert_to_numpy(dense.kernel))
    channels = kernel.shape[0] // (kh * kw)
    src = rw.a.values[id(call.inputs[0])]
    order = src.flat[3] if src.flat is not None else "HWC"
    activation = getattr(dense.activation, "__name__", "")
    softmax_first = rw.data_format == "channels_first" and activation == "softmax"  # over channels
    dilation = rw.dilation if kh * kw > 1 else (1, 1)
    conv = keras.layers.Conv2D(dense.units, (kh, kw), data_format=rw.data_format, use_bias=dense.use_bias,
                               dilation_rate=dilation,
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


def _w_channel_layer(rw: _Rewrite, call: Call, step: HeadStep, ins: list[Any]) -> Any:
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


def _w_prelu(rw: _Rewrite, call: Call, step: HeadStep, ins: list[Any]) -> Any:
    """A PReLU on feature vectors (one slope per feature): the same slopes per channel, shared
    over the map (its input spec fixes the rank, so the layer is rebuilt)."""
    op = call.op
    alpha = np.asarray(keras.ops.convert_to_numpy(op.alpha))
    nhwc = rw.data_format == "channels_last"
    layer = keras.layers.PReLU(shared_axes=[1, 2] if nhwc else [2, 3], dtype=op.dtype_policy,
                               name=call.name)
    out = layer(ins[0])
    layer.set_weights([alpha.reshape((1, 1, -1) if nhwc else (-1, 1, 1))])
    return out


KEEP_REWRITES: dict[str, Rewriter] = {  # "keep" steps whose layer must be rebuilt for a 4-D input
    "PReLU": _w_prelu,
}

REWRITES: dict[str, Rewriter] = {
    "global_pool": _w_global_pool,
    "flatten": _w_flatten,
    "linear": _w_linear,
    "batchnorm": _w_channel_layer,
    "layernorm": _w_channel_layer,
    "softmax": _w_channel_layer,
    "concat": _w_channel_layer,
}


SAME_STRIDED = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling2D")


def _native_same(a: Analysis, call: Call, x: Any) -> Any | None:
    """A strided ``padding="same"`` convolution or max pool as its native padding then
    ``"valid"``: "same" pads by how the input's size falls on the stride, so on images of other
    sizes every cell would move and tiles would disagree. None for other calls."""
    op = call.op
    if call.kind not in SAME_STRIDED or op.padding != "same" or tuple(op.strides) == (1, 1):
        return None
    pads = same_pads(a, call)
    data_format = "channels_last" if a.layout == "NHWC" else "channels_first"
    pad_name = f"{call.name}_native_pad"
    if call.kind == "MaxPooling2D":
        out = _max_pool_at_pads(op, pads, data_format, call.name, x)
        if out is not None:
            return out
        padded = ConstantPadding2D(pads, float("-inf"), data_format, name=pad_name)(x)
    else:
        padded = keras.layers.ZeroPadding2D(pads, data_format=data_format, name=pad_name)(x)
    config = {**op.get_config(), "padding": "valid", "name": f"{call.name}_valid"}
    layer = type(op).from_config(config)
    out = layer(padded)
    layer.set_weights(op.get_weights())
    return out


def _max_pool_at_pads(op: Any, pads: tuple[tuple[int, int], ...], data_format: str, name: str,
                      x: Any) -> Any | None:
    """A ``k``x``k`` max pool at stride ``s`` over ``x`` padded by the fixed ``pads`` with
    ``-inf``, from standard Keras layers only (a saved model then loads in a process that never
    imported us): a stride-1 ``padding="same"`` max pool, whose padding (``(k - 1) // 2``
    before, the rest after) does not depend on the input's size and is ignored by the max on
    every backend (``-inf``, or edge copies that the window holds anyway); then a crop and a
    stride-``s`` pick of every cell. Per axis, stride-1 cell ``i = o * s - before + (k - 1) // 2``
    is the window of output ``o``: crop ``(k - 1) // 2 - before`` cells in front and
    ``k - 1 - (k - 1) // 2 - after`` behind, so that the count is ``(size + before + after - k)
    // s + 1`` at any size. None where a pad exceeds the stride-1 one (never for "same" pads).

        # before: padded = ConstantPadding2D(pads, -inf)(x); MaxPooling2D(k, s, "valid")(padded)
        # after:  MaxPooling2D(k, 1, "same") -> Cropping2D(crops) -> MaxPooling2D(1, s, "valid")
    """
    kernel, strides = tuple(op.pool_size), tuple(op.strides)
    crops = tuple(((k - 1) // 2 - before, k - 1 - (k - 1) // 2 - after)
                  for k, (before, after) in zip(kernel, pads))
    if any(c < 0 for pair in crops for c in pair):
        return None
    common = {"data_format": data_format, "dtype": op.dtype_policy}
    y = keras.layers.MaxPooling2D(kernel, strides=1, padding="same", name=f"{name}_stride1", **common)(x)
    if any(c for pair in crops for c in pair):
        y = keras.layers.Cropping2D(crops, name=f"{name}_native_crop", **common)(y)
    return keras.layers.MaxPooling2D(1, strides=strides, padding="valid", name=f"{name}_valid", **common)(y)


@keras.saving.register_keras_serializable(package="convolutionalize")
class ConstantPadding2D(keras.layers.Layer):
    """``ZeroPadding2D`` with another value (``-inf`` before a max pool). Conversions build it
    only where :func:`_max_pool_at_pads` cannot; kept so that models saved with it still load
    (in a process that imported :mod:`convolutionalize`)."""

    def __init__(self, padding: Any, value: float, data_format: str = "channels_last", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.padding = tuple(tuple(int(v) for v in pair) for pair in padding)
        self.value, self.data_format = float(value), data_format

    def call(self, x: Any) -> Any:
        spatial = [list(self.padding[0]), list(self.padding[1])]
        last = self.data_format == "channels_last"
        widths = [[0, 0], *spatial, [0, 0]] if last else [[0, 0], [0, 0], *spatial]
        return keras.ops.pad(x, widths, constant_values=self.value)

    def compute_output_shape(self, shape: Any) -> Any:
        out = list(shape)
        axes = (1, 2) if self.data_format == "channels_last" else (2, 3)
        for ax, (before, after) in zip(axes, self.padding):
            out[ax] = None if out[ax] is None else out[ax] + before + after
        return tuple(out)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "padding": [list(p) for p in self.padding], "value": self.value,
                "data_format": self.data_format}


def rebuild(analysis: Analysis, pool: PoolMode, name: str, atrous: Atrous | None = None,
            window: tuple[int, int] | None = None) -> keras.Model:
    """A new Keras model: the body on an input of unknown size, the head as convolutions; one
    map per original output, in the original's output structure (a list, a dict). With
    ``atrous`` the body runs at a denser output stride (window maps cut to ``window``)."""
    a = analysis
    dilation = atrous.head_dilation if atrous else (1, 1)
    rw = _Rewrite(analysis, "window" if pool == "global" else pool, dilation)
    shape = (None, None, a.in_channels) if a.layout == "NHWC" else (a.in_channels, None, None)
    image = keras.Input(shape, name="image")
    steps = {s.node: s for s in a.plan.steps}
    keep_head = pool == "global" and a.plan.global_pooling  # already runs at any size

    def handle(call: Call, new: dict[int, Any]) -> list[Any] | None:
        in_head = any(call is c for c in a.head)
        if atrous is not None and not in_head:
            out = atrous.rebuild(a, call, [new[id(t)] for t in call.inputs])
            return None if out is None else [out]
        if not in_head and (out := _native_same(a, call, new[id(call.inputs[0])])) is not None:
            return [out]
        step = steps.get(call.name) if in_head else None
        if step is None or keep_head:
            return None
        rewrite = REWRITES.get(step.op)
        if step.op == "keep":
            vector = a.values[id(call.inputs[0])].kind == "vector"
            rewrite = KEEP_REWRITES.get(call.kind) if vector else None
        if rewrite is None:
            return None
        return [rewrite(rw, call, step, [new[id(t)] for t in call.inputs])]

    for call in a.graph.calls:
        if (call.kind == "AveragePooling2D" and call.op.padding == "same" and tuple(call.op.strides) != (1, 1)
                and atrous is None):
            raise NotConvolutionalizable(
                f"layer '{call.name}' (AveragePooling2D, padding='same', strides {tuple(call.op.strides)}) "
                "pads by how its input's size falls on its stride, so the map's cells would move with "
                "the image's size; use ZeroPadding2D and padding='valid' (its padding is not fixed here)")
    try:
        new = a.graph.replay(image, handle)
    except NotConvolutionalizable as exc:
        raise NotConvolutionalizable(f"model '{name}' does not run on an image of unknown size, so it "
                                     f"cannot slide: {exc}") from exc
    outs = [new[id(t)] for t in a.graph.outputs]
    if atrous is not None and pool == "window" and window is not None:
        outs = [WindowCells(window, atrous.stride, a.layout == "NHWC",
                            name="window_cells" + (f"_{k}" if k else ""))(out, image)
                if len(out.shape) == 4 else out for k, out in enumerate(outs)]
    if pool == "global" and not a.plan.global_pooling:  # flatten head: the mean of the window map
        outs = [keras.layers.GlobalAveragePooling2D(
            data_format=rw.data_format, name="window_mean" + (f"_{k}" if k else ""))(out)
            for k, out in enumerate(outs)]
    return keras.Model(image, a.graph.pack(outs), name=f"{name}_fcn")
