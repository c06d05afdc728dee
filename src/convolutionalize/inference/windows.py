"""The crop-by-crop fallback: the same map, for models that cannot be convolutionalized.

A vision transformer (global attention, a class token, position embeddings) has no exact
convolutional form. :func:`windows_module` wraps it as a module with the interface of a
converted one: its forward cuts every native-size window on a ``stride`` grid out of the
input (``unfold``, a view), runs the classifier on them in batches and arranges the scores
as ``(N, classes, rows, cols)`` (a model with several outputs: a dict of such maps by
:func:`~convolutionalize.outputs.output_keys`, which ``select_output`` reads as it reads the
model's own output). Its geometry says the truth: each cell is exactly the
classifier on its crop, the receptive field is the window, so exact tiling needs no halo.
It costs one full forward pass per window: ``(window / stride)^2`` times the dense cost.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..errors import NotConvolutionalizable
from ..frameworks.torch.layers import ConvolutionalizedModule
from ..frameworks.torch.model import native_input_size
from ..geometry import Geometry
from ..outputs import output_keys, select_output
from ..plan import FeatureMap, HeadPlan, HeadStep
from ..selfcheck import SelfCheck

__all__ = ["CROP_BATCH", "FallbackWarning", "WindowsClassifier", "windows_module"]

CROP_BATCH = 64  # crops per forward pass of the original classifier


class FallbackWarning(UserWarning):
    """The model was evaluated crop by crop: correct, but without shared computation."""


class WindowsClassifier(nn.Module):
    """``forward(x)``: the classifier on every ``window`` crop of ``x`` at ``stride``: a map,
    or a dict of maps by output key for a model with several outputs."""

    def __init__(self, model: nn.Module, window: tuple[int, int], stride: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.window = window
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[int | str, torch.Tensor]:
        (wh, ww), (sy, sx) = self.window, self.stride
        # N, rows, cols, C, wh, ww: a view; each batch gathers (copies) only its own crops
        crops = x.unfold(2, wh, sy).unfold(3, ww, sx).permute(0, 2, 3, 1, 4, 5)
        n, rows, cols = crops.shape[:3]
        index = torch.arange(n * rows * cols, device=x.device)
        batches = [torch.unravel_index(index[i:i + CROP_BATCH], (n, rows, cols))
                   for i in range(0, len(index), CROP_BATCH)]
        outs = [self.model(crops[b].contiguous()) for b in batches]

        def arrange(scores: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(scores).reshape(n, rows, cols, -1).permute(0, 3, 1, 2)

        if isinstance(outs[0], torch.Tensor):
            return arrange(outs)
        return {key: arrange([select_output(out, key) for out in outs]) for key in output_keys(outs[0])}


def windows_module(model: nn.Module, input_size: object, stride: tuple[int, int] | None,
                   reason: NotConvolutionalizable) -> ConvolutionalizedModule:
    """Wrap ``model`` for crop-by-crop evaluation, warning about the cost.

    ``stride`` defaults to 32 pixels (the stride of most CNNs), at most the window.
    """
    window = native_input_size(model, input_size)
    step = stride or (min(32, window[0]), min(32, window[1]))
    channels = _in_channels(model, window)
    overlap = window[0] * window[1] / (step[0] * step[1])
    warnings.warn(
        f"{type(model).__name__} cannot be convolutionalized ({' '.join(str(reason).split())}); "
        f"evaluating it crop by crop on a {window[0]}x{window[1]} window grid at stride "
        f"{step[0]}x{step[1]}: one full forward pass per window, about {overlap:.0f}x the work "
        "of a dense pass", FallbackWarning, stacklevel=4)
    geometry = Geometry(window=window, stride=step, offset=(0, 0), receptive_field=window,
                        crop_equivalent=True, input_size=window, feature_size=(1, 1), pool="window",
                        notes=("evaluated crop by crop (fallback): no shared computation",),
                        receptive_offset=(0, 0))
    plan = HeadPlan("torch", window, channels, FeatureMap("input", channels, window),
                    (HeadStep("model", "keep", "the whole classifier, once per window (fallback)"),))
    net = WindowsClassifier(copy.deepcopy(model).eval(), window, step)
    # crop by crop is the original itself: nothing to differ from, at any size
    check = SelfCheck(0.0, window, (1, 1), 0.0)
    return ConvolutionalizedModule(net, geometry, plan, check)


def _in_channels(model: nn.Module, window: tuple[int, int]) -> int:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][0])
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise NotConvolutionalizable(
        f"cannot tell how many image channels {type(model).__name__} takes for the windows "
        "fallback: it has no Conv2d and no pretrained_cfg")
