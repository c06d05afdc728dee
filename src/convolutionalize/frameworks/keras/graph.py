"""A Keras model as one flat list of operation calls (nested models inlined) that can be
replayed on new tensors, and the facts about Keras operations the other parts share."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import keras

from ...errors import NotConvolutionalizable

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


@dataclass
class Call:
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


def graph_of(op: Any) -> Any | None:
    """The Functional graph inside a (nested) model, or None for a plain layer / op."""
    if isinstance(op, keras.Sequential):
        return getattr(op, "_functional", None)
    if isinstance(op, keras.Model) and hasattr(op, "_nodes_by_depth"):
        return op
    return None


def flatten_graph(fn: Any, inputs: list[Any], canon: dict[int, Any], calls: list[Call]) -> list[Any]:
    """Append ``fn``'s calls (nested models inlined) to ``calls``; return its canonical outputs."""
    for inner, outer in zip(fn.inputs, inputs):
        canon[id(inner)] = outer
    for depth in sorted(fn._nodes_by_depth, reverse=True):
        for node in fn._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            ins = [canon.get(id(t), t) for t in node.input_tensors]
            nested = graph_of(node.operation)
            if nested is None and isinstance(node.operation, keras.Model):  # subclassed: trace it
                from .trace import traced_on

                nested = traced_on(node.operation, *(keras.Input(batch_shape=t.shape) for t in ins))
            if nested is not None:
                if len(nested.inputs) != len(ins):
                    raise NotConvolutionalizable(f"nested model '{node.operation.name}' is called "
                                                 "with a structure it does not take")
                outs = flatten_graph(nested, ins, canon, calls)
                for t, inner in zip(node.outputs, outs):
                    canon[id(t)] = inner
                continue
            calls.append(Call(node.operation, node, ins, list(node.outputs)))
    return [canon.get(id(t), t) for t in fn.outputs]


def fill_arguments(call: Call, new: dict[int, Any], canon: dict[int, Any]) -> tuple[list, dict]:
    """The call's arguments with each symbolic input replaced by its new tensor."""
    table = {id(t): new[id(canon.get(id(t), t))] for t in call.node.input_tensors}
    args, kwargs = call.node.arguments.fill_in(table)
    return list(args), dict(kwargs)


class Graph:
    """A private copy of a Keras model as a flat call list, and its shapes at the native size."""

    def __init__(self, model: keras.Model) -> None:
        fn = graph_of(model)
        if fn is None or not getattr(model, "built", False) or not model.inputs:
            raise ValueError(f"{type(model).__name__} '{model.name}' has no symbolic graph: build a "
                             "functional model, or give the Sequential an Input((H, W, C)) first")
        if len(fn.inputs) != 1:
            raise NotConvolutionalizable(
                f"model '{model.name}' has {len(fn.inputs)} inputs; only a classifier of one image "
                "can slide")
        self.input = fn.inputs[0]
        self.canon: dict[int, Any] = {}
        self.calls: list[Call] = []
        self.outputs = flatten_graph(fn, [self.input], self.canon, self.calls)
        self.structure = getattr(fn, "_outputs_struct", self.outputs)  # a list or dict of heads

    @property
    def output(self) -> Any:
        """The first output (the only one of a single-head classifier)."""
        return self.outputs[0]

    def pack(self, tensors: list[Any]) -> Any:
        """New output tensors (in ``outputs`` order) in the model's own output structure."""
        return keras.tree.pack_sequence_as(self.structure, tensors)

    def replay(self, new_input: Any, handle: Callable[[Call, dict[int, Any]], list[Any] | None]
               ) -> dict[int, Any]:
        """Call every operation again on new tensors; ``handle`` may replace a call's outputs."""
        new: dict[int, Any] = {id(self.input): new_input}
        for call in self.calls:
            if any(id(t) not in new for t in call.inputs):
                continue  # not connected to the image input (a constant branch)
            outs = handle(call, new)
            if outs is None:
                args, kwargs = fill_arguments(call, new, self.canon)
                try:
                    outs = keras.tree.flatten(call.op(*args, **kwargs))
                except Exception as exc:
                    raise NotConvolutionalizable(f"layer '{call.name}' ({call.kind}) fails: "
                                                 f"{reason(exc)}") from exc
            for t, out in zip(call.outputs, outs):
                new[id(t)] = out
        return new


def reason(exc: BaseException) -> str:
    """The informative first line of an exception (Keras wraps the cause in a banner)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.startswith("Exception encountered when calling")]
    return lines[0] if lines else type(exc).__name__


def private_copy(model: keras.Model) -> keras.Model:
    try:
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
    except Exception as exc:  # custom layers without a working get_config, say
        raise NotConvolutionalizable(f"cannot copy model '{model.name}' (the original is never "
                                     f"modified): {str(exc).splitlines()[0] if str(exc) else exc!r}"
                                     ) from exc
    return clone


def axis_of(op: Any) -> Any:
    axis = getattr(op, "axis", -1)
    return axis if axis is not None else -1


def layout_of_calls(calls: list[Call]) -> Layout:
    formats = {getattr(c.op, "data_format", None) for c in calls
               if c.kind in (*SPATIAL_OPS, *GLOBAL_POOLS, "ZeroPadding2D", "Cropping2D")}
    if formats == {"channels_first"}:
        return "NCHW"
    if "channels_first" in formats:
        raise NotConvolutionalizable("the model mixes channels_first and channels_last layers; "
                                     "cannot tell where its spatial axes are")
    return "NHWC"
