"""Space-to-depth (pixels regrouped into channels, block by block) is a local layer of stride
k: every spelling converts crop-equivalent, with cells equal to the original on true crops.
A regrouping that is not block-local stays refused (timm's TResNet: tests/test_zoo_timm.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convolutionalize import NotConvolutionalizable, convolutionalize

from conftest import rel_error

NATIVE = (24, 24)


def _timm_order(x: torch.Tensor) -> torch.Tensor:  # timm's SpaceToDepth: channels (row, col, c)
    n, c, h, w = x.size()
    x = x.view(n, c, h // 4, 4, w // 4, 4).permute(0, 3, 5, 1, 2, 4).contiguous()
    return x.view(n, c * 16, h // 4, w // 4)


def _unshuffle_order(x: torch.Tensor) -> torch.Tensor:  # pixel_unshuffle's order, by reshape
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 4, 4, w // 4, 4).permute(0, 1, 3, 5, 2, 4).reshape(n, c * 16, h // 4, w // 4)


def _strided(x: torch.Tensor) -> torch.Tensor:  # groups pixels h/4 apart: not block-local
    n, c, h, w = x.shape
    return x.reshape(n, c, 4, h // 4, 4, w // 4).permute(0, 1, 2, 4, 3, 5).reshape(n, c * 16, h // 4, w // 4)


REGROUPS = {"timm": _timm_order, "reshape": _unshuffle_order,
            "pixel_unshuffle": lambda x: F.pixel_unshuffle(x, 4)}


class Stem(nn.Module):
    """Regroup 4x4, a padding-free 3x3 conv, a flatten head."""

    def __init__(self, regroup) -> None:
        super().__init__()
        self.regroup = regroup
        self.conv = nn.Conv2d(48, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(self.regroup(x))).flatten(1))


@pytest.mark.parametrize("exported", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize("form", sorted(REGROUPS))
def test_space_to_depth_is_a_local_stride(form: str, exported: bool) -> None:
    torch.manual_seed(0)
    model = Stem(REGROUPS[form]).eval()
    source = model
    if exported:  # torch.export's ATen form: view, permute, clone, view
        example = torch.randn(2, 3, *NATIVE)
        source = torch.export.export(model, (example,), dynamic_shapes=(
            {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},)).module()
    fcn = convolutionalize(source, NATIVE)
    geo = fcn.geometry
    assert geo.crop_equivalent and geo.stride == (4, 4) and geo.notes == ()
    assert fcn.self_check.crop_error is not None and fcn.self_check.crop_error < 1e-4
    image = torch.randn(1, 3, NATIVE[0] + 2 * 4, NATIVE[1] + 5 * 4)
    with torch.no_grad():
        dense = fcn(image)
        assert dense.shape == (1, 5, 3, 6)
        for i, j in [(0, 0), (2, 5), (1, 3)]:
            crop = image[..., 4 * i:4 * i + NATIVE[0], 4 * j:4 * j + NATIVE[1]]
            assert rel_error(dense[0, :, i, j], model(crop)[0]) < 1e-4


def test_a_regrouping_that_is_not_block_local_stays_refused() -> None:
    with pytest.raises(NotConvolutionalizable, match="tokens or windows"):
        convolutionalize(Stem(_strided).eval(), NATIVE)
