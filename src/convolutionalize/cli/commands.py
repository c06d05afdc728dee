"""The ``convolutionalize`` command line: inspect, convert and verify a classifier.

Each subcommand parses its options, calls the library, prints what it returned and
answers with an exit code: 0 success, 1 a verification failed, 2 bad input (an unknown
model, unreadable weights, a model that cannot be converted, a bad option value, an
unwritable output), reported as one ``convolutionalize: error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from .. import __version__
from ..geometry import PoolMode
from .options import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    PROG,
    SAVE_FORMATS,
    Deferred,
    Parser,
    cli_words,
    int_at_least,
    seeded,
)
from .predict import check_outputs
from .predict import register as register_predict
from .render import register as register_render

if TYPE_CHECKING:
    from torch import nn

    from ..api import ConversionInfo, conversion_info, convolutionalize
    from ..export import save
    from ..flops import FlopComparison, compare_flops
    from ..models import default_input_size, load_model
    from ..verify import VerifyReport, verify

__all__ = ["main"]

# The library, imported when a command runs: building the parser (--help) imports no framework.
_library = Deferred(__name__, {
    "nn": "torch", "conversion_info": "convolutionalize.api", "convolutionalize": "convolutionalize.api",
    "save": "convolutionalize.export", "compare_flops": "convolutionalize.flops",
    "ConvolutionalizedModule": "convolutionalize.frameworks.torch.layers",
    "default_input_size": "convolutionalize.models", "load_model": "convolutionalize.models",
    "verify": "convolutionalize.verify"})
__getattr__ = _library


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already reported
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    command: Callable[[argparse.Namespace], int] = args.command
    with _diagnostics(args.verbose):
        try:
            return command(args)
        except (ValueError, TypeError, OSError) as exc:  # NotConvolutionalizable is a ValueError
            print(f"{PROG}: error: {cli_words(_one_line(exc))}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt as exc:  # Ctrl-C: a store being written stays resumable (.partial)
            start = "\n" if sys.stderr.isatty() else ""  # below the ^C and any progress bar
            print(f"{start}{PROG}: {str(exc) or 'interrupted'}", file=sys.stderr)
            return EXIT_INTERRUPTED


# --------------------------------------------------------------------------- subcommands


def _inspect(args: argparse.Namespace) -> int:
    _library.load()
    model, fcn = _convert(args)
    info = conversion_info(fcn)
    lines = [f"model: {_label(args.model)} ({type(model).__name__}{_parameters(model)})",
             info.plan, info.geometry.describe(), _native_error_line(info)]
    if info.self_check is not None:
        lines.append(info.self_check)
    from ..frameworks import adapter_for
    from ..inference.runtimes import describe

    lines.append(describe(adapter_for(fcn).name))
    if args.image_size is not None:
        lines.append(_image_lines(args, model, fcn, info, tuple(args.image_size)))
    print("\n".join(lines))
    return EXIT_OK


def _parameters(model: object) -> str:
    from ..frameworks import adapter_for

    count = adapter_for(model).parameters(model)
    return "" if count is None else f", {count:,} parameters"


def _image_lines(args: argparse.Namespace, model: object, fcn: object, info: ConversionInfo,
                 size: tuple[int, int]) -> str:
    """Map size and, where the framework counts them and the original is at hand, FLOPs dense
    vs crop by crop on an image of ``size``."""
    from ..frameworks import adapter_for

    if adapter_for(fcn).counts_flops and model is not fcn:
        network = None
        if args.output_stride is not None:  # shift-and-stitch runs the network-stride model
            network = convolutionalize(model, _input_size(args, model), pool=args.pool)
        return _flops_lines(compare_flops(model, fcn, size, network))
    rows, cols = info.geometry.cells(*size)
    return (f"image: {size[0]}x{size[1]}  map: {rows}x{cols} cells  windows: {rows * cols}\n"
            "FLOPs: counted for PyTorch models only")


def _convert_command(args: argparse.Namespace) -> int:
    check_outputs([(None, args.output)], make=False)  # before the model is loaded and converted
    from ..frameworks import check_writable

    check_writable(args.output)
    _library.load()
    _, fcn = _convert(args)
    path = save(fcn, args.output)
    geometry = conversion_info(fcn).geometry
    (h, w), (sy, sx) = geometry.input_size, geometry.stride
    output = "N x classes" if geometry.pool == "global" else (
        f"N x classes x rows x cols, cell window {geometry.window[0]}x{geometry.window[1]} "
        f"stride {sy}x{sx}")
    print(f"wrote {path} ({path.suffix.lstrip('.')}, pool={geometry.pool}): input "
          f"H >= {h}, W >= {w} -> output {output}")
    return EXIT_OK


def _verify_command(args: argparse.Namespace) -> int:
    _library.load()
    with seeded(args.seed):
        model = load_model(args.model, args.weights, trust_pickle=args.trust_pickle)
    report = verify(
        model,
        _input_size(args, model),
        pool=args.pool,
        image_size=None if args.image_size is None else tuple(args.image_size),
        samples=args.samples,
        seed=args.seed,
        output_stride=args.output_stride,
    )
    print(_verify_lines(report, args.seed))
    return EXIT_OK if report.passed else EXIT_FAILED


# --------------------------------------------------------------------------- helpers


def _convert(args: argparse.Namespace) -> tuple[Any, Any]:
    with seeded(args.seed):
        model = load_model(args.model, args.weights, trust_pickle=args.trust_pickle)
    return model, convolutionalize(model, _input_size(args, model), pool=args.pool,
                                   output_stride=args.output_stride)


def _input_size(args: argparse.Namespace, model: nn.Module) -> tuple[int, int] | None:
    if args.input_size is not None:
        return (args.input_size[0], args.input_size[1])
    return default_input_size(args.model, model)


def _label(spec: str) -> str:
    """The model as named on the command line; a file by its name only."""
    source, _, name = spec.partition(":")
    return spec if source in ("torchvision", "timm") and name else Path(spec).name


def _native_error_line(info: ConversionInfo) -> str:
    h, w = info.geometry.input_size
    if info.native_error is None:
        return f"native error: not measured (pool={info.geometry.pool} has no native-size equality)"
    return f"native error: {info.native_error:.1e} (max relative, converted vs original at {h}x{w})"


def _flops_lines(flops: FlopComparison) -> str:
    height, width = flops.image_size
    if len(flops.map_size) == 3:
        classes, rows, cols = flops.map_size
        shape = f"{rows}x{cols} cells x {classes} classes"
    else:
        shape = " x ".join(map(str, flops.map_size))
    return "\n".join([
        f"image: {height}x{width}  map: {shape}  windows: {flops.windows}",
        f"FLOPs dense:        {_si(flops.dense)}  ({flops.dense:,}: the converted model, "
        "one pass over the image)",
        f"FLOPs crop by crop: {_si(flops.crop_by_crop)}  ({flops.crop_by_crop:,}: the original "
        f"on {flops.windows} windows, {_si(flops.per_crop)} each)",
        f"ratio: {flops.ratio:.1f}x (crop by crop / dense)",
        *([] if flops.shift_and_stitch is None else [
            f"FLOPs shift-and-stitch: {_si(flops.shift_and_stitch)}  ({flops.shift_and_stitch:,}: "
            "the network-stride map once per shift, counted on the whole image)",
            f"ratio: {flops.shift_and_stitch / flops.dense:.1f}x (shift-and-stitch / dense)"]),
    ])


def _verify_lines(report: VerifyReport, seed: int) -> str:
    h, w = report.geometry.input_size
    lines = [f"native error: {report.native_error:.1e} (converted vs original at {h}x{w})"]
    if report.self_check is not None:
        lines.append(report.self_check)
    if report.crop_error is None:
        lines.append(f"crop error: not measured (pool={report.geometry.pool} scores no windows)")
    else:
        height, width = report.image_size
        note = "" if report.crop_equivalent else "; informational: cells see context crops lack"
        lines.append(f"crop error: {report.crop_error:.1e} ({report.samples} cells of a "
                     f"{height}x{width} image, seed {seed}{note})")
    lines.append(f"crop equivalent: {'yes' if report.crop_equivalent else 'no'}")
    lines += [f"  - {note}" for note in report.geometry.notes]
    lines.append(f"tolerance: {report.tolerance:.0e}")
    lines.append("PASS" if report.passed else "FAIL")
    return "\n".join(lines)


def _si(count: int) -> str:
    """``1.23 G``: a count at a glance."""
    value, unit = float(count), ""
    for prefix in ("K", "M", "G", "T", "P"):
        if value < 1000:
            break
        value, unit = value / 1000, prefix
    return f"{value:.3g} {unit}".rstrip()


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


@contextlib.contextmanager
def _diagnostics(verbose: bool) -> Iterator[None]:
    """Library log messages and Python warnings on stderr with ``--verbose``, else neither."""
    logger = logging.getLogger(PROG)  # the whole library, not only the CLI
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    saved = logger.level
    if verbose:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


# --------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Rewrite a classifier's fully-connected head into "
                     "exactly equivalent convolutions, so it runs densely over images of any size.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    common = _common_options()

    inspect = sub.add_parser("inspect", parents=[common], help="show the head, the geometry "
                             "and, with --image-size, FLOPs dense vs crop by crop")
    _image_size_option(inspect, "also count FLOPs on an image of this size")
    inspect.set_defaults(command=_inspect)

    convert = sub.add_parser("convert", parents=[common], help="convert and save the model "
                             f"({', '.join(SAVE_FORMATS)}) with dynamic height and width")
    convert.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                         help="output file; its suffix picks the format: .onnx (ONNX), .pt2 "
                         "(torch.export), .pt (torch.save of the whole module)")
    convert.set_defaults(command=_convert_command)

    check = sub.add_parser("verify", parents=[common], help="measure the converted model "
                           "against the original; exit 1 when it fails")
    check.add_argument("--samples", type=int_at_least(1), default=8, metavar="K",
                       help="map cells compared with crops (default: 8)")
    _image_size_option(check, "image size for the crop check (default: native + 3 strides)")
    check.set_defaults(command=_verify_command)
    register_predict(sub, common)
    register_render(sub, common)
    return parser


def _common_options() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("model", metavar="MODEL", help="torchvision:NAME, timm:NAME, "
                        "demo:digits, a .pt2 file (torch.export), a .keras / .h5 / .onnx model file, "
                        "or a .pt/.pth file holding a whole pickled nn.Module (torch.save(model); "
                        "loading it runs its pickled code, so it needs --trust-pickle)")
    common.add_argument("--weights", metavar="W", help="'random', a state_dict file (loaded "
                        "weights-only, no trust needed), or a torchvision weights name "
                        "(default: the pretrained weights, downloaded once)")
    common.add_argument("--seed", type=int_at_least(0), default=0, metavar="S",
                        help="random seed: of --weights random's initialisation, and of verify's "
                        "image and cells (default: 0; the same seed gives the same figures)")
    common.add_argument("--trust-pickle", action="store_true", help="load a .pt/.pth "
                        "full-module pickle, running the code it holds: only for files you trust")
    common.add_argument("--input-size", nargs=2, type=int_at_least(1), metavar=("H", "W"),
                        help="native (training) input size (default: the model's own; 224 "
                        "for most torchvision models, 299 for inception_v3)")
    common.add_argument("--output-stride", type=int_at_least(1), metavar="S",
                        help="score a window every S pixels, below the network's stride (a trous: "
                        "S must divide it into factors its strided layers have; PyTorch models)")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="show progress messages and library warnings on stderr")
    common.add_argument("--pool", choices=get_args(PoolMode), default=None,
                        help="global pooling becomes: window (a stride-1 pool, cell = the "
                        "classifier on a native-size window; default), none (per feature "
                        "cell, CAM), global (one prediction per image); a converted model "
                        "keeps its own")
    return common


def _image_size_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--image-size", nargs=2, type=int_at_least(1), metavar=("H", "W"),
                        help=help_text)
