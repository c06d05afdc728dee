"""Framework adapters, one package each, registered once here.

Every part of the library that holds a model asks :func:`adapter_for` (an object) or
:func:`adapter_for_path` (a file) for its :class:`~convolutionalize.frameworks.base.Adapter`;
a new framework or deployed form is one package and one :func:`register` call below.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import Adapter

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "adapter_for_path", "adapter_named", "check_writable",
           "register"]

ADAPTERS: list[Adapter] = []  # in registration order


def register(adapter: Adapter) -> Adapter:
    """Add ``adapter`` to the registry (asked after those registered before it, unless its
    ``first`` is set: a Keras model on the torch backend is an ``nn.Module`` too)."""
    ADAPTERS.append(adapter)
    ADAPTERS.sort(key=lambda a: not a.first)  # stable: registration order otherwise
    return adapter


def adapter_for(model: object) -> Adapter:
    """The adapter that claims ``model``; TypeError naming what is accepted when none does."""
    for adapter in ADAPTERS:
        if adapter.claims(model):
            return adapter
    raise TypeError(f"expected {accepted()}, got {type(model).__name__}")


def adapter_named(name: str) -> Adapter:
    """The registered adapter called ``name`` (``Adapter.name``)."""
    return next(a for a in ADAPTERS if a.name == name)


def adapter_for_path(path: str | os.PathLike[str]) -> Adapter:
    """The adapter that loads the file at ``path``; ValueError when none does."""
    path = Path(path)
    for adapter in ADAPTERS:
        if adapter.claims_path(path):
            return adapter
    suffixes = ", ".join(s for a in ADAPTERS for s in a.suffixes)
    raise ValueError(f"cannot load {path.name}: convolutionalize reads {suffixes} model files (load "
                     "PyTorch models yourself, e.g. with torch.load, and pass the nn.Module)")


def check_writable(path: str | os.PathLike[str]) -> None:
    """ValueError unless some framework writes a converted model in ``path``'s format (checked
    before any work; whether the model's own framework writes it is checked when saving)."""
    path = Path(path)
    written = list(dict.fromkeys(s for a in ADAPTERS for s in a.writes))
    if path.suffix.lower() not in written:
        raise ValueError(f"cannot write {path.name}: a converted model is saved as {', '.join(written)}")


def accepted() -> str:
    """What models the registry takes, for messages."""
    listed = sorted(ADAPTERS, key=lambda a: a.first)
    kinds = [f"{'an' if a.kind[0] in 'aeiou' else 'a'} {a.kind}" for a in listed]
    return ", ".join(kinds) + " or a path to a model file"


def _register_builtin() -> None:
    from .keras.adapter import KerasAdapter
    from .onnx.adapter import OnnxAdapter
    from .tensorflow.adapter import TensorFlowAdapter
    from .torch.adapter import TorchAdapter

    register(TorchAdapter())
    register(KerasAdapter())
    register(OnnxAdapter())
    register(TensorFlowAdapter())


_register_builtin()
