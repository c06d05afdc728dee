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

Before returning, a conversion checks itself (the one self-check in
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
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ..._files import atomic_path
from ...geometry import Geometry, PoolMode, at_output_stride
from ...plan import HeadPlan
from ...selfcheck import Reference, Run
from ..base import META_KEY, Conversion
from .atrous import plan_atrous
from .geometry import body_spans
from .graph import (
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
from .trace import is_subclassed, traced

__all__ = ["activation_shapes", "convolutionalize_keras", "input_channels", "load_keras", "model_digest",
           "predict_nchw", "save_keras"]

log = logging.getLogger(__name__)



def _run_all(model: keras.Model, x: np.ndarray) -> list[np.ndarray]:
    """Every output of ``model`` on ``x``, flattened in the model's output order. ``x`` goes in
    the structure the model was built with (``[x]`` for tf.keras files' ``input_layers`` list).

    predict_on_batch: inference mode without gradient tracking on every backend (a plain call
    on the torch backend records autograd: 25% slower, activations kept)."""
    structure = getattr(model, "_inputs_struct", None)
    feed = keras.tree.pack_sequence_as(structure, [x]) if structure is not None else x
    return [np.asarray(o, dtype=np.float64) for o in keras.tree.flatten(model.predict_on_batch(feed))]


def _nchw(model: keras.Model, layout: Layout) -> Run:
    """``model`` as the self-check runs it: NCHW batches in, every output out with maps NCHW."""
    def run(x: np.ndarray) -> list[np.ndarray]:
        if layout != "NHWC":
            return _run_all(model, x)
        outs = _run_all(model, np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        return [o.transpose(0, 3, 1, 2) if o.ndim == 4 else o for o in outs]

    return run


def convolutionalize_keras(model: keras.Model, input_size: object = None,
                           pool: PoolMode = "window", output_stride: int | None = None) -> keras.Model:
    """Convert a Keras classifier; see :func:`convolutionalize.convolutionalize`.

    Returns a new ``keras.Model`` with input ``(None, None, C)`` (``(C, None, None)`` for
    channels_first) and one map per output of the original (in its output structure),
    carrying ``geometry``, ``plan``, ``native_error`` and ``self_check`` attributes.
    Before returning it checks itself (:class:`convolutionalize.selfcheck.Reference`).
    """
    original = model
    if is_subclassed(model):
        model = traced(model, input_size)
    analysis = Analysis(model, input_size)
    geometry = analysis.geometry(pool)
    atrous = None
    if output_stride is not None and (output_stride, output_stride) != geometry.stride:
        body, spans = body_spans(analysis)
        atrous = plan_atrous(analysis, spans, output_stride, (body.y.jump, body.x.jump),
                             body.global_context, body.unproven)
        geometry = at_output_stride(geometry, atrous.stride, atrous.head_dilation)
    precision = str(getattr(analysis.model, "compute_dtype", "float32"))
    reference = Reference(_nchw(original if original is not model else analysis.model, analysis.layout),
                          analysis.plan, geometry,
                          precision=precision, network_stride=atrous is None)
    fcn = rebuild(analysis, geometry.pool, model.name, atrous, geometry.window)
    check = reference.check(_nchw(fcn, analysis.layout))
    log.info("converted keras model '%s': %s; %s", model.name,
             ", ".join(s.op for s in analysis.plan.steps), check.describe())
    _attach(fcn, Conversion(geometry, analysis.plan, check))
    return fcn


def _attach(fcn: keras.Model, conversion: Conversion) -> None:
    """Plain attributes (frozen dataclasses and floats are not tracked by Keras): ``geometry``,
    ``plan``, ``self_check`` and ``native_error``."""
    fcn.geometry = conversion.geometry
    fcn.plan = conversion.plan
    fcn.self_check = conversion.self_check
    fcn.native_error = conversion.native_error


def conversion_of(model: keras.Model) -> Conversion | None:
    """What a converted model carries (None: not converted)."""
    geometry, plan = getattr(model, "geometry", None), getattr(model, "plan", None)
    if not (isinstance(geometry, Geometry) and isinstance(plan, HeadPlan)):
        return None
    return Conversion(geometry, plan, getattr(model, "self_check", None))


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


def save_keras(fcn: keras.Model, path: str | os.PathLike[str]) -> Path:
    """Write ``fcn`` to a ``.keras`` file atomically (temporary file, then rename).

    A converted model's geometry, plan and self-check travel inside the zip
    (``convolutionalize.json``); :func:`load_keras` attaches them again.

    The file holds standard Keras layers only, so ``keras.saving.load_model(path)`` reads it
    in a process that never imported ``convolutionalize`` (without the geometry). One
    exception: a model converted with ``output_stride`` and ``pool="window"`` ends in our
    ``WindowCells`` layer; load it with :func:`load_keras`, or run this line first::

        import convolutionalize.frameworks.keras.model
    """
    path = Path(path)
    if path.suffix.lower() != ".keras":
        raise ValueError(f"a Keras model is saved as .keras, got {path.name}")
    conversion = conversion_of(fcn)
    with atomic_path(path) as tmp:
        fcn.save(tmp)
        if conversion is not None:
            with zipfile.ZipFile(tmp, "a") as archive:
                archive.writestr(META_KEY, conversion.to_json())
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
    conversion = _read_conversion(path)
    if conversion is not None:
        _attach(model, conversion)
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


def _read_conversion(path: Path) -> Conversion | None:
    try:
        with zipfile.ZipFile(path) as archive:
            if META_KEY not in archive.namelist():
                return None
            return Conversion.from_json(archive.read(META_KEY).decode())
    except (zipfile.BadZipFile, json.JSONDecodeError, KeyError):
        return None
