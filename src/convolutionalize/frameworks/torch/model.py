"""PyTorch adapter entry point: capture the model, find the head, rewrite it, check the result.

Copy the model, capture its graph, propagate shapes at the native input size, analyse
(``find_head`` -> HeadPlan), rewrite (``rewrite.rewrite``), and check the result against
the original before returning it.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import fx, nn

from ...errors import NotConvolutionalizable
from ...geometry import BodyGeometry, Geometry, PoolMode, Span, at_output_stride, geometry_from_plan
from ...outputs import tensor_leaves
from ...plan import HeadPlan
from ...selfcheck import SelfCheck, check_cells, check_larger, check_sizes
from . import graph as g
from .atrous import Atrous, plan_atrous
from .capture import capture
from .geometry import body_spans
from .head import find_head, propagate_kinds
from .layers import ConvolutionalizedModule
from .padding import fix_same_padding
from .rewrite import crop_to_windows, rewrite

__all__ = ["analyse", "convolutionalize_module", "native_input_size", "rewrite"]

NATIVE_RTOL = 1e-4


def native_input_size(model: nn.Module, input_size: object) -> tuple[int, int]:
    """The model's training input size: given, or from timm's ``pretrained_cfg``."""
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return (int(cfg["input_size"][-2]), int(cfg["input_size"][-1]))
        raise ValueError(
            f"input_size is required for {type(model).__name__}: pass the native (training) "
            "input size, e.g. convolutionalize(model, input_size=(224, 224))"
        )
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"input_size must be two positive ints (height, width), got {input_size!r}")
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
        doubled = (2 * input_size[0], 2 * input_size[1])
        self.values = propagate_kinds(self.gm, self.modules,
                                      lambda: g.shapes_at(self.gm, self.random_input(doubled, seed=1)))
        self.plan = find_head(self.gm, self.values, self.modules, input_size, self.in_channels,
                              self.capture.method)
        self.nodes = {n.name: n for n in self.gm.graph.nodes}

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


def _cfg_channels(model: nn.Module) -> int | None:
    """Image channels from timm's ``pretrained_cfg`` or a transformers ``config``."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][0])
    channels = getattr(getattr(model, "config", None), "num_channels", None)
    return channels if isinstance(channels, int) and channels > 0 else None


# --------------------------------------------------------------------------- entry point


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (float64)."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def analyse(model: nn.Module, input_size: object = None) -> Analysis:
    """Capture ``model`` and find its head, without changing anything."""
    return Analysis(model, native_input_size(model, input_size))


def convolutionalize_module(model: nn.Module, input_size: object = None, pool: PoolMode = "window",
                            output_stride: int | None = None) -> ConvolutionalizedModule:
    """Convert a PyTorch classifier; see :func:`convolutionalize.convolutionalize`."""
    size = native_input_size(model, input_size)  # the caller's mistakes stay ValueErrors
    try:
        return _convert(model, size, pool, output_stride)
    except NotConvolutionalizable:
        raise
    except Exception as exc:  # a model we did not foresee: a typed refusal, not a crash
        raise NotConvolutionalizable(
            f"cannot convert {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        ) from exc


def _convert(model: nn.Module, input_size: tuple[int, int], pool: PoolMode,
             output_stride: int | None) -> ConvolutionalizedModule:
    analysis = Analysis(model, input_size)
    geometry = analysis.geometry(pool)
    atrous = None
    if output_stride is not None and (output_stride, output_stride) != geometry.stride:
        atrous = analysis.atrous(output_stride)
        geometry = at_output_stride(geometry, atrous.stride, atrous.head_dilation)
    probe = _Probe(analysis, geometry)  # the original's crops, before the graph is rewritten
    if atrous is not None:
        atrous.apply(analysis.gm)
    fix_same_padding(analysis.gm, size_dependent_pads=atrous is None)  # the map's cells stay put
    net = rewrite(analysis.gm, analysis.plan, pool, atrous.head_dilation if atrous else (1, 1))
    if atrous is not None and geometry.pool == "window":
        crop_to_windows(net, geometry.window, geometry.stride)
    with torch.no_grad():
        out = net(analysis.example)
    error = _native_error(out, analysis.expected, analysis.plan, geometry.pool, atrous is None)
    if error is not None and error > NATIVE_RTOL:
        raise NotConvolutionalizable(
            f"the rewritten {type(model).__name__} differs from the original at the native size "
            f"(max relative error {error:.2e}); a head operation has no exact sliding form"
        )
    check = probe.check(net, error)
    fcn = ConvolutionalizedModule(net, geometry, analysis.plan, check, analysis.capture.out_spec).eval()
    for name in CARRIED:  # what the model says about its inputs and classes, for dense maps and pictures
        value = getattr(model, name, None)
        if isinstance(value, (dict, list, tuple, int, str)) and not isinstance(value, bool):
            setattr(fcn, name, copy.deepcopy(value))
    return fcn


# Plain attributes a converted model keeps from the original: timm's normalization and input
# size, class names and a background class (the demo's convention).
CARRIED = ("pretrained_cfg", "default_cfg", "labels", "background_class")


class _Probe:
    """The larger-size half of the self-check (see :mod:`convolutionalize.selfcheck`)."""

    def __init__(self, analysis: Analysis, geometry: Geometry) -> None:
        self.analysis, self.geometry = analysis, geometry
        self.images = [analysis.random_input(size, seed=2) for size in check_sizes(geometry)]
        self.crops: list[list[tuple[tuple[int, int], list[torch.Tensor]]]] = []
        for image in self.images:
            cells = check_cells(geometry, tuple(image.shape[-2:])) if geometry.crop_equivalent else []
            self.crops.append([(cell, self._original(image, cell)) for cell in cells])

    def _original(self, image: torch.Tensor, cell: tuple[int, int]) -> list[torch.Tensor]:
        (sy, sx), (oy, ox), (h, w) = self.geometry.stride, self.geometry.offset, self.geometry.window
        y, x = cell[0] * sy + oy, cell[1] * sx + ox
        with torch.no_grad():
            return tensor_leaves(self.analysis.gm(image[..., y:y + h, x:x + w]))

    def check(self, net: fx.GraphModule, native_error: float | None) -> SelfCheck:
        def run(image: torch.Tensor) -> list[torch.Tensor]:
            with torch.no_grad():
                return tensor_leaves(net(image))

        crops = {tuple(image.shape[-2:]): crops for image, crops in zip(self.images, self.crops)}

        def crop_error(size: tuple[int, int], maps: list[torch.Tensor]) -> float | None:
            errors = [relative_error(m[0, :, i, j], e.reshape(-1)) for (i, j), expected in crops[size]
                      for m, e in zip(maps, expected)]
            return max(errors) if errors else None

        return check_larger(self.geometry, native_error,
                            [(tuple(image.shape[-2:]), lambda x=image: run(x)) for image in self.images],
                            lambda m: tuple(m.shape[-2:]) if m.dim() == 4 else None, crop_error)


def _native_error(out: object, expected: object, plan: HeadPlan, pool: PoolMode,
                  network_stride: bool = True) -> float | None:
    """Native-size agreement of every output: the 1x1 window map (or global output) equals
    the original's; with pool='none' the mean of the map does when the head is affine (at
    the network's stride: a denser CAM averages other positions)."""
    if pool == "none" and not network_stride:
        return None
    errors = [_leaf_error(a, e, plan, pool) for a, e in zip(tensor_leaves(out), tensor_leaves(expected))]
    return None if not errors or None in errors else max(errors)  # type: ignore[type-var]


def _leaf_error(out: torch.Tensor, expected: torch.Tensor, plan: HeadPlan, pool: PoolMode) -> float | None:
    if pool == "window":
        if out.dim() != 4 or out.shape[-2:] != (1, 1):
            raise NotConvolutionalizable(f"at the native size the map is {tuple(out.shape)},"
                                         " not (N, classes, 1, 1); the head's geometry was misread")
        return relative_error(out.flatten(1), expected.flatten(1))
    if pool == "global":
        return relative_error(out.flatten(1), expected.flatten(1))
    affine = all(s.op in ("global_pool", "flatten", "reshape", "linear", "batchnorm") or (
        s.op == "keep" and "ropout" in s.detail) for s in plan.steps)
    avg = all(s.reduce != "max" for s in plan.steps_of("global_pool"))
    return relative_error(out.mean((2, 3)), expected.flatten(1)) if affine and avg else None
