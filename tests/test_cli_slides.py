"""The command line on slides, scenes and many images: predict converts once and writes one
map per image; --mpp, --mask, --bands; bad input exits 2 and writes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convolutionalize import dense_map
from convolutionalize.cli import main, predict
from convolutionalize.inference import dense
from test_geo_outputs import write_scene
from test_slides import Padded, tissue_page, write_slide


@pytest.fixture(scope="module")
def torch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of model as a pickled PyTorch module (heatmap and detect run PyTorch models)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "padded.pt"
    torch.save(Padded().eval(), path)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "padded.onnx"
    torch.onnx.export(Padded().eval(), (torch.randn(1, 3, 32, 32),), str(path), dynamo=False)
    return path


def test_predict_many_images_into_a_folder_converting_once(model_file: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = {}
    for name in ("a", "b", "c"):
        pixels[name] = rng.integers(0, 256, (48 + 8 * len(pixels), 64, 3), dtype=np.uint8)
        Image.fromarray(pixels[name]).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    seen: list[object] = []
    convert = dense.convolutionalize

    def counting(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(model)
        return convert(model, *args, **kwargs)

    for module in (dense, predict):  # the library's and the command's own
        monkeypatch.setattr(module, "convolutionalize", counting)
    out = tmp_path / "maps"
    assert main(["predict", str(model_file), str(folder / "a.png"), str(folder / "[bc].png"), "-o", str(out),
                 "--no-progress"]) == 0
    assert len(seen) == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.npy", "b.npy", "c.npy"]
    for name, image in pixels.items():
        np.testing.assert_allclose(np.load(out / f"{name}.npy"), dense_map(model_file, image), atol=1e-6)
    assert main(["predict", str(model_file), str(folder), "-o", str(tmp_path / "again"), "--format", "zarr",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["a.zarr", "b.zarr", "c.zarr"]


def test_predict_a_slide_at_a_resolution_with_a_mask_to_ome_zarr(model_file: Path, tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "page.ome.tif", tissue_page())
    out = tmp_path / "map.ome.zarr"
    assert main(["predict", str(model_file), str(slide), "--mpp", "0.5", "--mask", "auto", "--tile", "64",
                 "-o", str(out), "--no-progress"]) == 0
    import zarr

    written = zarr.open_group(str(out), mode="r")
    expected = dense_map(model_file, slide, mpp=0.5, mask="auto", tile=64).map
    np.testing.assert_array_equal(written["0"][:], expected)
    assert "ome" in written.attrs and not (tmp_path / "map.partial.ome.zarr").exists()


def test_predict_a_scene_to_a_geotiff(model_file: Path, tmp_path: Path) -> None:
    import rasterio

    bands = np.random.default_rng(1).integers(0, 65536, (4, 80, 96), dtype=np.uint16)
    scene = write_scene(tmp_path / "scene.tif", bands)
    out = tmp_path / "map.tif"
    assert main(["predict", str(model_file), str(scene), "--bands", "3", "2", "1", "-o", str(out),
                 "--no-progress"]) == 0
    with rasterio.open(out) as written:
        assert written.crs.to_epsg() == 32633
        expected = dense_map(model_file, np.ascontiguousarray(bands[[2, 1, 0]].transpose(1, 2, 0)))
        np.testing.assert_allclose(written.read(), expected, atol=1e-6)


@pytest.mark.parametrize("case", ["unreadable slide", "mpp finer than level 0", "mask of the wrong shape",
                                  "mpp on a png", "band out of range", "several images to one file"])
def test_bad_input_exits_2_and_writes_nothing(model_file: Path, tmp_path: Path, case: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    slide = write_slide(tmp_path / "page.ome.tif", tissue_page(256, 320))
    png = tmp_path / "page.png"
    Image.fromarray(tissue_page(64, 80)).save(png)
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"\x00" * 100)
    np.save(tmp_path / "mask.npy", np.ones((10, 50), bool))
    scene = write_scene(tmp_path / "scene.tif", np.zeros((3, 40, 40), np.uint16))
    out = tmp_path / "out.zarr"
    args, message = {
        "unreadable slide": ([str(broken)], "cannot read the slide broken.svs"),
        "mpp finer than level 0": ([str(slide), "--mpp", "0.1"], "finer than the slide's level 0"),
        "mask of the wrong shape": ([str(slide), "--mask", str(tmp_path / "mask.npy")], "aspect ratio"),
        "mpp on a png": ([str(png), "--mpp", "0.5"], "--mpp reads a slide file"),  # as the CLI names it
        "band out of range": ([str(scene), "--bands", "1", "2", "7"], "has 3 bands"),
        "several images to one file": ([str(png), str(slide)], "-o must be a folder"),
    }[case]
    assert main(["predict", str(model_file), *args, "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "out.partial.zarr").exists()


def test_heatmap_of_a_slide_on_a_thumbnail_of_the_chosen_width(torch_file: Path, tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "page.ome.tif", tissue_page())
    out = tmp_path / "heat.png"
    assert main(["heatmap", str(torch_file), "--trust-pickle", str(slide), "--mpp", "0.5", "--mask", "auto",
                 "--width", "320", "--input-size", "32", "32", "-o", str(out), "--no-progress"]) == 0
    picture = np.asarray(Image.open(out).convert("RGB"), np.int16)
    assert picture.shape[1] > 320 and picture.shape[0] == 256  # the 512 x 640 page at 320 px wide + colorbar
    image_area = picture[:, :320]
    glass, tissue = image_area[220:250, 10:40], image_area[30:110, 20:150]  # thumbnail pixels
    assert np.ptp(glass.reshape(-1, 3), axis=0).max() < 40  # background tiles skipped: greyed glass only
    assert (np.abs(tissue[..., 0] - tissue[..., 2]) > 30).mean() > 0.3  # the map painted over tissue


def test_heatmap_and_detect_of_several_images(torch_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pages"
    folder.mkdir()
    for k in range(2):
        Image.fromarray(tissue_page(64, 96)).save(folder / f"p{k}.png")
    assert main(["heatmap", str(torch_file), "--trust-pickle", str(folder), "--input-size", "32", "32", "-o",
                 str(tmp_path / "heat"), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "heat").iterdir()) == ["p0.png", "p1.png"]
    assert main(["detect", str(torch_file), "--trust-pickle", str(folder / "*.png"), "--input-size", "32",
                 "32", "-o", str(tmp_path / "found"), "--draw", str(tmp_path / "drawn"), "--no-progress"]) \
        == 0
    assert sorted(p.name for p in (tmp_path / "found").iterdir()) == ["p0.json", "p1.json"]
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["p0.png", "p1.png"]


def test_a_folder_of_one_image_still_writes_into_a_folder(model_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(tissue_page(64, 80)).save(folder / "only.png")
    assert main(["predict", str(model_file), str(folder), "-o", str(tmp_path / "maps"), "--no-progress"]) == 0
    assert [p.name for p in (tmp_path / "maps").iterdir()] == ["only.npy"]
