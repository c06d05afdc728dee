"""The ``convolutionalize`` command line (``convolutionalize --help``, ``python -m convolutionalize``).

``commands`` holds the parser and the inspect / convert / verify commands, ``predict`` and
``render`` the image commands; all of them build on ``options`` (exit codes, argument types).
"""

from .commands import main

__all__ = ["main"]
