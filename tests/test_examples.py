"""The seed examples run end to end: exit code 0, the facts they print, the files they write.

Each example is imported by path and its ``main(argv)`` called in-process. ``seed000`` saves
the ``pool="none"`` map as it comes out of the converted model: ``(1, 1000, 7, 7)``
(batch, classes, rows, cols), float32.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ["seed000_resnet50", "seed001_fc_stack", "seed002_generic"]


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_example_states_its_scenario(name: str) -> None:
    module = load_example(name)
    assert module.__doc__ is not None and "Scenario" in module.__doc__
    assert callable(module.main)


@pytest.mark.parametrize("name", NAMES)
def test_example_rejects_unknown_arguments(name: str) -> None:
    with pytest.raises(SystemExit) as info:
        load_example(name).main(["--no-such-option"])
    assert info.value.code == 2


def test_seed000_resnet50(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "nested" / "demo-output"
    assert load_example("seed000_resnet50").main(["--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "naive swap (model.fc = Conv2d): fails, RuntimeError" in out
    assert "224x224 input -> map (1, 1000, 7, 7)" in out
    assert "320x416 input -> map (1, 1000, 4, 7)" in out
    assert "FAILED" not in out
    path = output / "resnet50_map.npy"
    assert f"to {path}" in out
    saved = np.load(path)
    assert saved.shape == (1, 1000, 7, 7)
    assert saved.dtype == np.float32


@pytest.mark.parametrize("seed", [0, 1])
def test_seed001_fc_stack(seed: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert load_example("seed001_fc_stack").main(["--seed", str(seed)]) == 0
    out = capsys.readouterr().out
    assert "convolutions (in, out, kernel): (256, 1024, (4, 4)), (1024, 10, (1, 1))" in out
    assert "256x8x8 input -> map (1, 10, 5, 5)" in out
    assert "over all 25 cells" in out
    assert "FAILED" not in out


def test_seed001_fails_when_a_check_fails(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    module = load_example("seed001_fc_stack")
    monkeypatch.setattr(module, "RTOL", 0.0)  # no float32 result meets a zero tolerance
    assert module.main([]) == 1
    assert "[FAILED] all 25 cells equal the FC net on their crops" in capsys.readouterr().out


@pytest.mark.parametrize("seed", [0, 3])
def test_seed002_generic(seed: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert load_example("seed002_generic").main(["--seed", str(seed)]) == 0
    out = capsys.readouterr().out
    assert "converted: [Conv2d(300, 17, kernel_size=(1, 1)" in out
    assert "64x96 image -> map (1, 10, 19, 35)" in out
    assert "crop equivalent: yes" in out
    assert "FAILED" not in out
