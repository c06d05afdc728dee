"""Image pyramids in ``dense_map(..., scales=...)``: the tile-by-tile resize and each scale's map.

References: the resize is torchvision's ``resize(antialias=True)`` computed in float64 (ours
sums in float32: relative 1e-6 allowed; torchvision's own float32 path is up to 8e-5 off
its float64 result); each scale's map is the converted network run once on the whole resized
image (relative 1e-5, the norm for tiled maps), and so are tiled, lazy and dask pyramids; a
rectangle of the resized image read on its own must equal the whole resize bit for bit (the
same weights, the same sums in the same order).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn
from torchvision.transforms.v2 import functional as TF

from convolutionalize import convolutionalize, dense_map
from convolutionalize.inference import ScaleWarning
from convolutionalize.inference.images import open_image
from convolutionalize.inference.resize import ResizedSource, resize, resized

from conftest import RecordingArray, rel

RTOL = 1e-5


class Padded(nn.Module):
    """Zero padding and a stride-2 GAP head: tile borders are where a pyramid could go wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def padded() -> nn.Module:
    torch.manual_seed(0)
    return convolutionalize(Padded().eval(), (16, 16))


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)


def whole(fcn: nn.Module, image: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return fcn(image[None])[0].numpy()


# --------------------------------------------------------------------------- resizing


@pytest.mark.parametrize(("size", "to"), [((45, 61), (34, 46)), ((45, 61), (22, 30)), ((45, 61), (9, 7)),
                                          ((30, 40), (51, 68)), ((31, 17), (31, 12))])


def test_resize_is_torchvisions_antialiased_resize(size: tuple[int, int], to: tuple[int, int]) -> None:
    image = torch.randn(3, *size, generator=torch.Generator().manual_seed(size[0] + to[0]))
    expected = TF.resize(image.double(), list(to), antialias=True)
    assert rel(resize(image, to).numpy(), expected.numpy()) <= 1e-6


@pytest.mark.parametrize("to", [(34, 46), (17, 23), (90, 122)])
def test_any_resized_rectangle_equals_the_whole_resize(to: tuple[int, int]) -> None:
    image = torch.randn(2, 45, 61, generator=torch.Generator().manual_seed(0))
    source = resized(open_image(image, 2, None, None), to)
    assert isinstance(source, ResizedSource) and (source.height, source.width) == to
    full = resize(image, to)
    for y0, y1, x0, x1 in [(0, to[0], 0, to[1]), (3, 11, 5, 17), (to[0] - 4, to[0], 0, 9)]:
        np.testing.assert_array_equal(source.read(y0, y1, x0, x1).numpy(), full[:, y0:y1, x0:x1].numpy())


def test_resized_reads_only_the_pixels_they_weigh() -> None:
    source = resized(open_image(torch.zeros(1, 100, 100), 1, None, None), (50, 50))
    assert isinstance(source, ResizedSource)
    top, bottom, left, right = source.input_rect(10, 20, 0, 5)
    assert (top, bottom, left, right) == (19, 41, 0, 11)  # 2x the rows, one pixel of halo each side


def test_scale_1_is_the_image_itself() -> None:
    source = open_image(torch.zeros(1, 20, 30), 1, None, None)
    assert resized(source, (20, 30)) is source


# --------------------------------------------------------------------------- dense_map(scales=)


def test_each_scale_is_the_map_of_the_resized_image(padded: nn.Module, pixels: np.ndarray) -> None:
    maps = dense_map(padded, pixels, scales=(1.0, 0.75, 0.5))
    assert [m.scale for m in maps] == [1.0, 0.75, 0.5]
    assert [m.size for m in maps] == [(45, 61), (34, 46), (22, 30)]  # round(s * H), round(s * W)
    ready = open_image(pixels, 3, None, None).read(0, 45, 0, 61)
    np.testing.assert_array_equal(maps[0].map, dense_map(padded, pixels))  # scale 1: today's map
    for level in maps[1:]:
        assert rel(level.map, whole(padded, resize(ready, level.size))) <= RTOL


@pytest.mark.parametrize("kind", ["tiles", "batched-tiles", "dask", "zarr", "tasks"])
def test_a_pyramid_is_the_same_tiled_lazy_or_as_dask_tasks(padded: nn.Module, pixels: np.ndarray,
                                                           kind: str, tmp_path: Path) -> None:
    scales = (1.0, 0.7, 0.45)
    reference = dense_map(padded, pixels, scales=scales)
    image: object = pixels
    options: dict[str, object] = {"tile": 8}
    if kind == "batched-tiles":
        options["batch_size"] = 3
    elif kind == "dask":
        import dask.array as da

        image = da.from_array(pixels, chunks=(16, 16, 3))
    elif kind == "zarr":
        image = zarr.create_array(tmp_path / "a.zarr", shape=pixels.shape, chunks=(16, 16, 3), dtype="uint8")
        image[:] = pixels  # type: ignore[index]
    elif kind == "tasks":
        options["scheduler"] = "synchronous"
    got = dense_map(padded, image, scales=scales, **options)  # type: ignore[arg-type]
    assert [m.size for m in got] == [m.size for m in reference]
    for level, expected in zip(got, reference):
        computed = level.map.compute() if kind == "dask" else level.map
        assert rel(np.asarray(computed), expected.map) <= RTOL


def test_a_lazy_image_is_resized_tile_by_tile_never_whole(padded: nn.Module, pixels: np.ndarray,
                                                         tile_mode: str) -> None:
    lazy = RecordingArray(pixels)
    got = dense_map(padded, lazy, scales=(0.7, 1.3), tile=8)
    part = 45 * 61 / 2 if tile_mode == "tiles" else 45 * 61 * 0.75  # a tile, or a column of tiles
    assert len(lazy.reads) > 2 and all(h * w <= part for h, w in lazy.reads)
    for level, expected in zip(got, dense_map(padded, pixels, scales=(0.7, 1.3))):
        assert rel(level.map, expected.map) <= RTOL


def test_a_dask_pyramid_is_lazy(padded: nn.Module, pixels: np.ndarray) -> None:
    import dask.array as da

    maps = dense_map(padded, da.from_array(pixels, chunks=(16, 16, 3)), scales=(1.0, 0.5), tile=8)
    assert all(isinstance(m.map, da.Array) for m in maps)


def test_a_pyramid_to_zarr_has_a_store_per_scale_and_resumes(padded: nn.Module, pixels: np.ndarray,
                                                             tmp_path: Path) -> None:
    scales = (1.0, 0.6)
    reference = dense_map(padded, pixels, scales=scales, tile=8)
    maps = dense_map(padded, pixels, scales=scales, tile=8, out=tmp_path / "maps.zarr")
    for index, (level, expected) in enumerate(zip(maps, reference)):
        np.testing.assert_array_equal(level.map[:], expected.map)
        np.testing.assert_array_equal(zarr.open_group(tmp_path / "maps.zarr" / str(index))["map"][:],
                                      expected.map)
    again = dense_map(padded, pixels, scales=scales, tile=8, out=tmp_path / "maps.zarr")  # all done
    np.testing.assert_array_equal(again[1].map[:], reference[1].map)
    with pytest.raises(ValueError, match=re.escape("holds the maps of scales (1.0, 0.6), not of scales "
                                                   "(1.0, 0.5)")):
        dense_map(padded, pixels, scales=(1.0, 0.5), tile=8, out=tmp_path / "maps.zarr")
    dense_map(padded, pixels, tile=8, out=tmp_path / "one.zarr")
    with pytest.raises(ValueError, match="holds a single map"):
        dense_map(padded, pixels, scales=scales, tile=8, out=tmp_path / "one.zarr")


def test_geometry_is_in_the_original_images_pixels(padded: nn.Module, pixels: np.ndarray) -> None:
    level = dense_map(padded, pixels, scales=(0.5,))[0]
    fy, fx = 22 / 45, 30 / 61  # the sizes' own ratios, s up to the rounding
    geometry = level.geometry
    assert geometry.factor == (fy, fx) and geometry.model is padded.geometry
    assert geometry.window == (16 / fy, 16 / fx) and geometry.stride == (2 / fy, 2 / fx)
    assert geometry.offset == (0.0, 0.0)
    assert geometry.receptive_field is not None
    x0, y0, x1, y1 = padded.geometry.box(2, 3)
    assert level.box(2, 3) == (x0 / fx, y0 / fy, x1 / fx, y1 / fy)


def test_all_outputs_of_a_pyramid(padded: nn.Module, pixels: np.ndarray) -> None:
    maps = dense_map(padded, pixels, scales=(1.0, 0.5), output="all")
    for level, plain in zip(maps, dense_map(padded, pixels, scales=(1.0, 0.5))):
        assert list(level.map) == [0]
        np.testing.assert_array_equal(level.map[0], plain.map)


def test_scales_smaller_than_the_window_are_skipped(padded: nn.Module, pixels: np.ndarray) -> None:
    with pytest.warns(ScaleWarning, match=r"scale 0.2 makes the 45x61 image 9x12, smaller than the "
                                          r"16x16 window; skipped"):
        maps = dense_map(padded, pixels, scales=(0.2, 1.0))
    assert [m.scale for m in maps] == [1.0]
    with pytest.raises(ValueError, match=r"every scale in \(0.2, 0.1\) makes the 45x61 image smaller "
                                         r"than the 16x16 window; pass scales of at least 0.356"):
        dense_map(padded, pixels, scales=(0.2, 0.1))


@pytest.mark.parametrize(("scales", "match"), [
    ((), "scales is empty"),
    ([0.0], r"every scale must be a positive finite number, got 0.0"),
    ((1.0, -0.5), r"got -0.5 in scales=\(1.0, -0.5\)"),
    ((float("nan"),), "got nan"),
    ((True,), "got True"),
    (("0.5",), "got '0.5'"),
    (0.5, "scales must be a sequence of positive numbers, got 0.5"),
    ("0.5", "scales must be a sequence"),
])
def test_bad_scales_are_refused_before_any_work(padded: nn.Module, pixels: np.ndarray, scales: object,
                                                match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dense_map(padded, pixels, scales=scales)  # type: ignore[arg-type]
