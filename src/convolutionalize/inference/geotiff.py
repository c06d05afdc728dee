"""GeoTIFF in and out for dense maps: georeferenced rasters read lazily, maps written with
their place on Earth.

:class:`GeoRaster` is a lazy ``(H, W, C)`` view over a raster file that rasterio (GDAL) can
open: ``raster[y0:y1, x0:x1]`` reads that window of the chosen bands, nothing more, so it can
be an :class:`~.images.ImageSource`'s array. It keeps the path, not an open dataset: every read
opens the file, so it pickles to dask workers, is safe to read from several threads at once and
holds no file handle between reads. Opening costs about 0.5 ms, little next to decoding a
512x512 window of a tiled file (~6 ms). An untiled (striped) file loses more: each window
decodes whole image-wide strips again, which a dataset kept open would have cached; tile such a
file first (``gdal_translate -co TILED=YES``, or a COG).

A map cell ``(i, j)`` stands for the input window ``geometry.box(i, j)``; in the map raster
it is the pixel over the ``stride`` block centred in that window (as the heatmaps paint it).
:func:`map_transform` is the affine transform that puts map pixels there, from the input's;
:func:`write_geotiff` writes a ``(classes, rows, cols)`` map as a tiled float32 GeoTIFF, one
block at a time. rasterio is imported only when used.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..geometry import Geometry

if TYPE_CHECKING:
    from affine import Affine

__all__ = ["GeoRaster", "is_georeferenced", "map_transform", "require_rasterio", "write_geotiff"]

logger = logging.getLogger(__name__)

BLOCK = 512  # largest tile side of a written map
BLOCK_BYTES = 64 << 20  # a block of all classes stays below this (smaller tiles for many classes)


class GeoRaster:
    """A raster file as a lazy ``(H, W, C)`` array: ``raster[y0:y1, x0:x1]`` reads that window.

    Args:
        path: a file rasterio can open (GeoTIFF, COG, JPEG2000, ...).
        bands: 1-based band indexes as in rasterio/GDAL, in the order wanted, e.g. ``(4, 3, 2)``
            for Sentinel-2 RGB; default all bands.

    Attributes:
        shape, dtype: ``(H, W, C)`` and the bands' numpy dtype.
        crs, transform: the file's coordinate reference system and affine transform.
        band_names: each chosen band's description, else ``"band <index>"``.

    Raises:
        ValueError: a file rasterio cannot open, bad ``bands``, or bands of mixed dtypes.
    """

    def __init__(self, path: str | os.PathLike[str], bands: Sequence[int] | None = None) -> None:
        self.path = str(path)
        with _open(self.path) as dataset:
            self.bands = _check_bands(bands, dataset.count, self.path)
            dtypes = {dataset.dtypes[b - 1] for b in self.bands}
            if len(dtypes) > 1:
                raise ValueError(f"bands {list(self.bands)} of {self.path} have mixed dtypes "
                                 f"{sorted(dtypes)}; pick bands of one dtype")
            self.dtype = np.dtype(dtypes.pop())
            self.shape = (int(dataset.height), int(dataset.width), len(self.bands))
            self.crs, self.transform = dataset.crs, dataset.transform
            self.band_names = tuple(dataset.descriptions[b - 1] or f"band {b}" for b in self.bands)

    def __getitem__(self, index: slice | tuple[slice, ...]) -> np.ndarray:
        """The window ``[y0:y1, x0:x1]`` as an ``(h, w, C)`` numpy array (plain slices only)."""
        from rasterio.windows import Window

        keys = index if isinstance(index, tuple) else (index,)
        if len(keys) > 2 or not all(isinstance(k, slice) and k.step in (None, 1) for k in keys):
            raise IndexError(f"GeoRaster takes [y0:y1, x0:x1] slices with step 1, got {index!r}")
        keys = (*keys, slice(None), slice(None))
        (y0, y1, _), (x0, x1, _) = (keys[a].indices(self.shape[a]) for a in (0, 1))
        h, w = max(y1 - y0, 0), max(x1 - x0, 0)
        if h == 0 or w == 0:
            return np.empty((h, w, self.shape[2]), self.dtype)
        with _open(self.path) as dataset:
            block = dataset.read(indexes=list(self.bands), window=Window(x0, y0, w, h))
        return np.moveaxis(block, 0, -1)

    def __repr__(self) -> str:
        return f"GeoRaster({self.path!r}, bands={self.bands}, shape={self.shape}, dtype={self.dtype})"


def is_georeferenced(path: str | os.PathLike[str]) -> bool:
    """True when rasterio can open ``path`` and it has a CRS or a non-identity geotransform;
    False otherwise (a plain TIFF or PNG, an unreadable file, or rasterio not installed)."""
    try:
        from affine import Affine

        dataset = _open(str(path))
    except (ImportError, ValueError):
        return False
    with dataset:
        return dataset.crs is not None or dataset.transform != Affine.identity()


def map_transform(transform: Affine, geometry: Geometry, factor: tuple[float, float] = (1.0, 1.0)) -> Affine:
    """The affine transform of a map raster computed on an input with ``transform``.

    Map pixel ``(i, j)`` covers the ``stride`` block centred in cell ``(i, j)``'s window: its
    top-left corner is ``offset + (window - stride) / 2 + (i, j) * stride`` input pixels (exact,
    not rounded), so its centre is the window's centre.

    Args:
        transform: the input raster's affine transform (pixel ``(col, row)`` to world ``(x, y)``).
        geometry: the converted model's geometry.
        factor: ``(fy, fx)`` the map was computed on the input resized by (resized size over
            original size, as in an image pyramid): geometry pixels are input pixels times it.
    """
    from affine import Affine

    (h, w), (sy, sx), (oy, ox) = geometry.window, geometry.stride, geometry.offset
    fy, fx = factor
    corner = Affine.translation(ox + (w - sx) / 2, oy + (h - sy) / 2)
    return transform @ Affine.scale(1 / fx, 1 / fy) @ corner @ Affine.scale(sx, sy)


def write_geotiff(path: str | os.PathLike[str], map: Any, transform: Affine, crs: Any,
                  labels: Sequence[str] | None = None, progress: bool = False) -> Path:
    """Write a ``(classes, rows, cols)`` map as a tiled, deflate-compressed float32 GeoTIFF.

    The map is read block by block (a zarr map is never loaded whole) into a temporary file
    beside ``path``, renamed into place once complete: after any error nothing is at ``path``
    (an earlier file there is left as it was). Nodata is NaN; band descriptions are ``labels``.

    Args:
        path: the ``.tif`` to write (replaced if it exists).
        map: numpy, zarr or anything sliceable ``map[:, r0:r1, c0:c1]``, with ``.shape``.
        transform: the map's affine transform (see :func:`map_transform`).
        crs: its coordinate reference system (a rasterio ``CRS``, ``"EPSG:32633"``, ...) or None.
        labels: one name per class; default ``"class 0"``, ``"class 1"``, ...
        progress: a progress bar over blocks.

    Raises:
        ValueError: a missing directory, a map that is not 3-D, or the wrong number of labels.
    """
    import rasterio
    from tqdm.auto import tqdm

    target = Path(path)
    if not target.parent.is_dir():
        raise ValueError(f"cannot write {target}: directory {target.parent} does not exist")
    if len(map.shape) != 3:
        raise ValueError(f"map must be (classes, rows, cols), got shape {tuple(map.shape)}")
    classes, rows, cols = (int(n) for n in map.shape)
    names = [f"class {k}" for k in range(classes)] if labels is None else [str(n) for n in labels]
    if len(names) != classes:
        raise ValueError(f"{len(names)} labels for a map of {classes} classes; pass one per class")
    block = _block_size(classes, rows, cols)
    profile = dict(driver="GTiff", width=cols, height=rows, count=classes, dtype="float32", crs=crs,
                   transform=transform, nodata=float("nan"), tiled=True, blockxsize=block,
                   blockysize=block, compress="deflate", predictor=3, BIGTIFF="IF_SAFER")
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    temp.open("xb").close()  # the umask's permissions, as every other output (mkstemp's are 0600)
    try:
        with rasterio.Env(GDAL_PAM_ENABLED=False), rasterio.open(temp, "w", **profile) as out:
            out.descriptions = tuple(names)
            windows = [window for _, window in out.block_windows(1)]
            for window in tqdm(windows, unit="block", desc="GeoTIFF", disable=not progress):
                (r0, r1), (c0, c1) = window.toranges()
                out.write(np.asarray(map[:, r0:r1, c0:c1], dtype=np.float32), window=window)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%d classes, %dx%d, %d-pixel tiles)", target, classes, rows, cols, block)
    return target


def _block_size(classes: int, rows: int, cols: int) -> int:
    """The tile side: up to :data:`BLOCK`, a multiple of 16 (GDAL's rule), no larger than the map
    needs, and small enough that one block of all classes fits in :data:`BLOCK_BYTES`."""
    fits = math.isqrt(BLOCK_BYTES // (4 * max(classes, 1)))
    needed = max(rows, cols)
    return max(16, min(BLOCK, fits, -(-needed // 16) * 16) // 16 * 16)


def require_rasterio() -> None:
    """Raises ValueError (naming the extra to install) where rasterio is missing."""
    try:
        import rasterio  # noqa: F401
    except ImportError as exc:
        raise ValueError("GeoTIFF input with bands= and GeoTIFF output need rasterio: "
                         "pip install 'convolutionalize[geo]'") from exc


def _open(path: str) -> Any:
    """``rasterio.open(path)`` for reading; a file it cannot open is a one-line ValueError."""
    import warnings

    require_rasterio()
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    try:
        with warnings.catch_warnings():  # a plain raster is fine: its crs is None
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except (RasterioError, OSError) as exc:
        raise ValueError(f"cannot open raster {path}: {' '.join(str(exc).split())}") from exc


def _check_bands(bands: Sequence[int] | None, count: int, path: str) -> tuple[int, ...]:
    """``bands`` as a tuple of distinct 1-based indexes into a file of ``count`` bands."""
    if bands is None:
        return tuple(range(1, count + 1))
    chosen = tuple(bands)
    bad = [b for b in chosen
           if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= count]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"bands must be distinct 1-based band indexes of {path}, which has {count} "
                         f"bands (1..{count}); got {list(chosen)}")
    return tuple(int(b) for b in chosen)
