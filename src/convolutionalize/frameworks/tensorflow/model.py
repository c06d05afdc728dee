"""TensorFlow models as Keras 3 models: SavedModel directories, ``tf.Module`` objects, tf_keras
(Keras 2) models and the ``.keras`` files tf_keras writes.

- tf_keras functional and Sequential models keep their configuration: written to a temporary
  legacy HDF5 file and read back by Keras 3 (standard layers, same weights).
- SavedModels and ``tf.Module`` objects keep only a TensorFlow graph: their serving function
  (the ``serving_default`` signature, or the one traced ``__call__``) is frozen and rebuilt
  op by op (:func:`.graph.rebuild_graph`). A subclassed tf_keras model goes this way too,
  through the SavedModel tf_keras writes of it.

Every rebuilt model is run against the original at its native size on a random image before it
is handed on (relative error within the float32 tolerance of :mod:`convolutionalize.selfcheck`);
a rebuild that differs is refused with the error measured.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ...errors import NotConvolutionalizable, first_line
from ...selfcheck import relative_error, tolerance
from . import import_tensorflow
from .files import is_saved_model, is_tf_keras_file
from .graph import rebuild_graph

__all__ = ["as_keras", "is_saved_model", "is_tf_keras_file", "load_saved_model", "load_tf_keras_file"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- loading


def load_saved_model(path: Path) -> keras.Model:
    """The Keras 3 model computing a SavedModel's serving function; ValueError (one line) for a
    directory TensorFlow cannot read."""
    folder = path.parent if path.name == "saved_model.pb" else path
    tf = import_tensorflow(f"reading the SavedModel {folder.name}")
    try:
        loaded = tf.saved_model.load(str(folder))
    except Exception as exc:
        raise ValueError(f"cannot read {folder.name} as a TensorFlow SavedModel: {first_line(exc)}") from None
    return _from_function(_serving_function(loaded, f"SavedModel {folder.name}"), _label(folder.name))


def load_tf_keras_file(path: Path) -> keras.Model:
    """A tf_keras ``.keras`` file as a Keras 3 model."""
    tf_keras = _import_tf_keras(f"reading {path.name} (written by tf_keras)")
    try:
        model = tf_keras.models.load_model(str(path), compile=False)
    except Exception as exc:
        raise ValueError(f"cannot read {path.name} as a tf_keras model: {first_line(exc)}") from None
    return as_keras(model)


def as_keras(model: Any) -> keras.Model:
    """A tf_keras model or a ``tf.Module`` as a Keras 3 model of standard layers, checked
    against it at its native size."""
    if _is_tf_keras(model):
        if getattr(model, "_is_graph_network", False):
            return _from_tf_keras_config(model)
        return _from_tf_keras_saved_model(model)
    return _from_function(_module_function(model), _label(getattr(model, "name", None) or "module"))


def _label(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "model"


def _is_tf_keras(model: Any) -> bool:
    return any(c.__module__.startswith("tf_keras.") for c in type(model).__mro__)


def _import_tf_keras(purpose: str) -> Any:
    import_tensorflow(purpose)
    try:
        import tf_keras
    except ImportError:
        raise ValueError(f"{purpose} needs tf-keras: pip install 'convolutionalize[tensorflow]'") from None
    return tf_keras


def _from_tf_keras_config(model: Any) -> keras.Model:
    """Functional / Sequential tf_keras: its configuration and weights through a legacy HDF5 file,
    which Keras 3 reads into its own layers."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.h5"
        try:
            with warnings.catch_warnings():  # "HDF5 ... is considered legacy": our own temporary file
                warnings.simplefilter("ignore", UserWarning)
                model.save(str(path), save_format="h5")
            rebuilt = keras.saving.load_model(path, compile=False)
        except Exception as exc:
            raise NotConvolutionalizable(f"tf_keras model '{model.name}' cannot be read into Keras 3: "
                                         f"{type(exc).__name__}: {first_line(exc)}") from exc
    shape = tuple(model.inputs[0].shape) if len(model.inputs) == 1 else ()
    _check(lambda x: model(x, training=False), rebuilt, shape, f"tf_keras model '{model.name}'")
    return rebuilt


def _from_tf_keras_saved_model(model: Any) -> keras.Model:
    """A subclassed tf_keras model: the graph of the SavedModel tf_keras writes of it."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            model.save(folder, save_format="tf")
        except Exception as exc:
            raise NotConvolutionalizable(
                f"tf_keras model '{model.name}' is a subclassed model whose call() cannot be traced: "
                f"{type(exc).__name__}: {first_line(exc)}") from exc
        return load_saved_model(Path(folder))


def _serving_function(loaded: Any, label: str) -> Any:
    """The function a SavedModel serves: ``serving_default``, its only signature, or its one
    traced ``__call__``."""
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if "serving_default" in signatures:
        return signatures["serving_default"]
    if len(signatures) == 1:
        return next(iter(signatures.values()))
    if signatures:
        raise NotConvolutionalizable(f"{label} has signatures {', '.join(sorted(signatures))} and no "
                                     "serving_default; save it with signatures={'serving_default': ...}")
    return _module_function(loaded, label)


def _module_function(module: Any, label: str | None = None) -> Any:
    """A ``tf.Module``'s ``__call__`` traced for exactly one input signature."""
    label = label or f"tf.Module '{getattr(module, 'name', type(module).__name__)}'"
    signatures = getattr(module, "signatures", None)
    if signatures:
        return _serving_function(module, label)
    call = module.__call__ if callable(module) else None  # a tf.function: its traced graphs
    concrete = list(getattr(call, "concrete_functions", None) or [])
    spec = getattr(call, "input_signature", None)
    if not concrete and spec is not None:
        concrete = [call.get_concrete_function()]
    if len(concrete) != 1:
        raise NotConvolutionalizable(
            f"{label} has {'no traced' if not concrete else f'{len(concrete)} traced'} __call__ graphs; "
            "decorate __call__ with @tf.function(input_signature=[tf.TensorSpec((None, H, W, C))]) "
            "so that its graph can be read")
    return concrete[0]


def _from_function(function: Any, name: str) -> keras.Model:
    """The Keras 3 rebuild of a (concrete or signature) TensorFlow function, checked against it."""
    tf = import_tensorflow("reading a TensorFlow graph")
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    try:
        frozen = convert_variables_to_constants_v2(function)
    except Exception as exc:
        raise NotConvolutionalizable(f"the TensorFlow graph of '{name}' cannot be frozen: "
                                     f"{type(exc).__name__}: {first_line(exc)}") from exc
    rebuilt = rebuild_graph(frozen, name)
    _, kwargs = function.structured_input_signature

    def original(x: np.ndarray) -> Any:
        image = tf.constant(x)
        return function(**{next(iter(kwargs)): image}) if kwargs else function(image)

    _check(original, rebuilt, tuple(frozen.inputs[0].shape), f"TensorFlow function '{name}'")
    return rebuilt


def _check(original: Any, rebuilt: keras.Model, shape: tuple[Any, ...], label: str) -> None:
    """The rebuild equals the original on a random image at the native size (outputs flattened
    in order; dicts by sorted key, as both TensorFlow and Keras flatten them)."""
    if len(shape) != 4 or None in shape[1:]:
        return  # no native size to run at: the Keras adapter asks for input_size and checks there
    x = np.random.default_rng(0).standard_normal((2, *shape[1:])).astype("float32")
    want = [np.asarray(t, np.float64) for t in keras.tree.flatten(original(x))]
    structure = getattr(rebuilt, "_inputs_struct", None)  # [x] for a model read from HDF5
    feed = keras.tree.pack_sequence_as(structure, [x]) if structure is not None else x
    got = [np.asarray(keras.ops.convert_to_numpy(t), np.float64)
           for t in keras.tree.flatten(rebuilt.predict_on_batch(feed))]
    errors = [relative_error(g, w) if g.shape == w.shape else float("inf") for g, w in zip(got, want)]
    if len(got) != len(want) or max(errors, default=0.0) > tolerance("float32"):
        raise NotConvolutionalizable(f"the Keras 3 rebuild of {label} differs from it at the native size "
                                     f"(relative error {max(errors, default=float('inf')):.1e})")
    log.info("read %s as Keras 3 layers (native-size relative error %.1e)", label, max(errors))
