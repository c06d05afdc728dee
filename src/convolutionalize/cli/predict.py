"""``convolutionalize predict``: the dense class map of an image, saved as ``.npy`` or ``.zarr``.

A thin command: parse, call :func:`~convolutionalize.inference.dense_map`, move the result
into place, print one line. The map is written under a temporary name next to the output
and renamed on success, so bad input or a failed run never leaves a file at the output
path. An interrupted ``.zarr`` run leaves ``OUTPUT.partial.zarr``; the same command resumes it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, get_args

import numpy as np

from .._files import atomic_path
from ..inference import dense_map
from ..inference._runner import Precision
from ..models import default_input_size, load_model
from .options import add_model_output, int_at_least

__all__ = ["predict", "register"]

SUFFIXES = (".npy", ".zarr")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``predict`` subcommand to ``sub`` (the parser's subparsers), with ``common`` options."""
    predict_parser = sub.add_parser("predict", parents=[common], help="the dense class map of an image "
                                    "(every native-size window scored), saved as .npy or .zarr")
    predict_parser.add_argument("image", metavar="IMAGE", type=Path, help="image file: PNG/JPEG, "
                                ".npy, .zarr, or a (pyramidal) TIFF read lazily tile by tile")
    predict_parser.add_argument("-o", "--output", required=True, type=Path, metavar="MAP",
                                help="MAP.npy (in memory) or MAP.zarr (written tile by tile, "
                                "resumable)")
    predict_parser.add_argument("--tile", type=int_at_least(1), metavar="N", help="input pixels per "
                                "tile side (default: chosen from a memory budget)")
    predict_parser.add_argument("--precision", choices=get_args(Precision), default="fp32",
                                help="fp32 (exact, default) or bf16 (faster on CPUs with AMX)")
    predict_parser.add_argument("--batch-size", type=int_at_least(1), metavar="B",
                                help="tiles per forward pass (default: 1)")
    predict_parser.add_argument("--scheduler", metavar="ADDRESS", help="run tiles as dask tasks: "
                                "a dask.distributed scheduler address, or threads/processes")
    predict_parser.add_argument("--mean", type=float, nargs="+", metavar="M",
                                help="per-channel mean after scaling to [0, 1] (default: the "
                                "model's own, else ImageNet's)")
    predict_parser.add_argument("--std", type=float, nargs="+", metavar="S",
                                help="per-channel std (default: the model's own, else ImageNet's)")
    predict_parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                                help="a progress bar over tiles on stderr (default: on)")
    add_model_output(predict_parser)
    predict_parser.set_defaults(command=predict)


def predict(args: argparse.Namespace) -> int:
    """Run ``predict``; errors (ValueError, TypeError, OSError) propagate to ``cli.main``."""
    output: Path = args.output
    suffix = output.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"output {output} must end in .npy or .zarr")
    if suffix == ".zarr" and output.exists():
        raise ValueError(f"output {output} exists; remove it or pass another -o")
    if not args.image.exists():
        raise ValueError(f"image {args.image} does not exist")
    model = load_model(args.model, args.weights, trust_pickle=args.trust_pickle)
    input_size = (tuple(args.input_size) if args.input_size is not None
                  else default_input_size(args.model, model))
    partial = output.with_name(output.stem + ".partial.zarr") if suffix == ".zarr" else None
    result = dense_map(model, args.image, input_size=input_size, pool=args.pool, tile=args.tile,
                       out=partial, precision=args.precision, batch_size=args.batch_size,
                       mean=args.mean, std=args.std, scheduler=args.scheduler, progress=args.progress,
                       output=args.model_output, output_stride=args.output_stride)
    if partial is not None:
        os.replace(partial, output)
    else:
        _save_npy(np.asarray(result), output)
    classes, rows, cols = result.shape
    print(f"wrote {output}: {classes} classes x {rows} x {cols} cells ({args.precision})")
    return 0


def _save_npy(array: np.ndarray, output: Path) -> None:
    """``np.save`` to a temporary file beside ``output``, renamed into place when complete."""
    with atomic_path(output) as temp:
        np.save(temp, array)



