"""Keras 3 adapter: read a functional or Sequential model, find the head, rebuild it as convolutions.

A Keras model is a graph of operation calls on symbolic tensors. The adapter copies the
model (``clone_model`` + ``set_weights``: the caller's is never touched), flattens nested
models into one list of calls, replays it once at the native input size to learn every
tensor's static shape, and gives each tensor a *kind* (``map``, ``pooled``, ``vector``,
``flat``, ``seq``, as in the PyTorch adapter). The head is everything between the last map
and the output; each head call becomes a :class:`~convolutionalize.plan.HeadStep`.
The rewrite replays the calls once more on an input of unknown height and width: body
calls unchanged, head calls by one registered function per step kind (``Dense`` after a
flatten -> ``Conv2D`` with the feature map's size as kernel, later ``Dense`` -> 1x1,
global pooling -> stride-1 window pool / nothing / kept). Only Keras layers are built,
so the result runs on any backend. The head works in the model's own data format: the
result maps are ``(N, rows, cols, classes)`` for channels_last models and
``(N, classes, rows, cols)`` for channels_first ones (:func:`predict_nchw` hides this).

This module holds the public entry points (conversion, files, running, shapes); the graph
and the facts about Keras operations live in ``_keras_graph``, the analysis in
``_keras_head`` (kinds and the plan) and ``_keras_geometry`` (body geometry), the rewrite
in ``_keras_rewrite``.
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
from ...geometry import Geometry, PoolMode
from ...plan import FeatureMap, HeadPlan, HeadStep
from .graph import (
    NO_OPS,
    Call,
    Graph,
    Layout,
    fill_arguments,
    flatten_graph,
    graph_of,
    layout_of_calls,
)
from .head import Analysis
from .rewrite import rebuild

__all__ = ["activation_shapes", "convolutionalize_keras", "input_channels", "load_keras", "model_digest",
           "predict_nchw", "save_keras"]

log = logging.getLogger(__name__)

NATIVE_RTOL = 1e-4
META_FILE = "convolutionalize.json"  # geometry and plan, stored inside a saved .keras zip


def _run(model: keras.Model, x: np.ndarray) -> np.ndarray:
    # predict_on_batch: inference mode without gradient tracking on every backend (a plain call
    # on the torch backend records autograd: 25% slower, activations kept)
    return np.asarray(model.predict_on_batch(x), dtype=np.float64)


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def _native_error(a: Analysis, original: keras.Model, fcn: keras.Model, pool: PoolMode) -> float | None:
    shape = ((1, *a.input_size, a.in_channels) if a.layout == "NHWC"
             else (1, a.in_channels, *a.input_size))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected, out = _run(original, x), _run(fcn, x)
    if pool == "global" or out.ndim == 2:
        return _relative_error(out.reshape(expected.shape), expected)
    spatial = out.shape[1:3] if a.layout == "NHWC" else out.shape[2:4]
    if pool == "window" or not a.plan.global_pooling:
        if tuple(spatial) != (1, 1):
            raise NotConvolutionalizable(f"at the native size the map is {tuple(spatial)}, not 1x1; "
                                         "the head's geometry was misread")
        return _relative_error(out.reshape(expected.shape), expected)
    affine = all(s.op in ("global_pool", "flatten", "linear", "batchnorm") or (
        s.op == "keep" and any(k in s.detail for k in NO_OPS)) for s in a.plan.steps)
    if not affine or any(s.reduce == "max" for s in a.plan.steps_of("global_pool")):
        return None
    mean = out.mean(axis=(1, 2) if a.layout == "NHWC" else (2, 3))
    return _relative_error(mean.reshape(expected.shape), expected)


def convolutionalize_keras(model: keras.Model, input_size: object = None,
                           pool: PoolMode = "window") -> keras.Model:
    """Convert a Keras classifier; see :func:`convolutionalize.convolutionalize`.

    Returns a new ``keras.Model`` with input ``(None, None, C)`` (``(C, None, None)`` for
    channels_first) carrying ``geometry``, ``plan`` and ``native_error`` attributes.
    """
    analysis = Analysis(model, input_size)
    geometry = analysis.geometry(pool)
    fcn = rebuild(analysis, pool, model.name)
    error = _native_error(analysis, model, fcn, geometry.pool)
    if error is not None and error > NATIVE_RTOL:
        raise NotConvolutionalizable(
            f"the rewritten '{model.name}' differs from the original at the native size (max relative "
            f"error {error:.2e}); a head layer has no exact sliding form")
    log.info("converted keras model '%s': %s", model.name, ", ".join(s.op for s in analysis.plan.steps))
    _attach(fcn, geometry, analysis.plan, error)
    return fcn


def _attach(fcn: keras.Model, geometry: Geometry, plan: HeadPlan, error: float | None) -> None:
    """Plain attributes: frozen dataclasses and floats are not tracked by Keras."""
    fcn.geometry = geometry
    fcn.plan = plan
    fcn.native_error = error


def _layout_of(model: keras.Model) -> Layout:
    plan = getattr(model, "plan", None)
    if isinstance(plan, HeadPlan):
        return plan.feature.layout
    fn = graph_of(model)
    if fn is None:
        return "NHWC"
    calls: list[Call] = []
    flatten_graph(fn, list(fn.inputs), {}, calls)
    return layout_of_calls(calls)


def predict_nchw(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Run a (converted) Keras model on ``x (N, C, H, W)``; return ``(N, classes, rows, cols)``.

    Channels_last models get ``x`` transposed to NHWC and their map transposed back; a
    ``(N, classes)`` output (``pool="global"``) comes back as ``(N, classes, 1, 1)``.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"predict_nchw takes a (N, C, H, W) array, got shape {x.shape}")
    nhwc = _layout_of(model) == "NHWC"
    out = _run(model, np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if nhwc else x).astype(np.float32)
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


def activation_shapes(model: keras.Model, size: tuple[int, int]) -> tuple[tuple[int, ...], list[int]]:
    """The output shape (without batch, classes first) for one ``size`` input, and the element
    count of every layer output, symbolically: each layer's ``compute_output_spec`` (nothing
    is computed and the model gains no new nodes)."""
    graph = Graph(model)
    layout, channels = _layout_of(model), input_channels(model)
    shape = (1, *size, channels) if layout == "NHWC" else (1, channels, *size)

    def spec(call: Call, new: dict[int, Any]) -> list[Any]:
        args, kwargs = fill_arguments(call, new, graph.canon)
        return keras.tree.flatten(call.op.compute_output_spec(*args, **kwargs))

    new = graph.replay(keras.KerasTensor(shape), spec)
    out = tuple(int(d) for d in new[id(graph.output)].shape[1:])
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
    return HeadPlan(data["framework"], tuple(data["input_size"]), data["in_channels"], feature, steps)


def save_keras(fcn: keras.Model, path: str | os.PathLike[str]) -> Path:
    """Write ``fcn`` to a ``.keras`` file atomically (temporary file, then rename).

    A converted model's geometry and plan travel inside the zip (``convolutionalize.json``);
    :func:`load_keras` attaches them again.
    """
    path = Path(path)
    if path.suffix.lower() != ".keras":
        raise ValueError(f"a Keras model is saved as .keras, got {path.name}")
    with atomic_path(path) as tmp:
        fcn.save(tmp)
        geometry, plan = getattr(fcn, "geometry", None), getattr(fcn, "plan", None)
        if isinstance(geometry, Geometry) and isinstance(plan, HeadPlan):
            meta = {"geometry": json.loads(geometry.to_json()), "plan": asdict(plan),
                    "native_error": getattr(fcn, "native_error", None)}
            with zipfile.ZipFile(tmp, "a") as archive:
                archive.writestr(META_FILE, json.dumps(meta))
    return path


def load_keras(path: str | os.PathLike[str]) -> keras.Model:
    """Load a ``.keras`` file; a converted model gets its geometry and plan back.

    Raises ValueError (one line) for a missing, corrupt or non-Keras file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file {path} does not exist")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read {path.name} as a Keras model: {reason}") from None
    if not isinstance(model, keras.Model):
        raise ValueError(f"{path.name} holds a {type(model).__name__}, not a keras.Model")
    try:
        with zipfile.ZipFile(path) as archive:
            meta = json.loads(archive.read(META_FILE)) if META_FILE in archive.namelist() else None
    except (zipfile.BadZipFile, json.JSONDecodeError, KeyError):
        meta = None
    if meta is not None:
        _attach(model, Geometry.from_json(json.dumps(meta["geometry"])), _plan_from_dict(meta["plan"]),
                meta.get("native_error"))
    return model
