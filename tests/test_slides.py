"""Whole-slide images at the model's resolution, and foreground masks.

Tests write their own pyramidal OME-TIFF slides with resolution metadata (tifffile): level
choice and resampling (a map at ``mpp=`` equals the map of the level resampled), tiled ==
whole at the chosen level, masks (skipped tiles NaN and flagged, the rest equal to the
unmasked map, resume with a mask), and the refusals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr
from torch import nn

from convolutionalize import convolutionalize, dense_map
from convolutionalize.inference import masks, slides
from convolutionalize.inference.masks import auto_mask, check_mask, hsv_saturation
from convolutionalize.inference.store import MapSink, ZarrSink
from convolutionalize.inference.tiling import Tile

from conftest import rel

MPP = 0.25  # microns per level-0 pixel


class Padded(nn.Module):
    """A small padded RGB classifier: window 32, stride 8."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def fcn() -> nn.Module:
    torch.manual_seed(0)
    return convolutionalize(Padded().eval(), (32, 32))


def write_slide(path: Path, image: np.ndarray, levels: int = 3, mpp: float | None = MPP) -> Path:
    """A pyramidal OME-TIFF: level k is ``image[::2**k, ::2**k]`` (as scanners' pyramids are
    made: any downsampled image will do), tiled 64 x 64, with its resolution where given."""
    def resolution(k: int) -> dict:
        if mpp is None:
            return {}
        return {"resolution": (1e4 / (mpp * 2 ** k),) * 2, "resolutionunit": "CENTIMETER"}

    options = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, bigtiff=True, ome=mpp is not None) as tif:
        extra = {"metadata": {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp}} if mpp is not None else {}
        tif.write(image, subifds=levels - 1, **resolution(0), **extra, **options)
        for k in range(1, levels):
            tif.write(image[::2 ** k, ::2 ** k], subfiletype=1, **resolution(k), **options)
    return path


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (400, 560, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory, pixels: np.ndarray) -> Path:
    return write_slide(tmp_path_factory.mktemp("slide") / "slide.ome.tif", pixels)


def test_the_slide_is_read_by_tiffslide_with_its_levels_and_resolution(slide: Path) -> None:
    opened = slides.open_slide(slide)
    assert opened.reader == "tiffslide"
    assert opened.sizes == [(400, 560), (200, 280), (100, 140)]
    assert opened.downsamples == [1.0, 2.0, 4.0]
    assert opened.mpp == (MPP, MPP)


@pytest.mark.parametrize(("mpp", "level", "factor"), [
    (0.25, 0, 1.0), (0.5, 1, 1.0), (0.502, 1, 1.0), (1.0, 2, 1.0), (0.6, 1, 0.5 / 0.6), (2.0, 2, 0.5)])
def test_level_choice(slide: Path, mpp: float, level: int, factor: float) -> None:
    chosen, resize = slides.level_for(slides.open_slide(slide), mpp)
    assert chosen == level
    assert resize == pytest.approx(factor)


def test_a_map_at_a_level_resolution_is_that_levels_map(fcn: nn.Module, slide: Path,
                                                       pixels: np.ndarray) -> None:
    result = dense_map(fcn, slide, mpp=0.5)
    np.testing.assert_allclose(result.map, dense_map(fcn, pixels[::2, ::2]), rtol=0, atol=1e-6)
    assert result.geometry.factor == (0.5, 0.5)
    assert result.geometry.stride == (16.0, 16.0)  # level-0 pixels
    assert result.mpp == (MPP, MPP)
    assert result.microns_per_cell == (16 * MPP, 16 * MPP)
    assert result.box_microns(1, 2) == tuple(v * MPP for v in result.box(1, 2))


def test_a_map_between_levels_is_the_resampled_levels_map(fcn: nn.Module, slide: Path,
                                                          pixels: np.ndarray) -> None:
    result = dense_map(fcn, slide, mpp=0.6)
    level1 = np.ascontiguousarray(pixels[::2, ::2])
    expected = dense_map(fcn, level1, scales=[0.5 / 0.6])[0]
    assert result.size == expected.size == (167, 233)
    assert rel(result.map, expected.map) < 1e-6
    factor = (167 / 400, 233 / 560)
    assert result.geometry.factor == factor


def test_tiled_equals_whole_at_the_chosen_level(fcn: nn.Module, slide: Path) -> None:
    whole = dense_map(fcn, slide, mpp=0.6)
    tiled = dense_map(fcn, slide, mpp=0.6, tile=48)
    np.testing.assert_array_equal(tiled.map, whole.map)


def test_without_mpp_a_slide_maps_level_0(fcn: nn.Module, slide: Path, pixels: np.ndarray) -> None:
    np.testing.assert_allclose(dense_map(fcn, slide), dense_map(fcn, pixels), rtol=0, atol=1e-6)


def test_refusals(fcn: nn.Module, slide: Path, tmp_path: Path, pixels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="finer than the slide's level 0"):
        dense_map(fcn, slide, mpp=0.1)
    bare = write_slide(tmp_path / "bare.tif", pixels[:128, :128], levels=1, mpp=None)
    with pytest.raises(ValueError, match="no resolution metadata"):
        dense_map(fcn, bare, mpp=0.5)
    with pytest.raises(ValueError, match="is not one"):
        dense_map(fcn, pixels, mpp=0.5)
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide at all")
    with pytest.raises(ValueError, match=r"cannot read the slide broken\.svs"):
        dense_map(fcn, broken)
    with pytest.raises(ValueError, match="positive number"):
        dense_map(fcn, slide, mpp=-1)


def test_no_installed_reader_names_the_extra(slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(path: str) -> None:
        raise ImportError("no module")

    monkeypatch.setattr(slides, "_OPENERS", {"tiffslide": missing, "openslide": missing})
    with pytest.raises(ValueError, match=r"no slide reader is installed .*convolutionalize\[slides\]"):
        slides.open_slide(slide)


def test_openslide_reads_the_same_level_0_pixels(slide: Path, pixels: np.ndarray) -> None:
    pytest.importorskip("openslide", reason="OpenSlide is optional (the slides extra installs it)")
    opened = slides.Slide(str(slide), "openslide", [(400, 560)], [1.0], None)
    np.testing.assert_array_equal(opened.level(0)[10:74, 30:130], pixels[10:74, 30:130])


# --------------------------------------------------------------------------- masks


def tissue_page(height: int = 512, width: int = 640) -> np.ndarray:
    """Grey glass with two pink 'tissue' blobs (30 % of the page), noise on both."""
    rng = np.random.default_rng(1)
    page = np.full((height, width, 3), 225, np.float64) + rng.normal(0, 3, (height, width, 3))
    tissue = np.zeros((height, width), bool)
    tissue[40:250, 30:330] = True
    tissue[330:480, 420:610] = True
    page[tissue] = np.array([200, 110, 170]) + rng.normal(0, 12, (int(tissue.sum()), 3))
    return np.clip(page, 0, 255).astype(np.uint8)


def test_auto_mask_finds_the_tissue() -> None:
    page = tissue_page()
    mask = auto_mask(page[::4, ::4])
    truth = np.zeros(mask.array.shape, bool)
    truth[10:63, 7:83] = True
    truth[82:120, 105:153] = True
    assert mask.array[truth].mean() > 0.99
    assert mask.array[~truth].mean() < 0.05


def test_hsv_saturation_is_skimages() -> None:
    from skimage.color import rgb2hsv

    pixels = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    pixels[:4], pixels[4:8] = 0, 90  # black (no saturation, no division) and grey
    np.testing.assert_allclose(hsv_saturation(pixels), rgb2hsv(pixels)[..., 1], rtol=0, atol=1e-12)
    as_float = pixels.astype(np.float32) / 255
    np.testing.assert_allclose(hsv_saturation(as_float), rgb2hsv(as_float)[..., 1], rtol=0, atol=1e-6)
    assert hsv_saturation(pixels)[:8].max() == 0.0


def test_auto_mask_keeps_a_slide_covered_in_tissue() -> None:
    rng = np.random.default_rng(2)
    tissue = np.clip(np.array([200, 110, 170]) + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert auto_mask(tissue).array.all()


def test_masked_map_skips_blank_tiles_as_nan_and_keeps_the_rest(
        fcn: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tile_mode: str) -> None:
    page = tissue_page()
    path = write_slide(tmp_path / "page.ome.tif", page)
    full = dense_map(fcn, path, tile=64)
    computed: list[Tile] = []
    original = MapSink.write
    monkeypatch.setattr(MapSink, "write", lambda self, t, c: computed.append(t) or original(self, t, c))
    masked = dense_map(fcn, path, tile=64, mask="auto")
    skipped = np.isnan(masked).all(axis=0)
    assert 0.2 < skipped.mean() < 0.8
    assert 0 < len(computed) < 0.8 * 80  # 8 x 10 tiles in all
    np.testing.assert_allclose(masked[:, ~skipped], full[:, ~skipped], rtol=1e-5, atol=1e-6)
    assert not np.isnan(masked[:, ~skipped]).any()
    centre_of_blob = (145 - 16) // 8, (180 - 16) // 8
    assert not skipped[centre_of_blob]
    corner_of_glass = (480 - 16) // 8, (60 - 16) // 8
    assert skipped[corner_of_glass]


def test_masked_zarr_flags_skipped_tiles_and_resumes(fcn: nn.Module, tmp_path: Path, tile_mode: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    page = tissue_page()
    mask = auto_mask(page[::4, ::4]).array
    reference = dense_map(fcn, page, tile=64, mask=mask)
    original = ZarrSink.write
    calls: list[int] = []

    def stop_after_three(self: ZarrSink, tile: Tile, cells: np.ndarray) -> None:
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        original(self, tile, cells)

    with monkeypatch.context() as patch:
        patch.setattr(ZarrSink, "write", stop_after_three)
        with pytest.raises(KeyboardInterrupt):
            dense_map(fcn, page, tile=64, mask=mask, out=tmp_path / "map.zarr")
    calls.clear()
    monkeypatch.setattr(ZarrSink, "write", lambda self, t, c: calls.append(1) or original(self, t, c))
    out = dense_map(fcn, page, tile=64, mask=mask, out=tmp_path / "map.zarr")
    group = zarr.open_group(str(tmp_path / "map.zarr"), mode="r")
    skipped, done = group["skipped"][:], group["done"][:]
    assert done.all() and 0 < skipped.sum() < skipped.size
    assert sum(calls) == skipped.size - skipped.sum() - 3
    assert np.array_equal(np.isnan(out[:]), np.isnan(reference))
    np.testing.assert_allclose(out[:], reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="different arguments"):
        dense_map(fcn, page, tile=64, out=tmp_path / "map.zarr")  # the same store without the mask


def test_masked_dask_map_equals_the_local_one(fcn: nn.Module) -> None:
    import dask.array as da

    page = tissue_page()
    mask = auto_mask(page[::4, ::4]).array
    local = dense_map(fcn, page, tile=64, mask=mask)
    lazy = dense_map(fcn, da.from_array(page, chunks=(128, 128, 3)), tile=64, mask=mask)
    np.testing.assert_array_equal(lazy.compute(), local)
    np.testing.assert_array_equal(dense_map(fcn, page, tile=64, mask=mask, scheduler="threads"), local)


def test_bad_masks(fcn: nn.Module, tmp_path: Path) -> None:
    page = tissue_page()
    with pytest.raises(ValueError, match="aspect ratio"):
        dense_map(fcn, page, mask=np.ones((10, 40), bool))
    with pytest.raises(ValueError, match="2-D"):
        dense_map(fcn, page, mask=np.ones((4, 5, 3), bool))
    with pytest.raises(TypeError, match="mask must be"):
        dense_map(fcn, page, mask=3)
    with pytest.raises(ValueError, match="does not exist"):
        dense_map(fcn, page, mask=tmp_path / "nothing.png")
    with pytest.raises(ValueError, match="needs RGB pixels"):
        auto_mask(page[..., 0])
    with pytest.raises(ValueError, match="model-ready float input"):
        dense_map(fcn, torch.randn(3, 64, 64), mask="auto")
    assert check_mask(np.ones((128, 160)), (512, 640)).foreground == 1.0


def test_masked_cells_are_those_whose_window_misses_the_foreground_whatever_the_tiling(
        fcn: nn.Module) -> None:
    page = tissue_page()
    mask = auto_mask(page[::4, ::4])
    whole, tiled = dense_map(fcn, page, mask=mask.array), dense_map(fcn, page, tile=40, mask=mask.array)
    np.testing.assert_array_equal(tiled, whole)
    geometry = fcn.geometry
    expected = np.zeros(whole.shape[1:], bool)
    for i in range(whole.shape[1]):
        for j in range(whole.shape[2]):
            x0, y0, x1, y1 = geometry.box(i, j)
            expected[i, j] = mask.array[y0 // 4:-(-y1 // 4), x0 // 4:-(-x1 // 4)].any()
    np.testing.assert_array_equal(~np.isnan(whole).any(axis=0), expected)
    assert 0.2 < expected.mean() < 0.9


def test_a_tile_half_on_tissue_computes_only_its_foreground_cells_box(
        fcn: nn.Module, monkeypatch: pytest.MonkeyPatch, tile_mode: str) -> None:
    from convolutionalize.inference.images import ImageSource

    page = tissue_page()
    mask = np.zeros((512, 640), bool)
    mask[:100, :] = True  # the top rows only: each tile of the first row is cut to them
    read: list[int] = []
    original = ImageSource.block

    def counting(self: ImageSource, y0: int, y1: int, x0: int, x1: int) -> Any:
        read.append((y1 - y0) * (x1 - x0))
        return original(self, y0, y1, x0, x1)

    monkeypatch.setattr(ImageSource, "block", counting)
    masked = dense_map(fcn, page, tile=256, mask=mask)
    full_reads = sum(read)
    read.clear()
    whole = dense_map(fcn, page, tile=256)
    # tiles: the first row of tiles (0.52 of what all tiles read), and of it the top half; a
    # stream reads each column once, the first tile's cut part only (0.37 of the page)
    assert full_reads < (0.35 if tile_mode == "tiles" else 0.45) * sum(read)
    kept = ~np.isnan(masked).all(axis=0)
    np.testing.assert_array_equal(masked[:, kept], whole[:, kept])
    assert kept[:10].all() and not kept[20:].any()


def test_a_pyramidal_tiffs_auto_mask_looks_at_its_coarsest_level(fcn: nn.Module, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Not at all of level 0 (a 40k slide's JPEG tiles took 15 s to decode for the mask)."""
    path = write_slide(tmp_path / "page.ome.tif", tissue_page())  # levels 512x640, 256x320, 128x160
    seen: list[tuple[int, ...]] = []
    original = masks.low_resolution
    monkeypatch.setattr(masks, "low_resolution", lambda a: seen.append(a.shape) or original(a))
    masked = dense_map(fcn, path, tile=64, mask="auto")
    assert seen == [(128, 160, 3)]
    assert 0.2 < np.isnan(masked).all(axis=0).mean() < 0.8
