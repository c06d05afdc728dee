"""Keras 3 adapter: read a functional or Sequential model, find the head, rebuild it as convolutions.

A Keras model is a graph of operation calls on symbolic tensors. The adapter copies the
model (``clone_model`` + ``set_weights``: the caller's is never touched), flattens nested
models into one list of calls, replays it once at the native input size to learn every
tensor's static shape, and gives each tensor a *kind* (``map``, ``pooled``, ``vector``,
``flat``, ``seq``, as in the PyTorch adapter). The head is everything between the last map
and the outputs (one map per output, in the model's output structure); each head call
becomes a :class:`~convolutionalize.plan.HeadStep`.
The rewrite replays the calls once more on an input of unknown height and width: body
calls unchanged, head calls by one registered function per step kind (``Dense`` after a
flatten -> ``Conv2D`` with the feature map's size as kernel, later ``Dense`` -> 1x1,
global pooling -> stride-1 window pool / nothing / kept). Only Keras layers are built,
so the result runs on any backend. The head works in the model's own data format: the
result maps are ``(N, rows, cols, classes)`` for channels_last models and
``(N, classes, rows, cols)`` for channels_first ones (:func:`predict_nchw` hides this).
With ``output_stride`` the body is rebuilt à trous (:mod:`.atrous`: strides removed,
``dilation_rate`` multiplied, pools dilated from Keras layers).
Files: ``.keras``, and legacy HDF5 ``.h5`` / ``.hdf5`` (``tf.keras``; needs ``h5py``).

Before returning, a conversion checks itself (``_Probe``, the framework-neutral parts in
:mod:`convolutionalize.selfcheck`) and keeps what it measured next to its geometry
(``fcn.self_check``).

This module holds the public entry points (conversion, files, running, shapes); the graph
and the facts about Keras operations live in ``graph``, the analysis in ``head`` (kinds
and the plan) and ``geometry`` (body geometry), the rewrite in ``rewrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ..._files import atomic_path
from ...errors import NotConvolutionalizable
from ...geometry import Geometry, PoolMode, at_output_stride
from ...plan import FeatureMap, HeadPlan, HeadStep
from ...selfcheck import CHECK_RTOL, SelfCheck, check_cells, check_sizes
from .atrous import Atrous, plan_atrous
from .geometry import body_spans
from .graph import (
    NO_OPS,
    Call,
    Graph,
    Layout,
    fill_arguments,
    flatten_graph,
    graph_of,
    layout_of_calls,
    reason,
)
from .head import Analysis
from .rewrite import rebuild

__all__ = ["activation_shapes", "convolutionalize_keras", "input_channels", "load_keras", "model_digest",
           "predict_nchw", "save_keras"]

log = logging.getLogger(__name__)

NATIVE_RTOL = 1e-4
META_FILE = "convolutionalize.json"  # geometry and plan, stored inside a saved .keras zip


def _run_all(model: keras.Model, x: np.ndarray) -> list[np.ndarray]:
    """Every output of ``model`` on ``x``, flattened in the model's output order. ``x`` goes in
    the structure the model was built with (``[x]`` for tf.keras files' ``input_layers`` list).

    predict_on_batch: inference mode without gradient tracking on every backend (a plain call
    on the torch backend records autograd: 25% slower, activations kept)."""
    structure = getattr(model, "_inputs_struct", None)
    feed = keras.tree.pack_sequence_as(structure, [x]) if structure is not None else x
    return [np.asarray(o, dtype=np.float64) for o in keras.tree.flatten(model.predict_on_batch(feed))]


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def _random_input(a: Analysis, size: tuple[int, int], seed: int) -> np.ndarray:
    shape = (1, *size, a.in_channels) if a.layout == "NHWC" else (1, a.in_channels, *size)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _spatial(a: Analysis, out: np.ndarray) -> tuple[int, ...]:
    return tuple(out.shape[1:3] if a.layout == "NHWC" else out.shape[2:4])


def _native_error(a: Analysis, fcn: keras.Model, pool: PoolMode) -> float | None:
    """Max relative error over the outputs at the native size (None: no equality to check)."""
    x = _random_input(a, a.input_size, seed=0)
    expected, maps = _run_all(a.model, x), _run_all(fcn, x)
    if len(maps) != len(expected):
        raise NotConvolutionalizable(f"the rewritten model has {len(maps)} outputs, the original "
                                     f"{len(expected)}")
    errors = [_output_error(a, out, e, pool) for out, e in zip(maps, expected)]
    return None if None in errors else max(e for e in errors if e is not None)


def _output_error(a: Analysis, out: np.ndarray, expected: np.ndarray, pool: PoolMode) -> float | None:
    if pool == "global" or out.ndim == 2:
        return _relative_error(out.reshape(expected.shape), expected)
    if pool == "window" or not a.plan.global_pooling:
        if _spatial(a, out) != (1, 1):
            raise NotConvolutionalizable(f"at the native size the map is {_spatial(a, out)}, not 1x1; "
                                         "the head's geometry was misread")
        return _relative_error(out.reshape(expected.shape), expected)
    affine = all(s.op in ("global_pool", "flatten", "linear", "batchnorm") or (
        s.op == "keep" and any(k in s.detail for k in NO_OPS)) for s in a.plan.steps)
    if not affine or any(s.reduce == "max" for s in a.plan.steps_of("global_pool")):
        return None
    mean = out.mean(axis=(1, 2) if a.layout == "NHWC" else (2, 3))
    return _relative_error(mean.reshape(expected.shape), expected)


class _Probe:
    """The larger-size half of the self-check (see :mod:`convolutionalize.selfcheck`): random
    images at the check sizes and, when crop-equivalent, the original's outputs on the true
    crops of a few cells (one batch per size)."""

    def __init__(self, a: Analysis, geometry: Geometry) -> None:
        self.a, self.geometry = a, geometry
        sizes = check_sizes(geometry)
        self.images = [_random_input(a, size, seed=2) for size in sizes]
        self.crops: list[tuple[list[tuple[int, int]], list[np.ndarray]]] = []
        for image, size in zip(self.images, sizes):
            cells = check_cells(geometry, size) if geometry.crop_equivalent else []
            batch = np.concatenate([self._crop(image, cell) for cell in cells]) if cells else None
            self.crops.append((cells, [] if batch is None else _run_all(a.model, batch)))

    def _crop(self, image: np.ndarray, cell: tuple[int, int]) -> np.ndarray:
        (sy, sx), (oy, ox), (h, w) = self.geometry.stride, self.geometry.offset, self.geometry.window
        y, x = cell[0] * sy + oy, cell[1] * sx + ox
        return image[:, y:y + h, x:x + w] if self.a.layout == "NHWC" else image[:, :, y:y + h, x:x + w]

    def check(self, fcn: keras.Model, native_error: float | None) -> SelfCheck:
        failures = []
        for image, (cells, expected) in zip(self.images, self.crops):
            size = _spatial(self.a, image)
            try:
                maps = _run_all(fcn, image)
            except Exception as exc:  # e.g. a layer built for the native size only
                failures.append(f"at {size[0]}x{size[1]}: {_first_line(exc)}")
                continue
            shape = self._check_shapes(maps, (size[0], size[1]))
            errors = [_relative_error(self._cell(m, cell), e[k].reshape(-1))
                      for m, e in zip(maps, expected) for k, cell in enumerate(cells)]
            crop_error = max(errors) if errors else None
            if crop_error is not None and crop_error > CHECK_RTOL:
                raise NotConvolutionalizable(
                    f"the converted model's map at {size[0]}x{size[1]} differs from the original on "
                    f"the true crops of its cells (max relative error {crop_error:.2e}); the head's "
                    "geometry or flatten order was misread")
            return SelfCheck(native_error, (size[0], size[1]), shape, crop_error, tuple(failures))
        raise NotConvolutionalizable("the converted model does not run at sizes larger than the "
                                     f"native one ({'; '.join(failures)}); it cannot slide")

    def _cell(self, out: np.ndarray, cell: tuple[int, int]) -> np.ndarray:
        i, j = cell
        return out[0, i, j] if self.a.layout == "NHWC" else out[0, :, i, j]

    def _check_shapes(self, maps: list[np.ndarray], size: tuple[int, int]) -> tuple[int, int]:
        if self.geometry.pool == "global":
            bad = [m.shape for m in maps if m.ndim != 2]
            if bad:
                raise NotConvolutionalizable(f"with pool='global' the converted model returns {bad} "
                                             f"at {size[0]}x{size[1]}, not (N, classes)")
            return (1, 1)
        expected = self.geometry.cells(*size)
        for m in maps:
            if m.ndim != 4 or _spatial(self.a, m) != expected:
                raise NotConvolutionalizable(
                    f"at {size[0]}x{size[1]} the converted model returns a map of shape {m.shape}, "
                    f"but its geometry predicts {expected[0]}x{expected[1]} cells; the map is "
                    "transposed or the geometry was misread")
        return expected


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {reason(exc)}"


def convolutionalize_keras(model: keras.Model, input_size: object = None,
                           pool: PoolMode = "window", output_stride: int | None = None) -> keras.Model:
    """Convert a Keras classifier; see :func:`convolutionalize.convolutionalize`.

    Returns a new ``keras.Model`` with input ``(None, None, C)`` (``(C, None, None)`` for
    channels_first) and one map per output of the original (in its output structure),
    carrying ``geometry``, ``plan``, ``native_error`` and ``self_check`` attributes.
    Before returning it checks itself (:mod:`convolutionalize.selfcheck`): equal to the
    original at the native size, and at a larger non-square size the predicted rows and
    columns and, when crop-equivalent, the original's scores on the true crops of a few cells.
    """
    analysis = Analysis(model, input_size)
    geometry = analysis.geometry(pool)
    atrous = None
    if output_stride is not None and (output_stride, output_stride) != geometry.stride:
        body, spans = body_spans(analysis)
        atrous = plan_atrous(analysis, spans, output_stride, (body.y.jump, body.x.jump),
                             body.global_context, body.unproven)
        geometry = at_output_stride(geometry, atrous.stride, atrous.head_dilation)
    try:
        fcn, check = _convert(analysis, geometry, model.name, atrous)
    except NotConvolutionalizable:
        raise
    except Exception as exc:  # a layer we did not foresee: a typed refusal, not a crash
        raise NotConvolutionalizable(f"cannot convert keras model '{model.name}': "
                                     f"{_first_line(exc)}") from exc
    log.info("converted keras model '%s': %s; %s", model.name,
             ", ".join(s.op for s in analysis.plan.steps), check.describe())
    _attach(fcn, geometry, analysis.plan, check)
    return fcn


def _convert(a: Analysis, geometry: Geometry, name: str,
             atrous: Atrous | None = None) -> tuple[keras.Model, SelfCheck]:
    probe = _Probe(a, geometry)  # the original's crops
    fcn = rebuild(a, geometry.pool, name, atrous, geometry.window)
    dense_cam = atrous is not None and geometry.pool == "none"  # a denser CAM averages other places
    error = None if dense_cam else _native_error(a, fcn, geometry.pool)
    if error is not None and error > NATIVE_RTOL:
        raise NotConvolutionalizable(
            f"the rewritten '{name}' differs from the original at the native size (max relative "
            f"error {error:.2e}); a head layer has no exact sliding form")
    return fcn, probe.check(fcn, error)


def _attach(fcn: keras.Model, geometry: Geometry, plan: HeadPlan, check: SelfCheck | None,
            native_error: float | None = None) -> None:
    """Plain attributes next to the geometry (frozen dataclasses and floats are not tracked by
    Keras): ``geometry``, ``plan``, ``self_check`` and ``native_error``."""
    fcn.geometry = geometry
    fcn.plan = plan
    fcn.self_check = check
    fcn.native_error = check.native_error if check is not None else native_error


def _layout_of(model: keras.Model) -> Layout:
    plan = getattr(model, "plan", None)
    if isinstance(plan, HeadPlan) and plan.feature.layout in ("NHWC", "NCHW"):
        return plan.feature.layout  # type: ignore[return-value]
    fn = graph_of(model)  # (a feature map that a Permute reordered: the layers' data format)
    if fn is None:
        return "NHWC"
    calls: list[Call] = []
    flatten_graph(fn, list(fn.inputs), {}, calls)
    return layout_of_calls(calls)


def predict_nchw(model: keras.Model, x: np.ndarray, output: int = 0) -> np.ndarray:
    """Run a (converted) Keras model on ``x (N, C, H, W)``; return ``(N, classes, rows, cols)``.

    Channels_last models get ``x`` transposed to NHWC and their map transposed back; a
    ``(N, classes)`` output (``pool="global"``) comes back as ``(N, classes, 1, 1)``. A model
    with several outputs gives the one at index ``output`` (in ``model.outputs`` order).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"predict_nchw takes a (N, C, H, W) array, got shape {x.shape}")
    nhwc = _layout_of(model) == "NHWC"
    outs = _run_all(model, np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if nhwc else x)
    if not 0 <= output < len(outs):
        raise ValueError(f"model '{model.name}' has {len(outs)} outputs; output={output} is not one")
    out = outs[output].astype(np.float32)
    if out.ndim == 2:
        return out[:, :, None, None]
    return out.transpose(0, 3, 1, 2) if nhwc else out


def input_channels(model: keras.Model) -> int:
    """The image channels the model's input takes."""
    plan = getattr(model, "plan", None)
    if isinstance(plan, HeadPlan):
        return plan.in_channels
    shape = tuple(model.inputs[0].shape)
    channels = shape[3 if _layout_of(model) == "NHWC" else 1] if len(shape) == 4 else None
    if channels is None:
        raise ValueError(f"model '{model.name}' has input shape {shape}; a 4-D input with a known "
                         "channel count is needed")
    return int(channels)


def activation_shapes(model: keras.Model, size: tuple[int, int],
                      output: int = 0) -> tuple[tuple[int, ...], list[int]]:
    """The shape of output ``output`` (without batch, classes first; in ``model.outputs`` order) for one
    ``size`` input, and the element count of every layer output, symbolically: each layer's
    ``compute_output_spec`` (nothing is computed and the model gains no new nodes)."""
    graph = Graph(model)
    layout, channels = _layout_of(model), input_channels(model)
    shape = (1, *size, channels) if layout == "NHWC" else (1, channels, *size)

    def spec(call: Call, new: dict[int, Any]) -> list[Any]:
        args, kwargs = fill_arguments(call, new, graph.canon)
        return keras.tree.flatten(call.op.compute_output_spec(*args, **kwargs))

    new = graph.replay(keras.KerasTensor(shape), spec)
    out = tuple(int(d) for d in new[id(graph.outputs[output])].shape[1:])
    counts = [int(np.prod(t.shape)) for t in new.values() if None not in t.shape]
    return (out[2], out[0], out[1]) if len(out) == 3 and layout == "NHWC" else out, counts


def model_digest(model: keras.Model) -> str:
    """A short hash of a model's configuration and weights."""
    digest = hashlib.sha1(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- files


def _plan_from_dict(data: dict[str, Any]) -> HeadPlan:
    feature = data["feature"]
    feature = FeatureMap(feature["node"], feature["channels"], tuple(feature["size"]), feature["layout"])
    steps = tuple(HeadStep(**{**s, "kernel": tuple(s["kernel"]) if s["kernel"] else None,
                              "pool_to": tuple(s["pool_to"]) if s["pool_to"] else None})
                  for s in data["steps"])
    return HeadPlan(data["framework"], tuple(data["input_size"]), data["in_channels"], feature, steps,
                    outputs=tuple(data.get("outputs", ())), capture=data.get("capture", ""))


def _check_from_dict(data: dict[str, Any] | None) -> SelfCheck | None:
    if data is None:
        return None
    return SelfCheck(data["native_error"], tuple(data["size"]), tuple(data["cells"]),  # type: ignore[arg-type]
                     data["crop_error"], tuple(data.get("refused", ())))


def save_keras(fcn: keras.Model, path: str | os.PathLike[str]) -> Path:
    """Write ``fcn`` to a ``.keras`` file atomically (temporary file, then rename).

    A converted model's geometry, plan and self-check travel inside the zip
    (``convolutionalize.json``); :func:`load_keras` attaches them again.
    """
    path = Path(path)
    if path.suffix.lower() != ".keras":
        raise ValueError(f"a Keras model is saved as .keras, got {path.name}")
    with atomic_path(path) as tmp:
        fcn.save(tmp)
        geometry, plan = getattr(fcn, "geometry", None), getattr(fcn, "plan", None)
        if isinstance(geometry, Geometry) and isinstance(plan, HeadPlan):
            check = getattr(fcn, "self_check", None)
            meta = {"geometry": json.loads(geometry.to_json()), "plan": asdict(plan),
                    "native_error": getattr(fcn, "native_error", None),
                    "self_check": asdict(check) if isinstance(check, SelfCheck) else None}
            with zipfile.ZipFile(tmp, "a") as archive:
                archive.writestr(META_FILE, json.dumps(meta))
    return path


def load_keras(path: str | os.PathLike[str]) -> keras.Model:
    """Load a ``.keras`` file, or a legacy HDF5 ``.h5`` / ``.hdf5`` file as ``tf.keras`` (and
    Keras 3's ``model.save("x.h5")``) wrote them; a converted model gets its geometry, plan
    and self-check back.

    Raises ValueError (one line) for a missing, corrupt or non-Keras file, an HDF5 file that
    holds weights only, or HDF5 without ``h5py`` installed.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file {path} does not exist")
    if path.suffix.lower() in (".h5", ".hdf5"):
        _check_hdf5(path)
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:
        raise ValueError(f"cannot read {path.name} as a Keras model: {reason(exc)}") from None
    if not isinstance(model, keras.Model):
        raise ValueError(f"{path.name} holds a {type(model).__name__}, not a keras.Model")
    meta = _read_meta(path)
    if meta is not None:
        _attach(model, Geometry.from_json(json.dumps(meta["geometry"])), _plan_from_dict(meta["plan"]),
                _check_from_dict(meta.get("self_check")), meta.get("native_error"))
    return model


def _check_hdf5(path: Path) -> None:
    """An HDF5 file must hold a whole model (``model.save``), not only ``save_weights``."""
    try:
        import h5py
    except ImportError:
        raise ValueError(f"reading {path.name} (HDF5) needs h5py: pip install h5py "
                         "(or convolutionalize[keras])") from None
    try:
        with h5py.File(path, "r") as f:
            has_config = "model_config" in f.attrs
    except OSError as exc:
        raise ValueError(f"cannot read {path.name} as a Keras model: not an HDF5 file "
                         f"({reason(exc)})") from None
    if not has_config:
        raise ValueError(f"{path.name} holds weights only (no model config, as save_weights writes "
                         "it): build the architecture, call load_weights, and pass the keras.Model")


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(META_FILE)) if META_FILE in archive.namelist() else None
    except (zipfile.BadZipFile, json.JSONDecodeError, KeyError):
        return None
