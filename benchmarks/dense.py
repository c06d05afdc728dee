"""Benchmark: dense maps against crop-by-crop classification, side by side, on this machine.

For ResNet-18 and ResNet-50 (random weights, seeded; speed does not depend on them) at 768² and 2048²
(stride 32, native window 224), times:

- crop by crop, batched, fp32: what users do today (every window cropped and classified;
  timed on ``--crop-sample`` windows and scaled to all of them, which is exact for a loop
  whose batches all cost the same);
- the classifier on non-overlapping native crops (the per-pixel reference);
- ``dense_map`` fp32 (one pass, the exact default) and ``dense_map`` bf16 (autocast + AMX);
- with ``--unfused``: both again without the oneDNN fast path (``CONVOLUTIONALIZE_FUSION=0``);
- with ``--onnx``: the model exported to ONNX, convolutionalized, run by ``dense_map`` in
  onnxruntime (fp32);
- an n x n matmul in fp32 and in bf16 (this machine's GEMM peak in each precision).

This CPU is shared and its speed drifts by up to 2x between minutes, so every measurement is
taken in ``--rounds`` rounds that run each method in turn (sub-second runs repeated for half
a second, their median kept): each ratio (speedup, % of peak, per-pixel cost) is computed
within a round, from measurements taken under the same conditions, and the median over the
rounds is printed. Also printed: the FLOP-sharing ratio (crop-by-crop FLOPs / dense FLOPs) and
each speedup as a fraction of it, and the bf16 map's relative error against fp32.

Run with ``.venv/bin/python benchmarks/dense.py [--models resnet18 resnet50] [--sizes 768 2048]
[--rounds 5] [--crop-sample 32] [--unfused] [--onnx]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torchvision

from convolutionalize import convolutionalize, dense_map
from convolutionalize.flops import compare_flops

WINDOW = 224
BATCH = 32
GEMM = 2048


def timed(run: Callable[[], object], budget: float = 0.5) -> float:
    """Seconds of one run; the median of several when one takes under ``budget`` seconds."""
    times: list[float] = []
    while not times or (sum(times) < budget and len(times) < 15):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(runs: dict[str, Callable[[], object]], rounds: int) -> list[dict[str, float]]:
    """Seconds of every run, in ``rounds`` rounds that take each run in turn (after one warm-up
    run each: allocator, oneDNN primitives and packed weights for the shape)."""
    for run in runs.values():
        run()
    return [{name: timed(run) for name, run in runs.items()} for _ in range(rounds)]


def crops(model: torch.nn.Module, image: torch.Tensor, stride: int,
          sample: int) -> tuple[Callable[[], None], int, int]:
    """A run classifying ``sample`` window crops in batches of ``BATCH``, the windows it
    classifies and the image's window count."""
    views = image.unfold(1, WINDOW, stride).unfold(2, WINDOW, stride)  # C, rows, cols, 224, 224
    rows, cols = views.shape[1:3]
    index = [(i, j) for i in range(rows) for j in range(cols)][:sample]

    def run() -> None:
        with torch.inference_mode():
            for k in range(0, len(index), BATCH):
                model(torch.stack([views[:, i, j] for i, j in index[k:k + BATCH]]))

    return run, len(index), rows * cols


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """``dense_map`` without the oneDNN fast path while inside (its documented switch)."""
    os.environ["CONVOLUTIONALIZE_FUSION"] = "0"
    try:
        yield
    finally:
        del os.environ["CONVOLUTIONALIZE_FUSION"]


def bench(name: str, size: int, args: argparse.Namespace) -> None:
    torch.manual_seed(0)  # the same random weights in every run (the bf16 error depends on them)
    model = torchvision.models.get_model(name, weights=None).eval()
    fcn = convolutionalize(model, (WINDOW, WINDOW))
    flops = compare_flops(model, fcn, (size, size))
    image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(0))
    crop_run, sampled, windows = crops(model, image, 32, args.crop_sample)
    native_run, native_sampled, _ = crops(model, image, WINDOW, args.crop_sample)
    a, b = (torch.randn(GEMM, GEMM), torch.randn(GEMM, GEMM))
    a16, b16 = a.bfloat16(), b.bfloat16()
    maps: dict[str, np.ndarray] = {}

    def mapping(key: str, precision: str = "fp32", model: Any = fcn,
                context: Callable[[], Any] = contextlib.nullcontext) -> Callable[[], None]:
        def run() -> None:
            with context():
                # the torch path (benchmarks/runtimes.py compares the other runtimes)
                maps[key] = dense_map(model, image, precision=precision, runtime="torch")
        return run

    runs: dict[str, Callable[[], object]] = {
        "crops": crop_run, "native": native_run,
        "gemm fp32": lambda: torch.mm(a, b), "gemm bf16": lambda: torch.mm(a16, b16),
        "dense fp32": mapping("dense fp32"), "dense bf16": mapping("dense bf16", "bf16")}
    if args.unfused:
        runs["dense fp32 unfused"] = mapping("dense fp32 unfused", context=unfused)
        runs["dense bf16 unfused"] = mapping("dense bf16 unfused", "bf16", context=unfused)
    if args.onnx:
        onnx_fcn = convolutionalize(exported(model))
        runs["dense ONNX fp32 (ORT)"] = mapping("dense ONNX fp32 (ORT)", model=onnx_fcn)
    rounds = interleaved(runs, args.rounds)
    for r in rounds:  # per round: all windows crop by crop, native cost per pixel, GEMM peaks
        r["crops"] *= windows / sampled
        r["native"] /= native_sampled * WINDOW**2
        for precision in ("fp32", "bf16"):
            r[f"peak {precision}"] = 2 * GEMM**3 / r[f"gemm {precision}"] / 1e9

    print(f"\n{name} {size}x{size}: {windows} windows, FLOP-sharing ratio {flops.ratio:.1f}x "
          f"(crop by crop {flops.crop_by_crop / 1e12:.2f} TFLOP, dense {flops.dense / 1e9:.1f} GFLOP); "
          f"GEMM peak fp32 {statistics.median(r['peak fp32'] for r in rounds):.0f} GFLOP/s, "
          f"bf16 {statistics.median(r['peak bf16'] for r in rounds):.0f} GFLOP/s")
    print(f"  {'method':<28}{'seconds':>9}{'speedup':>9}{'/ ratio':>9}{'GFLOP/s':>9}{'% peak':>8}"
          f"{'ns/pixel':>10}{'/ native':>10}")
    for key in ("crops", *(key for key in runs if key.startswith("dense"))):
        count = flops.crop_by_crop if key == "crops" else flops.dense
        peak = "peak bf16" if "bf16" in key else "peak fp32"
        seconds = statistics.median(r[key] for r in rounds)
        speedup = statistics.median(r["crops"] / r[key] for r in rounds)
        rate = statistics.median(count / r[key] / 1e9 for r in rounds)
        of_peak = statistics.median(100 * count / r[key] / 1e9 / r[peak] for r in rounds)
        pixel = "" if key == "crops" else f"{seconds / size**2 * 1e9:>10.1f}" + \
            f"{statistics.median(r[key] / size**2 / r['native'] for r in rounds):>10.2f}"
        title = "crop by crop fp32 (batched)" if key == "crops" else key
        print(f"  {title:<28}{seconds:>9.2f}{speedup:>8.1f}x{speedup / flops.ratio:>9.2f}{rate:>9.1f}"
              f"{of_peak:>7.0f}%{pixel}")
    bound = statistics.median(r["crops"] * r["peak bf16"] * 1e9 / flops.dense for r in rounds)
    print(f"  bound: dense bf16 at the bf16 GEMM peak would be {bound:.0f}x crop by crop fp32")
    native = statistics.median(r["native"] for r in rounds)
    print(f"  medians of {args.rounds} interleaved rounds; crop by crop timed on {sampled} of {windows} "
          f"windows; native crops (non-overlapping, fp32) {native * 1e9:.1f} ns/pixel; bf16 vs fp32 "
          f"map: relative error {_rel(maps['dense bf16'], maps['dense fp32']):.2e}"
          + "".join(f"; {key} vs dense fp32: {_rel(maps[key], maps['dense fp32']):.2e}"
                    for key in maps if key not in ("dense fp32", "dense bf16")))


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
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians over them)")
    parser.add_argument("--crop-sample", type=int, default=32, help="windows timed crop by crop")
    parser.add_argument("--unfused", action="store_true", help="also time dense maps without the "
                        "oneDNN fast path (fused convolutions with packed weights)")
    parser.add_argument("--onnx", action="store_true", help="also time the model exported to ONNX, "
                        "convolutionalized and run by dense_map in onnxruntime")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models:
        for size in args.sizes:
            bench(name, size, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
