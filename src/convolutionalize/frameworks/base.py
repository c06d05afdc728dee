"""The adapter contract: what every framework package implements, once.

Nothing outside ``frameworks/`` asks which framework a model belongs to: it asks the
registry (:func:`convolutionalize.frameworks.adapter_for`) for the model's adapter and calls
the methods below. Each adapter module is cheap to import (its framework is imported inside
the methods that need it), so that asking whether an object is "ours" never loads keras,
onnx or the torch.fx machinery.

A conversion goes: :meth:`Adapter.native_size` (the caller's ``input_size`` read against the
model: mistakes are :class:`~convolutionalize.errors.ArgumentError`) -> :meth:`Adapter.convert`
(analysis into a :class:`~convolutionalize.plan.HeadPlan`, rewrite, and the one self-check in
:mod:`convolutionalize.selfcheck`). The error boundary around ``convert`` lives once, in
:func:`convolutionalize.api.convolutionalize`.
"""

from __future__ import annotations

import json
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..geometry import Geometry, PoolMode
from ..plan import HeadPlan
from ..selfcheck import SelfCheck

if TYPE_CHECKING:
    import numpy as np

    from ..inference._runner import DenseModel, OutputChoice

__all__ = ["META_KEY", "Adapter", "Conversion", "ConversionInfo"]

META_KEY = "convolutionalize.json"  # the stored conversion, in any file format's own metadata


@dataclass(frozen=True)
class Conversion:
    """What a converted model carries, in every format it is saved in: its geometry, its plan
    and what it measured on itself."""

    geometry: Geometry
    plan: HeadPlan
    self_check: SelfCheck | None

    @property
    def native_error(self) -> float | None:
        return None if self.self_check is None else self.self_check.native_error

    def to_json(self) -> str:
        return json.dumps({"geometry": json.loads(self.geometry.to_json()), "plan": self.plan.to_dict(),
                           "self_check": None if self.self_check is None else self.self_check.to_dict()})

    @classmethod
    def from_json(cls, text: str) -> Conversion:
        data = json.loads(text)
        return cls(Geometry.from_json(json.dumps(data["geometry"])), HeadPlan.from_dict(data["plan"]),
                   SelfCheck.from_dict(data.get("self_check")))


@dataclass(frozen=True)
class ConversionInfo:
    """What any converted model records about its conversion (read by the CLI and verify)."""

    plan: str  # the HeadPlan, human-readable
    geometry: Geometry
    native_error: float | None
    in_channels: int
    self_check: str | None = None  # what the conversion measured at a larger size


class Adapter(ABC):
    """One framework (or deployed form): which models it claims, how it loads, converts,
    describes, saves and runs them."""

    name: ClassVar[str]  # as messages name the framework: "PyTorch", "Keras", "ONNX"
    kind: ClassVar[str]  # the objects it claims, as messages name them: "keras.Model"
    suffixes: ClassVar[tuple[str, ...]] = ()  # model files it loads by path
    writes: ClassVar[tuple[str, ...]] = ()  # the formats it saves a converted model in
    first: ClassVar[bool] = False  # asked before the others (its models are also theirs)
    maps_all_outputs: ClassVar[bool] = False  # dense_map(output="all") stacks every output in one pass
    runs_windows: ClassVar[bool] = False  # dense_map(fallback="windows") can run it crop by crop
    counts_flops: ClassVar[bool] = False  # inspect counts its FLOPs (convolutionalize.flops)

    # ---- claiming and loading

    @abstractmethod
    def claims(self, model: object) -> bool:
        """True when ``model`` is an object of this framework (without importing it)."""

    def claims_path(self, path: Path) -> bool:
        """True when this adapter loads the file at ``path``."""
        return path.suffix.lower() in self.suffixes

    def load(self, path: Path) -> Any:
        """The model in the file at ``path`` (a converted one with its :class:`Conversion`);
        ``ValueError`` (one line) when it cannot be read."""
        raise ValueError(f"{self.name} models are not loaded from files ({path.name})")

    # ---- converting

    def native_size(self, model: Any, input_size: object) -> tuple[int, int] | None:
        """The native input size: given, or carried by the model; raises ArgumentError for a
        missing or contradicting one. ``None`` (the default): read against the model's own
        input by its analysis, which raises the ArgumentError there."""
        return None

    @abstractmethod
    def convert(self, model: Any, input_size: tuple[int, int] | None, pool: PoolMode,
                output_stride: int | None) -> Any:
        """The converted model, checked with :class:`convolutionalize.selfcheck.Reference`.
        Raises NotConvolutionalizable for what it cannot convert; anything else it raises is
        turned into one by the caller."""

    @abstractmethod
    def conversion(self, model: Any) -> Conversion | None:
        """What a converted model carries; ``None`` for a model that is not converted."""

    def label(self, model: Any) -> str:
        """The model as a message names it."""
        name = getattr(model, "name", None)
        return f"{self.name} model '{name}'" if isinstance(name, str) and name else type(model).__name__

    def info(self, fcn: Any) -> ConversionInfo:
        """The plan, geometry, native-size error and image channels of a converted model."""
        conversion = self.conversion(fcn)
        if conversion is None:
            raise TypeError(f"{type(fcn).__name__} is not a convolutionalized model (no geometry)")
        check = conversion.self_check
        return ConversionInfo(conversion.plan.describe(), conversion.geometry, conversion.native_error,
                              conversion.plan.in_channels, None if check is None else check.describe())

    def parameters(self, model: Any) -> int | None:
        """The model's parameter count, where the framework counts them."""
        return None

    # ---- saving and running

    @abstractmethod
    def save(self, fcn: Any, path: Path) -> Path:
        """Write a converted model to ``path`` (its suffix names the format) atomically, with its
        :class:`Conversion`; ValueError for a suffix this framework does not write."""

    @abstractmethod
    def runner(self, model: Any, output: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
        """A function from an NCHW float32 batch to the model's class scores (numpy; maps as
        ``(N, classes, rows, cols)``), for any model of this framework, converted or not;
        ``output``: the index of another output."""

    @abstractmethod
    def dense_model(self, fcn: Any, output: OutputChoice) -> DenseModel:
        """What ``dense_map`` needs of a converted model (shapes, runners, digest)."""

    # ---- what a framework's dense model asks (frameworks other than PyTorch)

    def input_channels(self, model: Any) -> int:
        """The image channels the model takes."""
        raise NotImplementedError

    def activation_shapes(self, model: Any, size: tuple[int, int],
                          output: int = 0) -> tuple[tuple[int, ...], list[int]]:
        """Output ``output``'s shape (without batch, classes first) at ``size`` and the element
        counts of the intermediate tensors, without computing."""
        raise NotImplementedError

    def digest(self, model: Any) -> str:
        """A short hash of the model's structure and weights."""
        raise NotImplementedError

    def to_bytes(self, model: Any) -> bytes:
        """The model in its own file format (how a runner travels to dask workers)."""
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"model{self.suffixes[0]}"
            self.save(model, path)
            return path.read_bytes()

    def from_bytes(self, data: bytes) -> Any:
        """The model :meth:`to_bytes` gave."""
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"model{self.suffixes[0]}"
            path.write_bytes(data)
            return self.load(path)
