"""The public entry points: ``convolutionalize`` and ``geometry_of``.

``convolutionalize`` dispatches on the kind of model to one framework adapter in
``frameworks/``; each adapter finds the head (a :class:`~convolutionalize.plan.HeadPlan`)
and rewrites it, returning a model of the same kind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import ArgumentError, NotConvolutionalizable, first_line
from .frameworks import accepted, adapter_for, adapter_for_path
from .frameworks.base import Conversion, ConversionInfo
from .geometry import Geometry, PoolMode, check_pool

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
    pool: PoolMode | None = None,
    output_stride: int | None = None,
) -> Any:
    """Rewrite a classifier's fully-connected head into equivalent convolutions.

    Args:
        model: a trained ``torch.nn.Module``, ``keras.Model`` or ``onnx.ModelProto``, or a
            path to a ``.keras`` / ``.h5`` / ``.onnx`` / ``.pt2`` file. It is not modified. A
            model that is already converted (a saved conversion read back) is returned as it
            is, where ``pool`` and ``output_stride`` are left out or agree with it.
        input_size: the native (training) input size ``(H, W)``. Required unless the
            model carries it (timm's ``pretrained_cfg``, a Keras model's static input
            shape, an ONNX graph's static input dims).
        pool: what global pooling becomes. ``"window"``: a stride-1 pool of the native
            feature size, so output cell ``(i, j)`` is the classifier on the native window
            at ``(i * stride, j * stride)``; ``"none"``: no pooling, one score vector per
            feature cell (class activation map); ``"global"``: keep global pooling, one
            prediction per image at any size. ``None``: ``"window"``.
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
    mode = check_pool("window" if pool is None else pool)
    check_output_stride(output_stride, mode)
    if isinstance(model, (str, os.PathLike)):
        model = load_model_file(model)
    try:
        adapter = adapter_for(model)
    except TypeError:
        raise TypeError(f"convolutionalize takes {accepted()}, got {type(model).__name__}") from None
    conversion = adapter.conversion(model)
    if conversion is not None:
        return _already_converted(model, conversion, pool, output_stride)
    size = adapter.native_size(model, input_size)  # the caller's mistakes stay ValueErrors
    try:
        return adapter.convert(model, size if size is not None else input_size, mode, output_stride)
    except (NotConvolutionalizable, ArgumentError):
        raise
    except Exception as exc:  # a model we did not foresee: a typed refusal, never a crash
        raise NotConvolutionalizable(f"cannot convert {adapter.label(model)}: {type(exc).__name__}: "
                                     f"{first_line(exc)}") from exc


def _already_converted(fcn: Any, conversion: Conversion, pool: PoolMode | None,
                       output_stride: int | None) -> Any:
    """A converted model given again (a saved file read back): itself, where the options
    asked for agree with how it was converted."""
    geometry = conversion.geometry
    if pool is not None and check_pool(pool) != geometry.pool:
        raise ValueError(f"the model is already converted with pool={geometry.pool!r}, not "
                         f"pool={pool!r}; convert the original model again to change it")
    if output_stride is not None and (output_stride, output_stride) != geometry.stride:
        raise ValueError(f"the model is already converted with stride {geometry.stride[0]}x"
                         f"{geometry.stride[1]}; convert the original model with "
                         f"output_stride={output_stride} instead")
    return fcn


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
    """Load a model file that carries its weights (``.onnx``, ``.keras``, legacy ``.h5`` /
    ``.hdf5``, ``.pt2``): the kinds ``convolutionalize`` takes by path. A converted model
    comes back with its geometry, plan and self-check."""
    path = Path(path)
    if not path.exists():  # a file, or a directory such as a TensorFlow SavedModel
        raise ValueError(f"model file {path} does not exist")
    return adapter_for_path(path).load(path)


def geometry_of(model: object) -> Geometry:
    """The :class:`Geometry` a converted model carries (any framework)."""
    return _conversion(model).geometry


def conversion_info(fcn: object) -> ConversionInfo:
    """The plan, geometry, native-size error and image channels of a converted model."""
    _conversion(fcn)  # TypeError for a model that is not converted
    return adapter_for(fcn).info(fcn)


def _conversion(model: object) -> Conversion:
    try:
        conversion = adapter_for(model).conversion(model)
    except TypeError:
        conversion = None
    if conversion is None:
        raise TypeError(f"{type(model).__name__} is not a convolutionalized model (no geometry)")
    return conversion
