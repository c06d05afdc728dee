"""Hugging Face transformers image classifiers, built from tiny random configs (no downloads).

Every ``*ForImageClassification`` here fails ``torch.fx.symbolic_trace`` (control flow on
``pixel_values.shape``, ``return_dict`` / ``output_hidden_states`` branches, ``int()`` of a
traced size), so the conversion must capture them with ``torch.export``. The converted model
returns the same ``ModelOutput`` class as the original, with the scores as a 4-D map.

At a larger non-square size every cell is checked against the exact reference of
:mod:`_reference`: the original model run up to the module that gives the feature map
(``FEATURE_MODULE``), then the rest of the model's own ``forward`` on every window of the
native feature size (a forward hook puts the windows in place of that module's output).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from _reference import Split, feature_size, hooked_split, window_map
from convolutionalize import NotConvolutionalizable, convolutionalize, dense_map

from conftest import fingerprint, flattened_linears, rel_error

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.zoo

# (architecture, config kwargs, native size). num_labels=5 is added to every config.
CONVOLUTIONAL = [
    pytest.param("ResNet", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
                 64, id="resnet"),
    pytest.param("ConvNext", dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                  layer_scale_init_value=1.0), 64, id="convnext"),
    pytest.param("ConvNextV2", dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1]), 64, id="convnextv2"),
    # the pooler is AvgPool2d(hidden_dim, ceil_mode=True): global only while the feature map is
    # at most hidden_dim cells wide, and hidden_dim must equal round_filters(1280) = 128 here
    pytest.param("EfficientNet", dict(
        width_coefficient=0.1, depth_coefficient=1.0, hidden_dim=128, kernel_sizes=[3, 3, 5],
        in_channels=[32, 16, 24], out_channels=[16, 24, 40], strides=[1, 2, 2], num_block_repeats=[1, 1, 1],
        expand_ratios=[1, 6, 6], image_size=64), 64, id="efficientnet"),
    # tf_padding (the default, as in the google/ checkpoints): padding computed from the input size
    pytest.param("MobileNetV1", dict(depth_multiplier=0.25, image_size=64), 64, id="mobilenet_v1"),
    pytest.param("MobileNetV2", dict(depth_multiplier=0.25, finegrained_output=False, image_size=64),
                 64, id="mobilenet_v2"),
    pytest.param("RegNet", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8,
                                layer_type="x"), 64, id="regnet"),
    pytest.param("Bit", dict(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], num_groups=2),
                 64, id="bit"),
    # TF "SAME" padding (the google/bit-* configs): F.pad by amounts computed from the input's size
    pytest.param("Bit", dict(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], num_groups=2,
                             global_padding="SAME"), 64, id="bit_same"),
    pytest.param("Bit", dict(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], num_groups=2,
                             layer_type="preactivation", embedding_dynamic_padding=True), 64,
                 id="bit_dynamic_padding"),
    pytest.param("PoolFormer", dict(
        num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
        padding=[2, 1], layer_scale_init_value=1.0), 64, id="poolformer"),
    pytest.param("HGNetV2", dict(
        embedding_size=8, depths=[1, 1], hidden_sizes=[16, 32], stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16], stage_mid_channels=[8, 16], stage_out_channels=[16, 32],
        stage_num_blocks=[1, 1], stage_downsample=[False, True], stage_downsample_strides=[2, 2],
        stage_light_block=[False, True], stage_kernel_size=[3, 5], stage_numb_of_layers=[2, 2]),
        64, id="hgnet_v2"),
    # pool -> 1x1 conv -> hardswish -> * (1 - dropout) -> flatten -> Linear; the scores come
    # back as BaseModelOutputWithNoAttention.last_hidden_state (no .logits field)
    pytest.param("PPLCNet", dict(
        scale=0.25, class_expand=32,
        block_configs=[[[3, 16, 32, 1, False]], [[3, 32, 64, 2, False]], [[3, 64, 128, 2, False]],
                       [[3, 128, 256, 2, False]], [[5, 256, 512, 2, True]]]), 64, id="pp_lcnet"),
    pytest.param("TextNet", dict(
        stem_out_channels=8, hidden_sizes=[8, 8, 16], depths=[1, 1],
        conv_layer_kernel_sizes=[[[3, 3]], [[3, 3]]], conv_layer_strides=[[2], [2]], image_size=[64, 64]),
        64, id="textnet"),
]
# Attention models, and hybrids whose blocks or head work on token sequences ((N, H*W, C)
# views of the map): refused naming the node that makes tokens, or converted and flagged.
ATTENTION = [
    # additive attention (global context) in the last stage; head and dist_head averaged
    pytest.param("SwiftFormer", dict(depths=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32], image_size=64,
                                     layer_scale_init_value=1.0), 64, id="swiftformer"),
    # focal modulation on (N, H*W, C) tokens; the head also reads tokens (a token-layout head)
    pytest.param("FocalNet", dict(embed_dim=8, hidden_sizes=[16, 32], depths=[1, 1], focal_levels=[2, 2],
                                  focal_windows=[3, 3], image_size=64), 64, id="focalnet"),
    pytest.param("ViT", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=32, patch_size=8), 32, id="vit"),
    pytest.param("DeiT", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=32, image_size=32, patch_size=8), 32, id="deit"),
    # one stage: exporting Swin with symbolic H, W costs ~8 s here (~40 s with two stages)
    pytest.param("Swin", dict(embed_dim=8, depths=[1], num_heads=[1], window_size=2, patch_size=8,
                              image_size=32), 32, id="swin"),
    pytest.param("MobileViT", dict(hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16],
                                   num_attention_heads=2, image_size=32), 32, id="mobilevit"),
    # two stages need one explicit down_ops entry (the config's default has one per stage, and a
    # two-stage LevitEncoder then builds a subsample for a third stage that does not exist)
    pytest.param("Levit", dict(hidden_sizes=[16, 32], num_attention_heads=[1, 2], depths=[1, 1],
                               key_dim=[8, 8], mlp_ratio=[2, 2], attention_ratio=[2, 2],
                               down_ops=[["Subsample", 8, 2, 4, 2, 2]], image_size=32), 32, id="levit"),
    # one stage, with the class token (the microsoft/cvt checkpoints have it in the last stage)
    pytest.param("Cvt", dict(
        embed_dim=[8], num_heads=[1], depth=[1], patch_sizes=[7], patch_stride=[4], patch_padding=[2],
        mlp_ratio=[2.0], attention_drop_rate=[0.0], drop_rate=[0.0], drop_path_rate=[0.0], qkv_bias=[True],
        cls_token=[True], qkv_projection_method=["dw_bn"], kernel_qkv=[3], padding_kv=[1], stride_kv=[2],
        padding_q=[1], stride_q=[1]), 32, id="cvt"),
]
SCORES = {"PPLCNet": "last_hidden_state"}  # the output field holding the class scores (default "logits")
# The module whose output (its first field: last_hidden_state) is the map the head reads.
FEATURE_MODULE = {
    "ResNet": lambda m: m.resnet.encoder,
    "ConvNext": lambda m: m.convnext.encoder,
    "ConvNextV2": lambda m: m.convnextv2.encoder,
    "EfficientNet": lambda m: m.efficientnet.encoder,  # ends with the top conv, BN, activation
    "MobileNetV1": lambda m: m.mobilenet_v1.layer[-1],
    "MobileNetV2": lambda m: m.mobilenet_v2.conv_1x1,
    "RegNet": lambda m: m.regnet.encoder,
    "Bit": lambda m: m.bit.norm,  # the final norm (Identity unless pre-activation) after the encoder
    # the head's GroupNorm(1, C) normalises over the whole map (global context, like the ones in
    # the blocks): it is part of the body, the head is mean + Linear
    "PoolFormer": lambda m: m.norm,
    "HGNetV2": lambda m: m.encoder,
    "PPLCNet": lambda m: m.encoder,
    "TextNet": lambda m: m.textnet.encoder,
}


def _create(arch: str, config: dict[str, Any]) -> nn.Module:
    cfg = getattr(transformers, f"{arch}Config")(**copy.deepcopy(config), num_labels=5)
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForImageClassification")(cfg)
    _randomize(model)
    return model.eval()


def _randomize(model: nn.Module) -> None:
    """Weights that keep activations O(1) through the net.

    The Hugging Face inits (std 0.02 for every conv, and for BatchNorm weights in some
    models) shrink the signal tens of times a layer: EfficientNet, MobileNet and PP-LCNet
    logits come out below 1e-18 and MobileViT's exactly 0, so a relative error says nothing.
    Random norm affines and running statistics also make every BatchNorm a real transform
    to carry through the conversion.
    """
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
            elif isinstance(weight, torch.Tensor) and weight.dim() == 1 and "Norm" in type(module).__name__:
                weight.uniform_(0.5, 1.5)
            else:
                continue
            if isinstance(bias, torch.Tensor):
                bias.normal_(0, 0.1)
            if isinstance(getattr(module, "running_var", None), torch.Tensor):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)


def _fx_traceable(model: nn.Module) -> bool:
    try:
        torch.fx.symbolic_trace(model)
    except Exception:
        return False
    return True


@pytest.mark.parametrize(("arch", "config", "size"), CONVOLUTIONAL)
def test_transformers_convolutional_converts(arch: str, config: dict[str, Any], size: int) -> None:
    model = _create(arch, config)
    field = SCORES.get(arch, "logits")
    before = fingerprint(model)
    fcn = convolutionalize(model, input_size=(size, size))
    assert fingerprint(model) == before
    if not _fx_traceable(model):
        assert "torch.export" in fcn.plan.describe()
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, out = model(x), fcn(x)
    assert type(out) is type(expected)
    dense = getattr(out, field)
    assert dense.shape == (2, 5, 1, 1)
    assert rel_error(dense.flatten(1), getattr(expected, field)) <= 1e-4
    assert flattened_linears(fcn, (size, size)) == []
    sy, sx = fcn.geometry.stride
    big = torch.randn(1, 3, size + 2 * sy, size + 3 * sx)
    with torch.no_grad():
        dense = getattr(fcn(big), field)
    assert dense.dim() == 4 and dense.shape[:2] == (1, 5)
    assert dense.shape[-2:] == fcn.geometry.cells(*big.shape[-2:]) == (3, 4)
    # native + k * stride: every size-dependent ("SAME", tf_padding) pad keeps its native amount,
    # so the original body at this size is the one the converted model fixes at native pads
    split = _split(model, arch, size)
    assert rel_error(dense, window_map(split, feature_size(split[0], (size, size)), big)) < 1e-4


def _split(model: nn.Module, arch: str, size: int) -> Split:
    field = SCORES.get(arch, "logits")
    return hooked_split(model, FEATURE_MODULE[arch](model), lambda out: getattr(out, field), (size, size))


# Three head forms: GAP + Flatten + Linear (ResNet), mean + LayerNorm + Linear (ConvNeXt), and
# EfficientNet's AvgPool2d(hidden_dim, ceil_mode=True), global while the map is at most 128 wide.
@pytest.mark.parametrize(("arch", "pool"), [("ResNet", "none"), ("ConvNext", "none"), ("ConvNext", "global"),
                                            ("EfficientNet", "global")])
def test_transformers_global_and_class_activation_map_values(arch: str, pool: str) -> None:
    config, size = next((p.values[1], p.values[2]) for p in CONVOLUTIONAL if p.values[0] == arch)
    model = _create(arch, config)
    fcn = convolutionalize(model, input_size=(size, size), pool=pool)
    image = torch.randn(1, 3, size + 64, size + 96)
    with torch.no_grad():
        dense = fcn(image).logits
        # "global": the original on the whole image; "none": its head on every feature cell
        expected = (model(image).logits if pool == "global"
                    else window_map(_split(model, arch, size), (1, 1), image))
    assert dense.shape == expected.shape
    assert rel_error(dense, expected) < 1e-4


@pytest.mark.parametrize(("arch", "config", "size"), ATTENTION)
def test_transformers_attention_is_refused_or_flagged(arch: str, config: dict[str, Any], size: int) -> None:
    model = _create(arch, config)
    before = fingerprint(model)
    try:
        fcn = convolutionalize(model, input_size=(size, size))
    except NotConvolutionalizable as error:
        assert "node" in str(error)
    else:
        assert fcn.geometry.crop_equivalent is False
        assert fcn.geometry.notes
    assert fingerprint(model) == before


def test_transformers_program_saved_as_pt2_loads_and_converts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A .pt2 of a transformers model returns a ModelOutput, whose pytree type is registered only
    once transformers.modeling_outputs is imported; loading imports it and converts the program."""
    from convolutionalize.models import load_model

    model = _create("ResNet", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))
    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=(dims,), strict=False)
    torch.export.save(program, str(tmp_path / "resnet.pt2"))
    fcn = convolutionalize(load_model(str(tmp_path / "resnet.pt2")), input_size=(64, 64))
    assert "capture: torch.export" in fcn.plan.describe()
    sy, sx = fcn.geometry.stride
    with torch.no_grad():
        out = fcn(torch.randn(1, 3, 64 + 2 * sy, 64 + 3 * sx))
    assert type(out).__name__ == "ImageClassifierOutputWithNoAttention"
    assert out.logits.shape[-2:] == fcn.geometry.cells(64 + 2 * sy, 64 + 3 * sx) == (3, 4)


def test_transformers_conversion_exports_to_onnx_and_maps_densely(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The torch.export-captured conversion works with torch.onnx.export (checked against
    onnxruntime at two sizes by ``save``) and with dense_map (the logits map)."""
    import numpy as np

    from convolutionalize import dense_map
    from convolutionalize.export import save

    model = _create("ResNet", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))
    fcn = convolutionalize(model, input_size=(64, 64))
    assert save(fcn, tmp_path / "resnet.onnx").stat().st_size > 0
    image = np.random.default_rng(0).standard_normal((3, 96, 120)).astype(np.float32)
    with torch.no_grad():
        expected = fcn(torch.from_numpy(image)[None]).logits[0].numpy()
    dense = dense_map(fcn, image)
    assert dense.shape == expected.shape == (5, *fcn.geometry.cells(96, 120))
    assert np.abs(dense - expected).max() <= 1e-5 * np.abs(expected).max()


def test_bit_same_padding_tiles_equal_the_whole_image() -> None:
    """BiT's TF "SAME" padding, computed from each input's size, is fixed at its native amounts:
    tiles of an image of any size equal the whole (before, every cell moved with the size)."""
    model = _create("Bit", dict(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], num_groups=2,
                                global_padding="SAME"))
    fcn = convolutionalize(model, input_size=(64, 64))
    image = torch.Generator().manual_seed(3)
    array = (torch.rand(64 + 5 * 8 + 3, 64 + 7 * 8 + 5, 3, generator=image) * 255).to(torch.uint8).numpy()
    whole, tiled = dense_map(fcn, array), dense_map(fcn, array, tile=72)
    assert whole.shape == (5, *fcn.geometry.cells(*array.shape[:2]))
    assert rel_error(torch.from_numpy(tiled), torch.from_numpy(whole)) < 1e-5
