"""The ONNX adapter: ``onnx.ModelProto`` graphs and ``.onnx`` files.

A converted graph carries its :class:`~convolutionalize.frameworks.base.Conversion` in
``metadata_props`` (:func:`.model.write_conversion`), so a saved ``.onnx`` file is recognised
as converted wherever it is read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base import Adapter, Conversion

if TYPE_CHECKING:
    import numpy as np

__all__ = ["OnnxAdapter"]


class OnnxAdapter(Adapter):
    name = "ONNX"
    kind = "onnx.ModelProto"
    suffixes = (".onnx",)
    writes = (".onnx",)

    def claims(self, model: object) -> bool:
        return type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx")

    def load(self, path: Path) -> Any:
        from .model import load_onnx

        return load_onnx(path)

    def convert(self, model: Any, input_size: tuple[int, int] | None, pool: Any,
                output_stride: int | None) -> Any:
        from .model import convolutionalize_onnx

        return convolutionalize_onnx(model, input_size, pool, output_stride)

    def conversion(self, model: Any) -> Conversion | None:
        from .model import read_conversion

        return read_conversion(model)

    def label(self, model: Any) -> str:
        name = model.graph.name
        return f"ONNX graph '{name}'" if name else "ONNX graph"

    def save(self, fcn: Any, path: Path) -> Path:
        from .model import save_onnx

        if path.suffix.lower() != ".onnx":
            raise ValueError(f"cannot write {path.name}: a converted ONNX model is saved as .onnx")
        return save_onnx(fcn, path)

    def runner(self, model: Any, output: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
        from .model import Predictor

        predictor = Predictor(model)
        return predictor if output is None else (lambda x: predictor.run_all(x)[output])

    def dense_model(self, fcn: Any, output: Any) -> Any:
        from ...inference._cache import CACHE
        from ...inference._runner import FrameworkModel, output_index

        index = output_index(output, len(fcn.graph.output), self.name)
        version = (len(fcn.graph.node), len(fcn.graph.initializer))  # ByteSize would serialize the weights
        return CACHE.by_identity(fcn, index, version, lambda: FrameworkModel(fcn, self, output=index))

    def input_channels(self, model: Any) -> int:
        from .model import input_channels

        return input_channels(model)

    def activation_shapes(self, model: Any, size: tuple[int, int],
                          output: int = 0) -> tuple[tuple[int, ...], list[int]]:
        from .model import activation_shapes

        return activation_shapes(model, size, output)

    def digest(self, model: Any) -> str:
        from .model import model_digest

        return model_digest(model)

    def to_bytes(self, model: Any) -> bytes:
        return model.SerializeToString()

    def from_bytes(self, data: bytes) -> Any:
        import onnx

        return onnx.load_from_string(data)
