"""Dense maps as dask graphs: one task per exact tile, on threads, processes or a cluster.

The graph is the tiled computation of :mod:`.tiling` written out for dask, an equivalent of
``map_overlap`` whose overlaps follow the network's stride-aligned halos: one task loads the
model (so the model's bytes sit in the graph once and each worker fetches the loaded model
once, from a peer, and a lost copy is simply recomputed), and one task per tile reads the
tile's pixels (a slice of a dask input, or a lazy read of a zarr/numpy source; for a resized
image, of the input pixels the tile's resized pixels weigh, resampled in the task), runs the model
and either returns the owned cells (assembled with ``dask.array.block`` for a lazy result, else
with ``numpy.block``) or writes them to the zarr store and flags the tile done. A progress bar
counts finished tiles (a dask callback on local schedulers, futures on a cluster). Tasks are
idempotent, so dask may retry one whose worker died without changing the map.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ._runner import Runner
from .images import ImageSource
from .masks import Work
from .store import ZarrSink
from .tiling import Tile, TileGrid

__all__ = ["run_dask"]

logger = logging.getLogger(__name__)

LOCAL_SCHEDULERS = ("threads", "processes", "synchronous", "sync", "single-threaded")


def run_dask(grid: TileGrid, works: list[Work], skipped: list[Tile], source: ImageSource, runner: Runner,
             sink: ZarrSink | None, shape: tuple[int, int, int], scheduler: Any, progress: bool,
             lazy: bool | None = None) -> Any:
    """Run the tiles' ``works`` as dask tasks; the ``skipped`` tiles (no foreground) are NaN
    (flagged skipped in the sink).

    Returns:
        With ``sink``: the zarr array, once every tile is written. Without: a dask array
        (nothing computed yet) with ``lazy``, or for a dask input without a ``scheduler``
        where ``lazy`` is ``None``; else the computed numpy array.
    """
    import dask
    import dask.array as da

    model = dask.delayed(_load_runner)(pickle.dumps(runner),
                                       dask_key_name=f"convolutionalize-model-{id(runner):x}")
    reader = source.reader()
    whole = None if source.is_dask else dask.delayed(source, traverse=False)
    done = set() if sink is None else sink.done_tiles()
    if sink is not None:
        sink.skip_all([t for t in skipped if t.index not in done])
    tasks, computed = [], []
    for work in works:
        if work.tile.index in done:
            continue
        block = source.block(*work.part.read) if source.is_dask else whole
        tasks.append(dask.delayed(_run_tile, pure=True)(model, reader, block, work, sink))
        computed.append(work.tile)
    if sink is None and (lazy or (lazy is None and source.is_dask and scheduler is None)):  # a dask array
        blocks: list[list[Any]] = [[_skipped(tile, shape) for tile in row] for row in _rows(grid)]
        for tile, task in zip(computed, tasks):
            blocks[tile.index[0]][tile.index[1]] = da.from_delayed(task, _cells(tile, shape), np.float32)
        return da.block(blocks)
    with _scheduler(scheduler) as chosen:
        cells = _compute(tasks, chosen, progress)
    if sink is not None:
        sink.finish()
        return sink.result()
    found = {tile.index: block for tile, block in zip(computed, cells)}
    return np.block([[found[t.index] if t.index in found else _skipped(t, shape) for t in row]
                     for row in _rows(grid)])


def _rows(grid: TileGrid) -> list[list[Tile]]:
    rows: list[list[Tile]] = [[] for _ in range(grid.grid[0])]
    for tile in grid.tiles:
        rows[tile.index[0]].append(tile)
    return rows


def _cells(tile: Tile, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    r0, r1, c0, c1 = tile.cells
    return (shape[0], r1 - r0, c1 - c0)


def _skipped(tile: Tile, shape: tuple[int, int, int]) -> np.ndarray:
    """The cells of a tile a mask skipped: NaN."""
    return np.full(_cells(tile, shape), np.nan, dtype=np.float32)


def _load_runner(blob: bytes) -> Runner:
    return pickle.loads(blob)


def _run_tile(runner: Runner, reader: ImageSource, block: Any, work: Work,
              sink: ZarrSink | None) -> np.ndarray | None:
    """One tile: read and score its part, keep the owned cells; write them to ``sink`` if given."""
    read = work.part.read
    pixels = block.read(*read) if isinstance(block, ImageSource) else reader.prepare(block, read)
    with _threads(1):
        cells = work.cells(runner(pixels[None])[0])
    if sink is None:
        return cells
    sink.write(work.tile, cells)
    return None


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Inside a dask worker thread, torch uses ``count`` threads (workers supply parallelism)."""
    saved = torch.get_num_threads()
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        yield  # not on a distributed worker: keep torch's own threading
        return
    torch.set_num_threads(max(count, 1))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def _scheduler(scheduler: Any) -> Iterator[Any]:
    """A dask scheduler: a name, a Client, an address (connected for this call), or default."""
    if scheduler is None or (isinstance(scheduler, str) and scheduler in LOCAL_SCHEDULERS):
        yield scheduler
        return
    if isinstance(scheduler, str):
        from distributed import Client

        try:
            client = Client(scheduler, timeout="10s", set_as_default=False)
        except OSError as exc:
            raise ValueError(f"cannot reach a dask scheduler at {scheduler!r}: {exc}") from exc
        with client:
            yield client
        return
    yield scheduler


def _compute(tasks: list[Any], scheduler: Any, progress: bool) -> list[Any]:
    """Compute the tile tasks, in order, with a progress bar over tiles if asked."""
    import dask
    from tqdm.auto import tqdm

    if not tasks:
        return []
    with tqdm(total=len(tasks), unit="tile", desc="dense map", disable=not progress) as bar:
        if scheduler is not None and hasattr(scheduler, "compute"):  # a distributed Client
            futures = scheduler.compute(tasks)
            for future in futures:
                future.add_done_callback(lambda _: bar.update(1))
            return scheduler.gather(futures)
        from dask.callbacks import Callback

        keys = {task.key for task in tasks}
        counter = Callback(posttask=lambda key, *_: bar.update(1) if key in keys else None)
        with counter:
            return list(dask.compute(*tasks, scheduler=scheduler))
