"""``dense_map`` on an unconverted model converts it once: later calls reuse the conversion
(and its prepared runner) while the weights stay the same, and never keep the model alive."""

from __future__ import annotations

import gc
import os
import weakref

import numpy as np
import pytest
import torch

from convolutionalize import convolutionalize, dense_map
from convolutionalize.frameworks.onnx.model import save_onnx
from convolutionalize.inference import dense

from _tiny import INPUT_SIZE, TinyNet
from conftest import rel


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every model ``dense_map`` converts, in order."""
    seen: list[object] = []

    def counting(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(model)
        return convolutionalize(model, *args, **kwargs)

    monkeypatch.setattr(dense, "convolutionalize", counting)
    return seen


def _image(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 30, 26, generator=torch.Generator().manual_seed(seed))


def test_second_call_reuses_the_conversion(conversions: list[object]) -> None:
    torch.manual_seed(0)
    model = TinyNet().eval()
    first = dense_map(model, _image(0), input_size=INPUT_SIZE)
    second = dense_map(model, _image(1), input_size=INPUT_SIZE)
    assert len(conversions) == 1
    assert rel(second, dense_map(convolutionalize(model, INPUT_SIZE), _image(1))) < 1e-6
    assert not np.array_equal(first, second)
    dense_map(model, _image(0), input_size=INPUT_SIZE, pool="none")  # other arguments: converted again
    assert len(conversions) == 2


@pytest.mark.parametrize("change", ["in place", "load_state_dict", "replaced layer"])
def test_changed_weights_convert_again(conversions: list[object], change: str) -> None:
    torch.manual_seed(0)
    model = TinyNet().eval()
    before = dense_map(model, _image(), input_size=INPUT_SIZE)
    with torch.no_grad():
        if change == "in place":
            model.features[0].weight.mul_(2.0)
        elif change == "load_state_dict":
            model.load_state_dict({k: v * 2.0 for k, v in model.state_dict().items()})
        else:
            model.classifier[3] = torch.nn.Linear(32, 10)
    after = dense_map(model, _image(), input_size=INPUT_SIZE)
    assert len(conversions) == 2
    assert not np.allclose(before, after)
    assert rel(after, dense_map(convolutionalize(model, INPUT_SIZE), _image())) < 1e-6


def test_the_cache_does_not_keep_the_model_alive() -> None:
    model = TinyNet().eval()
    dense_map(model, _image(), input_size=INPUT_SIZE)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_a_model_file_is_loaded_and_converted_once_until_it_changes(tmp_path, conversions) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(TinyNet().eval(), (torch.randn(1, 1, *INPUT_SIZE),), str(path), dynamo=False)
    image = _image().numpy()
    first = dense_map(path, image)
    assert rel(dense_map(str(path), image), first) == 0.0
    assert len(conversions) == 1
    torch.manual_seed(1)  # a new model written to the same path: loaded and converted again
    torch.onnx.export(TinyNet().eval(), (torch.randn(1, 1, *INPUT_SIZE),), str(path), dynamo=False)
    os.utime(path, ns=(1, 1))
    assert not np.allclose(dense_map(path, image), first)
    assert len(conversions) == 2


def test_a_converted_model_file_is_not_converted(tmp_path, conversions) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "fcn.onnx"
    torch.onnx.export(TinyNet().eval(), (torch.randn(1, 1, *INPUT_SIZE),), str(tmp_path / "m.onnx"),
                      dynamo=False)
    save_onnx(convolutionalize(str(tmp_path / "m.onnx")), path)
    assert dense_map(path, _image().numpy()).shape[0] == 10
    assert conversions == []
