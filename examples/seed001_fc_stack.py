"""Seed 001: a two-layer fully connected head on a 4x4x256 feature map, as convolutions.

Scenario. A feature extractor ends in a 256-channel 4x4 map; the classifier flattens it
(4096 values) and applies ``Linear(4096, 1024) -> ReLU -> Linear(1024, 10)``. The model here
starts at that feature map::

    nn.Sequential(nn.Flatten(), nn.Linear(256 * 4 * 4, 1024), nn.ReLU(), nn.Linear(1024, 10))

Its "trained" weights are seeded random ones. ``convolutionalize(model, input_size=(4, 4))``
turns the first Linear into ``Conv2d(256, 1024, kernel_size=4)`` (its weight ``(1024, 4096)``
reshaped to ``(1024, 256, 4, 4)``, the same order ``Flatten`` reads a CHW map in) and the
second into ``Conv2d(1024, 10, kernel_size=1)``. On an 8x8x256 map the converted net slides the
4x4 window with stride 1 and returns ``(1, 10, 5, 5)``: each cell equals the original FC net on
its own 4x4 crop, which this script checks for all 25 cells.

What seed 001 got wrong. Its TensorFlow and PyTorch code builds *fresh* ``Conv2D(1024, (4, 4))``
and ``Conv2D(10, (1, 1))`` layers with new random weights and only prints their output shapes.
Shapes match; the function does not: nothing carries the trained Dense weights over, so the
"equivalent" network computes something unrelated (shown below: relative error near 1). The
conversion is a weight reshape, not a new layer, and in Keras the reshape must follow Keras'
channels-last flatten order (Dense kernel ``(H*W*C, M)`` -> Conv2D kernel ``(H, W, C, M)``),
which the seed does not mention. Its text also calls the 4x4 layer "a 1x1 convolution with a
kernel size of 4x4": it is a 4x4 convolution; only the second layer is 1x1.

Run: ``python examples/seed001_fc_stack.py``. Exit code 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from convolutionalize import convolutionalize

CHANNELS, SIZE = 256, (4, 4)  # the feature map the head was trained on
HIDDEN, CLASSES = 1024, 10
LARGE = (8, 8)  # a larger feature map to slide over
RTOL = 1e-5  # float32 relative tolerance for "equal"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|``, in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def fc_stack(seed: int) -> nn.Sequential:
    """The seed's classifier head, with seeded random weights standing in for trained ones."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(CHANNELS * SIZE[0] * SIZE[1], HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, CLASSES),
    ).eval()
    return model


def fresh_layers_error(model: nn.Sequential, x: torch.Tensor) -> float:
    """Seed 001's recipe: new Conv2d layers of the right shapes, weights not carried over."""
    fresh = nn.Sequential(
        nn.Conv2d(CHANNELS, HIDDEN, SIZE), nn.ReLU(), nn.Conv2d(HIDDEN, CLASSES, 1)).eval()
    with torch.inference_mode():
        return relative_error(fresh(x).flatten(1), model(x))


def check_structure(model: nn.Sequential, fcn: nn.Module, checks: dict[str, bool]) -> None:
    """The converted head is two convolutions holding the original weights, reshaped."""
    convs = [m for m in fcn.modules() if isinstance(m, nn.Conv2d)]
    found = [(c.in_channels, c.out_channels, tuple(c.kernel_size)) for c in convs]
    print("convolutions (in, out, kernel): " + ", ".join(map(str, found)))
    wanted = [(CHANNELS, HIDDEN, SIZE), (HIDDEN, CLASSES, (1, 1))]
    checks["head is Conv2d(256, 1024, 4x4) + Conv2d(1024, 10, 1x1)"] = found == wanted
    checks["no Linear left in the converted net"] = not any(
        isinstance(m, nn.Linear) for m in fcn.modules())
    if len(convs) == 2:
        fc1, fc2 = model[1], model[3]
        checks["conv weights are the Linear weights, reshaped"] = (
            torch.equal(convs[0].weight, fc1.weight.reshape(HIDDEN, CHANNELS, *SIZE))
            and torch.equal(convs[1].weight, fc2.weight.reshape(CLASSES, HIDDEN, 1, 1))
            and torch.equal(convs[0].bias, fc1.bias) and torch.equal(convs[1].bias, fc2.bias))


def check_cells(model: nn.Sequential, fcn: nn.Module, x: torch.Tensor,
                checks: dict[str, bool]) -> None:
    """Every cell of the dense map equals the FC net on that cell's 4x4 crop."""
    geometry = fcn.geometry
    with torch.inference_mode():
        dense = fcn(x)
    rows, cols = geometry.cells(*x.shape[-2:])
    print(f"\n{CHANNELS}x{x.shape[-2]}x{x.shape[-1]} input -> map {tuple(dense.shape)} "
          f"(expected {(1, CLASSES, rows, cols)})")
    checks["map shape"] = tuple(dense.shape) == (1, CLASSES, rows, cols)
    cells = [(i, j) for i in range(rows) for j in range(cols)]
    crops = []
    for i, j in cells:
        x0, y0, x1, y1 = geometry.box(i, j)
        crops.append(x[:, :, y0:y1, x0:x1])
    with torch.inference_mode():
        logits = model(torch.cat(crops))
    errors = [relative_error(dense[0, :, i, j], logits[k]) for k, (i, j) in enumerate(cells)]
    worst = max(range(len(cells)), key=errors.__getitem__)
    print(f"each cell vs the FC net on its 4x4 crop (geometry.box): max relative error "
          f"{errors[worst]:.2e} over all {len(cells)} cells (worst: cell {cells[worst]}, "
          f"window x0,y0,x1,y1 = {geometry.box(*cells[worst])})")
    checks[f"all {len(cells)} cells equal the FC net on their crops"] = max(errors) < RTOL


def report(checks: dict[str, bool]) -> int:
    """Print every check; 0 when all hold."""
    print("\nchecks:")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    return 0 if all(checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    args = parser.parse_args(argv)

    model = fc_stack(args.seed)
    print(f"FC head: {model}")
    fcn = convolutionalize(model, input_size=SIZE)
    print(f"\n== convolutionalize(model, input_size={SIZE}) ==\n{fcn}")
    print(fcn.plan.describe())
    print(fcn.geometry.describe())
    checks: dict[str, bool] = {}
    check_structure(model, fcn, checks)

    gen = torch.Generator().manual_seed(args.seed)
    native = torch.randn(4, CHANNELS, *SIZE, generator=gen)
    with torch.inference_mode():
        error = relative_error(fcn(native).flatten(1), model(native))
    print(f"\nat 4x4: converted vs original, max relative error {error:.2e}")
    checks["equal to the FC net at 4x4"] = error < RTOL
    fresh = fresh_layers_error(model, native)
    print(f"seed 001's fresh Conv2d layers (weights not converted) vs original: "
          f"max relative error {fresh:.2e}")
    checks["fresh layers are not equivalent"] = fresh > 0.1

    check_cells(model, fcn, torch.randn(1, CHANNELS, *LARGE, generator=gen), checks)
    return report(checks)


if __name__ == "__main__":
    raise SystemExit(main())
