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
from pathlib import Path

import numpy as np
import onnx

from ..._files import atomic_path
from ...errors import NotConvolutionalizable, first_line
from ...geometry import GEOMETRY_KEY, PoolMode, at_output_stride, check_pool, geometry_from_plan
from ...selfcheck import Reference, Run, SelfCheck
from ..base import META_KEY, Conversion
from .atrous import crop_to_windows, plan_atrous
from .geometry import body_geometry
from .graph import dims_of, image_input, input_layout, is_quantized, symbolic_shape_inference
from .head import analyse
from .rewrite import rewrite

__all__ = [
    "NATIVE_ERROR_KEY",
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
    "read_conversion",
    "save_onnx",
    "self_check_of",
    "write_conversion",
]

logger = logging.getLogger(__name__)

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


HALF_TYPES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


def _precision(model: onnx.ModelProto, io_dtype: type) -> str:
    """The precision the graph computes in: its input's, or half where its weights are half
    (a float16 graph with float32 inputs and outputs casts inside), or "quantized"."""
    if is_quantized(model):
        return "quantized"
    graph = model.graph
    halves = [HALF_TYPES[t.data_type] for t in graph.initializer if t.data_type in HALF_TYPES]
    halves += [HALF_TYPES[a.i] for n in graph.node if n.op_type == "Cast"
               for a in n.attribute if a.name == "to" and a.i in HALF_TYPES]
    if "bfloat16" in halves:
        return "bfloat16"
    return "float16" if halves else np.dtype(io_dtype).name


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
        self.precision = _precision(model, self.dtype)  # the self-check's tolerance follows it

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


def convolutionalize_onnx(model: onnx.ModelProto, input_size: object = None, pool: PoolMode = "window",
                          output_stride: int | None = None) -> onnx.ModelProto:
    """Convert an ONNX classifier; see :func:`convolutionalize.convolutionalize`.

    The result has symbolic input batch, height and width, one map per original output (in
    order), and carries its conversion (geometry, plan, self-check) in ``metadata_props``.
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
    nhwc = [v.kind == "pooled" and v.layout == "NHWC" for _, v in head.outputs]
    original = Predictor(model)
    reference = Reference(original.run_all, plan, geometry, precision=original.precision,
                          network_stride=atrous is None)
    try:
        check = reference.check(_maps(Predictor(converted), nhwc), batch=2)
    except NotConvolutionalizable as exc:  # a body node fixes the batch size: keep it fixed
        logger.info("batch stays %d: %s", graph.batch, exc)
        converted = _pin_batch(converted, graph.batch)
        check = reference.check(_maps(Predictor(converted), nhwc), batch=1)
    write_conversion(converted, Conversion(geometry, plan, check))
    return converted


def _maps(predictor: Predictor, nhwc: list[bool]) -> Run:
    """Every output of a converted graph with its maps NCHW (pooled NHWC heads keep the
    layout they were pooled in)."""
    def run(x: np.ndarray) -> list[np.ndarray]:
        return [m.transpose(0, 3, 1, 2) if last and m.ndim == 4 else m
                for m, last in zip(predictor.run_all(x), nhwc)]

    return run


def write_conversion(model: onnx.ModelProto, conversion: Conversion) -> None:
    """Record ``conversion`` in ``model.metadata_props`` (replacing an earlier record)."""
    check = conversion.self_check
    props = {GEOMETRY_KEY: conversion.geometry.to_json(), PLAN_KEY: conversion.plan.describe(),
             NATIVE_ERROR_KEY: json.dumps(conversion.native_error),
             SELF_CHECK_KEY: json.dumps(None if check is None else check.to_dict()),
             META_KEY: conversion.to_json()}
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)


def read_conversion(model: onnx.ModelProto) -> Conversion | None:
    """The conversion a converted graph carries (None: not a converted graph)."""
    text = metadata_of(model).get(META_KEY)
    return None if text is None else Conversion.from_json(text)


def self_check_of(model: onnx.ModelProto) -> SelfCheck | None:
    """What a converted graph measured on itself when it was converted (None: not recorded)."""
    text = metadata_of(model).get(SELF_CHECK_KEY)
    return None if text is None else SelfCheck.from_dict(json.loads(text))


def _pin_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """Give the input and outputs back the static batch size of the original graph."""
    for value in (model.graph.input[0], *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


def metadata_of(model: onnx.ModelProto) -> dict[str, str]:
    """The ``convolutionalize.*`` metadata a converted ONNX model carries (plan, geometry,
    native error), for ``inspect``."""
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("convolutionalize.")}
