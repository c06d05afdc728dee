"""Window / stride / offset / receptive-field arithmetic for dense class maps.

A :class:`Span` describes, along one axis, the input pixels that cell 0 of a
feature map depends on (``lo`` .. ``hi``, inclusive; negative or past the image
means zero padding is read) and the distance in input pixels between
neighbouring cells (``jump``). Convolutions and pools compose spans; merging
branches takes their union. :class:`Geometry` is what a converted model
carries: which input window each output cell stands for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from .plan import HeadPlan

__all__ = ["GEOMETRY_KEY", "BodyGeometry", "Geometry", "PoolMode", "Span", "at_output_stride", "check_pool",
           "geometry_from_plan", "output_cells", "padding_note", "possible_output_strides"]

PoolMode = Literal["window", "none", "global"]
GEOMETRY_KEY = "convolutionalize.geometry"  # where non-PyTorch models keep their geometry


def check_pool(pool: object) -> PoolMode:
    """Validate a ``pool`` option; the error names the choices."""
    choices = get_args(PoolMode)
    if pool not in choices:
        raise ValueError(f"pool must be one of {', '.join(map(repr, choices))}, got {pool!r}")
    return pool  # type: ignore[return-value]


@dataclass(frozen=True)
class Span:
    """Input footprint of feature cell 0 along one axis, and the cell spacing."""

    lo: int = 0
    hi: int = 0
    jump: int = 1

    def conv(self, kernel: int, stride: int = 1, pad: int = 0, dilation: int = 1) -> Span:
        """The span after a convolution or pooling window over this one."""
        return Span(
            lo=self.lo - pad * self.jump,
            hi=self.hi + (dilation * (kernel - 1) - pad) * self.jump,
            jump=self.jump * stride,
        )

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1

    @staticmethod
    def union(spans: list[Span]) -> Span | None:
        """Union of branch spans; ``None`` when the branches' cell spacings differ."""
        if len({s.jump for s in spans}) != 1:
            return None
        return Span(min(s.lo for s in spans), max(s.hi for s in spans), spans[0].jump)


def output_cells(size: int, window: int, stride: int) -> int:
    """Cells along one axis for an input of ``size``: ``floor((size - window) / stride) + 1``."""
    return (size - window) // stride + 1


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF/Keras ``padding="same"`` (timm's ``get_same_padding``, ONNX ``SAME_UPPER``) along one
    axis for an input of ``size``: the zeros (before, after); the odd one goes after."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


@dataclass(frozen=True)
class Geometry:
    """Where each cell of a dense class map sits in the input image.

    Output cell ``(i, j)`` stands for the input window
    ``[i*sy + oy, i*sy + oy + h) x [j*sx + ox, j*sx + ox + w)``.

    Attributes:
        window: ``(h, w)``. With ``pool="window"`` the native input size: the cell is the
            classifier applied to that window. With ``pool="none"`` the stride: the cell is
            the class evidence of one feature cell (CAM).
        stride: ``(sy, sx)`` input pixels between neighbouring cells.
        offset: ``(oy, ox)`` position of cell (0, 0)'s window.
        receptive_field: ``(h, w)`` input footprint that influences one cell, or ``None``
            when a global-context layer (or one whose locality is not proven) makes it the
            whole image.
        crop_equivalent: True only when each cell provably equals the original
            classifier run on its window cropped out of the image.
        input_size: the native (training) input size.
        feature_size: the feature map size at the native input size.
        pool: the pooling mode of the conversion.
        notes: why the map may differ from crop-by-crop results (padding, global
            context, unproven layers), each naming the layer.
        receptive_offset: ``(y, x)`` where cell (0, 0)'s receptive field starts relative to
            its window's origin (negative: it reads zero padding before the image), or
            ``None`` with ``receptive_field``. Exact tiling needs ``-offset`` pixels of
            context before a window and ``offset + receptive_field - window`` after it.
    """

    window: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]
    receptive_field: tuple[int, int] | None
    crop_equivalent: bool
    input_size: tuple[int, int]
    feature_size: tuple[int, int]
    pool: PoolMode = "window"
    notes: tuple[str, ...] = field(default=())
    receptive_offset: tuple[int, int] | None = None

    def cells(self, height: int, width: int) -> tuple[int, int]:
        """Map size for an input of ``height x width``.

        Exact for sizes of the form ``input_size + k * stride`` (each layer then grows by
        whole cells); for other sizes a converted PyTorch model's ``output_size`` measures it.
        There a zero-padded network (its strided layers round up) can give one more cell per
        axis than this: its window reaches up to ``stride - 1`` pixels past the image's far
        edge, where that cell sees the network's zero padding (ResNet-18 at 224x1100: 29
        columns, not 28; the last window is x 896-1120). Crop or pad to ``input_size + k *
        stride`` for every window inside the image.
        With ``pool="global"`` the model returns one prediction: ``(1, 1)``.
        """
        if self.pool == "global":
            return (1, 1)
        extra = (self.feature_size[0] - 1, self.feature_size[1] - 1) if self.pool == "none" else (0, 0)
        rows = output_cells(height, self.input_size[0], self.stride[0]) + extra[0]
        cols = output_cells(width, self.input_size[1], self.stride[1]) + extra[1]
        if rows < 1 or cols < 1:
            raise ValueError(
                f"input {height}x{width} is smaller than the {self.input_size[0]}x"
                f"{self.input_size[1]} window; pass a larger image or pool='global'"
            )
        return (rows, cols)

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """The input window ``(x0, y0, x1, y1)`` (pixels, end exclusive) of cell ``(i, j)``."""
        y0 = i * self.stride[0] + self.offset[0]
        x0 = j * self.stride[1] + self.offset[1]
        return (x0, y0, x0 + self.window[1], y0 + self.window[0])

    def to_json(self) -> str:
        """The geometry as JSON (stored in ONNX metadata and next to saved models)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Geometry:
        data = json.loads(text)
        for key in ("window", "stride", "offset", "receptive_field", "input_size", "feature_size",
                    "receptive_offset"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        data["notes"] = tuple(data.get("notes", ()))
        return cls(**data)

    def describe(self) -> str:
        """A few human-readable lines (used by ``convolutionalize inspect``)."""
        rf = "whole image" if self.receptive_field is None else "x".join(map(str, self.receptive_field))
        lines = [
            f"pool: {self.pool}",
            f"native input: {self.input_size[0]}x{self.input_size[1]}  "
            f"feature map: {self.feature_size[0]}x{self.feature_size[1]}",
            f"window: {self.window[0]}x{self.window[1]}  stride: {self.stride[0]}x{self.stride[1]}  "
            f"offset: {self.offset[0]},{self.offset[1]}",
            f"receptive field: {rf}",
            f"crop equivalent: {'yes' if self.crop_equivalent else 'no'}",
        ]
        lines += [f"  - {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass
class BodyGeometry:
    """Spans of the feature map's cell (0, 0) and the evidence collected on the way."""

    y: Span
    x: Span
    padded: list[str] = field(default_factory=list)
    global_context: list[str] = field(default_factory=list)
    unproven: list[str] = field(default_factory=list)

    def notes(self) -> list[str]:
        """What makes cells differ from crops, the padding excepted (:func:`padding_note` says
        which cells its padding changes, once the map's window is known)."""
        out = []
        if self.global_context:
            out.append(f"global context in {_names(self.global_context)}: every cell depends "
                       "on the whole input")
        if self.unproven:
            out.append(f"locality not proven for {_names(self.unproven)}")
        return out


def padding_note(padded: list[str], reach: tuple[tuple[int, int], tuple[int, int]]) -> str:
    """Which cells a body's padding makes differ from their crops, and why.

    ``reach`` is, per axis, how far (input pixels) a cell's receptive field reaches (before,
    after) its window. A crop is padded right at its window's edges (zeros; a max pool's padding
    is never the maximum), where the dense map reads the neighbouring pixels: every cell whose
    receptive field leaves its window on a side where the image goes on differs from its crop.
    With a reach on both sides of an axis that is every cell, the image's edges included (each
    crop is padded at its own far edge); with a reach on one side only, the cells on the image's
    edge on that side are padded like their crop."""
    (yb, ya), (xb, xa) = reach
    where = f"padding in {_names(padded)}"
    if not any((yb, ya, xb, xa)):
        return f"{where}: no cell's receptive field reaches it at the native size"
    reads = (f"a cell's receptive field reaches {yb} px above, {ya} px below, {xb} px left of and "
             f"{xa} px right of its window, where a crop reads padding and the dense map the "
             "neighbouring pixels")
    ey, ex = _edge(yb, ya, "top", "bottom"), _edge(xb, xa, "left", "right")
    if None in (ey, ex):
        return f"{where}: {reads}; every cell differs from its crop, the image's edges included"
    alike = (f"the {ey}-{ex} corner cell" if ey and ex else f"the cells of the {ey} row" if ey
             else f"the cells of the {ex} column")
    far = " (at the bottom or right where the image ends with that cell's window)" if ya or xa else ""
    verb = "equals its crop" if ey and ex else "equal their crops"
    return f"{where}: {reads}; only {alike}{far} {verb}"


def _edge(before: int, after: int, first: str, last: str) -> str | None:
    """The image edge along one axis whose cells are padded like their crops: none (``None``:
    the reach is on both sides), every cell (``""``: no reach), or the first or last."""
    if before and after:
        return None
    return first if before else last if after else ""


def _names(nodes: list[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in nodes[:4])
    return shown + (f" and {len(nodes) - 4} more" if len(nodes) > 4 else "")


def geometry_from_plan(plan: HeadPlan, pool: PoolMode, body: BodyGeometry) -> Geometry:
    """Geometry of a converted model from its plan and its body's spans and evidence
    (framework-neutral: every adapter measures the body its own way, then calls this)."""
    ys, xs, notes = body.y, body.x, body.notes()
    fh, fw = plan.feature.size
    adaptive = plan.adaptive_pool
    flatten_head = not plan.global_pooling
    if adaptive is not None and adaptive.pool_to != plan.feature.size:
        assert adaptive.pool_to is not None
        ky, kx = fh // adaptive.pool_to[0], fw // adaptive.pool_to[1]
        ys, xs = ys.conv(ky, ky), xs.conv(kx, kx)
        notes = [*notes, f"adaptive pool '{adaptive.node}' became a fixed {ky}x{kx} pool"]
        fh, fw = adaptive.pool_to
    sy, sx = ys.jump, xs.jump
    mode = "window" if flatten_head and pool == "none" else pool
    if flatten_head and pool == "none":
        notes = [*notes, "a flatten head has no pooling to drop: pool='none' equals 'window'"]
    local = not any(n.startswith(("global context", "locality")) for n in notes)
    padded = bool(body.padded)
    if mode == "none":
        window, span_cells = (sy, sx), (1, 1)
    else:
        window, span_cells = plan.input_size, (fh, fw)
    ry = ys.size + (span_cells[0] - 1) * ys.jump
    rx = xs.size + (span_cells[1] - 1) * xs.jump
    inside = ys.lo >= 0 and xs.lo >= 0 and ys.lo + ry <= plan.input_size[0] and (
        xs.lo + rx <= plan.input_size[1])
    if padded and mode != "global":  # how far the native window's receptive field leaves it
        (h, w), (ny, nx) = plan.input_size, (ys.size + (fh - 1) * ys.jump, xs.size + (fw - 1) * xs.jump)
        reach = ((max(-ys.lo, 0), max(ys.lo + ny - h, 0)), (max(-xs.lo, 0), max(xs.lo + nx - w, 0)))
        notes = [padding_note(body.padded, reach), *notes]
    crop_equivalent = (mode == "window" or (fh, fw) == (1, 1)) and mode != "global" and (
        local and not padded and inside)
    if mode == "none" and (fh, fw) != (1, 1):
        notes = [*notes, "pool='none': each cell scores one feature cell (CAM), not a crop"]
    if mode == "global":
        notes = [*notes, "pool='global': one prediction per image"]
    return Geometry(
        window=window,
        stride=(sy, sx),
        offset=(0, 0),
        receptive_field=(ry, rx) if local and mode != "global" else None,
        receptive_offset=(ys.lo, xs.lo) if local and mode != "global" else None,
        crop_equivalent=crop_equivalent,
        input_size=plan.input_size,
        feature_size=plan.feature.size,
        pool=mode,
        notes=tuple(notes),
    )


def possible_output_strides(network: tuple[int, int], strided: Iterable[tuple[int, int]],
                            output_stride: int) -> list[int]:
    """The output strides an à trous rewrite can give: the cell spacings at which a strided
    layer starts (``strided``: each one's input spacing) and the network stride. Raises
    NotConvolutionalizable, naming them, when ``output_stride`` is not one."""
    jumps = list(strided)
    square = network[0] == network[1] and all(jy == jx for jy, jx in jumps)
    possible = sorted({jy for jy, _ in jumps} | {network[0]}) if square else [network[0]]
    if output_stride not in possible:
        from .errors import NotConvolutionalizable

        raise NotConvolutionalizable(
            f"output_stride={output_stride} is not possible for this network (stride "
            f"{network[0]}x{network[1]}): its strided layers allow {', '.join(map(str, possible))}")
    return possible


def at_output_stride(geometry: Geometry, stride: tuple[int, int], dilation: tuple[int, int]) -> Geometry:
    """``geometry`` at an output stride below the network's (the head dilated by ``dilation``):
    the same windows, denser."""
    (ry, rx), (fh, fw) = dilation, geometry.feature_size
    notes = list(geometry.notes)
    if not geometry.crop_equivalent:
        notes.append(f"output stride {stride[0]} (a trous): cells whose receptive field stays "
                     "inside the image equal the shift-and-stitch maps; cells near the border differ "
                     "(padding sits at other places)")
    return replace(geometry, stride=stride, feature_size=((fh - 1) * ry + 1, (fw - 1) * rx + 1),
                   window=stride if geometry.pool == "none" else geometry.window, notes=tuple(notes))
