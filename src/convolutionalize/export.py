"""Saving a converted PyTorch model so that it runs at any input size outside Python code.

The file format follows the suffix:

- ``.onnx``: ONNX with dynamic batch, height and width (torch's dynamo-based exporter,
  from the ``torch.export`` program below), checked with onnxruntime against the PyTorch
  model at the native size and at a larger one;
- ``.pt2``: ``torch.export`` program with dynamic batch, height and width (at least the
  native size), saved with ``torch.export.save``; ``torch.export.load(path).module()`` runs
  it anywhere, ``convolutionalize.models.load_model(path)`` gives it back as a converted model;
- ``.pt``: the whole converted module pickled with ``torch.save``; load with
  ``torch.load(path, weights_only=False)`` where ``convolutionalize`` is installed (that runs
  code from the file: only for files you trust; ``--trust-pickle`` on the command line).

Every format carries the conversion (geometry, plan, self-check): ``.pt2`` as the archive's
extra file ``convolutionalize.json``, ``.onnx`` in ``metadata_props`` (as a converted ONNX
model does), ``.pt`` in the pickled module. Every command reads a saved file back as converted.

Saving is atomic: the model is written to a temporary file beside ``path`` and moved into
place only once it is complete (and, for ONNX, checked), so a failure never leaves a
partial file behind.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._files import atomic_path
from .api import geometry_of
from .errors import first_line
from .frameworks import adapter_for
from .frameworks.base import META_KEY
from .frameworks.torch.script import TORCHSCRIPT
from .geometry import Geometry
from .outputs import output_keys, tensor_leaves
from .selfcheck import CHECK_RTOL, relative_error, tolerance

__all__ = ["FORMATS", "ONNX_RTOL", "export_program", "save", "save_module"]

logger = logging.getLogger(__name__)

ONNX_RTOL = CHECK_RTOL  # onnxruntime's kernels sum in a different order than PyTorch's


def save(fcn: Any, path: str | os.PathLike[str]) -> Path:
    """Write the converted model ``fcn`` to ``path`` in the format its suffix names
    (a converted PyTorch model: ``.pt2``, ``.pt`` or ``.onnx``; a converted Keras model:
    ``.keras``; a converted ONNX model: ``.onnx``), with its geometry, plan and self-check,
    which every reader recognises.

    Returns:
        The path written.

    Raises:
        ValueError: an unknown suffix, a directory that does not exist or is not writable,
            a missing optional dependency, or a model the exporter cannot handle.
        TypeError: ``fcn`` is not a converted model.
    """
    path = Path(path)
    geometry_of(fcn)  # TypeError for a model that is not converted
    return adapter_for(fcn).save(fcn, path)


def save_module(fcn: nn.Module, path: Path) -> Path:
    """Write a converted PyTorch model as ``.pt2``, ``.pt`` or ``.onnx`` (atomically)."""
    writer = FORMATS.get(path.suffix.lower())
    if writer is None:
        raise ValueError(
            f"cannot write {path.name}: unknown format {path.suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(FORMATS)}"
        )
    with atomic_path(path) as tmp:
        writer(fcn, tmp)
    logger.info("wrote %s", path)
    return path


def conversion_json(fcn: nn.Module) -> str:
    """The conversion ``fcn`` carries, as the JSON every saved format stores."""
    conversion = adapter_for(fcn).conversion(fcn)
    assert conversion is not None, "save() checked that the model is converted"
    return conversion.to_json()


def _example(fcn: nn.Module, geometry: Geometry, extra: tuple[int, int]) -> torch.Tensor:
    """A random input ``extra`` strides larger than the native size, on ``fcn``'s device."""
    param = next(fcn.parameters(), None)
    gen = torch.Generator().manual_seed(0)
    h = geometry.input_size[0] + extra[0] * geometry.stride[0]
    w = geometry.input_size[1] + extra[1] * geometry.stride[1]
    x = torch.randn(1, fcn.plan.in_channels, h, w, generator=gen)  # type: ignore[union-attr]
    return x if param is None else x.to(param.device, param.dtype)


def export_program(fcn: nn.Module) -> torch.export.ExportedProgram:
    """``torch.export`` of ``fcn`` with dynamic batch, height and width (>= the native size).

    Traced size-obliviously, so that the 1x1 map at the native size is not specialised on
    and ``ceil_mode`` pools do not pin sizes to multiples of the stride.
    """
    geometry = geometry_of(fcn)
    dims = {0: torch.export.Dim.DYNAMIC,
            2: torch.export.Dim.DYNAMIC(min=geometry.input_size[0]),
            3: torch.export.Dim.DYNAMIC(min=geometry.input_size[1])}
    example = _example(fcn, geometry, (2, 3))
    try:
        with _size_oblivious():
            return torch.export.export(fcn, (example,), dynamic_shapes=(dims,))
    except Exception as exc:  # torch.export raises many types (UserError, RuntimeError, ...)
        raise ValueError(
            f"torch.export cannot export the converted model: {first_line(exc)}; "
            "save it as .pt instead"
        ) from exc


@contextlib.contextmanager
def _size_oblivious() -> Iterator[None]:
    try:
        from torch.fx.experimental import _config as fx_config
    except ImportError:
        yield
        return
    if not hasattr(fx_config, "backed_size_oblivious"):
        yield
        return
    with fx_config.patch(backed_size_oblivious=True):
        yield


def _write_pt2(fcn: nn.Module, path: Path) -> None:
    fcn = _exportable(fcn)
    torch.export.save(export_program(fcn), str(path), extra_files={META_KEY: conversion_json(fcn)})


def _eager_quantized(fcn: nn.Module) -> bool:
    from .frameworks.torch.model import module_precision

    return module_precision(fcn) == "quantized"


def _traced(fcn: nn.Module, geometry: Geometry) -> torch.jit.ScriptModule:
    try:
        with torch.no_grad():
            return torch.jit.trace(fcn, _example(fcn, geometry, (2, 3)), strict=False, check_trace=False)
    except Exception as exc:  # the tracer raises many types
        raise ValueError(f"torch.jit.trace cannot trace the converted model: {first_line(exc)}; "
                         "save it as .pt2 instead") from exc


def _exportable(fcn: nn.Module) -> nn.Module:
    """``fcn``, or for eager-mode quantized modules (whose packed parameters torch.export cannot
    trace) the same model as a graph torch.export writes: traced to TorchScript and lifted as a
    quantized TorchScript model is (int8 weights dequantized in the graph, activations rounded
    as the quantized kernels round them; checked against the trace at the native size)."""
    if not _eager_quantized(fcn):
        return fcn
    from .errors import NotConvolutionalizable
    from .frameworks.torch.capture import capture
    from .frameworks.torch.layers import ConvolutionalizedModule

    geometry = geometry_of(fcn)
    try:
        captured = capture(_traced(fcn, geometry), fcn.plan.in_channels, geometry.input_size)  # type: ignore[union-attr]
    except NotConvolutionalizable as exc:
        raise ValueError(f"the quantized model cannot be written as a graph: {first_line(exc)}; "
                         "save it as .pt (TorchScript) instead") from exc
    graph = ConvolutionalizedModule(captured.gm, geometry, fcn.plan, fcn.self_check,  # type: ignore[arg-type]
                                    captured.out_spec)
    for name in ("pretrained_cfg", "default_cfg", "labels", "background_class"):
        if hasattr(fcn, name):
            setattr(graph, name, getattr(fcn, name))
    return graph.eval()


def _write_pt(fcn: nn.Module, path: Path) -> None:
    """The pickled module; TorchScript (traced, with the conversion in its extra files) for a
    model converted from TorchScript, as it was deployed, and for eager-mode quantized modules
    (torch.load cannot rebuild a pickled quantized module: their ``__setstate__`` skips
    ``nn.Module``'s own state)."""
    if getattr(fcn, "source_format", None) != TORCHSCRIPT and not _eager_quantized(fcn):
        torch.save(fcn, path)
        return
    geometry = geometry_of(fcn)
    scripted = _traced(fcn, geometry)
    torch.jit.save(scripted, str(path), _extra_files={META_KEY: conversion_json(fcn)})
    for extra in ((0, 0), (3, 2)):  # a trace that fixed a size would differ here
        x = _example(fcn, geometry, extra)
        with torch.no_grad():
            _check_written(tensor_leaves(scripted(x)), fcn, x, "the TorchScript model")


def _write_onnx(fcn: nn.Module, path: Path) -> None:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ValueError("writing .onnx needs onnx and onnxruntime: pip install "
                         "'convolutionalize[onnx]'") from exc
    fcn = _exportable(fcn)
    program = export_program(fcn)
    geometry = geometry_of(fcn)
    example = _example(fcn, geometry, (2, 3))
    with torch.no_grad():
        keys = output_keys(fcn(example))
    names = ["scores"] if len(keys) == 1 else [f"output_{k}" if isinstance(k, int) else k for k in keys]
    chatter = io.StringIO()  # the exporter prints its progress
    try:
        with contextlib.redirect_stdout(chatter):
            torch.onnx.export(program, (example,), str(path),
                              dynamo=True, input_names=["image"], output_names=names,
                              external_data=False, verbose=False)
    except Exception as exc:  # the ONNX exporter raises many types
        raise ValueError(f"torch.onnx.export failed: {first_line(exc)}") from exc
    finally:
        logger.debug("%s", chatter.getvalue())
    import onnx

    from .frameworks.base import Conversion
    from .frameworks.onnx.model import write_conversion

    exported = onnx.load_model(str(path))
    write_conversion(exported, Conversion.from_json(conversion_json(fcn)))
    onnx.save_model(exported, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for extra in ((0, 0), (3, 2)):
        _check_onnx(session, fcn, _example(fcn, geometry, extra))


def _check_onnx(session: object, fcn: nn.Module, x: torch.Tensor) -> None:
    """Raise if onnxruntime's outputs for ``x`` differ from ``fcn``'s (every output, in order)."""
    actual = session.run(None, {"image": x.cpu().numpy()})  # type: ignore[attr-defined]
    _check_written([torch.from_numpy(a) for a in actual], fcn, x, "the ONNX model")


def _check_written(actual: list[torch.Tensor], fcn: nn.Module, x: torch.Tensor, what: str) -> None:
    """Raise if a written model's outputs for ``x`` (``actual``) differ from ``fcn``'s (within
    the tolerance of the precision ``fcn`` computes in: another runtime's pt2e kernels may round
    a value at a quantization boundary the other way)."""
    from .frameworks.torch.model import module_precision

    limit = max(ONNX_RTOL, tolerance(module_precision(fcn)))
    with torch.no_grad():
        expected = [t.double().cpu() for t in tensor_leaves(fcn(x))]
    if len(actual) != len(expected):
        raise ValueError(f"{what} has {len(actual)} outputs, PyTorch {len(expected)}")
    for a, e in zip(actual, expected):
        a = a.detach().double().cpu()
        if a.shape != e.shape:
            raise ValueError(f"{what} gives shape {tuple(a.shape)} at "
                             f"{x.shape[2]}x{x.shape[3]}, PyTorch {tuple(e.shape)}")
        error = relative_error(a.numpy(), e.numpy())
        if error > limit:
            raise ValueError(f"{what} differs from PyTorch at {x.shape[2]}x{x.shape[3]} "
                             f"(max relative error {error:.1e} > {limit:.0e})")




FORMATS: dict[str, Callable[[nn.Module, Path], None]] = {
    ".onnx": _write_onnx,
    ".pt2": _write_pt2,
    ".pt": _write_pt,
}
