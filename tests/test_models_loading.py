"""Loading model files without running their code: a whole pickled module (``torch.save(model)``)
runs code when it is unpickled, so it loads only when the caller trusts it (``trust_pickle=True``,
``--trust-pickle``). State dicts (``--weights``), ``torch.export`` programs (``.pt2``) and
TorchScript archives are read without trust, and a state dict always weights-only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from convolutionalize.cli import main
from convolutionalize.demo import digits_classifier
from convolutionalize.models import load_model

from _tiny import INPUT_SIZE, TinyNet

UNTRUSTED = r"full-module pickle .*runs code when loaded"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.pt (a pickled module), state dicts, a torch.export program as .pt2 and as .pt,
    a TorchScript archive and a 20x24 grey page."""
    root = tmp_path_factory.mktemp("loading")
    torch.manual_seed(0)
    tiny = TinyNet().eval()
    torch.save(tiny, root / "tiny.pt")
    torch.save(tiny.state_dict(), root / "tiny_state.pth")
    torch.save(digits_classifier().state_dict(), root / "digits.pth")
    example = torch.randn(2, 1, *INPUT_SIZE)
    program = torch.export.export(tiny, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    torch.export.save(program, str(root / "tiny.pt2"))
    torch.export.save(program, str(root / "exported.pt"))
    with warnings.catch_warnings():  # torch.jit.script is deprecated; it still writes archives
        warnings.simplefilter("ignore")
        torch.jit.script(TinyNet()).save(str(root / "scripted.pt"))
    pixels = np.random.default_rng(0).integers(0, 256, (20, 24), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "page.png")
    return root


@pytest.fixture()
def torch_loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The ``weights_only`` argument of every ``torch.load`` call made meanwhile."""
    calls: list[Any] = []
    real: Callable[..., Any] = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    yield calls


def _same_outputs(model: torch.nn.Module, files: Path) -> None:
    reference = torch.load(files / "tiny.pt", weights_only=False)
    x = torch.randn(3, 1, *INPUT_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- library


def test_full_pickle_is_refused_without_trust(files: Path, torch_loads: list[Any]) -> None:
    with pytest.raises(ValueError, match=UNTRUSTED + r".*trust_pickle=True"):
        load_model(str(files / "tiny.pt"))
    assert torch_loads == [True]


def test_full_pickle_with_weights_is_refused_without_trust(files: Path) -> None:
    with pytest.raises(ValueError, match=r"tiny\.pt is a full-module pickle"):
        load_model(str(files / "tiny.pt"), str(files / "tiny_state.pth"))


def test_trusted_full_pickle_loads(files: Path, torch_loads: list[Any]) -> None:
    model = load_model(str(files / "tiny.pt"), trust_pickle=True)
    assert isinstance(model, TinyNet) and not model.training
    assert torch_loads == [False]
    _same_outputs(model, files)


def test_state_dict_weights_load_weights_only_even_with_trust(files: Path,
                                                              torch_loads: list[Any]) -> None:
    model = load_model(str(files / "tiny.pt"), str(files / "tiny_state.pth"), trust_pickle=True)
    assert torch_loads == [False, True]  # the trusted module, then its weights
    _same_outputs(model, files)


def test_demo_state_dict_loads_without_trust(files: Path, torch_loads: list[Any]) -> None:
    model = load_model("demo:digits", str(files / "digits.pth"))
    assert torch_loads == [True]
    assert (model.input_size, model.background_class, len(model.labels)) == ((16, 16), 10, 11)
    expected = torch.load(files / "digits.pth", weights_only=True)
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("name", ["tiny.pt2", "exported.pt"], ids=["pt2", "export-archive-as-pt"])
def test_exported_program_loads_without_trust(files: Path, torch_loads: list[Any], name: str) -> None:
    model = load_model(str(files / name))
    assert isinstance(model, torch.fx.GraphModule)
    assert False not in torch_loads  # nothing unpickled with weights_only=False
    _same_outputs(model, files)


def test_exported_program_takes_no_weights(files: Path) -> None:
    with pytest.raises(ValueError, match=r"does not apply to the model file tiny\.pt2"):
        load_model(str(files / "tiny.pt2"), str(files / "tiny_state.pth"))


def test_torchscript_needs_no_trust(files: Path, torch_loads: list[Any]) -> None:
    model = load_model(str(files / "scripted.pt"))
    assert isinstance(model, torch.jit.ScriptModule)
    assert torch_loads == []  # torch.jit.load, nothing unpickled


# --------------------------------------------------------------------------- command line


def _command(name: str, files: Path, out: Path) -> list[str]:
    model, page, size = str(files / "tiny.pt"), str(files / "page.png"), ["--input-size", "12", "12"]
    return {
        "inspect": ["inspect", model, *size],
        "verify": ["verify", model, *size, "--samples", "2"],
        "convert": ["convert", model, *size, "-o", str(out / "tiny_fcn.pt")],
        "predict": ["predict", model, page, *size, "-o", str(out / "map.npy"), "--no-progress"],
        "heatmap": ["heatmap", model, page, *size, "-o", str(out / "heat.png")],
        "detect": ["detect", model, page, *size, "-o", str(out / "found.json")],
    }[name]


COMMANDS = ["inspect", "verify", "convert", "predict", "heatmap", "detect"]


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_refuses_a_full_pickle_without_trust(files: Path, tmp_path: Path, command: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_command(command, files, tmp_path)) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith("convolutionalize: error: tiny.pt is a full-module pickle")
    assert "pass --trust-pickle" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_loads_a_full_pickle_with_trust(files: Path, tmp_path: Path, command: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*_command(command, files, tmp_path), "--trust-pickle"]) == 0
    assert capsys.readouterr().err == ""


def test_cli_state_dict_weights_need_no_trust(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "demo:digits", "--weights", str(files / "digits.pth")]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "window: 16x16  stride: 2x2" in captured.out
