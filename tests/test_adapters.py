"""The adapter contract: one registry, one error boundary, one self-check for every framework.

- Nothing outside ``frameworks/`` asks which framework a model belongs to (a grep).
- An unforeseen failure inside any adapter's analysis, rewrite or à-trous planning leaves
  ``convolutionalize`` as ``NotConvolutionalizable`` naming the model and the cause's first line.
- The self-check catches a wrong map in every framework (a rewrite that scales the scores).
"""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
import torch
from torch import nn

import convolutionalize as cz
from convolutionalize import NotConvolutionalizable
from convolutionalize.frameworks import ADAPTERS, adapter_for

SRC = Path(cz.__file__).parent
NATIVE = (16, 16)


class Small(nn.Module):
    """Two strided convolutions, global average pooling and a Linear (stride 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


def _torch() -> nn.Module:
    torch.manual_seed(0)
    return Small().eval()


def _keras() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((*NATIVE, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x), name="small")


def _onnx(tmp_path: Path) -> onnx.ModelProto:
    path = tmp_path / "small.onnx"
    torch.onnx.export(_torch(), (torch.randn(1, 3, *NATIVE),), str(path), dynamo=False,
                      input_names=["image"], output_names=["logits"])
    return onnx.load(str(path))


MAKERS = {"torch": lambda _: _torch(), "keras": lambda _: _keras(), "onnx": _onnx}

# where each adapter analyses, rewrites and plans à trous (the names its entry point calls)
STAGES = {
    "torch": {"analysis": "convolutionalize.frameworks.torch.model.find_head",
              "rewrite": "convolutionalize.frameworks.torch.model.rewrite",
              "atrous": "convolutionalize.frameworks.torch.model.plan_atrous"},
    "keras": {"analysis": "convolutionalize.frameworks.keras.model.Analysis",
              "rewrite": "convolutionalize.frameworks.keras.model.rebuild",
              "atrous": "convolutionalize.frameworks.keras.model.plan_atrous"},
    "onnx": {"analysis": "convolutionalize.frameworks.onnx.model.analyse",
             "rewrite": "convolutionalize.frameworks.onnx.model.rewrite",
             "atrous": "convolutionalize.frameworks.onnx.model.plan_atrous"},
}
LABELS = {"torch": "Small", "keras": "keras model 'small'", "onnx": "ONNX graph 'main_graph'"}


def test_no_framework_type_checks_outside_frameworks() -> None:
    pattern = re.compile(
        r"is_onnx_model|is_keras_model|ModelProto|keras\.Model\b|isinstance\([^)]*(nn\.Module|Convolutionalized)")
    found = [f"{path.relative_to(SRC)}:{n}: {line.strip()}"
             for path in SRC.rglob("*.py") if "frameworks" not in path.parts
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if pattern.search(line) and not line.lstrip().startswith(("#", '"', "model:", "a ``"))]
    # PyTorch's own tools, reached through its adapter: crop-by-crop windows, FLOP counts, the
    # torchvision/timm/.pt model specs, the runner that prepares a module for tiles, the demo
    allowed = ("inference/windows.py", "flops.py", "models.py", "inference/_runner.py", "demo.py")
    assert [f for f in found if not f.startswith(allowed)] == []


def test_every_adapter_is_registered_once() -> None:
    assert sorted(a.name for a in ADAPTERS) == ["Keras", "ONNX", "PyTorch", "TensorFlow"]
    assert adapter_for(_keras()).name == "Keras"  # a Keras model on the torch backend is an nn.Module too


@pytest.mark.parametrize("stage", ["analysis", "rewrite", "atrous"])
@pytest.mark.parametrize("framework", ["torch", "keras", "onnx"])
def test_unforeseen_failures_become_one_refusal(framework: str, stage: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model = MAKERS[framework](tmp_path)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"injected {stage} failure\nsecond line")

    monkeypatch.setattr(STAGES[framework][stage], broken)
    with pytest.raises(NotConvolutionalizable) as caught:
        cz.convolutionalize(model, NATIVE if framework == "torch" else None,
                            output_stride=2 if stage == "atrous" else None)
    message = str(caught.value)
    assert message.startswith(f"cannot convert {LABELS[framework]}: RuntimeError: ")
    assert f"injected {stage} failure" in message and "second line" not in message
    assert isinstance(caught.value.__cause__, RuntimeError)


@pytest.mark.parametrize("framework", ["torch", "keras", "onnx"])
def test_caller_mistakes_stay_value_errors(framework: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input_size") as caught:
        cz.convolutionalize(MAKERS[framework](tmp_path), (17, "x"))  # type: ignore[arg-type]
    assert not isinstance(caught.value, NotConvolutionalizable)


@pytest.mark.parametrize("framework", ["torch", "keras", "onnx"])
def test_the_self_check_catches_a_wrong_map(framework: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The one self-check, through each adapter: a converted model whose scores are off by 1 %
    at the native size is refused (the check compares values, not shapes)."""
    from convolutionalize import selfcheck

    check = selfcheck.Reference.check

    def scaled(self: selfcheck.Reference, converted: selfcheck.Run, batch: int = 1) -> selfcheck.SelfCheck:
        return check(self, lambda x: [m * 1.01 for m in converted(x)], batch)

    monkeypatch.setattr(selfcheck.Reference, "check", scaled)
    with pytest.raises(NotConvolutionalizable, match="differs from the original at the native size"):
        cz.convolutionalize(MAKERS[framework](tmp_path), NATIVE if framework == "torch" else None)


@pytest.mark.parametrize("pool", ["window", "none", "global"])
@pytest.mark.parametrize("framework", ["torch", "keras", "onnx"])
def test_every_pool_is_checked_at_a_larger_size(framework: str, pool: str, tmp_path: Path) -> None:
    fcn = cz.convolutionalize(MAKERS[framework](tmp_path), NATIVE if framework == "torch" else None,
                              pool=pool)  # type: ignore[arg-type]
    check = adapter_for(fcn).conversion(fcn).self_check  # type: ignore[union-attr]
    assert check is not None and check.size == (16 + 2 * 4, 16 + 3 * 4)
    assert check.cells == {"window": (3, 4), "none": (6, 7), "global": (1, 1)}[pool]
    if pool != "none":
        assert check.native_error is not None and check.native_error < 1e-5


def test_tolerance_by_precision() -> None:
    from convolutionalize.selfcheck import tolerance

    assert tolerance("float32") == tolerance("torch.float32") == 1e-4
    assert tolerance(str(torch.float16)) == 1e-2 and tolerance("bfloat16") == 5e-2
    assert tolerance(np.dtype(np.float16).name) == 1e-2


def test_a_half_precision_model_converts_within_its_tolerance() -> None:
    model = _torch().to(torch.bfloat16)
    fcn = cz.convolutionalize(model, NATIVE)
    assert fcn.native_error is not None and fcn.native_error < 5e-2
    assert fcn(torch.randn(1, 3, 24, 28, dtype=torch.bfloat16)).shape == (1, 5, 3, 4)


@pytest.mark.parametrize(("native", "stride", "sizes"), [
    ((224, 224), 32, [(288, 320), (672, 896)]),  # windowed attention: multiples of 224 as well
    ((299, 299), 32, [(363, 395)]),  # lcm(32, 299) = 9568: 19435x29003 would need 6.7 GB
])
def test_check_sizes_stay_within_reach(native: tuple[int, int], stride: int,
                                       sizes: list[tuple[int, int]]) -> None:
    from convolutionalize.geometry import Geometry
    from convolutionalize.selfcheck import check_sizes

    geo = Geometry(native, (stride, stride), (0, 0), None, False, native, (native[0] // stride,) * 2)
    assert check_sizes(geo) == sizes


def test_the_formats_an_adapter_says_it_writes_are_those_it_saves() -> None:
    """``Adapter.writes`` (read by the CLI before any framework is imported) names exactly the
    suffixes the PyTorch adapter's writer table holds."""
    from convolutionalize.export import FORMATS
    from convolutionalize.frameworks import adapter_named

    assert set(adapter_named("PyTorch").writes) == set(FORMATS)
