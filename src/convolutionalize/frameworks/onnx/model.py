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

This module holds the public entry points (conversion, files, running); the analysis lives in
``_onnx_graph`` (graph facts), ``_onnx_head`` (the head and its plan) and ``_onnx_geometry``
(body geometry), the rewrite in ``_onnx_rewrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx

from ..._files import atomic_path
from ...errors import NotConvolutionalizable
from ...geometry import GEOMETRY_KEY, Geometry, PoolMode, check_pool, geometry_from_plan
from ...plan import HeadPlan
from .geometry import body_geometry
from .graph import dims_of, first_line, image_input, input_layout
from .head import analyse
from .rewrite import rewrite

__all__ = [
    "NATIVE_ERROR_KEY",
    "NATIVE_RTOL",
    "PLAN_KEY",
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
]

logger = logging.getLogger(__name__)

NATIVE_RTOL = 1e-4  # onnxruntime sums in a different order than the original graph's kernels
PLAN_KEY = "convolutionalize.plan"
NATIVE_ERROR_KEY = "convolutionalize.native_error"


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
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if self.layout == "NHWC":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return np.asarray(self.session.run(None, {self.input: x})[0])


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


def activation_shapes(model: onnx.ModelProto, size: tuple[int, int]
                      ) -> tuple[tuple[int, ...], list[int]]:
    """The output shape (without batch, classes first) for one ``size`` input, and the element
    count of every intermediate tensor, without running the model.

    Uses onnxruntime's symbolic shape inference, which follows the Shape -> Gather -> Concat
    -> Reshape chains a converted graph computes its channel shuffles with (``onnx``'s own
    inference gives up there).
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    layout = input_layout(model)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    image = image_input(fixed.graph)
    channels = input_channels(model)
    values = (1, *size, channels) if layout == "NHWC" else (1, channels, *size)
    for dim, value in zip(image.type.tensor_type.shape.dim, values):
        dim.Clear()
        dim.dim_value = value
    for output in fixed.graph.output:
        output.type.tensor_type.ClearField("shape")
    del fixed.graph.value_info[:]
    try:
        inferred = SymbolicShapeInference.infer_shapes(fixed)
    except Exception as exc:  # an op the inference does not know
        raise ValueError(f"cannot infer the map size at {size[0]}x{size[1]}: {first_line(exc)}") from exc
    out = dims_of(inferred.graph.output[0]) or ()
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
                          pool: PoolMode = "window") -> onnx.ModelProto:
    """Convert an ONNX classifier; see :func:`convolutionalize.convolutionalize`.

    The result has symbolic input height and width and carries its geometry, plan and
    native-size error in ``metadata_props``.
    """
    pool = check_pool(pool)
    graph, plan, head = analyse(model, input_size)
    body, spans = body_geometry(graph, head.feature)
    geometry = geometry_from_plan(plan, pool, body)
    logger.debug("ONNX head:\n%s", plan.describe())
    converted = rewrite(graph, plan, head, pool, spans)
    try:
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:
        raise NotConvolutionalizable(f"the rewritten graph fails the ONNX checker: "
                                     f"{first_line(exc)}") from exc
    error = _check_native(model, converted, plan, geometry)
    try:
        _check_larger(converted, plan, geometry, batch=2)
    except NotConvolutionalizable as exc:  # a body node fixes the batch size: keep it fixed
        logger.info("batch stays %d: %s", graph.batch, exc)
        converted = _pin_batch(converted, graph.batch)
        _check_larger(converted, plan, geometry, batch=1)
    props = {GEOMETRY_KEY: geometry.to_json(), PLAN_KEY: plan.describe(),
             NATIVE_ERROR_KEY: json.dumps(error)}
    kept = [p for p in converted.metadata_props if p.key not in props]
    del converted.metadata_props[:]
    converted.metadata_props.extend(kept)
    for key, value in props.items():
        converted.metadata_props.add(key=key, value=value)
    return converted


def _example(plan: HeadPlan, size: tuple[int, int], batch: int = 1) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, plan.in_channels, *size)).astype(np.float32)


def _pin_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """Give the input and output back the static batch size of the original graph."""
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


def _check_native(original: onnx.ModelProto, converted: onnx.ModelProto, plan: HeadPlan,
                  geometry: Geometry) -> float | None:
    """The converted graph equals the original at the native size (max relative error)."""
    x = _example(plan, plan.input_size)
    expected, out = predict_nchw(original, x), predict_nchw(converted, x)
    if geometry.pool == "window":
        if out.shape[-2:] != (1, 1):
            raise NotConvolutionalizable(f"at the native size the map is {out.shape[-2:]}, not 1x1; "
                                         "the head's geometry was misread")
        error: float | None = relative_error(out.reshape(expected.shape), expected)
    elif geometry.pool == "global":
        error = relative_error(out, expected)
    else:
        affine = all(s.op in ("global_pool", "flatten", "linear", "batchnorm") or (
            s.op == "keep" and s.detail.startswith(("Dropout", "Identity"))) for s in plan.steps)
        avg = all(s.reduce != "max" for s in plan.steps_of("global_pool"))
        error = relative_error(out.mean((2, 3)), expected) if affine and avg else None
    if error is not None and error > NATIVE_RTOL:
        raise NotConvolutionalizable(f"the rewritten graph differs from the original at the native "
                                     f"size (max relative error {error:.2e})")
    return error


def _check_larger(converted: onnx.ModelProto, plan: HeadPlan, geometry: Geometry,
                  batch: int) -> None:
    """The converted graph runs two strides larger and gives the map size the geometry says."""
    size = (plan.input_size[0] + 2 * geometry.stride[0], plan.input_size[1] + 2 * geometry.stride[1])
    try:
        out = predict_nchw(converted, _example(plan, size, batch))
    except Exception as exc:
        raise NotConvolutionalizable(f"the rewritten graph does not run at {batch}x{size[0]}x{size[1]}; "
                                     f"a body node is specific to the native size: "
                                     f"{first_line(exc)}") from exc
    if geometry.pool != "global":
        cells = geometry.cells(*size)
        got = tuple(out.shape[2:]) if out.ndim == 4 else None
        if got != cells and tuple(out.shape[1:3]) != cells:
            raise NotConvolutionalizable(f"at {size[0]}x{size[1]} the map is {got}, the geometry "
                                         f"says {cells}")


def metadata_of(model: onnx.ModelProto) -> dict[str, str]:
    """The ``convolutionalize.*`` metadata a converted ONNX model carries (plan, geometry,
    native error), for ``inspect``."""
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("convolutionalize.")}
