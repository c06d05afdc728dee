"""The Keras adapter: ``keras.Model`` objects (functional and Sequential, any backend) and
``.keras`` / legacy HDF5 ``.h5`` files.

A converted model carries its :class:`~convolutionalize.frameworks.base.Conversion` as plain
attributes and, saved, inside the ``.keras`` zip (:func:`.model.save_keras`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base import Adapter, Conversion

if TYPE_CHECKING:
    import numpy as np

__all__ = ["KerasAdapter"]


class KerasAdapter(Adapter):
    name = "Keras"
    kind = "keras.Model"
    suffixes = (".keras", ".h5", ".hdf5")
    writes = (".keras",)
    first = True  # with KERAS_BACKEND=torch a keras.Model is an nn.Module too

    def claims(self, model: object) -> bool:
        return any(c.__module__.startswith("keras") and c.__name__ in ("Model", "Functional", "Sequential")
                   for c in type(model).__mro__)

    def claims_path(self, path: Path) -> bool:
        from ..tensorflow.files import is_tf_keras_file

        return super().claims_path(path) and not is_tf_keras_file(path)  # tf_keras': the TensorFlow adapter

    def load(self, path: Path) -> Any:
        from .model import load_keras

        return load_keras(path)

    def convert(self, model: Any, input_size: tuple[int, int] | None, pool: Any,
                output_stride: int | None) -> Any:
        from .model import convolutionalize_keras

        return convolutionalize_keras(model, input_size, pool, output_stride)

    def conversion(self, model: Any) -> Conversion | None:
        from .model import conversion_of

        return conversion_of(model)

    def label(self, model: Any) -> str:
        return f"keras model '{model.name}'"

    def parameters(self, model: Any) -> int | None:
        return int(model.count_params())

    def save(self, fcn: Any, path: Path) -> Path:
        from .model import save_keras

        if path.suffix.lower() != ".keras":
            raise ValueError(f"cannot write {path.name}: a converted Keras model is saved as .keras")
        return save_keras(fcn, path)

    def runner(self, model: Any, output: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
        from .model import predict_nchw

        return lambda x: predict_nchw(model, x, output or 0)

    def dense_model(self, fcn: Any, output: Any) -> Any:
        from ...inference._cache import CACHE
        from ...inference._runner import FrameworkModel, output_index

        index = output_index(output, len(fcn.outputs), self.name)
        return FrameworkModel(fcn, self, CACHE.shapes(fcn, index), index)

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
