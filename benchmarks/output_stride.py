"""Benchmark: maps finer than the network's stride, three ways, side by side on this machine.

ResNet-50 (random weights, seeded) on a 1024² image at output strides 32, 16 and 8:

- à trous: the model converted with ``output_stride=s``, one ``dense_map`` pass;
- shift-and-stitch: the network-stride model's ``dense_map`` on the image shifted by every
  multiple of ``s`` below 32, (32/s)² passes, interleaved (what FCN did);
- crop by crop at stride s: every window classified (batched, fp32), timed on
  ``--crop-sample`` windows and scaled to all of them.

à trous and shift-and-stitch in fp32 and in bf16 (autocast + AMX). Conversion happens once,
before timing (it is out of every timer). Every method runs in turn in each of ``--rounds``
rounds; ratios are taken within a round and their medians printed, because this shared CPU's
speed drifts by up to 2x between minutes. Printed: FLOPs of each method, each speedup, and
each speedup as a fraction of its FLOP ratio (1.0: the method is exactly as efficient per
FLOP); the goals are à trous >= 0.9 of its FLOP advantage over shift-and-stitch, and a
stride-8 bf16 map at most 8x the time of the stride-32 one.

Run with ``.venv/bin/python benchmarks/output_stride.py [--size 1024] [--strides 32 16 8]
[--rounds 3] [--crop-sample 32]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torchvision
from dense import crops, interleaved  # the shared timing helpers (benchmarks/dense.py)

from convolutionalize import convolutionalize, dense_map
from convolutionalize.flops import compare_flops

WINDOW = 224


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--strides", type=int, nargs="+", default=[32, 16, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--crop-sample", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    image = torch.randn(3, args.size, args.size)
    network = convolutionalize(model, (WINDOW, WINDOW))
    runs, info = {}, {}
    for s in args.strides:
        fcn = convolutionalize(model, (WINDOW, WINDOW), output_stride=s)
        flops = compare_flops(model, fcn, (args.size, args.size), network if s != 32 else None)
        crop_run, sampled, windows = crops(model, image, s, args.crop_sample)
        info[s] = (flops, sampled, windows)
        for precision in ("fp32", "bf16"):
            runs[f"atrous{s}-{precision}"] = _dense(fcn, image, precision)
            if s != 32:
                runs[f"sas{s}-{precision}"] = _stitch(network, image, 32 // s, s, precision)
        runs[f"crops{s}"] = crop_run
    rounds = interleaved(runs, args.rounds)

    def median(f) -> float:  # type: ignore[no-untyped-def]
        return statistics.median(f(r) for r in rounds)

    print(f"ResNet-50, {args.size}x{args.size} image, window {WINDOW}, medians of {args.rounds} rounds")
    for s in args.strides:
        flops, sampled, windows = info[s]
        scale = windows / sampled
        print(f"\noutput stride {s}: map {flops.map_size[1]}x{flops.map_size[2]}, {windows} windows")
        print(f"  FLOPs  a trous {flops.dense / 1e9:,.0f} G   crop by crop {flops.crop_by_crop / 1e9:,.0f} G"
              + ("" if flops.shift_and_stitch is None else
                 f"   shift-and-stitch {flops.shift_and_stitch / 1e9:,.0f} G"))
        for precision in ("fp32", "bf16"):
            atrous = median(lambda r, p=precision, s=s: r[f"atrous{s}-{p}"])
            crop_speedup = median(
                lambda r, p=precision, s=s, k=scale: r[f"crops{s}"] * k / r[f"atrous{s}-{p}"])
            line = (f"  {precision}: a trous {atrous:.2f} s; vs crop by crop (fp32) {crop_speedup:.0f}x "
                    f"({crop_speedup / (flops.crop_by_crop / flops.dense):.2f} of its FLOP ratio)")
            if flops.shift_and_stitch is not None:
                sas = median(lambda r, p=precision, s=s: r[f"sas{s}-{p}"])
                speedup = median(lambda r, p=precision, s=s: r[f"sas{s}-{p}"] / r[f"atrous{s}-{p}"])
                ratio = flops.shift_and_stitch / flops.dense
                line += (f"; shift-and-stitch {sas:.2f} s, a trous {speedup:.2f}x faster "
                         f"({speedup / ratio:.2f} of its FLOP ratio {ratio:.2f})")
            print(line)
    if 8 in args.strides and 32 in args.strides:
        slow = median(lambda r: r["atrous8-bf16"] / r["atrous32-bf16"])
        print(f"\nbf16: stride-8 map / stride-32 map time: {slow:.1f}x (goal <= 8x)")


def _dense(fcn: torch.nn.Module, image: torch.Tensor, precision: str):  # type: ignore[no-untyped-def]
    return lambda: dense_map(fcn, image, precision=precision, runtime="torch")


def _stitch(network: torch.nn.Module, image: torch.Tensor, k: int, s: int, precision: str):  # type: ignore[no-untyped-def]
    def run() -> None:
        for py in range(k):
            for px in range(k):
                dense_map(network, image[:, py * s:, px * s:], precision=precision, runtime="torch")
    return run


if __name__ == "__main__":
    main()
