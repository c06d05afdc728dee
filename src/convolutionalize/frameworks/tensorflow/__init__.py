"""TensorFlow as people ship classifiers: SavedModel directories (Keras 3 ``model.export``,
tf_keras ``save_format="tf"``, ``tf.saved_model.save`` of a ``tf.Module``), tf_keras (Keras 2)
model objects and the ``.keras`` files tf_keras writes.

Each is turned into a Keras 3 model of standard layers with the same weights (tf_keras models
through their own configuration, SavedModels through their TensorFlow graph: :mod:`.graph`),
checked against the original, and converted by the Keras adapter: the result runs on any Keras
backend, and under TensorFlow ``model.export()`` serves it with any height and width.
TensorFlow is imported only when such a model is met (the ``[tensorflow]`` extra).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

__all__ = ["import_tensorflow"]


def import_tensorflow(purpose: str) -> ModuleType:
    """``tensorflow``, imported after ``torch._dynamo``; ValueError naming the extra when absent.

    The order matters: triton (which ``torch._dynamo`` imports) crashes the process with a
    segmentation fault when it is first imported after TensorFlow (measured with
    tensorflow-cpu 2.21 and triton 3.8); the other order is safe. Where TensorFlow is already
    imported (Keras on its TensorFlow backend) it is too late, and dynamo is left alone.
    """
    if "tensorflow" not in sys.modules:
        try:
            importlib.import_module("torch._dynamo")
        except ImportError:  # a torch without dynamo has no triton either
            pass
    try:
        return importlib.import_module("tensorflow")
    except ImportError:
        raise ValueError(f"{purpose} needs TensorFlow: pip install 'convolutionalize[tensorflow]' "
                         "(tensorflow-cpu and tf-keras)") from None
