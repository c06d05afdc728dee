"""Analysis of a traced PyTorch classifier: where the spatial map ends and what the head does.

Every tensor node gets a *kind*:

- ``map``: a spatial feature map (the body), with the positions of its two spatial axes;
- ``pooled``: a map whose spatial extent a global pool reduced to 1x1 (kept 4-D);
- ``vector``: a feature vector ``(N, D)`` (after global pooling and a flatten);
- ``flat``: a flattened ``C x H x W`` map ``(N, C*H*W)``, waiting for its first Linear;
- ``context``: a summary of the whole map that is not a feature vector (a squeeze-excitation
  gate viewed back to ``(N, C, 1, 1)``, a global-context block's attention-weighted sum): its
  shape does not change with the input size. Merged back into a map it is global context;
- ``merged``: a map whose two spatial axes were flattened into its last one
  (``x.flatten(2)``, ``x.view(b, c, -1)``), waiting for the mean that makes it a global pool;
- ``half``: a map averaged (or max-reduced) over one spatial axis, ``x.mean(3)``, waiting
  for the same reduction over the other that makes it a global pool (``x.mean(3).mean(2)``);
  anything else on it is a summary (``context``), as in a coordinate-attention block;
- ``seq``: anything else derived from a map (tokens, windows): cannot slide.

The head is everything between the last map and the outputs: nodes of kind pooled,
vector or flat from which an output is reached without passing through a map again
(a squeeze-excitation pool feeds back into a map, so it stays in the body). A model with
several outputs (a tuple, dict or dataclass of class scores, box regression, ...) has one
head per output, all reading the same feature map. Each head node then gets a
:class:`~convolutionalize.plan.HeadStep`, or the model is refused with the node's name.

Whether a tensor is a summary (``context``) or tokens (``seq``) is told by its shape at a
second input size: only tensors whose shape does not change are summaries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import fx, nn

from ...errors import NotConvolutionalizable
from ...plan import FeatureMap, HeadPlan, HeadStep
from .graph import (
    ELEMENTWISE,
    ELEMENTWISE_MODULES,
    arg,
    input_nodes,
    is_spatial_size_of,
    normalize_dims,
    op_name,
    shape_of,
    tensor_inputs,
)
from .pt2e import dequantized_weight
from .quantized import QUANTIZED_CONVS, is_quantized_linear, quantized_linear_refusal

__all__ = ["Value", "find_head", "permutation", "propagate_kinds"]

Kind = Literal["map", "pooled", "vector", "flat", "merged", "half", "context", "seq"]
FLATTENS = frozenset({"flatten", "view", "reshape", "squeeze", "Flatten"})
RESHAPES = FLATTENS | {"unsqueeze", "getitem", "expand", "unflatten", "_unsafe_view"}
REDUCTIONS = frozenset({"sum", "mean", "amax", "amin", "max", "min", "prod", "std", "var",
                        "logsumexp", "norm", "linalg_vector_norm"})
SHAPE_QUERIES = frozenset({"size", "getattr", "dim", "sym_size"})  # x.size(0) feeding x.view(x.size(0), -1)
GLOBAL_REDUCERS = {"mean": "avg", "amax": "max"}


@dataclass(frozen=True)
class Value:
    """What a tensor node holds, as far as the conversion cares."""

    kind: Kind
    axes: tuple[int, int] | None = None  # spatial axes of a map / pooled tensor
    reduce: Literal["avg", "max"] | None = None  # set on a global-pool node's value
    pool_to: tuple[int, int] | None = None  # set on an adaptive pool to k x k (k > 1)
    flat: tuple[int, int, int] | None = None  # (C, H, W) of a flattened map
    flat_layout: str = "CHW"  # the order of C, H and W in the flattened vector


def layout_of(axes: tuple[int, int], rank: int) -> str | None:
    """The letters of a 4-D map's axes (``"NCHW"``, ``"NHWC"``, ``"NWHC"``, ...)."""
    if rank != 4:
        return None
    letters = ["N", "C", "C", "C"]
    letters[axes[0]], letters[axes[1]] = "H", "W"
    return "".join(letters)


def _pool_of(node: fx.Node, name: str, src: Value, in_shape: tuple[int, ...],
             out_shape: tuple[int, ...], modules: dict[str, nn.Module]) -> Value | None:
    """The value of ``node`` if it pools a map globally (or adaptively before a flatten)."""
    assert src.axes is not None
    ay, ax = src.axes
    spatial_in = (in_shape[ay], in_shape[ax])
    if name in GLOBAL_REDUCERS or (name == "max" and len(node.args) + len(node.kwargs) > 1):
        dims = normalize_dims(arg(node, 1, "dim"), len(in_shape))
        if dims != tuple(sorted((ay, ax))):
            return None
        reduce = GLOBAL_REDUCERS.get(name, "max")
        if arg(node, 2, "keepdim", False):
            return Value("pooled", src.axes, reduce=reduce)
        return Value("vector", reduce=reduce)  # type: ignore[arg-type]
    adaptive = {"AdaptiveAvgPool2d": "avg", "adaptive_avg_pool2d": "avg",
                "AdaptiveMaxPool2d": "max", "adaptive_max_pool2d": "max"}
    windowed = {"AvgPool2d": "avg", "avg_pool2d": "avg", "MaxPool2d": "max", "max_pool2d": "max"}
    if len(out_shape) != 4 or src.axes != (2, 3):
        return None
    spatial_out = (out_shape[2], out_shape[3])
    if name in adaptive:
        reduce = adaptive[name]
        if spatial_out == (1, 1):
            return Value("pooled", (2, 3), reduce=reduce)  # type: ignore[arg-type]
        return Value("map", (2, 3), reduce=reduce, pool_to=spatial_out)  # type: ignore[arg-type]
    if name in windowed and spatial_out == (1, 1):
        # e.g. the classic AvgPool2d(7) over a 7x7 map: a global pool at the native size
        kernel = _pair(getattr(modules.get(str(node.target)), "kernel_size", None)
                       if node.op == "call_module" else arg(node, 1, "kernel_size"))
        padding = _pair(getattr(modules.get(str(node.target)), "padding", 0)
                        if node.op == "call_module" else arg(node, 3, "padding", 0))
        flattened = all(op_name(u, modules) in FLATTENS | SHAPE_QUERIES for u in node.users)
        covers = (kernel is not None and kernel[0] >= spatial_in[0] and kernel[1] >= spatial_in[1]) or (
            node.op != "call_module" and is_spatial_size_of(arg(node, 1, "kernel_size"), node.args[0]))
        if covers and padding == (0, 0) and flattened:  # a larger kernel (ceil_mode) averages the same
            return Value("pooled", (2, 3), reduce=windowed[name])  # type: ignore[arg-type]
    return None


def _pair(v: object) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    return None


def _from_map(node: fx.Node, name: str, src: Value, in_shape: tuple[int, ...],
              out_shape: tuple[int, ...], modules: dict[str, nn.Module]) -> Value:
    """Value of a node whose single tensor input is a map."""
    pooled = _pool_of(node, name, src, in_shape, out_shape, modules)
    if pooled is not None:
        return pooled
    assert src.axes is not None
    ay, ax = src.axes
    if name in FLATTENS and len(out_shape) == 2 and len(in_shape) == 4:
        c_axis = ({1, 2, 3} - {ay, ax}).pop()
        layout = layout_of(src.axes, 4)
        assert layout is not None
        return Value("flat", flat=(in_shape[c_axis], in_shape[ay], in_shape[ax]), axes=src.axes,
                     flat_layout=layout[1:])
    if name in REDUCTIONS:
        return _channel_reduction(node, name, src, in_shape, out_shape)
    if name in ("permute", "transpose"):
        perm = permutation(node, name, len(in_shape))
        if perm is None:
            return Value("seq")
        return Value("map", (perm.index(ay), perm.index(ax)))
    if name in FLATTENS or name == "unflatten":
        # reshapes that keep the two spatial axes last and unchanged (channel shuffle)
        spatial = (in_shape[ay], in_shape[ax])
        r = len(out_shape)
        trailing = (ay, ax) == (len(in_shape) - 2, len(in_shape) - 1)
        if trailing and out_shape[-2:] == spatial:
            return Value("map", (r - 2, r - 1))
        if trailing and out_shape == (*in_shape[:-2], spatial[0] * spatial[1]):
            return Value("merged", (r - 1, r - 1))  # x.flatten(2): a global pool may follow
        return Value("seq")
    if len(out_shape) != len(in_shape):
        return Value("seq")
    return Value("map", src.axes)


def _channel_reduction(node: fx.Node, name: str, src: Value, in_shape: tuple[int, ...],
                       out_shape: tuple[int, ...]) -> Value:
    """A sum / mean / max over axes other than the spatial ones (selective-kernel branches)
    is still a map; the spatial axes move left past the reduced ones unless kept. One over
    the spatial axes (not a global pool the head can use) is a summary of the whole map."""
    assert src.axes is not None
    at = 2 if name in ("norm", "linalg_vector_norm") else 1  # torch.norm(x, p, dim, keepdim)
    dims = normalize_dims(arg(node, at, "dim"), len(in_shape))
    if dims is None:
        return Value("seq")
    if set(dims) & set(src.axes):
        if name in GLOBAL_REDUCERS and len(dims) == 1 and len(out_shape) == len(in_shape) - 1:
            (kept,) = set(src.axes) - set(dims)
            at = kept - (dims[0] < kept)
            return Value("half", (at, at), reduce=GLOBAL_REDUCERS[name])  # type: ignore[arg-type]
        return Value("context")  # e.g. ConvNeXt-V2's GRN: a norm over the map, dims kept
    if len(out_shape) == len(in_shape):  # keepdim
        return Value("map", src.axes)
    ay, ax = (a - sum(d < a for d in dims) for a in src.axes)
    return Value("map", (ay, ax))


def permutation(node: fx.Node, name: str, rank: int) -> list[int] | None:
    """The axis order after ``permute`` / ``transpose`` (``name``), if given by constants."""
    if name == "permute":
        dims = node.args[1:] if node.op == "call_method" else (arg(node, 1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        if not all(isinstance(d, int) for d in dims):
            return None
        return [int(d) % rank for d in dims]
    a, b = arg(node, 1, "dim0"), arg(node, 2, "dim1")
    if not (isinstance(a, int) and isinstance(b, int)):
        return None
    perm = list(range(rank))
    perm[a % rank], perm[b % rank] = perm[b % rank], perm[a % rank]
    return perm


def propagate_kinds(gm: fx.GraphModule, modules: dict[str, nn.Module],
                    resized: Callable[[], dict[fx.Node, tuple[int, ...]]]) -> dict[fx.Node, Value]:
    """Kinds of all tensor nodes derived from the (first) input, in graph order.

    ``resized()`` gives the nodes' shapes at a second input size (asked for at most once,
    only when some node would otherwise be ``seq``).
    """
    values: dict[fx.Node, Value] = {}
    other: dict[fx.Node, tuple[int, ...]] | None = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if not values:
                values[node] = Value("map", (2, 3))
            continue
        if node.op in ("output", "get_attr"):
            continue
        ins = tensor_inputs(node, values)
        if not ins or node.meta.get("tensor_meta") is None:
            continue
        kinds = [values[n] for n in ins]
        name = op_name(node, modules)
        out_shape = shape_of(node)
        if out_shape is None:  # tuples (chunk, split, pool with indices): like their input
            values[node] = (_merged_max(node, name, kinds) or _tuple_reduction(node, name, kinds[0], ins[0])
                            or kinds[0])
        elif any(v.kind == "merged" for v in kinds):
            values[node] = _from_merged(node, name, kinds, out_shape)
        elif any(v.kind == "seq" for v in kinds):
            values[node] = Value("seq")
        elif maps := [v for v in kinds if v.kind == "map"]:
            src_shape = shape_of(ins[[values[n].kind for n in ins].index("map")])
            if len(maps) == len(kinds) == 1 and src_shape is not None:
                values[node] = _from_map(node, name, maps[0], src_shape, out_shape, modules)
            elif name == "stack" and src_shape is not None:
                dim = arg(node, 1, "dim", 0) % len(out_shape)
                axes = maps[0].axes
                assert axes is not None
                values[node] = Value("map", (axes[0] + (dim <= axes[0]), axes[1] + (dim <= axes[1])))
            else:
                values[node] = Value("map", maps[0].axes)
        elif any(v.kind == "half" for v in kinds):
            values[node] = _from_half(node, name, kinds, out_shape)
        elif any(v.kind == "context" for v in kinds):
            values[node] = Value("context")
        else:
            values[node] = _from_head_value(node, name, kinds[0], out_shape, modules)
        if values[node].kind == "seq":
            other = resized() if other is None else other
            if other.get(node) == out_shape:  # the same at another input size: a summary
                values[node] = Value("context")
    return values


def _from_merged(node: fx.Node, name: str, kinds: list[Value], out_shape: tuple[int, ...]) -> Value:
    """``x.flatten(2).mean(-1)`` is a global pool, and so are the values of
    ``x.flatten(2).max(-1)`` (:func:`_merged_max`); anything else on merged axes is tokens."""
    src = next(v for v in kinds if v.kind == "merged")
    assert src.axes is not None
    if len(kinds) == 1 and name in GLOBAL_REDUCERS and len(out_shape) == 2:
        dims = normalize_dims(arg(node, 1, "dim"), len(out_shape) + 1)
        if dims == (src.axes[0],):
            return Value("vector", reduce=GLOBAL_REDUCERS[name])  # type: ignore[arg-type]
    if src.reduce == "max" and len(out_shape) == 2 and (
            (name == "getitem" and node.args[1] == 0) or (name == "getattr" and node.args[1] == "values")):
        return Value("vector", reduce="max")  # the values, not the indices
    return Value("seq")


def _from_half(node: fx.Node, name: str, kinds: list[Value], out_shape: tuple[int, ...]) -> Value:
    """The reduction of a ``half`` map over its other spatial axis, as the first one reduced
    (``x.mean(3).mean(2)``, ``x.amax(-1).amax(-1)``), is a global pool; anything else on it is
    a summary."""
    src = kinds[0]
    assert src.axes is not None
    if len(kinds) == 1 and GLOBAL_REDUCERS.get(name) == src.reduce and len(out_shape) == 2 and (
            normalize_dims(arg(node, 1, "dim"), len(out_shape) + 1) == (src.axes[0],)):
        return Value("vector", reduce=src.reduce)
    return Value("context")


def _tuple_reduction(node: fx.Node, name: str, src: Value, source: fx.Node) -> Value | None:
    """``x.max(dim)`` / ``x.min(dim)`` of a map, a (values, indices) pair: what either holds
    (:func:`_channel_reduction`; over a spatial axis, a summary of the map)."""
    in_shape = shape_of(source)
    if src.kind != "map" or name not in ("max", "min") or in_shape is None:
        return None
    dims = normalize_dims(arg(node, 1, "dim"), len(in_shape))
    if dims is None or len(dims) != 1:
        return None
    kept = arg(node, 2, "keepdim", False)
    out_shape = in_shape if kept else in_shape[:dims[0]] + in_shape[dims[0] + 1:]
    return _channel_reduction(node, name, src, in_shape, out_shape)


def _merged_max(node: fx.Node, name: str, kinds: list[Value]) -> Value | None:
    """``x.flatten(2).max(-1)``: a (values, indices) pair over the merged spatial axis, marked
    so that its values (:func:`_from_merged`) are a global max pool."""
    src = kinds[0]
    if len(kinds) != 1 or src.kind != "merged" or name != "max" or arg(node, 2, "keepdim", False):
        return None
    assert src.axes is not None
    rank = src.axes[0] + 1
    return Value("merged", src.axes, reduce="max") if normalize_dims(arg(node, 1, "dim"), rank) == (
        src.axes[0],) else None


def _from_head_value(node: fx.Node, name: str, src: Value, out_shape: tuple[int, ...],
                     modules: dict[str, nn.Module]) -> Value:
    if src.kind == "flat":
        if name in ("Linear", "linear") or is_quantized_linear(modules.get(str(node.target))):
            return Value("vector")
        return src
    if len(out_shape) == 2:
        return Value("vector")
    if src.kind == "vector" and name in RESHAPES and len(out_shape) == 4 and out_shape[2:] == (1, 1):
        return Value("pooled", (2, 3))  # x.view(b, c, 1, 1), x[..., None, None]
    if src.kind == "pooled" and name in ("permute", "transpose") and src.axes is not None:
        perm = permutation(node, name, len(out_shape))
        if perm is not None and len(out_shape) == 4:
            return Value("pooled", (perm.index(src.axes[0]), perm.index(src.axes[1])))
    if src.kind == "pooled":
        return Value("pooled", src.axes)
    return Value("seq")


# --------------------------------------------------------------------------- the head


def output_nodes(gm: fx.GraphModule, values: dict[fx.Node, Value]) -> list[fx.Node]:
    """The tensors the model returns that depend on its image, in output order (a tuple,
    list, dict or dataclass of outputs gives several)."""
    def leaves(node: fx.Node) -> list[fx.Node]:
        if node in values:
            return [node]
        if node.meta.get("tensor_meta") is not None or node.op == "get_attr":
            raise NotConvolutionalizable(f"the output '{node.name}' does not depend on the input "
                                         "image; every output of a converted model must be a map")
        # a container built in forward (a dataclass): its tensors are the outputs
        return [leaf for n in input_nodes(node) for leaf in leaves(n)]

    output = next(n for n in gm.graph.nodes if n.op == "output")
    return list(dict.fromkeys(leaf for n in input_nodes(output) for leaf in leaves(n)))


def _head_nodes(gm: fx.GraphModule, values: dict[fx.Node, Value]
                ) -> tuple[list[fx.Node], fx.Node, list[fx.Node]]:
    """The head's nodes (graph order), the one feature map they read, and the outputs."""
    results = output_nodes(gm, values)
    if not results:
        raise NotConvolutionalizable("the model's output does not depend on its input image")
    head: set[fx.Node] = set()
    features: set[fx.Node] = set()
    stack = list(results)
    while stack:
        node = stack.pop()
        value = values.get(node)
        if value is None or node in head:
            continue
        if value.kind == "seq":
            raise NotConvolutionalizable(_seq_reason(gm, values, node))
        if value.kind == "map" and value.pool_to is None:
            features.add(node)
            continue
        head.add(node)
        stack.extend(input_nodes(node))
    for result in results:
        if result in features and all(r in features for r in results):
            raise NotConvolutionalizable(
                f"the output '{result.name}' is already a spatial map: the model is fully "
                "convolutional, there is no fully-connected head to rewrite"
            )
        if result in features:
            raise NotConvolutionalizable(
                f"the output '{result.name}' is a feature map of the body, returned beside the "
                "classifier's scores; only models whose every output is a classifier head convert "
                "(convert a wrapper that returns the scores alone)")
    if len(features) > 1:
        names = ", ".join(sorted(f"'{n.name}'" for n in features))
        raise NotConvolutionalizable(f"the head reads several feature maps ({names}); "
                                     "only a head over one map can slide")
    if not features:
        raise NotConvolutionalizable("the model's output does not depend on a spatial map of its image")
    return [n for n in gm.graph.nodes if n in head], features.pop(), results


def _seq_reason(gm: fx.GraphModule, values: dict[fx.Node, Value], node: fx.Node) -> str:
    """Name the first operation that turned the spatial map into something else."""
    first = next(n for n in gm.graph.nodes if values.get(n, Value("map")).kind == "seq")
    first = next((n for n in tensor_inputs(first, values) if values[n].kind == "merged"), first)
    return (
        f"node '{first.name}' ({first.op} {first.target}) reshapes the spatial map into tokens or "
        "windows (a transformer or windowed attention), so the classifier cannot slide as "
        "convolutions; such a model can only be evaluated crop by crop"
    )


def find_head(gm: fx.GraphModule, values: dict[fx.Node, Value], modules: dict[str, nn.Module],
              input_size: tuple[int, int], in_channels: int, capture: str) -> HeadPlan:
    """The HeadPlan of a captured, shape-propagated classifier."""
    nodes, feature, results = _head_nodes(gm, values)
    fshape = shape_of(feature)
    fvalue = values[feature]
    assert fshape is not None and fvalue.axes is not None
    layout = layout_of(fvalue.axes, len(fshape))
    if layout is None:
        raise NotConvolutionalizable(f"the head reads '{feature.name}', a {len(fshape)}-D map; "
                                     "only a 4-D (batch, channels, height, width) map can slide")
    ay, ax = fvalue.axes
    fmap = FeatureMap(feature.name, fshape[layout.index("C")], (fshape[ay], fshape[ax]), layout)
    steps = tuple(_step(n, values, modules, fmap) for n in nodes)
    for result in results:
        flat = values[result].flat
        if values[result].kind == "flat" and flat is not None and flat[1:] != (1, 1):
            raise NotConvolutionalizable(
                f"the output '{result.name}' is the flattened feature map itself (no Linear after the "
                "flatten): there is no fully-connected head to rewrite")
    return HeadPlan("torch", input_size, in_channels, fmap, steps,
                    outputs=tuple(n.name for n in results), capture=capture)


# Kinds on the way to a global pool: how the pool is described, and why anything else is refused.
NOT_YET_POOLED = {
    "half": ("one axis, then the other",
             "reads the map reduced over one spatial axis only (x.mean(2), say); only the same "
             "reduction over the other axis as well (a global pool) has an exact sliding form"),
    "merged": ("of the flattened map",
               "reduces the flattened spatial axes in a way that is neither a global average nor a "
               "global max pool; it has no exact sliding form"),
}


def _step(node: fx.Node, values: dict[fx.Node, Value], modules: dict[str, nn.Module],
          fmap: FeatureMap) -> HeadStep:
    """What the conversion does with one head node; refuses what has no conv form."""
    name = op_name(node, modules)
    value = values[node]
    ins = [values[n] for n in tensor_inputs(node, values)]
    src = ins[0]
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    where = f"head node '{node.name}' ({name})"
    if value.kind in ("merged", "half"):
        return HeadStep(node.name, "keep", f"{name} of the map's spatial axes (read by the global "
                        "pool; removed with it)")
    if src.kind in NOT_YET_POOLED:
        how, refusal = NOT_YET_POOLED[src.kind]
        if value.reduce is None:
            raise NotConvolutionalizable(f"{where} {refusal}")
        return HeadStep(node.name, "global_pool", f"global {value.reduce} pool over "
                        f"{fmap.size[0]}x{fmap.size[1]} ({how})", reduce=value.reduce)
    if src.kind == "map" and src.pool_to is None:
        if value.pool_to is not None:
            return _adaptive_step(node, name, value, fmap)
        if value.reduce is not None:
            return HeadStep(node.name, "global_pool", f"global {value.reduce} pool over "
                            f"{fmap.size[0]}x{fmap.size[1]}", reduce=value.reduce)
        if value.kind == "flat":
            return HeadStep(node.name, "flatten", f"flatten {fmap.channels}x{fmap.size[0]}x"
                            f"{fmap.size[1]} ({value.flat_layout})")
    if src.kind == "map" and src.pool_to is None:
        raise NotConvolutionalizable(f"{where} reduces the feature map in a way that is neither a "
                                     "global average/max pool nor a flatten (a sum over it, say), "
                                     "which has no exact sliding form")
    if src.kind == "map":  # reads an adaptive pool: must be the flatten
        if value.kind != "flat":
            raise NotConvolutionalizable(f"{where} follows an adaptive pool but is not a "
                                         "flatten; cannot slide")
        return HeadStep(node.name, "flatten", f"flatten {value.flat}")
    if name == "squeeze" and src.kind == "pooled" and len(shape_of(node) or ()) < 2:
        raise NotConvolutionalizable(f"{where} squeezes every axis of size 1, the batch axis too at "
                                     "batch size 1; squeeze(-1).squeeze(-1) or flatten(1) keeps it")
    if name in FLATTENS and src.kind == "pooled":
        return HeadStep(node.name, "flatten", "flatten 1x1 pooled map -> removed")
    if isinstance(module, nn.Linear) or name == "linear" or is_quantized_linear(module):
        return _linear_step(node, module, src, where)
    if src.kind == "flat":
        if isinstance(module, ELEMENTWISE_MODULES) or name in ELEMENTWISE:
            return HeadStep(node.name, "keep", f"{name} (elementwise)")
        raise NotConvolutionalizable(f"{where} acts on the flattened {src.flat} map before any "
                                     "Linear; it has no sliding equivalent")
    return _vector_step(node, name, module, src, ins, where, values)


def linear_weight(node: fx.Node, module: nn.Module | None) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear (float or quantized) or of F.linear /
    aten.linear on a parameter (a get_attr), else None."""
    if isinstance(module, nn.Linear) or is_quantized_linear(module):
        return int(module.in_features), int(module.out_features)  # type: ignore[union-attr]
    weight = arg(node, 1, "weight")
    weight = dequantized_weight(weight) or weight  # pt2e: an int8 constant, dequantized
    shape = shape_of(weight) if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
    bias = arg(node, 2, "bias")
    if shape is None or len(shape) != 2 or not (bias is None or (
            isinstance(bias, fx.Node) and bias.op == "get_attr")):
        return None
    return shape[1], shape[0]


def _linear_step(node: fx.Node, module: nn.Module | None, src: Value, where: str) -> HeadStep:
    if src.kind == "pooled":
        raise NotConvolutionalizable(f"{where} reads a 4-D pooled map, not a feature vector; "
                                     "flatten before the Linear")
    refusal = quantized_linear_refusal(module) if is_quantized_linear(module) else None
    if refusal is not None:
        raise NotConvolutionalizable(f"{where} {refusal}")
    features = linear_weight(node, module)
    if features is None:
        raise NotConvolutionalizable(f"{where}: a functional linear whose weight or bias is "
                                     "computed, not a parameter, has no fixed convolution kernel")
    n_in, n_out = features
    linear, conv = "Linear", "Conv2d"
    if dequantized_weight(arg(node, 1, "weight")) is not None:  # pt2e: int8 weights
        linear, conv = "quantized linear (pt2e)", "quantized conv2d (pt2e)"
    if is_quantized_linear(module):  # LinearReLU -> ConvReLU2d
        linear = f"quantized {type(module).__name__}"
        conv = f"quantized {type(module).__name__.replace('Linear', 'Conv')}2d"
    if src.kind == "flat":
        assert src.flat is not None
        c, h, w = src.flat
        return HeadStep(node.name, "linear", f"{linear} {n_in}->{n_out} -> {conv} {c}->{n_out} "
                        f"kernel {h}x{w}", kernel=(h, w))
    return HeadStep(node.name, "linear", f"{linear} {n_in}->{n_out} -> {conv} 1x1", kernel=(1, 1))


def _adaptive_step(node: fx.Node, name: str, value: Value, fmap: FeatureMap) -> HeadStep:
    assert value.pool_to is not None
    (fh, fw), (kh, kw) = fmap.size, value.pool_to
    if (fh, fw) == (kh, kw):
        detail = f"{name}({kh}x{kw}) is the identity at the native size -> removed"
    elif fh % kh == 0 and fw % kw == 0:
        detail = f"{name}({kh}x{kw}) over {fh}x{fw} -> fixed pool {fh // kh}x{fw // kw}"
    else:
        raise NotConvolutionalizable(
            f"adaptive pool '{node.name}' maps the native {fh}x{fw} feature map to {kh}x{kw}, "
            "which no fixed sliding pool reproduces; pass an input_size whose feature map is "
            f"a multiple of {kh}x{kw}"
        )
    return HeadStep(node.name, "adaptive_pool", detail, reduce=value.reduce, pool_to=(kh, kw))


def _keeps_features(node: fx.Node, values: dict[fx.Node, Value]) -> bool:
    """A reshape between ``(N, D)`` and ``(N, D, 1, 1)``: on maps, the identity."""
    before, after = shape_of(tensor_inputs(node, values)[0]), shape_of(node)
    if before is None or after is None or values[node].kind not in ("vector", "pooled"):
        return False
    return before[:2] == after[:2] and all(s[2:] in ((), (1, 1)) for s in (before, after))


def _vector_step(node: fx.Node, name: str, module: nn.Module | None, src: Value,
                 ins: list[Value], where: str, values: dict[fx.Node, Value]) -> HeadStep:
    """Steps on pooled / vector values."""
    vector = src.kind == "vector"
    if isinstance(module, nn.BatchNorm1d) and vector:
        return HeadStep(node.name, "batchnorm", "BatchNorm1d -> BatchNorm2d")
    if name == "batch_norm" and (vector or src.axes == (2, 3)):  # functional: normalizes dim 1
        return HeadStep(node.name, "keep", "batch_norm over channels (per location)")
    if name in RESHAPES and src.kind in ("vector", "pooled") and _keeps_features(node, values):
        return HeadStep(node.name, "reshape", f"{name} of the {src.kind} features (no-op) -> removed")
    if isinstance(module, nn.LayerNorm) or name == "layer_norm":
        shape = module.normalized_shape if module is not None else arg(node, 1, "normalized_shape")
        if vector and hasattr(module, "scale") and hasattr(module, "zero_point"):
            raise NotConvolutionalizable(f"{where} is a quantized LayerNorm over a feature vector; "
                                         "its per-location form is not built for quantized maps")
        if len(tuple(shape)) != 1:
            raise NotConvolutionalizable(f"{where} normalizes over {tuple(shape)}; only a "
                                         "LayerNorm over the feature dimension can slide")
        if vector:
            return HeadStep(node.name, "layernorm", "LayerNorm -> LayerNorm over channels")
        if src.axes is not None and src.axes[1] != 3:  # pooled NHWC: channels last already
            return HeadStep(node.name, "keep", "LayerNorm over channels (per location)")
    if name in ("softmax", "log_softmax", "Softmax", "LogSoftmax") and vector:
        dim = module.dim if module is not None else arg(node, 1, "dim")
        if dim in (1, -1):
            return HeadStep(node.name, "softmax", f"{name} over classes -> over channels")
    if name in ("softmax", "log_softmax", "Softmax", "LogSoftmax") and src.axes is not None:
        dim = module.dim if module is not None else arg(node, 1, "dim")
        channel = ({1, 2, 3} - set(src.axes)).pop()
        if isinstance(dim, int) and dim % 4 == channel:
            return HeadStep(node.name, "keep", f"{name} over channels (per location)")
    if name == "cat" and all(v.kind == src.kind for v in ins):
        dim = arg(node, 1, "dim", 0)
        if vector and dim in (1, -1):
            return HeadStep(node.name, "concat", "concat features -> concat channels")
        if not vector and src.axes is not None and dim == 1 and src.axes == (2, 3):
            return HeadStep(node.name, "keep", "concat channels")
    if isinstance(module, ELEMENTWISE_MODULES) or name in ELEMENTWISE:
        if _constant_operand(node):
            raise NotConvolutionalizable(f"{where} combines the features with a constant "
                                         "tensor; it cannot broadcast over a map")
        return HeadStep(node.name, "keep", f"{name} (elementwise)")
    if not vector and (_per_location_module(module) or _pointwise_conv(node, name)):
        return HeadStep(node.name, "keep", f"{name} (per location)")
    if not vector and name in ("permute", "transpose", "contiguous"):
        return HeadStep(node.name, "keep", f"{name}")
    raise NotConvolutionalizable(
        f"{where} has no known per-location equivalent on a {src.kind} tensor; "
        "supported head operations: pooling, flatten, Linear, BatchNorm1d, LayerNorm, "
        "softmax, concat and elementwise activations/dropout"
    )


def _per_location_module(module: nn.Module | None) -> bool:
    """Modules that act on each location of a pooled (1x1) map the same way at any size."""
    if isinstance(module, (nn.Conv2d, *QUANTIZED_CONVS)):
        return module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding in (
            (0, 0), "valid")
    return isinstance(module, (nn.BatchNorm2d, *ELEMENTWISE_MODULES)) or (
        module is not None and type(module).__name__ in ("BatchNormAct2d", "LayerNorm2d"))


def _pointwise_conv(node: fx.Node, name: str) -> bool:
    """A functional 1x1, stride-1, unpadded convolution (torch.export graphs)."""
    if name != "conv2d":
        return False
    weight = shape_of(arg(node, 1, "weight")) if isinstance(arg(node, 1, "weight"), fx.Node) else None
    stride, padding = arg(node, 3, "stride", 1), arg(node, 4, "padding", 0)
    return bool(weight) and weight[2:] == (1, 1) and stride in (1, [1, 1], (1, 1)) and (  # type: ignore[index]
        padding in (0, [0, 0], (0, 0), "valid"))


def _constant_operand(node: fx.Node) -> bool:
    """True when an elementwise op mixes in a non-scalar constant tensor (a get_attr)."""
    for n in input_nodes(node):
        if n.op == "get_attr":
            shape = shape_of(n)
            if shape is not None and math.prod(shape) > 1:
                return True
    return False
