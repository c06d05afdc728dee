"""Keras 3 adapter: analysis, geometry and rewrite of Keras classifier models.

Keras chooses its backend once, when it is first imported: ``KERAS_BACKEND``, else the
``"backend"`` of ``keras.json`` (which Keras itself writes as ``"tensorflow"`` on first use),
else TensorFlow. Our ``[keras]`` extra installs no TensorFlow, so :func:`select_backend` runs
here, before any module of this package imports keras: a backend that cannot be imported is
replaced by one that can (torch, always installed with us), once, with a log message.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

__all__ = ["configured_backend", "select_backend"]

log = logging.getLogger(__name__)

BACKEND_MODULES = {"torch": ("torch",), "jax": ("jax",), "tensorflow": ("tensorflow",),
                   "numpy": ("jax", "scipy"), "openvino": ("openvino",)}  # what each backend imports
FALLBACKS = ("torch", "jax", "tensorflow")  # in order of preference; all run our layers


def _config_path() -> Path:
    """Where Keras reads ``keras.json`` (as ``keras.src.backend.config`` finds it)."""
    if "KERAS_HOME" in os.environ:
        return Path(os.environ["KERAS_HOME"]).expanduser() / "keras.json"
    home = Path("~").expanduser()
    return (home if os.access(home, os.W_OK) else Path("/tmp")) / ".keras" / "keras.json"


def configured_backend() -> tuple[str, str]:
    """The backend Keras would choose if imported now, and where that choice comes from."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"], "KERAS_BACKEND"
    path = _config_path()
    try:
        backend = json.loads(path.read_text()).get("backend")
    except (OSError, ValueError, AttributeError):  # absent, unreadable, not JSON, not an object
        backend = None
    if isinstance(backend, str) and backend:
        return backend, str(path)
    return "tensorflow", "Keras' default"


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None  # found, not imported: cheap
    except (ImportError, ValueError):  # a finder that refuses it, a half-imported module
        return False


def _absent(backend: str) -> list[str] | None:
    """The modules that Keras' ``backend`` imports and that cannot be found; None for a name
    that is no Keras backend (Keras would raise "Unable to import backend")."""
    modules = BACKEND_MODULES.get(backend)
    return None if modules is None else [module for module in modules if not _findable(module)]


def _importable(backend: str) -> bool:
    return _absent(backend) == []


def _missing(backend: str) -> str:
    absent = _absent(backend)
    if absent is None:
        return f"is not a Keras backend ({', '.join(BACKEND_MODULES)})"
    return f"needs {' and '.join(absent)}, which cannot be imported"


def select_backend() -> str:
    """The Keras backend this process uses; if keras is not imported yet and the configured
    backend cannot be imported, set ``KERAS_BACKEND`` to one that can first.

    An explicit, importable ``KERAS_BACKEND`` is kept. Runs when this package is imported.

    Raises:
        ValueError: keras is already imported with a backend that cannot be imported, or no
            backend at all can be.
    """
    if "keras" in sys.modules:  # its choice is made (a failed import leaves none behind)
        config = sys.modules.get("keras.src.backend.config")
        backend = config.backend() if config is not None else configured_backend()[0]
        if _importable(backend):
            return backend
        raise ValueError(f"keras was imported with the '{backend}' backend, which {_missing(backend)}; set "
                         "KERAS_BACKEND=torch before anything imports keras")
    backend, source = configured_backend()
    if _importable(backend):
        return backend
    chosen = next((name for name in FALLBACKS if _importable(name)), None)
    if chosen is None:
        raise ValueError(f"the Keras backend '{backend}' (from {source}) {_missing(backend)}, and none of "
                         f"{', '.join(FALLBACKS)} is installed; install torch")
    os.environ["KERAS_BACKEND"] = chosen
    log.info("Keras backend '%s' (from %s) %s; using '%s' (set KERAS_BACKEND to choose)",
             backend, source, _missing(backend), chosen)
    return chosen


select_backend()
