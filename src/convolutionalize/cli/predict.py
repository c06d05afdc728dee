"""``convolutionalize predict``: dense class maps of images, saved as ``.npy``, ``.zarr``,
``.ome.zarr`` (OME-Zarr, for napari and QuPath) or ``.tif`` (a GeoTIFF, for QGIS).

A thin command: parse, call :func:`~convolutionalize.inference.dense_map` on each image (the
model is converted once: ``dense_map`` remembers it), move each result into place, print one
line per map. IMAGE may be several paths, folders (every image file in them) or globs; with
more than one image ``-o`` is a folder and each map is named after its image. A map is
written under a temporary name next to its output and renamed on success, so bad input or a
failed run never leaves a file at the output path (nor a folder it made). An interrupted
``.zarr`` run (Ctrl-C: exit 130) leaves ``OUTPUT.partial.zarr`` (``.partial.ome.zarr``); the
same command resumes it. Run again once finished, it says the store is complete and keeps it
(``--overwrite`` computes it again).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._files import atomic_path
from .._status import status
from .options import PRECISIONS, Deferred, add_model_output, int_at_least, seeded
from .status import add_progress, say, shown, status_lines

if TYPE_CHECKING:
    from ..api import convolutionalize, geometry_of
    from ..inference import dense_map
    from ..models import default_input_size, load_model

__all__ = ["PARTIAL", "add_normalization", "check_outputs", "image_jobs", "made_folders", "partial_path",
           "predict", "register"]

PARTIAL = ".partial"  # MAP.partial.zarr until complete: inference.store.PARTIAL (not imported: --help)

SUFFIXES = (".npy", ".zarr", ".ome.zarr", ".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy", ".zarr", ".tif", ".tiff", ".svs", ".ndpi", ".mrxs",
                  ".scn", ".bif", ".vms", ".vmu", ".svslide", ".btf", ".dcm")

# The library, imported when the command runs: building the parser (--help) imports no framework.
_library = Deferred(__name__, {
    "convolutionalize": "convolutionalize.api", "geometry_of": "convolutionalize.api",
    "dense_map": "convolutionalize.inference", "default_input_size": "convolutionalize.models",
    "load_model": "convolutionalize.models"})
__getattr__ = _library


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``predict`` subcommand to ``sub`` (the parser's subparsers), with ``common`` options."""
    predict_parser = sub.add_parser("predict", parents=[common], help="dense class maps of images "
                                    "(every native-size window scored), saved as .npy, .zarr, "
                                    ".ome.zarr or GeoTIFF")
    predict_parser.add_argument("images", metavar="IMAGE", nargs="+", type=Path, help="image files "
                                "(PNG/JPEG, .npy, .zarr, (pyramidal) TIFF, GeoTIFF, whole-slide "
                                "images), folders of them or globs")
    predict_parser.add_argument("-o", "--output", required=True, type=Path, metavar="MAP",
                                help="MAP.npy (in memory), MAP.zarr (written tile by tile, "
                                "resumable), MAP.ome.zarr (OME-Zarr) or MAP.tif (GeoTIFF); with "
                                "several images, a folder (see --format)")
    predict_parser.add_argument("--format", choices=[s.lstrip(".") for s in SUFFIXES[:4]], default="npy",
                                help="the maps' format when -o is a folder (default: npy)")
    predict_parser.add_argument("--mpp", type=float, metavar="UM", help="read slides at UM microns "
                                "per pixel (the model's training resolution; default: level 0)")
    predict_parser.add_argument("--mask", metavar="auto|FILE", help="compute only tiles with "
                                "foreground: 'auto' (tissue by colour saturation) or a mask image "
                                "/ .npy of the whole image; other cells are NaN")
    predict_parser.add_argument("--bands", type=int_at_least(1), nargs="+", metavar="B",
                                help="bands of a raster (GeoTIFF) to read, 1-based, e.g. 4 3 2")
    predict_parser.add_argument("--tile", type=int_at_least(1), metavar="N", help="input pixels per "
                                "tile side (default: chosen from a memory budget)")
    predict_parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                                help="fp32 (exact, default) or bf16 (faster on CPUs with AMX)")
    predict_parser.add_argument("--runtime", choices=("torch", "openvino", "onnxruntime", "auto"),
                                help="who runs a PyTorch model's tiles: torch, openvino or onnxruntime "
                                "(the model compiled once per tile shape), or auto (the fastest installed, "
                                "measured on the first tile); default: auto for passes of a megapixel or "
                                "more, else torch")
    predict_parser.add_argument("--batch-size", type=int_at_least(1), metavar="B",
                                help="tiles per forward pass (default: 1)")
    predict_parser.add_argument("--scheduler", metavar="ADDRESS", help="run tiles as dask tasks: "
                                "a dask.distributed scheduler address, or threads/processes")
    add_normalization(predict_parser)
    add_progress(predict_parser, "a progress bar over tiles (and over images)")
    predict_parser.add_argument("--overwrite", action="store_true", help="compute a map again where "
                                "a finished one is at its output (default: say it is complete and "
                                "keep it)")
    add_model_output(predict_parser)
    predict_parser.set_defaults(command=predict)


def add_normalization(parser: argparse.ArgumentParser) -> None:
    """``--mean`` and ``--std``: how image pixels are normalized, one rule for every command
    that reads images (:func:`~convolutionalize.inference.images.default_normalization`)."""
    rule = ("default: the model's own, from its pretrained_cfg (timm's), else ImageNet's for "
            "3-channel models, else none; one value serves every channel. Pixels are scaled to "
            "[0, 1] first; model-ready float arrays are used as they are")
    parser.add_argument("--mean", type=float, nargs="+", metavar="M",
                        help=f"per-channel mean subtracted from the pixels ({rule})")
    parser.add_argument("--std", type=float, nargs="+", metavar="S",
                        help=f"per-channel standard deviation the pixels are divided by ({rule})")


def predict(args: argparse.Namespace) -> int:
    """Run ``predict``; errors (ValueError, TypeError, OSError) propagate to ``cli.main``.

    Everything that can be checked without the model is checked first (the images, the
    outputs' suffixes and folders); a store that a finished run left at its output is kept
    (``--overwrite`` computes it again)."""
    jobs = image_jobs(args.images, args.output, args.format)
    check_outputs(jobs)
    if any(_suffix(output) in (".tif", ".tiff") for _, output in jobs):
        from ..inference.geotiff import require_rasterio

        require_rasterio()  # GeoTIFF output: its writer is there before the model loads
    done = [] if args.overwrite else [(image, output) for image, output in jobs if _finished(output)]
    for _, output in done:
        print(f"{output} is complete (a finished map is there): nothing to do; pass --overwrite "
              "to compute it again")
    todo = [job for job in jobs if job not in done]
    if not todo:
        return 0
    show = shown(args)
    with status_lines(show):
        _library.load()
        model, input_size = _converted(args)
        from tqdm.auto import tqdm

        with made_folders(todo):
            for image, output in tqdm(todo, unit="image", desc="images", disable=not show or len(todo) < 2):
                _predict_one(args, model, input_size, image, output, show)
    return 0


def _converted(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model, converted once for every image (it keeps timm's normalization and labels),
    and its native input size."""
    status.info("loading %s", args.model)
    with seeded(args.seed):
        model = load_model(args.model, args.weights, trust_pickle=args.trust_pickle)
    input_size = (tuple(args.input_size) if args.input_size is not None
                  else default_input_size(args.model, model))
    try:
        geometry_of(model)  # already converted
    except TypeError:
        status.info("converting the model")
        model = convolutionalize(model, input_size, pool=args.pool, output_stride=args.output_stride)
    return model, input_size


def _finished(output: Path) -> bool:
    """Whether a finished map is at ``output``: a zarr store (a run still under way or
    interrupted is at its ``.partial`` name, see :func:`partial_path`)."""
    return _suffix(output).endswith(".zarr") and output.exists()


def partial_path(output: Path) -> Path:
    """Where a store is written until it is complete, and an interrupted run resumes:
    ``MAP.partial.zarr`` for ``MAP.zarr`` (``.partial.ome.zarr`` for ``.ome.zarr``)."""
    kind = _suffix(output)
    return output.with_name(output.name[:-len(kind)] + PARTIAL + kind)


def _predict_one(args: argparse.Namespace, model: Any, input_size: Any, image: Path, output: Path,
                 show: bool) -> None:
    """One image's map, written to ``output`` only once complete (a GeoTIFF is written to a
    temporary file and renamed by ``dense_map`` itself)."""
    kind = _suffix(output)
    partial = partial_path(output) if kind.endswith("zarr") else None
    try:
        result = dense_map(model, image, input_size=input_size, pool=geometry_of(model).pool, tile=args.tile,
                           out=partial if partial is not None else (None if kind == ".npy" else output),
                           precision=args.precision, batch_size=args.batch_size, mean=args.mean, std=args.std,
                           scheduler=args.scheduler, progress=show, output=args.model_output,
                           output_stride=args.output_stride, mpp=args.mpp, mask=args.mask,
                           bands=None if args.bands is None else tuple(args.bands), runtime=args.runtime)
    except KeyboardInterrupt:
        if partial is not None and partial.exists():
            raise KeyboardInterrupt(f"interrupted; {partial} keeps the finished tiles: the same command "
                                    "resumes it") from None
        raise
    cells = getattr(result, "map", result)  # a ScaledMap with --mpp
    if partial is not None:
        if output.exists():  # --overwrite: the finished map replaced by the new one
            shutil.rmtree(output)
        os.replace(partial, output)
    elif kind == ".npy":
        _save_npy(cells, output)
    classes, rows, cols = cells.shape
    say(f"wrote {output}: {classes} classes x {rows} x {cols} cells ({args.precision})")


def find_images(given: list[Path]) -> list[Path]:
    """The image files that paths, folders and globs name, in order, each once.

    Raises:
        ValueError: a path that does not exist, or a folder or glob that names no image.
    """
    found: list[Path] = []
    for entry in given:
        text = str(entry)
        if entry.is_dir() and entry.suffix.lower() != ".zarr":
            matches = sorted(p for p in entry.iterdir() if _suffix(p) in IMAGE_SUFFIXES)
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text) if _suffix(Path(p)) in IMAGE_SUFFIXES)
        elif entry.exists():
            matches = [entry]
        else:
            raise ValueError(f"image {entry} does not exist")
        if not matches:
            raise ValueError(f"{entry} names no image file ({', '.join(IMAGE_SUFFIXES)})")
        found.extend(m for m in matches if m not in found)
    return found


def image_jobs(given: list[Path], output: Path, fmt: str,
               suffixes: tuple[str, ...] = SUFFIXES) -> list[tuple[Path, Path]]:
    """Each image ``given`` names (:func:`find_images`) and its output file. One image file:
    ``output`` itself, unless it is an existing folder; it must then end in one of
    ``suffixes`` (any suffix where ``suffixes`` is empty). Several, a folder or a glob:
    ``output/<image stem>.<fmt>``, in a folder that :func:`make_folders` makes once the work
    starts.

    Raises:
        ValueError: as :func:`find_images`; an output file that cannot be one, or two images
            of one name.
    """
    images = find_images(given)
    several = len(given) > 1 or any((entry.is_dir() and _suffix(entry) != ".zarr")
                                    or glob.has_magic(str(entry)) for entry in given)
    store = bool(suffixes) and _suffix(output) in suffixes  # a map's name, even as a folder (a zarr store)
    if not several and (store or not output.is_dir()):
        if suffixes and _suffix(output) not in suffixes:
            raise ValueError(f"output {output} must end in {', '.join(suffixes[:-1])} or {suffixes[-1]} "
                             "(or be a folder)")
        return [(images[0], output)]
    if (output.exists() and not output.is_dir()) or _suffix(output) in suffixes:
        raise ValueError(f"{' '.join(map(str, given))} may name several images, one output each: -o must "
                         f"be a folder, not {output}")
    stems = [image.name[:-len(_suffix(image))] or image.name for image in images]
    if len(set(stems)) < len(stems):
        raise ValueError("two images share a name; their outputs would overwrite each other: pass them "
                         "in separate runs")
    return [(image, output / f"{stem}.{fmt}") for image, stem in zip(images, stems)]


@contextlib.contextmanager
def made_folders(jobs: list[tuple[Path, Path]]) -> Iterator[None]:
    """The folders the outputs go to, made for the block (after every check has passed); those
    made here are removed again when the block fails before anything was written in them."""
    made: list[Path] = []
    for _, output in jobs:
        missing = [p for p in (output.parent, *output.parent.parents) if not p.exists()]
        output.parent.mkdir(parents=True, exist_ok=True)
        made.extend(p for p in missing if p not in made)
    try:
        yield
    except BaseException:
        for folder in made:  # the deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise


def check_outputs(jobs: list[tuple[Any, Path]], make: bool = True) -> None:
    """Fail before the work when an output cannot be written: a folder in its path that is a
    file, a folder that is not writable (tried: a file made there and removed), an output
    that is a folder. Folders still to be made (``make``; else they must exist) are checked
    where they will be made."""
    for folder in dict.fromkeys(output.parent for _, output in jobs):
        if not make and not folder.is_dir():
            problem = "is a file, not a directory" if folder.exists() else "does not exist"
            raise ValueError(f"cannot write in {folder}: it {problem}")
        _check_folder(folder)
    for _, output in jobs:
        if output.is_dir() and not _suffix(output).endswith(".zarr"):
            raise ValueError(f"cannot write {output}: it is a folder")


def _check_folder(folder: Path) -> None:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ValueError(f"cannot write in {folder}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".convolutionalize-"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write in {folder}: {exc.strerror or exc}") from None


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".ome.zarr" if name.endswith(".ome.zarr") else path.suffix.lower()


def _save_npy(array: Any, output: Path) -> None:
    """``np.save`` to a temporary file beside ``output``, renamed into place when complete."""
    import numpy as np

    with atomic_path(output) as temp:
        np.save(temp, np.asarray(array))



