"""A representative sample of timm families converts, with input_size taken from the model."""

from __future__ import annotations

import pytest
import torch

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
    big = (geo.input_size[0] + 2 * geo.stride[0], geo.input_size[1] + geo.stride[1])
    with torch.no_grad():
        assert fcn(torch.randn(1, 3, *big)).shape[-2:] == geo.cells(*big) == (3, 2)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_timm_family_converts(name: str) -> None:
    _check(_create(name))


@pytest.mark.parametrize("pool_type", POOL_TYPES)
def test_timm_select_adaptive_pool_types(pool_type: str) -> None:
    _check(_create("resnet18", global_pool=pool_type))


def test_timm_vit_is_refused() -> None:
    with pytest.raises(NotConvolutionalizable, match="tokens or windows"):
        convolutionalize(_create("vit_tiny_patch16_224"))
