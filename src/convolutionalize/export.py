"""Saving a converted PyTorch model so that it runs at any input size outside Python code.

The file format follows the suffix:

- ``.onnx``: ONNX with dynamic batch, height and width (torch's dynamo-based exporter,
  from the ``torch.export`` program below), checked with onnxruntime against the PyTorch
  model at the native size and at a larger one;
- ``.pt2``: ``torch.export`` program with dynamic batch, height and width (at least the
  native size), saved with ``torch.export.save``; load with ``torch.export.load(path).module()``;
- ``.pt``: the whole converted module pickled with ``torch.save``; load with
  ``torch.load(path, weights_only=False)`` where ``convolutionalize`` is installed (that runs
  code from the file: only for files you trust; ``--trust-pickle`` on the command line).

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
from .api import geometry_of, is_keras_model, is_onnx_model
from .errors import first_line
from .geometry import Geometry
from .outputs import output_keys, tensor_leaves

__all__ = ["FORMATS", "ONNX_RTOL", "export_program", "save"]

logger = logging.getLogger(__name__)

ONNX_RTOL = 1e-4  # onnxruntime's kernels sum in a different order than PyTorch's


def save(fcn: Any, path: str | os.PathLike[str]) -> Path:
    """Write the converted model ``fcn`` to ``path`` in the format its suffix names
    (a converted Keras model: ``.keras``; a converted ONNX model: ``.onnx``).

    Returns:
        The path written.

    Raises:
        ValueError: an unknown suffix, a directory that does not exist or is not writable,
            a missing optional dependency, or a model the exporter cannot handle.
        TypeError: ``fcn`` is not a converted model.
    """
    path = Path(path)
    if is_keras_model(fcn) or is_onnx_model(fcn):
        return _save_other(fcn, path)
    writer = FORMATS.get(path.suffix.lower())
    if writer is None:
        raise ValueError(
            f"cannot write {path.name}: unknown format {path.suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(FORMATS)}"
        )
    geometry_of(fcn)
    with atomic_path(path) as tmp:
        writer(fcn, tmp)
    logger.info("wrote %s", path)
    return path


def _save_other(fcn: Any, path: Path) -> Path:
    """Keras and ONNX models are written in their own format only (atomically)."""
    keras = is_keras_model(fcn)
    suffix = ".keras" if keras else ".onnx"
    if path.suffix.lower() != suffix:
        raise ValueError(f"cannot write {path.name}: a converted {'Keras' if keras else 'ONNX'} "
                         f"model is saved as {suffix}")
    geometry_of(fcn)
    if keras:
        from .frameworks.keras.model import save_keras

        return save_keras(fcn, path)
    from .frameworks.onnx.model import save_onnx

    return save_onnx(fcn, path)


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
    torch.export.save(export_program(fcn), str(path))


def _write_pt(fcn: nn.Module, path: Path) -> None:
    torch.save(fcn, path)


def _write_onnx(fcn: nn.Module, path: Path) -> None:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ValueError("writing .onnx needs onnx and onnxruntime: pip install "
                         "'convolutionalize[onnx]'") from exc
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
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for extra in ((0, 0), (3, 2)):
        _check_onnx(session, fcn, _example(fcn, geometry, extra))


def _check_onnx(session: object, fcn: nn.Module, x: torch.Tensor) -> None:
    """Raise if onnxruntime's outputs for ``x`` differ from ``fcn``'s (every output, in order)."""
    with torch.no_grad():
        expected = [t.double().cpu() for t in tensor_leaves(fcn(x))]
    actual = session.run(None, {"image": x.cpu().numpy()})  # type: ignore[attr-defined]
    if len(actual) != len(expected):
        raise ValueError(f"the ONNX model has {len(actual)} outputs, PyTorch {len(expected)}")
    for a, e in zip(actual, expected):
        _check_output(torch.from_numpy(a).double(), e, x)


def _check_output(actual_t: torch.Tensor, expected: torch.Tensor, x: torch.Tensor) -> None:
    if actual_t.shape != expected.shape:
        raise ValueError(f"the ONNX model gives shape {tuple(actual_t.shape)} at "
                         f"{x.shape[2]}x{x.shape[3]}, PyTorch {tuple(expected.shape)}")
    error = float((actual_t - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    if error > ONNX_RTOL:
        raise ValueError(f"the ONNX model differs from PyTorch at {x.shape[2]}x{x.shape[3]} "
                         f"(max relative error {error:.1e} > {ONNX_RTOL:.0e})")




FORMATS: dict[str, Callable[[nn.Module, Path], None]] = {
    ".onnx": _write_onnx,
    ".pt2": _write_pt2,
    ".pt": _write_pt,
}
