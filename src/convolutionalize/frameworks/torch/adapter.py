"""The PyTorch adapter: ``nn.Module`` classifiers, and ``.pt2`` (torch.export) files.

A converted model is a :class:`~.layers.ConvolutionalizedModule` (``.geometry``, ``.plan``,
``.self_check``). Saved as ``.pt2`` (torch.export), ``.pt`` (the pickled module) or ``.onnx``
(torch's exporter), it keeps its :class:`~convolutionalize.frameworks.base.Conversion`: in the
``.pt2`` archive's extra files, in the pickled module itself, in the ONNX ``metadata_props``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base import Adapter, Conversion

if TYPE_CHECKING:
    import numpy as np

__all__ = ["TorchAdapter"]


class TorchAdapter(Adapter):
    name = "PyTorch"
    kind = "torch.nn.Module"
    suffixes = (".pt2",)
    writes = (".pt2", ".pt", ".onnx")  # export.FORMATS
    maps_all_outputs = True
    runs_windows = True
    counts_flops = True

    def claims(self, model: object) -> bool:
        return any(c.__name__ == "Module" and c.__module__ == "torch.nn.modules.module"
                   for c in type(model).__mro__)

    def load(self, path: Path) -> Any:
        from ...models import load_model

        return load_model(str(path))

    def native_size(self, model: Any, input_size: object) -> tuple[int, int]:
        from .model import native_input_size

        return native_input_size(model, input_size)

    def convert(self, model: Any, input_size: tuple[int, int] | None, pool: Any,
                output_stride: int | None) -> Any:
        from .model import convolutionalize_module

        return convolutionalize_module(model, input_size, pool, output_stride)

    def conversion(self, model: Any) -> Conversion | None:
        from ...geometry import Geometry
        from ...plan import HeadPlan

        geometry, plan = getattr(model, "geometry", None), getattr(model, "plan", None)
        if not (isinstance(geometry, Geometry) and isinstance(plan, HeadPlan)):
            return None
        return Conversion(geometry, plan, getattr(model, "self_check", None))

    def label(self, model: Any) -> str:
        from .script import script_name

        return script_name(model)

    def parameters(self, model: Any) -> int | None:
        return sum(p.numel() for p in model.parameters())

    def save(self, fcn: Any, path: Path) -> Path:
        from ...export import save_module

        return save_module(fcn, path)

    def runner(self, model: Any, output: Any = None) -> Callable[[np.ndarray], np.ndarray]:
        import copy

        import torch

        from ...outputs import select_output

        module = copy.deepcopy(model).eval() if model.training else model
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                out = select_output(module(torch.from_numpy(x).to(device, dtype)), output)  # the class scores
                return out.float().cpu().numpy()

        return run

    def dense_model(self, fcn: Any, output: Any) -> Any:
        from ...inference._cache import CACHE
        from ...inference._runner import TorchModel

        return TorchModel(fcn, CACHE.shapes(fcn, output), CACHE.output_shapes(fcn), output)
