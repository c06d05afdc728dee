"""The picture-making subcommands of the command line: ``heatmap``, ``detect`` and ``demo``.

``heatmap`` and ``detect`` load MODEL (``models.load_model``), convolutionalize it, run it
over IMAGE and write a PNG / JSON; ``demo`` trains and scores the digits detector. ``detect``
runs it once per ``--scales`` scale (an image pyramid, boxes in the image's own pixels) and
refines the boxes with the model's ``--box-output`` (MTCNN's convention). Outputs are written
only after everything succeeded, through a temporary file renamed into place.

Image rule: the library's one reader (:func:`~convolutionalize.inference.images.open_picture`)
reads IMAGE exactly as ``predict`` and ``dense_map`` do: converted to the model's channel count
(1: grey, 3: RGB), scaled to [0, 1] and normalised with ``--mean``/``--std``, by default the
model's own (timm's ``pretrained_cfg``), else ImageNet's for 3-channel models, else none (the
digits model reads 0..1 grey). It also gives the RGB picture that maps and boxes are drawn on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._files import atomic_path
from .._status import status
from .options import EXIT_OK, add_model_output, fraction, int_at_least, model_output, seeded
from .predict import add_normalization, check_outputs, image_jobs, made_folders
from .status import add_progress, say, shown, status_lines

if TYPE_CHECKING:  # the commands import the library when they run: --help imports no framework
    import numpy as np
    import torch
    from PIL import Image
    from torch import nn

    from ..geometry import Geometry

SLIDE_WIDTH = 1200  # a slide's heatmap picture, in pixels

__all__ = ["register"]



def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``heatmap``, ``detect`` and ``demo`` to the ``sub`` subparsers of the main parser."""
    heat = sub.add_parser("heatmap", parents=[common], help="draw the class probability map "
                          "over IMAGE (PNG)")
    _image_options(heat)
    heat.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.png",
                      help="the PNG to write (one panel per class: the image and its colorbar); a "
                      "folder for several images")
    heat.add_argument("--mpp", type=float, metavar="UM", help="a whole-slide IMAGE read at UM "
                      "microns per pixel (default: level 0); slides are drawn on a thumbnail")
    heat.add_argument("--mask", metavar="auto|FILE", help="map only tiles with foreground ('auto': "
                      "tissue by colour saturation; or a mask of the whole image); the rest stays unpainted")
    heat.add_argument("--width", type=int_at_least(16), metavar="PX", help="the picture's width: the "
                      "image is drawn scaled to it (default: the image's own; 1200 for slides)")
    add_progress(heat, "progress bars over a slide's tiles and over images")
    heat.add_argument("--vmin", type=float, metavar="V", help="the probability at the colour scale's "
                      "bottom (default: the map's least; the panel's title and colour bar show the span)")
    heat.add_argument("--vmax", type=float, metavar="V", help="the probability at the colour scale's "
                      "top (default: the map's greatest, so a map that peaks at 0.02 still shows where; "
                      "--vmin 0 --vmax 1 compares pictures on one scale)")
    which = heat.add_mutually_exclusive_group()
    which.add_argument("--class", dest="class_index", type=int_at_least(0), metavar="K",
                       help="draw class K")
    which.add_argument("--top", type=int_at_least(1), default=1, metavar="N",
                       help="draw the N classes with the highest peak probability, one panel "
                       "each (default: 1; the background class is skipped)")
    heat.set_defaults(command=_heatmap_command)

    find = sub.add_parser("detect", parents=[common], help="find objects in IMAGE: local "
                          "maxima of each class map, boxes, non-maximum suppression (JSON)")
    _image_options(find)
    find.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.json|OUT.png",
                      help="its suffix picks what is written: .json, a list of {label, name, score, "
                      "box: [x0, y0, x1, y1]}; .png, the boxes drawn on the image (a folder of "
                      ".json for several images)")
    find.add_argument("--draw", type=Path, metavar="OUT.png", help="also draw the boxes on the image "
                      "(a folder for several images)")
    add_progress(find, "a progress bar over several images")
    find.add_argument("--threshold", type=fraction(True), default=0.5, metavar="T",
                      help="minimum class probability, in (0, 1] (default: 0.5)")
    find.add_argument("--iou", type=fraction(False), default=0.3, metavar="IOU",
                      help="same-class boxes overlapping more than this are suppressed, in [0, 1] "
                      "(default: 0.3)")
    find.add_argument("--exclusive-iou", type=fraction(False), default=None, metavar="IOU",
                      help="also suppress boxes of other classes overlapping a better box by "
                      "more than this (one object per place; default: off)")
    find.add_argument("--scales", type=_positive_float, nargs="+", metavar="S", help="look at "
                      "the image resized by each S (an image pyramid: 0.5 finds objects twice the "
                      "window's size); boxes stay in the image's pixels (default: 1, the image as it is)")
    find.add_argument("--box-output", type=model_output, metavar="K", help="the model's output "
                      "(index or name) that regresses boxes: four offsets per cell as fractions of "
                      "the window (MTCNN's convention) refine each box (default: the windows)")
    find.set_defaults(command=_detect_command)

    demo = sub.add_parser("demo", help="train a digits classifier on scikit-learn's "
                          "load_digits, convolutionalize it and find the digits on held-out pages")
    demo.add_argument("--output", type=Path, default=Path("demo-output"), metavar="DIR",
                      help="output directory (default: demo-output)")
    demo.add_argument("--seed", type=int_at_least(0), default=0, metavar="S",
                      help="random seed of the split, the training and the pages (default: 0)")
    demo.add_argument("-v", "--verbose", action="store_true", help="library messages on stderr")
    demo.set_defaults(command=_demo_command)


def _positive_float(text: str) -> float:
    """An argparse type: a positive finite number (a scale)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", metavar="IMAGE", nargs="+", type=Path, help="PNG or JPEG images "
                        "(paths, folders, globs), at least the model's window in size; read as predict "
                        "reads them: converted to the model's channels, scaled to 0..1, normalised "
                        "(--mean, --std). With several, -o is a folder")
    parser.add_argument("--labels", type=Path, metavar="FILE", help="class names, one per line "
                        "(default: the model's own 'labels' attribute, else 'class K')")
    parser.add_argument("--background-class", type=int_at_least(0), metavar="K",
                        help="the 'nothing here' class: never detected, not ranked (default: the "
                        "model's 'background_class' attribute, else none)")
    add_normalization(parser)
    add_model_output(parser)


# --------------------------------------------------------------------------- commands


def _heatmap_command(args: argparse.Namespace) -> int:
    jobs = image_jobs(args.images, args.output, "png", ())
    _check_suffixes(jobs, (".png",), "heatmap draws PNG pictures")
    check_outputs(jobs, make=len(jobs) > 1)  # one picture goes to a folder that exists
    if args.vmin is not None and args.vmax is not None and not args.vmin < args.vmax:
        raise ValueError(f"--vmin {args.vmin} must be below --vmax {args.vmax}")
    with status_lines(shown(args)):
        loaded = _load(args)
        with made_folders(jobs):
            for path, output in _progress(jobs, args):
                picture = _heatmap_picture(args, loaded, path)
                with atomic_path(output) as tmp:
                    picture.save(tmp, format="PNG")
                say(f"wrote {output} ({picture.width}x{picture.height})")
    return EXIT_OK


def _heatmap_picture(args: argparse.Namespace, loaded: _Loaded, path: Path) -> Image.Image:
    """One image's heatmap: a slide's map over its thumbnail, else the image's map over it."""
    import numpy as np
    from PIL import Image

    from ..detect import class_probabilities
    from ..inference import dense_map
    from ..inference.slides import thumbnail
    from ..render import heatmap

    if _is_slide(path, args):
        result = dense_map(loaded.fcn, path, mpp=args.mpp, mask=args.mask, output=args.model_output,
                           mean=args.mean, std=args.std, progress=shown(args))
        logits, geometry = ((result.map, result.geometry) if args.mpp is not None
                            else (result, loaded.geometry))
        picture, scale = thumbnail(path, args.width or SLIDE_WIDTH)
        probs = _softmax(np.asarray(logits))
    else:
        if args.mask is not None:
            raise ValueError("--mask skips background tiles of slides; pass a slide, or leave --mask out")
        image, tensor = _image_and_tensor(args, loaded, path)
        probs = class_probabilities(loaded.fcn, tensor, output=args.model_output)
        geometry, picture, scale = loaded.geometry, image, 1.0
        if args.width is not None and args.width != image.width:
            height = max(round(image.height * args.width / image.width), 1)
            picture = image.resize((args.width, height), Image.Resampling.LANCZOS)
            scale = (height / image.height, args.width / image.width)
    labels, background = loaded.labels, loaded.background
    return heatmap(picture, probs, geometry, class_index=args.class_index, top=args.top, labels=labels,
                   background_class=background, scale=scale, vmin=args.vmin, vmax=args.vmax)


def _detect_command(args: argparse.Namespace) -> int:
    from ..detect import detect, detection_maps
    from ..render import class_name

    jobs = image_jobs(args.images, args.output, "json", ())
    _check_suffixes(jobs, (".json", ".png"), "detect writes the detections as JSON (.json) or draws "
                    "them (.png)")
    drawn = [] if args.draw is None else image_jobs(args.images, args.draw, "png", ())
    _check_suffixes(drawn, (".png",), "--draw draws PNG pictures")
    drawings = [out for _, out in drawn] if drawn else [None] * len(jobs)
    check_outputs(jobs + drawn, make=len(jobs) > 1)  # one image's files go to folders that exist
    with status_lines(shown(args)):
        loaded = _load(args)
        with made_folders(jobs + drawn):
            for (path, output), drawing in zip(_progress(jobs, args), drawings):
                image, tensor = _image_and_tensor(args, loaded, path)
                probs, boxes = detection_maps(loaded.fcn, tensor, scales=args.scales,
                                              output=args.model_output, box_output=args.box_output)
                found = detect(probs, threshold=args.threshold, background_class=loaded.background,
                               iou=args.iou, exclusive_iou=args.exclusive_iou, boxes=boxes)
                records = [{**d.to_dict(), "name": class_name(d.label, loaded.labels)} for d in found]
                files = {output: records, **({} if drawing is None else {drawing: records})}
                _write_detections(files, image, found, loaded.labels)
                say(f"{len(found)} detections -> {', '.join(map(str, files))}")
    return EXIT_OK


def _write_detections(files: dict[Path, list[dict[str, Any]]], image: Image.Image, found: list[Any],
                      labels: list[str] | None) -> None:
    """Each of ``files`` in the format its suffix names (JSON, or the boxes drawn in a PNG); all
    of them appear only when all are written."""
    from ..render import draw_detections

    with contextlib.ExitStack() as stack:
        for path, records in files.items():
            tmp = stack.enter_context(atomic_path(path))
            if path.suffix.lower() == ".png":
                draw_detections(image, found, labels).save(tmp, format="PNG")
            else:
                tmp.write_text(json.dumps(records, indent=2) + "\n")


def _check_suffixes(jobs: list[tuple[Path, Path]], suffixes: tuple[str, ...], what: str) -> None:
    """The output's suffix picks its format: refuse one that names no format the command writes."""
    for _, output in jobs:
        if output.suffix.lower() not in suffixes:
            raise ValueError(f"{what}: -o {output} must end in {' or '.join(suffixes)}")


def _demo_command(args: argparse.Namespace) -> int:
    import torch

    from ..demo import DemoConfig, run_demo

    torch.set_num_threads(min(2, torch.get_num_threads()))
    result = run_demo(args.output, DemoConfig(seed=args.seed), progress=print)
    print(f"converted: window {result.window[0]}x{result.window[1]}, stride "
          f"{result.stride[0]}x{result.stride[1]}, crop equivalent: {result.crop_equivalent}")
    print(f"{result.pages} held-out pages, {result.digits} digits, {result.detections} "
          f"detections, {result.true_positives} correct (IoU >= 0.5, same label)")
    print(f"wrote {', '.join(Path(f).name for f in result.files)} to {args.output} "
          f"in {result.seconds:.1f} s")
    print(result.metrics_line())
    return EXIT_OK


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Loaded:
    """What ``heatmap`` and ``detect`` load once for every image."""

    model: Any
    fcn: Any  # the converted model, any framework
    geometry: Geometry
    channels: int  # the image channels it takes
    labels: list[str] | None  # from --labels, else the model's own
    background: int | None  # --background-class, else the model's own


def _load(args: argparse.Namespace) -> _Loaded:
    """The model, converted, with the ``--labels`` and the class options checked against its
    class count (all before any map is computed)."""
    from ..api import conversion_info, convolutionalize
    from ..inference._runner import dense_model
    from ..models import load_model

    labels = _read_labels(args.labels) if args.labels is not None else None
    status.info("loading %s", args.model)
    with seeded(args.seed):
        model = load_model(args.model, args.weights, trust_pickle=args.trust_pickle)
    status.info("converting the model")
    fcn = convolutionalize(model, _input_size(args, model), pool=args.pool, output_stride=args.output_stride)
    info = conversion_info(fcn)
    if info.geometry.pool == "global":
        raise ValueError("heatmap and detect need a class map: use --pool window or none")
    classes = dense_model(fcn, args.model_output).map_shape(info.geometry.input_size)[0]  # shapes only
    labels, background = _classes(args, model, labels, classes)
    return _Loaded(model, fcn, info.geometry, info.in_channels, labels, background)


def _image_and_tensor(args: argparse.Namespace, loaded: _Loaded,
                      path: Path) -> tuple[Image.Image, torch.Tensor]:
    """An image (RGB, to draw on) and its model-ready ``(C, H, W)`` tensor, read by the library's
    one reader with the converted model's normalization: the input ``predict`` gives the model."""
    from ..inference.images import open_picture

    source, picture = open_picture(path, loaded.channels, args.mean, args.std, loaded.fcn)
    window = loaded.geometry.input_size
    small = source.height < window[0] or source.width < window[1]
    if small and getattr(args, "scales", None) is None:  # scales may enlarge it: dense_map decides
        raise ValueError(f"image {path} is {source.height}x{source.width}, smaller than "
                         f"the model's {window[0]}x{window[1]} window")
    return picture, source.read(0, source.height, 0, source.width)


def _is_slide(path: Path, args: argparse.Namespace) -> bool:
    from ..inference.images import TIFF_SUFFIXES
    from ..inference.slides import SLIDE_SUFFIXES

    suffix = path.suffix.lower()
    return args.mpp is not None or (suffix in SLIDE_SUFFIXES and suffix not in TIFF_SUFFIXES)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities of a ``(classes, rows, cols)`` map in float64 (NaN cells stay NaN)."""
    import numpy as np

    shifted = logits.astype(np.float64) - logits.max(axis=0, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=0, keepdims=True)


def _progress(jobs: list[Any], args: argparse.Namespace) -> Any:
    """A progress bar over several images (on stderr)."""
    from tqdm.auto import tqdm

    return tqdm(jobs, unit="image", desc="images", disable=len(jobs) < 2 or not shown(args))


def _classes(args: argparse.Namespace, model: Any, labels: list[str] | None,
             classes: int) -> tuple[list[str] | None, int | None]:
    """Class names and the background class (given, else the model's own), checked against the
    map's ``classes``, with ``--class``."""
    if labels is None and isinstance(getattr(model, "labels", None), (list, tuple)):
        labels = [str(name) for name in model.labels]  # type: ignore[union-attr]
    if labels is not None and len(labels) != classes:
        raise ValueError(f"{len(labels)} labels for a model with {classes} classes")
    background = args.background_class
    if background is None and isinstance(getattr(model, "background_class", None), int):
        background = int(model.background_class)  # type: ignore[arg-type]
    for name, index in (("class", getattr(args, "class_index", None)), ("background class", background)):
        if index is not None and not 0 <= index < classes:
            flag = "--class" if name == "class" else "--background-class"
            raise ValueError(f"unknown {name} {index} ({flag}): the model has {classes} classes "
                             f"(0..{classes - 1})")
    return labels, background


def _read_labels(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the labels file {path}: {exc}") from exc
    return [line.strip() for line in lines if line.strip()]


def _input_size(args: argparse.Namespace, model: nn.Module) -> tuple[int, int] | None:
    from ..models import default_input_size

    if args.input_size is not None:
        return (args.input_size[0], args.input_size[1])
    carried = getattr(model, "input_size", None)
    if isinstance(carried, (tuple, list)) and len(carried) == 2:
        return (int(carried[0]), int(carried[1]))
    return default_input_size(args.model, model)
