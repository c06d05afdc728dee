"""Image inputs for dense maps: one lazy, model-ready view over any kind of image.

``open_image`` turns what a caller passes (a path, a PIL image, a uint8 ``(H, W, C)`` array
from numpy, zarr or dask, or a model-ready float ``(C, H, W)`` tensor or array) into an
:class:`ImageSource`. A source knows its size and reads one rectangle at a time as a
normalized float32 ``(C, h, w)`` tensor, so a zarr array, a dask array or a (pyramidal)
TIFF opened through ``tifffile`` as zarr is never loaded whole: only the tiles are read.

Images (uint8) are scaled to [0, 1] and normalized with ``mean``/``std``: the caller's, else
the model's own (timm's ``pretrained_cfg``), else ImageNet's for 3-channel models and none
(mean 0, std 1) for others. Model-ready float inputs are used as they are.

This is the one image reader of the library and the command line: ``dense_map`` (and so
``predict``) reads through :func:`open_frame`, and ``heatmap`` and ``detect`` through
:func:`open_picture`, which also gives the RGB picture that maps and boxes are drawn on.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Frame", "ImageSource", "default_normalization", "open_frame",
           "open_image", "open_picture"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass
class ImageSource:
    """A lazily read image: ``array`` indexed ``[y0:y1, x0:x1]`` on demand.

    Attributes:
        array: anything sliceable with numpy semantics (numpy, zarr, dask, a memory map);
            ``(H, W, C)`` when ``is_image`` else ``(C, H, W)``.
        is_image: uint8-style pixels to scale and normalize, channels last.
        mean, std: per-channel normalization applied to images after scaling to [0, 1].
        scale: what one pixel unit is (255 for uint8, 65535 for uint16).
    """

    array: Any
    is_image: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 255.0

    @property
    def height(self) -> int:
        return int(self.array.shape[0 if self.is_image else 1])

    @property
    def width(self) -> int:
        return int(self.array.shape[1 if self.is_image else 2])

    @property
    def chunk_rows(self) -> int:
        """The rows of the array's chunks (zarr's, a slide's JPEG tiles'), 1 for an array in
        one piece: reads that start on them decode each chunk once."""
        chunks = getattr(self.array, "chunks", None)
        rows = chunks[0 if self.is_image else 1] if isinstance(chunks, tuple) and len(chunks) == 3 else 1
        return rows if isinstance(rows, int) and rows > 0 else 1

    @property
    def channels(self) -> int:
        return int(self.array.shape[2 if self.is_image else 0])

    @property
    def is_dask(self) -> bool:
        return type(self.array).__module__.startswith("dask")

    def key(self) -> list[Any]:
        """What a resumed map must have been made from: the size and channels."""
        return [self.height, self.width, self.channels]

    def read(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """The rectangle ``[y0, y1) x [x0, x1)`` as a normalized float32 ``(C, h, w)`` tensor."""
        return self.prepare(self.block(y0, y1, x0, x1), (y0, y1, x0, x1))

    def block(self, y0: int, y1: int, x0: int, x1: int) -> Any:
        """What :meth:`read` slices out of ``array`` for that rectangle (lazy for dask)."""
        return self.array[y0:y1, x0:x1] if self.is_image else self.array[:, y0:y1, x0:x1]

    def read_rows(self, y0: int, y1: int, x0: int, x1: int, step: int,
                  lock: AbstractContextManager[Any] | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """:meth:`read` of ``[y0, y1) x [x0, x1)`` in ``step`` rows at a time, ``(a, b, tensor)``
        each, the array read once, holding ``lock`` while it reads (not while it prepares):
        streams in threads share one reader, which need not be thread-safe."""
        with lock or nullcontext():
            block = self.block(y0, y1, x0, x1)
        for a in range(y0, y1, step):
            b = min(a + step, y1)
            rows = slice(a - y0, b - y0)
            yield a, b, self.prepare(block[rows] if self.is_image else block[:, rows], (a, b, x0, x1))

    def reader(self) -> ImageSource:
        """This source without its array: what turns blocks into tensors on a dask worker."""
        return dataclasses.replace(self, array=None)

    def prepare(self, block: Any, rect: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """Turn the :meth:`block` of the rectangle ``rect`` (``y0, y1, x0, x1``; default the
        whole image) into a model-ready ``(C, h, w)`` tensor."""
        if hasattr(block, "compute"):
            block = block.compute()
        if not isinstance(block, torch.Tensor):
            block = np.asarray(block)
            block = block if block.flags.writeable else block.copy()
        tensor = torch.as_tensor(block)
        if not self.is_image:
            return tensor.to(torch.float32)
        # one pass to contiguous float32 planes: the divisions then run faster than broadcast over
        # channels-last memory (with the runner's channels-last copy, 9 against 11 ms per
        # 128x16384 block), with the same results bit for bit
        planar = torch.empty((tensor.shape[2], tensor.shape[0], tensor.shape[1]), dtype=torch.float32)
        tensor = planar.copy_(tensor.permute(2, 0, 1)).div_(self.scale)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return tensor.sub_(mean).div_(std)


@dataclass
class Frame:
    """The image a map is made of, and where its pixels sit in the image the caller named.

    Attributes:
        source: the pixels mapped at scale 1 (a slide's chosen level; see ``size``).
        original: ``(H, W)`` of what geometries are reported in (a slide's level 0).
        size: ``(h, w)`` of the image at scale 1: the source, or the size a slide's level is
            resampled to for the requested resolution.
        mpp: ``(y, x)`` microns per ``original`` pixel, where known.
        low_resolution: a small ``(h, w, C)`` view of the whole image (for ``mask="auto"``).
        transform, crs: a georeferenced raster's affine transform and coordinate system
            (rasterio's), else ``None``.
    """

    source: ImageSource
    original: tuple[int, int]
    size: tuple[int, int]
    mpp: tuple[float, float] | None
    low_resolution: Any
    transform: Any = None
    crs: Any = None

    def map_transform(self, geometry: Any) -> Any:
        """The affine transform of a map with ``geometry`` (a ``ScaledGeometry`` in original
        pixels): the image's own (pixels, where it has none) placing each cell over the stride
        block centred in its window."""
        from affine import Affine

        from .geotiff import map_transform

        return map_transform(self.transform or Affine.identity(), geometry.model, geometry.factor)

    def mask(self, spec: Any) -> Any:
        """The :class:`~.masks.Mask` that ``dense_map``'s ``mask=`` names."""
        from .masks import auto_mask, check_mask

        if isinstance(spec, str) and spec == "auto":
            if not self.source.is_image:
                raise ValueError('mask="auto" looks at image pixels; a model-ready float input has none: '
                                 "pass a mask array")
            return auto_mask(self.low_resolution())
        return check_mask(spec, self.original)


def open_frame(image: Any, channels: int, mean: Sequence[float] | None, std: Sequence[float] | None,
               model: object = None, mpp: float | None = None, bands: Sequence[int] | None = None) -> Frame:
    """The :class:`Frame` of ``image``: a slide file (a slide format, or a TIFF with ``mpp``)
    read at ``mpp`` microns per pixel (default: level 0); a georeferenced raster (a TIFF with
    a coordinate system, or any raster with ``bands``) read through rasterio, the ``bands``
    given (1-based, default all); else :func:`open_image`.

    Raises:
        ValueError: as :func:`open_image`; ``mpp`` for an input that is not a slide file, or
            ``bands`` for one that is not a raster file; a slide no installed reader opens,
            without resolution metadata, or ``mpp`` finer than its level 0.
    """
    from .masks import low_resolution
    from .slides import SLIDE_SUFFIXES, level_for, open_slide

    suffix = Path(image).suffix.lower() if isinstance(image, (str, os.PathLike)) else ""
    if bands is not None or (suffix in TIFF_SUFFIXES and mpp is None and _georeferenced(image)):
        if mpp is not None:
            raise ValueError("bands= picks bands of a raster file (a GeoTIFF, say); mpp= reads slides")
        if not suffix:
            raise ValueError(f"bands= picks bands of a raster file; {type(image).__name__} is not one: "
                             "pass its path, or only the bands' pixels")
        from .geotiff import GeoRaster

        raster = GeoRaster(image, bands)
        if len(raster.bands) != channels:
            raise ValueError(_band_count(image, raster, channels, bands is not None))
        source = open_image(raster, channels, mean, std, model)
        size = (source.height, source.width)
        return Frame(source, size, size, None, lambda: low_resolution(raster), raster.transform, raster.crs)
    if not suffix or suffix not in SLIDE_SUFFIXES or (suffix in TIFF_SUFFIXES and mpp is None):
        if mpp is not None:
            what = str(image) if isinstance(image, (str, os.PathLike)) else f"a {type(image).__name__}"
            raise ValueError(f"mpp= reads a slide file (one of {', '.join(SLIDE_SUFFIXES)}) at a "
                             f"resolution; {what} is not one: leave mpp out, or resample the image yourself")
        source = open_image(image, channels, mean, std, model)
        size = (source.height, source.width)
        if suffix in TIFF_SUFFIXES:  # a pyramid's coarsest level, as for slides (not all of level 0)
            return Frame(source, size, size, None, lambda: low_resolution(_open_tiff(Path(image), -1)))
        return Frame(source, size, size, None, lambda: low_resolution(source.array))
    slide = open_slide(image)
    level, factor = (0, 1.0) if mpp is None else level_for(slide, mpp)
    source = open_image(slide.level(level), channels, mean, std, model)
    height, width = slide.sizes[level]
    size = (height, width) if factor == 1.0 else (round(height * factor), round(width * factor))
    return Frame(source, slide.sizes[0], size, slide.mpp,
                 lambda: low_resolution(slide.level(len(slide.sizes) - 1)))


def _band_count(image: Any, raster: Any, channels: int, chosen: bool) -> str:
    """Why a raster's bands do not fit a model of ``channels`` channels, and the ``bands=`` that do."""
    if chosen:
        return (f"the model takes {channels} channels but bands={tuple(raster.bands)} picks "
                f"{len(raster.bands)} of {image}; pick {channels} bands, in the order the model was "
                "trained on")
    names = ", ".join(f"{b}: {n}" for b, n in zip(raster.bands, raster.band_names))
    example = ", ".join(map(str, raster.bands[:channels])) + ("," if channels == 1 else "")
    return (f"the model takes {channels} channels but {image} has {len(raster.bands)} bands ({names}); "
            f"pick {channels} of them with bands=({example}), in the order the model was trained on")


def _georeferenced(path: Any) -> bool:
    from .geotiff import is_georeferenced

    return Path(path).is_file() and is_georeferenced(path)


def default_normalization(model: object, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's own mean/std (timm ``pretrained_cfg``), else ImageNet's (3 channels), else none."""
    for candidate in (model, getattr(model, "original", None)):
        cfg = getattr(candidate, "pretrained_cfg", None) or getattr(candidate, "default_cfg", None)
        if isinstance(cfg, dict) and cfg.get("mean") and cfg.get("std"):
            return tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"]))
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.0,) * channels, (1.0,) * channels


def open_image(
    image: Any,
    channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    model: object = None,
) -> ImageSource:
    """Wrap ``image`` as an :class:`ImageSource` for a model taking ``channels`` channels.

    Raises:
        ValueError: a missing or unreadable file, a shape or channel count the model cannot
            take, or ``mean``/``std`` of the wrong length.
        TypeError: an object that is not an image.
    """
    array = _as_array(image, channels)
    is_image = not _is_float(array)
    if len(array.shape) == 2 and is_image:
        array = _Gray(array)
    if len(array.shape) != 3:
        raise ValueError(
            f"image must be (H, W, C) uint8 pixels or a model-ready (C, H, W) float array, "
            f"got shape {tuple(array.shape)}"
        )
    source = ImageSource(array, is_image, (), ())
    if source.channels != channels:
        layout = "(H, W, C) pixels" if is_image else "a (C, H, W) float array"
        raise ValueError(
            f"the model takes {channels} channels but the image, read as {layout}, has "
            f"{source.channels}; pass {channels}-channel input"
        )
    if is_image:
        source.scale = float(np.iinfo(np.dtype(array.dtype)).max) if np.dtype(array.dtype).kind in "ui" \
            else 1.0
        source.mean, source.std = _normalization(model, channels, mean, std)
    return source


def open_picture(
    image: Any,
    channels: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model: object = None,
) -> tuple[ImageSource, Any]:
    """:func:`open_image` of ``image``, and the same image as an RGB PIL picture to draw a map
    or boxes on, from one read of the file.

    The picture has the image's own colours where Pillow reads it (a PNG or JPEG path, a PIL
    image), even for a one-channel model; otherwise (a TIFF, ``.npy`` or zarr array of
    pixels) it shows the pixels the model reads, scaled to 8 bits.

    Raises:
        ValueError: as :func:`open_image`; a model-ready float input (it has no pixels to
            draw), or pixels of neither 1 nor 3 channels.
        TypeError: as :func:`open_image`.
    """
    if isinstance(image, (str, os.PathLike)) and Path(image).is_file() and _read_by_pillow(Path(image)):
        image = _open_pillow(Path(image))
    source = open_image(image, channels, mean, std, model)
    if type(image).__module__.startswith("PIL"):
        return source, image.convert("RGB")
    return source, _picture(source)


def _picture(source: ImageSource) -> Any:
    """The whole of ``source``'s pixels as an RGB PIL image, 8 bits per channel."""
    from PIL import Image

    if not source.is_image:
        raise ValueError("a model-ready float input has no pixels to draw on: pass the image's "
                         "(H, W, C) integer pixels")
    if source.channels not in (1, 3):
        raise ValueError(f"pictures are drawn from 1 (grey) or 3 (RGB) channels; the image has "
                         f"{source.channels}")
    pixels = np.asarray(source.block(0, source.height, 0, source.width))
    if pixels.dtype != np.uint8:
        pixels = np.clip(np.round(pixels / source.scale * 255.0), 0, 255).astype(np.uint8)
    pixels = np.ascontiguousarray(pixels[:, :, 0] if source.channels == 1 else pixels)
    return Image.fromarray(pixels).convert("RGB")


class _Gray:
    """A 2-D (grayscale) array read as ``(H, W, 1)``, lazily: slices go to the array."""

    def __init__(self, array: Any) -> None:
        self.array, self.dtype = array, array.dtype
        self.shape = (*array.shape, 1)

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        return np.asarray(self.array[index])[:, :, None]


def _normalization(model: object, channels: int, mean: Sequence[float] | None,
                   std: Sequence[float] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    default_mean, default_std = default_normalization(model, channels)
    pairs = {"mean": (mean, default_mean), "std": (std, default_std)}
    chosen = {}
    for name, (given, default) in pairs.items():
        values = tuple(float(v) for v in (default if given is None else given))
        if len(values) == 1:
            values = values * channels
        if len(values) != channels:
            raise ValueError(f"{name} has {len(values)} values but the model takes {channels} "
                             f"channels; pass one value per channel")
        chosen[name] = values
    if any(v == 0 for v in chosen["std"]):
        raise ValueError(f"std must not contain zero, got {chosen['std']}")
    return chosen["mean"], chosen["std"]


def _is_float(array: Any) -> bool:
    dtype = array.dtype
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    return np.dtype(dtype).kind == "f"


def _as_array(image: Any, channels: int) -> Any:
    """Something sliceable: paths are opened (lazily where the format allows), PIL converted."""
    if isinstance(image, (str, os.PathLike)):
        return _open_path(Path(image), channels)
    if type(image).__module__.startswith("PIL"):
        return np.asarray(image.convert("L" if channels == 1 else "RGB"))
    if isinstance(image, torch.Tensor):
        return image.detach().cpu()
    if isinstance(image, np.ndarray) or (hasattr(image, "shape") and hasattr(image, "dtype")
                                         and hasattr(image, "__getitem__")):
        return image
    raise TypeError(
        f"image must be a path, a PIL image, a numpy/zarr/dask array or a tensor, got "
        f"{type(image).__name__}"
    )


def _open_path(path: Path, channels: int) -> Any:
    if not path.exists():
        raise ValueError(f"image {path} does not exist")
    if _read_by_pillow(path):
        return np.asarray(_open_pillow(path).convert("L" if channels == 1 else "RGB"))
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            return _open_tiff(path)
        if path.suffix.lower() == ".npy":
            return np.load(path, mmap_mode="r")
        import zarr

        array = zarr.open(str(path), mode="r")
        if not hasattr(array, "shape"):
            raise ValueError(f"{path} is a zarr group, not an array; pass the array inside it")
        return array
    except (OSError, SyntaxError, KeyError) as exc:
        raise _unreadable(path, exc) from exc


def _read_by_pillow(path: Path) -> bool:
    """Whether :func:`_open_path` reads ``path`` with Pillow (not zarr, tifffile or numpy)."""
    zarr = path.suffix.lower() == ".zarr" or (path.is_dir() and (path / "zarr.json").exists())
    return not zarr and path.suffix.lower() not in (*TIFF_SUFFIXES, ".npy")


def _open_pillow(path: Path) -> Any:
    """The PIL image in ``path`` (a PNG, a JPEG, ...), decoded, its file closed."""
    from PIL import Image

    try:
        with Image.open(path) as pil:
            pil.load()
            return pil
    except (OSError, SyntaxError, KeyError) as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: Exception) -> ValueError:
    return ValueError(f"cannot read image {path}: {' '.join(str(exc).split())}")


def _open_tiff(path: Path, level: int = 0) -> Any:
    """Level ``level`` (-1: the coarsest) of a (pyramidal) TIFF as a lazy zarr array, read tile
    by tile."""
    import tifffile
    import zarr

    store = tifffile.imread(path, aszarr=True, level=level)
    array = zarr.open(store, mode="r")
    if not hasattr(array, "shape"):  # a multiscale group: take the full-resolution level
        array = array["0"]
    return array
