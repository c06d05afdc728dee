"""Benchmark: dense maps against crop-by-crop classification, side by side, on this machine.

For ResNet-18 and ResNet-50 (random weights; speed does not depend on them) at 768² and 2048²
(stride 32, native window 224), measures the median wall time (of ``--repeats`` runs, more
for runs under a second) of:

- crop by crop, batched, fp32: what users do today (every window cropped and classified;
  timed on ``--crop-sample`` windows and scaled to all of them, which is exact for a loop
  whose batches all cost the same);
- ``dense_map`` fp32 (one pass, the exact default) and ``dense_map`` bf16 (autocast + AMX);
- with ``--onnx``: the model exported to ONNX, convolutionalized, run by ``dense_map`` in
  onnxruntime (fp32).

and prints the FLOP-sharing ratio (crop-by-crop FLOPs / dense FLOPs), each speedup and the fp32
speedup as a fraction of that ratio, the achieved GFLOP/s against this machine's measured GEMM
peak in the same precision, the per-pixel cost of the dense pass against the classifier on
non-overlapping native crops, and the bf16 map's relative error against fp32.

Run with ``.venv/bin/python benchmarks/dense.py [--models resnet18 resnet50] [--sizes 768 2048]
[--repeats 3] [--crop-sample 32] [--onnx]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torchvision

from convolutionalize import convolutionalize, dense_map
from convolutionalize.flops import compare_flops

WINDOW = 224
BATCH = 32


def median_time(run: Callable[[], object], repeats: int, budget: float = 2.0) -> float:
    """Median seconds of ``repeats`` runs, or of more (up to 30) while they take under
    ``budget`` seconds in all: sub-second runs vary by 2x on a shared CPU."""
    run()  # warm-up: allocator, oneDNN primitives for this shape
    times: list[float] = []
    while len(times) < repeats or (sum(times) < budget and len(times) < 30):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_peak(dtype: torch.dtype, repeats: int, n: int = 2048) -> float:
    """Measured GFLOP/s of an ``n x n`` matmul in ``dtype`` (the peak to compare against)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = median_time(lambda: torch.mm(a, b), max(repeats, 5))
    return 2 * n**3 / seconds / 1e9


def crops_time(model: torch.nn.Module, image: torch.Tensor, stride: int, sample: int,
               repeats: int) -> tuple[float, int]:
    """Seconds per window crop, classified in batches of ``BATCH``, and the window count."""
    views = image.unfold(1, WINDOW, stride).unfold(2, WINDOW, stride)  # C, rows, cols, 224, 224
    rows, cols = views.shape[1:3]
    index = [(i, j) for i in range(rows) for j in range(cols)][:sample]

    def run() -> None:
        with torch.inference_mode():
            for k in range(0, len(index), BATCH):
                batch = torch.stack([views[:, i, j] for i, j in index[k:k + BATCH]])
                model(batch)

    return median_time(run, repeats) / len(index), rows * cols


def bench(name: str, size: int, args: argparse.Namespace, peaks: dict[str, float]) -> None:
    model = torchvision.models.get_model(name, weights=None).eval()
    fcn = convolutionalize(model, (WINDOW, WINDOW))
    flops = compare_flops(model, fcn, (size, size))
    image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(0))
    per_crop, windows = crops_time(model, image, 32, args.crop_sample, args.repeats)
    crop_s = per_crop * windows
    native = (size // WINDOW) ** 2
    native_per_pixel = crops_time(model, image, WINDOW, min(native, args.crop_sample), args.repeats)[0] \
        / WINDOW**2
    maps: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        def run(precision: str = precision) -> None:
            maps[precision] = dense_map(fcn, image, precision=precision)
        seconds[precision] = median_time(run, args.repeats)
    if args.onnx:
        onnx_fcn = convolutionalize(exported(model))
        maps["onnx"] = dense_map(onnx_fcn, image)
        seconds["onnx"] = median_time(lambda: dense_map(onnx_fcn, image), args.repeats)
    error = _rel(maps["bf16"], maps["fp32"])
    print(f"\n{name} {size}x{size}: {windows} windows, FLOP-sharing ratio {flops.ratio:.1f}x "
          f"(crop by crop {flops.crop_by_crop / 1e12:.2f} TFLOP, dense {flops.dense / 1e9:.1f} GFLOP)")
    print(f"  {'method':<26}{'seconds':>10}{'speedup':>9}{'/ ratio':>9}{'GFLOP/s':>9}{'% peak':>8}"
          f"{'ns/pixel':>10}{'/ native':>10}")
    rows = [("crop by crop fp32 (batched)", crop_s, flops.crop_by_crop, "fp32", None),
            ("dense fp32", seconds["fp32"], flops.dense, "fp32", seconds["fp32"] / size**2),
            ("dense bf16", seconds["bf16"], flops.dense, "bf16", seconds["bf16"] / size**2)]
    if args.onnx:
        rows.append(("dense ONNX fp32 (ORT)", seconds["onnx"], flops.dense, "fp32",
                     seconds["onnx"] / size**2))
    for label, secs, count, precision, per_pixel in rows:
        speedup = crop_s / secs
        rate = count / secs / 1e9
        pixel = "" if per_pixel is None else f"{per_pixel * 1e9:>10.1f}{per_pixel / native_per_pixel:>10.2f}"
        print(f"  {label:<26}{secs:>10.2f}{speedup:>8.1f}x{speedup / flops.ratio:>9.2f}{rate:>9.1f}"
              f"{100 * rate / peaks[precision]:>7.0f}%{pixel}")
    print(f"  native crops (non-overlapping, fp32): {native_per_pixel * 1e9:.1f} ns/pixel; "
          f"crop-by-crop timed on {min(args.crop_sample, windows)} of {windows} windows; "
          f"bf16 vs fp32 map: relative error {error:.1e}"
          + (f"; ONNX vs PyTorch fp32 map: {_rel(maps['onnx'], maps['fp32']):.1e}" if args.onnx else ""))


def _rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def exported(model: torch.nn.Module) -> Any:
    """``model`` exported to ONNX at the native size (a static graph, as deployed): a ModelProto."""
    import io
    import warnings

    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(model, (torch.randn(1, 3, WINDOW, WINDOW),), buffer, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[768, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crop-sample", type=int, default=32, help="windows timed crop by crop")
    parser.add_argument("--onnx", action="store_true", help="also time the model exported to ONNX, "
                        "convolutionalized and run by dense_map in onnxruntime")
    args = parser.parse_args(argv)
    peaks = {"fp32": gemm_peak(torch.float32, args.repeats), "bf16": gemm_peak(torch.bfloat16, args.repeats)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs; "
          f"GEMM peak fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    for name in args.models:
        for size in args.sizes:
            bench(name, size, args, peaks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
