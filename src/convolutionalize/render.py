"""Pictures of dense class maps: heatmap overlays and detection boxes, as PIL images.

A map cell does not stand for a pixel but for a window (``geometry.box(i, j)``), and
neighbouring windows are one stride apart. So a cell is painted over the ``stride x stride``
block at the centre of its window: the blocks tile the image without overlap and each sits
where its window is centred, which is where a window classifier "looks". Pixels that no
window centre covers (a half-window border) stay unpainted. Nothing is stretched.

A map can also be painted over a picture of the image scaled by ``scale`` (a thumbnail of a
whole-slide image, with an integer :class:`~.geometry.Geometry` or a pyramid level's float
``ScaledGeometry``): each picture pixel shows the cell whose block holds its centre, mapped
back to image pixels. ``NaN`` cells (skipped background tiles) stay unpainted.

Everything returns a ``PIL.Image`` (matplotlib with the Agg backend draws the overlays, Pillow
the boxes); callers decide whether and where to save it.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from .detect import Detection, as_numpy

__all__ = ["CellGrid", "class_name", "colour_span", "draw_detections", "heatmap", "overlay", "paint_map",
           "rank_classes"]

logger = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray
Scale = float | tuple[float, float]
DPI = 100
CMAP = "turbo"


class CellGrid(Protocol):
    """Where a map's cells are, in image pixels: a :class:`~.geometry.Geometry` (integers) or a
    pyramid level's ``ScaledGeometry`` (floats). Cell ``(i, j)``'s window starts at
    ``(i * stride + offset)`` per axis and is ``window`` long."""

    @property
    def window(self) -> tuple[float, float]: ...
    @property
    def stride(self) -> tuple[float, float]: ...
    @property
    def offset(self) -> tuple[float, float]: ...


def paint_map(values: np.ndarray, geometry: CellGrid, size: tuple[int, int], *,
              scale: Scale = 1.0) -> np.ndarray:
    """An ``(H, W) = size`` float array: cell ``(i, j)`` of ``values (rows, cols)`` painted over
    the ``stride`` block centred in its window, ``NaN`` where no cell is painted (and where the
    cell is ``NaN``).

    ``scale`` ``(fy, fx)`` (or one factor for both) is the picture's size over the image's:
    picture pixel ``(y, x)`` shows the cell whose block holds the image point
    ``((y + 0.5) / fy, (x + 0.5) / fx)``, that is row ``floor((Y - top) / stride_y)`` with
    ``top = offset_y + (window_y - stride_y) / 2``. At scale 1 that is the block itself; where
    cells are smaller than a picture pixel, the pixel shows the one under its centre (sampled,
    not averaged).

    Raises:
        ValueError: a scale that is not a positive finite number.
    """
    values = as_numpy(values, np.float64)
    rows, cols = (_cell_index(length, factor, geometry.window[k], geometry.stride[k], geometry.offset[k],
                              values.shape[k])
                  for k, (length, factor) in enumerate(zip(size, _factors(scale))))
    canvas = np.full(size, np.nan)
    r, c = np.flatnonzero(rows >= 0), np.flatnonzero(cols >= 0)
    canvas[np.ix_(r, c)] = values[np.ix_(rows[r], cols[c])]
    return canvas


def overlay(image: ImageLike, values: np.ndarray, geometry: CellGrid, *, title: str = "",
            vmin: float = 0.0, vmax: float = 1.0, cmap: str = CMAP, zoom: int = 1,
            scale: Scale = 1.0, colorbar: bool = True) -> Image.Image:
    """``image`` (greyed) with the map ``values (rows, cols)`` painted over it in a colormap
    (:func:`paint_map`, ``image`` being the image scaled by ``scale``) and ``title`` in the
    top-left corner. Low values are nearly transparent so the image shows through; ``NaN``
    cells are not painted.

    The picture is the image enlarged ``zoom`` times, pixel for pixel at its top left, and, with
    ``colorbar``, a white strip to its right holding the colour scale: a bar 2 % of the width
    and its tick labels, wider with the font (which grows with the picture), 40 px at least.
    """
    grey = np.asarray(to_rgb(image).convert("L"), np.float64) / 255.0
    painted = paint_map(values, geometry, grey.shape, scale=scale)
    rgb = np.repeat(np.repeat(_blend(grey, painted, vmin, vmax, cmap), zoom, 0), zoom, 1)
    height, width = rgb.shape[:2]
    font = float(np.clip(min(height, width) / 45, 5, 12))  # points
    strip = _strip_width(width, font) if colorbar else 0
    figure = Figure(figsize=(_inches(width + strip), _inches(height)), dpi=DPI)
    figure.figimage(rgb, origin="upper")  # not resampled: the image's pixels as they are
    if colorbar:
        _draw_colorbar(figure, (width, height), font, Normalize(vmin, vmax), cmap)
    if title:
        figure.text(0.015 * width / (width + strip), 0.985, title, va="top", ha="left", fontsize=font,
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    return _to_image(figure, (width + strip, height))


def heatmap(image: ImageLike, probabilities: np.ndarray, geometry: CellGrid, *,
            class_index: int | None = None, top: int = 1, labels: Sequence[str] | None = None,
            background_class: int | None = None, any_object: bool = False,
            zoom: int = 1, scale: Scale = 1.0, vmin: float | None = None,
            vmax: float | None = None) -> Image.Image:
    """Heatmap panels of a ``(classes, rows, cols)`` probability map over ``image``, side by side.

    ``class_index`` draws that class; otherwise the ``top`` classes with the highest peak
    probability (the background class excluded). ``any_object`` (with a background class)
    adds a first panel of ``1 - P(background)``: where anything is. Each panel is an
    :func:`overlay`: the image enlarged ``zoom`` times, then a colour-scale strip to its right;
    ``image`` may be a thumbnail, the image scaled by ``scale``. ``NaN`` cells are left out.

    The colours span ``vmin`` to ``vmax``; either left out is the panel's own least / greatest
    value (so a map that peaks at 0.02 still shows where it peaks), and the panel's title says
    the span: ``colours 0.0013..0.02 (the map's range)``, or ``(fixed)`` where both are given.
    The colour bar's ticks are in that span.

    Raises:
        ValueError: an unknown class index, a ``top`` below 1, or ``vmin`` not below ``vmax``.
    """
    if vmin is not None and vmax is not None and not vmin < vmax:
        raise ValueError(f"vmin={vmin} must be below vmax={vmax}")
    probabilities = as_numpy(probabilities)
    classes = probabilities.shape[0]
    if class_index is not None:
        _check_class(class_index, classes, "class")
        chosen = [class_index]
    else:
        chosen = rank_classes(probabilities, top, background_class)
    panels = []
    if any_object and background_class is not None:
        _check_class(background_class, classes, "background class")
        values = 1.0 - probabilities[background_class]
        low, high, span = colour_span(values, vmin, vmax)
        panels.append(overlay(image, values, geometry, title=f"any object: 1 - P(background)  {span}",
                              zoom=zoom, scale=scale, vmin=low, vmax=high))
    for k in chosen:
        peak = _peaks(probabilities[k:k + 1])[0]
        low, high, span = colour_span(probabilities[k], vmin, vmax)
        panels.append(overlay(image, probabilities[k], geometry, zoom=zoom, scale=scale, vmin=low, vmax=high,
                              title=f"P({class_name(k, labels)})  peak {peak:.3g}  {span}"))
    return _side_by_side(panels)


def colour_span(values: np.ndarray, vmin: float | None = None,
                vmax: float | None = None) -> tuple[float, float, str]:
    """The values a heatmap's colours span: ``vmin`` and ``vmax`` where given, else the least
    and greatest finite value of ``values`` (``NaN`` cells ignored; a flat or empty map spans
    one unit around its value), and a caption that says which."""
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    low = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    high = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if not low < high:
        low, high = (low, low + 1.0) if vmax is None else (high - 1.0, high)
    source = ("fixed" if vmin is not None and vmax is not None
              else "the map's range" if vmin is None and vmax is None else "the map's range, clipped")
    return low, high, f"colours {low:.3g}..{high:.3g} ({source})"


def rank_classes(probabilities: np.ndarray, top: int, background_class: int | None = None) -> list[int]:
    """The ``top`` class indices with the highest peak probability over the map (``NaN`` cells
    ignored, an all-``NaN`` class last)."""
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    order = [int(k) for k in np.argsort(-_peaks(probabilities), kind="stable") if k != background_class]
    return order[:top]


def draw_detections(image: ImageLike, detections: Sequence[Detection],
                    labels: Sequence[str] | None = None, *,
                    truth: Sequence[tuple[int, tuple[int, int, int, int]]] | None = None,
                    zoom: int = 1) -> Image.Image:
    """``image`` (RGB, enlarged ``zoom`` times) with each detection's box and ``label score``;
    true boxes, when given, as thin grey outlines underneath."""
    canvas = to_rgb(image)
    canvas = canvas.resize((canvas.width * zoom, canvas.height * zoom), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(9, 6 * zoom))
    for _, box in truth or ():
        draw.rectangle(_zoomed(box, zoom, -1), outline=(150, 150, 150), width=1)
    palette = colormaps["tab10"]
    for det in detections:
        colour = tuple(int(255 * c) for c in palette(det.label % 10)[:3])
        x0, y0, x1, y1 = _zoomed(det.box, zoom, -1)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=max(1, zoom))
        text = f"{class_name(det.label, labels)} {det.score:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        shift = bottom - top + 2
        draw.rectangle((left, top - shift, right + 2, bottom - shift), fill=colour)
        draw.text((x0 + 1, y0 - shift), text, fill=(255, 255, 255), font=font)
    return canvas


def class_name(index: int, labels: Sequence[str] | None) -> str:
    """``labels[index]``, or ``class {index}`` without labels."""
    if labels is not None and 0 <= index < len(labels):
        return labels[index]
    return f"class {index}"


def to_rgb(image: ImageLike) -> Image.Image:
    """A PIL RGB image from a PIL image or an ``(H, W)`` / ``(H, W, 3)`` array (uint8, or float 0..1)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = as_numpy(image)
    if array.dtype != np.uint8:
        array = np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def _check_class(index: int, classes: int, what: str) -> None:
    if not 0 <= index < classes:
        raise ValueError(f"unknown {what} {index}: the model has {classes} classes (0..{classes - 1})")


def _zoomed(box: tuple[float, float, float, float], zoom: int, end: int) -> tuple[int, int, int, int]:
    """``box`` in the zoomed picture's whole pixels (boxes across scales or regressed are floats)."""
    x0, y0, x1, y1 = (round(v * zoom) for v in box)
    return (x0, y0, x1 + end, y1 + end)


def _peaks(maps: np.ndarray) -> np.ndarray:
    """Each map's largest value, ``NaN`` cells ignored (``-inf`` for an all-``NaN`` map)."""
    flat = np.asarray(maps, np.float64).reshape(len(maps), -1)
    return np.where(np.isnan(flat), -np.inf, flat).max(1, initial=-np.inf)


def _factors(scale: Scale) -> tuple[float, float]:
    """``scale`` as ``(fy, fx)``, checked."""
    pair = (scale, scale) if isinstance(scale, numbers.Real) else tuple(scale)
    if len(pair) != 2 or not all(isinstance(f, numbers.Real) and math.isfinite(f) and f > 0 for f in pair):
        raise ValueError(f"scale must be a positive finite factor or a pair (fy, fx) of them, got "
                         f"{scale!r}; pass the picture's size over the image's, e.g. scale=1200 / 100000")
    return (float(pair[0]), float(pair[1]))


def _cell_index(length: int, factor: float, window: float, stride: float, offset: float,
                cells: int) -> np.ndarray:
    """Along one axis, for each of ``length`` picture pixels, the cell whose stride block holds
    the pixel's centre in image pixels, or -1 where none does."""
    centre = (np.arange(length) + 0.5) / factor
    index = np.floor((centre - (offset + (window - stride) / 2)) / stride)
    return np.where((index >= 0) & (index < cells), index, -1).astype(np.intp)


def _blend(grey: np.ndarray, painted: np.ndarray, vmin: float, vmax: float, cmap: str) -> np.ndarray:
    """``(H, W, 3)`` uint8: the image lightened, with ``painted`` over it in ``cmap``, its opacity
    rising with the value (transparent where ``NaN``)."""
    norm = np.nan_to_num(np.clip((painted - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0))
    alpha = np.where(np.isnan(painted), 0.0, 0.1 + 0.85 * norm)[..., None]
    rgb = (1.0 - alpha) * (0.35 + 0.65 * grey)[..., None] + alpha * colormaps[cmap](norm)[..., :3]
    return np.round(rgb * 255).astype(np.uint8)


def _strip_width(width: int, font: float) -> int:
    """Pixels of the colour-scale strip right of a ``width`` wide picture with ``font`` point
    text: a gap, the bar and room for the tick labels (4 digits), 40 at least."""
    gap, bar = _bar_size(width, font)
    return max(40, gap + bar + round(3.6 * font * DPI / 72))


def _bar_size(width: int, font: float) -> tuple[int, int]:
    """The gap before the colour bar and its width, in pixels: 2 % of the picture's width, 6 px
    at least and 1.5 font heights at most."""
    pixels = font * DPI / 72
    return max(3, round(0.4 * pixels)), max(6, round(min(0.02 * width, 1.5 * pixels)))


def _draw_colorbar(figure: Figure, size: tuple[int, int], font: float, norm: Normalize, cmap: str) -> None:
    """The colour bar of ``norm`` in ``cmap``, in the strip right of a ``size`` image, its ticks
    labelled on its right."""
    (width, height), total = size, figure.bbox.width
    gap, bar = _bar_size(width, font)
    margin = min(max(0.1 * height, font * DPI / 72), 0.45 * height) / height
    axes = figure.add_axes(((width + gap) / total, margin, bar / total, 1.0 - 2 * margin))
    figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=axes)
    axes.tick_params(labelsize=font * 0.8, length=font * 0.35, pad=font * 0.25, colors="black")


def _inches(pixels: int) -> float:
    """A figure side in inches that Agg draws as exactly ``pixels`` pixels at ``DPI`` (it
    truncates: 29 / 100 * 100 is 28.999...)."""
    inches = pixels / DPI
    while int(inches * DPI) < pixels:
        inches = math.nextafter(inches, math.inf)
    return inches


def _to_image(figure: Figure, size: tuple[int, int]) -> Image.Image:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    picture = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    if picture.size != size:
        raise RuntimeError(f"matplotlib drew {picture.size}, not {size}")  # _inches prevents it
    return picture


def _side_by_side(panels: list[Image.Image]) -> Image.Image:
    if len(panels) == 1:
        return panels[0]
    gap = 4
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    sheet = Image.new("RGB", (width, panels[0].height), (255, 255, 255))
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + gap
    return sheet
