"""Every torchvision classification model converts exactly (random weights, no network)."""

from __future__ import annotations

import fnmatch
import warnings

import pytest
import torch
import torchvision

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


def _build(name: str) -> tuple[torch.nn.Module, tuple[int, int]]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception init notices
        model = torchvision.models.get_model(name, weights=None)
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
    # a larger input: window + k * stride per axis
    big = (size[0] + 2 * geo.stride[0], size[1] + 1 * geo.stride[1])
    with torch.no_grad():
        assert fcn(torch.randn(1, 3, *big)).shape[-2:] == geo.cells(*big) == (3, 2)
    glob = convolutionalize(model, size, pool="global")
    with torch.no_grad():
        assert rel_error(glob(x), logits) < 1e-4


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
