"""Benchmark: what a ``dense_map`` call costs on an unconverted model once it has been mapped.

``dense_map(model, image)`` converts ``model`` and prepares its runner on the first call and
remembers both (per model, while its weights stay the same). Here, side by side in one run
for each model: the first call on a fresh model (conversion with its self-check, runner
preparation and the map), later calls on that model, and calls on the converted model
(``fcn = convolutionalize(model, 224)`` done once before timing; its runner warmed by one
call, as the unconverted model's is by its first). Later calls and converted calls are
interleaved, ``--rounds`` each, and their medians compared: the goal is at most 1.1x.

Run with ``.venv/bin/python benchmarks/per_call.py [--size 320] [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from convolutionalize import convolutionalize, dense_map

MODELS = ("resnet18", "resnet50")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    image = torch.randn(3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"{args.size}x{args.size} image, fp32, medians of {args.rounds} interleaved rounds")
    for name in MODELS:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        fcn = convolutionalize(model, 224)
        dense_map(fcn, image)  # the converted model's runner, prepared
        start = time.perf_counter()
        dense_map(model, image, input_size=224)
        first = time.perf_counter() - start
        later, converted = [], []
        for _ in range(args.rounds):
            for times, target in ((later, model), (converted, fcn)):
                start = time.perf_counter()
                dense_map(target, image, input_size=224)
                times.append(time.perf_counter() - start)
        again, ref = statistics.median(later), statistics.median(converted)
        print(f"{name}: first call {first * 1e3:.0f} ms (converts)  later calls {again * 1e3:.1f} ms  "
              f"converted model {ref * 1e3:.1f} ms  -> later / converted {again / ref:.2f}x (goal <= 1.1x)")


if __name__ == "__main__":
    main()
