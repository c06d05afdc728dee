"""Handlers keyed by ``(op_type, since_version)``, the way onnx2torch registers its converters.

A graph's opset is mapped to each op's ``since_version`` with
``onnx.defs.get_schema(op, max_inclusive_version=opset)``: an op whose semantics changed in
some opset (``Softmax`` coerced its input to 2-D before opset 13, ``BatchNormalization`` had
``spatial`` before 9) is one more registered function for the older versions, not an ``if``
inside its handler. ``ANY`` registers a handler for every version of an op whose changes
(types, attributes turned into inputs) do not matter to the handler.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import onnx

__all__ = ["ANY", "Registry", "since_version"]

ANY = 0
F = TypeVar("F", bound=Callable[..., object])


@functools.cache
def since_version(op_type: str, opset: int, domain: str = "") -> int | None:
    """The version of ``op_type`` a graph importing ``opset`` uses, None when onnx has no such op."""
    try:
        return onnx.defs.get_schema(op_type, max_inclusive_version=opset, domain=domain).since_version
    except onnx.defs.SchemaError:
        return None


class Registry(Generic[F]):
    """``(op_type, since_version) -> handler``; a version-specific handler beats an ``ANY`` one."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._table: dict[tuple[str, int], F] = {}

    def register(self, *op_types: str, versions: Iterable[int] = (ANY,)) -> Callable[[F], F]:
        """Decorator: ``fn`` handles ``op_types`` at each of ``versions`` (since-versions)."""
        chosen = tuple(versions)

        def add(fn: F) -> F:
            for op in op_types:
                for version in chosen:
                    if (op, version) in self._table:
                        raise RuntimeError(f"{self.what} for {op} version {version} registered twice")
                    self._table[op, version] = fn
            return fn

        return add

    def lookup(self, op_type: str, opset: int) -> F | None:
        version = since_version(op_type, opset)
        found = self._table.get((op_type, version)) if version is not None else None
        return found if found is not None else self._table.get((op_type, ANY))

    def describe(self, op_type: str, opset: int) -> str:
        """``'Softmax' (opset 9: version 1)``, for messages about a missing handler."""
        return f"'{op_type}' (opset {opset}: version {since_version(op_type, opset)})"
