"""The OME-Zarr sink: level 0 written tile by tile and resumable, the pyramid and the NGFF metadata
read back with ome-zarr's reader and validated with ome-zarr-models."""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
pytest.importorskip("dask.array")
pytest.importorskip("ome_zarr")

from ome_zarr.io import parse_url  # noqa: E402
from ome_zarr.reader import Reader  # noqa: E402
from ome_zarr_models.v05.image import Image  # noqa: E402

from convolutionalize.inference.omezarr import (  # noqa: E402
    OmeZarrSink,
    Physical,
    is_ome_zarr,
    open_ome_zarr_sink,
)
from convolutionalize.inference.store import open_zarr_sink  # noqa: E402
from convolutionalize.inference.tiling import Tile, TileGrid  # noqa: E402

MICRONS = Physical(scale=(0.5, 0.25), translation=(3.0, 2.0), unit="micrometer")
KEY = {"model": "tiny", "tile": 40}


def _grid(rows: int, cols: int, per: tuple[int, int]) -> TileGrid:
    """Tiles owning ``per`` cells a side (what they read does not matter to a sink)."""
    grid = (math.ceil(rows / per[0]), math.ceil(cols / per[1]))
    tiles = tuple(
        Tile((i, j), (0, 0, 0, 0), (i * per[0], min((i + 1) * per[0], rows),
                                    j * per[1], min((j + 1) * per[1], cols)), (i * per[0], j * per[1]))
        for i in range(grid[0]) for j in range(grid[1])
    )
    return TileGrid(tiles, grid, per, ((0, 0), (0, 0)))


def _write(sink: OmeZarrSink, tiles: tuple[Tile, ...], values: np.ndarray) -> None:
    for tile in tiles:
        r0, r1, c0, c1 = tile.cells
        sink.write(tile, values[:, r0:r1, c0:c1])


def _values(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _halved(level: np.ndarray) -> np.ndarray:
    """The reference 2x2 NaN-ignoring mean, odd edges padded with NaN."""
    c, r, k = level.shape
    padded = np.full((c, r + r % 2, k + k % 2), np.nan, dtype=np.float32)
    padded[:, :r, :k] = level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks
        return np.nanmean(padded.reshape(c, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2), axis=(2, 4))


def _finished(tmp_path: Path, shape: tuple[int, int, int], per: tuple[int, int] = (40, 50),
              physical: Physical = MICRONS, labels: list[str] | None = None) -> tuple[str, np.ndarray]:
    path, grid, values = str(tmp_path / "map.ome.zarr"), _grid(*shape[1:], per), _values(shape)
    sink = open_ome_zarr_sink(path, shape, grid, KEY, physical, labels)
    _write(sink, grid.tiles, values)
    sink.finish()
    return path, values


def _image(path: str):  # the one image node ome-zarr's reader finds
    nodes = list(Reader(parse_url(path))())
    assert len(nodes) == 1
    return nodes[0]


@pytest.mark.parametrize(("shape", "levels"), [
    ((3, 150, 133), [(3, 150, 133), (3, 75, 67)]),  # level 2 would have 38 rows
    ((2, 100, 200), [(2, 100, 200)]),  # a small map: level 0 only
    ((1, 260, 256), [(1, 260, 256), (1, 130, 128), (1, 65, 64)]),
], ids=["two-levels-odd-cols", "small", "three-levels"])
def test_levels_read_back_as_written(tmp_path: Path, shape: tuple[int, int, int],
                                     levels: list[tuple[int, ...]]) -> None:
    path, values = _finished(tmp_path, shape)
    data = [np.asarray(level) for level in _image(path).data]
    assert [level.shape for level in data] == levels
    np.testing.assert_array_equal(data[0], values)
    for coarse, fine in zip(data[1:], data):
        np.testing.assert_allclose(coarse, _halved(fine), rtol=1e-6, atol=1e-6)


def test_metadata_says_where_cells_are(tmp_path: Path) -> None:
    path, _ = _finished(tmp_path, (3, 150, 133), labels=["background", "tumour", "stroma"])
    node = _image(path)
    assert node.metadata["coordinateTransformations"] == [
        [{"type": "scale", "scale": [1.0, 0.5, 0.25]},
         {"type": "translation", "translation": [0.0, 3.0, 2.0]}],
        # level 1 pixel 0 is the mean of level 0 cells 0 and 1: its centre is half a cell on
        [{"type": "scale", "scale": [1.0, 1.0, 0.5]},
         {"type": "translation", "translation": [0.0, 3.25, 2.125]}],
    ]
    assert node.metadata["axes"] == [{"name": "c", "type": "channel"},
                                     {"name": "y", "type": "space", "unit": "micrometer"},
                                     {"name": "x", "type": "space", "unit": "micrometer"}]
    assert node.metadata["channel_names"] == ["background", "tumour", "stroma"]
    image = Image.from_zarr(zarr.open_group(path, mode="r"))
    assert image.ome_attributes.version == "0.5"
    assert image.ome_attributes.get_array_paths() == ["0", "1"]


def test_pixels_have_no_unit_and_default_labels(tmp_path: Path) -> None:
    path, _ = _finished(tmp_path, (2, 100, 200), physical=Physical((1.0, 1.0), (0.0, 0.0), None))
    node = _image(path)
    assert [axis.get("unit") for axis in node.metadata["axes"]] == [None, None, None]
    assert node.metadata["channel_names"] == ["class 0", "class 1"]
    Image.from_zarr(zarr.open_group(path, mode="r"))  # validates


def test_skipped_tile_is_nan_at_every_level(tmp_path: Path) -> None:
    shape, grid = (2, 135, 135), _grid(135, 135, (45, 45))  # odd tiles: level 1 straddles them
    sink = open_ome_zarr_sink(tmp_path / "map.ome.zarr", shape, grid, KEY, MICRONS)
    values, hole = _values(shape), grid.tiles[4]  # the middle tile, cells 45..90 a side
    _write(sink, [tile for tile in grid.tiles if tile is not hole], values)
    sink.skip_all([hole])
    sink.finish()
    assert np.asarray(sink.skipped[...]).sum() == 1 and sink.skipped[1, 1]
    level0, level1 = (np.asarray(level) for level in _image(sink.path).data)
    assert np.isnan(level0[:, 45:90, 45:90]).all()
    assert not np.isnan(np.delete(np.delete(level0, np.s_[45:90], 1), np.s_[45:90], 2)).any()
    assert np.isnan(level1[:, 23:45, 23:45]).all()  # level 1 cells 23..44 cover level 0 46..89
    # cell 22 covers level 0 cells 44 (kept) and 45 (skipped): the mean of what is there
    np.testing.assert_allclose(level1[:, 30, 22], values[:, 60:62, 44].mean(axis=1), rtol=1e-6)


def test_all_skipped_map_gets_finite_display_windows(tmp_path: Path) -> None:
    shape, grid = (2, 130, 130), _grid(130, 130, (65, 65))
    sink = open_ome_zarr_sink(tmp_path / "map.ome.zarr", shape, grid, KEY, MICRONS)
    sink.skip_all(grid.tiles)
    sink.finish()
    attrs = json.loads((Path(sink.path) / "zarr.json").read_text())["attributes"]
    windows = [channel["window"] for channel in attrs["ome"]["omero"]["channels"]]
    assert windows == [{"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0}] * 2
    assert np.isnan(np.asarray(_image(sink.path).data[1])).all()


def test_resume_keeps_done_tiles_and_finish_waits_for_all(tmp_path: Path) -> None:
    path, shape, grid = tmp_path / "map.ome.zarr", (3, 150, 133), _grid(150, 133, (40, 50))
    values, half = _values(shape), grid.tiles[::2]
    sink = open_ome_zarr_sink(path, shape, grid, KEY, MICRONS)
    _write(sink, half, values)
    with pytest.raises(ValueError, match="6 tiles are not done; resume"):
        sink.finish()
    assert "ome" not in zarr.open_group(str(path), mode="r").attrs  # not an image yet
    resumed = open_ome_zarr_sink(path, shape, grid, dict(reversed(KEY.items())), MICRONS)
    done = resumed.done_tiles()
    assert [tile.index in done for tile in grid.tiles] == [tile in half for tile in grid.tiles]
    _write(resumed, [tile for tile in grid.tiles if tile.index not in done], values)
    resumed.finish()
    np.testing.assert_array_equal(np.asarray(_image(str(path)).data[0]), values)


def test_finish_again_changes_nothing(tmp_path: Path) -> None:
    path, _ = _finished(tmp_path, (3, 150, 133))
    before = {name: (Path(path) / name / "zarr.json").read_text() for name in ("", "0", "1")}
    level1 = zarr.open_array(f"{path}/1", mode="r")[...]
    grid = _grid(150, 133, (40, 50))
    open_ome_zarr_sink(path, (3, 150, 133), grid, KEY, MICRONS).finish()
    assert {name: (Path(path) / name / "zarr.json").read_text() for name in before} == before
    np.testing.assert_array_equal(zarr.open_array(f"{path}/1", mode="r")[...], level1)


def test_other_key_is_refused(tmp_path: Path) -> None:
    path, grid = tmp_path / "map.ome.zarr", _grid(100, 100, (50, 50))
    open_ome_zarr_sink(path, (2, 100, 100), grid, KEY, MICRONS)
    with pytest.raises(ValueError, match=r"different arguments.*remove it or pass another out"):
        open_ome_zarr_sink(path, (2, 100, 100), grid, {**KEY, "tile": 80}, MICRONS)


def _plain_zarr_map(path: Path) -> None:  # the same key, but store.py's layout
    open_zarr_sink(path, (2, 100, 100), _grid(100, 100, (50, 50)), KEY)


@pytest.mark.parametrize("make", [
    lambda path: zarr.open_group(str(path), mode="w").attrs.update({"other": 1}),
    _plain_zarr_map,
    lambda path: path.mkdir() or (path / "notes.txt").write_text("hi"),
    lambda path: path.write_text("not a directory"),
], ids=["other-zarr-group", "plain-zarr-map", "plain-directory", "file"])
def test_what_is_not_ours_is_refused(tmp_path: Path, make) -> None:
    path = tmp_path / "map.ome.zarr"
    make(path)
    with pytest.raises(ValueError, match="not a dense-map OME-Zarr store; remove it or pass another out"):
        open_ome_zarr_sink(path, (2, 100, 100), _grid(100, 100, (50, 50)), KEY, MICRONS)


def test_labels_must_name_every_class(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 labels for 3 classes"):
        open_ome_zarr_sink(tmp_path / "m.ome.zarr", (3, 100, 100), _grid(100, 100, (50, 50)), KEY,
                           MICRONS, ["a", "b"])


def test_pickled_sink_writes_to_the_same_store(tmp_path: Path) -> None:
    shape, grid = (2, 100, 100), _grid(100, 100, (50, 50))
    sink = open_ome_zarr_sink(tmp_path / "map.ome.zarr", shape, grid, KEY, MICRONS, ["a", "b"])
    copy = pickle.loads(pickle.dumps(sink))
    assert (type(copy), copy.path) == (OmeZarrSink, sink.path)
    assert (copy.physical, copy.labels) == (MICRONS, ("a", "b"))
    values = _values(shape)
    _write(copy, grid.tiles[1:2], values)
    copy.skip_all([grid.tiles[2]])
    assert [tile.index in sink.done_tiles() for tile in grid.tiles] == [False, True, True, False]
    assert sink.skipped[1, 0] and not sink.skipped[0, 1]
    np.testing.assert_array_equal(sink.result()[:, :50, 50:], values[:, :50, 50:])


@pytest.mark.parametrize(("path", "expected"), [
    ("slide.ome.zarr", True), ("out/Slide.OME.ZARR/", True), (Path("a/b.ome.zarr"), True),
    ("slide.zarr", False), ("slide.ome.tif", False), ("ome.zarr.png", False),
])
def test_is_ome_zarr(path: str | Path, expected: bool) -> None:
    assert is_ome_zarr(path) is expected
