"""Capture a PyTorch classifier as a graph: torch.fx first, torch.export when fx cannot trace it.

torch.fx symbolic tracing keeps layers as ``call_module`` nodes and the model's own output
structure. Models whose ``forward`` has Python control flow on tensors (every Hugging Face
``*ForImageClassification`` checks its input's channels), reads sizes into Python ints or
builds modules on the fly cannot be traced that way; ``torch.export`` (non-strict: the Python
code runs, only tensor operations are recorded) survives all of that. Its ATen-level graph,
with batch, height and width left dynamic (``Dim.AUTO``), is turned into a plain
``fx.GraphModule`` (parameters as ``get_attr`` nodes, the guard checks dropped, outputs
returned flat) that the same analysis and rewrite read: ``graph.op_name`` gives ATen
operators the names of their ``torch`` functions. ``out_spec`` rebuilds the model's output
(a transformers ``ModelOutput``, a tuple, a dict) from the flat outputs.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn
from torch.utils._pytree import TreeSpec

from ...errors import NotConvolutionalizable, first_line
from . import graph as g
from .pt2e import Pt2eTracer, is_pt2e
from .script import is_script, lift, lifted_module, script_name

__all__ = ["Capture", "capture", "quiet_torch_logs"]

Method = Literal["torch.fx", "torch.export"]
QUIET_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch._export",
                 "torch.export", "torch._functorch", "torch._subclasses")


@dataclass
class Capture:
    """A model's graph, how it was captured, and (torch.export) how to rebuild its output."""

    gm: fx.GraphModule
    method: Method
    out_spec: TreeSpec | None = None
    fixed_size: bool = False  # torch.export specialised height and width to the native size


def capture(model: nn.Module, channels: int | None, input_size: tuple[int, int]) -> Capture:
    """The graph of ``model`` (eval mode, the adapter's private copy).

    ``channels`` is the image channel count for torch.export's example input when known
    beforehand; otherwise the first convolution's input channels are used.
    """
    if is_script(model):  # TorchScript: torch's converter lifts it to an exported program
        program, _ = lift(model, channels, input_size)
        return _captured(lifted_module(program, model), script_name(model), program.call_spec.out_spec)
    if isinstance(model, fx.GraphModule) and getattr(model, "_out_spec", None) is not None:
        # already exported (torch.export.load(...).module(), a .pt2 file): use its graph
        return _captured(model, type(model).__name__, model._out_spec)  # type: ignore[arg-type]
    try:
        return Capture(g.trace(model), "torch.fx")
    except NotConvolutionalizable as fx_error:
        known = channels or _first_conv_channels(model)
        if known is not None:
            return _export(model, known, input_size, str(fx_error))
        # convolutions outside the module tree: a convolution accepts only its own channel
        # count, so the image kind that exports is the one the model takes
        try:
            return _export(model, 3, input_size, str(fx_error))
        except NotConvolutionalizable:
            return _export(model, 1, input_size, str(fx_error))


def _first_conv_channels(model: nn.Module) -> int | None:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else int(conv.in_channels)


def _export(model: nn.Module, channels: int, input_size: tuple[int, int], fx_reason: str) -> Capture:
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    # batch 2: a batch of 1 would be specialised to 1 (export's 0/1 rule)
    example = torch.randn(2, channels, *input_size, generator=torch.Generator().manual_seed(0))
    dynamic = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    try:
        with torch.no_grad(), quiet_torch_logs():
            program = torch.export.export(model, (example.to(device, dtype),),
                                          dynamic_shapes=(dynamic,), strict=False)
    except Exception as exc:  # export raises many types (UserError, GuardOnDataDependent, ...)
        raise NotConvolutionalizable(
            f"{fx_reason}; torch.export cannot capture it either: {first_line(exc)}"
        ) from exc
    return _captured(program.module(), type(model).__name__, program.call_spec.out_spec)


def _captured(exported: fx.GraphModule, name: str, out_spec: TreeSpec) -> Capture:
    from torch.fx.experimental.symbolic_shapes import is_concrete_int  # imports sympy: only here

    image = next(n for n in exported.graph.nodes if n.op == "placeholder")
    value = image.meta.get("val")
    fixed = value is not None and all(is_concrete_int(d) for d in value.shape[-2:])
    return Capture(_plain_graph_module(exported, name), "torch.export", out_spec, fixed)


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """torch.export prints the partial graph to stderr when it fails, and its log handlers
    print warnings (guards, unbacked symbols); the library does not print, and a refusal
    says what failed."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, saved):
            logger.setLevel(level)


def _plain_graph_module(exported: fx.GraphModule, name: str) -> fx.GraphModule:
    """An exported module as a plain GraphModule: one tensor in, flat outputs out, no guards.

    The guard checks pin the input to the sizes seen at export; the converted model must
    run at any size, and the self-check after the rewrite tests the sizes it claims.
    """
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn"):
            graph.erase_node(node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise NotConvolutionalizable(f"the exported {name} takes {len(placeholders)} inputs; only a "
                                     "model with one image input can be converted")
    graph._codegen = fx.graph.CodeGen()  # flat outputs, no pytree (re)packing
    # export's tracer cannot be rebuilt when the module is unpickled; a pt2e graph's int8
    # weights must stay buffers when it is traced again there
    graph._tracer_cls = Pt2eTracer if is_pt2e(exported) else None
    graph._tracer_extras = None
    gm = fx.GraphModule(exported, graph, name)
    gm.delete_all_unused_submodules()
    return gm
