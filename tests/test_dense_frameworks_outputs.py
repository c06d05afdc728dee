"""Keras and ONNX models with several outputs: ``dense_map(output=k)`` maps output ``k``.

One padding-free two-head model, built in PyTorch and exported to ONNX (and rebuilt in Keras
with the same weights): every output's map equals the PyTorch conversion's map of it.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest
import torch
from torch import nn

from convolutionalize import convolutionalize, dense_map

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU())
        self.hidden = nn.Linear(8 * 4 * 4, 16)
        self.scores, self.box = nn.Linear(16, 5), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.hidden(self.body(x).flatten(1)))
        return self.scores(h), self.box(h)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = TwoHeads().eval()
    path = tmp_path_factory.mktemp("onnx") / "two.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 11, 11),), str(path), dynamo=False,
                      input_names=["image"], output_names=["scores", "box"])
    return model, onnx.load(str(path))


@pytest.mark.parametrize("output", [0, 1, -1])
def test_onnx_dense_map_maps_the_output_it_is_asked_for(models, output: int) -> None:  # type: ignore[no-untyped-def]
    model, proto = models
    image = np.random.default_rng(0).standard_normal((3, 27, 31)).astype(np.float32)
    expected = dense_map(convolutionalize(model, (11, 11)), image, output=output)
    actual = dense_map(proto, image, output=output)
    assert actual.shape == expected.shape == ((5, 4)[output], 9, 11)
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()
    tiled = dense_map(proto, image, output=output, tile=8)
    assert np.abs(tiled - actual).max() <= 1e-5 * np.abs(actual).max()


@pytest.mark.parametrize(("output", "message"), [(2, "has 2 outputs"), ("box", "by index"),
                                                 ("all", "by index")])
def test_onnx_bad_outputs_are_value_errors(models, output: object, message: str) -> None:  # type: ignore[no-untyped-def]
    _, proto = models
    with pytest.raises(ValueError, match=message):
        dense_map(proto, np.zeros((3, 20, 20), np.float32), output=output)  # type: ignore[arg-type]


def test_onnx_box_output_is_mapped_in_a_second_pass(models) -> None:  # type: ignore[no-untyped-def]
    from convolutionalize.detect import detection_maps

    model, proto = models
    image = np.random.default_rng(1).standard_normal((3, 27, 31)).astype(np.float32)
    probs, boxes = detection_maps(proto, image, box_output=1)
    expected = dense_map(convolutionalize(model, (11, 11)), image, output=1)
    assert boxes is not None and len(probs) == len(boxes) == 1
    assert np.abs(np.asarray(boxes[0].map) - expected).max() <= 1e-4 * np.abs(expected).max()
