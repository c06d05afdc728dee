"""dense_map on a dask.distributed cluster: the same map as in process, and no tile lost to a dead worker.

One ``LocalCluster`` (2 worker processes, 1 thread each) serves the whole module. Workers run
torch with one thread while the in-process reference uses two, so convolution sums may be
ordered differently: maps are compared to relative 1e-5, not bit for bit.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from convolutionalize import convolutionalize, dense_map
from convolutionalize.frameworks.torch.layers import ConvolutionalizedModule

from conftest import rel

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")

RTOL = 1e-5


class Slow(nn.Module):
    """A converted net that takes a while per tile, so a worker can be killed mid-run."""

    def __init__(self, net: nn.Module, seconds: float) -> None:
        super().__init__()
        self.net = net
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.net(x)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).eval()


@pytest.fixture(scope="module")
def client() -> Iterator[distributed.Client]:
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, memory_limit="2GiB") as cluster, \
            distributed.Client(cluster, set_as_default=False) as c:
        yield c


@pytest.fixture(scope="module")
def fcn() -> ConvolutionalizedModule:
    return convolutionalize(small_model(), (32, 32))


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (120, 150, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference(fcn: nn.Module, pixels: np.ndarray) -> np.ndarray:
    """The in-process map (the client is not the default one, so this runs here)."""
    return dense_map(fcn, pixels)


def key_name(task: dict) -> str:
    key = task["key"]
    return key[0] if isinstance(key, tuple) else key


def test_cluster_map_equals_the_in_process_map(client: distributed.Client, fcn: nn.Module,
                                               pixels: np.ndarray, reference: np.ndarray) -> None:
    with distributed.get_task_stream(client) as stream:
        got = dense_map(fcn, pixels, tile=16, scheduler=client)
    assert isinstance(got, np.ndarray)
    assert rel(got, reference) <= RTOL
    assert sum("run_tile" in key_name(task) for task in stream.data) == 6 * 8  # 23x30 cells, 4x4 a tile


def test_an_active_client_is_used(client: distributed.Client, fcn: nn.Module, pixels: np.ndarray,
                                  reference: np.ndarray) -> None:
    with client.as_current(), distributed.get_task_stream(client) as stream:
        got = dense_map(fcn, pixels, tile=32)
    assert rel(got, reference) <= RTOL
    assert any("run_tile" in key_name(task) for task in stream.data)


def test_dask_input_on_the_cluster_gives_a_dask_array(client: distributed.Client, fcn: nn.Module,
                                                      pixels: np.ndarray, reference: np.ndarray) -> None:
    import dask.array as da

    got = dense_map(fcn, da.from_array(pixels, chunks=(64, 64, 3)), tile=16)
    assert isinstance(got, da.Array)
    assert rel(got.compute(scheduler=client), reference) <= RTOL


def test_cluster_writes_zarr(client: distributed.Client, fcn: nn.Module, pixels: np.ndarray,
                             reference: np.ndarray, tmp_path: Path) -> None:
    out = dense_map(fcn, pixels, tile=16, scheduler=client, out=tmp_path / "map.zarr")
    assert rel(out[:], reference) <= RTOL


def test_a_worker_killed_mid_run_loses_nothing(client: distributed.Client, fcn: nn.Module,
                                               pixels: np.ndarray, reference: np.ndarray,
                                               tmp_path: Path) -> None:
    slow = ConvolutionalizedModule(Slow(fcn.net, 0.05), fcn.geometry, fcn.plan, fcn.self_check)
    path = tmp_path / "map.zarr"
    done: list[object] = []
    run = threading.Thread(target=lambda: done.append(dense_map(slow, pixels, tile=16, scheduler=client,
                                                                out=path)))
    run.start()
    pid = _wait_for_busy_worker(client)
    os.kill(pid, signal.SIGKILL)
    run.join(timeout=120)
    assert done, "the run did not finish after a worker was killed"
    assert rel(done[0][:], reference) <= RTOL


def _wait_for_busy_worker(client: distributed.Client) -> int:
    """The pid of a worker that is running a tile right now."""
    for _ in range(400):
        processing = client.processing()
        busy = [address for address, keys in processing.items() if any("run_tile" in str(k) for k in keys)]
        if busy:
            return client.run(os.getpid, workers=busy[:1])[busy[0]]
        time.sleep(0.025)
    raise AssertionError("no worker started a tile within 10 s")


@pytest.mark.parametrize("where", ["threads", "client"])
def test_progress_bar_counts_tiles(where: str, client: distributed.Client, fcn: nn.Module,
                                   pixels: np.ndarray, reference: np.ndarray,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    got = dense_map(fcn, pixels, tile=16, scheduler=client if where == "client" else "threads",
                    progress=True)
    assert rel(got, reference) <= RTOL
    assert "48/48" in capsys.readouterr().err  # 6 x 8 tiles
