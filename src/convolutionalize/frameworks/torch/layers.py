"""The small PyTorch modules a converted head is built from, and the converted model itself."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import TreeSpec, tree_unflatten

from ...outputs import OutputKey, select_output

if TYPE_CHECKING:
    from ...geometry import Geometry
    from ...plan import HeadPlan
    from ...selfcheck import SelfCheck

__all__ = ["ChannelLayerNorm", "ConvolutionalizedModule", "DilatedAvgPool2d", "WindowCells", "WindowPool",
           "activation_shapes", "channel_layer_norm", "dilated_avg_pool2d"]

logger = logging.getLogger(__name__)


class WindowPool(nn.Module):
    """A global pool made local: a stride-1 pool of the native feature size (or none).

    ``kernel=None`` drops the pooling (every feature cell gets its own scores). A map in
    another axis order (NHWC, say) is first permuted to NCHW (``permute``), which the
    rewritten head expects.
    """

    def __init__(
        self,
        reduce: Literal["avg", "max"],
        kernel: tuple[int, int] | None,
        permute: tuple[int, int, int, int] | None = None,
        dilation: tuple[int, int] = (1, 1),
    ) -> None:
        super().__init__()
        self.reduce = reduce
        self.kernel = kernel
        self.permute = permute
        self.dilation = dilation  # > 1 at an output stride below the network's (a trous)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.permute is not None:
            x = x.permute(self.permute)
        if self.kernel is None:
            return x
        if self.reduce == "max":
            return F.max_pool2d(x, self.kernel, stride=1, dilation=self.dilation)
        if self.dilation != (1, 1):
            return dilated_avg_pool2d(x, self.kernel, self.dilation)
        return F.avg_pool2d(x, self.kernel, stride=1)

    def extra_repr(self) -> str:
        return f"reduce={self.reduce!r}, kernel={self.kernel}, stride=1, dilation={self.dilation}"


def dilated_avg_pool2d(x: torch.Tensor, kernel: tuple[int, int], dilation: tuple[int, int],
                       padding: tuple[int, int] = (0, 0), count_include_pad: bool = True,
                       extra: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """A stride-1 average pool whose window taps are ``dilation`` apart (PyTorch's avg_pool2d
    has no dilation): the mean over rows, then over columns, each a depthwise convolution with
    weights 1/k (kh + kw taps per cell, not kh * kw: a 7x7 pool over 2048 channels costs 10 %
    of a stride-8 ResNet-50 pass done in one convolution), and, where the padding must not
    count, divided by the share of real pixels each window holds. ``extra`` rows and columns
    past the far edge are windows hanging off the end that count only the pixels inside (what
    a ``ceil_mode`` pool's last window does), so that the output keeps the input's size."""
    if extra == (0, 0) and (count_include_pad or padding == (0, 0)):
        return _separable_mean(x, kernel, dilation, padding)
    if extra == (0, 0):
        inside = _separable_mean(torch.ones_like(x[:1, :1]), kernel, dilation, padding)
        return _separable_mean(x, kernel, dilation, padding) / inside
    (py, px), (ey, ex) = padding, extra
    padded = F.pad(x, (px, px + ex, py, py + ey))
    inside = F.pad(torch.ones_like(x[:1, :1]), (px, px, py, py), value=1.0 if count_include_pad else 0.0)
    inside = F.pad(inside, (0, ex, 0, ey))
    none = (0, 0)
    return _separable_mean(padded, kernel, dilation, none) / _separable_mean(inside, kernel, dilation, none)


def _separable_mean(x: torch.Tensor, kernel: tuple[int, int], dilation: tuple[int, int],
                    padding: tuple[int, int]) -> torch.Tensor:
    channels = x.shape[1]
    rows = torch.full((channels, 1, kernel[0], 1), 1.0 / kernel[0], dtype=x.dtype, device=x.device)
    cols = torch.full((channels, 1, 1, kernel[1]), 1.0 / kernel[1], dtype=x.dtype, device=x.device)
    x = F.conv2d(x, rows, padding=(padding[0], 0), dilation=(dilation[0], 1), groups=channels)
    return F.conv2d(x, cols, padding=(0, padding[1]), dilation=(1, dilation[1]), groups=channels)


class WindowCells(nn.Module):
    """Keeps the cells whose native-size window lies inside the image.

    At an output stride below the network's, a zero-padded body yields a few trailing cells
    more than ``floor((size - window) / stride) + 1``: their windows reach past the image's
    far edge, into the padding. The geometry promises windows, so they are cut.
    """

    def __init__(self, window: tuple[int, int], stride: tuple[int, int]) -> None:
        super().__init__()
        self.window, self.stride = window, stride

    def forward(self, scores: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        rows = (image.shape[-2] - self.window[0]) // self.stride[0] + 1
        cols = (image.shape[-1] - self.window[1]) // self.stride[1] + 1
        return scores[..., :rows, :cols]

    def extra_repr(self) -> str:
        return f"window={self.window}, stride={self.stride}"


class DilatedAvgPool2d(nn.Module):
    """``nn.AvgPool2d`` at stride 1 with its taps ``dilation`` apart (see dilated_avg_pool2d)."""

    def __init__(self, kernel: tuple[int, int], dilation: tuple[int, int], padding: tuple[int, int],
                 count_include_pad: bool, extra: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        self.kernel, self.dilation, self.padding = kernel, dilation, padding
        self.count_include_pad, self.extra = count_include_pad, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dilated_avg_pool2d(x, self.kernel, self.dilation, self.padding, self.count_include_pad,
                                  self.extra)

    def extra_repr(self) -> str:
        return (f"kernel={self.kernel}, dilation={self.dilation}, padding={self.padding}, "
                f"count_include_pad={self.count_include_pad}, extra={self.extra}")


def channel_layer_norm(
    x: torch.Tensor,
    normalized_shape: list[int] | tuple[int, ...],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.layer_norm`` over the channels of an NCHW map, at every location."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), normalized_shape, weight, bias, eps)
    return y.permute(0, 3, 1, 2)


class ChannelLayerNorm(nn.LayerNorm):
    """A feature-vector ``nn.LayerNorm`` applied per location of an NCHW map."""

    @classmethod
    def from_layer_norm(cls, norm: nn.LayerNorm) -> ChannelLayerNorm:
        new = cls(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                  bias=norm.bias is not None)
        new.load_state_dict(norm.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class ConvolutionalizedModule(nn.Module):
    """A classifier whose head was rewritten into convolutions.

    ``forward`` returns ``(N, classes, rows, cols)`` for ``pool="window"``/``"none"`` and
    ``(N, classes)`` for ``pool="global"``; a model with several outputs returns the same
    structure as the original (tuple, dict, dataclass, transformers ``ModelOutput``), every
    head output such a map on one geometry. ``geometry`` says where each cell sits in the
    input; ``plan`` lists what was rewritten; ``native_error`` is the maximum relative
    error measured against the original at the native input size during conversion
    (``None`` where the mode has no native-size equality to check); ``self_check`` also
    holds what was measured at a larger, non-square size.
    """

    def __init__(
        self,
        net: nn.Module,
        geometry: Geometry,
        plan: HeadPlan,
        self_check: SelfCheck,
        out_spec: TreeSpec | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.geometry = geometry
        self.plan = plan
        self.self_check = self_check
        self.out_spec = out_spec  # torch.export captures: rebuilds the model's own output

    @property
    def native_error(self) -> float | None:
        return self.self_check.native_error

    def forward(self, x: torch.Tensor) -> Any:
        out = self.net(x)
        return out if self.out_spec is None else tree_unflatten(list(out), self.out_spec)

    def output_size(self, height: int, width: int, output: OutputKey = None) -> tuple[int, ...]:
        """The shape of one image's output ``output`` (the class scores by default) for an
        ``height x width`` input, without compute (see :func:`activation_shapes`): ``(classes,
        rows, cols)`` for a map (``(classes,)`` with ``pool="global"``); the batch axis is left
        out. ``geometry.cells(height, width)`` predicts ``(rows, cols)`` alone, without the model.
        """
        return activation_shapes(self, self.plan.in_channels, (height, width), output)[0]


def activation_shapes(model: nn.Module, channels: int, size: tuple[int, int],
                      output: OutputKey = None) -> tuple[tuple[int, ...], list[int]]:
    """The output shape (without batch) of ``model`` for one ``channels x size`` input, and the
    element count of every leaf module's output, without memory for activations or compute.

    Runs on ``meta`` tensors, the weights swapped for meta stand-ins with ``functional_call``
    (nothing copied; ~0.1 s for a ResNet-50); where a layer has no meta kernel, falls back to
    fake tensors (several times slower with batch norms), without the leaf sizes.
    """
    from torch.func import functional_call

    sizes: list[int] = []
    meta = {name: torch.empty_like(t, device="meta") for name, t in
            (*model.named_parameters(), *model.named_buffers())}
    hooks = [m.register_forward_hook(lambda _m, _a, out: sizes.append(out.numel())
                                     if isinstance(out, torch.Tensor) else None)
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            out = functional_call(model, meta, (torch.empty(1, channels, *size, device="meta"),),
                                  strict=False)
        return tuple(select_output(out, output).shape[1:]), sizes
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        logger.debug("meta shapes failed (%s); measuring with fake tensors", exc)
    finally:
        for hook in hooks:
            hook.remove()
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # a size the network rejects is raised to the caller, not logged
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            x = mode.from_tensor(torch.empty(1, channels, *size))
            return tuple(select_output(model(x), output).shape[1:]), []
    finally:
        fake_log.setLevel(level)
