"""PyTorch adapter entry point: capture the model, find the head, rewrite it, check the result.

Copy the model, capture its graph, propagate shapes at the native input size, analyse
(``find_head`` -> HeadPlan), rewrite (``rewrite.rewrite``), and check the result against
the original before returning it.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from ...errors import ArgumentError, NotConvolutionalizable
from ...geometry import BodyGeometry, Geometry, PoolMode, Span, at_output_stride, geometry_from_plan
from ...outputs import tensor_leaves
from ...selfcheck import Reference, Run, relative_error, tolerance
from . import graph as g
from .atrous import Atrous, plan_atrous
from .capture import capture
from .geometry import body_spans
from .head import find_head, propagate_kinds
from .layers import ConvolutionalizedModule
from .padding import fix_same_padding
from .pt2e import PT2E, is_pt2e, pt2e_refusal
from .regroup import regroup_space_to_depth
from .rewrite import crop_to_windows, rewrite
from .script import TORCHSCRIPT, is_script

__all__ = ["analyse", "convolutionalize_module", "module_precision", "native_input_size", "rewrite"]

def native_input_size(model: nn.Module, input_size: object) -> tuple[int, int]:
    """The model's training input size: given, or from timm's ``pretrained_cfg``."""
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return (int(cfg["input_size"][-2]), int(cfg["input_size"][-1]))
        raise ArgumentError(
            f"input_size is required for {type(model).__name__}: pass the native (training) "
            "input size, e.g. convolutionalize(model, input_size=(224, 224))"
        )
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ArgumentError(f"input_size must be two positive ints (height, width), got {input_size!r}")
    return (int(size[0]), int(size[1]))


MAX_GUESSED_CHANNELS = 16


def _in_channels(model: nn.Module, gm: fx.GraphModule, modules: dict[str, nn.Module],
                 input_size: tuple[int, int]) -> int:
    channels = _cfg_channels(model) or g.first_in_channels(gm, modules, input_size)
    if channels is None:
        raise NotConvolutionalizable(
            f"cannot tell how many image channels {type(model).__name__} takes: it has no "
            "Conv2d and its first Linear does not divide by the input area"
        )
    return channels


class Analysis:
    """A captured private copy of the model, its shapes at the native size, and its plan."""

    def __init__(self, model: nn.Module, input_size: tuple[int, int]) -> None:
        private = copy.deepcopy(model).eval()
        self.capture = capture(private, _cfg_channels(model), input_size)
        self.gm = self.capture.gm
        refusal = pt2e_refusal(self.gm)
        if refusal is not None:
            raise NotConvolutionalizable(refusal)
        self.modules = dict(self.gm.named_modules())
        self.in_channels = _in_channels(model, self.gm, self.modules, input_size)
        param = next(private.parameters(), None)
        self.dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        self.device = param.device if param is not None else torch.device("cpu")
        self.example = self.random_input(input_size, seed=0)
        try:
            self.expected = g.propagate_shapes(self.gm, self.example)
        except Exception as exc:
            if _cfg_channels(model) is not None or not self._image_channels(input_size):
                raise NotConvolutionalizable(
                    f"{type(model).__name__} does not run at the native input size "
                    f"{input_size[0]}x{input_size[1]}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                ) from exc
        self.precision = _precision(self.gm, self.dtype)
        self._regroup()
        doubled = (2 * input_size[0], 2 * input_size[1])
        self.values = propagate_kinds(self.gm, self.modules,
                                      lambda: g.shapes_at(self.gm, self.random_input(doubled, seed=1)))
        self.plan = find_head(self.gm, self.values, self.modules, input_size, self.in_channels,
                              self.capture.method)
        self.nodes = {n.name: n for n in self.gm.graph.nodes}

    def _regroup(self) -> None:
        """Space-to-depth as the convolution it is (:mod:`.regroup`), proven to give the same
        outputs at the native size."""
        before = self.expected
        if not regroup_space_to_depth(self.gm, self.modules):
            return
        self.expected = g.propagate_shapes(self.gm, self.example)
        pairs = list(zip(tensor_leaves(before), tensor_leaves(self.expected)))
        if any(relative_error(_float64(b), _float64(a)) > tolerance(self.precision)
               for a, b in pairs):
            raise NotConvolutionalizable("reading a space-to-depth as a convolution changed the "
                                         "model's outputs at the native size")

    def _image_channels(self, input_size: tuple[int, int]) -> bool:
        """Where the first convolution's channels are not the image's (a space-to-depth stem,
        CoordConv's coordinate channels), the fewest image channels the model runs on (up to
        ``MAX_GUESSED_CHANNELS``), with its shapes there; False where none runs."""
        for channels in range(1, MAX_GUESSED_CHANNELS + 1):
            if channels == self.in_channels:
                continue
            self.in_channels = channels
            example = self.random_input(input_size, seed=0)
            try:
                self.expected = g.propagate_shapes(self.gm, example)
            except Exception:
                continue
            self.example = example
            return True
        return False

    def random_input(self, size: tuple[int, int], seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(1, self.in_channels, *size, generator=gen).to(self.device, self.dtype)

    def body(self) -> tuple[BodyGeometry, dict[fx.Node, tuple[Span, Span]]]:
        feature = self.nodes[self.plan.feature.node]
        return body_spans(self.gm, self.values, feature, self.modules, g.ancestors(feature))

    def atrous(self, output_stride: int) -> Atrous:
        """The à trous rewrite that gives ``output_stride`` (see :mod:`.atrous`)."""
        return plan_atrous(self.gm, self.plan, *self.body(), output_stride, self.modules)

    def geometry(self, pool: PoolMode) -> Geometry:
        geometry = geometry_from_plan(self.plan, pool, self.body()[0])
        if not self.capture.fixed_size:
            return geometry
        h, w = self.plan.input_size
        note = (f"torch.export fixed the input size at {h}x{w}: size-dependent code (e.g. padding "
                "computed from the input size) keeps its native-size values at every size")
        return dataclasses.replace(geometry, notes=(*geometry.notes, note))


def _precision(gm: fx.GraphModule, dtype: torch.dtype) -> str:
    """The precision the self-check's tolerance is chosen by: ``"quantized"`` where any tensor
    of the model is quantized (static quantization rounds every layer's output to its scale),
    else the dtype the model computes in."""
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata) and meta.is_quantized:
            return "quantized"
    return PT2E if is_pt2e(gm) else str(dtype)


def module_precision(module: nn.Module) -> str:
    """The precision a (converted) module computes in, as :func:`_precision` names it for its
    graph: ``"pt2e"`` for a pt2e-quantized graph, ``"quantized"`` for eager quantized modules,
    else the dtype of its parameters."""
    if any(isinstance(m, fx.GraphModule) and is_pt2e(m) for m in module.modules()):
        return PT2E
    if any(type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))
           for m in module.modules()):
        return "quantized"
    param = next(module.parameters(), None)
    return str(param.dtype) if param is not None and param.is_floating_point() else "float32"


def _cfg_channels(model: nn.Module) -> int | None:
    """Image channels from timm's ``pretrained_cfg`` or a transformers ``config``."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][0])
    channels = getattr(getattr(model, "config", None), "num_channels", None)
    return channels if isinstance(channels, int) and channels > 0 else None


# --------------------------------------------------------------------------- entry point


def analyse(model: nn.Module, input_size: object = None) -> Analysis:
    """Capture ``model`` and find its head, without changing anything."""
    return Analysis(model, native_input_size(model, input_size))


def convolutionalize_module(model: nn.Module, input_size: object = None, pool: PoolMode = "window",
                            output_stride: int | None = None) -> ConvolutionalizedModule:
    """Convert a PyTorch classifier; see :func:`convolutionalize.convolutionalize`."""
    analysis = Analysis(model, native_input_size(model, input_size))
    geometry = analysis.geometry(pool)
    atrous = None
    if output_stride is not None and (output_stride, output_stride) != geometry.stride:
        atrous = analysis.atrous(output_stride)
        geometry = at_output_stride(geometry, atrous.stride, atrous.head_dilation)
    reference = Reference(_numpy(analysis.gm, analysis), analysis.plan, geometry,  # before the rewrite
                          precision=analysis.precision, network_stride=atrous is None)
    if atrous is not None:
        atrous.apply(analysis.gm)
    fix_same_padding(analysis.gm, size_dependent_pads=atrous is None)  # the map's cells stay put
    net = rewrite(analysis.gm, analysis.plan, pool, atrous.head_dilation if atrous else (1, 1))
    if atrous is not None and geometry.pool == "window":
        crop_to_windows(net, geometry.window, geometry.stride)
    check = reference.check(_numpy(net, analysis))
    fcn = ConvolutionalizedModule(net, geometry, analysis.plan, check, analysis.capture.out_spec).eval()
    for name in CARRIED:  # what the model says about its inputs and classes, for dense maps and pictures
        value = getattr(model, name, None)
        if isinstance(value, (dict, list, tuple, int, str)) and not isinstance(value, bool):
            setattr(fcn, name, copy.deepcopy(value))
    if is_script(model):
        fcn.source_format = TORCHSCRIPT  # saved as .pt: TorchScript again
    return fcn


def _numpy(module: nn.Module, analysis: Analysis) -> Run:
    """``module`` as the self-check runs it: NCHW float32 numpy in (cast to the model's dtype
    and device), every output out as float64 numpy."""
    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(torch.from_numpy(x).to(analysis.device, analysis.dtype))
        return [_float64(t) for t in tensor_leaves(out)]

    return run


def _float64(t: torch.Tensor) -> np.ndarray:
    """An output as float64 numpy; a quantized output (a model without a final DeQuantize)
    by the values its integers stand for."""
    t = t.detach()
    return (t.dequantize() if t.is_quantized else t).double().cpu().numpy()


# Plain attributes a converted model keeps from the original: timm's normalization and input
# size, class names and a background class (the demo's convention).
CARRIED = ("pretrained_cfg", "default_cfg", "labels", "background_class")
