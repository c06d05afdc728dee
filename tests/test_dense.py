"""dense_map: exact tiling, image inputs, options, precision, zarr output and resuming, fallback.

The reference for every tiled map is the converted network run once on the whole image;
float32 tiles must match it to relative 1e-5 (the norm here: only the summation order of
convolutions over differently sized inputs differs), borders included.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from convolutionalize import NotConvolutionalizable, convolutionalize, dense_map
from convolutionalize.cli import main
from convolutionalize.inference import TilingWarning, _runner
from convolutionalize.inference import dense as dense_module
from convolutionalize.inference._runner import TileRunner
from convolutionalize.inference.images import IMAGENET_MEAN, IMAGENET_STD
from convolutionalize.inference.store import ZarrSink
from convolutionalize.inference.tiling import Tile, plan_tiles
from convolutionalize.inference.windows import FallbackWarning

from _tiny import TinyNet
from conftest import RecordingArray, fingerprint, rel

RTOL = 1e-5


class PaddedNet(nn.Module):
    """Zero padding everywhere, a ceil-mode pool and a GAP head: borders are where tiling breaks."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 5, padding=2),
        )
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class SqueezeExcite(PaddedNet):
    """PaddedNet with a squeeze-excitation gate: global context, no finite receptive field."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        f = f * torch.sigmoid(f.mean((2, 3), keepdim=True))
        return self.fc(f.mean((2, 3)))


class TinyViT(nn.Module):
    """Patch embedding, a class token, position embeddings and attention: not convertible."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, 16) * 0.02)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1) + self.pos
        return self.head(self.encoder(tokens)[:, 0])


def whole(fcn: nn.Module, image: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return fcn(image[None])[0].numpy()


@pytest.fixture(scope="module")
def padded() -> nn.Module:
    torch.manual_seed(0)
    return convolutionalize(PaddedNet().eval(), (32, 32))


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(3, 101, 131, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(2).integers(0, 256, (70, 90, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- exact tiling


@pytest.mark.parametrize("tile", [12, 36, 10_000])
def test_tiled_map_equals_whole_image_map_with_padding(padded: nn.Module, image: torch.Tensor,
                                                       tile: int) -> None:
    got = dense_map(padded, image, tile=tile)
    assert got.shape == padded.output_size(101, 131)
    assert rel(got, whole(padded, image)) <= RTOL


@given(kernel=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2, 3]), ceil=st.booleans(),
       dilation=st.sampled_from([1, 2]), window=st.integers(12, 20), tile=st.integers(1, 24),
       height=st.integers(20, 47), width=st.integers(20, 47), head=st.sampled_from(["gap", "flatten"]))
@settings(max_examples=8)
def test_tiling_is_exact_for_random_architectures(kernel: int, stride: int, ceil: bool, dilation: int,
                                                  window: int, tile: int, height: int, width: int,
                                                  head: str) -> None:
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(2, 4, kernel, stride=stride, padding=kernel // 2, dilation=dilation), nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=ceil), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
    )
    with torch.no_grad():
        features = body(torch.zeros(1, 2, window, window)).shape
    if head == "gap":
        model = nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    else:
        model = nn.Sequential(body, nn.Flatten(), nn.Linear(features.numel(), 3))
    fcn = convolutionalize(model.eval(), (window, window))
    image = torch.randn(2, height, width, generator=torch.Generator().manual_seed(tile))
    assert rel(dense_map(fcn, image, tile=tile), whole(fcn, image)) <= RTOL


def test_tiles_are_stride_aligned_and_smaller_than_the_image(padded: nn.Module) -> None:
    grid = plan_tiles(padded.geometry, (101, 131), (19, 26), 12)
    assert len(grid.tiles) > 1
    assert all(t.read[0] % 4 == 0 and t.read[2] % 4 == 0 for t in grid.tiles)
    assert any(t.read[0] > 0 for t in grid.tiles) and any(t.read[1] < 101 for t in grid.tiles)


@pytest.mark.parametrize("tile", [2, 6])
def test_tiling_is_exact_for_a_padding_free_model(tile: int) -> None:
    torch.manual_seed(0)
    fcn = convolutionalize(TinyNet().eval(), (12, 12))
    image = torch.randn(1, 29, 25)
    got = dense_map(fcn, image, tile=tile)
    assert fcn.geometry.crop_equivalent
    assert rel(got, whole(fcn, image)) <= RTOL


def test_tiling_is_exact_with_pool_none(image: torch.Tensor) -> None:
    torch.manual_seed(0)
    fcn = convolutionalize(PaddedNet().eval(), (32, 32), pool="none")
    assert rel(dense_map(fcn, image, tile=16), whole(fcn, image)) <= RTOL


@pytest.mark.parametrize(("name", "size", "tile"), [("squeezenet1_1", (400, 500), 128),
                                                    ("resnet18", (256, 1024), 512)])
def test_tiling_is_exact_for_torchvision_models(name: str, size: tuple[int, int], tile: int) -> None:
    torch.manual_seed(0)
    fcn = convolutionalize(getattr(torchvision.models, name)().eval(), (224, 224))
    image = torch.randn(3, *size, generator=torch.Generator().manual_seed(3))
    grid = plan_tiles(fcn.geometry, size, fcn.output_size(*size)[1:], tile)
    assert len(grid.tiles) > 1 and any(t.shape != size for t in grid.tiles)  # some tiles see edges
    assert rel(dense_map(fcn, image, tile=tile), whole(fcn, image)) <= RTOL


def test_global_context_warns_once_when_tiling(image: torch.Tensor) -> None:
    torch.manual_seed(0)
    fcn = convolutionalize(SqueezeExcite().eval(), (32, 32))
    assert fcn.geometry.receptive_field is None
    with pytest.warns(TilingWarning, match="global context") as record:
        dense_map(fcn, image, tile=36)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel(dense_map(fcn, image), whole(fcn, image)) <= RTOL  # one pass: exact, no warning


def test_automatic_tiles_follow_the_memory_budget(padded: nn.Module, image: torch.Tensor, tile_mode: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    tiles, pushes = TileRunner.__call__, _runner.Column.push
    monkeypatch.setattr(TileRunner, "__call__", lambda self, b: calls.append(len(b)) or tiles(self, b))
    monkeypatch.setattr(_runner.Column, "push",
                        lambda self, b, last=False: calls.append(1) or pushes(self, b, last))
    monkeypatch.setattr(dense_module, "MEMORY_BUDGET", 200_000)
    monkeypatch.setattr(dense_module, "TILE_BUDGET", 100_000)
    monkeypatch.setattr(dense_module, "PIECE_BYTES", 40_000)
    assert rel(dense_map(padded, image), whole(padded, image)) <= RTOL
    assert len(calls) > 1


def test_batched_tiles_give_the_same_map(padded: nn.Module, image: torch.Tensor) -> None:
    one = dense_map(padded, image, tile=12)
    np.testing.assert_allclose(dense_map(padded, image, tile=12, batch_size=5), one, rtol=0, atol=1e-5)


def test_progress_bar_over_tiles(padded: nn.Module, image: torch.Tensor,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    dense_map(padded, image, tile=36, progress=True)
    assert "tile" in capsys.readouterr().err


def test_an_unconverted_model_is_converted_and_not_modified(image: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = PaddedNet().eval()
    before = repr(model)
    got = dense_map(model, image, input_size=32, tile=12)
    assert repr(model) == before
    assert rel(got, whole(convolutionalize(model, (32, 32)), image)) <= RTOL


def test_global_pool_is_one_cell(padded: nn.Module, image: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = PaddedNet().eval()
    got = dense_map(model, image, input_size=32, pool="global")
    with torch.no_grad():
        expected = model(image[None])[0].numpy()
    assert got.shape == (5, 1, 1)
    assert rel(got[:, 0, 0], expected) <= RTOL


# --------------------------------------------------------------------------- precision


def test_bf16_is_close_to_fp32(padded: nn.Module, image: torch.Tensor) -> None:
    fp32 = dense_map(padded, image, tile=36)
    bf16 = dense_map(padded, image, tile=36, precision="bf16")
    assert bf16.dtype == np.float32
    assert rel(bf16, fp32) <= 3e-2  # bfloat16 keeps 8 mantissa bits


def test_bf16_leaves_the_model_alone_and_reuses_its_prepared_copy(image: torch.Tensor) -> None:
    torch.manual_seed(0)
    fcn = convolutionalize(PaddedNet().eval(), (32, 32))
    before = fingerprint(fcn)
    first = dense_map(fcn, image, precision="bf16")
    assert fingerprint(fcn) == before
    assert _runner.runner_for(fcn, "bf16", torch.device("cpu")) is \
        _runner.runner_for(fcn, "bf16", torch.device("cpu"))
    with torch.no_grad():
        next(fcn.parameters()).mul_(2)
    assert not np.array_equal(dense_map(fcn, image, precision="bf16"), first)  # new weights, new copy


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).amax((2, 3)))


def test_fp32_runner_folds_batch_norms_and_keeps_the_values(image: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = BatchNormNet()
    for bn in (model.body[1], model.body[4]):  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    fcn = convolutionalize(model.eval(), (16, 16))
    runner = _runner.runner_for(fcn, "fp32", torch.device("cpu"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in runner.model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in fcn.modules())  # the caller's copy keeps them
    assert rel(dense_map(fcn, image, tile=24), whole(fcn, image)) < RTOL


def test_repeated_maps_reuse_the_shapes(padded: nn.Module, image: torch.Tensor,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    original = _runner.TorchModel.infer_shapes
    monkeypatch.setattr(_runner.TorchModel, "infer_shapes",
                        lambda self, size: calls.append(size) or original(self, size))
    first = dense_map(padded, image)
    assert np.array_equal(dense_map(padded, image), first)
    assert len(calls) == len(set(calls))  # each size inferred once (image size, native size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none on this machine")
def test_cuda_device_gives_the_cpu_map(padded: nn.Module, image: torch.Tensor) -> None:
    # cuDNN may use TF32 for float32 convolutions (10-bit mantissa): compare loosely
    assert rel(dense_map(padded, image, tile=12, device="cuda"), whole(padded, image)) <= 1e-2


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"tile": 0}, "tile must be a positive number of input pixels, got 0"),
    ({"tile": -3}, "tile must be a positive number of input pixels, got -3"),
    ({"tile": 1.5}, "tile must be a positive number"),
    ({"precision": "fp8"}, "precision must be one of 'fp32', 'bf16', got 'fp8'"),
    ({"batch_size": 0}, "batch_size must be a positive int"),
    ({"pool": "mean"}, "pool must be one of"),
    ({"fallback": "crops"}, "fallback must be 'error' or 'windows'"),
    ({"stride": 0}, "stride must be a positive int"),
    ({"stride": 8}, "differs from the converted network's stride"),
    ({"pool": "global", "tile": 64}, "cannot be tiled"),
    ({"mean": (0.5, 0.5)}, "mean has 2 values but the model takes 3 channels"),
])
def test_bad_options_name_the_value_and_the_fix(pixels: np.ndarray, kwargs: dict, match: str) -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=match):
        dense_map(PaddedNet().eval(), pixels, input_size=32, **kwargs)


def test_image_smaller_than_the_window_is_refused() -> None:
    model = torchvision.models.squeezenet1_1().eval()
    with pytest.raises(ValueError, match=r'^input 100x100 is smaller than the 224x224 window; pass a '
                                         r'larger image or pool="global"$'):
        dense_map(model, np.zeros((100, 100, 3), np.uint8), input_size=224)


@pytest.mark.parametrize(("image", "error", "match"), [
    (np.zeros((40, 40, 1), np.uint8), ValueError, "takes 3 channels"),
    (np.zeros((2, 40, 40, 3), np.uint8), ValueError, "must be"),
    ("missing.png", ValueError, "does not exist"),
    (object(), TypeError, "image must be a path"),
])
def test_bad_images_are_refused(padded: nn.Module, image: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        dense_map(padded, image)


# --------------------------------------------------------------------------- image inputs


def normalized(pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.mark.parametrize("kind", ["numpy", "pil", "png", "npy", "tiff", "zarr", "zarr-path", "dask",
                                  "float-array"])
def test_every_image_kind_gives_the_same_map(padded: nn.Module, pixels: np.ndarray, kind: str,
                                             tmp_path: Path) -> None:
    expected = whole(padded, normalized(pixels))
    if kind == "pil":
        image: object = Image.fromarray(pixels)
    elif kind == "png":
        image = tmp_path / "a.png"
        Image.fromarray(pixels).save(image)
    elif kind == "npy":
        image = tmp_path / "a.npy"
        np.save(image, pixels)
    elif kind == "tiff":
        import tifffile

        image = tmp_path / "a.tif"
        tifffile.imwrite(image, pixels, tile=(32, 32))
    elif kind in ("zarr", "zarr-path"):
        array = zarr.create_array(tmp_path / "a.zarr", shape=pixels.shape, chunks=(32, 32, 3), dtype="uint8")
        array[:] = pixels
        image = array if kind == "zarr" else tmp_path / "a.zarr"
    elif kind == "dask":
        import dask.array as da

        image = da.from_array(pixels, chunks=(32, 32, 3))
    elif kind == "float-array":
        image = normalized(pixels).numpy()
    else:
        image = pixels
    got = dense_map(padded, image, tile=12)
    got = got.compute() if kind == "dask" else got
    assert rel(np.asarray(got), expected) <= RTOL


def test_lazy_inputs_are_read_tile_by_tile(padded: nn.Module, pixels: np.ndarray) -> None:
    lazy = RecordingArray(pixels)
    got = dense_map(padded, lazy, tile=12)
    assert len(lazy.reads) > 1 and all(h * w < 70 * 90 for h, w in lazy.reads)
    assert rel(got, whole(padded, normalized(pixels))) <= RTOL


def test_mean_and_std_are_applied(padded: nn.Module, pixels: np.ndarray) -> None:
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    got = dense_map(padded, pixels, mean=(0.5,), std=(0.25,))
    assert rel(got, whole(padded, (x - 0.5) / 0.25)) <= RTOL


# --------------------------------------------------------------------------- zarr output, resuming


def test_zarr_output_is_chunked_by_tile(padded: nn.Module, image: torch.Tensor, tmp_path: Path) -> None:
    out = dense_map(padded, image, tile=12, out=tmp_path / "map.zarr")
    assert out.chunks == (5, 3, 3)
    assert rel(out[:], whole(padded, image)) <= RTOL


class Interrupt(RuntimeError):
    pass


@pytest.mark.parametrize("scheduler", [None, "synchronous"])
def test_an_interrupted_run_resumes_and_gives_the_identical_map(
        padded: nn.Module, image: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        scheduler: str | None, tile_mode: str) -> None:
    """Stopped after five tiles (of a column's stream, or one by one), a restart computes the
    others only (streams start again at the first tile not done, its halo read again)."""
    reference = dense_map(padded, image, tile=12)
    original = ZarrSink.write
    writes: list[tuple[int, int]] = []

    def stop_after_five(self: ZarrSink, tile: Tile, cells: np.ndarray) -> None:
        if len(writes) == 5:
            raise Interrupt("stopped")
        writes.append(tile.index)
        original(self, tile, cells)

    with monkeypatch.context() as patch:
        patch.setattr(ZarrSink, "write", stop_after_five)
        with pytest.raises(Interrupt):
            dense_map(padded, image, tile=12, out=tmp_path / "map.zarr")
    first = list(writes)
    writes.clear()
    monkeypatch.setattr(ZarrSink, "write", lambda self, t, c: writes.append(t.index) or original(self, t, c))
    out = dense_map(padded, image, tile=12, out=tmp_path / "map.zarr", scheduler=scheduler)
    total = len(plan_tiles(padded.geometry, (101, 131), (19, 26), 12).tiles)
    assert len(writes) == total - 5 and not set(writes) & set(first)
    assert rel(out[:], reference) <= RTOL


def test_resuming_with_other_arguments_is_refused(padded: nn.Module, image: torch.Tensor,
                                                  tmp_path: Path) -> None:
    dense_map(padded, image, tile=12, out=tmp_path / "map.zarr")
    with pytest.raises(ValueError, match="different arguments"):
        dense_map(padded, image, tile=16, out=tmp_path / "map.zarr")


# --------------------------------------------------------------------------- fallback


def crop_scores(model: nn.Module, image: torch.Tensor, window: int, stride: int) -> np.ndarray:
    rows = (image.shape[1] - window) // stride + 1
    cols = (image.shape[2] - window) // stride + 1
    crops = torch.stack([image[:, i * stride:i * stride + window, j * stride:j * stride + window]
                         for i in range(rows) for j in range(cols)])
    with torch.no_grad():
        return model(crops).reshape(rows, cols, -1).permute(2, 0, 1).numpy()


def test_windows_fallback_scores_every_crop() -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    image = torch.randn(3, 40, 52)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = dense_map(model, image, input_size=16, fallback="windows", stride=8, tile=16, batch_size=2)
    kinds = [w.category for w in caught]
    assert FallbackWarning in kinds and re.search(r"crop by crop .* about 4x the work",
                                                  str(caught[kinds.index(FallbackWarning)].message))
    assert TilingWarning not in kinds  # each cell sees only its window: tiles are exact
    assert rel(got, crop_scores(model, image, 16, 8)) <= RTOL


def test_unconvertible_model_without_fallback_raises() -> None:
    with pytest.raises(NotConvolutionalizable):
        dense_map(TinyViT().eval(), torch.randn(3, 40, 40), input_size=16)


# --------------------------------------------------------------------------- command line


@pytest.fixture()
def cli_files(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(TinyNet().eval(), tmp_path / "tiny.pt")
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (40, 52), dtype=np.uint8)).save(tmp_path / "page.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    return tmp_path


def predict(files: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["predict", str(files / "tiny.pt"), "--trust-pickle", "--input-size", "12", "12",
                     *args])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_predict_writes_the_dense_map(cli_files: Path, suffix: str) -> None:
    output = cli_files / f"map{suffix}"
    code, out, _ = predict(cli_files, str(cli_files / "page.png"), "-o", str(output), "--tile", "6",
                           "--no-progress")
    assert code == 0 and f"wrote {output}" in out
    got = np.load(output) if suffix == ".npy" else zarr.open_group(output)["map"][:]
    expected = dense_map(torch.load(cli_files / "tiny.pt", weights_only=False), cli_files / "page.png",
                         input_size=12)
    assert rel(got, expected) <= RTOL
    assert not list(cli_files.glob("*partial*")) and not list(cli_files.glob(".map*"))


@pytest.mark.parametrize(("image", "options", "match"), [
    ("missing.png", [], "image .*missing.png does not exist"),
    ("broken.png", [], "cannot read image"),
    ("small.png", [], "input 8x8 is smaller than the 12x12 window"),
    ("page.png", ["--tile", "0"], "'0' must be a positive integer"),
    ("page.png", ["--precision", "fp8"], "invalid choice: 'fp8'"),
    ("page.png", ["--mean", "0.1", "0.2"], "mean has 2 values"),
])
@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_predict_bad_input_is_one_line_exit_2_and_no_output(cli_files: Path, image: str, options: list[str],
                                                            match: str, suffix: str) -> None:
    before = set(cli_files.iterdir())
    code, out, err = predict(cli_files, str(cli_files / image), "-o", str(cli_files / f"map{suffix}"),
                             *options)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("convolutionalize: error: ")
    assert re.search(match, err)
    assert set(cli_files.iterdir()) == before


def test_small_tiles_say_how_much_their_halos_cost(padded: nn.Module, image: torch.Tensor,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="convolutionalize"):
        dense_map(padded, image, tile=64)  # few tiles, little overlap
    assert not caplog.records
    with caplog.at_level("WARNING", logger="convolutionalize"):
        dense_map(padded, image, tile=4)
    assert re.search(r"exact tiling reads \d+\.\dx the image's pixels", caplog.text)


def test_out_that_is_a_plain_file_is_a_value_error(padded: nn.Module, image: torch.Tensor,
                                                    tmp_path: Path) -> None:
    taken = tmp_path / "map.zarr"
    taken.write_text("not a store")
    with pytest.raises(ValueError, match="is not a dense-map zarr store"):
        dense_map(padded, image, tile=12, out=taken)
    assert taken.read_text() == "not a store"


class EvenSides(nn.Module):
    """DLA's shortcut: a strided convolution added to a 2x2 max pool, which only agree in size
    on even sides; after a 3x3 convolution, whose halo makes tiles' reads end on odd pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 3, 3, 1, 1), nn.Conv2d(3, 3, 3, 2, 1)
        self.pool = nn.MaxPool2d(2, 2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(self.conv(x) + self.pool(x))


def test_a_size_the_network_rejects_is_a_value_error_naming_one_it_takes() -> None:
    torch.manual_seed(0)
    fcn = convolutionalize(EvenSides().eval(), 16)
    assert dense_map(fcn, torch.randn(3, 40, 62)).shape[1:] == (13, 24)
    with pytest.raises(ValueError, match=r"does not run on a 41x63 input .*multiples of its stride 2x2, "
                                         r"e\.g\. 40x62"):
        dense_map(fcn, torch.randn(3, 41, 63))


@pytest.mark.parametrize("masked", [False, True])
def test_tiles_of_a_network_that_takes_even_sides_only_read_whole_strides(masked: bool) -> None:
    torch.manual_seed(0)
    fcn = convolutionalize(EvenSides().eval(), 16)
    image = np.random.default_rng(0).integers(0, 256, (40, 62, 3), dtype=np.uint8)
    mask = np.zeros((40, 62), bool)
    mask[6:19, 29:47] = True
    whole = dense_map(fcn, image, mask=mask if masked else None)
    lazy = RecordingArray(image)
    tiled = dense_map(fcn, lazy, tile=10, mask=mask if masked else None)
    assert len(lazy.reads) > 2 and all(h % 2 == 0 and w % 2 == 0 for h, w in lazy.reads)
    np.testing.assert_array_equal(tiled, whole)
