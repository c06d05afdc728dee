"""``dense_map``: a classifier's score for every window of an image, at any image size.

The model is convolutionalized (unless it already is), the image is wrapped as a lazy source
(:mod:`.images`), and the map is computed in one pass or in exact tiles (:mod:`.tiling`) that
each read a halo covering their cells' receptive field, so the stitched map equals the
whole-image map. In this process, a PyTorch body that can (:mod:`._stream`) runs each column
of tiles as one stream from top to bottom, each layer carrying the rows the next rows share,
so only the columns' left and right halos are computed twice; other tiles run one by one
(batched, optionally in bfloat16), or as dask tasks (:mod:`.distributed`). The map is
returned as numpy, written tile by tile to a resumable zarr store (:mod:`.store`), or
returned as a dask array for a dask input.

``scales=`` maps an image pyramid: the image resized to each scale, tile by tile
(:mod:`.resize`), each map returned with its geometry in the original image's pixels
(:mod:`.pyramid`). Whole-slide images are read at a physical resolution (``mpp=``,
:mod:`.slides`), background is skipped (``mask=``, :mod:`.masks`), and maps are written as
OME-Zarr (:mod:`.omezarr`) or GeoTIFF (:mod:`.geotiff`) where ``out`` says so.

A model with several outputs is mapped on the one ``output`` names (the class scores:
``logits`` where there is one, else the first); ``output="all"`` maps every output in the
same passes and returns them by key.

Models that cannot be converted (vision transformers) can be evaluated crop by crop on the
same kind of grid with ``fallback="windows"`` (:mod:`.windows`).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import logging
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from .._status import status
from ..api import check_output_stride, convolutionalize, geometry_of
from ..errors import NotConvolutionalizable
from ..frameworks import accepted, adapter_for
from ..geometry import Geometry, PoolMode, check_pool
from ._cache import CACHE
from ._runner import (
    ALL,
    DenseModel,
    OutputChoice,
    Precision,
    Runner,
    TileRunner,
    TorchModel,
    dense_model,
    weights_state,
)
from .images import Frame, ImageSource, open_frame
from .masks import Mask, Work, plan_work
from .omezarr import Physical, open_ome_zarr_sink, stored_ome_tiles
from .pyramid import ScaledGeometry, ScaledMap, check_scales, kept_scales
from .resize import resized
from .runtimes import AUTO_PIXELS, Runtime, check_runtime, runner_on, say_once
from .store import MapSink, ZarrSink, open_zarr_sink, pyramid_paths, stored_tiles, written_behind
from .tiling import Tile, TileGrid, halo_of, plan_tiles

__all__ = ["MEMORY_BUDGET", "TILE_BUDGET", "Fallback", "TilingWarning", "dense_map"]

logger = logging.getLogger(__name__)

Fallback = Literal["error", "windows"]
# Activation bytes (estimated: ``DenseModel.bytes_per_pixel``, not counting a stem that runs in
# strips, see ._strips) of one forward pass. An image that fits MEMORY_BUDGET runs in one pass:
# no halo is computed twice. A larger one runs in tiles: streamed columns where the body streams
# (below), else tiles that fit TILE_BUDGET (shufflenet_v2_x0_5 over a 16384^2 zarr image,
# benchmarks/out_of_core.py --no-streams: 28.2 s at 1.46 GiB with 300 MiB tiles, 28.2 s at 1.70
# GiB with 384 MiB; peak RSS grows by about 2x the tile budget over the ~0.85 GiB that torch and
# the model take).
MEMORY_BUDGET = 1 << 30
TILE_BUDGET = 300 << 20
# Streamed columns (._stream) run on pieces of at most PIECE_BYTES per activation: glibc serves
# each allocation over 32 MiB with a fresh mmap, whose page faults halved the speed of
# ShuffleNetV2's stem convolution (243 Mpixel/s on 1 Mpixel, 123 on 4). The input is pushed in
# as many rows as keep the stem's largest activation within PIECE_BYTES, and the stem's output
# gathered into as many as keep the rest's; a column is as wide as lets MIN_GATHER rows be
# gathered; the input is read READ_ROWS rows at a time (at least); a tile's map holds at most
# MAP_TILE_BYTES.
PIECE_BYTES = 24 << 20
MIN_GATHER = 192
READ_ROWS = 1024
MAP_TILE_BYTES = 16 << 20
# A masked map's streams merge across columns; a row of its tiles across the widest of them
# holds at most MASK_BAND_BYTES of map before it is written.
MASK_BAND_BYTES = 48 << 20
# Streams run STREAM_WORKERS at a time, each in its own thread on an equal share of torch's
# threads and an equal share of the byte budgets above (so the memory stays about that of one
# stream). A stream is many small operations (pieces, seams, Python between them) that leave
# intra-op threads idle: profiled on benchmarks/out_of_core.py's image, ShuffleNetV2's stream
# ran 1.4x faster on two threads than on one, the in-memory pass 1.8x. Two streams at once
# measured 0.75, 0.84, 0.78 of the in-memory throughput against 0.70, 0.70 one at a time, at
# the same peak memory. Measured on 2 cores only; CONVOLUTIONALIZE_STREAM_WORKERS in the
# environment sets the number.
STREAM_WORKERS = 2
# A masked map streams the unmasked map's columns (its cells without foreground still NaN)
# unless its own streams read less than 1 / MASK_COST of their pixels: per pixel read, the
# masked streams cost about a tenth more (benchmarks/slides.py: 56.2 s / 0.452 of the slide
# against 117.3 s / 1.04), so a small slide's mask no longer costs more than it saves.
MASK_COST = 1.1
READ_WARNING = 4.0  # say so when the tiles' halos make a map read this many times the image


class TilingWarning(UserWarning):
    """Tiling changes the map of a model with global context (no finite receptive field)."""


@dataclass(frozen=True)
class Options:
    """The validated options of one ``dense_map`` call."""

    tile: int | None
    precision: Precision
    batch_size: int
    fallback: Fallback
    stride: tuple[int, int] | None
    pool: PoolMode
    device: torch.device
    output: OutputChoice
    output_stride: int | None = None
    lazy: bool | None = None  # see dense_map
    runtime: Runtime | None = None  # None: AUTO_PIXELS decides (on_runtime)


def dense_map(
    model: Any,
    image: Any,
    *,
    input_size: int | tuple[int, int] | None = None,
    pool: PoolMode = "window",
    tile: int | None = None,
    out: str | os.PathLike[str] | None = None,
    precision: Precision = "fp32",
    batch_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    scheduler: Any = None,
    progress: bool = False,
    fallback: Fallback = "error",
    stride: int | tuple[int, int] | None = None,
    output: OutputChoice = None,
    scales: Sequence[float] | None = None,
    output_stride: int | None = None,
    mpp: float | None = None,
    mask: Any = None,
    bands: Sequence[int] | None = None,
    lazy: bool | None = None,
    runtime: Runtime | None = None,
) -> Any:
    """The class-score map ``(classes, rows, cols)`` of ``image``, exactly as one whole-image pass.

    Args:
        model: a classifier (converted first, keeping its weights) or a converted model:
            a ``torch.nn.Module``, a ``keras.Model``, an ``onnx.ModelProto`` or a path to a
            ``.keras``/``.onnx`` file. Keras and ONNX models run in their own framework
            (float32, CPU). An unconverted PyTorch model or a model file is converted once
            and remembered (see :func:`remembered`).
        image: a model-ready float ``(C, H, W)`` tensor or array, or an image: a path (PNG,
            JPEG, ``.npy``, ``.zarr``, TIFF read lazily, a whole-slide image, a GeoTIFF), a
            PIL image, or a uint8/uint16 ``(H, W, C)`` numpy/zarr/dask array, scaled to [0, 1]
            and normalized with ``mean``/``std``.
        input_size: passed to ``convolutionalize`` (see there) when the model is converted here.
        pool: passed to ``convolutionalize`` (see there) when the model is converted here.
        output_stride: passed to ``convolutionalize`` (see there) when the model is converted
            here; a converted model's stride must match it.
        tile: input pixels between tile starts (whole strides); each tile also reads a halo.
            Default: one pass when the image fits ``MEMORY_BUDGET``, else tiles that fit
            ``TILE_BUDGET``. For a model with global context (``geometry.receptive_field is
            None``, e.g. squeeze-excitation) tiles change the map; a :class:`TilingWarning`
            says so.
        out: a ``.zarr`` path: the map is written there tile by tile and the zarr array
            returned; an interrupted run restarted with the same arguments resumes, in the
            store's tiles (whatever the thread count or the budgets would choose now). A
            ``.ome.zarr`` path: the same, as an OME-Zarr multiscale image (:mod:`.omezarr`),
            its pyramid and metadata written once complete. A ``.tif`` path: the map (in
            memory) written as a GeoTIFF in the input's coordinate system (:mod:`.geotiff`)
            and returned. OME-Zarr and GeoTIFF hold one map: not with ``scales``.
        precision: ``"fp32"`` (exact) or ``"bf16"`` (PyTorch: bfloat16 autocast, channels-last).
        batch_size: tiles of equal shape run together (default 1).
        mean: normalization for images: the mean subtracted (default: the model's own, else
            ImageNet).
        std: normalization for images: the standard deviation divided by (default: the model's
            own, else ImageNet).
        device: where a PyTorch model runs (default CPU).
        scheduler: a dask scheduler name, a ``distributed.Client`` or its address: tiles
            run as dask tasks (also with a dask array input or an active Client).
        progress: a progress bar over tiles; what runs before the first tile (converting the
            model, the mask, planning the tiles) is logged as INFO records on the
            ``convolutionalize.status`` logger, which the command line shows as a status line.
        fallback: ``"windows"`` evaluates models that cannot be converted crop by crop.
        stride: the window grid's stride for ``fallback="windows"``.
        output: which of a PyTorch model's outputs holds the class scores: an index or a key
            / attribute name (default: ``logits`` where there is one, else the first output);
            ``"all"`` maps every output (not with ``out``). Keras and ONNX models have one.
        scales: map an image pyramid: for each scale ``s``, the image resized (antialiased
            bilinear, torchvision's ``resize(antialias=True)``) to ``round(s * H) x round(s * W)``
            and mapped with every other option as above (tiles, dask, ``out``). The resize
            runs per tile on every kind of image: each tile resamples only the input pixels
            it needs, exactly as the whole-image resize would, so zarr, dask and TIFF images
            are never loaded or resized whole. A scale that makes the image smaller than the
            window is skipped with a :class:`~convolutionalize.inference.ScaleWarning`.
            With ``out``, each
            scale's map is a store inside the zarr group ``out``, named by the scale's index
            in ``scales`` (``out/0``, ``out/1``, ...). ``None`` (default): the image as it is.
        mpp: read a slide file (``.svs``, ``.ndpi``, pyramidal/OME-TIFF, ...; :mod:`.slides`)
            at this many microns per pixel: the coarsest level at least as fine, resized the
            rest of the way (as ``scales`` resizes). Default: a slide's level 0.
        mask: ``"auto"`` (tissue by colour saturation on a low-resolution view), a 2-D array
            over the whole image (nonzero = foreground, any resolution of the image's aspect
            ratio) or a ``.npy``/image file of one (:mod:`.masks`): cells whose window
            touches no foreground are NaN, tiles without foreground cells are not computed
            (flagged skipped in a zarr ``out``).
        bands: the 1-based bands of a raster file (a GeoTIFF) to read, in this order.
        lazy: ``True``: return a dask array of the map with nothing computed yet (its tiles are
            dask tasks; ``.compute()`` runs them on the active or given ``scheduler``, e.g.
            ``lazy.compute(scheduler=client)`` or ``client.compute(lazy)``); not with ``out``
            or ``scales``. ``False``: always the computed numpy array. ``None`` (default): a
            dask array for a dask input without a ``scheduler``, else computed.
        runtime: who executes a PyTorch model's tiles (:mod:`.runtimes`): ``"torch"``,
            ``"openvino"`` or ``"onnxruntime"`` (the converted model exported to ONNX and
            compiled once per tile shape; onnxruntime in fp32 only), or ``"auto"``: the
            fastest of those installed, measured on the first tile shape (a runtime must be
            faster than torch by a tenth to be chosen). ``None`` (default): ``"auto"`` for
            passes of at least ``AUTO_PIXELS`` (a megapixel), where a pass on another runtime
            gains more than its one-time export and compilation cost over a few maps, and
            torch for smaller ones. A runtime that is missing or cannot run the model, other
            devices and streamed columns run in torch (logged once).

    Returns:
        A float32 numpy array; the zarr array with ``out``; a dask array with ``lazy=True``, or
        for a dask input without a ``scheduler`` where ``lazy`` is left out.
        With ``output="all"``: a dict of such maps by output key, each the map that
        ``output=key`` gives, from one set of passes. With ``scales``: a list of
        :class:`~convolutionalize.inference.ScaledMap`, one per scale kept, in the
        order given, each holding such a map (``.map``), its geometry in the original image's
        pixels (``.geometry``, ``.box(i, j)``), its scale and the resized size. With ``mpp``:
        one such :class:`~convolutionalize.inference.ScaledMap` (a list with ``scales``),
        its geometry in the slide's level-0 pixels and ``.mpp`` its resolution.

    Raises:
        ValueError: a bad option or image (the message names the value and the fix), an
            ``output`` the model does not have (the message lists those it has), bad
            ``scales`` (empty, zero, negative) or scales that all make the image smaller
            than the window; a slide no installed reader opens (naming the extra), ``mpp``
            finer than level 0 or for a slide without resolution metadata; a mask of the
            wrong shape; bands a raster does not have.
        TypeError: an ``output`` that is neither an index nor a name.
        NotConvolutionalizable: the model cannot be converted and ``fallback="error"``.
    """
    options = check_options(tile, precision, batch_size, fallback, stride, pool, device, output, out)
    options = dataclasses.replace(options, output_stride=check_output_stride(output_stride, options.pool),
                                  lazy=_check_lazy(lazy, out, scales),
                                  runtime=None if runtime is None else check_runtime(runtime))
    chosen = None if scales is None else check_scales(scales)
    fcn = dense_model(prepare_model(model, input_size, options), options.output)
    kind = output_kind(out)
    if kind in ("ome", "geotiff") and chosen is not None:
        raise ValueError(f"out={str(out)!r} holds one map; with scales=, pass a .zarr store (one map per "
                         "scale inside it)")
    frame = open_frame(image, fcn.channels, mean, std, model, mpp, bands)
    if mask is not None:
        status.info("computing the foreground mask")
    foreground = None if mask is None else frame.mask(mask)
    labels = class_labels(model, fcn.map_shape(fcn.geometry.input_size)[0])
    if kind == "geotiff":
        from .geotiff import require_rasterio, write_geotiff

        require_rasterio()
        result = map_pyramid(fcn, frame, options, None, None, scheduler, progress, foreground, labels)[0]
        if hasattr(result.map, "compute"):  # a dask input's lazy map: computed once, not per block
            result = dataclasses.replace(result, map=result.map.compute())
        write_geotiff(out, result.map, frame.map_transform(result.geometry), frame.crs,  # type: ignore[arg-type]
                      labels, progress=progress)
        return result if mpp is not None else result.map
    if chosen is None and mpp is None:
        return map_image(fcn, frame.source, options, out, scheduler, progress, foreground,
                         physical(fcn.geometry, (1.0, 1.0), None), labels, stacklevel=3)
    maps = map_pyramid(fcn, frame, options, chosen, out, scheduler, progress, foreground, labels)
    return maps if chosen is not None else maps[0]


def output_kind(out: str | os.PathLike[str] | None) -> str | None:
    """What ``out`` names: a ``"zarr"`` store, an ``"ome"`` (``.ome.zarr``) image, a
    ``"geotiff"`` (``.tif``/``.tiff``), or nothing."""
    if out is None:
        return None
    from .omezarr import is_ome_zarr

    if is_ome_zarr(out):
        return "ome"
    return "geotiff" if Path(out).suffix.lower() in (".tif", ".tiff") else "zarr"


def physical(geometry: Geometry, factor: tuple[float, float], mpp: tuple[float, float] | None) -> Physical:
    """Where a map's cell centres are in the original image (a slide's level 0): in microns
    with ``mpp``, else in pixels, as an image's own pixel ``k`` is at ``k`` (its centre)."""
    unit = (1.0, 1.0) if mpp is None else mpp
    scale = tuple(s / f * u for s, f, u in zip(geometry.stride, factor, unit))
    centre = tuple(((o + w / 2) / f - 0.5) * u
                   for o, w, f, u in zip(geometry.offset, geometry.window, factor, unit))
    return Physical(scale, centre, None if mpp is None else "micrometer")  # type: ignore[arg-type]


def class_labels(model: Any, classes: int) -> list[str] | None:
    """The model's class names, where it carries them (a ``labels`` list, or a transformers
    ``config.id2label``) and they match the map's ``classes``."""
    names = getattr(model, "labels", None)
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not isinstance(names, (list, tuple)) and isinstance(id2label, dict):
        names = [id2label.get(k, id2label.get(str(k), f"class {k}")) for k in range(len(id2label))]
    if isinstance(names, (list, tuple)) and len(names) == classes:
        return [str(name) for name in names]
    return None


def map_pyramid(fcn: DenseModel, frame: Frame, options: Options, scales: tuple[float, ...] | None,
                out: str | os.PathLike[str] | None, scheduler: Any, progress: bool,
                mask: Mask | None, labels: list[str] | None = None) -> list[ScaledMap]:
    """``dense_map`` with ``scales`` or ``mpp``: the map of each scale that holds a window, in
    order, with its geometry in the original (a slide's level-0) pixels; ``scales=None`` is the
    one scale 1, written to ``out`` itself."""
    kept = kept_scales(scales or (1.0,), frame.size, smallest_input(fcn.geometry), stacklevel=4)
    paths = [out] if out is None or scales is None else pyramid_paths(out, scales)
    maps = []
    for index, scale, size in kept:
        source = frame.source if size == (frame.source.height, frame.source.width) else \
            resized(frame.source, size)
        factor = (size[0] / frame.original[0], size[1] / frame.original[1])
        level = map_image(fcn, source, options, None if out is None else paths[index], scheduler,
                          progress, mask, physical(fcn.geometry, factor, frame.mpp), labels, stacklevel=4)
        maps.append(ScaledMap(level, ScaledGeometry(fcn.geometry, factor), scale, size, frame.mpp))
    return maps


def map_image(fcn: DenseModel, source: ImageSource, options: Options,
              out: str | os.PathLike[str] | None, scheduler: Any, progress: bool,
              mask: Mask | None = None, where: Physical | None = None, labels: list[str] | None = None,
              stacklevel: int = 3) -> Any:
    """The map of one image source (the body of ``dense_map`` at one scale), computing only
    the tiles whose windows touch ``mask``'s foreground; an OME-Zarr ``out`` places the cells
    ``where`` says and names the channels ``labels``; a store at ``out`` being resumed keeps
    its tiles (unless ``tile`` is given: then they must be those). Warnings go to the frame
    ``stacklevel`` counts from here (``warnings.warn``'s count)."""
    status.info("planning the tiles")
    # what a store's numbers depend on; only a store needs it (the model's digest hashes every
    # weight: 0.18 s of a 0.6 s bf16 ResNet-50 map at 1024^2)
    key = _resume_key(fcn, source, options, mask) if out is not None else {}
    layout = None if options.tile is not None else _stored_layout(out, key)
    shape, grid = plan_map(fcn, source, options, stacklevel=stacklevel + 1, layout=layout)
    size = (source.height, source.width)
    runner = fcn.runner(options.precision, options.device)  # after the checks: it copies the model
    dask = options.lazy is True or _use_dask(source, scheduler)
    fixed = layout is not None
    columns = None if dask else plan_columns(fcn, runner, source, options, grid, mask is not None, fixed)
    keep = None if mask is None else mask.cells(fcn.geometry, size, shape[1:])
    works, skipped = plan_work(grid if columns is None else columns.grid, keep, fcn.geometry, size)
    if columns is not None and columns.merge_width:  # a masked map's streams, unless the plain ones cost less
        plain = plan_columns(fcn, runner, source, options, grid, False, fixed)
        if plain is not None:
            plain_works, plain_skipped = plan_work(plain.grid, keep, fcn.geometry, size)
            if MASK_COST * _streamed(works, columns) >= _streamed(plain_works, plain):
                logger.info("mask: the unmasked streams read little more than the masked ones would; "
                            "streaming those (cells without foreground still NaN)")
                columns, works, skipped = plain, plain_works, plain_skipped
    if columns is not None:
        grid = columns.grid
    if len(grid.tiles) > 1:
        warn_reads(grid, size, fcn.geometry.stride[1], columns is not None)
    if _rejected(fcn, works) is not None:  # the network runs only on sides of whole strides
        grid = plan_tiles(fcn.geometry, size, shape[1:], tuple(  # type: ignore[arg-type]
            n * s for n, s in zip(grid.cells_per_tile, fcn.geometry.stride)), fcn.geometry.stride)
        columns = None if columns is None else replace(columns, grid=grid)
        works, skipped = plan_work(grid, keep, fcn.geometry, size)
        if (error := _rejected(fcn, works)) is not None:
            raise error
    runner = on_runtime(fcn, runner, options, columns is not None, works)
    if keep is not None:
        logger.info("mask: %.0f %% of the cells are foreground; %d of %d tiles hold none and are skipped",
                    100 * keep.mean(), len(skipped), len(grid.tiles))
    if out is None:
        sink = None
    elif output_kind(out) == "ome":
        sink = open_ome_zarr_sink(out, shape, grid, key, where or physical(fcn.geometry, (1.0, 1.0), None),
                                  labels)
    else:
        sink = open_zarr_sink(out, shape, grid, key)
    if dask:
        from .distributed import run_dask

        result = run_dask(grid, works, skipped, source, runner, sink, shape, scheduler, progress,
                          options.lazy)
    else:
        local = sink if sink is not None else MapSink(shape)
        if columns is not None:
            run_columns(works, skipped, source, runner, local, columns, progress)  # type: ignore[arg-type]
        else:
            run_tiles(works, skipped, source, runner, local, options.batch_size, progress)
        local.finish()
        result = local.result()
    if options.output == ALL:
        return _split(result, fcn.parts((source.height, source.width)))
    return result


def on_runtime(fcn: DenseModel, runner: Runner, options: Options, streamed: bool,
               works: Sequence[Work]) -> Runner:
    """The runner for ``options.runtime`` (:func:`~.runtimes.runner_on`); torch's own where
    the runtime cannot apply: models of other frameworks, other devices, streamed columns."""
    if not works:
        return runner
    runtime = options.runtime
    if runtime is None:  # the default: another runtime only where a pass is large enough to pay
        pixels = works[0].part.shape[-2] * works[0].part.shape[-1]
        runtime = "auto" if pixels >= AUTO_PIXELS and isinstance(fcn, TorchModel) else "torch"
        if runtime == "auto":
            say_once("default runtime", message=f"passes of {pixels / 1e6:.1f} Mpixel: runtime='auto' (the "
                     "fastest installed runtime, measured on the first tile; runtime='torch' keeps torch)")
    if runtime == "torch":
        return runner
    name = getattr(fcn, "name", "these")
    why = (f"{name} models run in their own framework" if not isinstance(fcn, TorchModel)
           else f"device {options.device} runs in torch" if options.device.type != "cpu"
           else "streamed columns run in torch" if streamed else None)
    if why is not None:
        say_once("runtime", runtime, why, message=f"runtime={runtime!r} does not apply here: {why}")
        return runner
    shape = (min(options.batch_size, len(works)), fcn.channels, *works[0].part.shape)
    return runner_on(runtime, runner, fcn.model, shape)


def _streamed(works: Sequence[Work], columns: ColumnPlan) -> int:
    """The pixels the streams over ``works`` read."""
    return sum(_area(_bounds(run)) for run in _stream_runs(works, columns.merge_width))


def _rejected(fcn: DenseModel, works: Sequence[Work]) -> ValueError | None:
    """Why the network does not run on one of the works' reads (each shape checked once,
    without computing), or None when it runs on all of them."""
    for shape in sorted({w.part.shape for w in works}):
        try:
            fcn.shapes(shape)
        except ValueError as exc:
            return exc
    return None


def check_options(
    tile: object, precision: object, batch_size: object, fallback: object, stride: object,
    pool: object, device: object, output: object = None, out: object = None,
) -> Options:
    """Validate every option in one place; errors name the bad value and the fix."""
    pool = check_pool(pool)
    if isinstance(output, bool) or not isinstance(output, (int, str, type(None))):
        raise TypeError(f"output must be an output's index or name, or 'all', got "
                        f"{type(output).__name__} {output!r}")
    if output == ALL and out is not None:
        raise ValueError('output="all" returns the maps in memory; with out=, write one output '
                         "per store (output=KEY)")
    if tile is not None and not _positive_int(tile):
        raise ValueError(f"tile must be a positive number of input pixels, got {tile!r}; pass e.g. "
                         "tile=1024, or leave it out to choose one from the memory budget")
    if precision not in get_args(Precision):
        raise ValueError(f"precision must be one of {', '.join(map(repr, get_args(Precision)))}, "
                         f"got {precision!r}")
    if batch_size is not None and not _positive_int(batch_size):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if fallback not in get_args(Fallback):
        raise ValueError(f"fallback must be 'error' or 'windows', got {fallback!r}")
    pair = (stride, stride) if isinstance(stride, int) else stride
    if pair is not None and (not isinstance(pair, (tuple, list)) or len(pair) != 2
                             or not all(_positive_int(s) for s in pair)):
        raise ValueError(f"stride must be a positive int or two of them (rows, cols), got {stride!r}")
    if pool == "global" and tile is not None:
        raise ValueError('pool="global" gives one prediction per image and cannot be tiled; '
                         'leave tile out or use pool="window"')
    try:
        where = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device; pass e.g. 'cpu' or 'cuda'") from exc
    return Options(tile, precision, batch_size or 1, fallback,  # type: ignore[arg-type]
                   None if pair is None else (int(pair[0]), int(pair[1])), pool, where, output)


def prepare_model(model: Any, input_size: object, options: Options) -> Any:
    """The converted model: given, converted now, or (fallback) a crop-by-crop equivalent."""
    ours = isinstance(model, (str, os.PathLike))
    if ours:
        model = load_remembered(model)
    try:
        adapter = adapter_for(model)
    except TypeError as exc:
        raise TypeError(f"dense_map takes {accepted()}, got {type(model).__name__}") from exc
    try:
        geometry: Geometry | None = geometry_of(model)  # already converted
    except TypeError:
        geometry = None  # converted below, outside this handler: its errors come unchained
    fcn = model
    if geometry is None:
        status.info("converting the model")
        try:
            fcn = remembered(model, input_size, options.pool, options.output_stride, ours)
        except NotConvolutionalizable as exc:
            if options.fallback != "windows":
                raise
            if not adapter.runs_windows:
                raise NotConvolutionalizable(f'{exc} (fallback="windows" evaluates PyTorch models '
                                             "only)") from exc
            from .windows import windows_module

            return windows_module(model, input_size, options.stride, exc)
        geometry = geometry_of(fcn)
    if options.output_stride is not None and geometry.stride != (options.output_stride,) * 2:
        raise ValueError(f"output_stride={options.output_stride} differs from the converted model's "
                         f"stride {geometry.stride}; pass the unconverted model, or convert it with "
                         "that output_stride")
    if options.stride is not None and options.stride != geometry.stride:
        raise ValueError(f"stride={options.stride} differs from the converted network's stride "
                         f"{geometry.stride}, which fixes the grid; leave stride out "
                         '(it is for fallback="windows")')
    return fcn


def remembered(model: Any, input_size: object, pool: PoolMode, output_stride: int | None,
               ours: bool = False) -> Any:
    """``convolutionalize(model, ...)``, done once per model and arguments.

    A PyTorch model keys a weak cache (it never keeps the model alive) of its converted
    models with the weights each was made from (the tensors and their version counters: an
    in-place update, ``load_state_dict`` or a replaced layer makes a new conversion). A model
    ``dense_map`` loaded from a file itself (``ours``: nobody else holds it, so nothing changes
    it) keeps its conversions while its file stays among the last few loaded (:mod:`._cache`). Keras
    and ONNX objects the caller holds are converted on every call: convert once and pass the
    converted model to map many images with it.
    """
    key = (tuple(input_size) if isinstance(input_size, list) else input_size, pool, output_stride)
    if ours:  # nobody else holds it: nothing changes it
        state, conversions = (), CACHE.files_converted.setdefault(id(model), {})
    else:
        try:
            state = weights_state(model)
        except (AttributeError, TypeError):  # only PyTorch modules tell whether their weights changed
            return convolutionalize(model, input_size, pool=pool, output_stride=output_stride)  # type: ignore[arg-type]
        conversions = CACHE.converted.setdefault(model, {})
    found = conversions.get(key)
    if found is not None and found[0] == state:
        return found[1]
    fcn = convolutionalize(model, input_size, pool=pool, output_stride=output_stride)  # type: ignore[arg-type]
    for stale in [k for k, (s, _) in conversions.items() if s != state]:
        del conversions[stale]  # made from weights since changed
    conversions[key] = (state, fcn)
    return fcn


def load_remembered(path: str | os.PathLike[str]) -> Any:
    """``load_model_file(path)``, reused while the file's size and modification time stay."""
    from ..api import load_model_file

    try:
        found = Path(path).resolve()
        stat = found.stat()
    except OSError:
        return load_model_file(path)  # which says what is wrong
    return CACHE.file((str(found), stat.st_size, stat.st_mtime_ns), lambda: load_model_file(path))


def smallest_input(geometry: Geometry) -> tuple[int, int]:
    """The smallest image a map can be made of: the native input size, or the window."""
    return geometry.input_size if geometry.pool == "window" else geometry.window


def plan_map(fcn: DenseModel, source: ImageSource, options: Options, stacklevel: int = 3,
             layout: tuple[int, int] | None = None) -> tuple[tuple[int, int, int], TileGrid]:
    """The whole-image map's shape and the tiles that compute it: tiles of ``layout`` cells
    (rows, cols: those of a store being resumed) where given, else of ``options.tile`` or the
    memory budget's size (warns when tiling is inexact, at the frame ``stacklevel`` counts
    from here)."""
    height, width = source.height, source.width
    geometry = fcn.geometry
    need = smallest_input(geometry)
    if height < need[0] or width < need[1]:
        raise ValueError(f"input {height}x{width} is smaller than the {need[0]}x{need[1]} window; "
                         'pass a larger image or pool="global"')
    shape = fcn.map_shape((height, width))
    tile: int | tuple[int, int] | None = options.tile
    if layout is not None:  # a resumed store's tiles (one of the whole map: the one pass)
        sy, sx = geometry.stride
        tile = None if layout == shape[1:] else (layout[0] * sy, layout[1] * sx)
    elif tile is None and geometry.pool != "global":
        tile = _auto_tile(fcn, source)
    if tile is None:
        whole = Tile((0, 0), (0, height, 0, width), (0, shape[1], 0, shape[2]), (0, 0))
        return shape, TileGrid((whole,), (1, 1), (shape[1], shape[2]), (0, 0))
    grid = plan_tiles(geometry, (height, width), (shape[1], shape[2]), tile)
    if len(grid.tiles) > 1 and not halo_of(geometry)[1]:
        warnings.warn(
            "this model has global context (no finite receptive field: "
            f"{'; '.join(geometry.notes) or 'a layer sees the whole image'}), so a tiled map differs "
            "from the whole-image map; pass a tile larger than the image to avoid tiling",
            TilingWarning, stacklevel=stacklevel)
    logger.info("dense map %s from %dx%d input in %d tiles of %s cells", shape, height, width,
                len(grid.tiles), grid.cells_per_tile)
    return shape, grid


def warn_reads(grid: TileGrid, size: tuple[int, int], stride: int, streamed: bool) -> None:
    """Say so when the halos make a tiled map read (and compute) ``READ_WARNING`` times the
    image's pixels or more: each tile's halo, or a streamed column's left and right ones."""
    if streamed:
        spans: dict[int, list[int]] = {}
        for t in grid.tiles:
            y0, y1, x0, x1 = t.read
            span = spans.setdefault(t.index[1], [y0, y1, x1 - x0])
            span[0], span[1] = min(span[0], y0), max(span[1], y1)
        read = sum((y1 - y0) * w for y0, y1, w in spans.values())
    else:
        read = sum(t.shape[0] * t.shape[1] for t in grid.tiles)
    if read > READ_WARNING * size[0] * size[1]:
        (top, bottom), (left, right) = grid.halo
        halos = f"{left} + {right} columns" if streamed else \
            f"{top} + {bottom} rows and {left} + {right} columns"
        logger.warning("exact tiling reads %.1fx the image's pixels (%s %d px wide; halos of %s): a larger "
                       "tile (more memory) computes less", read / (size[0] * size[1]),
                       "streamed columns" if streamed else "tiles", grid.cells_per_tile[1] * stride, halos)


def run_tiles(works: Sequence[Work], skipped: Sequence[Tile], source: ImageSource, runner: Runner,
              sink: MapSink | ZarrSink, batch_size: int, progress: bool) -> None:
    """Run the unfinished tiles' work in order, ``batch_size`` equal-shape reads per forward
    pass; mark the ``skipped`` tiles (no foreground) skipped."""
    pending = _unfinished(works, skipped, sink)
    with _progress(len(works), len(works) - len(pending), progress) as bar, written_behind(sink) as write:
        for group in _batches(pending, batch_size):
            blocks = [source.read(*w.part.read) for w in group]
            scores = runner(blocks[0][None] if len(blocks) == 1 else torch.stack(blocks))
            for w, out in zip(group, scores):
                write(w.tile, w.cells(out))
            bar.update(len(group))


@dataclass(frozen=True)
class ColumnPlan:
    """How a tiled map streams down its columns of tiles (:mod:`._stream`): the tiles; the
    bytes per input pixel of the stem's and the rest's largest activations, which size a
    stream's pushes and gathers for its width (:meth:`rows`); for a masked map, how wide a
    read neighbouring runs of tiles may merge into (0: each column streams alone); and how many
    streams run at once (:func:`stream_workers`), each on its share of ``PIECE_BYTES``."""

    grid: TileGrid
    stem: float
    rest: float
    stride: int
    merge_width: int = 0
    workers: int = 1

    def rows(self, width: int) -> tuple[int, int, int]:
        """Input rows read, pushed, and gathered after the stem at a time, for a stream
        ``width`` pixels wide."""
        piece = PIECE_BYTES / self.workers
        gather = max(int(piece / (self.rest * width)) // self.stride * self.stride, self.stride)
        push = min(max(int(piece / (self.stem * width)) // 8 * 8, 8), gather)
        return max(gather, READ_ROWS), push, gather


def stream_workers() -> int:
    """How many streams run at once (``STREAM_WORKERS``, at most one per torch thread; one
    where torch's threads are not OpenMP's, whose count each thread sets for itself)."""
    given = os.environ.get("CONVOLUTIONALIZE_STREAM_WORKERS")
    if given is not None:
        if not given.isdigit() or int(given) < 1:
            raise ValueError(f"CONVOLUTIONALIZE_STREAM_WORKERS must be a positive integer, not {given!r}")
        return int(given)
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return 1
    return max(min(STREAM_WORKERS, torch.get_num_threads()), 1)


def plan_columns(fcn: DenseModel, runner: Runner, source: ImageSource, options: Options,
                 grid: TileGrid, masked: bool, fixed: bool = False) -> ColumnPlan | None:
    """Streaming for a tiled map whose body streams (one tile at a time, no dask). With no
    tile size given, an unmasked map's tiles become columns as wide as lets ``MIN_GATHER``
    rows after the stem fit ``PIECE_BYTES``, as tall as ``MAP_TILE_BYTES`` of map lets them; a
    masked map keeps the budget's tile width, its tiles as short as lets a row of them across
    that widest read hold ``MASK_BAND_BYTES`` of map, and its runs merge (:func:`_stream_runs`).
    These sizes depend on :func:`stream_workers`: a ``fixed`` grid (a resumed store's tiles) is
    kept as it is."""
    if (len(grid.tiles) < 2 or options.batch_size != 1 or not isinstance(runner, TileRunner)
            or not isinstance(fcn, TorchModel) or os.environ.get("CONVOLUTIONALIZE_STREAMS", "1") == "0"
            or runner.stream_plan() is None):
        return None
    geometry, (height, width) = fcn.geometry, (source.height, source.width)
    stem, rest = fcn.largest_per_pixel(geometry.input_size)
    (sy, sx), (_, halo_x) = geometry.stride, grid.halo
    workers = stream_workers()
    read = int(PIECE_BYTES / workers / (rest * MIN_GATHER))  # the widest read; a column owns less
    merge = read if masked and options.tile is None else 0
    if options.tile is None and not fixed:
        classes = fcn.map_shape(geometry.input_size)[0]
        if masked:
            tile_w = grid.cells_per_tile[1] * sx
            rows = max(MASK_BAND_BYTES // workers // (4 * classes * (read // sx + 1)), 1)
        else:
            widest = max(read - sum(halo_x) - geometry.window[1] + sx, 4 * sx)
            tile_w = math.ceil(width / math.ceil(width / widest) / sx) * sx
            rows = max(MAP_TILE_BYTES // workers // (4 * classes * (tile_w // sx + 1)), 1)
        tile_h = min(rows * sy, math.ceil(height / sy) * sy)
        tile_h = math.ceil(height / math.ceil(height / tile_h) / sy) * sy  # as many tiles, all alike
        grid = plan_tiles(geometry, (height, width), fcn.map_shape((height, width))[1:], (tile_h, tile_w))
    return ColumnPlan(grid, stem, rest, sy, merge, workers)


def run_columns(works: Sequence[Work], skipped: Sequence[Tile], source: ImageSource, runner: TileRunner,
                sink: MapSink | ZarrSink, columns: ColumnPlan, progress: bool) -> None:
    """:func:`run_tiles` as streams (:meth:`TileRunner.column`): each run of unfinished tiles
    down a column, or a merged block of such runs (:func:`_stream_runs`), is one stream, read
    from its topmost tile's top (halo included) to its lowest tile's bottom; each tile is
    written once the stream has passed its cells. ``columns.workers`` streams run at once
    (:func:`_side_by_side`), the largest first; a run is cut in two down its rows of tiles
    while there are fewer runs than workers."""
    grid, merge = columns.grid, columns.merge_width
    read_w = max(t.shape[1] for t in grid.tiles)
    _, push, gather = columns.rows(read_w)
    logger.info("streaming %d columns of %d tiles (%d px wide), %d rows pushed, %d gathered after the stem, "
                "%d streams at a time%s", grid.grid[1], grid.grid[0], read_w, push, gather, columns.workers,
                f"; neighbouring runs merged up to {merge} px wide" if merge else "")
    pending = _unfinished(works, skipped, sink)
    runs = _for_workers(_stream_runs(pending, columns.merge_width), columns.workers)
    shared = threading.Lock()  # the image's reader and the progress bar
    with _progress(len(works), len(works) - len(pending), progress) as bar, written_behind(sink) as write:
        _side_by_side(runs, lambda run, stop: _stream_run(run, source, runner, write, columns, bar, stop,
                                                          shared), min(columns.workers, len(runs)))


def _for_workers(runs: list[list[Work]], workers: int) -> list[list[Work]]:
    """``runs``, the largest first, the tallest cut in two between its rows of tiles while
    there are fewer than ``workers`` (each half reads its own halo above)."""
    runs = list(runs)
    while len(runs) < workers:
        tallest = max(runs, key=lambda run: len({w.tile.index[0] for w in run}), default=None)
        rows = sorted({w.tile.index[0] for w in tallest}) if tallest else []
        if len(rows) < 2:
            break
        middle = rows[len(rows) // 2]
        runs.remove(tallest)
        runs += [[w for w in tallest if w.tile.index[0] < middle],
                 [w for w in tallest if w.tile.index[0] >= middle]]
    return sorted(runs, key=lambda run: -_area(_bounds(run)))


def _side_by_side(runs: Sequence[list[Work]], job: Callable[[list[Work], threading.Event], None],
                  workers: int) -> None:
    """``job(run, stop)`` for every run, ``workers`` at a time: the caller's thread and
    ``workers - 1`` more, each on its share of torch's threads. A failure (or an interrupt)
    sets ``stop``, which the others check at every push, and is raised once they have ended."""
    todo, stop, failed = collections.deque(runs), threading.Event(), []
    threads = torch.get_num_threads()

    def work() -> None:
        if workers > 1:
            torch.set_num_threads(max(threads // workers, 1))  # OpenMP's count is per thread
        while not stop.is_set():
            try:
                run = todo.popleft()
            except IndexError:
                return
            try:
                job(run, stop)
            except BaseException as exc:
                failed.append(exc)
                stop.set()

    helpers = [threading.Thread(target=work, name=f"convolutionalize-stream-{k}", daemon=True)
               for k in range(1, workers)]
    for helper in helpers:
        helper.start()
    try:
        work()
        for helper in helpers:
            helper.join()
    finally:
        stop.set()
        for helper in helpers:
            helper.join()
        if workers > 1:
            torch.set_num_threads(threads)
    if failed:
        raise failed[0]


def _column_runs(works: Sequence[Work]) -> Iterator[list[Work]]:
    """The works by column, top to bottom, cut where a tile between is done or skipped."""
    by_column: dict[int, list[Work]] = {}
    for w in works:
        by_column.setdefault(w.tile.index[1], []).append(w)
    for column in sorted(by_column):
        run: list[Work] = []
        for w in sorted(by_column[column], key=lambda w: w.tile.index[0]):
            if run and w.tile.index[0] != run[-1].tile.index[0] + 1:
                yield run
                run = []
            run.append(w)
        yield run


def _stream_runs(works: Sequence[Work], merge_width: int) -> list[list[Work]]:
    """The streams that compute ``works``: each column's runs of consecutive tiles
    (:func:`_column_runs`); with ``merge_width``, runs in neighbouring columns merged, the
    largest saving first, while one stream over their bounding rectangle reads fewer pixels
    than theirs do (each column pays its halos), is at most ``merge_width`` wide, and holds no
    other stream's tile (done and skipped tiles inside are computed, not written)."""
    runs = dict(enumerate(_column_runs(works)))
    if not merge_width:
        return list(runs.values())
    bounds = {k: _bounds(run) for k, run in runs.items()}
    owner = {w.tile.index: k for k, run in runs.items() for w in run}
    starts: dict[int, set[int]] = {}  # first tile column -> the runs starting there
    ends: dict[int, set[int]] = {}  # tile column after the last -> the runs ending there
    for k, b in bounds.items():
        starts.setdefault(b[6], set()).add(k)
        ends.setdefault(b[7], set()).add(k)
    heap: list[tuple[int, int, int, tuple[int, ...]]] = []

    def offer(k: int) -> None:
        b = bounds[k]
        for j in starts.get(b[7], set()) | ends.get(b[6], set()):
            u = _union(b, bounds[j])
            gain = _area(b) + _area(bounds[j]) - _area(u)
            if gain > 0 and u[3] - u[2] <= merge_width and all(
                    owner.get((r, c), k) in (k, j) for r in range(u[4], u[5]) for c in range(u[6], u[7])):
                heapq.heappush(heap, (-gain, min(k, j), max(k, j), u))

    for k in list(runs):
        offer(k)
    new = len(runs)
    while heap:
        _, a, b, u = heapq.heappop(heap)
        if a not in runs or b not in runs:
            continue
        for k in (a, b):
            starts[bounds[k][6]].discard(k)
            ends[bounds[k][7]].discard(k)
            del bounds[k]
        runs[new] = sorted(runs.pop(a) + runs.pop(b), key=lambda w: w.tile.index)
        bounds[new] = u
        starts.setdefault(u[6], set()).add(new)
        ends.setdefault(u[7], set()).add(new)
        owner.update((w.tile.index, new) for w in runs[new])
        offer(new)
        new += 1
    return sorted(runs.values(), key=lambda run: (run[0].tile.index[1], run[0].tile.index[0]))


def _bounds(run: Sequence[Work]) -> tuple[int, ...]:
    """The read rectangle of ``run`` (``y0, y1, x0, x1``) and its tile rows and columns
    (``r0, r1, c0, c1``, ends exclusive)."""
    return (min(w.part.read[0] for w in run), max(w.part.read[1] for w in run),
            min(w.part.read[2] for w in run), max(w.part.read[3] for w in run),
            min(w.tile.index[0] for w in run), max(w.tile.index[0] for w in run) + 1,
            min(w.tile.index[1] for w in run), max(w.tile.index[1] for w in run) + 1)


def _union(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(min(p, q) if k % 2 == 0 else max(p, q) for k, (p, q) in enumerate(zip(a, b)))


def _area(b: tuple[int, ...]) -> int:
    return (b[1] - b[0]) * (b[3] - b[2])


def _read_spans(top: int, end: int, rows: int, chunk: int) -> list[tuple[int, int]]:
    """Rows ``[top, end)`` in reads of ``rows`` (rounded up to whole ``chunk`` rows) that,
    after the first, start on whole chunks: each chunk is decoded once."""
    rows = -(-rows // chunk) * chunk
    starts = [top, *range((top // rows + 1) * rows, end, rows)]
    return list(zip(starts, [*starts[1:], end]))


def _stream_run(run: list[Work], source: ImageSource, runner: TileRunner,
                write: Callable[[Tile, np.ndarray], None], columns: ColumnPlan, bar: Any,
                stop: threading.Event, shared: threading.Lock) -> None:
    """One stream over ``run`` (tiles in consecutive rows, in one column or merged
    neighbouring ones), reading what their works read: from the topmost one's top to the
    lowest one's bottom, over all of their columns (a mask's cut works read less; every cell
    a work owns is computed as exactly as it would be). Each row of tiles is written once the
    stream has passed its cells; it ends early, its cells unwritten, once ``stop`` is set.
    The image is read and the bar moved holding ``shared``."""
    top, end, x0, x1 = _bounds(run)[:4]
    read_rows, push_rows, gather_rows = columns.rows(x1 - x0)
    pushes = (push for y, y1 in _read_spans(top, end, read_rows, source.chunk_rows)
              for push in source.read_rows(y, y1, x0, x1, push_rows, shared))
    column = runner.column(gather_rows)
    base, col0 = (min(w.part.first_cell[a] for w in run) for a in (0, 1))  # the stream's cell (0, 0)
    parts: list[np.ndarray] = []  # the map rows from ``base`` on that the stream has given
    received, over = 0, False
    for _, band in itertools.groupby(run, key=lambda w: w.tile.index[0]):
        works = list(band)
        until = works[0].tile.cells[1]
        while not over and base + received < until:
            if stop.is_set():
                return
            _, y1, chunk = next(pushes)
            over = y1 == end
            out = column.push(chunk, last=over)
            if out is not None:
                parts.append(out)
                received += out.shape[1]
        for w in works:  # each tile's columns joined alone: a row of tiles is never copied whole
            c0 = max(w.tile.cells[2], col0)  # a cut work's stream may start right of its tile
            pieces = [p[:, :, c0 - col0:w.tile.cells[3] - col0] for p in parts]
            block = (np.concatenate(pieces, 1) if len(pieces) > 1 else pieces[0]) if pieces else None
            write(w.tile, w.cells_from(block, base, c0))
        cut = max(until - base, 0)
        parts = _rows_after(parts, cut)
        base, received = base + cut, received - cut
        with shared:
            bar.update(len(works))


def _rows_after(parts: list[np.ndarray], cut: int) -> list[np.ndarray]:
    """``parts`` (map rows, consecutive along axis 1) without their first ``cut`` rows."""
    kept = []
    for p in parts:
        if cut >= p.shape[1]:
            cut -= p.shape[1]
            continue
        kept.append(p[:, cut:] if cut else p)
        cut = 0
    return kept


def _unfinished(works: Sequence[Work], skipped: Sequence[Tile], sink: MapSink | ZarrSink) -> list[Work]:
    """Mark the ``skipped`` tiles skipped; the works not done yet (a resumed run's rest)."""
    done = sink.done_tiles()
    sink.skip_all([t for t in skipped if t.index not in done])
    pending = [w for w in works if w.tile.index not in done]
    if len(pending) < len(works):
        logger.info("resuming: %d of %d tiles already done", len(works) - len(pending), len(works))
    return pending


def _progress(total: int, done: int, shown: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, disable=not shown, unit="tile", desc="dense map")


def _batches(works: Sequence[Work], size: int) -> Iterator[list[Work]]:
    group: list[Work] = []
    for w in works:
        if group and (len(group) == size or w.part.shape != group[0].part.shape):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def _auto_tile(fcn: DenseModel, source: ImageSource) -> int | None:
    """``None`` (one pass) when the image fits the budget, else the largest tile that does."""
    geometry = fcn.geometry
    per_pixel = fcn.bytes_per_pixel(geometry.input_size)
    if source.height * source.width * per_pixel <= MEMORY_BUDGET:
        return None
    side = int(math.sqrt(TILE_BUDGET / per_pixel))
    halo, _ = halo_of(geometry)
    stride = max(geometry.stride)
    tile = max((side - max(sum(h) for h in halo) - max(geometry.window) + stride) // stride * stride,
               4 * stride)
    longest = max(source.height, source.width)
    even = math.ceil(longest / math.ceil(longest / tile) / stride) * stride  # as many tiles, all alike
    return min(tile, even)


def _split(stacked: Any, parts: list[tuple[int | str, int]]) -> dict[int | str, Any]:
    """``output="all"``: the stacked map (numpy or dask) cut back into each output's map."""
    maps, start = {}, 0
    for key, channels in parts:
        maps[key] = stacked[start:start + channels]
        start += channels
    return maps


def _resume_key(fcn: DenseModel, source: ImageSource, options: Options, mask: Mask | None) -> dict[str, Any]:
    """What a map's numbers depend on: a store made with another key is not resumed. Not its
    tiles, which depend on the thread count and the memory budgets: a resumed store keeps its
    own (:func:`_stored_layout`)."""
    g = fcn.geometry
    return {"model": fcn.digest(), "image": source.key(),
            "normalization": [source.mean, source.std],
            "geometry": [[int(n) for n in pair] for pair in (g.window, g.stride, g.offset)],
            "precision": options.precision, "runtime": options.runtime, "output": options.output,
            **({} if mask is None else {"mask": mask.digest()})}


def _stored_layout(out: str | os.PathLike[str] | None, key: dict[str, Any]) -> tuple[int, int] | None:
    """The cells per tile of the zarr or OME-Zarr store ``out`` being resumed (made with
    ``key``); ``None`` where there is none yet (or ``out`` is not a store)."""
    if out is None or output_kind(out) == "geotiff":
        return None
    return stored_ome_tiles(out, key) if output_kind(out) == "ome" else stored_tiles(out, key)


def _check_lazy(lazy: object, out: object, scales: object) -> bool | None:
    if lazy is not None and not isinstance(lazy, bool):
        raise TypeError(f"lazy must be True, False or None, got {type(lazy).__name__}")
    if lazy and out is not None:
        raise ValueError("lazy=True returns a dask array, computed later; out= writes the map now: "
                         "pass one of them")
    if lazy and scales is not None:
        raise ValueError("lazy=True maps one image; with scales=, map each scale's image yourself")
    return lazy


def _use_dask(source: ImageSource, scheduler: object) -> bool:
    if scheduler is not None or source.is_dask:
        return True
    if "distributed" not in sys.modules:  # no Client can be active without it
        return False
    from distributed import default_client

    try:
        default_client()
    except ValueError:
        return False
    return True


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
