"""The small PyTorch modules a converted head is built from, and the converted model itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ..geometry import Geometry
    from ..plan import HeadPlan

__all__ = ["ChannelLayerNorm", "ConvolutionalizedModule", "WindowPool", "channel_layer_norm"]


class WindowPool(nn.Module):
    """A global pool made local: a stride-1 pool of the native feature size (or none).

    ``kernel=None`` drops the pooling (every feature cell gets its own scores). Input in
    NHWC (``channels_last_input``) is returned as NCHW, which the rewritten head expects.
    """

    def __init__(
        self,
        reduce: Literal["avg", "max"],
        kernel: tuple[int, int] | None,
        channels_last_input: bool = False,
    ) -> None:
        super().__init__()
        self.reduce = reduce
        self.kernel = kernel
        self.channels_last_input = channels_last_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_input:
            x = x.permute(0, 3, 1, 2)
        if self.kernel is None:
            return x
        if self.reduce == "max":
            return F.max_pool2d(x, self.kernel, stride=1)
        return F.avg_pool2d(x, self.kernel, stride=1)

    def extra_repr(self) -> str:
        return f"reduce={self.reduce!r}, kernel={self.kernel}, stride=1"


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
    ``(N, classes)`` for ``pool="global"``. ``geometry`` says where each cell sits in the
    input; ``plan`` lists what was rewritten; ``native_error`` is the maximum relative
    error measured against the original at the native input size during conversion
    (``None`` where the mode has no native-size equality to check).
    """

    def __init__(
        self,
        net: nn.Module,
        geometry: Geometry,
        plan: HeadPlan,
        native_error: float | None,
    ) -> None:
        super().__init__()
        self.net = net
        self.geometry = geometry
        self.plan = plan
        self.native_error = native_error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def output_size(self, height: int, width: int) -> tuple[int, ...]:
        """The output shape (without batch) for an ``height x width`` input.

        Measured with fake tensors: no memory for activations, no compute.
        """
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            x = mode.from_tensor(torch.empty(1, self.plan.in_channels, height, width))
            return tuple(self.net(x).shape[1:])
