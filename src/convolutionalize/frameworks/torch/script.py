"""TorchScript in: a ``ScriptModule`` (``torch.jit.script`` / ``trace`` / ``freeze``, or a
``.pt`` archive loaded with ``torch.jit.load``) lifted to an ``fx.GraphModule`` by torch's own
TorchScript -> ExportedProgram converter, which the analysis reads like any exported graph.

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

__all__ = ["TORCHSCRIPT", "is_script", "lift", "lifted_module", "script_name"]

TORCHSCRIPT = "torchscript"  # a converted model's ``source_format`` when it came from TorchScript

GUESSED_CHANNELS = (3, 1, 4)  # image kinds tried when the first weight does not say


def is_script(model: object) -> bool:
    return isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction))


def script_name(model: object) -> str:
    """The scripted class's own name (``RecursiveScriptModule`` says nothing)."""
    return str(getattr(model, "original_name", None) or type(model).__name__)


def lifted_module(program: torch.export.ExportedProgram) -> nn.Module:
    """The lifted program as a module whose weights need no gradient: TorchScript's weights
    come as buffers that require one, and what is computed from them (a folded batch norm,
    a reshaped kernel) would then not be a leaf that can be copied or saved."""
    module = program.module()
    for sub in module.modules():
        for name, tensor in sub._buffers.items():
            if tensor is not None:
                sub._buffers[name] = tensor.detach()
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = nn.Parameter(param.detach(), requires_grad=False)
    return module


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
    limit = tolerance(str(example.dtype))
    if len(flat) != len(got) or any(
            a.shape != b.shape or relative_error(b.double().numpy(), a.double().numpy()) > limit
            for a, b in zip(flat, got)):
        raise NotConvolutionalizable(
            f"torch's TorchScript converter lifted the scripted {script_name(model)} to a graph "
            "that computes something else at the native size"
        )
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
