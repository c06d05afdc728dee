"""Eager-mode quantized PyTorch models (``torch.ao.quantization`` prepare/convert): what their
modules are to the analysis, and the quantized convolution a quantized Linear head becomes.

Quantized modules are told by their form, not their names: a ``torch.ao.nn.quantized.Conv2d``
(the fused ``ConvReLU2d`` and the other fusions subclass it) is a convolution with its kernel,
stride, padding and dilation as attributes; ``Quantize`` / ``DeQuantize`` act on each element;
``QFunctional``'s ``add`` / ``add_relu`` / ``mul`` / ``cat`` trace to ``torch.ops.quantized``
operators of those names (per location, or channel-wise). Pools of quantized maps are the float
pool modules and functions, run by quantized kernels.

A statically quantized ``Linear`` (or ``LinearReLU``) after a flatten or a global pool becomes a
statically quantized ``Conv2d`` (``ConvReLU2d``) whose int8 kernel holds the Linear's int8
weights reordered (no rounding: the same integers with the same per-tensor or per-output-channel
scales and zero points), the same float bias and the same output scale and zero point. Integer
accumulation is exact; the two kernels (linear, convolution) requantize their int32 sums the same
way at every cell, so a cell equals the Linear's output on its crop up to a rare one-step
difference in the requantization's rounding (see ``selfcheck.TOLERANCES["quantized"]``).

What has no exact quantized sliding form is refused: a dynamically quantized Linear (its input
scale is measured on each whole input, so a cell of a large map would be quantized with the
scale of the whole map, not of its crop) and fused Linear + LeakyReLU / Tanh modules (no
quantized convolution fuses them).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
from torch import nn

from ...errors import NotConvolutionalizable
from ...weights import linear_to_oihw

__all__ = ["QUANTIZED_CONVS", "QUANTIZED_OPS", "QUANTIZED_PER_LOCATION", "is_quantized_linear",
           "quantized_conv_from_linear", "quantized_linear_refusal"]

QUANTIZED_CONVS: tuple[type[nn.Module], ...] = (nnq.Conv2d,)  # ConvReLU2d, ConvAdd2d, ... subclass it
QUANTIZED_PER_LOCATION: tuple[type[nn.Module], ...] = (nnq.Quantize, nnq.DeQuantize, nnq.PReLU)
# torch.ops.quantized operators (QFunctional's methods, the functional quantize) that act on each
# element or location; ``add``, ``mul`` and ``cat`` share their names with the float ones.
QUANTIZED_OPS = frozenset({"add_relu", "add_scalar", "add_scalar_relu", "add_scalar_out", "mul_relu",
                           "mul_scalar", "mul_scalar_relu", "quantize_per_tensor", "dequantize",
                           "quantize_per_channel"})
_FUSED = {nniq.LinearReLU: nniq.ConvReLU2d}  # quantized Linear fusions with a Conv2d counterpart


def is_quantized_linear(module: nn.Module | None) -> bool:
    """A Linear of ``torch.ao.nn.quantized`` (static, dynamic or fused with an activation)."""
    return isinstance(module, nnq.Linear)


def quantized_linear_refusal(module: nn.Module) -> str | None:
    """Why a quantized Linear has no exact quantized convolution, or None when it has."""
    if isinstance(module, nnqd.Linear):
        return ("is dynamically quantized: its input's scale is measured on each whole input, so a "
                "cell of a larger map would be quantized with the scale of the whole map, not of its "
                "crop; no sliding form gives the same numbers (quantize it statically)")
    if type(module) is not nnq.Linear and type(module) not in _FUSED:
        return (f"is a quantized Linear fused with an activation ({type(module).__name__}) that no "
                "quantized Conv2d fuses; there is no exact quantized convolution for it")
    weight = module.weight()
    if weight.qscheme() not in (torch.per_tensor_affine, torch.per_channel_affine) or (
            weight.qscheme() == torch.per_channel_affine and weight.q_per_channel_axis() != 0):
        return (f"has weights quantized as {weight.qscheme()} (axis "
                f"{weight.q_per_channel_axis() if weight.qscheme() != torch.per_tensor_affine else '-'}); "
                "only per-tensor and per-output-channel affine weights carry over to a convolution")
    return None


def quantized_conv_from_linear(module: nn.Module, kernel: tuple[int, int], layout: str,
                               dilation: tuple[int, int] = (1, 1)) -> nn.Module:
    """The quantized ``Conv2d`` (``ConvReLU2d`` for a ``LinearReLU``) that computes ``module``
    over every ``kernel`` window of a map flattened in ``layout`` order (``"CHW"``, ...)."""
    reason = quantized_linear_refusal(module)
    if reason is not None:
        raise NotConvolutionalizable(f"quantized Linear {type(module).__name__} {reason}")
    weight, bias = module.weight(), module.bias()
    out_features, in_features = weight.shape
    kh, kw = kernel
    channels = in_features // (kh * kw)
    integers = linear_to_oihw(weight.int_repr().numpy(), channels, kh, kw, layout)
    integers = torch.from_numpy(np.ascontiguousarray(integers))
    if weight.qscheme() == torch.per_channel_affine:
        qweight = torch._make_per_channel_quantized_tensor(
            integers, weight.q_per_channel_scales(), weight.q_per_channel_zero_points(), 0)
    else:
        qweight = torch._make_per_tensor_quantized_tensor(integers, weight.q_scale(), weight.q_zero_point())
    conv_type = _FUSED.get(type(module), nnq.Conv2d)
    conv = conv_type(channels, out_features, kernel, dilation=dilation, bias=bias is not None)
    conv.set_weight_bias(qweight, bias)
    conv.scale, conv.zero_point = float(module.scale), int(module.zero_point)
    if not torch.equal(conv.weight().int_repr(), integers):  # the packing must keep every integer
        raise NotConvolutionalizable(f"the quantized engine '{torch.backends.quantized.engine}' "
                                     f"changed the weights of the convolution made from quantized "
                                     f"Linear {type(module).__name__} when packing them")
    return conv
