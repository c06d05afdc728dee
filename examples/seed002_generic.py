"""Seed 002: Dense layers as convolutions, in general.

Scenario (a): a fully connected layer ``Linear(N, M)`` on a feature vector is a 1x1 convolution
``Conv2d(N, M, 1)`` on the same vector seen as an ``N x 1 x 1`` map, with the weight
``(M, N)`` reshaped to ``(M, N, 1, 1)`` and the bias kept. The model is
``nn.Sequential(nn.Flatten(), nn.Linear(N, M))`` over a 1x1 map, converted with
``input_size=(1, 1)``; the outputs are equal, and on an ``N x H x W`` map the 1x1 convolution
applies the same Linear at every location.

Scenario (b): a small padding-free CNN (the seed's "conv layers, then Flatten and Dense layers"
network, here with valid convolutions so crops and the dense map see the same pixels)::

    Conv2d(1, 8, 3) -> ReLU -> MaxPool2d(2) -> Conv2d(8, 16, 3) -> ReLU
    -> Flatten -> Linear(16*11*11, 64) -> ReLU -> Dropout -> Linear(64, 10)

trained for a few SGD steps on random 28x28 data (the weights only need to be "trained", not
good). Its first Dense layer becomes a convolution whose kernel is the whole 11x11 feature
map, the second a 1x1 convolution; Dropout stays (it is the identity in eval mode). On a 64x96
image the converted net returns a ``(1, 10, 19, 35)`` map: cell ``(i, j)`` is the classifier
on the 28x28 window at ``(2i, 2j)`` (the network's total stride is 2). ``geometry.box(i, j)``
says where each window is; the script checks ``geometry.crop_equivalent`` and compares several
cells with the original classifier run on their true crops.

The seed's own code writes the fully convolutional network by hand, with fresh layers and a
``torch.squeeze`` that drops the batch dimension when the batch has one image; its weight
transfer is described in words only. Here nothing is written by hand: the weights are carried
over and every claim is measured.

Run: ``python examples/seed002_generic.py``. Exit code 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from convolutionalize import convolutionalize

FEATURES, OUTPUTS = 300, 17  # (a): any N -> M
NATIVE = (28, 28)  # (b): the training input size
LARGE = (64, 96)  # (b): the image the classifier runs densely over
RTOL = 1e-5  # float32 relative tolerance for "equal"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|``, in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


class SmallCNN(nn.Module):
    """A padding-free 28x28 classifier: two valid convolutions, then a Dense head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU())
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 11 * 11, 64), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train_briefly(model: nn.Module, gen: torch.Generator, steps: int = 10) -> float:
    """A few SGD steps on random images and labels; returns the last loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = torch.randn(32, 1, *NATIVE, generator=gen)
    labels = torch.randint(0, 10, (32,), generator=gen)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def fc_as_1x1(gen: torch.Generator, checks: dict[str, bool]) -> None:
    """(a) Linear(N, M) on a feature vector == Conv2d(N, M, 1) on an N x 1 x 1 map."""
    print(f"== (a) Linear({FEATURES}, {OUTPUTS}) on a feature vector ==")
    model = nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, OUTPUTS)).eval()
    fcn = convolutionalize(model, input_size=(1, 1))
    convs = [m for m in fcn.modules() if isinstance(m, nn.Conv2d)]
    print(f"converted: {convs}")
    linear = model[1]
    checks["(a) one Conv2d(N, M, 1x1) with the Linear's weights"] = (
        len(convs) == 1 and tuple(convs[0].kernel_size) == (1, 1)
        and torch.equal(convs[0].weight, linear.weight.reshape(OUTPUTS, FEATURES, 1, 1))
        and torch.equal(convs[0].bias, linear.bias))
    vectors = torch.randn(8, FEATURES, generator=gen)
    grid = torch.randn(2, FEATURES, 3, 5, generator=gen)
    with torch.inference_mode():
        error = relative_error(fcn(vectors[:, :, None, None]).flatten(1), linear(vectors))
        per_location = linear(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        grid_error = relative_error(fcn(grid), per_location)
    print(f"8 vectors: conv vs Linear, max relative error {error:.2e}")
    print(f"a {FEATURES}x3x5 map: conv vs the Linear at every location, "
          f"max relative error {grid_error:.2e}")
    checks["(a) outputs equal on feature vectors"] = error < RTOL
    checks["(a) outputs equal at every location of a map"] = grid_error < RTOL


def sample_cells(rows: int, cols: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """The four corners, the centre and three random cells."""
    fixed = [(0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1), (rows // 2, cols // 2)]
    picks = torch.randint(0, rows * cols, (3,), generator=gen).tolist()
    return list(dict.fromkeys(fixed + [(p // cols, p % cols) for p in picks]))


def compare_crops(model: nn.Module, fcn: nn.Module, image: torch.Tensor,
                  cells: list[tuple[int, int]]) -> list[float]:
    """Print each cell next to the classifier on its crop; return the relative errors."""
    geometry = fcn.geometry
    with torch.inference_mode():
        dense = fcn(image)
        boxes = [geometry.box(i, j) for i, j in cells]
        crops = torch.cat([image[:, :, y0:y1, x0:x1] for x0, y0, x1, y1 in boxes])
        logits = model(crops)
    errors = []
    print("  cell      window (x0, y0, x1, y1)   class (map / crop)   relative error")
    for k, (i, j) in enumerate(cells):
        errors.append(relative_error(dense[0, :, i, j], logits[k]))
        classes = f"{int(dense[0, :, i, j].argmax())} / {int(logits[k].argmax())}"
        print(f"  {(i, j)!s:<9} {boxes[k]!s:<25} {classes:<20} {errors[-1]:.2e}")
    return errors


def dense_cnn(gen: torch.Generator, checks: dict[str, bool]) -> None:
    """(b) A trained padding-free CNN, run densely over a larger image."""
    print("\n== (b) a padding-free CNN trained on 28x28 inputs ==")
    model = SmallCNN()
    loss = train_briefly(model, gen)
    print(f"trained 10 SGD steps on random data (last loss {loss:.3f})")
    fcn = convolutionalize(model, input_size=NATIVE)
    geometry = fcn.geometry
    print(fcn.plan.describe())
    head = [m for m in fcn.net.classifier.modules() if isinstance(m, nn.Conv2d)]
    print(f"head convolutions: {head}")
    checks["(b) first Dense -> conv with kernel = feature size"] = bool(head) and (
        tuple(head[0].kernel_size) == geometry.feature_size)
    checks["(b) no Linear left"] = not any(isinstance(m, nn.Linear) for m in fcn.modules())
    image = torch.randn(1, 1, *LARGE, generator=gen)
    with torch.inference_mode():
        shape = tuple(fcn(image).shape)
    rows, cols = geometry.cells(*LARGE)
    print(f"\n{LARGE[0]}x{LARGE[1]} image -> map {shape} (expected {(1, 10, rows, cols)})")
    print(f"geometry: {geometry}")
    print(geometry.describe())
    checks["(b) map shape"] = shape == (1, 10, rows, cols)
    checks["(b) geometry.crop_equivalent"] = geometry.crop_equivalent
    errors = compare_crops(model, fcn, image, sample_cells(rows, cols, gen))
    print(f"max relative error over {len(errors)} cells: {max(errors):.2e}")
    checks[f"(b) {len(errors)} cells equal the classifier on their crops"] = max(errors) < RTOL


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

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    checks: dict[str, bool] = {}
    fc_as_1x1(gen, checks)
    dense_cnn(gen, checks)
    return report(checks)


if __name__ == "__main__":
    raise SystemExit(main())
