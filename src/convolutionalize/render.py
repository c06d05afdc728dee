"""Pictures of dense class maps: heatmap overlays and detection boxes, as PIL images.

A map cell does not stand for a pixel but for a window (``geometry.box(i, j)``), and
neighbouring windows are one stride apart. So a cell is painted over the ``stride x stride``
block at the centre of its window: the blocks tile the image without overlap and each sits
where its window is centred, which is where a window classifier "looks". Pixels that no
window centre covers (a half-window border) stay unpainted. Nothing is stretched.

Everything returns a ``PIL.Image`` (matplotlib with the Agg backend draws the overlays, Pillow
the boxes); callers decide whether and where to save it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from .detect import Detection
from .geometry import Geometry

__all__ = ["class_name", "draw_detections", "heatmap", "overlay", "paint_map", "rank_classes"]

logger = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray
DPI = 100
CMAP = "turbo"


def paint_map(values: np.ndarray, geometry: Geometry, size: tuple[int, int]) -> np.ndarray:
    """An ``(H, W)`` float array: cell ``(i, j)`` of ``values (rows, cols)`` painted over the
    ``stride`` block centred in its window, ``NaN`` where no cell is painted."""
    height, width = size
    (sy, sx), (h, w), (oy, ox) = geometry.stride, geometry.window, geometry.offset
    canvas = np.full((height, width), np.nan)
    blocks = np.repeat(np.repeat(np.asarray(values, np.float64), sy, 0), sx, 1)
    top, left = oy + (h - sy) // 2, ox + (w - sx) // 2
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + blocks.shape[0], height), min(left + blocks.shape[1], width)
    if y1 > y0 and x1 > x0:
        canvas[y0:y1, x0:x1] = blocks[y0 - top:y1 - top, x0 - left:x1 - left]
    return canvas


def overlay(image: ImageLike, values: np.ndarray, geometry: Geometry, *, title: str = "",
            vmin: float = 0.0, vmax: float = 1.0, cmap: str = CMAP, zoom: int = 1) -> Image.Image:
    """``image`` (greyed) with the map ``values (rows, cols)`` painted over it in a colormap,
    a colorbar inside the right edge and ``title`` in the top-left corner; the image's size
    times ``zoom``. Low values are nearly transparent so the image shows through."""
    grey = np.asarray(to_rgb(image).convert("L"), np.float64) / 255.0
    painted = paint_map(values, geometry, grey.shape)
    if zoom > 1:
        grey, painted = (np.kron(a, np.ones((zoom, zoom))) for a in (grey, painted))
    height, width = grey.shape
    norm = np.clip((painted - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    rgba = colormaps[cmap](np.nan_to_num(norm))
    rgba[..., 3] = np.where(np.isnan(painted), 0.0, 0.1 + 0.85 * np.nan_to_num(norm))
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    axes.imshow(0.35 + 0.65 * grey, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    shown = axes.imshow(rgba, interpolation="nearest")
    shown.set_cmap(cmap)
    shown.set_clim(vmin, vmax)
    axes.set_axis_off()
    font = float(np.clip(min(height, width) / 45, 5, 12))
    bar = axes.inset_axes((0.96, 0.08, 0.02, 0.5))
    colorbar = figure.colorbar(shown, cax=bar)
    colorbar.ax.yaxis.set_ticks_position("left")  # labels inside the picture
    colorbar.ax.tick_params(labelsize=font * 0.8, colors="black")
    if title:
        axes.text(0.015, 0.985, title, transform=axes.transAxes, va="top", ha="left",
                  fontsize=font, bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    return _to_image(figure, (width, height))


def heatmap(image: ImageLike, probabilities: np.ndarray, geometry: Geometry, *,
            class_index: int | None = None, top: int = 1, labels: Sequence[str] | None = None,
            background_class: int | None = None, any_object: bool = False,
            zoom: int = 1) -> Image.Image:
    """Heatmap panels of a ``(classes, rows, cols)`` probability map over ``image``, side by side.

    ``class_index`` draws that class; otherwise the ``top`` classes with the highest peak
    probability (the background class excluded). ``any_object`` (with a background class)
    adds a first panel of ``1 - P(background)``: where anything is. Each panel has the
    image's size times ``zoom``.

    Raises:
        ValueError: an unknown class index or a ``top`` below 1.
    """
    probabilities = np.asarray(probabilities)
    classes = probabilities.shape[0]
    if class_index is not None:
        _check_class(class_index, classes, "class")
        chosen = [class_index]
    else:
        chosen = rank_classes(probabilities, top, background_class)
    panels = []
    if any_object and background_class is not None:
        _check_class(background_class, classes, "background class")
        panels.append(overlay(image, 1.0 - probabilities[background_class], geometry,
                              title="any object: 1 - P(background)", zoom=zoom))
    for k in chosen:
        peak = float(probabilities[k].max())
        panels.append(overlay(image, probabilities[k], geometry,
                              title=f"P({class_name(k, labels)})  peak {peak:.2f}", zoom=zoom))
    return _side_by_side(panels)


def rank_classes(probabilities: np.ndarray, top: int, background_class: int | None = None) -> list[int]:
    """The ``top`` class indices with the highest peak probability over the map."""
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    peaks = np.asarray(probabilities).reshape(len(probabilities), -1).max(1)
    order = [int(k) for k in np.argsort(-peaks, kind="stable") if k != background_class]
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
    array = np.asarray(image)
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


def _to_image(figure: Figure, size: tuple[int, int]) -> Image.Image:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    picture = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    if picture.size != size:  # float rounding of the figure size: off by a pixel at most
        picture = picture.resize(size, Image.Resampling.NEAREST)
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
