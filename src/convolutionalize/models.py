"""Model specs: turn a command-line model name into a PyTorch classifier.

A spec names where a model comes from:

- ``torchvision:NAME`` -- ``torchvision.models.get_model(NAME)``;
- ``timm:NAME`` -- ``timm.create_model(NAME)``;
- ``demo:digits`` -- the digits demo's classifier (:func:`convolutionalize.demo.digits_classifier`),
  whose trained weights ``convolutionalize demo`` writes as ``digits.pth``;
- a path to a ``.pt2`` file (a ``torch.export`` program, ``torch.export.save``), loaded as
  ``torch.export.load(path).module()``;
- a path to a ``.pt`` / ``.pth`` file holding a whole pickled ``nn.Module``
  (``torch.save(model, path)``). Unpickling a module runs code from the file, so, like
  ``torch.load`` itself, such a file is read only with ``weights_only=True`` unless the
  caller trusts it (``trust_pickle=True``, ``--trust-pickle`` on the command line).

Weights are ``None`` (the pretrained default, which may need a download), ``"random"``
(the architecture's random initialisation), a torchvision weights name such as
``"IMAGENET1K_V2"``, or a path to a ``state_dict`` file loaded strictly into the named
architecture (always with ``weights_only=True``: a state_dict needs no trust). Nothing here
waits on an unreachable network: when pretrained weights are not cached and their host does
not answer within seconds, loading fails at once with a ``ValueError`` that says how to go on
without them. Every failure a caller can fix is a one-line ``ValueError``. TorchScript
archives (``.pt`` files written by ``torch.jit.save``) load with ``torch.jit.load``, without
pickle trust, and convert like any module.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import re
import socket
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import getproxies

import torch
from torch import nn

from .api import load_model_file
from .errors import first_line
from .frameworks.base import META_KEY, Conversion

__all__ = ["MODEL_SUFFIXES", "default_input_size", "load_model"]

logger = logging.getLogger(__name__)

MODEL_SUFFIXES = (".pt", ".pth", ".pt2", ".keras", ".h5", ".hdf5", ".onnx")
RANDOM = "random"
_FILE_SUFFIXES = (".keras", ".h5", ".hdf5", ".onnx")  # files that carry their weights (load_model_file)
DEFAULT_INPUT_SIZE = (224, 224)
PROBE_TIMEOUT_S = 3.0  # how long a weights host may take to answer before we call it offline
DOWNLOAD_TIMEOUT_S = 30.0  # socket timeout while downloading, so a stalled transfer fails

_SPEC_HELP = ("use torchvision:NAME, timm:NAME, demo:digits, a .pt2 (torch.export) file, a .pt/.pth "
              "file holding an nn.Module, a .keras / .h5 / .onnx model file or a TensorFlow SavedModel "
              "directory")
_UNSAFE_GLOBAL = "Unsupported global"  # how torch's weights-only unpickler names a pickled class
_OFFLINE_HINT = (
    "pass --weights random (random initialisation) or --weights PATH (a state_dict file)"
)


def load_model(spec: str, weights: str | None = None, *, trust_pickle: bool = False) -> Any:
    """The model that ``spec`` names, with ``weights`` loaded, in eval mode, on the CPU.

    ``trust_pickle``: load a ``.pt`` / ``.pth`` file holding a whole pickled module with
    ``torch.load(weights_only=False)``, which runs the file's code. Only for files you
    trust; state_dicts, ``.pt2``, ``.keras`` and ``.onnx`` files never need it.

    Raises:
        ValueError: unknown model name, missing or unreadable file, a full-module pickle
            without ``trust_pickle``, weights that do not fit the architecture, or
            pretrained weights that cannot be downloaded.
    """
    source, _, name = spec.partition(":")
    if source == "torchvision" and name:
        model = _torchvision_model(name, weights).eval()
    elif source == "timm" and name:
        model = _timm_model(name, weights).eval()
    elif source == "demo" and name:
        model = _demo_model(name, weights).eval()
    else:
        model = _file_model(Path(spec), weights, trust_pickle)
    logger.info("loaded %s (%s)", spec, type(model).__name__)
    return model


def default_input_size(spec: str, model: nn.Module) -> tuple[int, int] | None:
    """The native input size to assume for ``spec`` when the user gives none.

    torchvision: the crop size of the architecture's default pretrained weights (299 for
    ``inception_v3``), else 224. timm models and models carrying a ``pretrained_cfg``:
    ``None``, the converter reads the size from the model.

    Raises:
        ValueError: a model file that does not record its native size.
    """
    source, _, name = spec.partition(":")
    if getattr(model, "geometry", None) is not None:
        return None  # a converted model carries its size
    if source == "torchvision" and name:
        return _torchvision_crop_size(name)
    if (source == "timm" and name) or isinstance(getattr(model, "pretrained_cfg", None), dict):
        return None
    recorded = getattr(model, "input_size", None)  # e.g. demo:digits
    if isinstance(recorded, (tuple, list)) and len(recorded) == 2:
        return (int(recorded[0]), int(recorded[1]))
    if Path(spec).suffix.lower() in _FILE_SUFFIXES or Path(spec).is_dir():
        return None  # the file's static input shape says it (the converter asks otherwise)
    raise ValueError(
        f"{spec} does not record its native (training) input size; pass --input-size H W"
    )


# --------------------------------------------------------------------------- torchvision


def _torchvision_model(name: str, weights: str | None) -> nn.Module:
    import torchvision.models as tvm

    if name not in tvm.list_models():
        raise _unknown("torchvision", name, "torchvision.models.list_models()")
    untrained = _untrained(f"torchvision:{name}", weights, lambda: tvm.get_model(name, weights=None))
    if untrained is not None:
        return untrained
    chosen = _torchvision_weights(name, weights or "DEFAULT")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(chosen.url).path).name
    return _pretrained(f"torchvision:{name}", None if cached.is_file() else chosen.url,
                       lambda: tvm.get_model(name, weights=chosen))


def _unknown(source: str, name: str, listing: str) -> ValueError:
    return ValueError(f"unknown {source} model {name!r}; list the names with: python -c "
                      f"'import {source}; print({listing})'")


def _untrained(spec: str, weights: str | None, build: Callable[[], nn.Module]) -> nn.Module | None:
    """The model with random weights (``--weights random``) or a state-dict file's weights;
    ``None`` when pretrained weights are asked for."""
    if weights == RANDOM:
        return build()
    if weights is not None and _is_path(weights):
        return _load_state_dict(build(), Path(weights), spec)
    return None


def _pretrained(spec: str, url: str | None, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()``, which downloads pretrained weights from ``url`` (``None``: already cached),
    failing fast with a hint when the host does not answer."""
    if url is not None and not _reachable(url):
        raise ValueError(f"cannot download the pretrained weights of {spec} (no network); "
                         + _OFFLINE_HINT)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return build()
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"cannot load the pretrained weights of {spec}: {first_line(exc)}; "
                         + _OFFLINE_HINT) from exc


def _torchvision_weights(name: str, weights: str) -> Any:
    """The weights enum member ``weights`` (e.g. ``DEFAULT``, ``IMAGENET1K_V2``) of ``name``."""
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(name)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"torchvision:{name} has no pretrained weights; {_OFFLINE_HINT}") from exc
    try:
        return enum[weights]
    except KeyError:
        choices = ", ".join(["DEFAULT", *(member.name for member in enum)])
        raise ValueError(
            f"unknown weights {weights!r} for torchvision:{name}: use one of {choices}, "
            f"{RANDOM!r}, or a path to a state_dict file"
        ) from None


def _torchvision_crop_size(name: str) -> tuple[int, int]:
    import torchvision.models as tvm

    try:
        transforms = tvm.get_model_weights(name).DEFAULT.transforms
    except (ValueError, KeyError, AttributeError):
        return DEFAULT_INPUT_SIZE
    crop = getattr(transforms, "keywords", {}).get("crop_size")
    if isinstance(crop, int):
        return (crop, crop)
    if isinstance(crop, (list, tuple)) and len(crop) in (1, 2):
        return (int(crop[0]), int(crop[-1]))
    return DEFAULT_INPUT_SIZE


# --------------------------------------------------------------------------- timm


def _timm_model(name: str, weights: str | None) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise ValueError("timm models need timm: pip install 'convolutionalize[timm]'") from exc
    if not timm.is_model(name):
        raise _unknown("timm", name, "timm.list_models()")
    untrained = _untrained(f"timm:{name}", weights, lambda: timm.create_model(name, pretrained=False))
    if untrained is not None:
        return untrained
    if weights is not None:
        raise ValueError(
            f"timm models name their pretrained weights in the model name "
            f"(timm:{name}.TAG), not with --weights {weights}"
        )
    return _timm_pretrained(name)


def _timm_pretrained(name: str) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``: from the local cache when there, else
    downloaded, but only when the Hugging Face Hub answers (timm retries for a minute)."""
    import timm

    try:
        with _hf_offline():
            return timm.create_model(name, pretrained=True)
    except OSError:
        logger.info("timm:%s weights are not cached", name)
    except RuntimeError as exc:  # timm: "No pretrained weights exist for ..."
        raise ValueError(f"timm:{name}: {first_line(exc)}; {_OFFLINE_HINT}") from exc
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return _pretrained(f"timm:{name}", endpoint, lambda: timm.create_model(name, pretrained=True))


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Make the Hugging Face Hub client read only its local cache."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


# --------------------------------------------------------------------------- demo


def _demo_model(name: str, weights: str | None) -> nn.Module:
    """The digits demo's classifier: random, or with the state_dict the demo wrote."""
    from .demo import digits_classifier

    if name != "digits":
        raise ValueError(f"unknown demo model {name!r}: the demo has demo:digits")
    model = _untrained(f"demo:{name}", weights, digits_classifier)
    if model is None:
        raise ValueError(
            "demo:digits has no downloadable weights: pass --weights demo-output/digits.pth "
            f"(the state_dict that convolutionalize demo writes) or --weights {RANDOM}"
        )
    return model


# --------------------------------------------------------------------------- files


def _file_model(path: Path, weights: str | None, trust_pickle: bool) -> nn.Module:
    suffix = path.suffix.lower()
    if path.is_dir():  # a TensorFlow SavedModel, recognised from its files by its adapter
        if weights is not None:
            raise ValueError(f"--weights {weights} does not apply to the SavedModel {path.name}: its "
                             "weights are in the directory")
        return load_model_file(path)
    if suffix not in MODEL_SUFFIXES and not path.is_file():
        raise ValueError(f"unknown model {str(path)!r}: {_SPEC_HELP}")
    if not path.is_file():
        raise ValueError(f"model file {path} not found")
    exported = suffix == ".pt2" or _is_exported_program(path)
    if weights is not None and (weights == RANDOM or exported or suffix in _FILE_SUFFIXES):
        raise ValueError(
            f"--weights {weights} does not apply to the model file {path.name}: its weights "
            "are in the file"
        )
    if suffix in _FILE_SUFFIXES:
        return load_model_file(path)
    if exported:
        return _exported_module(path)
    if _is_torchscript(path):
        return _script_module(path)
    obj = _unpickle(path, trust_pickle)
    if isinstance(obj, Mapping):
        raise ValueError(
            f"{path.name} holds a mapping (a state_dict?), not an nn.Module: pass the "
            f"architecture as torchvision:NAME, timm:NAME or demo:digits and this file as "
            f"--weights {path}"
        )
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{path.name} holds no nn.Module (type {type(obj).__name__})")
    if weights is not None:
        obj = _load_state_dict(obj, Path(weights), path.name)
    return obj.eval()


def _unpickle(path: Path, trust_pickle: bool) -> object:
    """The object ``torch.save`` wrote: weights-only unless the caller trusts the file
    (a whole pickled module needs trust: unpickling it may run the file's code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if not trust_pickle and _UNSAFE_GLOBAL in str(exc):
            raise ValueError(
                f"{path.name} is a full-module pickle (torch.save(model)), which runs code when "
                "loaded: if you trust the file, pass --trust-pickle (CLI) or trust_pickle=True "
                "(library); otherwise save the model's state_dict (and pass it with --weights) "
                "or a .pt2 (torch.export) instead"
            ) from exc
        raise ValueError(f"cannot read the model file {path}: {_unpickling_error(exc)}") from exc
    except (OSError, EOFError, RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot read the model file {path}: {_first_sentence(exc)}") from exc
    except (AttributeError, ImportError) as exc:
        raise ValueError(
            f"cannot unpickle {path.name}: {first_line(exc)}; the module that defines the "
            "model's class must be importable"
        ) from exc


def _unpickling_error(exc: pickle.UnpicklingError) -> str:
    """What the unpickler found wrong, without torch's paragraph about ``weights_only``."""
    _, found, detail = str(exc).partition("WeightsUnpickler error:")
    lines = [line.strip() for line in detail.splitlines() if line.strip()] if found else []
    return lines[0].rstrip(".") if lines else _first_sentence(exc)


def _is_exported_program(path: Path) -> bool:
    """Whether ``path`` is a ``torch.export.save`` archive (whatever its suffix)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if name.endswith("/archive_format")]
        return any(archive.read(name).strip() == b"pt2" for name in names)


def _exported_module(path: Path) -> nn.Module:
    """``torch.export.load(path).module()``: the program as a runnable ``GraphModule``, in the
    mode it was exported in (exported programs refuse ``.eval()``: export in eval mode)."""
    for attempt in range(2):
        with _collected_logs("torch.export") as messages:
            try:
                extra = {META_KEY: ""}
                module = torch.export.load(str(path), extra_files=extra).module()
                if not extra[META_KEY]:
                    return module
                return _converted(module, Conversion.from_json(extra[META_KEY]))
            except Exception as exc:  # the deserializer raises many types (KeyError, ...)
                if attempt == 0 and _import_output_type(messages):
                    continue
                raise ValueError(
                    f"cannot read the torch.export file {path}: {first_line(exc)}"
                ) from exc
    raise AssertionError("unreachable")


def _converted(module: nn.Module, conversion: Conversion, out_spec: Any = None) -> nn.Module:
    """A converted model's saved graph, with the conversion it was saved with."""
    from .frameworks.torch.layers import ConvolutionalizedModule
    from .selfcheck import SelfCheck

    check = conversion.self_check or SelfCheck(None, conversion.geometry.input_size, (1, 1), None)
    fcn = ConvolutionalizedModule(module, conversion.geometry, conversion.plan, check, out_spec)
    fcn.training = False  # the program keeps the mode it was exported in (it refuses .eval())
    return fcn


@contextlib.contextmanager
def _collected_logs(name: str) -> Iterator[list[str]]:
    """The messages logger ``name`` emits, kept from stderr (torch logs why a load failed)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(  # type: ignore[method-assign]
        logging.Formatter().format(record))  # with the traceback, where the reason is
    logger = logging.getLogger(name)
    saved = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [handler], False
    try:
        yield messages
    finally:
        logger.handlers, logger.propagate = saved


def _import_output_type(messages: list[str]) -> bool:
    """A program whose output is, say, a transformers ``ModelOutput`` loads only once the module
    that registers that type with torch's pytree is imported: import it (an installed module
    named by the error, never code from the file) and say whether that was the problem."""
    for message in messages:
        found = re.search(r"Deserializing ([\w.]+) in pytree is not registered", message)
        if found:
            try:
                importlib.import_module(found.group(1).rpartition(".")[0])
            except ImportError:
                return False
            return True
    return False


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _script_module(path: Path) -> nn.Module:
    """A TorchScript archive (no pickle trust needed): the ScriptModule, or the converted model
    it holds with its conversion."""
    from .errors import NotConvolutionalizable
    from .frameworks.base import Conversion
    from .frameworks.torch.capture import capture
    from .frameworks.torch.script import TORCHSCRIPT

    extra = {META_KEY: ""}
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated: the archive is what there is
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra).eval()
    except RuntimeError as exc:
        raise ValueError(f"cannot read the TorchScript file {path}: {first_line(exc)}") from exc
    if not extra[META_KEY]:
        return module
    # lifted to a graph (as a conversion lifts it), so that dense maps fuse, stream and measure
    # it like any converted model
    conversion = Conversion.from_json(extra[META_KEY])
    try:
        captured = capture(module, conversion.plan.in_channels, conversion.geometry.input_size)
    except NotConvolutionalizable as exc:
        raise ValueError(f"cannot read the TorchScript file {path}: {first_line(exc)}") from exc
    fcn = _converted(captured.gm, conversion, captured.out_spec)
    fcn.source_format = TORCHSCRIPT
    return fcn


# --------------------------------------------------------------------------- state dicts


def _load_state_dict(model: nn.Module, path: Path, label: str) -> nn.Module:
    """``model`` with the state_dict in ``path`` loaded strictly."""
    if not path.is_file():
        raise ValueError(f"weights file {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, ValueError) as exc:
        raise ValueError(
            f"cannot read the weights file {path} (expected a state_dict saved with "
            f"torch.save): {_first_sentence(exc)}"
        ) from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds no state_dict (type {type(state).__name__})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"the weights in {path} do not fit {label}: {_mismatch(model, state, exc)}"
        ) from exc
    return model


def _mismatch(model: nn.Module, state: Mapping[str, Any], exc: RuntimeError) -> str:
    """A one-line summary of what ``load_state_dict`` found wrong."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    parts = [f"{label} {len(keys)} keys ({_some(keys)})"
             for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if parts:
        return "; ".join(parts)
    sizes = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
    return sizes[0] if sizes else first_line(exc)


def _some(keys: list[str], shown: int = 3) -> str:
    return ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")


# --------------------------------------------------------------------------- helpers


def _is_path(weights: str) -> bool:
    """Whether a ``--weights`` value names a file rather than a weights name."""
    return os.sep in weights or "." in weights or Path(weights).exists()


def _reachable(url: str) -> bool:
    """Whether ``url``'s host (or the configured HTTPS proxy) accepts a connection quickly."""
    target = urlparse(getproxies().get(urlparse(url).scheme) or url)
    host = target.hostname
    if host is None:
        return False
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        logger.info("%s:%s is not reachable", host, port)
        return False


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    saved = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(saved)


def _first_sentence(exc: BaseException) -> str:
    line = first_line(exc)
    return line.split(". ")[0].rstrip(".")


