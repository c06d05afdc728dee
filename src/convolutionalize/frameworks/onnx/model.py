"""ONNX adapter: find a classifier head in an ONNX graph and rewrite it into convolutions.

The head is the chain of single-input nodes that leads from the last spatial feature map
to the graph's output: a global pool (``GlobalAveragePool``, ``ReduceMean`` over H, W, an
``AveragePool`` that covers the whole map) or a flatten, then ``Gemm`` / ``MatMul``
(+ ``Add``), normalizations and elementwise ops. Runs of pure shape operations
(``Flatten``, ``Reshape`` with constant or computed shapes, ``Squeeze``, ``Transpose``,
``Gather``) are classified by evaluating them on ``arange`` data: a run must turn the map
into a vector in CHW or HWC order (or keep a 1x1 pooled map), otherwise it is refused.

Like the other adapters it works in two steps joined by a
:class:`~convolutionalize.plan.HeadPlan`: analysis (``analyse``) on a private copy of the
proto with shapes inferred at the native size, then ``rewrite`` with one function per ONNX
op type, followed by clean-up: dead nodes and initializers removed, size-specific body
``Reshape`` shapes made dynamic, input and output height and width made symbolic,
``value_info`` refreshed by shape inference, nodes topologically sorted and the result
checked with ``onnx.checker.check_model(full_check=True)`` and with onnxruntime against the
original at the native size.

Before the analysis, older forms are prepared (``prepare``: opset at least 7, initializers
listed as inputs read as constants, constant subgraphs folded); opset-specific head ops are
handled by functions registered by ``(op_type, since_version)`` (``registry``). Every graph
output becomes a map (class scores and box regression from one trunk: one map each, in
order). Before returning, the conversion checks itself (:mod:`convolutionalize.selfcheck`):
equality with the original at the native size, and at a larger non-square size every map's
rows and columns as the geometry predicts, and true crops when crop-equivalent.

This module holds the public entry points (conversion, files, running); the analysis lives in
``graph`` (graph facts), ``head`` (the head and its plan) and ``geometry`` (body geometry), the
rewrite in ``rewrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from ..._files import atomic_path
from ...errors import NotConvolutionalizable, first_line
from ...geometry import GEOMETRY_KEY, Geometry, PoolMode, at_output_stride, check_pool, geometry_from_plan
from ...plan import HeadPlan
from ...selfcheck import CHECK_RTOL, SelfCheck, check_cells, check_sizes
from .atrous import crop_to_windows, plan_atrous
from .geometry import body_geometry
from .graph import dims_of, image_input, input_layout, symbolic_shape_inference
from .head import Value, analyse
from .rewrite import rewrite

__all__ = [
    "NATIVE_ERROR_KEY",
    "NATIVE_RTOL",
    "PLAN_KEY",
    "SELF_CHECK_KEY",
    "Predictor",
    "activation_shapes",
    "analyse",
    "convolutionalize_onnx",
    "input_channels",
    "load_onnx",
    "metadata_of",
    "model_digest",
    "predict_nchw",
    "save_onnx",
    "self_check_of",
]

logger = logging.getLogger(__name__)

NATIVE_RTOL = 1e-4  # onnxruntime sums in a different order than the original graph's kernels
PLAN_KEY = "convolutionalize.plan"
NATIVE_ERROR_KEY = "convolutionalize.native_error"
SELF_CHECK_KEY = "convolutionalize.self_check"


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX model file; ``ValueError`` (one line) when it is not a readable model."""
    path = Path(path)
    try:
        model = onnx.load_model(str(path))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ...
        raise ValueError(f"cannot read {path.name} as an ONNX model: {first_line(exc)}") from exc
    if not model.graph.node or not model.graph.output:
        raise ValueError(f"cannot read {path.name} as an ONNX model: it has no graph "
                         "(not an ONNX file, or truncated)")
    try:  # by path: works past protobuf's 2 GiB limit and with external data
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ValueError(f"{path.name} is not a valid ONNX model (truncated?): "
                         f"{first_line(exc)}") from exc
    return model


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    logger.info("wrote %s", path)
    return path


def _session(model: onnx.ModelProto):  # -> onnxruntime.InferenceSession
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


class Predictor:
    """An onnxruntime session over ``model`` for repeated NCHW float32 predictions (verify,
    dense maps): one session, many calls. NHWC graphs get the batch transposed."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.session = _session(model)
        self.layout = input_layout(model)
        image = self.session.get_inputs()[0]
        self.input = image.name
        self.dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(
            image.type, np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The first output."""
        return self.run_all(x)[0]

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output, in the graph's order."""
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if self.layout == "NHWC":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return [np.asarray(out) for out in self.session.run(None, {self.input: x})]


def predict_nchw(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Run ``model`` once in onnxruntime on an NCHW float32 batch (see :class:`Predictor`)."""
    return Predictor(model)(x)


def input_channels(model: onnx.ModelProto) -> int:
    """The image channels the graph's input takes (from its declared shape)."""
    dims = dims_of(image_input(model.graph)) or ()
    axis = 3 if input_layout(model) == "NHWC" else 1
    if len(dims) != 4 or not dims[axis]:
        raise ValueError(f"the graph's image input has shape {dims}; a 4-D input with a known "
                         "channel count is needed")
    return int(dims[axis])


def model_digest(model: onnx.ModelProto) -> str:
    """A short hash of the serialized graph (structure, weights and metadata)."""
    return hashlib.sha1(model.SerializeToString(deterministic=True)).hexdigest()[:16]


def activation_shapes(model: onnx.ModelProto, size: tuple[int, int], output: int = 0
                      ) -> tuple[tuple[int, ...], list[int]]:
    """The shape of output ``output`` (without batch, classes first) for one ``size`` input,
    and the element count of every intermediate tensor, without running the model.

    Uses onnxruntime's symbolic shape inference, which follows the Shape -> Gather -> Concat
    -> Reshape chains a converted graph computes its channel shuffles with (``onnx``'s own
    inference gives up there).
    """
    layout = input_layout(model)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    image = image_input(fixed.graph)
    channels = input_channels(model)
    values = (1, *size, channels) if layout == "NHWC" else (1, channels, *size)
    for dim, value in zip(image.type.tensor_type.shape.dim, values):
        dim.Clear()
        dim.dim_value = value
    for value_info in fixed.graph.output:
        value_info.type.tensor_type.ClearField("shape")
    del fixed.graph.value_info[:]
    try:
        inferred = symbolic_shape_inference(fixed)
    except Exception as exc:  # an op the inference does not know
        raise ValueError(f"cannot infer the map size at {size[0]}x{size[1]}: {first_line(exc)}") from exc
    out = dims_of(inferred.graph.output[output]) or ()
    if not out or not all(out):
        raise ValueError(f"cannot infer the map size at {size[0]}x{size[1]} (output shape {out})")
    counts = [int(np.prod(dims)) for v in inferred.graph.value_info
              if (dims := dims_of(v)) and all(dims)]
    return tuple(int(d) for d in out[1:]), counts


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max |actual - expected| / max |expected|`` (float64)."""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    return float(np.abs(a - e).max() / max(float(np.abs(e).max()), 1e-30))


def convolutionalize_onnx(model: onnx.ModelProto, input_size: object = None,
                          pool: PoolMode = "window", output_stride: int | None = None) -> onnx.ModelProto:
    """Convert an ONNX classifier; see :func:`convolutionalize.convolutionalize`.

    The result has symbolic input batch, height and width, one map per original output (in
    order), and carries its geometry, plan, native-size error and self-check in
    ``metadata_props``.
    """
    pool = check_pool(pool)
    graph, plan, head = analyse(model, input_size)
    body, spans = body_geometry(graph, head.feature)
    geometry = geometry_from_plan(plan, pool, body)
    logger.debug("ONNX head:\n%s", plan.describe())
    atrous = None
    if output_stride is not None and (output_stride, output_stride) != geometry.stride:
        atrous = plan_atrous(graph, plan, body, spans, output_stride)
        geometry = at_output_stride(geometry, atrous.stride, atrous.head_dilation)
    if atrous is None:
        converted = rewrite(graph, plan, head, pool, spans)
    else:
        def dense_body(m: onnx.ModelProto) -> None:
            atrous.apply(m, graph)
            if geometry.pool == "window":
                outputs = [(name, value.kind == "pooled" and value.layout == "NHWC")
                           for name, value in head.outputs]
                crop_to_windows(m, graph, outputs, geometry.window, geometry.stride)

        converted = rewrite(graph, plan, head, pool, spans, atrous.head_dilation, dense_body)
    try:
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:
        raise NotConvolutionalizable(f"the rewritten graph fails the ONNX checker: "
                                     f"{first_line(exc)}") from exc
    probe = _Probe(model, plan, geometry, [value for _, value in head.outputs], atrous is None)
    predictor = Predictor(converted)
    error = probe.native(predictor)
    try:
        check = probe.larger(predictor, error, batch=2)
    except NotConvolutionalizable as exc:  # a body node fixes the batch size: keep it fixed
        logger.info("batch stays %d: %s", graph.batch, exc)
        converted = _pin_batch(converted, graph.batch)
        check = probe.larger(Predictor(converted), error, batch=1)
    props = {GEOMETRY_KEY: geometry.to_json(), PLAN_KEY: plan.describe(),
             NATIVE_ERROR_KEY: json.dumps(error), SELF_CHECK_KEY: json.dumps(asdict(check))}
    kept = [p for p in converted.metadata_props if p.key not in props]
    del converted.metadata_props[:]
    converted.metadata_props.extend(kept)
    for key, value in props.items():
        converted.metadata_props.add(key=key, value=value)
    return converted


def self_check_of(model: onnx.ModelProto) -> SelfCheck | None:
    """What a converted graph measured on itself when it was converted (None: not recorded)."""
    text = metadata_of(model).get(SELF_CHECK_KEY)
    if text is None:
        return None
    data = json.loads(text)
    return SelfCheck(data["native_error"], tuple(data["size"]), tuple(data["cells"]),
                     data["crop_error"], tuple(data.get("refused", ())))


def _example(channels: int, size: tuple[int, int], batch: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, channels, *size)).astype(np.float32)


def _pin_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """Give the input and outputs back the static batch size of the original graph."""
    for value in (model.graph.input[0], *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


class _Probe:
    """The self-check (see :mod:`convolutionalize.selfcheck`), with the original graph run in
    onnxruntime: equality at the native size, then at a larger non-square size every map's
    rows and columns, and (crop-equivalent models) cells against the original on true crops."""

    def __init__(self, original: onnx.ModelProto, plan: HeadPlan, geometry: Geometry,
                 outputs: list[Value], network_stride: bool = True) -> None:
        self.original = Predictor(original)
        self.network_stride = network_stride  # False: a denser (à trous) map
        self.plan, self.geometry = plan, geometry
        self.axes = [(1, 2) if v.kind == "pooled" and v.layout == "NHWC" else (2, 3) for v in outputs]

    def native(self, converted: Predictor) -> float | None:
        """The converted graph equals the original at the native size (max relative error)."""
        x = _example(self.plan.in_channels, self.plan.input_size)
        expected, maps = self.original.run_all(x), converted.run_all(x)
        errors = [self._native_error(m, e, axes) for m, e, axes in zip(maps, expected, self.axes)]
        error = None if None in errors else max(errors)  # type: ignore[type-var]
        if error is not None and error > NATIVE_RTOL:
            raise NotConvolutionalizable(f"the rewritten graph differs from the original at the "
                                         f"native size (max relative error {error:.2e})")
        return error

    def _native_error(self, out: np.ndarray, expected: np.ndarray,
                      axes: tuple[int, int]) -> float | None:
        pool = self.geometry.pool
        if pool == "global":
            return relative_error(out, expected)
        if pool == "none" and not self.network_stride:  # a denser CAM averages other positions
            return None
        if out.ndim != 4 or (out.shape[axes[0]], out.shape[axes[1]]) != (
                (1, 1) if pool == "window" else self.plan.feature.size):
            raise NotConvolutionalizable(f"at the native size the map has shape {out.shape}, not "
                                         f"{'1x1' if pool == 'window' else 'the feature map'} "
                                         "cells; the head's geometry was misread")
        if pool == "window":
            return relative_error(out.reshape(expected.shape), expected)
        steps = self.plan.steps
        affine = all(s.op in ("global_pool", "flatten", "linear", "batchnorm") or (
            s.op == "keep" and s.detail.startswith(("Dropout", "Identity"))) for s in steps)
        avg = all(s.reduce != "max" for s in self.plan.steps_of("global_pool"))
        if not (affine and avg):
            return None
        return relative_error(out.mean(axes).reshape(expected.shape), expected)

    def larger(self, converted: Predictor, native_error: float | None, batch: int) -> SelfCheck:
        failures = []
        for size in check_sizes(self.geometry):
            x = _example(self.plan.in_channels, size, batch, seed=2)
            try:
                maps = converted.run_all(x)
            except Exception as exc:  # a body node specific to the native size or batch
                failures.append(f"at {batch}x{size[0]}x{size[1]}: {first_line(exc)}")
                continue
            cells = self._check_shapes(maps, size, batch)
            crop_error = self._crop_error(x, maps, size)
            if crop_error is not None and crop_error > CHECK_RTOL:
                raise NotConvolutionalizable(
                    f"the converted map at {size[0]}x{size[1]} differs from the original on the "
                    f"true crops of its cells (max relative error {crop_error:.2e}); the head's "
                    "geometry or flatten order was misread")
            return SelfCheck(native_error, size, cells, crop_error, tuple(failures))
        raise NotConvolutionalizable(f"the rewritten graph does not run at sizes larger than the "
                                     f"native one ({'; '.join(failures)}); a body node is specific "
                                     "to the native size")

    def _check_shapes(self, maps: list[np.ndarray], size: tuple[int, int],
                      batch: int) -> tuple[int, int]:
        if self.geometry.pool == "global":
            return (1, 1)
        expected = self.geometry.cells(*size)
        for m, axes in zip(maps, self.axes):
            if m.ndim != 4 or m.shape[0] != batch or (m.shape[axes[0]], m.shape[axes[1]]) != expected:
                raise NotConvolutionalizable(
                    f"at {batch}x{size[0]}x{size[1]} the converted graph returns a map of shape "
                    f"{m.shape}, but its geometry predicts {expected[0]}x{expected[1]} cells; the "
                    "map is transposed or the geometry was misread")
        return expected

    def _crop_error(self, x: np.ndarray, maps: list[np.ndarray], size: tuple[int, int]) -> float | None:
        """Max relative error of a few cells against the original run on their windows."""
        geo = self.geometry
        if not geo.crop_equivalent or geo.window != self.plan.input_size:
            return None
        errors = []
        for i, j in check_cells(geo, size):
            x0, y0, x1, y1 = geo.box(i, j)
            originals = self.original.run_all(x[:1, :, y0:y1, x0:x1])
            for m, e, axes in zip(maps, originals, self.axes):
                cell = m[0, :, i, j] if axes == (2, 3) else m[0, i, j, :]
                errors.append(relative_error(cell, e.reshape(-1)))
        return max(errors) if errors else None


def metadata_of(model: onnx.ModelProto) -> dict[str, str]:
    """The ``convolutionalize.*`` metadata a converted ONNX model carries (plan, geometry,
    native error), for ``inspect``."""
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("convolutionalize.")}
