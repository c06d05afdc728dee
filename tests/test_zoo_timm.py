"""A representative sample of timm families converts, with input_size taken from the model.

At a larger non-square size every cell is checked against the exact reference of
:mod:`_reference`, built from timm's own split: ``forward_features`` once over the image,
``forward_head`` on every window of the native feature size.
"""

from __future__ import annotations

import pytest
import torch

from _reference import CAM_AT_OUTPUT_STRIDE_REFUSED, feature_size, timm_split, window_map
from convolutionalize import NotConvolutionalizable, convolutionalize

from conftest import fingerprint, flattened_linears, rel_error

timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install .[timm])")
pytestmark = pytest.mark.zoo

FAMILIES = {
    "resnet18": "residual",
    "efficientnet_b0": "efficient (squeeze-excitation: global context)",
    "tf_efficientnet_b0": "TF-SAME padding",
    "mobilenetv3_small_100": "mobile (pool -> 1x1 conv head -> flatten)",
    "densenet121": "dense",
    "dpn68": "dual-path",
    "inception_v3": "inception (299x299)",
    "regnetx_002": "regnet",
    "convnext_atto": "convnext (NormMlpClassifierHead, per-pixel Linears in the body)",
    "vgg11": "vgg (ConvMlp pre-logits)",
    "repvgg_a0": "repvgg",
    "mobileone_s0": "mobileone",
    "hrnet_w18_small": "hrnet (upsampling fusion)",
    "ghostnet_100": "ghostnet (timm Linear)",
    "cspresnet50": "csp (256x256)",
    "tresnet_m": "space-to-depth stem (view -> permute -> view), read as a stride-4 convolution",
}
POOL_TYPES = ["avg", "max", "avgmax", "catavgmax"]


def _create(name: str, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():  # zero-initialised heads would make every comparison trivially 0
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    return model


def _check(model: torch.nn.Module) -> None:
    before = fingerprint(model)
    fcn = convolutionalize(model)  # input_size comes from model.pretrained_cfg
    assert fingerprint(model) == before
    geo = fcn.geometry
    assert geo.input_size == tuple(model.pretrained_cfg["input_size"][-2:])
    x = torch.randn(1, 3, *geo.input_size)
    model.eval()
    with torch.no_grad():
        logits, dense = model(x), fcn(x)
    assert dense.shape[-2:] == (1, 1)
    assert rel_error(dense.flatten(1), logits) < 1e-4
    assert flattened_linears(fcn, geo.input_size) == []
    big = torch.randn(1, 3, geo.input_size[0] + 2 * geo.stride[0], geo.input_size[1] + geo.stride[1])
    with torch.no_grad():
        dense = fcn(big)
    assert dense.shape[-2:] == geo.cells(*big.shape[-2:]) == (3, 2)
    split = timm_split(model)
    assert rel_error(dense, window_map(split, feature_size(split[0], geo.input_size), big)) < 1e-4


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_timm_family_converts(name: str) -> None:
    _check(_create(name))


@pytest.mark.parametrize("pool_type", POOL_TYPES)
def test_timm_select_adaptive_pool_types(pool_type: str) -> None:
    _check(_create("resnet18", global_pool=pool_type))


# Two head forms beyond GAP + Linear: pool -> 1x1 conv -> act -> flatten -> Linear, and
# NormMlpClassifierHead (a LayerNorm after the pool).
@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "convnext_atto"])
def test_timm_global_pool_is_the_original_at_a_larger_size(name: str) -> None:
    model = _create(name).eval()
    glob = convolutionalize(model, pool="global")
    image = torch.randn(1, 3, 224 + 64, 224 + 96)
    with torch.no_grad():
        assert rel_error(glob(image), model(image)) < 1e-4


@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "convnext_atto"])
def test_timm_class_activation_map_is_the_head_on_every_feature_cell(name: str) -> None:
    model = _create(name)
    cam = convolutionalize(model, pool="none")
    image = torch.randn(1, 3, 224 + 64, 224 + 96)
    with torch.no_grad():
        dense = cam(image)
    expected = window_map(timm_split(model), (1, 1), image)
    assert dense.shape == expected.shape == (1, 1000, 9, 10)
    assert rel_error(dense, expected) < 1e-4


@pytest.mark.parametrize("pool", ["window", pytest.param("none", marks=CAM_AT_OUTPUT_STRIDE_REFUSED)])
def test_timm_output_stride_equals_timms_own_dilated_model(pool: str) -> None:
    """timm's ``output_stride=16`` (its own à trous: the last stage at stride 1, its 3x3 kernels
    dilated) with the same weights is the reference body; windows span cells 2 apart."""
    model = _create("resnet18")
    fcn = convolutionalize(model, pool=pool, output_stride=16)
    dilated = _create("resnet18", output_stride=16)
    dilated.load_state_dict(model.state_dict())
    image = torch.randn(1, 3, 224 + 2 * 16, 224 + 3 * 16)
    with torch.no_grad():
        dense = fcn(image)
    window, factor = ((7, 7), 2) if pool == "window" else ((1, 1), 1)
    expected = window_map(timm_split(dilated), window, image, dilation=factor)
    rows, cols = fcn.geometry.cells(*image.shape[-2:])
    assert dense.shape == (1, 1000, rows, cols)
    if pool == "window":
        assert (rows, cols) == (3, 4)
    # windows of the dilated map whose last cells reach past the image are not in the map
    assert rel_error(dense, expected[..., :rows, :cols]) < 1e-4


def test_timm_vit_is_refused() -> None:
    with pytest.raises(NotConvolutionalizable, match="tokens or windows"):
        convolutionalize(_create("vit_tiny_patch16_224"))
