"""Columns of tiles in one pass down: every layer carries the rows its next rows share.

Tiles recompute their halo: for ShuffleNetV2 (263 + 232 pixels a side) a 2731-pixel tile
computes 1.4x the pixels it owns. A column of tiles shares those rows with its neighbours
above and below, so :class:`Stream` runs a traced body (``torch.fx``) over a column's rows
in chunks, top to bottom, the way a line-buffered image pipeline does: each convolution and
pool keeps the last rows of its input that its next output rows need (``kernel - stride``
of them, with its zero padding (``-inf`` for max pools) added above the first row and below
the last), each add or concatenation keeps the rows one branch has produced and the other
has not yet, and every other layer works on whatever rows reach it. Each row of every layer
is computed once; only the columns' halos (left and right) are computed twice, and a chunk
holds a few dozen to a few hundred rows at a time (as many as ``dense`` lets fit its piece
size), whatever the tile's size.

:func:`plan_stream` decides whether a body can run so, from what it does rather than what it
is called: two symbolic-free runs at different heights tell each tensor's row axis and
confirm that every layer either keeps its rows or is a convolution or pool of known
geometry (one of its ``ROW_LOCAL`` kinds: elementwise ops, channel concatenations and
splits, reshapes that keep the rows, channel shuffles, batch and layer norms over channels),
and a run in odd-sized chunks must give the one-pass output to float rounding. A body that
fails any of these (global context, an unknown layer, a crop that depends on the image's
size) is not streamed, and its tiles are computed as before.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_unflatten

from ..frameworks.torch.layers import ChannelLayerNorm, DilatedAvgPool2d, WindowPool, dilated_avg_pool2d
from . import _strips
from ._onednn import FusedConv

__all__ = ["Stream", "StreamPlan", "plan_stream"]

logger = logging.getLogger(__name__)

# the strips' pointwise layers, and layers that mix channels or columns (never rows) at each row
POINTWISE_MODULES = (*_strips.POINTWISE_MODULES, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Mish, nn.ELU,
                     nn.PReLU, nn.Dropout, nn.Dropout2d, nn.LayerNorm, ChannelLayerNorm, nn.Linear,
                     nn.Softmax, nn.LogSoftmax)
ROW_LOCAL_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg,
    operator.getitem, torch.add, torch.sub, torch.mul, torch.div, torch.cat, torch.concat, torch.chunk,
    torch.split, torch.transpose, torch.permute, torch.flatten, torch.reshape, torch.relu, torch.sigmoid,
    torch.tanh, torch.clamp, torch.softmax, torch.log_softmax, torch.neg, F.relu, F.relu6, F.silu, F.gelu,
    F.hardswish, F.hardsigmoid, F.sigmoid, F.leaky_relu, F.hardtanh, F.layer_norm, F.linear,
    F.softmax, F.log_softmax, F.dropout, F.mish,
}
ROW_LOCAL_METHODS = {
    "size", "dim", "view", "reshape", "permute", "transpose", "contiguous", "chunk", "split", "flatten",
    "add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "clamp", "float", "to", "type_as",
    "softmax", "log_softmax", "unsqueeze", "squeeze", "mean", "sum", "amax", "neg",
}
MIN_RUN = 4  # output rows a view-only run must have; shorter ones join the seams
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # of the output's largest magnitude


class NotStreamable(Exception):
    """Why a body cannot run as a stream (its tiles are computed one by one instead)."""


@dataclass(frozen=True)
class Spatial:
    """A layer that changes rows: ``kernel``, ``stride``, ``padding`` (above the first row and
    below the last, filled with ``fill``) and ``dilation`` along the rows; ``ceil`` for a
    ceil-mode max pool (its last window may hang past the padding); ``run`` is the layer with
    no padding along the rows, taking the input rows and ``aligned`` more tensors cut to its
    output rows (a fused residual)."""

    kernel: int
    stride: int
    padding: int
    dilation: int
    fill: float
    run: Callable[..., torch.Tensor]
    ceil: bool = False
    aligned: int = 0

    def reach(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    def rows_out(self, rows: int) -> int:
        """Output rows for ``rows`` input rows (PyTorch's size rule)."""
        span = rows + 2 * self.padding - self.reach()
        if not self.ceil:
            return span // self.stride + 1
        out = -(-span // self.stride) + 1
        return out - 1 if (out - 1) * self.stride >= rows + self.padding else out


@dataclass
class StreamPlan:
    """How to stream a body: which nodes depend on the input (stream), each one's row axis
    (negative; 0 for a value that is not a tensor, a size), the spatial layers' geometry, the
    nodes that align several streams, and where each value is used last."""

    net: fx.GraphModule
    nodes: list[fx.Node]
    streamed: set[fx.Node]
    axis: dict[fx.Node, int]  # the row axis of each streamed tensor (or tensors, for a tuple)
    spatial: dict[fx.Node, Spatial]
    aligned: dict[fx.Node, list[fx.Node]]  # row-local nodes with several streamed tensor inputs
    last_use: dict[fx.Node, int]
    out_spec: Any = None
    steps: list[tuple[fx.Node, str, list[fx.Node], list[fx.Node]]] = field(default_factory=list)
    leaves: list[fx.Node] = field(default_factory=list)  # the output's maps, as Stream.push returns them

    def __post_init__(self) -> None:
        """Each node's kind, streamed inputs and the streamed values freed after it (what
        :meth:`Stream.push` walks, worked out once), and the output's nodes."""
        self.leaves = [n for n in self.nodes[-1].all_input_nodes if n in self.streamed]
        for index, node in enumerate(self.nodes):
            kind = ("input" if node.op == "placeholder" else "output" if node.op == "output"
                    else "constant" if node not in self.streamed else "spatial" if node in self.spatial
                    else "aligned" if node in self.aligned else "local")
            inputs = [n for n in node.all_input_nodes if n in self.streamed]
            self.steps.append((node, kind, inputs, [n for n in inputs if self.last_use.get(n) == index]))

    def stream(self, gather: dict[fx.Node, int] | None = None) -> Stream:
        return Stream(self, gather)


def plan_stream(net: nn.Module, channels: int, size: tuple[int, int], stride: int,
                out_spec: Any = None) -> StreamPlan:
    """The plan for streaming ``net`` (a converted model's traced body of output stride
    ``stride``, whose output ``out_spec`` rebuilds), checked on inputs of ``channels`` and
    about ``size`` (the native input size) as the module docstring says.

    Raises:
        NotStreamable: the body does something a stream cannot reproduce (the message says what).
    """
    if not isinstance(net, fx.GraphModule):
        raise NotStreamable("the body is not a traced graph")
    nodes = list(net.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise NotStreamable(f"the body takes {len(inputs)} inputs")
    streamed: set[fx.Node] = set()
    for node in nodes:
        if node.op == "placeholder" or any(n in streamed for n in node.all_input_nodes):
            streamed.add(node)
    modules = dict(net.named_modules())
    spatial = {n: _spatial(n, modules) for n in nodes
               if n in streamed and n.op == "call_module" and _changes_rows(modules[n.target])}
    for node in nodes:
        if node in streamed and node not in spatial and node.op not in ("placeholder", "output"):
            _check_row_local(node, modules)
    height, width = size
    param = next(iter(net.parameters()), None)
    dtype = torch.float32 if param is None or not param.is_floating_point() else param.dtype
    device = torch.device("cpu") if param is None else param.device
    heights = (height + stride + 3, height + 2 * stride + 5)
    runs = [_values(net, torch.randn(1, channels, h, width + stride + 5, device=device, dtype=dtype))
            for h in heights]
    axis: dict[fx.Node, int] = {}
    aligned: dict[fx.Node, list[fx.Node]] = {}
    for node in nodes:
        if node not in streamed or node.op == "output":
            continue
        axis[node] = _row_axis(node, runs[0][node], runs[1][node])
        if node in spatial:
            for run in runs:
                rows = run[node.all_input_nodes[0]].shape[-2]
                if run[node].shape[-2] != spatial[node].rows_out(rows) or axis[node] != -2:
                    raise NotStreamable(f"{node.name}'s output rows do not follow its geometry")
            continue
        tensors = [n for n in node.all_input_nodes if n in streamed and _is_tensors(runs[0][n])]
        for run in runs:
            if _is_tensors(run[node]) and any(_rows(run[n], axis[n]) != _rows(run[node], axis[node])
                                              for n in tensors):
                raise NotStreamable(f"{node.name} changes the number of rows")
        if len(tensors) > 1:
            if any(n in streamed and not _is_tensors(runs[0][n]) for n in node.all_input_nodes):
                raise NotStreamable(f"{node.name} mixes several streams with sizes taken from one")
            aligned[node] = tensors
    output = nodes[-1]
    outs = [n for n in output.all_input_nodes if n in streamed]
    if len(outs) != len(output.all_input_nodes) or not outs or any(axis[n] != -2 for n in outs):
        raise NotStreamable("the output is not a map with rows")
    last_use = {}
    for index, node in enumerate(nodes):
        for n in node.all_input_nodes:
            last_use[n] = index
    plan = StreamPlan(net, nodes, streamed, axis, spatial, aligned, last_use, out_spec)
    _check_chunked(plan, channels, heights[1] + 2 * stride + 2, width + 3, dtype, device)
    return plan


def _changes_rows(module: nn.Module) -> bool:
    return isinstance(module, (FusedConv, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, WindowPool,
                               DilatedAvgPool2d))


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _rowwise_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` sharing its weights, with no padding along the rows."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise NotStreamable(f"a convolution with padding {conv.padding!r} ({conv.padding_mode})")
    rows = copy.copy(conv)
    rows.padding = (0, conv.padding[1])
    return rows


def _spatial(node: fx.Node, modules: dict[str, nn.Module]) -> Spatial:
    """The row geometry of a convolution or pool node, and the layer without row padding."""
    module = modules[node.target]  # type: ignore[index]
    if isinstance(module, FusedConv):
        fused = copy.copy(module)  # its own module dict (the conv is replaced), shared weights
        fused._modules = dict(module._modules)
        fused.conv = _rowwise_conv(module.conv)
        conv = module.conv
        return Spatial(conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0], 0.0,
                       fused, aligned=int(module.residual))
    if isinstance(module, nn.Conv2d):
        if len(node.args) != 1 or node.kwargs:
            raise NotStreamable(f"{node.name} takes more than its input")
        conv = module
        return Spatial(conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0], 0.0,
                       _rowwise_conv(conv))
    if isinstance(module, nn.MaxPool2d):
        (kh, kw), (ph, pw), (dh, dw) = (_pair(v) for v in
                                        (module.kernel_size, module.padding, module.dilation))
        sh, sw = _pair(module.stride or module.kernel_size)
        ceil = module.ceil_mode

        def run_max(x: torch.Tensor) -> torch.Tensor:
            return F.max_pool2d(x, (kh, kw), (sh, sw), (0, pw), (dh, dw), ceil_mode=ceil)
        return Spatial(kh, sh, ph, dh, -math.inf, run_max, ceil=ceil)
    if isinstance(module, nn.AvgPool2d):
        (kh, kw), (ph, pw) = _pair(module.kernel_size), _pair(module.padding)
        sh, sw = _pair(module.stride or module.kernel_size)
        if module.ceil_mode or (ph and not module.count_include_pad) or module.divisor_override:
            raise NotStreamable(f"{node.name}: an average pool whose divisor depends on the image's edge")

        def run_avg(x: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(x, (kh, kw), (sh, sw), (0, pw), count_include_pad=module.count_include_pad)
        return Spatial(kh, sh, ph, 1, 0.0, run_avg)
    if isinstance(module, WindowPool):
        if module.permute is not None or module.kernel is None:
            raise NotStreamable(f"{node.name}: a permuting or empty window pool")
        return Spatial(module.kernel[0], 1, 0, module.dilation[0], 0.0, module)
    if isinstance(module, DilatedAvgPool2d):
        (ph, pw), (ey, ex) = module.padding, module.extra
        if ey or (ph and not module.count_include_pad):
            raise NotStreamable(f"{node.name}: a dilated pool whose divisor depends on the image's edge")

        def run_dilated(x: torch.Tensor) -> torch.Tensor:
            return dilated_avg_pool2d(x, module.kernel, module.dilation, (0, pw), module.count_include_pad,
                                      (0, ex))
        return Spatial(module.kernel[0], 1, ph, module.dilation[0], 0.0, run_dilated)
    raise NotStreamable(f"{node.name}: {type(module).__name__}")  # pragma: no cover - _changes_rows


def _check_row_local(node: fx.Node, modules: dict[str, nn.Module]) -> None:
    """Whether ``node`` is of a kind that works row by row (its rows are checked later)."""
    if node.op == "call_module":
        if isinstance(modules[node.target], POINTWISE_MODULES):  # type: ignore[index]
            return
        raise NotStreamable(f"{node.name}: {type(modules[node.target]).__name__}")  # type: ignore[index]
    if node.op == "call_function" and node.target in ROW_LOCAL_FUNCTIONS:
        return
    if node.op == "call_method" and node.target in ROW_LOCAL_METHODS:
        return
    raise NotStreamable(f"{node.name}: {node.op} {node.target}")


def _values(net: fx.GraphModule, x: torch.Tensor) -> dict[fx.Node, Any]:
    """Every node's value for input ``x``."""
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n] = super().run_node(n)
            return values[n]

    with torch.inference_mode():
        Recorder(net).run(x)
    return values


def _is_tensors(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or (
        isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value))


def _first(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else value[0]


def _row_axis(node: fx.Node, one: Any, two: Any) -> int:
    """The (negative) axis of ``node``'s tensors that grows with the input's rows; for other
    values (sizes, counts) 0."""
    if not _is_tensors(one):
        return 0
    a, b = _first(one).shape, _first(two).shape
    changed = [i - len(a) for i in range(len(a)) if a[i] != b[i]] if len(a) == len(b) else None
    if changed is None or len(changed) != 1:
        raise NotStreamable(f"{node.name}'s value {tuple(a)} does not have one axis of rows")
    return changed[0]


def _rows(value: Any, axis: int) -> int | None:
    return _first(value).shape[axis] if _is_tensors(value) else None


def _check_chunked(plan: StreamPlan, channels: int, height: int, width: int, dtype: torch.dtype,
                   device: torch.device) -> None:
    """Stream a random input in odd-sized chunks and compare with the one pass."""
    x = torch.randn(1, channels, height, width, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    whole = _values(plan.net, x)
    with torch.inference_mode():
        stream, parts, start = plan.stream(), [], 0
        for rows in (1, 5, 33, 64, 2):
            parts.append(stream.push(x[:, :, start:start + rows]))
            start += rows
        parts.append(stream.push(x[:, :, start:], last=True))
    for i, leaf in enumerate(plan.leaves):
        got, want = torch.cat([p[i] for p in parts if p is not None], -2).float(), whole[leaf].float()
        scale = float(want.abs().max()) or 1.0
        tolerance = CHECK_TOLERANCE.get(dtype, 3e-2) * scale
        if got.shape != want.shape or float((got - want).abs().max()) > tolerance:
            raise NotStreamable("the streamed map differs from the one pass")


@dataclass
class _Rows:
    """Rows ``[start, end)`` of one stream along ``axis``, held as the pieces that arrived."""

    axis: int
    start: int = 0
    end: int = 0
    pieces: list[torch.Tensor] = field(default_factory=list)
    like: torch.Tensor | None = None  # no rows, the pieces' other sizes, dtype and layout

    def add(self, tensor: torch.Tensor, front: bool = False) -> None:
        """Append rows (``front``: put them before the first, as padding above)."""
        if not self.pieces:
            self.start = self.end
        if self.like is None:
            self.like = torch.empty_like(tensor.narrow(self.axis, 0, 0))
        if front:
            self.pieces.insert(0, tensor)
            self.start -= tensor.shape[self.axis]
        else:
            self.pieces.append(tensor)
            self.end += tensor.shape[self.axis]

    def spans(self) -> list[tuple[int, int]]:
        """Each piece's rows."""
        out, at = [], self.start
        for piece in self.pieces:
            out.append((at, at + piece.shape[self.axis]))
            at = out[-1][1]
        return out

    def take(self, a: int, b: int) -> torch.Tensor:
        """Rows ``[a, b)`` (inside what is held) as one tensor: a view when one piece holds
        them, else a copy."""
        out, at = [], self.start
        for piece in self.pieces:
            n = piece.shape[self.axis]
            lo, hi = max(a - at, 0), min(b - at, n)
            if lo < hi:
                out.append(piece if (lo, hi) == (0, n) else piece.narrow(self.axis, lo, hi - lo))
            at += n
        return out[0] if len(out) == 1 else torch.cat(out, self.axis)

    def drop(self, a: int) -> None:
        """Forget the rows before ``a``."""
        while self.pieces and self.start + self.pieces[0].shape[self.axis] <= a:
            self.start += self.pieces.pop(0).shape[self.axis]
        if self.pieces and a > self.start:
            first, cut = self.pieces[0], a - self.start
            kept = first.narrow(self.axis, cut, first.shape[self.axis] - cut)
            # a few rows kept as a view would keep the whole piece's memory: copy them
            self.pieces[0] = kept.clone() if 4 * kept.shape[self.axis] < first.shape[self.axis] else kept
            self.start = a
        if not self.pieces:
            self.start = self.end


class _Pieces(list):
    """A streamed node's value in one push: its new rows in consecutive pieces (for a size or a
    tuple, one value per piece of the tensor it was taken from)."""


@dataclass(frozen=True)
class _Reads:
    """How a node's output row ``o`` reads one input: rows ``[o * stride + offset, ... + reach)``."""

    held: _Rows
    stride: int = 1
    offset: int = 0
    reach: int = 1

    def rows(self, a: int, b: int) -> torch.Tensor:
        """The input rows that output rows ``[a, b)`` read."""
        return self.held.take(a * self.stride + self.offset, (b - 1) * self.stride + self.offset + self.reach)


def _groups(o0: int, o1: int, reads: list[_Reads]) -> list[tuple[int, int]]:
    """Output rows ``[o0, o1)`` in runs that each read inside one piece of every input (views,
    no copy), and between them the short seams that read across pieces (a small copy);
    runs shorter than ``MIN_RUN`` join the seams (fewer, larger calls)."""
    cuts, clean = {o0, o1}, []
    for r in reads:
        runs = []
        for u, v in r.held.spans():
            a, b = max(-(-(u - r.offset) // r.stride), o0), min((v - r.reach - r.offset) // r.stride + 1, o1)
            if a < b:
                runs.append((a, b))
                cuts.update((a, b))
        clean.append(runs)
    points, groups, seam = sorted(cuts), [], None
    for a, b in itertools.pairwise(points):
        inside = all(any(x <= a and b <= y for x, y in runs) for runs in clean)
        if inside and b - a >= MIN_RUN:
            if seam is not None:
                groups.append(seam)
                seam = None
            groups.append((a, b))
        else:
            seam = (a, b) if seam is None else (seam[0], b)
    if seam is not None:
        groups.append(seam)
    return groups


class Stream:
    """One pass of a :class:`StreamPlan` down an input: :meth:`push` its rows in chunks."""

    def __init__(self, plan: StreamPlan, gather: dict[fx.Node, int] | None = None) -> None:
        self.plan = plan
        self.gather = gather or {}  # node -> rows it gathers into one piece before passing them on
        self.held: dict[tuple[fx.Node, int], _Rows] = {}  # (node, input index) -> rows held
        self.produced: dict[fx.Node, int] = {}  # rows each spatial or aligned node has output
        self.constants: dict[fx.Node, Any] = {}

    def push(self, x: torch.Tensor, last: bool = False) -> tuple[torch.Tensor, ...] | None:
        """Feed the next rows (``(N, C, rows, W)``); returns the output's next rows (one tensor
        per output map, in the output's order), ``None`` when none are ready yet. The last
        push (``last=True``) adds the bottom padding and returns every row left."""
        plan, env = self.plan, {}
        for node, kind, inputs, frees in plan.steps:
            if kind == "input":
                env[node] = _Pieces([x] if x.shape[-2] else [])
            elif kind == "output":
                pieces = self._aligned(node, env, plan.leaves, lambda *v: v)
                if not pieces:
                    return None
                return tuple(torch.cat([p[i] for p in pieces], -2) if len(pieces) > 1 else pieces[0][i]
                             for i in range(len(pieces[0])))
            elif kind == "constant":
                if node not in self.constants:
                    self.constants[node] = self._call(node, env)
                env[node] = self.constants[node]
            elif not last and not any(env[n] for n in inputs):
                env[node] = _Pieces()  # nothing new reached this node: nothing new leaves it
            elif kind == "spatial":
                env[node] = self._spatial(node, env, last)
            elif kind == "aligned":
                env[node] = self._aligned(node, env, plan.aligned[node], None)
            elif all(env[n] for n in inputs):
                env[node] = self._per_piece(node, env, inputs)
            else:
                env[node] = _Pieces()
            if node in self.gather:
                env[node] = self._gathered(node, env[node], last)
            for n in frees:
                del env[n]  # free each chunk once its last user has run
        raise AssertionError("the graph has no output")  # pragma: no cover

    def _gathered(self, node: fx.Node, pieces: _Pieces, last: bool) -> _Pieces:
        """``node``'s rows passed on in one piece once there are ``gather[node]`` of them."""
        held = self._hold(node, -1, node, pieces)
        if held.end - held.start < self.gather[node] and not (last and held.pieces):
            return _Pieces()
        out = _Pieces([held.take(held.start, held.end)])
        held.drop(held.end)
        return out

    def _per_piece(self, node: fx.Node, env: dict[fx.Node, Any], streams: list[fx.Node]) -> _Pieces:
        """A row-local node of one stream: run on each piece."""
        counts = {len(env[n]) for n in streams}
        if len(counts) != 1:
            raise RuntimeError(f"{node.name}: its inputs arrive in different pieces")
        return _Pieces(self._call(node, env, {n: env[n][i] for n in streams}) for i in range(counts.pop()))

    def _call(self, node: fx.Node, env: dict[fx.Node, Any], given: dict[fx.Node, Any] | None = None) -> Any:
        def value(n: fx.Node) -> Any:
            if given is not None and n in given:
                return given[n]
            return env[n] if n in env else self.constants[n]
        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if node.op == "call_module":
            return self.plan.net.get_submodule(node.target)(*args, **kwargs)  # type: ignore[arg-type]
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)  # type: ignore[arg-type]
        if node.op == "get_attr":
            found: Any = self.plan.net
            for name in node.target.split("."):  # type: ignore[union-attr]
                found = getattr(found, name)
            return found
        return node.target(*args, **kwargs)  # type: ignore[operator]

    def _hold(self, node: fx.Node, index: int, source: fx.Node, pieces: _Pieces) -> _Rows:
        held = self.held.get((node, index))
        if held is None:
            held = self.held[(node, index)] = _Rows(self.plan.axis.get(source, -2))
        for piece in pieces:
            held.add(piece)
        return held

    def _aligned(self, node: fx.Node, env: dict[fx.Node, Any], inputs: list[fx.Node],
                 combine: Callable[..., Any] | None) -> _Pieces:
        """A node of several streams: run on the rows all of them have reached."""
        held = [self._hold(node, i, n, env[n]) for i, n in enumerate(inputs)]
        a, b = self.produced.get(node, 0), min(h.end for h in held)
        if b <= a:
            return _Pieces()
        reads = [_Reads(h) for h in held]
        out = _Pieces()
        for ga, gb in _groups(a, b, reads):
            rows = [r.rows(ga, gb) for r in reads]
            out.append(combine(*rows) if combine is not None
                       else self._call(node, env, dict(zip(inputs, rows, strict=True))))
        for h in held:
            h.drop(b)
        self.produced[node] = b
        return out

    def _spatial(self, node: fx.Node, env: dict[fx.Node, Any], last: bool) -> _Pieces:
        """A convolution or pool: every output row whose input rows (and aligned rows) are here."""
        layer = self.plan.spatial[node]
        source, extras = node.args[0], node.args[1:1 + layer.aligned]
        extra_held = [self._hold(node, i + 1, n, env[n]) for i, n in enumerate(extras)]  # before any return
        fresh = (node, 0) not in self.held
        held = self._hold(node, 0, source, env[source])
        if fresh:
            if not held.pieces:
                del self.held[(node, 0)]
                return _Pieces()
            if layer.padding:  # the padding above the first row
                held.add(_fill_rows(held.like, layer.padding, layer.fill), front=True)
        rows = held.end
        if last:  # the padding below the last row, and a ceil-mode pool's overhang
            total = layer.rows_out(rows)
            below = (total - 1) * layer.stride + layer.reach() - layer.padding - rows
            if below > 0:
                held.add(_fill_rows(held.like, below, layer.fill))
        o0 = self.produced.get(node, 0)
        o1 = max((held.end + layer.padding - layer.reach()) // layer.stride + 1, 0)
        if last:
            o1 = min(o1, layer.rows_out(rows))
        for h in extra_held:
            o1 = min(o1, h.end)
        if o1 <= o0:
            return _Pieces()
        reads = [_Reads(held, layer.stride, -layer.padding, layer.reach()), *(_Reads(h) for h in extra_held)]
        out = _Pieces(layer.run(*(r.rows(ga, gb) for r in reads)) for ga, gb in _groups(o0, o1, reads))
        held.drop(o1 * layer.stride - layer.padding)
        for h in extra_held:
            h.drop(o1)
        self.produced[node] = o1
        return out


def _fill_rows(like: torch.Tensor | None, rows: int, fill: float) -> torch.Tensor:
    assert like is not None
    shape = (*like.shape[:-2], rows, like.shape[-1])
    out = torch.full(shape, fill, dtype=like.dtype, device=like.device)
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def assemble(plan: StreamPlan, leaves: tuple[torch.Tensor, ...]) -> Any:
    """The model's output built from the output leaves' rows (its tuple, dict or ModelOutput)."""
    by_node = dict(zip(plan.leaves, leaves))
    out = fx.node.map_arg(plan.nodes[-1].args[0], lambda n: by_node[n])
    return out if plan.out_spec is None else tree_unflatten(list(out), plan.out_spec)
