"""What ``dense_map`` needs from a converted model, per framework, and running it on tiles.

:func:`dense_model` wraps a converted PyTorch, Keras or ONNX model in one small adapter that
gives the rest of ``dense_map`` the same things: the geometry, the image channels, shapes at
an input size without computing anything (the map size and the memory budget), a runner
that scores batches of tiles (and pickles, for dask workers), and a digest of the model that
a resumed run must match.

``TileRunner`` is what travels to workers (it pickles with its model): a copy of the
converted model with its batch norms folded into the convolutions before them (``torch.fx``
``fuse``: one pass over the activations fewer, 5-10 % faster in float32) in the channels-last
memory format (about 1.3x faster for float32 convolutions on this CPU). Both change only the
rounding (relative 1e-6 against the converted model). On CPU its convolutions then run
oneDNN's fused op with packed weights, ReLUs and residual adds as post-ops (:mod:`._onednn`;
``CONVOLUTIONALIZE_FUSION=0`` in the environment turns that off). It moves a batch to the
device and returns float32 numpy. For ``precision="bf16"`` the weights are also stored in
bfloat16 and the model runs under bfloat16 autocast, which uses AMX on CPUs that have it (and
bf16 tensor cores on CUDA). :meth:`TileRunner.column` streams one column of tiles through the
same prepared body, top to bottom (:mod:`._stream`), where :meth:`TileRunner.stream_plan` says
the body can be streamed.

A model with several outputs (a tuple, dict, dataclass or ``ModelOutput`` of maps) is scored
on the one its ``output`` names (:func:`~convolutionalize.outputs.select_output`); ``"all"``
stacks every output's map along the channels, in :func:`~convolutionalize.outputs.output_keys`
order, so tiles, sinks and dask see one map that ``dense_map`` splits at the end. Keras and
ONNX models are mapped on one output at a time, by index.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import fx, nn

from ..api import geometry_of
from ..errors import first_line
from ..frameworks import adapter_for, adapter_named
from ..frameworks.base import Adapter
from ..geometry import Geometry
from ..outputs import OutputKey, output_keys, select_output
from ._cache import CACHE
from ._onednn import fuse_convolutions
from ._stream import NotStreamable, Stream, StreamPlan, assemble, plan_stream
from ._strips import StripNet, plan_strips

__all__ = ["ALL", "Column", "DenseModel", "FrameworkRunner", "OutputChoice", "Precision", "Runner",
           "TileRunner", "dense_model", "runner_for"]

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]
Runner = Callable[[Any], np.ndarray]  # a batch (N, C, H, W) -> its maps (N, classes, rows, cols)
ALL = "all"  # output=ALL: every output's map, stacked along the channels
OutputChoice = OutputKey | Literal["all"]
Shape = tuple[int, ...]


class TileRunner:
    """A converted model ready to score tiles: ``runner(batch) -> (N, classes, rows, cols)``,
    the map of output ``output`` (see the module docstring)."""

    def __init__(self, model: nn.Module, precision: Precision, device: torch.device,
                 fuse: bool = True, output: OutputChoice = None, strips: bool = True) -> None:
        model = _fold_batch_norms(copy.deepcopy(model).eval().to(device))  # never touch the caller's
        if precision == "bf16":
            model = model.to(torch.bfloat16)
        self.model = model.to(memory_format=torch.channels_last)
        if fuse and device.type == "cpu" and isinstance(getattr(model, "net", None), fx.GraphModule):
            fuse_convolutions(model.net)
        self.body = getattr(model, "net", None)  # the traced body, unwrapped (what columns stream)
        self.stem = plan_strips(self.body)
        if strips and self.stem is not None:  # large tiles run the stem in strips (same numbers, less memory)
            model.net = StripNet(model.net, self.stem)
        self.precision = precision
        self.device = device
        self.output = output
        self._streams: dict[str, StreamPlan | None] = {}  # shared by for_output's copies

    def for_output(self, output: OutputChoice) -> TileRunner:
        """This runner scoring ``output`` instead: the prepared model is shared, not copied."""
        runner = copy.copy(self)
        runner.output = output
        return runner

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), self._autocast():
            return self._maps(self.model(self._prepare(batch)))

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        if self.precision == "bf16":  # then channels-last: 1.7x faster than both in one copy (measured)
            batch = batch.to(torch.bfloat16)
        return batch.contiguous(memory_format=torch.channels_last)

    def _maps(self, out: Any) -> np.ndarray:
        if self.output == ALL:
            maps = torch.cat([_as_map(select_output(out, key)) for key in output_keys(out)], 1)
        else:
            maps = _as_map(select_output(out, self.output))
        return maps.float().cpu().numpy()

    def stream_plan(self) -> StreamPlan | None:
        """How the body streams down a column (:mod:`._stream`), planned and checked once;
        ``None`` where it cannot (its tiles are then computed one by one)."""
        if "plan" not in self._streams:
            model, plan = self.model, None
            try:
                with torch.inference_mode(), self._autocast():
                    plan = plan_stream(self.body, model.plan.in_channels,  # type: ignore[union-attr]
                                       model.geometry.input_size, max(model.geometry.stride),  # type: ignore[union-attr]
                                       getattr(model, "out_spec", None))
            except NotStreamable as exc:
                logger.info("tiles are computed one by one, not streamed: %s", exc)
            except Exception as exc:  # a body the analysis cannot run: tiles, as correct
                logger.info("tiles are computed one by one, not streamed (%s: %s)", type(exc).__name__, exc)
            self._streams["plan"] = plan
        return self._streams["plan"]

    def column(self, gather_rows: int) -> Column:
        """A fresh stream down one column of tiles; the stem's output (the first quarter-
        resolution tensor) is passed on in blocks of ``gather_rows`` input rows."""
        plan = self.stream_plan()
        assert plan is not None, "stream_plan() said this body does not stream"
        gather = {}
        if self.stem is not None:
            cut = next(n for n in plan.nodes if n.name == self.stem.cut)
            gather[cut] = max(gather_rows // self.stem.stride, 1)
        return Column(self, plan, plan.stream(gather))

    def __getstate__(self) -> dict[str, Any]:  # stream plans hold graph nodes: planned again where used
        return {**self.__dict__, "_streams": {}}

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.precision == "fp32":
            yield
            return
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            yield


class Column:
    """One column's stream: :meth:`push` the next rows of the image, get the map's next rows."""

    def __init__(self, runner: TileRunner, plan: StreamPlan, stream: Stream) -> None:
        self.runner, self.plan, self.stream = runner, plan, stream

    def push(self, block: torch.Tensor, last: bool = False) -> np.ndarray | None:
        """``block`` (``(C, rows, W)``, the next rows) in; the map rows now complete out
        (``(classes, rows, cols)``), or ``None``; ``last`` ends the column."""
        runner = self.runner
        with torch.inference_mode(), runner._autocast():
            leaves = self.stream.push(runner._prepare(block[None]), last)
            return None if leaves is None else runner._maps(assemble(self.plan, leaves))[0]


def _as_map(out: torch.Tensor) -> torch.Tensor:
    """``(N, classes, rows, cols)``; pool="global" gives one prediction per image, a 1x1 map."""
    return out[:, :, None, None] if out.dim() == 2 else out


def runner_for(model: nn.Module, precision: Precision, device: torch.device,
               output: OutputChoice = None) -> TileRunner:
    """A :class:`TileRunner` for ``model``, reused across calls while the weights are unchanged.

    Preparing a runner (copy, fold, channels-last; for bf16 also cast) can cost as much as
    one forward pass of a 768x768 image; repeated calls on the same model skip it, and runners
    of other outputs share the prepared model. In-place weight updates bump the parameters'
    version counters and invalidate the cached runners.
    """
    fuse = os.environ.get("CONVOLUTIONALIZE_FUSION", "1") != "0"  # the oneDNN fast path's switch
    strips = os.environ.get("CONVOLUTIONALIZE_STRIPS", "1") != "0"  # the stem in strips (._strips)
    prepared = (precision, str(device), fuse, strips)
    state = weights_state(model)
    runners = {k: r for k, (s, r) in CACHE.runners.get(model, {}).items() if s == state}
    runner = runners.get((*prepared, output))
    if runner is None:
        same = next((r for k, r in runners.items() if k[:4] == prepared), None)
        runner = (same.for_output(output) if same is not None
                  else TileRunner(model, precision, device, fuse, output, strips))
        held = CACHE.runners.setdefault(model, {})
        for stale in [k for k, (s, _) in held.items() if s != state]:
            del held[stale]  # made for weights since changed
        held[(*prepared, output)] = (state, runner)
    return runner


def weights_state(model: nn.Module) -> tuple:
    """What a model's weights are now: each tensor's storage and version counter."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def _fold_batch_norms(model: nn.Module) -> nn.Module:
    """Batch norms folded into the convolutions before them, where fx can trace the body."""
    from torch.fx.experimental.optimization import fuse

    net = getattr(model, "net", None)
    if isinstance(net, nn.Module):
        try:
            model.net = fuse(net, inplace=True, no_trace=True)  # its own graph: no retrace
        except Exception as exc:  # an untraceable body keeps its batch norms: slower, as correct
            logger.info("batch norms not folded (%s)", exc)
    return model


class DenseModel:
    """A converted model as ``dense_map`` sees it (subclassed per framework), scoring the
    output ``output`` (``"all"``: every output, stacked along the channels)."""

    def __init__(self, model: Any, channels: int, shapes: dict | None = None,
                 output: OutputChoice = None) -> None:
        self.model = model
        self.geometry: Geometry = geometry_of(model)
        self.channels = channels
        self.output = output
        self._shapes: dict[tuple[int, int], tuple[tuple[int, ...], list[int]]] = \
            {} if shapes is None else shapes

    def shapes(self, size: tuple[int, int]) -> tuple[tuple[int, ...], list[int]]:
        """The output shape (without batch; ``(classes, rows, cols)`` or ``(classes,)``) of a
        ``size`` input, and the element counts of the intermediate tensors, without computing.
        Remembered per size (see :func:`dense_model`).

        Raises:
            ValueError: the network does not run at ``size`` (DLA's shortcuts, for one, need
                sides that halve evenly down to its stride).
        """
        if size not in self._shapes:
            try:
                self._shapes[size] = self.infer_shapes(size)
            except RuntimeError as exc:  # the network's own shape check, deep inside it
                stride = self.geometry.stride
                fits = "x".join(str(max(n // s * s, w))
                                for n, s, w in zip(size, stride, self.geometry.window, strict=True))
                raise ValueError(f"the converted model does not run on a {size[0]}x{size[1]} input "
                                 f"({first_line(exc)}); "
                                 f"crop or pad the image to sides that are multiples of its stride "
                                 f"{stride[0]}x{stride[1]}, e.g. {fits}") from exc
        return self._shapes[size]

    def infer_shapes(self, size: tuple[int, int]) -> tuple[tuple[int, ...], list[int]]:
        raise NotImplementedError

    def runner(self, precision: Precision, device: torch.device) -> Runner:
        """A picklable runner in ``precision`` on ``device``."""
        raise NotImplementedError

    def parts(self, size: tuple[int, int]) -> list[tuple[int | str, int]]:
        """For ``output="all"``: each output's key and channel count, in the stacked map's order."""
        raise NotImplementedError

    def digest(self) -> str:
        """A short hash of the model's structure and weights."""
        raise NotImplementedError

    def map_shape(self, size: tuple[int, int]) -> tuple[int, int, int]:
        out, _ = self.shapes(size)
        return (out[0], 1, 1) if len(out) == 1 else (out[0], out[1], out[2])

    def bytes_per_pixel(self, size: tuple[int, int]) -> float:
        """Activation bytes per input pixel at ``size``: the two largest intermediate tensors
        plus the input, float32; an estimate of what a forward pass keeps alive at once."""
        _, counts = self.shapes(size)
        area = size[0] * size[1]
        largest = sorted(counts, reverse=True)[:2] or [8 * self.channels * area]
        return 4.0 * (sum(largest) + self.channels * area) / area


class TorchModel(DenseModel):
    def __init__(self, model: nn.Module, shapes: dict, outputs: dict, output: OutputChoice) -> None:
        super().__init__(model, model.plan.in_channels, shapes, output)  # type: ignore[union-attr]
        self._outputs: dict[tuple[int, int], tuple[dict[int | str, Shape], list[int]]] = outputs

    def infer_shapes(self, size: tuple[int, int]) -> tuple[tuple[int, ...], list[int]]:
        from ..frameworks.torch.layers import activation_shapes

        if self.output != ALL:
            return activation_shapes(self.model, self.channels, size, self.output)
        shapes, counts = self.output_shapes(size)
        return _stacked(shapes), counts

    def output_shapes(self, size: tuple[int, int]) -> tuple[dict[int | str, Shape], list[int]]:
        """Every output's shape (without batch) at ``size`` by key, and the element counts of
        the intermediate tensors: one symbolic pass, remembered per size."""
        if size not in self._outputs:
            self._outputs[size] = _output_shapes(self.model, self.channels, size)
        return self._outputs[size]

    def parts(self, size: tuple[int, int]) -> list[tuple[int | str, int]]:
        return [(key, shape[0]) for key, shape in self.output_shapes(size)[0].items()]

    def runner(self, precision: Precision, device: torch.device) -> TileRunner:
        return runner_for(self.model, precision, device, self.output)

    def bytes_per_pixel(self, size: tuple[int, int]) -> float:
        """As :meth:`DenseModel.bytes_per_pixel`; where the runner runs the stem in strips
        (:mod:`._strips`), the stem's activations other than its output are not counted."""
        counts, cut = self._stem_split(size)
        if cut is None or os.environ.get("CONVOLUTIONALIZE_STRIPS", "1") == "0":
            return super().bytes_per_pixel(size)
        area = size[0] * size[1]
        rest = sorted(counts[cut:], reverse=True)[:2]
        return 4.0 * (sum(rest) + counts[cut - 1] + self.channels * area) / area

    def largest_per_pixel(self, size: tuple[int, int]) -> tuple[float, float]:
        """Bytes per input pixel (float32) of the largest single activation at ``size`` in the
        stem (:mod:`._strips`; the whole body where it has none) and after it."""
        counts, cut = self._stem_split(size)
        cut = len(counts) if cut is None else cut
        area = size[0] * size[1]
        stem, rest = counts[:cut] or [8 * self.channels * area], counts[cut:] or counts[-1:] or [area]
        return 4.0 * max(stem) / area, 4.0 * max(rest) / area

    def _stem_split(self, size: tuple[int, int]) -> tuple[list[int], int | None]:
        """The leaf modules' element counts at ``size``, and how many of them the stem holds
        (``None`` where there is no stem, or nothing after it)."""
        _, counts = self.shapes(size)
        plan = plan_strips(getattr(self.model, "net", None))
        return counts, (plan.modules if plan is not None and len(counts) > plan.modules else None)

    def digest(self) -> str:
        digest = hashlib.sha1(repr(self.model).encode())
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            if tensor.numel():
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        return digest.hexdigest()[:16]


def _output_shapes(model: nn.Module, channels: int,
                   size: tuple[int, int]) -> tuple[dict[int | str, Shape], list[int]]:
    """``activation_shapes``, also catching the model's whole output (a hook on the model)."""
    from ..frameworks.torch.layers import activation_shapes

    caught: list[Any] = []
    hook = model.register_forward_hook(lambda _m, _a, out: caught.append(out))
    try:
        _, counts = activation_shapes(model, channels, size)
    finally:
        hook.remove()
    out = caught[-1]  # the symbolic pass that succeeded
    return {key: tuple(select_output(out, key).shape[1:]) for key in output_keys(out)}, counts


def _stacked(shapes: dict[int | str, Shape]) -> Shape:
    """The shape of every output's map stacked along the channels (``output="all"``)."""
    grids = {shape[1:] for shape in shapes.values()}
    if len(grids) != 1 or any(len(shape) not in (1, 3) for shape in shapes.values()):
        listed = ", ".join(f"{key!r}: {shape}" for key, shape in shapes.items())
        raise ValueError(f'output="all" needs every output to be a map on one grid, got {listed}; '
                         "pick the outputs one by one with output=KEY")
    return (sum(shape[0] for shape in shapes.values()), *grids.pop())


class FrameworkModel(DenseModel):
    """A Keras or ONNX model: shapes, runs and digests in its own framework (float32, CPU),
    through its adapter."""

    def __init__(self, model: Any, adapter: Adapter, shapes: dict | None = None, output: int = 0) -> None:
        super().__init__(model, adapter.input_channels(model), shapes)
        self.framework, self.name, self.output = adapter, adapter.name, output
        self._runner: FrameworkRunner | None = None

    def infer_shapes(self, size: tuple[int, int]) -> tuple[tuple[int, ...], list[int]]:
        return self.framework.activation_shapes(self.model, size, self.output)

    def runner(self, precision: Precision, device: torch.device) -> FrameworkRunner:
        if precision != "fp32":
            raise ValueError(f'precision="{precision}" runs PyTorch models only; {self.name} models '
                             "run in float32 (leave precision out)")
        if device.type != "cpu":
            raise ValueError(f"device={str(device)!r} applies to PyTorch models; {self.name} models "
                             "run where their framework places them (leave device out)")
        if self._runner is None:  # one onnxruntime session (or Keras model) for every map
            self._runner = FrameworkRunner(self.model, self.output)
        return self._runner

    def digest(self) -> str:
        return self.framework.digest(self.model)


def dense_model(fcn: Any, output: OutputChoice = None) -> DenseModel:
    """What ``dense_map`` needs of a converted model of any framework (its adapter's
    :class:`DenseModel`), scoring ``output``. Repeated maps of one model reuse its shapes per
    output (a symbolic pass costs 20-100 ms), and for ONNX its onnxruntime session too (for
    ResNet-18 at 768x768 a new session and symbolic shapes cost 0.2 s, as much as the map):
    :mod:`._cache` says for how long. Weights edited in place in an ONNX proto already mapped
    are not noticed: pass a copy instead.
    """
    return adapter_for(fcn).dense_model(fcn, output)


def output_index(output: OutputChoice, count: int, name: str) -> int:
    """Keras and ONNX models are mapped on one output at a time, named by its index."""
    if isinstance(output, bool) or not isinstance(output, (int, type(None))):
        raise ValueError(f"{name} models pick an output by index (0 to {count - 1}); output={output!r} "
                         "is not one")
    index = 0 if output is None else output
    if not -count <= index < count:
        raise ValueError(f"the {name} model has {count} output{'s' if count > 1 else ''}; "
                         f"output={output!r} names no other")
    return index % count


class FrameworkRunner:
    """A converted model of another framework (Keras, ONNX) scoring batches of tiles (float32,
    on the CPU) through its adapter.

    Pickles as the model's bytes in its own file format, so a dask worker loads it once; the
    framework's runner (an onnxruntime session, the Keras model) is made on first use.
    """

    def __init__(self, model: Any, output: int = 0) -> None:
        self.model, self.output = model, output
        self._predict: Any = None

    def __call__(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        if self._predict is None:
            self._predict = adapter_for(self.model).runner(self.model, self.output)
        x = batch.numpy() if isinstance(batch, torch.Tensor) else batch
        return np.asarray(self._predict(x), dtype=np.float32)

    def __getstate__(self) -> dict[str, Any]:
        adapter = adapter_for(self.model)
        return {"adapter": adapter.name, "model": adapter.to_bytes(self.model), "output": self.output}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._predict, self.output = None, state["output"]
        self.model = adapter_named(state["adapter"]).from_bytes(state["model"])
