"""Which paths hold TensorFlow models, recognised from their files (no framework imported)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

__all__ = ["is_saved_model", "is_tf_keras_file"]


def is_saved_model(path: Path) -> bool:
    """A SavedModel directory (or its ``saved_model.pb``): the file TensorFlow writes, not a name."""
    if path.name == "saved_model.pb":
        return path.is_file()
    return path.is_dir() and (path / "saved_model.pb").is_file()


def is_tf_keras_file(path: Path) -> bool:
    """A ``.keras`` zip written by tf_keras (Keras 2): its ``metadata.json`` says so."""
    if path.suffix.lower() != ".keras" or not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            version = json.loads(archive.read("metadata.json")).get("keras_version", "")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, AttributeError):
        return False
    return isinstance(version, str) and version.startswith("2.")
