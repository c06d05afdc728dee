"""The exceptions the library raises for models it cannot convert."""

from __future__ import annotations

__all__ = ["ArgumentError", "NotConvolutionalizable", "first_line"]


class NotConvolutionalizable(ValueError):
    """The model has no exactly-equivalent convolutional form.

    The message names the node or layer that blocks the conversion and says why,
    e.g. a head that reads a transformer's class token, or a head operation
    without a per-location equivalent.
    """


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when it has none): what one line
    of a refusal or a ``ValueError`` quotes of an error from deep inside a model or a library."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ArgumentError(ValueError):
    """A caller's mistake found while a conversion reads its arguments against the model (an
    ``input_size`` that is missing, malformed or contradicts the model's own): it passes the
    conversion's error boundary as the ``ValueError`` it is, where anything else unforeseen
    becomes :class:`NotConvolutionalizable`."""
