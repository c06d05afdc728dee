"""The command line and the library as a newcomer meets them: errors before the work, runs
that repeat, pictures that can be read, library names that work as documented, progress that
says what is happening. Each case is one finding of a first try of the tool.

The model is the tiny padding-free net of ``_tiny`` (1 channel, 12x12 window, stride 2),
pickled to a temporary ``.pt``, or the digits demo's net with ``--weights random``.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from convolutionalize import convolutionalize, models
from convolutionalize.cli import main
from convolutionalize.cli import predict as predict_command
from convolutionalize.inference import store

from _tiny import INPUT_SIZE, TinyNet

SIZE = [str(INPUT_SIZE[0]), str(INPUT_SIZE[1])]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model and a grey 40x48 image (PNG and model-ready ``.npy``)."""
    root = tmp_path_factory.mktemp("newcomer")
    torch.manual_seed(0)
    torch.save(TinyNet(), root / "tiny.pt")
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "page.png")
    np.save(root / "page.npy", (pixels / 255.0).astype(np.float32)[None])
    return root


def tiny(files: Path, command: str, image: str | Path, *args: str) -> list[str]:
    """``command`` on the tiny model and ``image`` (a name in ``files``, or a path)."""
    return [command, str(files / "tiny.pt"), "--trust-pickle", "--input-size", *SIZE, str(files / image),
            *args]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(err: str, fragment: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("convolutionalize: error: "), err
    assert fragment in lines[0], err


def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test: the error must come before it."""

    def loaded(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the arguments were checked")

    # the command's own name first: reading it binds the library's (Deferred), which must be the real one
    monkeypatch.setattr(predict_command, "load_model", loaded, raising=False)
    monkeypatch.setattr(models, "load_model", loaded)


# --------------------------------------------------------------------------- errors before the work


@pytest.mark.parametrize("output", ["{files}/page.png/out.npy", "{files}/page.png/deeper/out.npy"],
                         ids=["under-a-file", "two-below-a-file"])
def test_an_output_under_a_file_is_refused_before_the_model_loads(
        files: Path, output: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    no_model(monkeypatch)
    code, out, err = run(tiny(files, "predict", "page.npy", "-o", output.format(files=files)), capsys)
    assert (code, out) == (2, "")
    one_error(err, f"{files / 'page.png'} is a file, not a directory")  # not "File exists"


def test_convert_to_a_format_no_framework_writes_is_refused_before_the_model_loads(
        files: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    no_model(monkeypatch)
    args = ["convert", str(files / "tiny.pt"), "--trust-pickle", "--input-size", *SIZE, "-o",
            str(tmp_path / "model.h5")]
    code, out, err = run(args, capsys)
    assert (code, out) == (2, "")
    one_error(err, "cannot write model.h5: a converted model is saved as .keras, .pt2, .pt, .onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc takes no new files on Linux only")
def test_an_unwritable_folder_is_refused_before_the_model_loads(
        files: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    no_model(monkeypatch)  # /proc refuses even root, which os.access would let through
    code, _, err = run(tiny(files, "predict", "page.npy", "-o", "/proc/out.npy"), capsys)
    assert code == 2
    one_error(err, "cannot write in /proc")


def test_geotiff_output_without_rasterio_is_refused_before_the_model_loads(
        files: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    no_model(monkeypatch)
    monkeypatch.setitem(sys.modules, "rasterio", None)  # as if not installed: importing it fails
    code, _, err = run(tiny(files, "predict", "page.npy", "-o", str(tmp_path / "map.tif")), capsys)
    assert code == 2
    one_error(err, "pip install 'convolutionalize[geo]'")


@pytest.mark.parametrize("args, fragment", [
    (["--threshold", "2"], "--threshold: '2' must be in (0, 1]"),
    (["--threshold", "0"], "--threshold: '0' must be in (0, 1]"),
    (["--iou", "1.5"], "--iou: '1.5' must be in [0, 1]"),
], ids=["threshold-2", "threshold-0", "iou"])
def test_detect_ranges_are_checked_before_the_model_loads(
        files: Path, args: list[str], fragment: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_model(monkeypatch)
    code, _, err = run(tiny(files, "detect", "page.png", "-o", str(tmp_path / "d.json"), *args), capsys)
    assert code == 2
    one_error(err, fragment)


@pytest.mark.parametrize("command, args", [
    ("heatmap", ["--class", "10"]),
    ("detect", ["--background-class", "12"]),
], ids=["heatmap-class", "detect-background-class"])
def test_a_class_the_model_lacks_is_refused_before_mapping(
        files: Path, command: str, args: list[str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from convolutionalize import detect

    def mapped(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a map was computed before the class was checked")

    for name in ("class_probabilities", "detection_maps"):
        monkeypatch.setattr(detect, name, mapped)
    suffix = ".png" if command == "heatmap" else ".json"
    code, _, err = run(tiny(files, command, "page.png", "-o", str(tmp_path / f"out{suffix}"), *args), capsys)
    assert code == 2
    one_error(err, "the model has 10 classes (0..9)")
    assert list(tmp_path.iterdir()) == []


def test_a_raster_with_more_bands_than_channels_names_bands_and_leaves_no_folder(
        files: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("rasterio")
    from test_geo_outputs import write_scene

    scene = write_scene(tmp_path / "scene.tif", np.random.default_rng(0).integers(0, 65536, (4, 40, 48),
                                                                                   dtype=np.uint16))
    maps = tmp_path / "maps"
    code, _, err = run(tiny(files, "predict", scene, "-o", str(maps / "scene.npy")), capsys)
    assert code == 2
    one_error(err, "the model takes 1 channels but")
    assert "--bands 1" in err and "bands=" not in err  # the option, as the command line spells it
    assert not maps.exists()  # the folder made for the output went with the failure


@pytest.mark.parametrize("output", ["d.txt", "d"], ids=["txt", "no-suffix"])
def test_detect_refuses_an_output_suffix_it_does_not_write(
        files: Path, output: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    no_model(monkeypatch)
    code, _, err = run(tiny(files, "detect", "page.png", "-o", str(tmp_path / output)), capsys)
    assert code == 2
    one_error(err, "must end in .json or .png")


def test_detect_to_png_draws_and_to_json_writes_json(files: Path, capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    args = ["--threshold", "0.05"]
    assert run(tiny(files, "detect", "page.png", "-o", str(tmp_path / "d.json"), *args), capsys)[0] == 0
    assert run(tiny(files, "detect", "page.png", "-o", str(tmp_path / "d.png"), *args), capsys)[0] == 0
    records = json.loads((tmp_path / "d.json").read_text())
    assert records  # something to draw
    with Image.open(tmp_path / "d.png") as drawn:
        assert (drawn.format, drawn.size) == ("PNG", (48, 40))


def test_library_messages_name_the_options(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["verify", str(files / "tiny.pt"), "--trust-pickle", "--input-size", *SIZE,
                        "--image-size", "8", "8"], capsys)
    assert code == 2
    one_error(err, "--pool global")
    assert "pool='global'" not in err


@pytest.mark.parametrize("library, cli", [
    ("pass a larger image or pool='global'", "pass a larger image or --pool global"),
    ('leave tile out or use pool="window"', "leave tile out or use --pool window"),
    ("pick 3 of them with bands=(4, 3, 2), in order", "pick 3 of them with --bands 4 3 2, in order"),
    ("output_stride=3 is not possible", "--output-stride 3 is not possible"),
    ("mpp= reads a slide file", "--mpp reads a slide file"),
    ("input_size is required", "--input-size is required"),
    ("e.g. convolutionalize(model, input_size=(224, 224))",) * 2,  # library code quoted stays as it is
    ("the output file out=x.zarr", "the output file out=x.zarr"),
], ids=["quoted", "double-quoted", "tuple", "number", "bare-keyword", "bare-name", "python-call",
        "not-an-option"])
def test_library_words_become_option_names(library: str, cli: str) -> None:
    from convolutionalize.cli.options import cli_words

    assert cli_words(library) == cli


def test_ctrl_c_is_one_line_and_exit_130(files: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(predict_command, "dense_map", interrupted, raising=False)
    code, _, err = run(tiny(files, "predict", "page.npy", "-o", str(tmp_path / "map.npy")), capsys)
    assert code == 130
    assert err.strip() == "convolutionalize: interrupted"
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- runs that repeat


def digits(command: str, *args: str) -> list[str]:
    return [command, "demo:digits", "--weights", "random", *args]


def test_random_weights_are_seeded(capsys: pytest.CaptureFixture[str]) -> None:
    first = run(digits("verify"), capsys)
    assert first[0] == 0
    assert run(digits("verify"), capsys) == first  # the same figures, every run
    assert run(digits("verify", "--seed", "1"), capsys)[1] != first[1]


def test_an_interrupted_store_resumes_with_random_weights(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    image = tmp_path / "page.npy"
    np.save(image, np.random.default_rng(1).random((1, 96, 128), dtype=np.float32))
    out = tmp_path / "map.zarr"
    args = digits("predict", str(image), "-o", str(out), "--tile", "32")
    written: list[object] = []
    write = store.ZarrSink.write

    def stopped(self: store.ZarrSink, *args: Any) -> None:
        if len(written) == 3:
            raise KeyboardInterrupt  # Ctrl-C after three tiles
        written.append(args)
        write(self, *args)

    monkeypatch.setattr(store.ZarrSink, "write", stopped)
    code, _, err = run(args, capsys)
    partial = tmp_path / "map.partial.zarr"
    assert (code, err.strip()) == (130, f"convolutionalize: interrupted; {partial} keeps the finished "
                                   "tiles: the same command resumes it")
    assert partial.exists() and not out.exists()
    monkeypatch.setattr(store.ZarrSink, "write", write)
    code, _, err = run([*args, "-v"], capsys)  # the same seed, the same weights: resumed, not refused
    assert code == 0
    assert "resuming: 3 of" in err
    fresh = tmp_path / "fresh.zarr"
    assert run(digits("predict", str(image), "-o", str(fresh), "--tile", "32"), capsys)[0] == 0
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["map"][...],
                                  zarr.open_group(str(fresh), mode="r")["map"][...])


def test_a_finished_store_is_complete_unless_overwrite(files: Path, capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "map.zarr"
    args = tiny(files, "predict", "page.npy", "-o", str(out))
    assert run(args, capsys)[0] == 0
    stamp = (out / "zarr.json").stat().st_mtime_ns
    code, text, err = run(args, capsys)  # the output is a folder now: still one image's map
    assert (code, err) == (0, "")
    assert text == f"{out} is complete (a finished map is there): nothing to do; pass --overwrite to " \
                   "compute it again\n"
    assert (out / "zarr.json").stat().st_mtime_ns == stamp
    code, text, _ = run([*args, "--overwrite"], capsys)
    assert code == 0 and text.startswith(f"wrote {out}")
    assert (out / "zarr.json").stat().st_mtime_ns != stamp


# --------------------------------------------------------------------------- pictures people can read


def test_heatmap_scales_colours_to_the_map_by_default(files: Path) -> None:
    from convolutionalize.render import heatmap

    fcn = convolutionalize(torch.load(files / "tiny.pt", weights_only=False), INPUT_SIZE)
    probs = np.full((2, 15, 19), 0.001)  # the map of a 40x48 image
    probs[0, 12, 16] = 0.02  # a faint class: its peak is 0.02
    picture = np.asarray(heatmap(np.zeros((40, 48)), probs, fcn.geometry, class_index=0, zoom=4), np.int16)
    centre = (fcn.geometry.window[0] - fcn.geometry.stride[0]) // 2 + 1  # of cell (0, 0)'s 2x2 block
    y, x = 4 * (centre + 2 * 12), 4 * (centre + 2 * 16)  # cell (12, 16), zoomed 4x (away from the title)
    assert np.abs(picture[y, x] - picture[y, x - 16]).max() > 50  # the peak stands out of a faint map
    from convolutionalize.render import colour_span  # what the panel's title says

    assert colour_span(probs[0]) == (0.001, 0.02, "colours 0.001..0.02 (the map's range)")
    assert colour_span(probs[0], 0.0, 1.0)[2] == "colours 0..1 (fixed)"


def test_heatmap_vmin_vmax(files: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    auto, fixed = tmp_path / "auto.png", tmp_path / "fixed.png"
    assert run(tiny(files, "heatmap", "page.png", "-o", str(auto)), capsys)[0] == 0
    unit = ["--vmin", "0", "--vmax", "1"]
    assert run(tiny(files, "heatmap", "page.png", "-o", str(fixed), *unit), capsys)[0] == 0
    assert not np.array_equal(np.asarray(Image.open(auto)), np.asarray(Image.open(fixed)))
    code, _, err = run(tiny(files, "heatmap", "page.png", "-o", str(fixed), "--vmin", "1", "--vmax", "0"),
                       capsys)
    assert code == 2
    one_error(err, "--vmin 1.0 must be below --vmax 0.0")


def test_ome_zarr_is_named_after_the_output(files: Path, capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    out = tmp_path / "smap.ome.zarr"
    assert run(tiny(files, "predict", "page.npy", "-o", str(out)), capsys)[0] == 0
    attributes = json.loads((out / "zarr.json").read_text())["attributes"]
    assert [m["name"] for m in attributes["ome"]["multiscales"]] == ["smap"]


def test_every_output_file_has_the_same_permissions(files: Path, capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    pytest.importorskip("rasterio")
    from test_geo_outputs import write_scene

    scene = write_scene(tmp_path / "scene.tif", np.random.default_rng(0).integers(0, 65536, (1, 40, 48),
                                                                                   dtype=np.uint16))
    for name in ("map.tif", "map.npy"):
        assert run(tiny(files, "predict", scene, "-o", str(tmp_path / name)), capsys)[0] == 0
    assert run(tiny(files, "heatmap", "page.png", "-o", str(tmp_path / "h.png")), capsys)[0] == 0
    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("map.tif", "map.npy", "h.png")}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


# --------------------------------------------------------------------------- library


def test_save_and_load_model_from_the_package_root(files: Path, tmp_path: Path) -> None:
    import convolutionalize as package
    from convolutionalize import load_model, save

    assert {"save", "load_model"} <= set(package.__all__)
    fcn = convolutionalize(torch.load(files / "tiny.pt", weights_only=False), INPUT_SIZE)
    path = save(fcn, tmp_path / "m.pt2")
    loaded = load_model(str(path))
    x = torch.rand(1, 1, 20, 24)
    torch.testing.assert_close(loaded(x), fcn(x))


def test_dense_map_lazy_returns_a_dask_array_with_a_client(files: Path) -> None:
    dask_array = pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")
    from convolutionalize import dense_map

    fcn = convolutionalize(torch.load(files / "tiny.pt", weights_only=False), INPUT_SIZE)
    pixels = np.load(files / "page.npy")
    eager = dense_map(fcn, pixels)
    image = dask_array.from_array(pixels, chunks=(1, 20, 24))
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1,
                            dashboard_address=None) as client:
        lazy = dense_map(fcn, image, scheduler=client, lazy=True)
        assert isinstance(lazy, dask_array.Array)  # nothing computed yet
        np.testing.assert_array_equal(client.compute(lazy).result(), eager)
        assert isinstance(dense_map(fcn, image, scheduler=client), np.ndarray)  # computed, as before
    assert isinstance(dense_map(fcn, pixels, lazy=True), dask_array.Array)  # any input
    with pytest.raises(ValueError, match="lazy=True returns a dask array"):
        dense_map(fcn, image, lazy=True, out="x.zarr")


def test_detect_and_heatmap_take_tensors_that_require_grad(files: Path) -> None:
    from convolutionalize.detect import detect
    from convolutionalize.render import heatmap

    fcn = convolutionalize(torch.load(files / "tiny.pt", weights_only=False), INPUT_SIZE)
    probabilities = torch.softmax(fcn(torch.rand(1, 1, 20, 24)), 1)[0]  # no torch.no_grad, as in a quickstart
    assert probabilities.requires_grad
    assert detect(probabilities, fcn.geometry, threshold=0.01)
    assert heatmap(np.zeros((20, 24)), probabilities, fcn.geometry).size[1] == 20


# --------------------------------------------------------------------------- progress


def test_status_lines_only_with_progress(files: Path, capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    code, _, err = run(tiny(files, "predict", "page.npy", "-o", str(tmp_path / "a.npy")), capsys)
    assert (code, err) == (0, "")  # a pipe (captured stderr): nothing
    code, _, err = run(tiny(files, "predict", "page.npy", "-o", str(tmp_path / "b.npy"), "--progress"),
                       capsys)
    assert code == 0
    lines = err.splitlines()
    for step in ("loading", "converting the model", "planning the tiles"):
        assert any(line.startswith(f"convolutionalize: {step}") for line in lines), err
    assert "dense map" in err  # the progress bar over tiles


def test_dense_map_without_input_size_raises_one_error_not_a_chain(files: Path) -> None:
    from convolutionalize import dense_map

    model = torch.load(files / "tiny.pt", weights_only=False)  # carries no input size
    with pytest.raises(ValueError, match="input_size is required") as raised:
        dense_map(model, torch.rand(1, 20, 24))
    assert raised.value.__context__ is None  # no "During handling of the above exception" TypeError
