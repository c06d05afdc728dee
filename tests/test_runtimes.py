"""``dense_map(runtime=...)``: OpenVINO and onnxruntime behind the dense runner.

Every runtime offered gives tiled maps equal to its whole-image map and whole-image maps equal
to torch fp32 within its precision's tolerance; ``"auto"`` is a function of its measurements;
a missing runtime runs in torch and says so once; streamed columns run in torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from convolutionalize import convolutionalize, dense_map, save
from convolutionalize.cli import main
from convolutionalize.inference import runtimes
from convolutionalize.inference._runner import runner_for
from convolutionalize.inference.runtimes import EngineRunner, choose, runner_on

# bf16: 8 bits of mantissa over a few layers; fp32: other summation orders (relative 1e-5 is the norm)
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}
PATHS = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"),
         ("openvino", "bf16")]


def _offered(runtime: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not runtimes.available(runtime),
                              reason=f"{runtime} is not importable here (pip install "
                                     f"'convolutionalize[{runtimes._EXTRAS.get(runtime, runtime)}]')")


PARAMS = [pytest.param(r, p, id=f"{r}-{p}", marks=_offered(r)) for r, p in PATHS]


@pytest.fixture(scope="module")
def fcn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return convolutionalize(model, (32, 32))


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(3, 100, 124, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def fresh_log() -> None:
    runtimes._SAID.clear()  # "said once" is per process: each test sees its own lines


def _rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize(("runtime", "precision"), PARAMS)
def test_tiled_equals_whole_on_every_runtime(fcn: nn.Module, image: torch.Tensor, runtime: str,
                                            precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVOLUTIONALIZE_STREAMS", "0")  # tiles one by one: each runs on the runtime
    whole = dense_map(fcn, image, runtime=runtime, precision=precision)
    tiled = dense_map(fcn, image, runtime=runtime, precision=precision, tile=32)
    np.testing.assert_array_equal(tiled, whole)


@pytest.mark.parametrize(("runtime", "precision"), PARAMS)
def test_whole_equals_torch_fp32_within_the_precision(fcn: nn.Module, image: torch.Tensor, runtime: str,
                                                     precision: str) -> None:
    mapped = dense_map(fcn, image, runtime=runtime, precision=precision)
    assert _rel(mapped, dense_map(fcn, image)) <= TOLERANCE[precision]


@pytest.mark.parametrize(("runtime", "precision"), [p for p in PARAMS if p.values[0] != "torch"])
def test_the_runtime_runs_the_tiles(fcn: nn.Module, runtime: str, precision: str) -> None:
    runner = runner_on(runtime, runner_for(fcn, precision, torch.device("cpu")), fcn, (1, 3, 64, 64))
    assert isinstance(runner, EngineRunner) and runner.runtime == runtime


@pytest.mark.parametrize(("seconds", "chosen"), [
    ({"torch": 1.0, "openvino": 0.5, "onnxruntime": 0.7}, "openvino"),
    ({"torch": 1.0, "openvino": 0.95}, "torch"),  # within the margin: torch stays
    ({"torch": 0.4, "openvino": 0.5, "onnxruntime": 0.7}, "torch"),
    ({"torch": 1.0, "openvino": 0.5, "onnxruntime": 0.5}, "onnxruntime"),  # a tie: by name
    ({"torch": 1.0}, "torch"),
])
def test_auto_is_a_function_of_its_measurements(seconds: dict[str, float], chosen: str) -> None:
    assert choose(seconds) == chosen
    assert choose(dict(reversed(list(seconds.items())))) == chosen  # not of their order


@pytest.mark.skipif(not runtimes.available("openvino"), reason="openvino is not importable here")
@pytest.mark.parametrize(("measured", "expected"), [({"torch": 1.0, "openvino": 0.2, "onnxruntime": 0.6},
                                                     "openvino"),
                                                    ({"torch": 0.1, "openvino": 0.2, "onnxruntime": 0.6},
                                                     "torch")])
def test_auto_follows_injected_measurements(fcn: nn.Module, measured: dict[str, float],
                                            expected: str) -> None:
    tile_runner = runner_for(fcn, "fp32", torch.device("cpu"))
    tile_runner.__dict__.pop("_auto", None)  # no earlier choice
    runner = runner_on("auto", tile_runner, fcn, (1, 3, 40, 40), measure=lambda name, _run: measured[name])
    assert getattr(runner, "runtime", "torch") == expected
    tile_runner.__dict__.pop("_auto", None)


def test_a_missing_runtime_falls_back_with_one_log_line(fcn: nn.Module, image: torch.Tensor,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(runtimes, "available", lambda name: name == "torch")
    with caplog.at_level(logging.INFO, logger="convolutionalize.inference.runtimes"):
        first = dense_map(fcn, image, runtime="openvino")
        second = dense_map(fcn, image, runtime="openvino", tile=48)
    lines = [r.getMessage() for r in caplog.records if "not installed" in r.getMessage()]
    assert lines == ["runtime 'openvino' is not installed (pip install 'convolutionalize[openvino]'); "
                     "running in torch"]
    np.testing.assert_array_equal(first, dense_map(fcn, image))
    np.testing.assert_array_equal(second, first)


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime", "auto"])
def test_streamed_columns_run_in_torch(fcn: nn.Module, image: torch.Tensor, runtime: str,
                                       monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("convolutionalize.inference.dense.stream_workers", lambda: 1)
    with caplog.at_level(logging.INFO, logger="convolutionalize"):
        streamed = dense_map(fcn, image, runtime=runtime, tile=32)
    said = [r.getMessage() for r in caplog.records if "does not apply" in r.getMessage()]
    if not any("streaming" in r.getMessage() for r in caplog.records):
        pytest.skip("this body is not streamed here")
    assert said == [f"runtime={runtime!r} does not apply here: streamed columns run in torch"]
    np.testing.assert_allclose(streamed, dense_map(fcn, image), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("runtime", "precision"), [PARAMS[0], PARAMS[-1]])
def test_the_store_states_runtime_and_precision(fcn: nn.Module, image: torch.Tensor, runtime: str,
                                                precision: str, tmp_path: pytest.TempPathFactory) -> None:
    zarr = pytest.importorskip("zarr")
    out = tmp_path / "map.zarr"  # type: ignore[operator]
    dense_map(fcn, image, runtime=runtime, precision=precision, out=out)
    key = json.loads(zarr.open_group(str(out), mode="r").attrs["convolutionalize.key"])
    assert (key["runtime"], key["precision"]) == (runtime, precision)


def test_an_unknown_runtime_is_refused(fcn: nn.Module, image: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="runtime must be one of 'torch', 'openvino', 'onnxruntime', "
                                         "'auto', got 'tvm'"):
        dense_map(fcn, image, runtime="tvm")  # type: ignore[arg-type]


@pytest.mark.skipif(not runtimes.available("openvino"), reason="openvino is not importable here")
def test_each_tile_shape_exported_on_its_own_where_the_free_export_does_not_hold(
        fcn: nn.Module, image: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVOLUTIONALIZE_STREAMS", "0")
    monkeypatch.setattr(runtimes.Export, "_holds", lambda self, runtime: False)
    tile_runner = runner_for(fcn, "fp32", torch.device("cpu"))
    held = tile_runner.__dict__.pop("_engines", None)  # a fresh export, checked with the patch
    try:
        whole = dense_map(fcn, image, runtime="openvino")
        tiled = dense_map(fcn, image, runtime="openvino", tile=32)
    finally:
        tile_runner.__dict__.pop("_engines", None)
        if held is not None:
            tile_runner.__dict__["_engines"] = held
    np.testing.assert_array_equal(tiled, whole)
    assert _rel(whole, dense_map(fcn, image)) <= TOLERANCE["fp32"]


@pytest.mark.skipif(not runtimes.available("openvino"), reason="openvino is not importable here")
def test_predict_runs_on_the_runtime_asked_for(fcn: nn.Module, image: torch.Tensor, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    model, pixels = save(fcn, tmp_path / "fcn.pt2"), tmp_path / "image.npy"
    np.save(pixels, image.numpy())
    for runtime in ("torch", "openvino"):
        assert main(["predict", str(model), str(pixels), "-o", str(tmp_path / f"{runtime}.npy"),
                     "--runtime", runtime, "--precision", "bf16", "--no-progress"]) == 0
    torch_map, openvino_map = (np.load(tmp_path / f"{r}.npy") for r in ("torch", "openvino"))
    assert _rel(openvino_map, torch_map) <= TOLERANCE["bf16"]
    assert not np.array_equal(openvino_map, torch_map)  # another runtime's rounding: it ran there


@pytest.mark.parametrize(("runtime", "precision"), [p for p in PARAMS if p.values[0] != "torch"])
def test_dask_tiles_equal_the_whole_map_on_the_runtime(fcn: nn.Module, image: torch.Tensor, runtime: str,
                                                       precision: str) -> None:
    pytest.importorskip("dask")
    whole = dense_map(fcn, image, runtime=runtime, precision=precision)
    tiled = dense_map(fcn, image, runtime=runtime, precision=precision, tile=32, scheduler="threads")
    np.testing.assert_array_equal(tiled, whole)


@pytest.mark.parametrize("large", [False, True], ids=["small-pass-torch", "large-pass-auto"])
def test_the_default_runtime_is_auto_for_large_passes_only(
        fcn: nn.Module, image: torch.Tensor, large: bool, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from convolutionalize.inference import dense

    asked: list[str] = []
    real = dense.runner_on
    monkeypatch.setattr(dense, "runner_on", lambda runtime, *a, **k: asked.append(runtime) or real(
        runtime, *a, **k))
    monkeypatch.setattr(dense, "AUTO_PIXELS", 100 * 124 if large else 100 * 124 + 10**6)
    with caplog.at_level(logging.INFO, logger="convolutionalize"):
        mapped = dense_map(fcn, image)  # runtime left out
    assert asked == (["auto"] if large else [])
    assert ("runtime='auto'" in caplog.text) == large
    assert _rel(mapped, dense_map(fcn, image, runtime="torch")) <= TOLERANCE["fp32"]
