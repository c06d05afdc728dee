"""Other runtimes behind the dense runner: OpenVINO and onnxruntime executing the converted model.

``dense_map(..., runtime=...)`` picks who executes a converted PyTorch model's tiles:

- ``"torch"`` (default): the :class:`~._runner.TileRunner` (oneDNN fused convolutions, bf16
  autocast on AMX);
- ``"openvino"``: the score map that ``output`` selects, exported to ONNX once per model
  (:class:`Export`), compiled by OpenVINO once per tile shape (``INFERENCE_PRECISION_HINT``
  ``f32`` or ``bf16``: OpenVINO's own default on an AMX CPU is bf16, so float32 is asked for
  explicitly), kept with the cached TileRunner;
- ``"onnxruntime"``: the same export in an onnxruntime session per tile shape (float32 only:
  its CPU provider has no bfloat16 convolutions on x86);
- ``"auto"``: each installed runtime timed on a batch of the map's first tile shape (after a
  warm-up run each: export and compilation out of the timer), torch kept unless another takes
  under ``AUTO_MARGIN`` of its time; the choice is :func:`choose` of those measurements
  (deterministic given them), logged, remembered per shape and used for every tile of the map.

A runtime that is not installed, that cannot export or compile the model, or that has no
path for the precision falls back to torch with one log line. Streamed columns
(:mod:`._stream`), devices other than the CPU and models of other frameworks run as they did
whatever is asked (logged once). Each tile is one static-shape run of one exported graph, so a
map computed tile by tile on a runtime equals that runtime's whole-image map wherever torch's
does (exact halos, :mod:`.tiling`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from ..outputs import output_keys, select_output

__all__ = ["AUTO_MARGIN", "AUTO_PIXELS", "EngineRunner", "Runtime", "available", "check_runtime", "choose",
           "describe", "runner_on"]

logger = logging.getLogger(__name__)

Runtime = Literal["torch", "openvino", "onnxruntime", "auto"]
AUTO_MARGIN = 0.9  # "auto" leaves torch only for a runtime that takes under 0.9 of its time
# dense_map's default runtime is "auto" for passes of this many pixels or more: at 1024x1024
# OpenVINO bf16 saved 0.02-0.08 s a pass (ResNet-18, -50) on quiet cores and 0.25-0.56 s on
# loaded ones, for a first call of 1-3 s (export, compile, timing), repaid over the maps and
# tiles of one model; smaller passes stay in torch
AUTO_PIXELS = 1024 * 1024
_MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
_EXTRAS = {"openvino": "openvino", "onnxruntime": "onnx"}
_PRECISIONS = {"openvino": ("fp32", "bf16"), "onnxruntime": ("fp32",)}
_SAID: set[tuple[str, ...]] = set()  # log lines said once per process


def describe(framework: str) -> str:
    """Where a converted model of ``framework`` (an adapter's name) runs its dense maps, for
    ``inspect``."""
    if framework != "PyTorch":
        return f"dense maps: in {framework} (its own framework), float32"
    return (f"dense maps: in torch for passes under {AUTO_PIXELS / 1e6:.1f} Mpixel, else on the fastest of "
            "torch and the installed runtimes (openvino, onnxruntime), measured (predict --runtime "
            "chooses); float32, or bfloat16 with --precision bf16")


def check_runtime(runtime: object) -> Runtime:
    """``runtime`` validated; the error names the choices."""
    if runtime not in get_args(Runtime):
        raise ValueError(f"runtime must be one of {', '.join(map(repr, get_args(Runtime)))}, got {runtime!r}")
    return runtime  # type: ignore[return-value]


def available(runtime: str) -> bool:
    """Whether ``runtime`` can be imported here (torch always can)."""
    return runtime == "torch" or importlib.util.find_spec(_MODULES[runtime]) is not None


def say_once(*key: str, message: str, level: int = logging.INFO) -> None:
    """``message`` logged the first time ``key`` is seen in this process."""
    if key not in _SAID:
        _SAID.add(key)
        logger.log(level, "%s", message)


def choose(seconds: Mapping[str, float], margin: float = AUTO_MARGIN) -> str:
    """The runtime ``"auto"`` keeps given each one's measured ``seconds`` for a tile: the
    fastest, where it takes under ``margin`` of torch's time, else torch (ties: the name first
    in alphabetical order, so the choice depends on the measurements only)."""
    best = min(sorted(seconds), key=lambda name: seconds[name])
    if "torch" in seconds and best != "torch" and seconds[best] >= margin * seconds["torch"]:
        return "torch"
    return best


class _Scores(nn.Module):
    """The converted model returning the one map the dense runner keeps (``output``; ``"all"``:
    every output stacked along the channels), as the exported graph's only output."""

    def __init__(self, model: nn.Module, output: Any) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        maps = ([select_output(out, key) for key in output_keys(out)] if self.output == "all"
                else [select_output(out, self.output)])
        return torch.cat([m[:, :, None, None] if m.dim() == 2 else m for m in maps], 1)


def onnx_bytes(model: nn.Module, output: Any, shape: tuple[int, ...], dynamic: bool = False) -> bytes:
    """``model``'s score map (:class:`_Scores`) exported to ONNX, traced on a ``shape`` input;
    ``dynamic``: with the batch, height and width left free (see :class:`Export`). TorchScript's
    exporter (seconds); where it cannot trace the model (a ``torch.export`` program's module, as
    a ``.pt2`` file loads), torch's dynamo-based one."""
    scores, example = _Scores(model, output), (torch.zeros(shape),)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            buffer = io.BytesIO()
            axes = {"image": {0: "batch", 2: "height", 3: "width"},
                    "scores": {0: "batch", 2: "rows", 3: "cols"}}
            # converted models are in eval mode already; a torch.export program's module refuses train()
            torch.onnx.export(scores, example, buffer, dynamo=False, input_names=["image"],
                              output_names=["scores"], opset_version=17,
                              dynamic_axes=axes if dynamic else None,
                              training=torch.onnx.TrainingMode.PRESERVE)
            return buffer.getvalue()
        except Exception as exc:  # the tracer raises many types
            logger.debug("TorchScript's ONNX exporter failed (%s); exporting with dynamo", exc)
        free = torch.export.Dim.DYNAMIC
        program = torch.onnx.export(scores, example, dynamo=True, input_names=["image"],
                                    output_names=["scores"], verbose=False,
                                    dynamic_shapes=({0: free, 2: free, 3: free},) if dynamic else None)
    return program.model_proto.SerializeToString()  # type: ignore[union-attr]


def _executable(runtime: str, data: bytes, shape: tuple[int, ...],
                precision: str) -> Callable[[np.ndarray], np.ndarray]:
    """The ONNX model ``data`` compiled by ``runtime`` for inputs of ``shape``, on torch's
    thread count (OpenVINO: ``precision`` as its inference precision, asked for explicitly)."""
    threads = torch.get_num_threads()
    if runtime == "openvino":
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                  "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        core = ov.Core()
        graph = core.read_model(data, b"")
        graph.reshape(list(shape))
        request = core.compile_model(graph, "CPU", config).create_infer_request()
        lock = threading.Lock()  # one request runs one input at a time (dask's threads share it)

        def infer(x: np.ndarray) -> np.ndarray:
            with lock:
                return np.array(request.infer({0: x})[0], dtype=np.float32, copy=True)

        return infer
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return lambda x: np.asarray(session.run(None, {"image": x})[0], dtype=np.float32)


class Export:
    """A converted model's score map in ONNX, shared by every runtime and precision.

    Exported once with free height and width, traced at the native input size (tracing runs
    the model: at a tile's size it cost 10 s for ResNet-50 at 1024², at 224² a fraction of
    that; each shape then compiles in 0.2-0.3 s). A trace can freeze a size the model computes
    in Python, so the export is checked once, in float32 on the runtime that first needs it,
    against the model at a larger non-square size; where it differs, each tile shape is
    exported on its own (static, exact for that shape)."""

    def __init__(self, model: nn.Module, output: Any) -> None:
        self.model, self.output = model, output
        self._dynamic: bytes | None = None
        self._checked: bool | None = None

    def for_shape(self, runtime: str, shape: tuple[int, ...]) -> bytes:
        """ONNX that ``runtime`` compiles for inputs of ``shape``."""
        if self._checked is None:
            self._checked = self._check(runtime)
        return self._dynamic if self._checked and self._dynamic is not None else \
            onnx_bytes(self.model, self.output, shape)

    def _check(self, runtime: str) -> bool:
        try:
            return self._holds(runtime)
        except Exception as exc:  # exporters and runtimes raise many types: per shape, as exact
            logger.info("no ONNX export with free sizes (%s: %s); each tile shape is exported on its own",
                        type(exc).__name__, exc)
            return False

    def _holds(self, runtime: str) -> bool:
        from ..api import geometry_of

        geometry = geometry_of(self.model)
        channels = self.model.plan.in_channels  # type: ignore[union-attr]
        (h, w), (sy, sx) = geometry.input_size, geometry.stride
        self._dynamic = onnx_bytes(self.model, self.output, (1, channels, h, w), dynamic=True)
        x = torch.randn(1, channels, h + 3 * sy, w + 2 * sx, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = _Scores(self.model, self.output)(x).float().numpy()
        actual = _executable(runtime, self._dynamic, tuple(x.shape), "fp32")(x.numpy())
        same = actual.shape == expected.shape and \
            float(np.abs(actual - expected).max()) <= 1e-4 * max(float(np.abs(expected).max()), 1e-30)
        if not same:
            logger.info("the ONNX export traced at %dx%d does not hold at other sizes; each tile shape is "
                        "exported on its own", h, w)
        return same

    def __getstate__(self) -> dict[str, Any]:  # exported again where used (the bytes hold the weights)
        return {**self.__dict__, "_dynamic": None, "_checked": None}


class _Compiled:
    """One runtime's executable per input shape, made on first use and kept."""

    def __init__(self, runtime: str, export: Export, precision: str) -> None:
        self.runtime, self.export, self.precision = runtime, export, precision
        self.made: dict[tuple[int, ...], Callable[[np.ndarray], np.ndarray]] = {}
        self.failed: set[tuple[int, ...]] = set()
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        run = self.made.get(x.shape)
        if run is None:
            with self._lock:
                run = self.made.get(x.shape)
                if run is None:
                    run = _executable(self.runtime, self.export.for_shape(self.runtime, x.shape), x.shape,
                                      self.precision)
                    self.made[x.shape] = run
        return run(x)

    def __getstate__(self) -> dict[str, Any]:  # compiled models are per process: made again
        return {**self.__dict__, "made": {}, "failed": set(), "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class EngineRunner:
    """Scores batches of tiles like :class:`~._runner.TileRunner` (``runner(batch) ->
    (N, classes, rows, cols)`` float32 numpy) on another runtime, compiled per batch shape."""

    def __init__(self, engine: _Compiled) -> None:
        self.engine = engine
        self.runtime = engine.runtime

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.engine(batch.float().contiguous().numpy())


def _engines(tile_runner: Any) -> dict[tuple[str, str], Any]:
    """The export and the compiled runtimes kept with a (cached) TileRunner, by runtime and
    output: they live as long as it does, so repeated maps of one model compile once per shape."""
    held = tile_runner.__dict__.get("_engines")
    if held is None:
        held = tile_runner.__dict__["_engines"] = {}
    return held


def runner_on(runtime: Runtime, tile_runner: Any, model: nn.Module, shape: tuple[int, ...],
              measure: Callable[[str, Callable[[], object]], float] | None = None) -> Any:
    """The runner that scores a map's tiles on ``runtime`` (the first tiles have ``shape``,
    batch included): ``tile_runner`` itself for torch and wherever the runtime is missing,
    has no path for the precision or cannot run the model (one log line each); for ``"auto"``
    the runtime :func:`choose` picks from ``measure(name, run)`` of each (default: the faster
    of two runs of a ``shape`` batch, after a warm-up run), remembered per shape."""
    if runtime == "torch":
        return tile_runner
    precision, output = tile_runner.precision, tile_runner.output
    names = ["openvino", "onnxruntime"] if runtime == "auto" else [runtime]
    engines = _engines(tile_runner)
    export = engines.setdefault(("onnx", repr(output)), Export(model, output))
    usable = {name: engines.setdefault((name, repr(output)), _Compiled(name, export, precision))
              for name in names if _usable(name, precision, runtime != "auto")}
    if runtime != "auto":
        return EngineRunner(usable[runtime]) if runtime in usable and _runs(usable[runtime], shape) \
            else tile_runner
    chosen = tile_runner.__dict__.setdefault("_auto", {})
    key = (shape, repr(output))
    if key not in chosen:
        chosen[key] = _auto(tile_runner, usable, shape, measure or _seconds)
    name = chosen[key]
    return tile_runner if name == "torch" else EngineRunner(usable[name])


def _usable(name: str, precision: str, asked: bool) -> bool:
    """Whether ``name`` is installed and has a ``precision`` path (said once where not: it
    runs in torch where it was ``asked`` for, else "auto" leaves it out)."""
    instead = "running in torch" if asked else "runtime='auto' leaves it out"
    if not available(name):
        say_once("missing", name, message=f"runtime {name!r} is not installed (pip install "
                 f"'convolutionalize[{_EXTRAS[name]}]'); {instead}")
        return False
    if precision not in _PRECISIONS[name]:
        say_once("precision", name, precision, message=f"runtime {name!r} has no {precision} path on "
                 f"this CPU; {instead}")
        return False
    return True


def _runs(engine: _Compiled, shape: tuple[int, ...]) -> bool:
    """Whether ``engine`` exports, compiles and runs a ``shape`` batch (tried once per shape;
    said once where not)."""
    if shape in engine.made:
        return True
    if shape in engine.failed:
        return False
    try:
        engine(np.zeros(shape, np.float32))
        return True
    except Exception as exc:  # exporters and compilers raise many types
        engine.failed.add(shape)
        say_once("failed", engine.runtime, message=f"runtime {engine.runtime!r} cannot run this model "
                 f"({type(exc).__name__}: {exc}); running in torch", level=logging.WARNING)
        return False


def _auto(tile_runner: Any, engines: dict[str, _Compiled], shape: tuple[int, ...],
          measure: Callable[[str, Callable[[], object]], float]) -> str:
    batch = torch.zeros(shape)
    x = batch.numpy()
    tile_runner(batch)  # warm-up: packed weights, allocator
    seconds = {"torch": measure("torch", lambda: tile_runner(batch))}
    for name, engine in engines.items():
        if _runs(engine, shape):  # warm-up: export and compile
            seconds[name] = measure(name, lambda engine=engine: engine(x))
    name = choose(seconds)
    logger.info("runtime='auto' for %s tiles in %s: %s (measured %s)", "x".join(map(str, shape)),
                tile_runner.precision, name,
                ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(seconds.items())))
    return name


def _seconds(_name: str, run: Callable[[], object]) -> float:
    """The faster of two timed runs."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)
