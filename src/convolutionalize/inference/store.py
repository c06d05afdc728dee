"""Where a dense map goes: a numpy array in memory, or a resumable zarr store on disk.

A zarr output is a group holding ``map`` (``(classes, rows, cols)`` float32, one chunk per
tile), ``done`` (one bool per tile, one chunk each, so that concurrent writers never
touch the same chunk) and ``skipped`` (one bool per tile, in one chunk, written before any
tile: the tiles a foreground mask left out, whose cells stay NaN, the map's fill value, and
which are flagged done as well). A tile's cells are written before its ``done`` flag,
so a run that stops anywhere leaves only finished tiles flagged. The group's attributes record what the
map was made from (``key``: what changes its numbers, never how it is cut into tiles); a restart
with the same arguments skips the flagged tiles, a restart with different ones is refused rather
than mixing two maps. The tiles are the map's chunks: a restart reads them back
(:func:`stored_tiles`) and computes the same tiles, whatever tiles it would choose now (they
depend on the thread count and the memory budgets); a restart given other tiles is refused.

The maps of an image pyramid (``dense_map(..., scales=...)``) are such stores inside one
group, named by each scale's index (``0``, ``1``, ...); the group records the scales.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .tiling import Tile, TileGrid

__all__ = ["PARTIAL", "MapSink", "ZarrSink", "add_flags", "map_compressors", "open_zarr_sink",
           "pyramid_paths", "reopen", "same_tiles", "stored_tiles", "written_behind"]

KEY_ATTR = "convolutionalize.key"
# A store being written under a temporary name, renamed once complete (``predict`` writes
# MAP.zarr as MAP.partial.zarr): what it records about itself names the final MAP.
PARTIAL = ".partial"
SCALES_ATTR = "convolutionalize.scales"
S = TypeVar("S")
Z = TypeVar("Z", bound="ZarrSink")


class MapSink:
    """An in-memory map: ``write`` owned cells, ``result`` the numpy array."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.array = np.empty(shape, dtype=np.float32)

    def done_tiles(self) -> set[tuple[int, int]]:
        return set()

    def skip_all(self, tiles: Sequence[Tile]) -> None:
        """Tiles left out (no foreground): their cells are NaN."""
        for tile in tiles:
            r0, r1, c0, c1 = tile.cells
            self.array[:, r0:r1, c0:c1] = np.nan

    def write(self, tile: Tile, cells: np.ndarray) -> None:
        r0, r1, c0, c1 = tile.cells
        self.array[:, r0:r1, c0:c1] = cells

    def result(self) -> Any:
        return self.array

    def finish(self) -> None:
        """Called once every tile is written or skipped (nothing to do in memory)."""


@dataclass
class ZarrSink:
    """A map in a zarr group, with per-tile completion flags (see the module docstring)."""

    path: str
    map: Any
    done: Any
    skipped: Any

    def done_tiles(self) -> set[tuple[int, int]]:
        """The indexes of every tile done (its flags read in one call, not one call each)."""
        return {(int(i), int(j)) for i, j in np.argwhere(np.asarray(self.done[...]))}

    def skip_all(self, tiles: Sequence[Tile]) -> None:
        """Tiles left out (no foreground): flagged, their cells keeping the fill value, NaN;
        the flags written in one call per array (the ``skipped`` flags first)."""
        if tiles:
            where = tuple(np.array([t.index[a] for t in tiles]) for a in (0, 1))
            self.skipped.vindex[where] = True
            self.done.vindex[where] = True

    def write(self, tile: Tile, cells: np.ndarray) -> None:
        r0, r1, c0, c1 = tile.cells
        self.map[:, r0:r1, c0:c1] = cells
        self.done[tile.index] = True

    def result(self) -> Any:
        return self.map

    def finish(self) -> None:
        """Called once every tile is written or skipped (a plain store is complete as it is)."""

    def __reduce__(self) -> tuple[Any, ...]:  # workers reopen the store by path
        return (_reopen, (self.path,))


@contextlib.contextmanager
def written_behind(sink: MapSink | ZarrSink) -> Iterator[Callable[[Tile, np.ndarray], None]]:
    """``sink.write`` for a loop that computes tiles: a zarr store's writes (encoding, and the
    disk, which throttles a writer once the dirty page cache fills) run in a thread while the
    next tile computes, one tile waiting at most. Every tile handed over is written (and
    flagged) before the block ends; a failed write is raised in the caller's thread, at its
    next write or at the end."""
    if not isinstance(sink, ZarrSink):
        yield sink.write
        return
    tiles: queue.Queue[tuple[Tile, np.ndarray] | None] = queue.Queue(maxsize=1)
    failed: list[BaseException] = []

    def drain() -> None:
        while (item := tiles.get()) is not None:
            if not failed:
                try:
                    sink.write(*item)
                except BaseException as exc:  # raised again in the caller's thread
                    failed.append(exc)

    def write(tile: Tile, cells: np.ndarray) -> None:
        if failed:
            raise failed[0]
        tiles.put((tile, cells))

    thread = threading.Thread(target=drain, name="convolutionalize-writer", daemon=True)
    thread.start()
    try:
        yield write
    finally:
        tiles.put(None)
        thread.join()
    if failed:
        raise failed[0]


def _reopen(path: str) -> ZarrSink:
    import zarr

    return _sink(path, zarr.open_group(path, mode="r+"))


def _sink(path: str, group: Any) -> ZarrSink:
    return ZarrSink(path, group["map"], group["done"], group["skipped"])


def open_zarr_sink(path: str | os.PathLike[str], shape: tuple[int, int, int], grid: TileGrid,
                   key: dict[str, Any]) -> ZarrSink:
    """Open ``path`` to resume a map made with the same ``key`` in the same tiles, or create it.

    Raises:
        ValueError: ``path`` holds something else: another map, the map in other tiles, or
            data that is not ours.
    """
    import zarr

    path = str(Path(path))
    found = reopen(path, key, "dense-map zarr", lambda group: _sink(path, group))
    if found is not None:
        return same_tiles(found, grid)
    group = zarr.open_group(path, mode="w")
    chunks = (shape[0], *grid.cells_per_tile)
    group.create_array("map", shape=shape, chunks=chunks, dtype="float32", fill_value=np.nan,
                       compressors=map_compressors())
    add_flags(group, grid)
    group.attrs[KEY_ATTR] = json.dumps(key, sort_keys=True)
    return _sink(path, group)


def reopen(path: str, key: dict[str, Any], what: str, make: Callable[[Any], S]) -> S | None:
    """``make(group)``, the sink of the store at ``path`` made with ``key``; ``None`` where
    nothing is at ``path``.

    Raises:
        ValueError: ``path`` holds a map made with another key, or data that is not a ``what``
            store.
    """
    import zarr

    if not Path(path).exists():
        return None
    try:
        group = zarr.open_group(path, mode="r+")
        found, sink = group.attrs.get(KEY_ATTR), make(group)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path} exists and is not a {what} store; remove it or pass another out") from exc
    if found != json.dumps(key, sort_keys=True):
        raise _different(path)
    return sink


def stored_tiles(path: str | os.PathLike[str], key: dict[str, Any], what: str = "dense-map zarr",
                 array: str = "map") -> tuple[int, int] | None:
    """The cells per tile (rows, cols) of the map at ``path`` made with ``key``: the chunks of
    its ``array``, which a resumed run tiles by again so that its tiles are the ones flagged
    done; ``None`` where nothing is at ``path``.

    Raises:
        ValueError: as :func:`reopen`.
    """
    return reopen(str(Path(path)), key, what, lambda group: _tiles(group[array]))


def same_tiles(sink: Z, grid: TileGrid) -> Z:
    """``sink`` (reopened), where its map's chunks are ``grid``'s tiles.

    Raises:
        ValueError: the store holds the map in other tiles (made with another ``tile``).
    """
    if _tiles(sink.map) != tuple(grid.cells_per_tile):
        raise _different(sink.path)
    return sink


def _tiles(array: Any) -> tuple[int, int]:
    _, rows, cols = array.chunks
    return int(rows), int(cols)


def _different(path: str) -> ValueError:
    return ValueError(f"{path} holds a map made with different arguments (model, image, tile, "
                      "precision, output or mask); remove it or pass another out")


def map_compressors() -> Any:
    """How maps are compressed: not at all. Float32 class scores hardly compress (Blosc LZ4 over
    shuffled bytes kept 0.90 of a ShuffleNetV2 map, zarr's default Zstd 0.88) and compressing
    halved the speed of writing (a 1 GB map: 1.69 s with LZ4, 0.77 s without; measured), a sixth
    of the time that streaming a 16384^2 image to a zarr map takes."""
    return None


def add_flags(group: Any, grid: TileGrid) -> None:
    """The per-tile ``done`` and ``skipped`` flags, in ``group``: ``done`` one chunk per tile
    (tiles are flagged as they finish, by concurrent writers), ``skipped`` one chunk (written
    once, before any tile: a chunk per tile cost 0.6 s for the 688 skipped tiles of a 40k slide)."""
    group.create_array("done", shape=grid.grid, chunks=(1, 1), dtype="bool", fill_value=False)
    group.create_array("skipped", shape=grid.grid, chunks=grid.grid, dtype="bool", fill_value=False)


def pyramid_paths(path: str | os.PathLike[str], scales: tuple[float, ...]) -> list[str]:
    """The store of each scale's map inside the group ``path`` (made, or reopened to resume).

    Raises:
        ValueError: ``path`` holds something else: a single map, another pyramid, other data.
    """
    import zarr

    root = Path(path)
    if root.exists():
        try:
            found = zarr.open_group(str(root), mode="r").attrs.get(SCALES_ATTR)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{root} exists and is not a zarr store of dense maps; remove it or "
                             "pass another out") from exc
        if found != list(scales):
            held = "a single map" if found is None else f"the maps of scales {tuple(found)}"
            raise ValueError(f"{root} holds {held}, not of scales {scales}; remove it or pass "
                             "another out")
    else:
        zarr.open_group(str(root), mode="w").attrs[SCALES_ATTR] = list(scales)
    return [str(root / str(index)) for index in range(len(scales))]
