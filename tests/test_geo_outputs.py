"""Maps that open where people look: GeoTIFF in and out (CRS and transform kept), OME-Zarr out
(multiscale, physical scale from the geometry and the slide's resolution), through dense_map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS

from convolutionalize import convolutionalize, dense_map
from test_slides import MPP, Padded, tissue_page, write_slide

TRANSFORM = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_400_000.0)  # 10 m pixels, north up


@pytest.fixture(scope="module")
def fcn() -> torch.nn.Module:
    torch.manual_seed(0)
    fcn = convolutionalize(Padded().eval(), (32, 32))
    fcn.labels = ["water", "field", "forest"]  # class names a model carries name the bands / channels
    return fcn


def write_scene(path: Path, bands: np.ndarray) -> Path:
    """A (count, H, W) uint16 GeoTIFF in UTM 33N with 10 m pixels."""
    count, height, width = bands.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count,
                       dtype="uint16", crs="EPSG:32633", transform=TRANSFORM, tiled=True,
                       blockxsize=64, blockysize=64) as out:
        out.write(bands)
    return path


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    bands = np.random.default_rng(0).integers(0, 65536, (5, 150, 190), dtype=np.uint16)
    return write_scene(tmp_path_factory.mktemp("scene") / "scene.tif", bands), bands


def test_geotiff_in_and_out_keeps_the_crs_and_places_every_cell(fcn, scene, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, bands = scene
    out = tmp_path / "map.tif"
    result = dense_map(fcn, path, bands=(4, 3, 2), out=out, tile=64)
    expected = dense_map(fcn, np.ascontiguousarray(bands[[3, 2, 1]].transpose(1, 2, 0)))
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)
    with rasterio.open(out) as written:
        assert written.crs == CRS.from_epsg(32633)
        assert written.count == 3 and written.descriptions == ("water", "field", "forest")
        np.testing.assert_array_equal(written.read(), result)
        for i, j in ((0, 0), (3, 7), (14, 19)):
            x0, y0, x1, y1 = fcn.geometry.box(i, j)
            centre = TRANSFORM @ ((x0 + x1) / 2, (y0 + y1) / 2)
            assert written.transform @ (j + 0.5, i + 0.5) == pytest.approx(centre)
        assert written.transform.a == pytest.approx(10.0 * 8)  # one cell: 8 pixels of 10 m


def test_a_georeferenced_tif_is_read_through_rasterio_without_bands(fcn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bands = np.random.default_rng(1).integers(0, 65536, (3, 70, 90), dtype=np.uint16)
    path = write_scene(tmp_path / "rgb.tif", bands)
    np.testing.assert_allclose(dense_map(fcn, path), dense_map(fcn, bands.transpose(1, 2, 0).copy()),
                               rtol=0, atol=1e-6)


def test_geotiff_refusals(fcn, scene, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _ = scene
    with pytest.raises(ValueError, match="has 5 bands"):
        dense_map(fcn, path, bands=(6, 1, 2))
    with pytest.raises(ValueError, match="takes 3 channels"):
        dense_map(fcn, path)  # five bands for a three-channel model
    with pytest.raises(ValueError, match="holds one map"):
        dense_map(fcn, path, bands=(1, 2, 3), out=tmp_path / "m.tif", scales=(1.0, 0.5))
    with pytest.raises(ValueError, match="raster file"):
        dense_map(fcn, np.zeros((64, 64, 3), np.uint8), bands=(1, 2, 3))
    assert not (tmp_path / "m.tif").exists()


def test_ome_zarr_of_a_slide_has_its_scale_in_microns_and_opens_in_ome_zarr(fcn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    page = tissue_page(2200, 2800)  # level 1 (mpp 0.5): a 134 x 171 map, two NGFF levels
    slide = write_slide(tmp_path / "page.ome.tif", page)
    out = tmp_path / "map.ome.zarr"
    result = dense_map(fcn, slide, mpp=0.5, out=out, mask="auto", tile=64)
    reference = dense_map(fcn, slide, mpp=0.5, mask="auto", tile=64)
    np.testing.assert_array_equal(result.map[:], reference.map)
    assert np.isnan(reference.map).any() and not np.isnan(reference.map).all()
    node = next(iter(Reader(parse_url(str(out)))()))
    levels = node.data
    assert len(levels) >= 2 and levels[0].shape == reference.map.shape
    np.testing.assert_array_equal(np.asarray(levels[0]), reference.map)
    transforms = node.metadata["coordinateTransformations"][0]
    scale = next(t["scale"] for t in transforms if t["type"] == "scale")
    shift = next(t["translation"] for t in transforms if t["type"] == "translation")
    assert scale[1:] == pytest.approx([16 * MPP] * 2)  # stride 8 at level 1: 16 level-0 px
    assert shift[1:] == pytest.approx([((0 + 16) / 0.5 - 0.5) * MPP] * 2)  # cell (0, 0)'s centre
    assert node.metadata["channel_names"] == ["water", "field", "forest"]
