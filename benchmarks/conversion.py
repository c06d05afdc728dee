"""Benchmark: how long conversion takes per model (analysis + rewrite + native-size check).

Prints, per torchvision model, the median wall time of ``convolutionalize`` over a few
runs, with the model's parameter count and the plan's head. Run with
``.venv/bin/python benchmarks/conversion.py [--repeats N] [MODEL ...]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torchvision

from convolutionalize import convolutionalize

DEFAULT_MODELS = ["resnet18", "resnet50", "vgg16", "mobilenet_v3_large", "efficientnet_b0",
                  "densenet121", "convnext_tiny", "regnet_y_400mf", "squeezenet1_1"]


def time_conversion(name: str, repeats: int) -> tuple[float, int, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torchvision.models.get_model(name, weights=None)
    size = (299, 299) if name == "inception_v3" else (224, 224)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fcn = convolutionalize(model, size)
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    head = ", ".join(step.op for step in fcn.plan.steps)
    return statistics.median(times), params, head


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} runs")
    print(f"{'model':<22}{'params':>10}{'convert s':>11}  head")
    for name in args.models:
        seconds, params, head = time_conversion(name, args.repeats)
        print(f"{name:<22}{params / 1e6:>9.1f}M{seconds:>11.3f}  {head}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
