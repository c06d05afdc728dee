"""convolutionalize: rewrite a trained classifier's fully-connected head into exactly
equivalent convolutions, so it runs densely over images of any size.

>>> from convolutionalize import convolutionalize
>>> fcn = convolutionalize(model, input_size=(224, 224))   # doctest: +SKIP
>>> scores = fcn(image)   # (N, classes, rows, cols)          # doctest: +SKIP
>>> save(fcn, "model.pt2")   # load_model("model.pt2") reads it back   # doctest: +SKIP

The public names are imported on first use (PEP 562), so that ``import convolutionalize``
and the command line's ``--help`` load no deep-learning framework.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import convolutionalize, geometry_of
    from .errors import NotConvolutionalizable
    from .export import save
    from .geometry import Geometry, Span
    from .inference import dense_map
    from .models import load_model
    from .plan import FeatureMap, HeadPlan, HeadStep
    from .verify import VerifyReport, verify

__all__ = [
    "FeatureMap",
    "Geometry",
    "HeadPlan",
    "HeadStep",
    "NotConvolutionalizable",
    "Span",
    "VerifyReport",
    "convolutionalize",
    "dense_map",
    "geometry_of",
    "load_model",
    "save",
    "verify",
]

__version__ = "0.1.0"

_SOURCES = {  # public name -> the module that defines it
    "FeatureMap": ".plan",
    "Geometry": ".geometry",
    "HeadPlan": ".plan",
    "HeadStep": ".plan",
    "NotConvolutionalizable": ".errors",
    "Span": ".geometry",
    "VerifyReport": ".verify",
    "convolutionalize": ".api",
    "dense_map": ".inference",
    "geometry_of": ".api",
    "load_model": ".models",
    "save": ".export",
    "verify": ".verify",
}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use and kept."""
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(source, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """This package's module type: the function ``verify`` shares its name with the module
    ``verify``, and importing that module sets the package's attribute to it; the package
    keeps the function there, as an eager ``from .verify import verify`` did."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SOURCES and value is sys.modules.get(f"{__name__}.{name}"):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
