"""Benchmark: every runtime's dense map against this CPU's GEMM peaks, side by side, in one run.

For ResNet-18 and ResNet-50 (torchvision, random weights, seeded) converted once and mapped on
one ``--size``² image, times ``dense_map`` with each ``runtime=`` and ``precision=``:

- torch fp32 and bf16 (the default runner: oneDNN fused convolutions; bf16 autocast on AMX);
- onnxruntime fp32 (its CPU provider has no bf16 convolutions on x86: not timed in bf16);
- OpenVINO fp32 and bf16 (``INFERENCE_PRECISION_HINT`` ``f32`` / ``bf16``),

both on the converted model's ONNX export, and an n x n matmul in fp32 and bf16 (the GEMM peak
in each precision), all on torch's thread count. Conversion, the ONNX export and the runtimes'
compilation (one-time costs, printed apart) are out of every timer: each path runs once before
the rounds. The CPU is shared and its speed drifts, so every path runs in turn in ``--rounds``
rounds (sub-second runs repeated for half a second, their median kept); each fraction of a
peak is taken within a round and the median over rounds printed. Also printed: each map's
relative error against torch fp32 (max |difference| / max |map|), what ``runtime="auto"``
chooses, and where the torch dense pass spends its time by kind of operation (torch.profiler,
self CPU time: convolutions, pools, copies, casts, the rest).

Run with ``.venv/bin/python benchmarks/runtimes.py [--models resnet18 resnet50] [--size 1024]
[--rounds 5] [--no-profile]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torchvision
from dense import timed  # benchmarks/dense.py: the same timer

from convolutionalize import convolutionalize, dense_map
from convolutionalize.flops import count_flops
from convolutionalize.inference._runner import runner_for
from convolutionalize.inference.runtimes import available, runner_on

WINDOW = 224
GEMM = 2048
PATHS = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"),
         ("openvino", "bf16")]
KINDS = {"convolutions": ("conv",), "max pools": ("max_pool",), "avg pools": ("avg_pool",),
         "copies": ("copy_", "clone", "contiguous", "cat")}  # a copy inside a _to_copy: a cast


def breakdown(fcn: torch.nn.Module, image: torch.Tensor, precision: str) -> dict[str, float]:
    """Each kind of operation's share of the torch dense pass's self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    runner = runner_for(fcn, precision, torch.device("cpu"))  # type: ignore[arg-type]
    runner(image[None])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner(image[None])
    shares = dict.fromkeys([*KINDS, "casts", "other"], 0.0)
    for event in prof.events():
        kind = next((k for k, words in KINDS.items() if any(w in event.name for w in words)), "other")
        parent = event.cpu_parent
        while kind == "copies" and parent is not None:
            kind = "casts" if parent.name == "aten::_to_copy" else kind
            parent = parent.cpu_parent
        shares[kind] += event.self_cpu_time_total
    total = sum(shares.values())
    return {k: v / total for k, v in shares.items()}


def bench(name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    fcn = convolutionalize(torchvision.models.get_model(name, weights=None).eval(), (WINDOW, WINDOW))
    convert = time.perf_counter() - start
    size = args.size
    flops = count_flops(fcn, (1, 3, size, size))
    image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(0))
    a, b = torch.randn(GEMM, GEMM), torch.randn(GEMM, GEMM)
    a16, b16 = a.bfloat16(), b.bfloat16()
    maps: dict[str, np.ndarray] = {}
    once: dict[str, float] = {}
    runs: dict[str, Callable[[], object]] = {"gemm fp32": lambda: torch.mm(a, b),
                                             "gemm bf16": lambda: torch.mm(a16, b16)}
    for runtime, precision in PATHS:
        if not available(runtime):
            print(f"  ({runtime} is not installed: skipped)")
            continue
        key = f"{runtime} {precision}"

        def run(key: str = key, runtime: str = runtime, precision: str = precision) -> None:
            maps[key] = dense_map(fcn, image, precision=precision, runtime=runtime)  # type: ignore[arg-type]

        start = time.perf_counter()
        run()  # the one-time costs: the runner's preparation, the export and compilation
        once[key] = time.perf_counter() - start
        runs[key] = run
    rounds = [{key: timed(run) for key, run in runs.items()} for _ in range(args.rounds)]
    for r in rounds:
        for precision in ("fp32", "bf16"):
            r[f"peak {precision}"] = 2 * GEMM**3 / r[f"gemm {precision}"] / 1e9
    peaks = {p: statistics.median(r[f"peak {p}"] for r in rounds) for p in ("fp32", "bf16")}
    print(f"\n{name} {size}x{size}: dense pass {flops / 1e9:.1f} GFLOP (FlopCounterMode); converted in "
          f"{convert:.2f} s; GEMM peak ({GEMM}² matmul, same rounds) fp32 {peaks['fp32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.0f} GFLOP/s")
    print(f"  {'path':<20}{'seconds':>9}{'GFLOP/s':>9}{'% peak':>8}{'vs torch':>9}{'rel. error':>12}"
          f"{'first call s':>14}")
    for key in (k for k in runs if not k.startswith("gemm")):
        precision = key.split()[1]
        seconds = statistics.median(r[key] for r in rounds)
        of_peak = statistics.median(100 * flops / r[key] / 1e9 / r[f"peak {precision}"] for r in rounds)
        speedup = statistics.median(r[f"torch {precision}"] / r[key] for r in rounds)
        error = _rel(maps[key], maps["torch fp32"])
        print(f"  {key:<20}{seconds:>9.3f}{flops / seconds / 1e9:>9.0f}{of_peak:>7.1f}%{speedup:>8.2f}x"
              f"{error:>12.1e}{once[key]:>14.2f}")
    for precision in ("fp32", "bf16"):
        chosen = runner_on("auto", runner_for(fcn, precision, torch.device("cpu")), fcn,  # type: ignore[arg-type]
                           (1, 3, size, size))
        print(f"  runtime='auto' chooses for {precision}: {getattr(chosen, 'runtime', 'torch')}")
    if not args.no_profile:
        for precision in ("fp32", "bf16"):
            shares = breakdown(fcn, image, precision)
            convs = statistics.median(r[f"torch {precision}"] for r in rounds) * shares["convolutions"]
            of_peak = 100 * flops / convs / 1e9 / peaks[precision]
            print(f"  torch {precision} dense pass by kind (self CPU time): "
                  + ", ".join(f"{k} {100 * v:.1f} %" for k, v in shares.items())
                  + f"; its convolutions alone {convs:.3f} s = {of_peak:.0f} % of the peak")
    print(f"  medians of {args.rounds} interleaved rounds; '% peak' and 'vs torch' (speedup over torch in "
          "the same precision) taken within each round; 'first call s': the first map's time (runner "
          "preparation, ONNX export, compilation), out of every other timer")


def _rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians over them)")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-kind breakdown")
    args = parser.parse_args(argv)
    logging.getLogger("convolutionalize").setLevel(logging.WARNING)
    versions: list[Any] = [f"torch {torch.__version__}"]
    for module in ("onnxruntime", "openvino"):
        if available(module):
            versions.append(f"{module} {__import__(module).__version__}")
    print(f"{', '.join(versions)}; {torch.get_num_threads()} threads")
    for name in args.models:
        bench(name, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
