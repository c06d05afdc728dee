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
from dataclasses import asdict, dataclass, field
from typing import Literal

__all__ = ["Geometry", "PoolMode", "Span", "output_cells"]

PoolMode = Literal["window", "none", "global"]


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

    def cells(self, height: int, width: int) -> tuple[int, int]:
        """Map size for an input of ``height x width``.

        Exact for sizes of the form ``input_size + k * stride`` (each layer then grows by
        whole cells); for other sizes a converted PyTorch model's ``output_size`` measures it.
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
        for key in ("window", "stride", "offset", "receptive_field", "input_size", "feature_size"):
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
