"""Benchmark: peak memory and throughput of a zarr image streamed to a zarr map.

Writes a ``SIZE x SIZE x 3`` uint8 zarr image (random pixels, chunk by chunk), then in a fresh
subprocess runs ``dense_map(fcn, image, out=map.zarr)`` at the default settings (the columns of
tiles streamed, :mod:`convolutionalize.inference._stream`), ``fcn`` being ``shufflenet_v2_x0_5``
converted before the timer, and reports that process's peak RSS (``resource.getrusage``) and its
per-pixel throughput, against an in-memory numpy run of the same converted model on a
``REFERENCE``-square image in another subprocess. Each run is in its own process, so neither
inherits the other's caches or memory. One-time costs are out of both timers: conversion, and
the runner's preparation (in-memory: timed on later calls, the median of five runs in a
process before the streamed run and five in one after it; streamed: the
runner and its stream plan made first). oneDNN's per-shape setup is in the streamed timer only
(its pieces come in a few shapes, each set up once). Reading the image and writing the map are
in the streamed timer (that is the work). Run with ``.venv/bin/python benchmarks/out_of_core.py
[--size 16384] [--reference 2048] [--precision fp32] [--budget-mib N] [--no-streams]
[--no-strips]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = "shufflenet_v2_x0_5"
CHUNK = 1024
REFERENCE_ROUNDS = 5  # the in-memory pass takes 0.2 s: five runs before the stream, five after


def make_image(path: Path, size: int) -> None:
    import zarr

    array = zarr.create_array(path, overwrite=True, shape=(size, size, 3), chunks=(CHUNK, CHUNK, 3),
                              dtype="uint8")
    rng = np.random.default_rng(0)
    for y in range(0, size, CHUNK):
        for x in range(0, size, CHUNK):
            h, w = min(CHUNK, size - y), min(CHUNK, size - x)
            array[y:y + h, x:x + w] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def child(mode: str, image: str, out: str, precision: str, size: int, budget: int) -> None:
    """Run one dense map in this (fresh) process and print its time and peak RSS as JSON."""
    import torch
    import torchvision
    import zarr

    from convolutionalize import convolutionalize, dense_map
    from convolutionalize.inference import dense
    from convolutionalize.inference._runner import runner_for

    if budget:
        dense.TILE_BUDGET = budget

    model = torchvision.models.get_model(MODEL, weights=None).eval()
    fcn = convolutionalize(model, 224)  # out of both timers
    if mode == "stream":
        source = zarr.open_array(image, mode="r")
        pixels = source.shape[0] * source.shape[1]
        runner_for(fcn, precision, torch.device("cpu")).stream_plan()  # one-time: out of the timer
        start = time.perf_counter()
        dense_map(fcn, source, out=out, precision=precision)
        seconds = time.perf_counter() - start
    else:
        array = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        pixels = size * size
        dense_map(fcn, array, precision=precision, runtime="torch")  # warm-up; torch, as the streams run
        runs = []
        for _ in range(REFERENCE_ROUNDS):
            start = time.perf_counter()
            dense_map(fcn, array, precision=precision, runtime="torch")
            runs.append(time.perf_counter() - start)
        seconds = sorted(runs)[len(runs) // 2]
        print(json.dumps({"runs": runs}))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    print(json.dumps({"seconds": seconds, "pixels": pixels, "peak_bytes": peak,
                      "threads": torch.get_num_threads()}))


def run_child(*args: str) -> dict:
    os.sync()  # the writeback of what earlier runs wrote would otherwise run during this one
    result = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                            capture_output=True, text=True)
    lines = [json.loads(line) for line in result.stdout.strip().splitlines() if line.startswith("{")]
    return {k: v for line in lines for k, v in line.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--reference", type=int, default=2048)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--workdir", type=Path, help="where the zarr image and map go (default: a temp dir)")
    parser.add_argument("--budget-mib", type=int, default=0,
                        help="override the library's TILE_BUDGET (MiB) that sets the default tile")
    parser.add_argument("--no-streams", action="store_true", help="compute the tiles one by one, each "
                        "with its halo (CONVOLUTIONALIZE_STREAMS=0), as before streams, for comparison")
    parser.add_argument("--no-strips", action="store_true", help="run every tile's stem in one pass "
                        "(CONVOLUTIONALIZE_STRIPS=0), as before strips, for comparison")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.no_strips:
        os.environ["CONVOLUTIONALIZE_STRIPS"] = "0"  # inherited by the children
    if args.no_streams:
        os.environ["CONVOLUTIONALIZE_STREAMS"] = "0"
    if args.child:
        mode, image, out, precision, size, budget = args.child
        child(mode, image, out, precision, int(size), int(budget))
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ooc-"))
    image, out = workdir / "image.zarr", workdir / "map.zarr"
    try:
        start = time.perf_counter()
        make_image(image, args.size)
        print(f"wrote {args.size}x{args.size}x3 uint8 zarr in {time.perf_counter() - start:.0f} s")
        budget = str(args.budget_mib << 20)
        reference = ("memory", "-", "-", args.precision, str(args.reference), budget)
        before = run_child(*reference)
        shutil.rmtree(out, ignore_errors=True)  # a --workdir's map of an earlier run (other weights)
        stream = run_child("stream", str(image), str(out), args.precision, str(args.size), budget)
        after = run_child(*reference)  # the machine drifts: the reference is taken on both sides
        runs = sorted(before["runs"] + after["runs"])
        memory = {**after, "seconds": runs[len(runs) // 2],
                  "peak_bytes": max(before["peak_bytes"], after["peak_bytes"])}
        print(f"in-memory runs before and after: {', '.join(f'{r:.3f}' for r in before['runs'])} | "
              f"{', '.join(f'{r:.3f}' for r in after['runs'])} s")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    gib = 1 << 30
    for label, r in (("in memory", memory), ("zarr -> zarr", stream)):
        side = round(r["pixels"] ** 0.5)
        print(f"{label:<13} {side}x{side}: {r['seconds']:8.1f} s  "
              f"{r['pixels'] / r['seconds'] / 1e6:6.2f} Mpixel/s  peak RSS {r['peak_bytes'] / gib:5.2f} GiB  "
              f"({r['threads']} threads, {args.precision})")
    ratio = (stream["pixels"] / stream["seconds"]) / (memory["pixels"] / memory["seconds"])
    print(f"streamed throughput / in-memory throughput: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
