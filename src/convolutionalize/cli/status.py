"""Status lines and progress bars on stderr: shown on a terminal, not on a pipe unless asked.

``--progress`` / ``--no-progress`` choose; left out, progress shows when stderr is a terminal
(:func:`shown`). While a command runs, :func:`status_lines` shows each record of the library's
status logger (:mod:`convolutionalize._status`: "converting the model", "planning tiles") as
one line that the next one (or a progress bar) overwrites on a terminal, or as a line of its
own on a pipe.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator

from .._status import STATUS
from .options import PROG

__all__ = ["add_progress", "say", "shown", "status_lines"]


def add_progress(parser: argparse.ArgumentParser, what: str) -> None:
    """``--progress`` / ``--no-progress`` (default: on when stderr is a terminal)."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help=f"{what}, and a status line for the steps before them, on stderr "
                        "(default: on when stderr is a terminal, off on a pipe)")


def shown(args: argparse.Namespace) -> bool:
    """Whether progress shows: as ``--progress`` says, else when stderr is a terminal."""
    given = getattr(args, "progress", None)
    return bool(given) if given is not None else sys.stderr.isatty()


class _StatusHandler(logging.Handler):
    """Each record as a status line: overwritten in place on a terminal, a line on a pipe."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.live = False  # a status line is on the terminal, without its newline

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr
        text = f"{PROG}: {record.getMessage()}"
        if stream.isatty():
            stream.write(f"\r\x1b[K{text} ...")
            self.live = True
        else:
            stream.write(f"{text}\n")
        stream.flush()

    def clear(self) -> None:
        if self.live:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.live = False


_handlers: list[_StatusHandler] = []  # the one status_lines shows, while it runs


def say(text: str) -> None:
    """Print a result line on stdout, below (in place of) a status line on the terminal."""
    for handler in _handlers:
        handler.clear()
    print(text)


@contextlib.contextmanager
def status_lines(show: bool) -> Iterator[None]:
    """The library's status records on stderr while the block runs, where ``show``."""
    if not show:
        yield
        return
    logger, handler = logging.getLogger(STATUS), _StatusHandler()
    saved, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # --verbose shows them once, here
    _handlers.append(handler)
    try:
        yield
    finally:
        _handlers.remove(handler)
        handler.clear()
        logger.removeHandler(handler)
        logger.setLevel(saved)
        logger.propagate = propagate
