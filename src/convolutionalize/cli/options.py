"""What every subcommand shares: exit codes, the error-reporting parser, argument types, and
the deferred import of the library.

Building the parser imports no framework (``--help`` is instant): this module and the
``register`` functions use the standard library only, and the choices that the library defines
are repeated here (``tests/test_startup.py`` checks that they agree).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "FLAGS", "PRECISIONS", "PROG",
           "SAVE_FORMATS", "Deferred", "Parser", "add_model_output", "cli_words", "fraction", "int_at_least",
           "model_output", "seeded"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT (128 + 2)
PROG = "convolutionalize"
SAVE_FORMATS = (".onnx", ".pt2", ".pt")  # the suffixes of export.FORMATS
PRECISIONS = ("fp32", "bf16")  # inference's Precision


class Deferred:
    """The library names a command module uses, imported when a command runs rather than when
    the parser is built. Each is an attribute of the module all the same: ``Deferred`` is the
    module's ``__getattr__`` (PEP 562), so ``module.name`` imports it and a test may replace it.
    A function's own lookup of a global does not call ``__getattr__``: each command calls
    ``load()`` before it uses the names (the module declares them under ``TYPE_CHECKING``).

    >>> _library = Deferred(__name__, {"verify": "convolutionalize.verify"})  # doctest: +SKIP
    >>> __getattr__ = _library                                                 # doctest: +SKIP
    """

    def __init__(self, module: str, sources: dict[str, str]) -> None:
        self.module = module
        self.sources = sources  # name -> the module to import it from

    def __call__(self, name: str) -> Any:
        """``from <source> import name``, bound in the module."""
        source = self.sources.get(name)
        if source is None:
            raise AttributeError(f"module {self.module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source), name)
        vars(sys.modules[self.module])[name] = value
        return value

    def load(self) -> None:
        """Bind every name the module does not hold yet (a replaced one is kept)."""
        for name in self.sources.keys() - vars(sys.modules[self.module]).keys():
            self(name)


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one ``convolutionalize: error:`` line and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{PROG}: error: {' '.join(message.split())}\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (1: positive, 0: non-negative)."""
    kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be {kind}")
        return value

    return parse


def fraction(low_open: bool) -> Callable[[str], float]:
    """An argparse type: a number in ``(0, 1]`` (``low_open``: a probability threshold) or ``[0, 1]``."""
    interval = "(0, 1]" if low_open else "[0, 1]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and (0 < value if low_open else 0 <= value) and value <= 1):
            raise argparse.ArgumentTypeError(f"{text!r} must be in {interval}")
        return value

    return parse


# The library's keyword arguments and the options that pass them: a library message quoted by
# the command line (``pass a larger image or pool='global'``) names the option instead
# (``--pool global``). Keywords that are ordinary words are replaced only as ``name=``.
FLAGS = {
    "input_size": "--input-size", "output_stride": "--output-stride", "pool": "--pool",
    "bands": "--bands", "tile": "--tile", "precision": "--precision", "batch_size": "--batch-size",
    "mpp": "--mpp", "mask": "--mask", "output": "--model-output", "scales": "--scales",
    "mean": "--mean", "std": "--std", "threshold": "--threshold", "iou": "--iou",
    "exclusive_iou": "--exclusive-iou", "class_index": "--class", "top": "--top",
    "box_output": "--box-output", "background_class": "--background-class", "image_size": "--image-size",
    "samples": "--samples", "seed": "--seed", "scheduler": "--scheduler", "vmin": "--vmin", "vmax": "--vmax",
}
_NAMES = "|".join(FLAGS)
_CALL = r"\b\w+\((?:[^()]|\([^()]*\))*\)"  # a Python call: left as it is, it shows library code
# a call, else keyword=value: 'quoted', (a, tuple), a word
_WORDS = re.compile(rf"""(?P<call>{_CALL})
                         |\b(?P<name>{_NAMES})=(?:(?P<q>['"])(?P<quoted>.*?)(?P=q)
                                                  |\((?P<items>[^()]*)\)|(?P<word>[^\s,;)'"]+))?""", re.X)
_BARE = re.compile(r"(?<![\w.=-])({})\b(?!=)".format("|".join(k for k in FLAGS if "_" in k)))


def cli_words(message: str) -> str:
    """``message`` (a library error) in the command line's words: each ``keyword=value`` of a
    library argument becomes ``--flag value`` (``pool='global'`` -> ``--pool global``,
    ``bands=(1, 2, 3)`` -> ``--bands 1 2 3``) and a bare ``input_size`` ``--input-size``; a
    Python call quoted in the message (``convolutionalize(model, input_size=...)``) stays."""

    def word(match: re.Match[str]) -> str:
        if match.group("call"):
            return match.group("call")
        flag = FLAGS[match.group("name")]
        items = match.group("items")
        value = (match.group("quoted") or match.group("word")
                 or (" ".join(v.strip() for v in items.split(",") if v.strip()) if items else None))
        return flag if not value else f"{flag} {value}"

    parts = re.split(f"({_CALL})", _WORDS.sub(word, message))  # calls at odd indexes
    return "".join(part if k % 2 else _BARE.sub(lambda m: FLAGS[m.group(1)], part)
                   for k, part in enumerate(parts))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's random numbers drawn from ``seed`` inside the block (``--weights random`` is a
    model initialised from it: the same seed, the same weights, the same figures), and as they
    were after it."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def model_output(text: str) -> int | str:
    """An argparse type: an output's index (digits, as an int) or its name. ``all`` is refused:
    every command that takes it works on one map."""
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    if text == "all":
        raise argparse.ArgumentTypeError("'all' names every output; this command uses one: pass "
                                         "its index or name")
    return text


def add_model_output(parser: argparse.ArgumentParser) -> None:
    """``--model-output K`` (``-o`` is the output file), as ``output=`` in the library."""
    parser.add_argument("--model-output", type=model_output, metavar="K", help="which of the "
                        "model's outputs holds the class scores (index or name; default: logits, "
                        "else the first)")
