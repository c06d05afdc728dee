"""torch.fx plumbing shared by the PyTorch analysis and rewrite: tracing, shapes, op names."""

from __future__ import annotations

import contextlib
import functools
import io
import operator
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ...errors import NotConvolutionalizable, first_line
from .pt2e import PT2E_OPS, dequantized_weight, requantize_mean
from .quantized import QUANTIZED_CONVS, QUANTIZED_OPS, QUANTIZED_PER_LOCATION, is_quantized_linear

__all__ = [
    "ELEMENTWISE",
    "arg",
    "op_name",
    "shape_of",
    "tensor_inputs",
    "trace",
]

# Operations that act on each element (or each location) independently and accept any
# tensor shape: they stay as they are in a rewritten head and do not change geometry.
ELEMENTWISE = frozenset(
    {
        "add", "sub", "mul", "truediv", "div", "neg", "pow", "abs", "exp", "log", "sqrt",
        "rsqrt", "reciprocal", "sign", "erf", "tanh", "sigmoid", "relu", "relu_", "relu6",
        "gelu", "silu", "mish", "elu", "selu", "celu", "leaky_relu", "hardswish",
        "hardsigmoid", "hardtanh", "softplus", "softsign", "tanhshrink", "logsigmoid",
        "clamp", "clamp_min", "clamp_max", "clip", "dropout", "dropout2d", "alpha_dropout",
        "feature_alpha_dropout", "contiguous", "float", "to", "type_as", "clone", "detach",
        "sigmoid_", "add_", "mul_", "hard_sigmoid", "hard_swish", "swish", "gelu_tanh",
        "quick_gelu", "where", "minimum", "maximum", "batch_norm", "identity", "floordiv", "round",
    }
) | QUANTIZED_OPS | PT2E_OPS | {requantize_mean.__name__}

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, *QUANTIZED_PER_LOCATION,
)


def _timm_tracer_options() -> tuple[set[type[nn.Module]], tuple[Any, ...]]:
    """timm's own fx leaf modules and autowrapped functions, when timm is in use."""
    if "timm" not in sys.modules:  # a timm model implies timm is imported; don't pay for it
        return set(), ()
    from timm.layers import _fx as timm_fx

    functions = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
    return set(timm_fx.get_notrace_modules()), functions


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        self.extra_leaves, autowrap = _timm_tracer_options()
        super().__init__(autowrap_functions=autowrap)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # Linear subclasses (timm's Linear calls F.linear) stay modules: the head rewrite
        # swaps modules, and a Linear's meaning does not depend on its subclass.
        return (type(m) in self.extra_leaves or isinstance(m, nn.Linear)
                or super().is_leaf_module(m, qualname))


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (with timm's leaf modules); untraceable models are refused."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        raise NotConvolutionalizable(
            f"torch.fx cannot trace {type(model).__name__}: {first_line(exc)}"
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


INT_KEY = "convolutionalize_int"  # node.meta: the int a size computation gave at the native size


class _ShapeAndIntProp(ShapeProp):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, int) and not isinstance(result, bool):
            n.meta[INT_KEY] = result  # e.g. a padding computed from the input's size
        return result


def propagate_shapes(gm: fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    """Run ``gm`` on ``x`` recording every node's output shape (and the value of every node
    that gives an int, :func:`int_at_native`); returns the output."""
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints tracebacks
        return _ShapeAndIntProp(gm).propagate(x)


def int_at_native(value: Any) -> int | None:
    """``value`` (an argument: an int, or a node computing one from sizes) as the int it was
    when :func:`propagate_shapes` ran; None when unknown."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return value.meta.get(INT_KEY) if isinstance(value, fx.Node) else None


def shapes_at(gm: fx.GraphModule, x: torch.Tensor) -> dict[fx.Node, tuple[int, ...]]:
    """The output shape of every tensor node when ``gm`` runs on ``x``, as far as it runs
    (a head that only fits the native size stops it; the nodes before are recorded)."""
    shapes: dict[fx.Node, tuple[int, ...]] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if isinstance(result, torch.Tensor):
                shapes[n] = tuple(result.shape)
            return result

    with torch.no_grad(), contextlib.suppress(Exception):  # stopping early is the point
        _Recorder(gm).run(x)
    return shapes


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The output shape ShapeProp recorded, or None for non-tensors and tuples."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A readable name of what a node does: a module class, a function or a method name.

    ATen operators (torch.export graphs) go by their packet name without the overload and
    without the in-place underscore (``aten.add_.Tensor`` -> ``add``), the same names the
    ``torch`` functions and tensor methods of an fx graph have.
    """
    if node.op == "call_module":
        return type(modules[str(node.target)]).__name__
    if node.op == "call_function":
        if node.target is operator.getitem:
            return "getitem"
        if isinstance(node.target, torch._ops.OpOverload):
            name = node.target.overloadpacket.__name__
            return name[:-1] if name.endswith("_") and not name.endswith("__") else name
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given by keyword or at position ``index``."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def input_nodes(node: fx.Node) -> Iterator[fx.Node]:
    """Every node among a node's arguments (nested in lists and dicts too)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return iter(found)


def tensor_inputs(node: fx.Node, tracked: dict[fx.Node, Any]) -> list[fx.Node]:
    """The argument nodes of ``node`` present in ``tracked``, in order, without repeats."""
    seen: list[fx.Node] = []
    for n in input_nodes(node):
        if n in tracked and n not in seen:
            seen.append(n)
    return seen


def ancestors(node: fx.Node) -> set[fx.Node]:
    """All nodes ``node`` depends on (including itself)."""
    seen = {node}
    stack = [node]
    while stack:
        for parent in input_nodes(stack.pop()):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def is_spatial_size_of(value: Any, source: Any) -> bool:
    """Whether ``value`` (a pool's ``kernel_size``) is read off the height and width of the
    4-D tensor ``source`` as it runs: ``x.shape[-2:]``, ``x.size()[2:]``, ``(x.size(2),
    x.size(3))``. Such a pool is global at every input size."""
    def size_of_source(node: Any) -> bool:  # x.shape or x.size()
        return isinstance(node, fx.Node) and node.args[:1] == (source,) and (
            (node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",))
            or (node.op == "call_method" and node.target == "size" and len(node.args) == 1))

    def axis_of_source(node: Any) -> int | None:  # x.size(2), x.shape[2]
        if not isinstance(node, fx.Node):
            return None
        if node.op == "call_method" and node.target == "size" and len(node.args) == 2 and (
                node.args[0] is source and isinstance(node.args[1], int)):
            return node.args[1] % 4
        if node.op == "call_function" and node.target is operator.getitem and size_of_source(
                node.args[0]) and isinstance(node.args[1], int):
            return node.args[1] % 4
        return None

    if isinstance(value, (list, tuple)):
        return len(value) == 2 and [axis_of_source(v) for v in value] == [2, 3]
    if isinstance(value, fx.Node) and value.op == "call_function" and value.target is operator.getitem:
        index = value.args[1]
        return size_of_source(value.args[0]) and isinstance(index, slice) and index.step is None and (
            index.start in (2, -2) and index.stop is None)
    return False


def normalize_dims(dims: Any, rank: int) -> tuple[int, ...] | None:
    """``dim`` arguments as a sorted tuple of non-negative ints, or None if not constant ints."""
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None
    return tuple(sorted(d % rank for d in dims))


def attr(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor a ``get_attr`` node reads (a parameter or buffer of ``gm``)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise TypeError(f"{node} is not a get_attr node")
    return functools.reduce(getattr, str(node.target).split("."), gm)


def replace_module(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    """Put ``new`` where submodule ``target`` was."""
    parent_name, _, child = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, child, new)


def first_in_channels(gm: fx.GraphModule, modules: dict[str, nn.Module],
                      input_size: tuple[int, int]) -> int | None:
    """The image channels: of the first convolution (float or quantized) in graph order or,
    for a model that is only a head (Flatten -> Linear), of the first Linear's input over the
    input area."""
    area = input_size[0] * input_size[1]
    for node in gm.graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, nn.Linear) or is_quantized_linear(module):
            n_in = int(module.in_features)  # type: ignore[union-attr]
            return n_in // area if n_in % area == 0 else None
        if isinstance(module, (nn.Conv2d, *QUANTIZED_CONVS)):
            return int(modules[node.target].in_channels)
        if node.op == "call_module" and hasattr(modules[node.target], "in_chans"):
            return int(modules[node.target].in_chans)
        if node.op == "call_function" and op_name(node, modules) == "conv2d":
            weight = arg(node, 1, "weight")
            weight = dequantized_weight(weight) or weight  # pt2e: an int8 constant, dequantized
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                w = attr(gm, weight)
                return int(w.shape[1]) * int(arg(node, 6, "groups", 1))
    return None
