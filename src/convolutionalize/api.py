"""The public entry points: ``convolutionalize`` and ``geometry_of``.

``convolutionalize`` dispatches on the kind of model to one framework adapter in
``frameworks/``; each adapter finds the head (a :class:`~convolutionalize.plan.HeadPlan`)
and rewrites it, returning a model of the same kind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .geometry import GEOMETRY_KEY, Geometry, PoolMode, check_pool

__all__ = [
    "ConversionInfo",
    "conversion_info",
    "convolutionalize",
    "geometry_of",
]

def convolutionalize(
    model: Any,
    input_size: int | tuple[int, int] | None = None,
    *,
    pool: PoolMode = "window",
    output_stride: int | None = None,
) -> Any:
    """Rewrite a classifier's fully-connected head into equivalent convolutions.

    Args:
        model: a trained ``torch.nn.Module``, ``keras.Model`` or ``onnx.ModelProto``, or a
            path to a ``.keras`` / ``.h5`` / ``.onnx`` file. It is not modified.
        input_size: the native (training) input size ``(H, W)``. Required unless the
            model carries it (timm's ``pretrained_cfg``, a Keras model's static input
            shape, an ONNX graph's static input dims).
        pool: what global pooling becomes. ``"window"``: a stride-1 pool of the native
            feature size, so output cell ``(i, j)`` is the classifier on the native window
            at ``(i * stride, j * stride)``; ``"none"``: no pooling, one score vector per
            feature cell (class activation map); ``"global"``: keep global pooling, one
            prediction per image at any size.
        output_stride: score a window every ``output_stride`` pixels instead of every network
            stride (à trous: the last strided layers run at stride 1 and every later kernel is
            dilated; weights unchanged). Must divide the network stride into factors its
            strided layers have (ResNet: 32, 16, 8, 4, 2, 1); ``None``: the network stride.
            PyTorch, ONNX and Keras models; ``pool="window"`` or ``"none"``.

    Returns:
        A model of the same kind (a path gives the loaded, converted model). For PyTorch a
        :class:`~convolutionalize.frameworks.torch.layers.ConvolutionalizedModule` in eval
        mode returning ``(N, classes, rows, cols)`` (``(N, classes)`` for ``"global"``),
        with ``.geometry``, ``.plan`` and ``.native_error`` (the relative error measured
        against the original at the native size). ``geometry_of`` reads any kind's geometry.

    Raises:
        NotConvolutionalizable: the model cannot be converted; the message names the node.
        ValueError: a bad option (``pool``, ``input_size``), a missing ``input_size``, or
            an unreadable model file.
        TypeError: ``model`` is not a supported model type.
    """
    pool = check_pool(pool)
    check_output_stride(output_stride, pool)
    if isinstance(model, (str, os.PathLike)):
        model = load_model_file(model)
    if is_keras_model(model):  # first: with KERAS_BACKEND=torch a keras.Model is an nn.Module too
        from .frameworks.keras.model import convolutionalize_keras

        return convolutionalize_keras(model, input_size, pool, output_stride)
    if isinstance(model, nn.Module):
        from .frameworks.torch.model import convolutionalize_module

        return convolutionalize_module(model, input_size, pool, output_stride)
    if is_onnx_model(model):
        from .frameworks.onnx.model import convolutionalize_onnx

        return convolutionalize_onnx(model, input_size, pool, output_stride)
    raise TypeError(
        "convolutionalize takes a torch.nn.Module, a keras.Model, an onnx.ModelProto or a "
        f".keras/.h5/.onnx path, got {type(model).__name__}"
    )


def check_output_stride(output_stride: object, pool: PoolMode) -> int | None:
    """Validate an ``output_stride`` option."""
    if output_stride is None:
        return None
    if isinstance(output_stride, bool) or not isinstance(output_stride, int):
        raise TypeError(f"output_stride must be a positive int, got {type(output_stride).__name__}")
    if output_stride < 1:
        raise ValueError(f"output_stride must be a positive int, got {output_stride}")
    if pool == "global":
        raise ValueError("output_stride needs pool='window' or pool='none' (pool='global' gives one "
                         "prediction per image)")
    return output_stride


def load_model_file(path: str | os.PathLike[str]) -> Any:
    """Load a ``.onnx``, ``.keras`` or legacy HDF5 ``.h5`` / ``.hdf5`` Keras model file (the
    kinds ``convolutionalize`` takes by path)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from .frameworks.onnx.model import load_onnx

        return load_onnx(path)
    if suffix in (".keras", ".h5", ".hdf5"):
        from .frameworks.keras.model import load_keras

        return load_keras(path)
    raise ValueError(f"cannot load {path.name}: convolutionalize reads .onnx, .keras and .h5 files "
                     "(load PyTorch models yourself and pass the nn.Module)")


def is_onnx_model(model: object) -> bool:
    return type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx")


def is_keras_model(model: object) -> bool:
    return any(c.__module__.startswith("keras") and c.__name__ in ("Model", "Functional",
               "Sequential") for c in type(model).__mro__)


def geometry_of(model: object) -> Geometry:
    """The :class:`Geometry` a converted model carries (any framework)."""
    geometry = getattr(model, "geometry", None)
    if isinstance(geometry, Geometry):
        return geometry
    if is_onnx_model(model):
        for prop in model.metadata_props:  # type: ignore[attr-defined]
            if prop.key == GEOMETRY_KEY:
                return Geometry.from_json(prop.value)
    raise TypeError(f"{type(model).__name__} is not a convolutionalized model (no geometry)")


@dataclass(frozen=True)
class ConversionInfo:
    """What any converted model records about its conversion (read by the CLI and verify)."""

    plan: str  # the HeadPlan, human-readable
    geometry: Geometry
    native_error: float | None
    in_channels: int
    self_check: str | None = None  # what the conversion measured at a larger size


def conversion_info(fcn: object) -> ConversionInfo:
    """The plan, geometry, native-size error and image channels of a converted model."""
    geometry = geometry_of(fcn)
    if is_onnx_model(fcn):
        from .frameworks.onnx.model import NATIVE_ERROR_KEY, PLAN_KEY, input_channels, self_check_of

        props = {p.key: p.value for p in fcn.metadata_props}  # type: ignore[attr-defined]
        onnx_check = self_check_of(fcn)  # type: ignore[arg-type]
        return ConversionInfo(props.get(PLAN_KEY, ""), geometry,
                              json.loads(props.get(NATIVE_ERROR_KEY, "null")),
                              input_channels(fcn),  # type: ignore[arg-type]
                              None if onnx_check is None else onnx_check.describe())
    plan = fcn.plan  # type: ignore[attr-defined]
    check = getattr(fcn, "self_check", None)
    return ConversionInfo(plan.describe(), geometry, fcn.native_error,  # type: ignore[attr-defined]
                          plan.in_channels, None if check is None else check.describe())
