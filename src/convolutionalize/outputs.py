"""Models with several outputs: which one holds the class scores.

A converted model returns what the original returned, with every head output made a map:
a tensor, a tuple or list, a dict, a dataclass or a transformers ``ModelOutput``. The
inference functions and the CLI take ``output=`` to pick the map they work on: an index
(tuple, list, or the n-th tensor of any structure) or a key / attribute name; by default
``logits`` where there is one, else the first tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["OutputKey", "output_keys", "select_output", "tensor_leaves"]

OutputKey = int | str | None


def tensor_leaves(out: Any) -> list[torch.Tensor]:
    """Every tensor in ``out``, in order: through tuples, lists, dicts, dataclasses and
    ``ModelOutput`` (torch's pytree does not know plain dataclasses)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        values: Any = out.values()
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        values = [getattr(out, f.name) for f in dataclasses.fields(out)]
    elif isinstance(out, (list, tuple)):
        values = out
    else:
        return []
    return [leaf for value in values for leaf in tensor_leaves(value)]


def _named_tensors(out: Any) -> list[tuple[int | str, torch.Tensor]]:
    """The tensors of ``out`` in order, each with its key (dict, dataclass) or index."""
    if isinstance(out, Mapping):
        items = list(out.items())
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    else:
        items = list(enumerate(tensor_leaves(out)))
    tensors = [(key, value) for key, value in items if isinstance(value, torch.Tensor)]
    return [(i if isinstance(key, int) else key, value) for i, (key, value) in enumerate(tensors)]


def output_keys(out: Any) -> list[int | str]:
    """The names ``select_output`` accepts for ``out``: keys, field names or indices."""
    return [key for key, _ in _named_tensors(out)]


def select_output(out: Any, output: OutputKey = None) -> torch.Tensor:
    """The tensor ``output`` names in ``out`` (see the module docstring for the rules)."""
    if isinstance(output, bool) or not isinstance(output, (int, str, type(None))):
        raise TypeError(f"output must be an index or a name, got {type(output).__name__}")
    if isinstance(out, torch.Tensor):
        if output not in (None, 0, -1):
            raise ValueError(f"the model has a single output; output={output!r} names no other")
        return out
    named = _named_tensors(out)
    keys = [key for key, _ in named]
    if output is None:
        output = "logits" if "logits" in keys else 0
    if isinstance(output, str):
        if output not in keys:
            raise ValueError(f"the model has no output {output!r}; its outputs are "
                             f"{', '.join(map(repr, keys))}")
        return named[keys.index(output)][1]
    if not -len(named) <= output < len(named):
        raise ValueError(f"output index {output} is out of range: the model returns "
                         f"{len(named)} tensors ({', '.join(map(repr, keys))})")
    return named[output][1]
