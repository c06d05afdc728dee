"""What ``dense_map`` remembers between calls, in one object: :data:`CACHE`.

Lifetime: the process. Entries for models that can be weakly referenced (PyTorch modules,
Keras models) live as long as the model does and are dropped with it; ONNX protos (which
cannot be weakly referenced) and model files are held for the last :data:`HELD` /
:data:`FILES` of them. Entries made from weights that changed since (an in-place update,
``load_state_dict``) are made again. :meth:`MapperCache.clear` forgets everything.

Nothing here changes a map's numbers: every entry is something that would be computed again
the same way (a conversion, a prepared runner, shapes at an input size).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["CACHE", "FILES", "HELD", "MapperCache"]

HELD = 4  # ONNX protos whose dense adapters (onnxruntime session, shapes) are kept
FILES = 4  # model files kept loaded (with their conversions)

T = TypeVar("T")


class MapperCache:
    """The dense mapper's state (see the module docstring)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget everything."""
        # model -> {(precision, device, fuse, strips, output): (weights state, TileRunner)}
        self.runners: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()
        self._shapes: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()
        self._output_shapes: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()
        self.held: dict[tuple[int, Any], tuple[Any, Any, Any]] = {}  # (id, output) -> (model, version, value)
        # a model -> {(input_size, pool, output_stride): (weights state, converted model)}
        self.converted: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()
        self.files: dict[tuple[str, int, int], Any] = {}  # (path, size, mtime) -> the model in it
        self.files_converted: dict[int, dict] = {}  # id of a model in files -> its conversions

    def shapes(self, model: Any, output: Any) -> dict:
        """Shapes of ``model``'s output ``output`` by input size (filled by the caller)."""
        return self._shapes.setdefault(model, {}).setdefault(output, {})

    def output_shapes(self, model: Any) -> dict:
        """Every output's shapes of ``model`` by input size (filled by the caller)."""
        return self._output_shapes.setdefault(model, {})

    def by_identity(self, model: Any, output: Any, version: Any, make: Callable[[], T]) -> T:
        """``make()`` for a model that cannot be weakly referenced, kept for the last
        :data:`HELD` (model, output) pairs and made again when ``version`` changed."""
        key = (id(model), output)
        held = self.held.pop(key, None)
        if held is None or held[0] is not model or held[1] != version:
            held = (model, version, make())
        self.held[key] = held  # most recent last
        while len(self.held) > HELD:
            self.held.pop(next(iter(self.held)))
        return held[2]

    def file(self, key: tuple[str, int, int], load: Callable[[], Any]) -> Any:
        """The model in a file (by path, size and modification time), loaded once while it is
        among the last :data:`FILES` loaded."""
        model = self.files.pop(key, None)
        if model is None:
            model = load()
        self.files[key] = model  # most recent last
        while len(self.files) > FILES:
            self.files_converted.pop(id(self.files.pop(next(iter(self.files)))), None)
        return model


CACHE = MapperCache()
