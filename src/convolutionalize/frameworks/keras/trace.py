"""Subclassed Keras models as functional graphs: ``call`` run once on a symbolic input.

A subclassed ``keras.Model`` (the ``mtcnn`` package builds its P/R/O-Net stages this way) has
no graph of layer calls to read, only Python code. When that code only calls layers and
``keras.ops`` on its input, running ``model.call`` once on a ``keras.Input`` records every call
as a node, exactly as writing the model functionally would: the result is a functional model
of the same (trained) layers, which the analysis reads like any other. Code that needs a
concrete tensor (``if x.mean() > 0``, a ``tf.*`` or ``torch.*`` function, ``.numpy()``) cannot
run on a symbolic input: that model is refused as a subclassed model whose ``call()`` cannot be
traced, with the first line of what failed.

Tracing adds one node to each layer the model calls (Keras' own bookkeeping for a layer used
in a functional model); weights, configuration and results of the caller's model are unchanged.
"""

from __future__ import annotations

from typing import Any

import keras

from ...errors import ArgumentError, NotConvolutionalizable
from .graph import graph_of, reason

__all__ = ["is_subclassed", "traced", "untraceable"]


def is_subclassed(op: Any) -> bool:
    """A ``keras.Model`` whose layers are called by Python code, not by a graph (an unbuilt
    ``Sequential`` has no graph yet, but is not subclassed: it is asked for its input)."""
    return isinstance(op, keras.Model) and not isinstance(op, keras.Sequential) and graph_of(op) is None


def untraceable(model: Any, why: str) -> NotConvolutionalizable:
    """The refusal for a subclassed model that does not trace (``why``: what failed)."""
    return NotConvolutionalizable(
        f"keras model '{model.name}' is a subclassed model whose call() cannot be traced with a symbolic "
        f"input ({why}); call only layers and keras.ops in call(), or build the same layers as a "
        "functional model: keras.Model(inputs, outputs)")


def traced(model: keras.Model, input_size: object = None) -> keras.Model:
    """A functional model of ``model``'s layers: ``model.call`` on a ``keras.Input`` of the
    shape the model was built with (height and width from ``input_size`` where it was built
    without them)."""
    shape = _built_shape(model, input_size)
    return traced_on(model, keras.Input(shape[1:], name=f"{model.name}_input"))


def traced_on(model: keras.Model, *inputs: Any) -> keras.Model:
    """``model.call`` run on the symbolic ``inputs``, as a functional model named like it."""
    try:
        outputs = model.call(*inputs)
        if not all(isinstance(t, keras.KerasTensor) for t in keras.tree.flatten(outputs)):
            raise TypeError("it returned values computed outside keras")
        return keras.Model(list(inputs) if len(inputs) > 1 else inputs[0], outputs, name=model.name)
    except NotConvolutionalizable:
        raise
    except Exception as exc:
        raise untraceable(model, f"{type(exc).__name__}: {reason(exc)}") from exc


def _built_shape(model: keras.Model, input_size: object) -> tuple[int | None, ...]:
    """The input shape ``model.build`` recorded, with height and width filled from
    ``input_size`` where the model was built without them."""
    shapes = getattr(model, "_build_shapes_dict", None) or {}  # what Layer.build recorded
    shape = next(iter(shapes.values()), None) if len(shapes) == 1 else None
    if shape is None or len(shape) != 4:
        raise ArgumentError(
            f"keras model '{model.name}' is a subclassed model that was not built on one image input: "
            "call it once on a batch, or model.build((None, H, W, C)), before converting it")
    shape = tuple(shape)
    if None in shape[1:] and isinstance(input_size, (tuple, list)) and len(input_size) == 2:
        channels_last = shape[3] is not None
        hw = tuple(int(v) for v in input_size)
        shape = (shape[0], *hw, shape[3]) if channels_last else (shape[0], shape[1], *hw)
    return shape
