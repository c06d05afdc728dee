"""Whole-slide images: pyramidal slides through a maintained reader, at a physical resolution.

:func:`open_slide` opens a slide with ``tiffslide`` (tifffile-based, pure Python: SVS,
pyramidal and OME-TIFF, NDPI, SCN) or, for the formats only OpenSlide reads (MIRAX, Hamamatsu
VMS, Ventana BIF, Philips, DICOM), with ``openslide-python`` where it is installed (``pip
install convolutionalize[slides]`` installs both and the OpenSlide library). tiffslide goes
first for TIFF-based files because it reads every level of an OME-TIFF pyramid (OpenSlide 4.0
sees only level 0 of one whose levels are SubIFDs, as tifffile writes them).

A :class:`Slide` gives each level as a lazy ``(H, W, 3)`` uint8 array (tiffslide: its zarr
array; OpenSlide: ``read_region`` per slice, composited on white where the scanner left no
pixels), the level downsamples and the microns per pixel of level 0. :func:`level_for` picks
the level a map at ``mpp`` microns per pixel reads: the coarsest level at least as fine as
``mpp``; the rest of the way is an antialiased resize (:mod:`.resize`), unless the level is
within ``MPP_TOLERANCE`` of ``mpp``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MPP_TOLERANCE", "SLIDE_SUFFIXES", "Slide", "level_for", "open_slide", "thumbnail"]

TIFF_SLIDES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".btf")
OPENSLIDE_ONLY = (".mrxs", ".vms", ".vmu", ".bif", ".svslide", ".dcm")
SLIDE_SUFFIXES = TIFF_SLIDES + OPENSLIDE_ONLY
MPP_TOLERANCE = 0.01  # a level within 1 % of the requested resolution is read as it is
EXTRA = "pip install 'convolutionalize[slides]'"


@dataclass
class Slide:
    """An opened slide (see the module docstring).

    Attributes:
        path: the file.
        reader: ``"tiffslide"`` or ``"openslide"``.
        sizes: ``(H, W)`` of every level, level 0 first.
        downsamples: level-0 pixels per level pixel, per level.
        mpp: ``(y, x)`` microns per level-0 pixel, ``None`` when the file does not say.
    """

    path: str
    reader: str
    sizes: list[tuple[int, int]]
    downsamples: list[float]
    mpp: tuple[float, float] | None

    def level(self, index: int) -> Any:
        """Level ``index`` as a lazy ``(H, W, 3)`` uint8 array (slices read from the file)."""
        return _LevelArray(self.path, self.reader, index, self.sizes[index], self.downsamples[index])

    def thumbnail_level(self, width: int) -> int:
        """The coarsest level at least ``width`` pixels wide (level 0 if none is narrower)."""
        wide = [k for k, (_, w) in enumerate(self.sizes) if w >= width]
        return wide[-1] if wide else 0


def open_slide(path: str | os.PathLike[str]) -> Slide:
    """Open a slide file with the first installed reader that reads it.

    Raises:
        ValueError: a missing file, or one no installed reader opens (the message names the
            extra to install when a reader is missing).
    """
    path = str(path)
    if not Path(path).is_file():
        raise ValueError(f"slide {path} does not exist")
    suffix = Path(path).suffix.lower()
    readers = ("openslide",) if suffix in OPENSLIDE_ONLY else ("tiffslide", "openslide")
    problems, missing = [], []
    for name in readers:
        try:
            opened = _OPENERS[name](path)
        except ImportError:
            missing.append(name)
            continue
        except Exception as exc:  # each reader has its own errors for a file it cannot read
            problems.append(f"{name}: {' '.join(str(exc).split()) or type(exc).__name__}")
            continue
        with opened:
            return _describe(path, name, opened)
    if missing and not problems:
        raise ValueError(f"cannot read the slide {Path(path).name}: no slide reader is installed "
                         f"({' or '.join(missing)}); {EXTRA}")
    hint = f"; {EXTRA} for {' and '.join(missing)}" if missing else ""
    raise ValueError(f"cannot read the slide {Path(path).name} ({'; '.join(problems)}){hint}")


def level_for(slide: Slide, mpp: float) -> tuple[int, float]:
    """The level a map at ``mpp`` microns per pixel reads, and the resize factor from it
    (at most 1; exactly 1.0 when the level is within ``MPP_TOLERANCE``).

    Raises:
        ValueError: the slide has no resolution metadata, or ``mpp`` is finer than level 0.
    """
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of microns per pixel, got {mpp!r}")
    if slide.mpp is None:
        raise ValueError(f"the slide {Path(slide.path).name} has no resolution metadata (microns per "
                         "pixel); leave mpp out to read level 0, or resample it yourself")
    base = min(slide.mpp)
    if mpp < base * (1 - MPP_TOLERANCE):
        raise ValueError(f"mpp={mpp:g} is finer than the slide's level 0 ({base:g} microns per pixel); "
                         f"pass mpp >= {base:g}")
    fine_enough = [k for k, d in enumerate(slide.downsamples) if base * d <= mpp * (1 + MPP_TOLERANCE)]
    level = fine_enough[-1]
    factor = base * slide.downsamples[level] / mpp
    return level, 1.0 if abs(factor - 1.0) <= MPP_TOLERANCE else factor


def thumbnail(path: str | os.PathLike[str], width: int) -> tuple[Any, tuple[float, float]]:
    """A ``width``-pixel-wide RGB picture of the slide (a PIL image) and its scale ``(fy, fx)``
    against level 0: read from the coarsest level at least that wide (every ``k``-th pixel
    where even that level is much wider, in blocks), resized with a Lanczos filter.

    Raises:
        ValueError: as :func:`open_slide`.
    """
    from PIL import Image

    from .masks import low_resolution

    slide = open_slide(path)
    level = slide.thumbnail_level(width)
    height, level_width = slide.sizes[level]
    step = max(level_width // width, 1)
    pixels = low_resolution(slide.level(level), side=math.ceil(max(height, level_width) / step))
    full_height, full_width = slide.sizes[0]
    picture = Image.fromarray(pixels).resize((width, max(round(width * full_height / full_width), 1)),
                                            Image.Resampling.LANCZOS)
    return picture, (picture.height / full_height, picture.width / full_width)


def _open_tiffslide(path: str) -> Any:
    import tiffslide

    return tiffslide.TiffSlide(path)


def _open_openslide(path: str) -> Any:
    import openslide

    return openslide.OpenSlide(path)


_OPENERS = {"tiffslide": _open_tiffslide, "openslide": _open_openslide}


def _describe(path: str, reader: str, opened: Any) -> Slide:
    sizes = [(int(h), int(w)) for w, h in opened.level_dimensions]
    properties = opened.properties
    mpp = []
    for axis in ("y", "x"):
        value = properties.get(f"{reader}.mpp-{axis}")
        try:
            mpp.append(float(value))
        except (TypeError, ValueError):
            break
    known = len(mpp) == 2 and all(math.isfinite(v) and v > 0 for v in mpp)
    return Slide(path, reader, sizes, [float(d) for d in opened.level_downsamples],
                 (mpp[0], mpp[1]) if known else None)


class _LevelArray:
    """One level of a slide, sliced ``[y0:y1, x0:x1]`` into ``(h, w, 3)`` uint8 pixels.

    The slide is opened on first use (and again after unpickling, on a dask worker)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, path: str, reader: str, level: int, size: tuple[int, int], downsample: float) -> None:
        self.path, self.reader, self.index, self.downsample = path, reader, level, downsample
        self.shape = (size[0], size[1], 3)
        self._opened: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_opened": None}

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        (y0, y1, _), (x0, x1, _) = (index[a].indices(self.shape[a]) for a in (0, 1))
        if self._opened is None:
            self._opened = _OPENERS[self.reader](self.path)
            if self.reader == "tiffslide":  # its levels as zarr arrays: exact pixel slices
                group = self._opened.zarr_group
                self._opened = group[str(self.index)] if hasattr(group, "keys") else group
        if self.reader == "tiffslide":
            return np.asarray(self._opened[y0:y1, x0:x1, :3])
        region = self._opened.read_region((round(x0 * self.downsample), round(y0 * self.downsample)),
                                          self.index, (max(x1 - x0, 0), max(y1 - y0, 0)))
        rgba = np.asarray(region, dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0  # OpenSlide's premultiplied-free RGBA: no pixels = transparent
        return np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
