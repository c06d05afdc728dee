"""Seed 000: ResNet-50's fully connected layer as a 1x1 convolution, weights kept.

Scenario. A torchvision ResNet-50 ends in ``avgpool -> flatten -> fc`` (``Linear(2048, 1000)``).
Rewritten as a ``Conv2d(2048, 1000, 1)`` holding the same weights, and with the global pool
dropped (``pool="none"``), the network gives a class-score vector for every cell of its 7x7
feature map: a ``(1, 1000, 7, 7)`` map for a 224x224 input (class activation mapping, CAM).
Because the head is affine, the mean of that map over its 49 cells equals the original logits
exactly. With ``pool="window"`` the global pool becomes a stride-1 7x7 pool instead, so a
larger image gives one score vector per 224x224 window, 32 pixels apart: 320x416 -> 4x7.

Why seed 000's recipe fails. The seed swaps ``model.fc`` for an equivalent ``Conv2d`` and
expects a ``(1, 1000, 7, 7)`` output. But torchvision's ``ResNet.forward`` runs
``x = self.avgpool(x); x = torch.flatten(x, 1); x = self.fc(x)``: the pooling and the
flatten are in ``forward``, not in the module tree, so the new convolution receives a 2-D
``(N, 2048)`` tensor and ``conv2d`` raises ("Expected 3D (unbatched) or 4D (batched) input").
Even where it ran, the ``AdaptiveAvgPool2d(1)`` before it would still reduce the map to 1x1.
``convolutionalize`` traces ``forward`` with ``torch.fx`` and rewrites the pool, the flatten
and the Linear together. This script shows the seed's error, caught, then the working version.

Weights. ``resnet50(weights=None)``: random (seeded) weights, because nothing here may download
the ImageNet checkpoint; the conversion is exact whatever the weights are, so the checks
below hold for trained weights too (the argmax grid is only meaningful with them).

Output. ``DIR/resnet50_map.npy`` (``--output DIR``, default ``demo-output``): the float32
``pool="none"`` map of the 224x224 input, shape ``(1, 1000, 7, 7)`` = (batch, classes, rows,
cols), exactly as the converted model returns it.

Run: ``python examples/seed000_resnet50.py --output demo-output`` (``make demo``). Exit code
0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet50

from convolutionalize import convolutionalize

NATIVE = (224, 224)  # ResNet-50's training input size
LARGE = (320, 416)  # a larger image for the sliding-window map
RTOL = 1e-5  # float32 relative tolerance for "equal"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|``, in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def naive_swap_error(model: nn.Module) -> str | None:
    """Seed 000's recipe on a copy: ``model.fc = Conv2d(...)``. The error it raises, if any."""
    naive = copy.deepcopy(model)
    fc = naive.fc
    assert isinstance(fc, nn.Linear)
    conv = nn.Conv2d(fc.in_features, fc.out_features, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(fc.weight.reshape(fc.out_features, fc.in_features, 1, 1))
        conv.bias.copy_(fc.bias)
    naive.fc = conv
    try:
        with torch.inference_mode():
            naive(torch.zeros(1, 3, 32, 32))  # any size: forward flattens before fc
    except RuntimeError as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def format_grid(grid: torch.Tensor) -> str:
    """A 2-D integer tensor as aligned rows of numbers."""
    width = max(len(str(int(v))) for v in grid.flatten())
    return "\n".join("  " + " ".join(f"{int(v):>{width}}" for v in row) for row in grid)


def class_map(model: nn.Module, image: torch.Tensor, checks: dict[str, bool]) -> torch.Tensor:
    """pool="none": per-cell scores at the native size; their mean equals the logits."""
    fcn = convolutionalize(model, NATIVE, pool="none")
    print("\n== convolutionalize(model, (224, 224), pool='none') ==")
    print(fcn.plan.describe())
    print(fcn.geometry.describe())
    checks["original model untouched (fc is still a Linear)"] = isinstance(model.fc, nn.Linear)
    checks["no Linear left in the converted model"] = not any(
        isinstance(m, nn.Linear) for m in fcn.modules())
    with torch.inference_mode():
        logits = model(image)
        cam = fcn(image)
    expected = (1, logits.shape[1], *fcn.geometry.cells(*NATIVE))
    print(f"\n224x224 input -> map {tuple(cam.shape)} (expected {expected})")
    checks["'none' map shape"] = tuple(cam.shape) == expected
    print("per-cell argmax class (random weights: the classes are arbitrary):")
    print(format_grid(cam[0].argmax(0)))
    top = int(logits.argmax(1))
    agree = int((cam[0].argmax(0) == top).sum())
    print(f"original top class {top}; {agree}/{cam[0, 0].numel()} cells agree with it")
    error = relative_error(cam.mean((2, 3)), logits)
    print(f"mean of the map vs the original logits: max relative error {error:.2e}")
    checks["mean of the 'none' map equals the logits"] = error < RTOL
    return cam


def window_map(model: nn.Module, image: torch.Tensor, checks: dict[str, bool]) -> None:
    """pool="window": one score vector per 224x224 window of a larger image."""
    fcn = convolutionalize(model, NATIVE, pool="window")
    geometry = fcn.geometry
    print("\n== convolutionalize(model, (224, 224), pool='window') ==")
    print(geometry.describe())
    print(f"native-size check during conversion: max relative error {fcn.native_error:.2e}")
    checks["window map equals the logits at 224x224"] = (fcn.native_error or 0.0) < RTOL
    with torch.inference_mode():
        scores = fcn(image)
        x0, y0, x1, y1 = geometry.box(0, 0)
        crop_logits = model(image[:, :, y0:y1, x0:x1])
    expected = (1, scores.shape[1], *geometry.cells(*image.shape[-2:]))
    print(f"\n{image.shape[-2]}x{image.shape[-1]} input -> map {tuple(scores.shape)} "
          f"(expected {expected})")
    checks["'window' map shape"] = tuple(scores.shape) == expected
    error = relative_error(scores[0, :, 0, 0], crop_logits[0])
    print(f"cell (0, 0), window x0,y0,x1,y1 = {(x0, y0, x1, y1)}, vs the model on that crop: "
          f"max relative error {error:.2e}")
    print("  (ResNet zero-pads: the dense map sees real neighbours where a crop sees zeros, "
          "so it is the classifier with context, not the crop score; crop_equivalent="
          f"{geometry.crop_equivalent})")


def report(checks: dict[str, bool]) -> int:
    """Print every check; 0 when all hold."""
    print("\nchecks:")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    return 0 if all(checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("demo-output"),
                        help="directory for resnet50_map.npy (default: demo-output)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and images")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = resnet50(weights=None).eval()  # random weights: no download here
    print("ResNet-50 (torchvision, weights=None: seeded random weights, no download)")
    checks: dict[str, bool] = {}

    error = naive_swap_error(model)
    print(f"seed 000's naive swap (model.fc = Conv2d): "
          f"{'fails, ' + error if error else 'ran without error'}")
    print("  ResNet.forward calls torch.flatten(x, 1) before self.fc: the conv gets (N, 2048)")
    checks["seed 000's naive swap fails on the flattened tensor"] = error is not None

    gen = torch.Generator().manual_seed(args.seed)
    cam = class_map(model, torch.randn(1, 3, *NATIVE, generator=gen), checks)
    window_map(model, torch.randn(1, 3, *LARGE, generator=gen), checks)

    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / "resnet50_map.npy"
    np.save(path, cam.numpy().astype(np.float32))
    print(f"\nwrote the pool='none' map, shape {tuple(cam.shape)}, to {path}")
    return report(checks)


if __name__ == "__main__":
    raise SystemExit(main())
