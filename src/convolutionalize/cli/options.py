"""What every subcommand shares: exit codes, the error-reporting parser, argument types."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import NoReturn

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "PROG", "Parser", "add_model_output",
           "int_at_least", "model_output"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
PROG = "convolutionalize"


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
