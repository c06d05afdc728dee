"""Shared test settings: deterministic hypothesis, a fixed thread count, helpers."""

from __future__ import annotations

import hashlib
import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before anything imports keras

import numpy as np
import pytest
import torch
import torch._dynamo  # before anything imports tensorflow: triton (dynamo's) crashes the process after it
from hypothesis import settings
from torch import nn

settings.register_profile("deterministic", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("deterministic")
torch.set_num_threads(2)


def fingerprint(model: nn.Module) -> tuple[str, bool, str]:
    """Structure, mode and weights of a model, to prove a conversion left it alone."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                      if tensor.numel() else b"")
    modes = "".join("T" if m.training else "E" for m in model.modules())
    return repr(model), model.training, digest.hexdigest() + modes


class RecordingArray:
    """A lazy array stand-in (like zarr) that records every region read from it."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.reads: list[tuple[int, int]] = []

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        block = self.array[index]
        self.reads.append(block.shape[:2])
        return block


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def rel(actual: np.ndarray, expected: np.ndarray) -> float:
    """Relative error of a dense map (numpy), after checking both have one shape."""
    assert actual.shape == expected.shape
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


def flattened_linears(fcn: nn.Module, input_size: tuple[int, int], in_channels: int = 3) -> list[str]:
    """Names of Linear layers that still consume a flat (N, features) tensor.

    The structural half of every conversion test: after conversion no Linear may read a
    flattened or pooled vector (per-pixel Linears inside a backbone read 4-D tensors).
    """
    found: list[str] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], name: str) -> None:
        if args[0].dim() <= 2:
            found.append(name)

    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: hook(mod, a, n))
               for n, m in fcn.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            fcn(torch.randn(1, in_channels, *input_size))
    finally:
        for h in handles:
            h.remove()
    return found


@pytest.fixture
def seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=["streams", "tiles"])
def tile_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a tiled map runs in one process: columns of tiles streamed (the default), or
    each tile with its halo (``CONVOLUTIONALIZE_STREAMS=0``)."""
    if request.param == "tiles":
        monkeypatch.setenv("CONVOLUTIONALIZE_STREAMS", "0")
    return str(request.param)


def cells_and_crops(model: nn.Module, fcn: nn.Module,
                     image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every cell of ``fcn``'s window map (cells x classes) and ``model`` on each cell's box."""
    geometry = fcn.geometry
    with torch.no_grad():
        dense = fcn(image)
        rows, cols = dense.shape[-2:]
        crops = []
        for i in range(rows):
            for j in range(cols):
                x0, y0, x1, y1 = geometry.box(i, j)
                crops.append(image[:, :, y0:y1, x0:x1])
        expected = model(torch.cat(crops))
    return dense[0].flatten(1).T, expected
