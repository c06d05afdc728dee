"""What a long step that has no progress bar is doing (loading and converting the model,
computing a mask, planning tiles): INFO records on the ``convolutionalize.status`` logger.

The library never prints; the command line shows these records as one status line on a
terminal (:mod:`convolutionalize.cli.status`), and a program may log them like any other.
"""

from __future__ import annotations

import logging

__all__ = ["STATUS", "status"]

STATUS = "convolutionalize.status"
status = logging.getLogger(STATUS)
