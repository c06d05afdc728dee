"""GeoTIFF in and out: lazy georeferenced reads, the map's affine transform, map writing."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from affine import Affine  # noqa: E402
from rasterio.crs import CRS  # noqa: E402

from convolutionalize.geometry import Geometry  # noqa: E402
from convolutionalize.inference import geotiff  # noqa: E402
from convolutionalize.inference.geotiff import (  # noqa: E402
    GeoRaster,
    is_georeferenced,
    map_transform,
    write_geotiff,
)
from convolutionalize.inference.images import open_image  # noqa: E402

UTM = CRS.from_epsg(32633)
TEN_METRES = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_200_000.0)
HEIGHT, WIDTH = 70, 90


def write_input(path: Path, count: int, dtype: str, *, crs: CRS | None = UTM,
                transform: Affine = TEN_METRES) -> np.ndarray:
    """A random ``count``-band image written as a GeoTIFF; returns its ``(bands, H, W)`` pixels."""
    rng = np.random.default_rng(count)
    pixels = rng.integers(0, np.iinfo(dtype).max, (count, HEIGHT, WIDTH), endpoint=True).astype(dtype)
    with rasterio.open(path, "w", driver="GTiff", width=WIDTH, height=HEIGHT, count=count, dtype=dtype,
                       crs=crs, transform=transform, tiled=True, blockxsize=32, blockysize=32) as out:
        out.write(pixels)
        out.descriptions = tuple(f"B{b}" for b in range(1, count + 1))
    return pixels


@pytest.fixture(params=[(3, "uint8"), (5, "uint16")], ids=["3xuint8", "5xuint16"])
def image(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, np.ndarray]:
    path = tmp_path / "input.tif"
    return path, write_input(path, *request.param)


def geometry(window: tuple[int, int], stride: tuple[int, int], offset: tuple[int, int]) -> Geometry:
    return Geometry(window=window, stride=stride, offset=offset, receptive_field=window,
                    crop_equivalent=True, input_size=window, feature_size=(1, 1))


# --------------------------------------------------------------------------- GeoRaster

SLICES = {
    "corner": (slice(0, 16), slice(0, 16)),
    "inside": (slice(13, 47), slice(21, 88)),
    "whole": (slice(None), slice(None)),
    "negative": (slice(-20, -3), slice(-50, None)),
    "past-the-end": (slice(60, 500), slice(80, 200)),
    "rows-only": (slice(5, 9),),
    "empty": (slice(30, 30), slice(10, 40)),
    "reversed": (slice(40, 30), slice(10, 40)),
}


@pytest.mark.parametrize("bands", [None, (3, 2, 1)], ids=["all-bands", "bands-321"])
@pytest.mark.parametrize("index", SLICES.values(), ids=SLICES.keys())
def test_reads_equal_rasterio_full_read(image: tuple[Path, np.ndarray], bands: tuple[int, ...] | None,
                                        index: tuple[slice, ...]) -> None:
    path, pixels = image
    raster = GeoRaster(path, bands)
    expected = np.moveaxis(pixels if bands is None else pixels[[b - 1 for b in bands]], 0, -1)[index]
    got = raster[index if len(index) > 1 else index[0]]
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def test_attributes(image: tuple[Path, np.ndarray]) -> None:
    path, pixels = image
    raster = GeoRaster(path, bands=(3, 1))
    assert raster.shape == (HEIGHT, WIDTH, 2)
    assert raster.dtype == pixels.dtype
    assert raster.crs == UTM and raster.transform == TEN_METRES
    assert raster.band_names == ("B3", "B1")
    assert GeoRaster(path).shape == (HEIGHT, WIDTH, pixels.shape[0])


def test_pickles_and_reads_after_unpickling(image: tuple[Path, np.ndarray]) -> None:
    path, pixels = image
    raster = pickle.loads(pickle.dumps(GeoRaster(path, bands=(2, 3))))
    np.testing.assert_array_equal(raster[10:20, 30:45], np.moveaxis(pixels[[1, 2], 10:20, 30:45], 0, -1))
    assert raster.crs == UTM and raster.shape == (HEIGHT, WIDTH, 2)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to list open files")
def test_keeps_no_file_open(image: tuple[Path, np.ndarray]) -> None:
    path, _ = image
    raster = GeoRaster(path)
    raster[0:30, 0:30]
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    assert os.path.realpath(path) not in open_files


def test_is_an_image_source_array(image: tuple[Path, np.ndarray]) -> None:
    path, pixels = image
    source = open_image(GeoRaster(path, bands=(3, 2, 1)), 3, mean=(0.0,), std=(1.0,))
    tensor = source.read(4, 12, 7, 19)
    scale = np.iinfo(pixels.dtype).max
    np.testing.assert_allclose(tensor.numpy(), pixels[[2, 1, 0], 4:12, 7:19] / scale, rtol=1e-6)


@pytest.mark.parametrize("index", [(slice(0, 10, 2), slice(None)), (3, slice(None)), (slice(None),) * 3],
                         ids=["step", "integer", "three-axes"])
def test_only_plain_slices(image: tuple[Path, np.ndarray], index: tuple[object, ...]) -> None:
    with pytest.raises(IndexError, match="slices with step 1"):
        GeoRaster(image[0])[index]


@pytest.mark.parametrize("bands", [(0,), (4,), (1, 1), (1.0,), ("1",), (True,), ()],
                         ids=["zero", "past-count", "duplicate", "float", "str", "bool", "empty"])
def test_bad_bands(tmp_path: Path, bands: tuple[object, ...]) -> None:
    write_input(tmp_path / "three.tif", 3, "uint8")
    with pytest.raises(ValueError, match=r"has 3 bands \(1\.\.3\)"):
        GeoRaster(tmp_path / "three.tif", bands)  # type: ignore[arg-type]


@pytest.mark.parametrize("content", [b"not a raster at all\n", None], ids=["garbage", "missing"])
def test_unreadable_file(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "broken.tif"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="cannot open raster") as info:
        GeoRaster(path)
    assert "\n" not in str(info.value)


def test_mixed_band_dtypes(tmp_path: Path) -> None:
    write_input(tmp_path / "a.tif", 1, "uint8")
    write_input(tmp_path / "b.tif", 1, "uint16")
    bands = "".join(
        f'<VRTRasterBand dataType="{kind}" band="{band}"><SimpleSource>'
        f'<SourceFilename relativeToVRT="1">{name}</SourceFilename><SourceBand>1</SourceBand>'
        f"</SimpleSource></VRTRasterBand>"
        for band, (kind, name) in enumerate([("Byte", "a.tif"), ("UInt16", "b.tif")], start=1))
    vrt = tmp_path / "mixed.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="{WIDTH}" rasterYSize="{HEIGHT}">{bands}</VRTDataset>')
    with pytest.raises(ValueError, match="mixed dtypes"):
        GeoRaster(vrt)
    assert GeoRaster(vrt, bands=(2,)).dtype == np.uint16


# --------------------------------------------------------------------------- is_georeferenced

def test_is_georeferenced(tmp_path: Path) -> None:
    import tifffile
    from PIL import Image

    write_input(tmp_path / "geo.tif", 3, "uint8")
    write_input(tmp_path / "no-crs.tif", 1, "uint8", crs=None)
    pixels = np.zeros((20, 30, 3), np.uint8)
    tifffile.imwrite(tmp_path / "plain.tif", pixels)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    (tmp_path / "garbage.tif").write_bytes(b"nothing here")
    found = {name: is_georeferenced(tmp_path / name)
             for name in ("geo.tif", "no-crs.tif", "plain.tif", "plain.png", "garbage.tif", "missing.tif")}
    assert found == {"geo.tif": True, "no-crs.tif": True, "plain.tif": False, "plain.png": False,
                     "garbage.tif": False, "missing.tif": False}


def test_is_georeferenced_without_rasterio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_input(tmp_path / "geo.tif", 3, "uint8")
    assert is_georeferenced(tmp_path / "geo.tif")
    monkeypatch.setitem(sys.modules, "rasterio", None)  # import rasterio now raises ImportError
    assert is_georeferenced(tmp_path / "geo.tif") is False


# --------------------------------------------------------------------------- map_transform

GEOMETRIES = {
    "square": geometry((32, 32), (8, 8), (0, 0)),
    "non-square": geometry((24, 40), (4, 8), (3, 5)),
    "negative-offset": geometry((32, 48), (8, 16), (-6, -10)),
    "half-pixel": geometry((13, 21), (4, 2), (1, -2)),  # (window - stride) / 2 is not whole
}
TRANSFORMS = {"north-up": TEN_METRES, "rotated": TEN_METRES @ Affine.rotation(30.0) @ Affine.scale(1.0, 2.0)}
CELLS = [(0, 0), (3, 5), (7, 2)]
FACTORS = {"no-factor": (1.0, 1.0), "pyramid": (round(0.37 * 1000) / 1000, round(0.37 * 777) / 777)}


@pytest.mark.parametrize("factor", FACTORS.values(), ids=FACTORS.keys())
@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("cell", CELLS, ids=[f"cell{i}-{j}" for i, j in CELLS])
@pytest.mark.parametrize("geo", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_map_pixel_centre_is_window_centre(geo: Geometry, cell: tuple[int, int], transform: Affine,
                                           factor: tuple[float, float]) -> None:
    (i, j), (h, w), (sy, sx), (oy, ox), (fy, fx) = cell, geo.window, geo.stride, geo.offset, factor
    centre = ((ox + j * sx + w / 2) / fx, (oy + i * sy + h / 2) / fy)  # input pixels (x, y)
    got = map_transform(transform, geo, factor) @ (j + 0.5, i + 0.5)
    np.testing.assert_allclose(got, transform @ centre, rtol=0, atol=1e-6)


@pytest.mark.parametrize("geo", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_map_pixel_is_one_stride_block(geo: Geometry) -> None:
    (sy, sx), (fy, fx) = geo.stride, FACTORS["pyramid"]
    result = map_transform(TEN_METRES, geo, (fy, fx))
    assert (result.a, result.e) == pytest.approx((10.0 * sx / fx, -10.0 * sy / fy))
    assert (result.b, result.d) == (0.0, 0.0)


@pytest.mark.parametrize("geo", [g for g in GEOMETRIES.values()
                                 if (g.window[0] - g.stride[0]) % 2 == (g.window[1] - g.stride[1]) % 2 == 0],
                         ids=lambda g: "x".join(map(str, g.window)))
def test_map_pixels_sit_where_heatmaps_paint(geo: Geometry) -> None:
    # render.paint_map's block of cell (i, j) starts at offset + (window - stride) // 2 + (i, j) * stride
    (h, w), (sy, sx), (oy, ox) = geo.window, geo.stride, geo.offset
    top, left = oy + (h - sy) // 2, ox + (w - sx) // 2
    result = map_transform(TEN_METRES, geo)
    for i, j in CELLS:
        assert result @ (j, i) == pytest.approx(TEN_METRES @ (left + j * sx, top + i * sy))


# --------------------------------------------------------------------------- write_geotiff

def random_map(classes: int, rows: int, cols: int) -> np.ndarray:
    values = np.random.default_rng(rows).standard_normal((classes, rows, cols)).astype(np.float32)
    values[:, 0, 0] = np.nan
    return values


class Recording:
    """A map that records each read (and can fail on the ``fail_at``-th one)."""

    def __init__(self, array: object, fail_at: int | None = None) -> None:
        self.array, self.fail_at, self.reads = array, fail_at, []
        self.shape = array.shape  # type: ignore[attr-defined]

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        if len(self.reads) == self.fail_at:
            raise RuntimeError("read failed midway")
        block = np.asarray(self.array[index])  # type: ignore[index]
        self.reads.append(block.shape)
        return block


def check_written(path: Path, values: np.ndarray, transform: Affine, labels: tuple[str, ...]) -> None:
    with rasterio.open(path) as written:
        np.testing.assert_array_equal(written.read(), values)
        assert written.dtypes == ("float32",) * values.shape[0]
        assert written.crs == UTM and written.transform == transform
        assert written.descriptions == labels
        assert np.isnan(written.nodata)
        assert written.profile["tiled"] and written.compression.name.lower() == "deflate"
        assert all(max(shape) <= 512 and shape[0] % 16 == 0 for shape in written.block_shapes)


def test_round_trip_from_numpy(tmp_path: Path) -> None:
    values = random_map(3, 37, 53)
    transform = map_transform(TEN_METRES, GEOMETRIES["square"])
    path = write_geotiff(tmp_path / "map.tif", values, transform, UTM, labels=("cat", "dog", "owl"))
    assert path == tmp_path / "map.tif"
    check_written(path, values, transform, ("cat", "dog", "owl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif"]


def test_round_trip_from_zarr_block_by_block(tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    values = random_map(2, 600, 700)
    stored = zarr.open_array(str(tmp_path / "map.zarr"), mode="w", shape=values.shape, chunks=(2, 256, 256),
                             dtype="float32", fill_value=np.nan)
    stored[:] = values
    recorded = Recording(stored)
    write_geotiff(tmp_path / "map.tif", recorded, TEN_METRES, "EPSG:32633", progress=True)
    check_written(tmp_path / "map.tif", values, TEN_METRES, ("class 0", "class 1"))
    assert len(recorded.reads) == 4 and max(r * c for _, r, c in recorded.reads) == 512 * 512


def test_small_map_gets_small_tiles(tmp_path: Path) -> None:
    write_geotiff(tmp_path / "small.tif", random_map(1, 5, 7), TEN_METRES, UTM)
    with rasterio.open(tmp_path / "small.tif") as written:
        assert written.block_shapes == [(16, 16)] and written.profile["tiled"]


@pytest.mark.parametrize(("classes", "rows", "cols", "block"),
                         [(3, 600, 700, 512), (3, 100, 40, 112), (1, 5, 7, 16), (1000, 4000, 4000, 128),
                          (10**6, 100, 100, 16)])
def test_block_size(classes: int, rows: int, cols: int, block: int) -> None:
    assert geotiff._block_size(classes, rows, cols) == block


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_failure_leaves_nothing(tmp_path: Path, existing: bool) -> None:
    if existing:
        (tmp_path / "map.tif").write_bytes(b"an earlier map")
    broken = Recording(random_map(2, 600, 700), fail_at=2)
    with pytest.raises(RuntimeError, match="midway"):
        write_geotiff(tmp_path / "map.tif", broken, TEN_METRES, UTM)
    assert len(broken.reads) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == (["map.tif"] if existing else [])
    if existing:
        assert (tmp_path / "map.tif").read_bytes() == b"an earlier map"


@pytest.mark.parametrize(("where", "values", "labels", "match"), [
    ("missing/map.tif", random_map(1, 4, 4), None, "does not exist"),
    ("map.tif", np.zeros((4, 4), np.float32), None, r"must be \(classes, rows, cols\)"),
    ("map.tif", random_map(2, 4, 4), ("one",), "1 labels for a map of 2 classes"),
], ids=["missing-directory", "2-d", "labels"])
def test_bad_arguments(tmp_path: Path, where: str, values: np.ndarray, labels: tuple[str, ...] | None,
                       match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_geotiff(tmp_path / where, values, TEN_METRES, UTM, labels=labels)
    assert list(tmp_path.iterdir()) == []
