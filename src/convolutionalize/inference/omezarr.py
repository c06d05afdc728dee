"""A dense map as an OME-Zarr (NGFF 0.5) image: class scores that napari and QuPath open in place.

The store is a zarr 3 group: level ``0`` is the map (``(classes, rows, cols)`` float32, one
chunk per tile, fill value NaN), written tile by tile and resumable exactly like a
:class:`~.store.ZarrSink`. The per-tile ``done`` and ``skipped`` flags live in the sub-group
``convolutionalize``, which NGFF readers ignore; the root attributes record the ``key``, and a
resumed run tiles as level 0 is chunked (:func:`stored_ome_tiles`).
``finish()`` then adds the halved levels ``1``, ``2``, ... (2x2 means that ignore NaN) and writes
the ``multiscales`` (axes ``c, y, x``, each level's scale and translation from :class:`Physical`)
and ``omero`` (class names) metadata with ome-zarr's writer.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .store import KEY_ATTR, PARTIAL, ZarrSink, add_flags, map_compressors, reopen, same_tiles, stored_tiles
from .tiling import TileGrid

__all__ = ["OmeZarrSink", "Physical", "is_ome_zarr", "open_ome_zarr_sink", "stored_ome_tiles"]

FLAGS = "convolutionalize"
MIN_LEVEL_SIZE = 64  # no level with fewer rows or columns than this (level 0 always)
_AXES = ("c", "y", "x")
_COLORS = ("FF0000", "00FF00", "0000FF", "FFFF00", "FF00FF", "00FFFF", "FF8000", "8000FF")


@dataclass(frozen=True)
class Physical:
    """Where map cell centres are: cell (i, j)'s centre is at translation + (i, j) * scale, in `unit`."""

    scale: tuple[float, float]  # (y, x) per cell
    translation: tuple[float, float]  # (y, x) of cell (0, 0)'s centre
    unit: str | None  # "micrometer", or None (pixels: no unit)


def is_ome_zarr(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an OME-Zarr store (it ends with ``.ome.zarr``, any case)."""
    return os.fspath(path).rstrip("/\\").lower().endswith(".ome.zarr")


@dataclass
class OmeZarrSink(ZarrSink):
    """A map written to level 0 of an OME-Zarr image; ``finish`` makes it a valid image.

    Until ``finish`` has run (every tile done) the store has no NGFF metadata: an interrupted
    run leaves a resumable store, not yet an image. ``finish`` on a complete store rewrites the
    same levels and metadata, so calling it again (after a resume) changes nothing; while it
    rewrites them the metadata is gone.
    """

    physical: Physical
    labels: tuple[str, ...]

    def finish(self) -> None:
        """Write the lower-resolution levels and the NGFF metadata.

        Raises:
            ValueError: some tiles are neither written nor skipped.
        """
        import dask
        import dask.array as da
        import zarr

        with warnings.catch_warnings():  # ome-zarr 0.18 warns about its own Scaler on import
            warnings.simplefilter("ignore", DeprecationWarning)
            from ome_zarr.writer import write_multiscales_metadata

        missing = int((~np.asarray(self.done[...])).sum())
        if missing:
            raise ValueError(f"{self.path}: {missing} tiles are not done; resume the run before finishing")
        group = zarr.open_group(self.path, mode="r+")
        group.attrs.pop("ome", None)  # rewriting the levels: not an image until done again
        level0 = da.from_zarr(self.map)
        nan = da.isnan(level0)
        low = da.where(nan, np.inf, level0).min(axis=(1, 2))
        high = da.where(nan, -np.inf, level0).max(axis=(1, 2))
        source, shape, stores = level0, self.map.shape, []
        while all((n + 1) // 2 >= MIN_LEVEL_SIZE for n in shape[1:]):
            shape = (shape[0], *((n + 1) // 2 for n in shape[1:]))
            target = _level(group, str(len(stores) + 1), shape, self.map.chunks)
            stores.append(da.store(_halve(source, self.map.chunks), target, lock=False, compute=False))
            source = da.from_zarr(target)
        # each level reads the one stored before it: store them in order (level 1 with the window)
        low, high, *_ = dask.compute(low, high, *stores[:1], scheduler="threads")
        for stored in stores[1:]:
            dask.compute(stored, scheduler="threads")
        write_multiscales_metadata(
            group, self._datasets(len(stores) + 1), axes=_axes(self.physical.unit),
            name=image_name(self.path),
            metadata={"omero": _omero(self.labels, low, high)},
        )

    def _datasets(self, levels: int) -> list[dict[str, Any]]:
        """Each level's path and transforms: level k pixel 0's centre is that of level 0's
        cells 0 .. 2^k - 1, ``translation + (2^k - 1) / 2 * scale``."""
        (sy, sx), (ty, tx) = self.physical.scale, self.physical.translation
        return [
            {"path": str(k), "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, sy * 2**k, sx * 2**k]},
                {"type": "translation", "translation": [0.0, ty + (2**k - 1) / 2 * sy,
                                                        tx + (2**k - 1) / 2 * sx]},
            ]}
            for k in range(levels)
        ]

    def __reduce__(self) -> tuple[Any, ...]:  # workers reopen the store by path
        return (_reopen, (self.path, self.physical, self.labels))


def image_name(path: str | os.PathLike[str]) -> str | None:
    """The multiscale image's name: the store's final name without its suffix, also while it is
    written under its temporary ``NAME.partial.ome.zarr`` (``predict``'s resumable name)."""
    name = Path(path).name
    for suffix in (".ome.zarr", ".zarr", PARTIAL):
        name = name.removesuffix(suffix)
    return name or None


def _reopen(path: str, physical: Physical, labels: tuple[str, ...]) -> OmeZarrSink:
    import zarr

    return _sink(path, zarr.open_group(path, mode="r+"), physical, labels)


def _sink(path: str, group: Any, physical: Physical, labels: tuple[str, ...]) -> OmeZarrSink:
    flags = group[FLAGS]
    return OmeZarrSink(path, group["0"], flags["done"], flags["skipped"], physical, labels)


def _level(group: Any, name: str, shape: tuple[int, ...], chunks: tuple[int, ...]) -> Any:
    return group.create_array(name, shape=shape, chunks=chunks, dtype="float32", fill_value=np.nan,
                              dimension_names=_AXES, overwrite=True, compressors=map_compressors())


def _halve(level: Any, chunks: tuple[int, ...]) -> Any:
    """The 2x2 NaN-ignoring mean of a dask ``(c, y, x)`` array, in blocks of ``chunks``
    (an odd last row or column is averaged with NaN padding: over what is there)."""
    import dask.array as da

    padded = da.pad(level, [(0, 0)] + [(0, n % 2) for n in level.shape[1:]], constant_values=np.nan)
    padded = padded.rechunk((chunks[0], 2 * chunks[1], 2 * chunks[2]))
    return da.coarsen(_nanmean, padded, {1: 2, 2: 2})


def _nanmean(block: np.ndarray, axis: tuple[int, ...] | None = None) -> np.ndarray:
    """The mean of the non-NaN values along ``axis``; NaN where all are NaN (and no warning)."""
    count = (~np.isnan(block)).sum(axis=axis)
    with np.errstate(invalid="ignore"):
        return (np.nansum(block, axis=axis) / count).astype(np.float32)


def _axes(unit: str | None) -> list[dict[str, str]]:
    space = {"type": "space", **({"unit": unit} if unit else {})}
    return [{"name": "c", "type": "channel"}, {"name": "y", **space}, {"name": "x", **space}]


def _omero(labels: tuple[str, ...], low: np.ndarray, high: np.ndarray) -> dict[str, Any]:
    """Channel names, colours and display windows (each class's range; 0..1 for an all-NaN class)."""
    channels = []
    for index, (label, lo, hi) in enumerate(zip(labels, low.tolist(), high.tolist())):
        lo, hi = (lo, hi) if lo <= hi else (0.0, 1.0)
        channels.append({"label": label, "color": _COLORS[index % len(_COLORS)], "active": True,
                         "window": {"min": lo, "max": hi, "start": lo, "end": hi}})
    return {"channels": channels}


def open_ome_zarr_sink(path: str | os.PathLike[str], shape: tuple[int, int, int], grid: TileGrid,
                       key: dict[str, Any], physical: Physical,
                       labels: list[str] | None = None) -> OmeZarrSink:
    """Open the OME-Zarr store ``path`` to resume a map made with the same ``key`` in the same
    tiles, or create it.

    Args:
        shape: ``(classes, rows, cols)`` of the map.
        grid: its tiles; level 0 has one chunk per tile.
        key: what the map is made from (as for :func:`~.store.open_zarr_sink`).
        physical: where the cells are, for the NGFF coordinate transforms.
        labels: the class names (default ``class 0``, ``class 1``, ...).

    Raises:
        ValueError: ``labels`` do not name every class, or ``path`` holds something else:
            another map, the map in other tiles, or data that is not ours.
    """
    import zarr

    names = tuple(labels) if labels is not None else tuple(f"class {c}" for c in range(shape[0]))
    if len(names) != shape[0]:
        raise ValueError(f"{len(names)} labels for {shape[0]} classes; pass one label per class")
    path = str(Path(path))
    found = reopen(path, key, "dense-map OME-Zarr", lambda group: _sink(path, group, physical, names))
    if found is not None:
        return same_tiles(found, grid)
    group = zarr.open_group(path, mode="w", zarr_format=3)
    _level(group, "0", shape, (shape[0], *grid.cells_per_tile))
    add_flags(group.create_group(FLAGS), grid)
    group.attrs[KEY_ATTR] = json.dumps(key, sort_keys=True)
    return _sink(path, group, physical, names)


def stored_ome_tiles(path: str | os.PathLike[str], key: dict[str, Any]) -> tuple[int, int] | None:
    """The cells per tile of the OME-Zarr map at ``path`` made with ``key`` (level 0's chunks),
    or ``None`` where nothing is at ``path`` (as :func:`~.store.stored_tiles`)."""
    return stored_tiles(path, key, "dense-map OME-Zarr", "0")
