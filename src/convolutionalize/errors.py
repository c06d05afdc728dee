"""The exceptions the library raises for models it cannot convert."""

from __future__ import annotations

__all__ = ["NotConvolutionalizable"]


class NotConvolutionalizable(ValueError):
    """The model has no exactly-equivalent convolutional form.

    The message names the node or layer that blocks the conversion and says why,
    e.g. a head that reads a transformer's class token, or a head operation
    without a per-location equivalent.
    """
