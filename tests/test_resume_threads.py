"""Resuming a zarr map is independent of the thread count: the store's key holds what changes the
numbers (model, image, geometry, precision, output, mask), never how the map is cut into tiles;
a resumed run reads its tiles back from the store's chunks, whatever tiles it would choose now.

Streamed columns (``inference._stream``) are as wide and as tall as ``stream_workers()`` lets
them be, so a map started with one worker and resumed with two would otherwise tile differently.
A streamed map equals the one pass to relative 1e-6, as in ``test_stream.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import zarr
from torch import nn

from convolutionalize import convolutionalize, dense_map
from convolutionalize.inference import dense as dense_module
from convolutionalize.inference.store import ZarrSink
from convolutionalize.inference.tiling import Tile

from conftest import rel

WORKERS = "CONVOLUTIONALIZE_STREAM_WORKERS"


class Interrupt(RuntimeError):
    pass


@pytest.fixture
def small_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Budgets that tile a few-hundred-pixel image into streamed columns (``test_stream.py``'s)."""
    monkeypatch.setattr(dense_module, "MEMORY_BUDGET", 1 << 20)
    monkeypatch.setattr(dense_module, "TILE_BUDGET", 1 << 20)
    monkeypatch.setattr(dense_module, "PIECE_BYTES", 6 << 20)
    monkeypatch.setattr(dense_module, "MIN_GATHER", 512)
    monkeypatch.setattr(dense_module, "MAP_TILE_BYTES", 1 << 20)


@pytest.fixture(scope="module")
def shufflenet() -> nn.Module:
    torch.manual_seed(0)
    return convolutionalize(torchvision.models.shufflenet_v2_x0_5().eval(), 224)


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return np.random.default_rng(4).integers(0, 256, (500, 1400, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def whole(shufflenet: nn.Module, picture: np.ndarray) -> np.ndarray:
    """The one-pass map (the image fits the default ``MEMORY_BUDGET``)."""
    return dense_map(shufflenet, picture)


def _level0(path: Path) -> zarr.Array:
    group = zarr.open_group(str(path), mode="r")
    return group["0" if path.name.endswith(".ome.zarr") else "map"]


def _stopped(model: nn.Module, image: np.ndarray, out: Path, after: int,
             monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Start the map of ``image`` into ``out`` and stop it once ``after`` tiles are written;
    the tiles written."""
    original, written = ZarrSink.write, []

    def stop(self: ZarrSink, tile: Tile, cells: np.ndarray) -> None:
        if len(written) == after:
            raise Interrupt("stopped")
        written.append(tile.index)
        original(self, tile, cells)

    with monkeypatch.context() as patch:
        patch.setattr(ZarrSink, "write", stop)
        with pytest.raises(Interrupt):
            dense_map(model, image, out=out)
    return written


@pytest.mark.parametrize(("first", "then", "name"), [("1", "2", "map.zarr"), ("2", "1", "map.ome.zarr")])
def test_a_map_resumed_with_another_thread_count_keeps_its_tiles(
        whole: np.ndarray, small_budgets: None, shufflenet: nn.Module, picture: np.ndarray, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, name: str, first: str, then: str) -> None:
    """Started with ``first`` streams at a time, stopped after two tiles, finished with ``then``."""
    monkeypatch.setenv(WORKERS, then)
    fresh = dense_map(shufflenet, picture, out=tmp_path / "fresh.zarr")  # what `then` chooses afresh
    monkeypatch.setenv(WORKERS, first)
    out = tmp_path / name
    first_tiles = _stopped(shufflenet, picture, out, 2, monkeypatch)
    chunks = _level0(out).chunks
    assert chunks != fresh.chunks  # the thread counts choose different tiles

    monkeypatch.setenv(WORKERS, then)
    original, written = ZarrSink.write, []
    monkeypatch.setattr(ZarrSink, "write", lambda self, t, c: written.append(t.index) or original(self, t, c))
    dense_map(shufflenet, picture, out=out)
    resumed = _level0(out)
    group = zarr.open_group(str(out), mode="r")
    flags = np.asarray((group["convolutionalize"] if name.endswith(".ome.zarr") else group)["done"][...])
    assert resumed.chunks == chunks and flags.all() and len(first_tiles) == 2  # its first tiles, all done
    assert len(written) == flags.size - len(first_tiles) and not set(written) & set(first_tiles)
    assert rel(resumed[:], whole) <= 1e-6


def test_a_resumed_map_keeps_its_tiles_in_dask_and_in_one_pass(
        whole: np.ndarray, small_budgets: None, shufflenet: nn.Module, picture: np.ndarray, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles done by streams are kept by a resume that runs tiles as dask tasks; a store made
    in one pass stays one tile when the budget would tile the image now."""
    monkeypatch.setenv(WORKERS, "1")
    out = tmp_path / "map.zarr"
    first = _stopped(shufflenet, picture, out, 2, monkeypatch)
    chunks = _level0(out).chunks
    got = dense_map(shufflenet, picture, out=out, scheduler="synchronous")
    done = np.asarray(zarr.open_group(str(out), mode="r")["done"][...])
    assert got.chunks == chunks and done.all() and len(first) == 2
    assert rel(got[:], whole) <= 1e-6

    with monkeypatch.context() as patch:
        patch.setattr(dense_module, "MEMORY_BUDGET", 1 << 40)
        one = dense_map(shufflenet, picture, out=tmp_path / "one.zarr")
    assert one.chunks == one.shape
    again = dense_map(shufflenet, picture, out=tmp_path / "one.zarr")  # the small budget would tile it now
    assert again.chunks == one.shape
    np.testing.assert_array_equal(again[:], one[:])


class Small(nn.Module):
    """A padding-free classifier on 16x16 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU())
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def _small(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return convolutionalize(Small().eval(), 16)


@pytest.mark.parametrize("change", ["precision", "weights", "tile"])
def test_a_real_change_is_still_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    image = torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(0))
    out = tmp_path / "map.zarr"
    monkeypatch.setenv(WORKERS, "1")
    dense_map(_small(0), image, tile=20, out=out)
    monkeypatch.setenv(WORKERS, "2")
    model, options = _small(0), {"tile": 20}
    if change == "precision":
        options["precision"] = "bf16"
    elif change == "weights":
        model = _small(1)
    else:
        options["tile"] = 24
    with pytest.raises(ValueError, match="holds a map made with different arguments"):
        dense_map(model, image, out=out, **options)
    resumed = dense_map(_small(0), image, out=out)  # no tile given: the store's, whatever the budget says
    assert resumed.chunks == (4, 10, 10)
    assert rel(resumed[:], dense_map(_small(0), image)) <= 1e-5
