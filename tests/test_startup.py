"""Start-up: ``--help``, ``--version`` and ``import convolutionalize`` import no framework.

Structural, not timed: each case runs a fresh interpreter with ``-X importtime`` and reads
which modules it imported. The command line builds its parser from the standard library only
(the commands import the library when they run); the package imports its public names on
first use (PEP 562). ``benchmarks/startup.py`` measures the times.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from typing import get_args

import pytest

import convolutionalize
from convolutionalize.cli import options

FRAMEWORKS = ("torch", "keras", "tensorflow", "onnx", "onnxruntime", "sympy", "numpy")
CONVERSION = ("sympy", "torch.fx.experimental.symbolic_shapes")  # loaded by torch.export only
COMMANDS = ("inspect", "convert", "verify", "predict", "heatmap", "detect", "demo")


def imported(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -X importtime *args``; its result and every module it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True,
                            text=True, timeout=300, check=False)
    modules = {line.rpartition("|")[2].strip() for line in result.stderr.splitlines()
               if line.startswith("import time:")}
    return result, modules


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (or their submodules) are among ``modules``."""
    return sorted(m for m in modules if any(m == n or m.startswith(f"{n}.") for n in names))


@pytest.mark.parametrize("args", [["--help"], ["--version"], *([c, "--help"] for c in COMMANDS)],
                         ids=lambda args: " ".join(args))
def test_help_and_version_import_no_framework(args: list[str]) -> None:
    result, modules = imported("-m", "convolutionalize", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: convolutionalize" if "--help" in args else "convolutionalize ")
    assert "convolutionalize.cli.commands" in modules  # the parser was built
    assert loaded(modules, FRAMEWORKS) == []


def test_a_usage_error_imports_no_framework() -> None:
    result, modules = imported("-m", "convolutionalize", "predict", "model.pt")
    assert result.returncode == 2
    assert "convolutionalize: error: the following arguments are required" in result.stderr
    assert loaded(modules, FRAMEWORKS) == []


def test_import_loads_no_framework() -> None:
    result, modules = imported("-c", "import convolutionalize")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "convolutionalize" in modules
    assert loaded(modules, (*FRAMEWORKS, *CONVERSION)) == []


def test_the_function_verify_is_not_shadowed_by_its_module() -> None:
    code = ("import importlib, convolutionalize\n"
            "module = importlib.import_module('convolutionalize.verify')\n"
            "from convolutionalize import verify\n"
            "assert verify is module.verify and convolutionalize.verify is module.verify, verify\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("name", convolutionalize.__all__)
def test_public_names_resolve_lazily(name: str) -> None:
    value = getattr(convolutionalize, name)
    module = importlib.import_module(convolutionalize._SOURCES[name], "convolutionalize")
    assert value is getattr(module, name)
    assert name in dir(convolutionalize)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        convolutionalize.no_such_name  # noqa: B018


def test_the_parser_choices_match_the_library() -> None:
    from convolutionalize.export import FORMATS
    from convolutionalize.inference._runner import Precision

    assert options.SAVE_FORMATS == tuple(FORMATS)
    assert options.PRECISIONS == get_args(Precision)
