"""Columns of tiles streamed top to bottom (``inference._stream``): every layer carries the rows
its next rows need, so no vertical halo is computed twice; the maps equal the one pass."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import fx, nn

from convolutionalize import convolutionalize, dense_map
from convolutionalize.inference import _runner
from convolutionalize.inference import dense as dense_module
from convolutionalize.inference._runner import TileRunner
from convolutionalize.inference._stream import NotStreamable, _Rows, plan_stream
from convolutionalize.inference.store import ZarrSink
from convolutionalize.inference.tiling import Tile

from conftest import rel

CPU = torch.device("cpu")


def runner_of(model: nn.Module, size: int = 224, precision: str = "fp32") -> TileRunner:
    torch.manual_seed(0)
    return TileRunner(convolutionalize(model.eval(), size), precision, CPU)  # type: ignore[arg-type]


def streamed(runner: TileRunner, image: torch.Tensor, chunks: list[int], gather: int = 0) -> np.ndarray:
    """The map of ``image`` (``(C, H, W)``) pushed down one column in rows of ``chunks`` (then the rest)."""
    column, maps, start = runner.column(gather), [], 0
    for rows in chunks:
        maps.append(column.push(image[:, start:start + rows]))
        start += rows
    maps.append(column.push(image[:, start:], last=True))
    return np.concatenate([m for m in maps if m is not None], 1)


MODELS = {
    "shufflenet": lambda: torchvision.models.shufflenet_v2_x0_5(),  # channel shuffle, splits, concatenations
    "resnet": lambda: torchvision.models.resnet18(),  # residual adds fused into the convolutions
    "googlenet": lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False),  # ceil pools
    "densenet": lambda: torchvision.models.DenseNet(8, (2, 2, 2, 2), 16),  # average-pooled transitions
    "mobilenet": lambda: torchvision.models.mobilenet_v2(width_mult=0.5),  # ReLU6, residual adds without ReLU
    "squeezenet": lambda: torchvision.models.squeezenet1_1(),  # ceil-mode pools, no global pool
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_stream_in_odd_chunks_equals_the_one_pass(name: str) -> None:
    runner = runner_of(MODELS[name]())
    image = torch.randn(3, 517, 261, generator=torch.Generator().manual_seed(1))
    whole = runner(image[None])[0]
    for chunks, gather in (([1, 40, 3, 200], 0), ([64] * 5, 96), ([300], 8)):
        got = streamed(runner, image, chunks, gather)
        assert got.shape == whole.shape
        assert rel(got, whole) <= 1e-6, (chunks, gather)


def test_a_stream_in_bfloat16_is_as_close_as_the_one_pass() -> None:
    runner = runner_of(torchvision.models.resnet18(), precision="bf16")
    image = torch.randn(3, 400, 250, generator=torch.Generator().manual_seed(2))
    assert rel(streamed(runner, image, [70, 70, 70]), runner(image[None])[0]) <= 2e-2


class SameInput(nn.Module):
    """``relu(conv(x) + x)``: a fused residual that is the convolution's own input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.conv = nn.Conv2d(8, 8, 3, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.conv(x) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def test_a_residual_that_is_the_convolutions_input_streams_exactly() -> None:
    runner = runner_of(SameInput(), 32)
    image = torch.randn(3, 90, 50, generator=torch.Generator().manual_seed(3))
    assert rel(streamed(runner, image, [5, 9, 30]), runner(image[None])[0]) <= 1e-6


class Body(nn.Module):
    """A traced map body with one layer ``middle`` between two convolutions."""

    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.a, self.middle, self.b = nn.Conv2d(3, 4, 3, padding=1), middle, nn.Conv2d(4, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.middle(self.a(x)))


class Flip(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, [2])


class RowSoftmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.softmax(dim=2)  # a known op, over the rows: every row depends on all of them


class Squeeze(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.mean((2, 3), keepdim=True)


@pytest.mark.parametrize(("middle", "reason"), [
    (nn.AdaptiveAvgPool2d(5), "AdaptiveAvgPool2d"),  # an unknown layer
    (Flip(), "flip"),  # an op not known to work row by row
    (RowSoftmax(), "differs from the one pass"),  # known, but not row by row here: the check finds it
    (Squeeze(), "one axis of rows|rows"),  # global context
    (nn.AvgPool2d(3, 1, 1, count_include_pad=False), "divisor"),
])
def test_a_body_a_stream_cannot_reproduce_is_refused(middle: nn.Module, reason: str) -> None:
    with pytest.raises(NotStreamable, match=reason):
        plan_stream(fx.symbolic_trace(Body(middle).eval()), 3, (16, 16), 1)


def test_kept_rows_do_not_hold_the_whole_piece() -> None:
    rows = _Rows(-2)
    rows.add(torch.zeros(1, 8, 100, 64))
    rows.drop(98)
    (piece,) = rows.pieces
    assert (rows.start, rows.end) == (98, 100) and piece.shape[2] == 2
    assert piece.untyped_storage().nbytes() == 8 * 2 * 64 * 4  # a copy, not a view of 100 rows


@pytest.fixture
def small_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Budgets that tile a few-hundred-pixel image into streamed columns of several pushes."""
    monkeypatch.setattr(dense_module, "MEMORY_BUDGET", 1 << 20)
    monkeypatch.setattr(dense_module, "TILE_BUDGET", 1 << 20)
    monkeypatch.setattr(dense_module, "PIECE_BYTES", 6 << 20)
    monkeypatch.setattr(dense_module, "MIN_GATHER", 512)  # ShuffleNetV2: reads of 2000 pixels, owning 1300
    monkeypatch.setattr(dense_module, "MAP_TILE_BYTES", 1 << 20)


def test_dense_map_streams_columns_and_equals_the_whole_image(small_budgets: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    fcn = convolutionalize(torchvision.models.shufflenet_v2_x0_5().eval(), 224)
    image = np.random.default_rng(4).integers(0, 256, (700, 3000, 3), dtype=np.uint8)
    with monkeypatch.context() as patch:
        patch.setattr(dense_module, "MEMORY_BUDGET", 1 << 40)
        whole = dense_map(fcn, image)
    pushes: list[tuple[int, int]] = []
    original = _runner.Column.push
    monkeypatch.setattr(_runner.Column, "push", lambda self, b, last=False:
                        pushes.append(tuple(b.shape[1:])) or original(self, b, last))
    got = dense_map(fcn, image)
    assert rel(got, whole) <= 1e-6
    widths = {w for _, w in pushes}
    assert len(widths) > 1 and max(widths) < 2100  # several columns, each with its halo
    assert len(pushes) > 8 and max(h for h, _ in pushes) < 700


def test_streams_run_side_by_side_and_equal_one_at_a_time(small_budgets: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers: the caller's thread and one more, each on half of torch's threads; a lone
    column is cut in two down its rows of tiles; the map equals one stream at a time, and
    torch's thread count is given back."""
    torch.manual_seed(0)
    fcn = convolutionalize(torchvision.models.shufflenet_v2_x0_5().eval(), 224)
    image = np.random.default_rng(6).integers(0, 256, (1500, 300, 3), dtype=np.uint8)  # one column
    monkeypatch.setenv("CONVOLUTIONALIZE_STREAM_WORKERS", "1")
    one_at_a_time = dense_map(fcn, image)
    monkeypatch.setenv("CONVOLUTIONALIZE_STREAM_WORKERS", "2")
    pushes: list[tuple[str, int, int]] = []
    original = _runner.Column.push
    monkeypatch.setattr(_runner.Column, "push", lambda self, b, last=False: pushes.append(
        (threading.current_thread().name, torch.get_num_threads(), b.shape[2])) or original(self, b, last))
    threads = torch.get_num_threads()
    assert threads == 2  # conftest's
    got = dense_map(fcn, image)
    assert rel(got, one_at_a_time) <= 1e-6
    assert len({name for name, _, _ in pushes}) == 2 and {n for _, n, _ in pushes} == {1}
    assert {w for _, _, w in pushes} == {300}  # both halves of the one column
    assert torch.get_num_threads() == threads
    plan = dense_module.ColumnPlan(None, 40.0, 6.0, 32)  # type: ignore[arg-type]
    assert dense_module.replace(plan, workers=2).rows(1000)[1:] == plan.rows(2000)[1:]  # half the bytes each


def test_a_failing_stream_stops_the_others_and_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []

    def job(run: list, stop: threading.Event) -> None:
        if run == ["bad"]:
            raise OSError("disk full")
        assert stop.wait(30)  # a long stream, until the failure stops it
        ran.append(run[0])

    threads = torch.get_num_threads()
    with pytest.raises(OSError, match="disk full"):
        dense_module._side_by_side([["slow"], ["bad"], ["never"]], job, 2)  # type: ignore[list-item]
    assert ran == ["slow"] and torch.get_num_threads() == threads
    for bad in ("0", "two"):
        monkeypatch.setenv("CONVOLUTIONALIZE_STREAM_WORKERS", bad)
        with pytest.raises(ValueError, match="CONVOLUTIONALIZE_STREAM_WORKERS"):
            dense_module.stream_workers()


class Classifier(nn.Module):
    """A small classifier with ``Body``'s layers and a pooled linear head."""

    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.body, self.pool, self.fc = Body(middle), nn.AdaptiveAvgPool2d(1), nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


def test_a_body_that_does_not_stream_is_tiled_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    fcn = convolutionalize(Classifier(nn.AvgPool2d(3, 1, 1, count_include_pad=False)).eval(), 16)
    monkeypatch.setattr(_runner.Column, "push", lambda *_: pytest.fail("a column streamed"))
    image = torch.randn(3, 300, 300)
    assert rel(dense_map(fcn, image, tile=64), fcn(image[None]).detach().numpy()[0]) <= 1e-5


def test_streams_are_off_with_the_environment_switch(small_budgets: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    fcn = convolutionalize(torchvision.models.shufflenet_v2_x0_5().eval(), 224)
    image = np.random.default_rng(5).integers(0, 256, (500, 400, 3), dtype=np.uint8)
    streamed_map = dense_map(fcn, image)
    monkeypatch.setenv("CONVOLUTIONALIZE_STREAMS", "0")
    monkeypatch.setattr(_runner.Column, "push", lambda *_: pytest.fail("a column streamed"))
    assert rel(dense_map(fcn, image), streamed_map) <= 1e-6


def test_a_masked_map_merges_neighbouring_columns_and_equals_the_whole_image(
        small_budgets: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    torch.manual_seed(0)
    fcn = convolutionalize(torchvision.models.shufflenet_v2_x0_5().eval(), 224)
    image = np.random.default_rng(5).integers(0, 256, (900, 3000, 3), dtype=np.uint8)
    mask = np.zeros((900, 3000), bool)
    mask[100:700, 300:2400] = True  # a wide blob: runs in many columns, merged
    mask[800:, 2800:] = True  # and a corner apart
    with monkeypatch.context() as patch:
        patch.setattr(dense_module, "MEMORY_BUDGET", 1 << 40)
        whole = dense_map(fcn, image)
    monkeypatch.setattr(dense_module, "MASK_BAND_BYTES", 1 << 20)  # several rows of tiles
    monkeypatch.setattr(dense_module, "MASK_COST", 0.0)  # the mask's own streams, however little they save
    runs: list[list] = []
    original = dense_module._stream_run
    monkeypatch.setattr(dense_module, "_stream_run", lambda run, *a: runs.append(run) or original(run, *a))
    got = dense_map(fcn, image, mask=mask)
    computed = ~np.isnan(got).all(axis=0)
    assert 0.2 < computed.mean() < 0.9
    assert rel(got[:, computed], whole[:, computed]) <= 1e-6
    columns = [{w.tile.index[1] for w in run} for run in runs]
    rows = [{w.tile.index[0] for w in run} for run in runs]
    assert len(runs) >= 2 and max(len(c) for c in columns) > 1  # merged across columns
    assert max(len(r) for r, c in zip(rows, columns) if len(c) > 1) > 1  # and down rows of tiles
    owned = [w.tile.index for run in runs for w in run]
    assert len(owned) == len(set(owned))  # each tile in one stream

    written: list[Tile] = []  # stopped after five tiles, then resumed: done tiles inside a stream stay
    write = ZarrSink.write

    def stop_after_five(self: ZarrSink, tile: Tile, cells: np.ndarray) -> None:
        if len(written) == 5:
            raise KeyboardInterrupt
        written.append(tile)
        write(self, tile, cells)

    with monkeypatch.context() as patch:
        patch.setattr(ZarrSink, "write", stop_after_five)
        with pytest.raises(KeyboardInterrupt):
            dense_map(fcn, image, mask=mask, out=tmp_path / "map.zarr")
    first = list(written)
    monkeypatch.setattr(ZarrSink, "write", lambda self, t, c: written.append(t) or write(self, t, c))
    resumed = dense_map(fcn, image, mask=mask, out=tmp_path / "map.zarr")
    assert len(written) == len(owned) and not set(first) & set(written[5:])
    np.testing.assert_array_equal(resumed[:], got)


def test_a_mask_that_saves_little_streams_the_unmasked_columns(
        small_budgets: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Where the masked streams would read nearly what the unmasked ones do, the unmasked
    columns stream (cells without foreground still NaN); a mask that saves much keeps its own
    (the merging test above)."""
    torch.manual_seed(0)
    fcn = convolutionalize(torchvision.models.shufflenet_v2_x0_5().eval(), 224)
    image = np.random.default_rng(7).integers(0, 256, (700, 3000, 3), dtype=np.uint8)
    mask = np.ones((700, 3000), bool)
    mask[:, :600] = False
    with monkeypatch.context() as patch:
        patch.setattr(dense_module, "MEMORY_BUDGET", 1 << 40)
        whole = dense_map(fcn, image)
    widths: set[int] = set()
    original = _runner.Column.push
    monkeypatch.setattr(_runner.Column, "push", lambda self, b, last=False:
                        widths.add(b.shape[2]) or original(self, b, last))
    dense_map(fcn, image)
    plain_widths, widths = widths, set()
    with caplog.at_level(logging.INFO, logger="convolutionalize.inference.dense"):
        got = dense_map(fcn, image, mask=mask)
    assert "the unmasked streams read little more" in caplog.text
    assert widths <= plain_widths  # the unmasked map's columns, cut to the foreground's works
    computed = ~np.isnan(got).all(axis=0)
    assert 0.8 < computed.mean() < 1.0  # the cells left of the foreground are NaN
    assert rel(got[:, computed], whole[:, computed]) <= 1e-6


def test_a_streams_reads_after_its_first_start_on_whole_chunks() -> None:
    """So that each of a slide's JPEG tiles (a zarr chunk) is decoded once per stream."""
    assert dense_module._read_spans(700, 3000, 1000, 512) == [(700, 1024), (1024, 2048), (2048, 3000)]
    assert dense_module._read_spans(0, 2500, 1024, 1) == [(0, 1024), (1024, 2048), (2048, 2500)]
    assert dense_module._read_spans(10, 20, 1024, 1) == [(10, 20)]
    import zarr

    from convolutionalize.inference.images import open_image
    from convolutionalize.inference.resize import resized

    chunked = zarr.create_array(zarr.storage.MemoryStore(), shape=(300, 200, 3), chunks=(64, 50, 3),
                                dtype="uint8")
    assert open_image(chunked, 3, None, None).chunk_rows == 64
    assert resized(open_image(chunked, 3, None, None), (150, 100)).chunk_rows == 1  # rows not the array's
    assert open_image(np.zeros((300, 200, 3), np.uint8), 3, None, None).chunk_rows == 1
