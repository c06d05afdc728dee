"""The TensorFlow adapter: tf_keras (Keras 2) models, ``tf.Module`` objects, SavedModel
directories and tf_keras ``.keras`` files.

Each is read into a Keras 3 model of standard layers (:mod:`.model`) and converted by the Keras
adapter, so the converted model is a ``keras.Model`` like any other (saved as ``.keras``,
served by ``model.export()`` under the TensorFlow backend). Loading a path gives that Keras 3
model directly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base import Adapter, Conversion

if TYPE_CHECKING:
    import numpy as np

__all__ = ["TensorFlowAdapter"]

CLAIMED = {"tf_keras.": ("Model", "Functional", "Sequential"),
           "tensorflow.": ("Module", "AutoTrackable")}  # module prefix -> class names (no import)


class TensorFlowAdapter(Adapter):
    name = "TensorFlow"
    kind = "tf_keras model or tf.Module"

    def claims(self, model: object) -> bool:
        return any(c.__module__.startswith(prefix) and c.__name__ in names
                   for c in type(model).__mro__ for prefix, names in CLAIMED.items())

    def claims_path(self, path: Path) -> bool:
        from .files import is_saved_model, is_tf_keras_file

        return is_saved_model(path) or is_tf_keras_file(path)

    def load(self, path: Path) -> Any:
        from .files import is_saved_model
        from .model import load_saved_model, load_tf_keras_file

        return load_saved_model(path) if is_saved_model(path) else load_tf_keras_file(path)

    def convert(self, model: Any, input_size: tuple[int, int] | None, pool: Any,
                output_stride: int | None) -> Any:
        from ..keras.model import convolutionalize_keras
        from .model import as_keras

        return convolutionalize_keras(as_keras(model), input_size, pool, output_stride)

    def conversion(self, model: Any) -> Conversion | None:
        return None  # a converted model is a Keras 3 model (the Keras adapter's)

    def label(self, model: Any) -> str:
        return f"{type(model).__name__} '{getattr(model, 'name', '')}'"

    def save(self, fcn: Any, path: Path) -> Path:
        raise ValueError(f"cannot write {path.name}: convert the model first (the result is a Keras 3 "
                         "model, saved as .keras)")

    def runner(self, model: Any, output: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
        from ..keras.model import predict_nchw
        from .model import as_keras

        rebuilt = as_keras(model)
        return lambda x: predict_nchw(rebuilt, x, output or 0)

    def dense_model(self, fcn: Any, output: Any) -> Any:
        raise TypeError(f"{type(fcn).__name__} is not a convolutionalized model (no geometry)")
