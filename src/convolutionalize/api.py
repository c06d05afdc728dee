"""The public entry points: ``convolutionalize`` and ``geometry_of``."""

from __future__ import annotations

from typing import get_args

from torch import nn

from .frameworks.torch_layers import ConvolutionalizedModule
from .geometry import Geometry, PoolMode

__all__ = ["check_pool", "convolutionalize", "geometry_of"]


def check_pool(pool: object) -> PoolMode:
    """Validate a ``pool`` option; the error names the choices."""
    choices = get_args(PoolMode)
    if pool not in choices:
        raise ValueError(f"pool must be one of {', '.join(map(repr, choices))}, got {pool!r}")
    return pool  # type: ignore[return-value]


def convolutionalize(
    model: nn.Module,
    input_size: int | tuple[int, int] | None = None,
    *,
    pool: PoolMode = "window",
) -> ConvolutionalizedModule:
    """Rewrite a classifier's fully-connected head into equivalent convolutions.

    Args:
        model: a trained ``torch.nn.Module`` classifier. It is not modified.
        input_size: the native (training) input size ``(H, W)``. Required unless the
            model carries it (timm's ``pretrained_cfg``).
        pool: what global pooling becomes. ``"window"``: a stride-1 pool of the native
            feature size, so output cell ``(i, j)`` is the classifier on the native window
            at ``(i * stride, j * stride)``; ``"none"``: no pooling, one score vector per
            feature cell (class activation map); ``"global"``: keep global pooling, one
            prediction per image at any size.

    Returns:
        A module in eval mode returning ``(N, classes, rows, cols)`` (``(N, classes)`` for
        ``pool="global"``), with ``.geometry`` (see :class:`Geometry`), ``.plan`` and
        ``.native_error`` (the relative error measured against the original at the
        native size).

    Raises:
        NotConvolutionalizable: the model cannot be converted; the message names the node.
        ValueError: a bad option (``pool``, ``input_size``) or a missing ``input_size``.
        TypeError: ``model`` is not a supported model type.
    """
    pool = check_pool(pool)
    if isinstance(model, nn.Module):
        from .frameworks.torch_fx import convolutionalize_module

        return convolutionalize_module(model, input_size, pool)
    raise TypeError(
        f"convolutionalize takes a torch.nn.Module, got {type(model).__name__}"
    )


def geometry_of(model: object) -> Geometry:
    """The :class:`Geometry` a converted model carries."""
    geometry = getattr(model, "geometry", None)
    if not isinstance(geometry, Geometry):
        raise TypeError(f"{type(model).__name__} is not a convolutionalized model (no geometry)")
    return geometry
