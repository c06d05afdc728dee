"""The geometry's padding note says which cells of a window map differ from their crops, and the
cells measured say the same, for every form of padding: symmetric zero padding, padding on one
side (before: ``ZeroPad2d``; after: a ``ceil_mode`` pool, a strided ``padding="same"`` max pool
as in the MTCNN stages), in PyTorch and Keras.

A crop is padded at its own window's edges, where the dense map reads the neighbouring pixels.
So every cell whose receptive field reaches past its window on a side where the image goes on
differs from its crop; the image's first (or last) row and column are padded like their crops
only where the reach is on that side alone."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch
from torch import nn

from convolutionalize import convolutionalize

from conftest import cells_and_crops

TOL = 1e-4  # relative, float32: a cell "equals its crop" within it

NATIVE = (12, 12)


def _torch(*body: nn.Module, feature: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*body, nn.Flatten(), nn.Linear(8 * feature * feature, 5)).eval()


FORMS = {  # name -> (model, the note's verdict, the cells that equal their crops on a rows x cols map)
    "symmetric": (lambda: _torch(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(8, 8, 3), feature=4),
                  "every cell differs from its crop", lambda rows, cols: set()),
    "before only": (lambda: _torch(nn.ZeroPad2d((1, 0, 1, 0)), nn.Conv2d(3, 8, 3), nn.ReLU(),
                                   nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), feature=3),
                    "only the top-left corner cell equals its crop", lambda rows, cols: {(0, 0)}),
    "after only (ceil_mode)": (lambda: _torch(nn.Conv2d(3, 8, 3), nn.ReLU(),
                                              nn.MaxPool2d(3, 2, ceil_mode=True), nn.Conv2d(8, 8, 3),
                                              feature=3),
                               "only the bottom-right corner cell",
                               lambda rows, cols: {(rows - 1, cols - 1)}),
}


def _differs(dense: np.ndarray, crops: np.ndarray) -> np.ndarray:
    """Per cell, whether it differs from its crop beyond ``TOL`` (relative to the map's scale)."""
    scale = np.abs(crops).max()
    return np.abs(dense - crops).max(axis=-1) > TOL * scale


def _matching(differs: np.ndarray) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in zip(*np.nonzero(~differs))}


@pytest.mark.parametrize("form", FORMS)
def test_torch_padding_note_names_the_cells_that_differ(form: str) -> None:
    build, verdict, expected = FORMS[form]
    model = build()
    fcn = convolutionalize(model, input_size=NATIVE)
    (note,) = [n for n in fcn.geometry.notes if n.startswith("padding in")]
    assert verdict in note
    sy, sx = fcn.geometry.stride
    image = torch.rand(1, 3, NATIVE[0] + 3 * sy, NATIVE[1] + 4 * sx,
                       generator=torch.Generator().manual_seed(1))
    dense, crops = cells_and_crops(model, fcn, image)
    rows, cols = fcn(image).shape[-2:]
    differs = _differs(dense.numpy(), crops.numpy()).reshape(rows, cols)
    assert _matching(differs) == expected(rows, cols)


def test_padding_free_body_has_no_padding_note() -> None:
    model = _torch(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), feature=3)
    geometry = convolutionalize(model, input_size=NATIVE).geometry
    assert geometry.crop_equivalent and not [n for n in geometry.notes if n.startswith("padding")]


def _rnet_like() -> keras.Model:
    """An MTCNN RNet-shaped stage: 3x3 convolutions with PReLU, a strided 3x3 max pool with
    ``padding="same"`` (at 24 px it pads one row and column after), a valid pool, a dense head."""
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((24, 24, 3))
    x = layers.PReLU(shared_axes=[1, 2])(layers.Conv2D(16, 3)(inputs))
    x = layers.MaxPooling2D(3, 2, padding="same")(x)
    x = layers.PReLU(shared_axes=[1, 2])(layers.Conv2D(16, 3)(x))
    x = layers.MaxPooling2D(3, 2)(x)
    x = layers.Conv2D(8, 2)(x)
    x = layers.Dense(16)(layers.Flatten()(x))
    return keras.Model(inputs, layers.Dense(2, activation="softmax")(x))


def test_keras_same_max_pool_note_matches_the_cells() -> None:
    """Every cell of the 'same' max pool's map differs from its crop except the last row and
    column's shared corner: each crop is padded at its own far edge (-inf in a max pool)."""
    model = _rnet_like()
    fcn = convolutionalize(model, input_size=(24, 24))
    geometry = fcn.geometry
    (note,) = [n for n in geometry.notes if n.startswith("padding in")]
    assert "reaches 0 px above, 1 px below, 0 px left of and 1 px right of its window" in note
    assert "only the bottom-right corner cell" in note
    sy, sx = geometry.stride
    rng = np.random.default_rng(2)
    image = rng.random((1, 24 + 3 * sy, 24 + 2 * sx, 3), dtype=np.float32)
    dense = keras.ops.convert_to_numpy(fcn(image))[0]  # (rows, cols, classes)
    rows, cols = dense.shape[:2]
    crops = np.stack([image[0, i * sy:i * sy + 24, j * sx:j * sx + 24]
                      for i in range(rows) for j in range(cols)])
    expected = keras.ops.convert_to_numpy(model(crops)).reshape(rows, cols, -1)
    differs = _differs(dense, expected)
    assert _matching(differs) == {(rows - 1, cols - 1)}
