"""The ``convolutionalize`` command line (``convolutionalize --help``, ``python -m convolutionalize``).

``commands`` holds the parser and the inspect / convert / verify commands, ``predict`` and
``render`` the image commands; all of them build on ``options`` (exit codes, argument types).
Building the parser imports only the standard library: ``--help`` is instant, and a command
imports the library when it runs.
"""

from .commands import main

__all__ = ["main"]
