"""Benchmark: a whole-slide image that is 70 % glass, mapped with and without a foreground mask.

Writes a synthetic ``SIZE x SIZE`` pyramidal OME-TIFF slide (JPEG tiles of 512, levels 1, 1/4,
1/16, 1/64; 0.25 microns per pixel): grey glass with a little noise, and pink-purple "tissue"
(noisy) in three ellipses covering 29 % of the area, every level drawn from the same shapes.
Then, each in its own fresh process (peak RSS is that process's own),
``dense_map(fcn, slide, out=map.zarr)`` with ``mask="auto"`` and without, for
``shufflenet_v2_x0_5`` converted before the timer (conversion out of both timers; the mask,
computed from the coarsest level, inside the masked one). Printed: time, peak RSS, the share
of tiles computed, and the speed-up against the ideal ``1 / tissue`` (and against the share of
tiles that touch tissue, the most a per-tile skip can give).

Run with ``.venv/bin/python benchmarks/slides.py [--size 40000] [--mpp MPP]``.
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
TILE = 512
BASE_MPP = 0.25
ELLIPSES = ((0.3, 0.3, 0.22, 0.16), (0.7, 0.62, 0.18, 0.25), (0.35, 0.75, 0.12, 0.1))  # cy, cx, ry, rx


def tissue_share() -> float:
    """The share of the slide the ellipses cover (measured on a fine grid)."""
    y, x = np.mgrid[0:2000, 0:2000] / 2000.0
    return float(_tissue(y, x).mean())


def _tissue(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    inside = np.zeros(y.shape, bool)
    for cy, cx, ry, rx in ELLIPSES:
        inside |= ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
    return inside


def _tiles(size: int, texture: np.ndarray):  # type: ignore[no-untyped-def]
    """The level's 512 x 512 tiles, row by row, drawn from the ellipses (tissue: ``texture``)."""
    for y0 in range(0, size, TILE):
        for x0 in range(0, size, TILE):
            h, w = min(TILE, size - y0), min(TILE, size - x0)
            y, x = np.mgrid[y0:y0 + TILE, x0:x0 + TILE] / size
            inside = _tissue(y, x)
            tile = np.empty((TILE, TILE, 3), np.uint8)
            tile[:] = (226, 226, 228)
            tile[inside] = texture[inside]
            tile[h:], tile[:, w:] = 0, 0
            yield tile


def make_slide(path: Path, size: int) -> None:
    import tifffile

    rng = np.random.default_rng(0)
    texture = np.clip(np.array([190, 100, 170]) + rng.normal(0, 18, (TILE, TILE, 3)), 0, 255).astype(np.uint8)
    levels = [size // 4 ** k for k in range(4) if size // 4 ** k >= TILE]
    options = {"tile": (TILE, TILE), "photometric": "rgb", "compression": "jpeg", "dtype": np.uint8}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for k, side in enumerate(levels):
            mpp = BASE_MPP * size / side
            extra = ({"subifds": len(levels) - 1, "metadata": {"PhysicalSizeX": BASE_MPP,
                                                                "PhysicalSizeY": BASE_MPP}}
                     if k == 0 else {"subfiletype": 1})
            tif.write(_tiles(side, texture), shape=(side, side, 3), resolution=(1e4 / mpp,) * 2,
                      resolutionunit="CENTIMETER", **extra, **options)


def child(slide: str, out: str, masked: bool, mpp: float) -> None:
    """One dense map in this (fresh) process: its time, peak RSS and tiles, as JSON."""
    import torchvision
    import zarr

    from convolutionalize import convolutionalize, dense_map

    fcn = convolutionalize(torchvision.models.get_model(MODEL, weights=None).eval(), 224)
    start = time.perf_counter()
    dense_map(fcn, slide, out=out, mask="auto" if masked else None, mpp=mpp or None)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    group = zarr.open_group(out, mode="r")
    skipped = group["skipped"][:]
    print(json.dumps({"seconds": seconds, "peak": peak, "tiles": int(skipped.size),
                      "computed": int(skipped.size - skipped.sum()),
                      "fields": receptive_share(fcn, slide, group["map"].shape[1:]) if masked else None}))


def receptive_share(fcn, slide: str, cells: tuple[int, int]) -> float:  # type: ignore[no-untyped-def]
    """The share of the slide that the receptive fields of the auto mask's foreground cells
    cover: what an exact masked map must read at least (after the timer)."""
    from scipy import ndimage

    from convolutionalize.inference.images import open_frame

    geometry = fcn.geometry
    frame = open_frame(slide, 3, None, None, fcn, None, None)
    keep = frame.mask("auto").cells(geometry, frame.size, cells)
    unit = geometry.stride[0] // 2  # a raster of half-cells
    fine = np.repeat(np.repeat(keep, 2, 0), 2, 1).astype(np.uint8)
    covered = ndimage.maximum_filter(fine, size=-(-geometry.receptive_field[0] // unit)) > 0
    return float(covered.mean())


def run_child(*args: str) -> dict:
    os.sync()  # the writeback of what earlier runs wrote would otherwise run during this one
    result = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=40000)
    parser.add_argument("--mpp", type=float, default=0.0, help="map at this resolution (default: level 0)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        slide, out, masked, mpp = args.child
        child(slide, out, masked == "1", float(mpp))
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="slide-"))
    slide = workdir / "slide.ome.tif"
    try:
        start = time.perf_counter()
        if not slide.exists():  # a --workdir of an earlier run keeps its slide
            make_slide(slide, args.size)
        share = tissue_share()
        print(f"wrote a {args.size}x{args.size} slide ({slide.stat().st_size / 2**20:.0f} MiB, JPEG tiles, "
              f"{100 * share:.0f} % tissue) in {time.perf_counter() - start:.0f} s")
        runs = {}
        for masked in (True, False):
            out = workdir / f"map-{int(masked)}.zarr"
            runs[masked] = run_child(str(slide), str(out), str(int(masked)), str(args.mpp))
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    gib = 1 << 30
    for masked, r in runs.items():
        label = "mask=auto" if masked else "no mask"
        print(f"{label:<10} {r['seconds']:7.1f} s  peak RSS {r['peak'] / gib:.2f} GiB  "
              f"{r['computed']} of {r['tiles']} tiles computed")
    speedup = runs[False]["seconds"] / runs[True]["seconds"]
    computed = runs[True]["computed"] / runs[True]["tiles"]
    fields = runs[True]["fields"]
    print(f"speed-up {speedup:.2f}x; ideal 1/tissue {1 / share:.2f}x ({speedup * share:.2f} of it); "
          f"tiles touching tissue {100 * computed:.0f} %: per-tile ideal {1 / computed:.2f}x "
          f"({speedup * computed:.2f} of it); the foreground cells' receptive fields cover "
          f"{100 * fields:.1f} % of the slide: an exact map's ideal {1 / fields:.2f}x "
          f"({speedup * fields:.2f} of it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
