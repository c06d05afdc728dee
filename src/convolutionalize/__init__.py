"""convolutionalize: rewrite a trained classifier's fully-connected head into exactly
equivalent convolutions, so it runs densely over images of any size.

>>> from convolutionalize import convolutionalize
>>> fcn = convolutionalize(model, input_size=(224, 224))   # doctest: +SKIP
>>> scores = fcn(image)   # (N, classes, rows, cols)          # doctest: +SKIP
"""

from .api import convolutionalize, geometry_of
from .errors import NotConvolutionalizable
from .geometry import Geometry, Span
from .inference import dense_map
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
    "verify",
]

__version__ = "0.1.0"
