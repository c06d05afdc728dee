"""TorchScript in: a ``ScriptModule`` (``torch.jit.script`` / ``trace`` / ``freeze``, or a
``.pt`` archive loaded with ``torch.jit.load``) lifted to an ``fx.GraphModule`` by torch's own
TorchScript -> ExportedProgram converter, which the analysis reads like any exported graph.

A quantized ScriptModule (an eager-mode quantized model scripted or traced: ``quantized::conv2d``
and ``quantized::linear`` on packed parameters) is lifted by the same converter to float
operations that round like the quantized kernels; its weights are then read as their int8
integers again, dequantized in the graph (:func:`integer_weights`), so it converts like a pt2e
graph and stays quantized.

A traced archive records convolutions as ``aten.convolution`` (with the transposed flag and
output padding); those that are plain 2-D convolutions become ``aten.conv2d`` so that one set
of geometry rules reads both. The lifted graph is compared with the ScriptModule at the native
size before anything else uses it.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from ...errors import NotConvolutionalizable, first_line
from ...selfcheck import relative_error, tolerance
from .pt2e import PT2E, requantize_mean

__all__ = ["TORCHSCRIPT", "is_script", "lift", "lifted_module", "script_name"]

TORCHSCRIPT = "torchscript"  # a converted model's ``source_format`` when it came from TorchScript

GUESSED_CHANNELS = (3, 1, 4)  # image kinds tried when the first weight does not say


def is_script(model: object) -> bool:
    return isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction))


def script_name(model: object) -> str:
    """The scripted class's own name (``RecursiveScriptModule`` says nothing)."""
    return str(getattr(model, "original_name", None) or type(model).__name__)


def lifted_module(program: torch.export.ExportedProgram, script: nn.Module | None = None) -> nn.Module:
    """The lifted program as a module whose weights need no gradient: TorchScript's weights
    come as buffers that require one, and what is computed from them (a folded batch norm,
    a reshaped kernel) would then not be a leaf that can be copied or saved. The weights of a
    quantized ``script`` are its int8 integers again (:func:`integer_weights`)."""
    module = program.module()
    for sub in module.modules():
        for name, tensor in sub._buffers.items():
            if tensor is not None:
                sub._buffers[name] = tensor.detach()
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = nn.Parameter(param.detach(), requires_grad=False)
    if script is not None and packed_weights(script):
        integer_weights(module, packed_weights(script))  # type: ignore[arg-type]
        requantized_means(module)  # type: ignore[arg-type]
    constant_scalars(module)  # type: ignore[arg-type]
    return module


def requantized_means(gm: fx.GraphModule) -> None:
    """A quantized average pool rounds its mean to its input's integer grid; the converter
    lifts it to a float average of the dequantized map, which does not. Each average pool whose
    input is such a dequantized map (``(to_float(to_uint8(clamp(...))) - zp) * s``) is followed by
    :func:`~.pt2e.requantize_mean` with that map's scale, zero point and the pool's window count
    (at the native size: the window a converted model's pool keeps)."""
    aten = torch.ops.aten
    pools = {aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default}
    for node in list(gm.graph.nodes):
        grid = _dequantized_grid(node.args[0]) if node.target in pools else None
        if grid is None:
            continue
        value = node.args[0].meta.get("val")
        if node.target == aten.avg_pool2d.default:
            kernel = node.args[1]
            count = int(kernel[0]) * int(kernel[-1])
        elif value is not None and len(node.args[1]) == 2:
            cells = int(node.args[1][0]) * int(node.args[1][1])
            count = int(value.shape[-1]) * int(value.shape[-2]) // cells
        else:
            continue
        with gm.graph.inserting_after(node):
            rounded = gm.graph.call_function(requantize_mean, (node, *grid[:2], count, *grid[2:]))
        node.replace_all_uses_with(rounded)
        rounded.args = (node, *grid[:2], count, *grid[2:])
    gm.graph.lint()
    gm.recompile()


def _dequantized_grid(node: object) -> tuple[float, int, int, int] | None:
    """(scale, zero point, qmin, qmax) when ``node`` is the lifted dequantize of a quantized map:
    ``mul(sub(to(to(clamp(q, qmin, qmax))), zp), s)``; else None."""
    aten = torch.ops.aten
    chain = [aten.mul.Tensor, aten.sub.Tensor, aten.to.dtype, aten.to.dtype, aten.clamp.default]
    nodes = []
    for target in chain:
        if not isinstance(node, fx.Node) or node.target is not target:
            return None
        nodes.append(node)
        node = node.args[0]
    mul, sub, clamp = nodes[0], nodes[1], nodes[-1]
    scale, zero_point, low, high = mul.args[1], sub.args[1], *clamp.args[1:3]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
               for v in (scale, zero_point, low, high)):
        return None
    return float(scale), int(zero_point), int(low), int(high)


def constant_scalars(gm: fx.GraphModule) -> None:
    """``item()`` of a constant (a quantized TorchScript model's QuantStub reads its scale and
    zero point so) as the number it is: the dense runner infers shapes on meta tensors, which
    have no value to read."""
    scalars = {torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default}
    inputs: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in inputs for a in node.all_input_nodes):
            inputs.add(node)
            continue
        if node.target not in scalars or node.op != "call_function":
            continue
        with torch.no_grad():
            value = _evaluate(gm, node)
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a, n=node, v=value: v if a is n else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a, n=node, v=value: v if a is n else a)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _evaluate(gm: fx.GraphModule, node: fx.Node) -> object:
    """The value of ``node``, which depends on constants only."""
    values: dict[fx.Node, object] = {}
    order = [n for n in gm.graph.nodes if n in _ancestors(node)]
    for n in order:
        if n.op == "get_attr":
            values[n] = _attr(gm, str(n.target))
        else:
            args = fx.node.map_arg(n.args, lambda a: values[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: values[a])
            values[n] = n.target(*args, **kwargs)  # type: ignore[operator]
    return values[node]


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = {node}, [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def packed_weights(script: nn.Module) -> list[torch.Tensor]:
    """The quantized weights of a quantized ScriptModule's packed parameters
    (``quantized::conv2d_prepack`` / ``linear_prepack``: ``_packed_params`` of each quantized
    Conv2d and Linear)."""
    weights = []
    for _, sub in script.named_modules():
        packed = getattr(sub, "_packed_params", None)
        if isinstance(packed, torch.ScriptObject) and packed._has_method("unpack"):
            weight = packed.unpack()[0]
            if isinstance(weight, torch.Tensor) and weight.is_quantized:
                weights.append(weight)
    return weights


def integer_weights(gm: fx.GraphModule, quantized: list[torch.Tensor]) -> None:
    """Torch's converter lifts a quantized TorchScript model's packed weights as float tensors
    (each the dequantized int8 weight; its activations' quantize/dequantize become round,
    clamp and casts). Each such weight of a convolution or linear is read again as its int8
    integers dequantized in the graph (pt2e's ``dequantize_per_channel`` /
    ``dequantize_per_tensor``), where that gives the same float tensor bit for bit, so the
    graph, and the head converted from it, keep the int8 weights."""
    from torch._export.passes.replace_quantized_ops_with_standard_ops_pass import get_tensor_from_qtensor

    aten = torch.ops.aten
    readers = {aten.conv2d.default, aten.linear.default, aten.convolution.default}
    for node in list(gm.graph.nodes):
        users = [u for u in node.users if u.target in readers and u.args[1] is node]
        if node.op != "get_attr" or not users:
            continue
        value = _attr(gm, str(node.target))
        match = next((q for q in quantized if q.shape == value.shape and q.dtype == torch.qint8
                      and torch.equal(get_tensor_from_qtensor(q), value)), None)
        if match is not None:
            _dequantized_in_graph(gm, node, match)
    gm.graph.lint()
    gm.recompile()


def _dequantized_in_graph(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor) -> None:
    """Replace the float constant ``node`` by ``dequantize(int8 integers of weight)``."""
    decomposed = torch.ops.quantized_decomposed
    name = str(node.target).replace(".", "_")
    gm.register_buffer(f"{name}_int8", weight.int_repr())
    args: tuple[object, ...]
    if weight.qscheme() == torch.per_channel_affine:
        gm.register_buffer(f"{name}_scales", weight.q_per_channel_scales())
        gm.register_buffer(f"{name}_zero_points", weight.q_per_channel_zero_points())
        op, extra = decomposed.dequantize_per_channel.default, (weight.q_per_channel_axis(),)
        qparams: tuple[object, ...] = (f"{name}_scales", f"{name}_zero_points")
    else:
        op, extra, qparams = decomposed.dequantize_per_tensor.default, (), (
            weight.q_scale(), weight.q_zero_point())
    with gm.graph.inserting_before(node):
        integers = gm.graph.get_attr(f"{name}_int8")
        params = [gm.graph.get_attr(p) if isinstance(p, str) else p for p in qparams]
        args = (integers, *params, *extra, -128, 127, torch.int8)
        dequantized = gm.graph.call_function(op, args)
    expected = _attr(gm, str(node.target))
    with torch.no_grad():
        got = op(weight.int_repr(), *[_attr(gm, p) if isinstance(p, str) else p for p in qparams],
                 *extra, -128, 127, torch.int8)
    if got.dtype != expected.dtype or not torch.equal(got, expected):
        gm.graph.erase_node(dequantized)  # not the same numbers: the float weight stays
        return
    node.replace_all_uses_with(dequantized)
    gm.graph.erase_node(node)


def _attr(gm: nn.Module, target: str) -> torch.Tensor:
    module_path, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(module_path) if module_path else gm, name)


def lift(model: nn.Module, channels: int | None, input_size: tuple[int, int]
         ) -> tuple[torch.export.ExportedProgram, torch.Tensor]:
    """``model`` (a ScriptModule) as an ExportedProgram, with the example it was lifted on."""
    from torch._export.converter import TS2EPConverter

    from .capture import quiet_torch_logs

    example = _example(model, channels, input_size)
    try:
        with torch.no_grad(), quiet_torch_logs(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unused buffers, deprecations: nothing to act on
            program = TS2EPConverter(model, (example,)).convert()
    except Exception as exc:  # the converter raises many types, naming the TorchScript node
        raise NotConvolutionalizable(
            f"torch's TorchScript converter cannot lift the scripted {script_name(model)} to a "
            f"graph: {first_line(exc)}"
        ) from exc
    _plain_convolutions(program.graph_module)
    with torch.no_grad():
        expected, lifted = model(example), program.module()(example)
    flat = [torch.as_tensor(t) for t in torch.utils._pytree.tree_leaves(expected)]
    got = torch.utils._pytree.tree_leaves(lifted)
    # a quantized script's kernels requantize in integers, the lifted graph rounds in float
    quantized = bool(packed_weights(model))
    limit = tolerance(PT2E if quantized else str(example.dtype))
    if len(flat) != len(got) or any(a.shape != b.shape for a, b in zip(flat, got)):
        raise NotConvolutionalizable(
            f"torch's TorchScript converter lifted the scripted {script_name(model)} to a graph "
            "that computes something else at the native size")
    error = max((relative_error(b.double().numpy(), a.double().numpy()) for a, b in zip(flat, got)),
                default=0.0)
    if error > limit and quantized:
        raise NotConvolutionalizable(
            f"quantized TorchScript: torch's TorchScript converter lifts the packed parameters of "
            f"the scripted {script_name(model)} (quantized::conv2d / quantized::linear) to float "
            "operations that do not round as its quantized kernels do (max relative error "
            f"{error:.1e} at the native size, over the {limit:.0e} allowed); convert the eager "
            "quantized model itself, or quantize it with pt2e")
    if error > limit:
        raise NotConvolutionalizable(
            f"torch's TorchScript converter lifted the scripted {script_name(model)} to a graph "
            "that computes something else at the native size")
    return program, example


def _example(model: nn.Module, channels: int | None, input_size: tuple[int, int]) -> torch.Tensor:
    """A native-size batch the ScriptModule runs on: the image channels given, read from its
    first 4-D weight, or the first of :data:`GUESSED_CHANNELS` that runs."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    first = next((p for p in model.parameters() if p.dim() == 4), None)
    candidates = [channels] if channels else list(dict.fromkeys(
        ([int(first.shape[1])] if first is not None else []) + list(GUESSED_CHANNELS)))
    reason = "no image channel count runs"
    for count in candidates:
        example = torch.randn(2, count, *input_size, generator=torch.Generator().manual_seed(0))
        example = example.to(dtype)
        try:
            with torch.no_grad():
                model(example)
        except Exception as exc:  # TorchScript raises torch.jit.Error, RuntimeError, ...
            reason = first_line(exc)
            continue
        return example
    raise NotConvolutionalizable(
        f"the scripted {script_name(model)} does not run at the native input size "
        f"{input_size[0]}x{input_size[1]} with {', '.join(map(str, candidates))} channels: {reason}"
    )


def _plain_convolutions(gm: fx.GraphModule) -> None:
    """``aten.convolution`` (as traced archives record it) -> ``aten.conv2d`` where it is a
    plain, not transposed, 2-D convolution."""
    convolution = torch.ops.aten.convolution.default
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not convolution:
            continue
        x, weight, bias, stride, padding, dilation, transposed, _output_padding, groups = node.args
        value = weight.meta.get("val") if isinstance(weight, fx.Node) else None
        if transposed or value is None or value.dim() != 4:
            continue
        node.target = torch.ops.aten.conv2d.default
        node.args = (x, weight, bias, stride, padding, dilation, groups)
    gm.recompile()
