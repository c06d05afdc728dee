"""Every torchvision classification model converts exactly (random weights, no network).

At the native size the 1x1 map equals the original. At a larger non-square size every cell is
checked against the exact reference of :mod:`_reference`: the original body (the original's fx
graph cut at the feature node) run once over the image, the original head on every window of the
native feature size. That holds for padded networks too, where cells differ from crops.
"""

from __future__ import annotations

import fnmatch
import warnings

import pytest
import torch
import torchvision

from _reference import CAM_AT_OUTPUT_STRIDE_REFUSED, feature_size, fx_split, window_map, windows_of
from convolutionalize import NotConvolutionalizable, convolutionalize

from conftest import fingerprint, flattened_linears, rel_error

pytestmark = pytest.mark.zoo

# Exclusions, each with its reason (glob patterns over torchvision model names).
TOO_BIG = {
    "regnet_y_128gf": "2.6 GB of weights; copying it for the conversion needs >6 GB and ~1 min",
    "vit_h_14": "2.5 GB of weights; the smaller ViTs prove the same refusal",
    "vit_l_*": "1.2 GB of weights; the smaller ViTs prove the same refusal",
}
TRANSFORMERS = ["vit_*"]  # class token + global attention: must be refused
WINDOWED_ATTENTION = ["swin*", "maxvit*"]  # refused, or converted and flagged


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


ALL = torchvision.models.list_models(module=torchvision.models)
CNNS = [n for n in ALL if not _matches(n, [*TOO_BIG, *TRANSFORMERS, *WINDOWED_ATTENTION])]

# Their initial weights shrink the signal at every layer: GoogLeNet's scores do not depend on the
# image at all, ShuffleNet's differ between cells by 5e-5 of their size, so no check could see a
# wrong map. He-initialised convolutions keep the activations O(1).
VANISHING = ["googlenet", "shufflenet_*"]


def _build(name: str) -> tuple[torch.nn.Module, tuple[int, int]]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception init notices
        model = torchvision.models.get_model(name, weights=None)
    if _matches(name, VANISHING):
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model, (299, 299) if name == "inception_v3" else (224, 224)


def test_exclusions_name_real_models() -> None:
    for pattern in TOO_BIG:
        assert any(fnmatch.fnmatch(n, pattern) for n in ALL), pattern


@pytest.mark.parametrize("name", CNNS)
def test_torchvision_cnn_converts_exactly(name: str) -> None:
    model, size = _build(name)
    before = fingerprint(model)
    fcn = convolutionalize(model, size)
    assert fingerprint(model) == before, "the caller's model changed"
    assert not fcn.training
    geo = fcn.geometry
    model.eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        logits = model(x)
        dense = fcn(x)
    assert dense.shape == (1, logits.shape[1], 1, 1)
    assert rel_error(dense.flatten(1), logits) < 1e-4
    assert flattened_linears(fcn, size) == []
    # a larger non-square input: window + k * stride per axis
    big = torch.randn(1, 3, size[0] + 2 * geo.stride[0], size[1] + 1 * geo.stride[1])
    with torch.no_grad():
        dense = fcn(big)
    assert dense.shape[-2:] == geo.cells(*big.shape[-2:]) == (3, 2)
    glob = convolutionalize(model, size, pool="global")
    with torch.no_grad():
        assert rel_error(glob(x), logits) < 1e-4
    body, head = fx_split(model, fcn.plan.feature.node)
    with torch.no_grad():
        features = body(big)
        whole = glob(big)
    expected = windows_of(head, features, feature_size(body, size))
    assert rel_error(dense, expected) < 1e-4
    # pool="global": where the original runs at any size (a global pool) it is the original on the
    # image, head(body(image)); after AdaptiveAvgPool2d + flatten, which would resample instead of
    # slide, it is the mean of the window map
    assert rel_error(whole, head(features) if fcn.plan.global_pooling else expected.mean((2, 3))) < 1e-4


# Class activation maps (pool="none"): every feature cell's scores are the original head on that
# one cell. Three head forms: GAP + Linear, GAP + Linear-Hardswish-Linear, LayerNorm2d in the head.
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "convnext_tiny"])
def test_torchvision_class_activation_map_values(name: str) -> None:
    model, size = _build(name)
    fcn = convolutionalize(model, size, pool="none")
    image = torch.randn(1, 3, size[0] + 64, size[1] + 96)
    with torch.no_grad():
        cam = fcn(image)
    expected = window_map(fx_split(model, fcn.plan.feature.node), (1, 1), image)
    assert cam.shape == expected.shape == (1, 1000, 9, 10)
    assert rel_error(cam, expected) < 1e-4


@pytest.mark.parametrize(("pool", "output_stride"), [
    pytest.param("none", 16, marks=CAM_AT_OUTPUT_STRIDE_REFUSED), ("window", 8)])
def test_torchvision_output_stride_equals_its_own_dilated_resnet(pool: str, output_stride: int) -> None:
    """ResNet's ``replace_stride_with_dilation`` (torchvision's own à trous) with the same weights
    is the reference body: strided layers at stride 1, every later 3x3 kernel dilated. The window
    of the native feature size then spans cells ``32 / output_stride`` apart."""
    model, size = _build("resnet50")
    fcn = convolutionalize(model, size, pool=pool, output_stride=output_stride)
    dilated = torchvision.models.resnet50(
        replace_stride_with_dilation=[False, output_stride == 8, True]).eval()
    dilated.load_state_dict(model.state_dict())
    image = torch.randn(1, 3, size[0] + 2 * output_stride, size[1] + 3 * output_stride)
    with torch.no_grad():
        dense = fcn(image)
    split = fx_split(dilated, fcn.plan.feature.node)
    window, factor = ((7, 7), 32 // output_stride) if pool == "window" else ((1, 1), 1)
    expected = window_map(split, window, image, dilation=factor)
    rows, cols = fcn.geometry.cells(*image.shape[-2:])
    assert dense.shape == (1, 1000, rows, cols)
    if pool == "window":
        assert (rows, cols) == (3, 4)
    # the dilated feature map also has windows whose last cells reach past the image (a cell
    # stands for output_stride * factor pixels): the map keeps the windows inside it
    assert rel_error(dense, expected[..., :rows, :cols]) < 1e-4


@pytest.mark.parametrize("name", [n for n in ALL if _matches(n, TRANSFORMERS)
                                  and not _matches(n, TOO_BIG)])
def test_vision_transformers_are_refused(name: str) -> None:
    model, size = _build(name)
    with pytest.raises(NotConvolutionalizable, match="tokens or windows"):
        convolutionalize(model, size)


@pytest.mark.parametrize("name", [n for n in ALL if _matches(n, WINDOWED_ATTENTION)])
def test_windowed_attention_is_refused_or_flagged(name: str) -> None:
    model, size = _build(name)
    try:
        fcn = convolutionalize(model, size)
    except NotConvolutionalizable as exc:
        assert "attention" in str(exc)
        return
    geo = fcn.geometry
    assert not geo.crop_equivalent
    assert geo.receptive_field is None
    assert any("global context" in n or "not proven" in n for n in geo.notes)
    big = (size[0] + 2 * geo.stride[0], size[1] + geo.stride[1])
    with torch.no_grad():
        assert fcn(torch.randn(1, 3, *big)).shape[-2:] == geo.cells(*big)
