"""Older and exporter-specific ONNX forms: every head form at opsets 9, 11, 12 and 13 (7 and 8
where the form exists only there), symbolic input dims, paddle2onnx's computed reshapes,
tf2onnx's NHWC transposes, Gemm with transA, several outputs, the self-check, refusals.

Every graph has the padding-free body of ``_onnx_graphs`` (13x13 -> 6x5x5, stride 2), so each
cell of a converted map must equal the original graph run by onnxruntime on that cell's
13x13 crop. Tolerance: relative 1e-4 (``selfcheck.CHECK_RTOL``): onnxruntime's Conv and Gemm sum in
different orders.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, version_converter  # noqa: E402

from _onnx_graphs import CLASSES, FEATURE, NATIVE, Net, crops, random_image, rel_error  # noqa: E402
from convolutionalize import NotConvolutionalizable, geometry_of  # noqa: E402
from convolutionalize.frameworks.onnx.graph import opset_of  # noqa: E402
from convolutionalize.frameworks.onnx.model import (  # noqa: E402
    Predictor,
    convolutionalize_onnx,
    save_onnx,
    self_check_of,
)
from convolutionalize.selfcheck import CHECK_RTOL  # noqa: E402

RTOL = CHECK_RTOL
C, FH, FW = FEATURE
FLAT = C * FH * FW
HIDDEN = 7
BOXES = 4
LARGER = (17, 19)  # two and three strides larger: a 3x4 map
OPSETS = (9, 11, 12, 13)


# --------------------------------------------------------------------------- head forms


def gap_flatten(n: Net) -> str:
    return n.op("Flatten", [n.op("GlobalAveragePool", [n.body()])])


def softmax_default_axis(n: Net) -> list[str]:
    """Softmax without ``axis``: 1 (coerced to 2-D) before opset 13, -1 from 13."""
    return [n.op("Softmax", [n.gemm(gap_flatten(n), C, CLASSES)])]


def logsoftmax_after_flatten_mlp(n: Net) -> list[str]:
    x = n.op("Relu", [n.gemm(n.op("Flatten", [n.body()]), FLAT, HIDDEN)])
    return [n.op("LogSoftmax", [n.gemm(x, HIDDEN, CLASSES)], axis=1)]


def hardmax_last_axis(n: Net) -> list[str]:
    return [n.op("Hardmax", [n.gemm(gap_flatten(n), C, CLASSES)], axis=-1 if n.opset >= 11 else 1)]


def squeezenet_pooled_softmax(n: Net) -> list[str]:
    """SqueezeNet's classifier: a 1x1 conv to the classes, GlobalAveragePool, Softmax on the
    4-D pooled tensor (opset 13 needs axis=1: its default -1 would be the width)."""
    x = n.op("Relu", [n.conv(n.body(), C, CLASSES, 1)])
    pooled = n.op("GlobalAveragePool", [x])
    return [n.op("Softmax", [pooled], **({"axis": 1} if n.opset >= 13 else {}))]


def pooled_nhwc_logsoftmax(n: Net) -> list[str]:
    """A coerced LogSoftmax on a channels-last (N, 1, 1, C) map at axis 1: over C at 1x1."""
    x = n.op("Transpose", [n.op("GlobalAveragePool", [n.body()])], perm=[0, 2, 3, 1])
    x = n.op("LogSoftmax", [x], axis=1 if n.opset < 13 else 3)
    return [n.gemm(n.op("Reshape", [x, n.ints([-1, C])]), C, CLASSES)]


def flatten_axis0(n: Net) -> list[str]:
    """Flatten(axis=0) of a batch-1 pooled map: (1, C), as some exporters write it."""
    x = n.op("Flatten", [n.op("GlobalAveragePool", [n.body()])], axis=0)
    return [n.gemm(x, C, CLASSES)]


def flatten_axis0_map(n: Net) -> list[str]:
    return [n.gemm(n.op("Flatten", [n.body()], axis=0), FLAT, CLASSES)]


def flatten_negative_axis(n: Net) -> list[str]:
    return [n.gemm(n.op("Flatten", [n.body()], axis=-3), FLAT, CLASSES)]


def batchnorm_spatial(n: Net) -> list[str]:
    """Opsets 7-8: ``spatial=1`` on the pooled map, ``spatial=0`` on the feature vector."""
    x = n.bn(n.op("GlobalAveragePool", [n.body()]), C, spatial=1)
    x = n.gemm(n.op("Flatten", [x]), C, HIDDEN)
    x = n.op("Relu", [n.bn(x, HIDDEN, spatial=0, epsilon=1e-3)])
    return [n.gemm(x, HIDDEN, CLASSES)]


def batchnorm_pooled_and_vector(n: Net) -> list[str]:
    x = n.bn(n.op("GlobalAveragePool", [n.body()]), C)
    x = n.gemm(n.op("Flatten", [x]), C, HIDDEN)
    return [n.gemm(n.op("Relu", [n.bn(x, HIDDEN, momentum=0.9)]), HIDDEN, CLASSES)]


def dropout_with_mask(n: Net) -> list[str]:
    """Dropout with its (unused) mask output: ``ratio`` an attribute before opset 12, then
    ``ratio`` and ``training_mode`` inputs."""
    x = n.gemm(n.op("Flatten", [n.body()]), FLAT, HIDDEN)
    if n.opset >= 12:
        ratio = n.w(array=np.array(0.3, np.float32))
        x = n.op("Dropout", [x, ratio, n.w(array=np.array(False))], outputs=2)
    else:
        x = n.op("Dropout", [x], outputs=2, ratio=0.3)
    return [n.gemm(n.op("Relu", [x]), HIDDEN, CLASSES)]


def reshape_constant(n: Net) -> list[str]:
    return [n.gemm(n.op("Reshape", [n.body(), n.ints([1, -1])]), FLAT, CLASSES)]


def unsqueeze(n: Net, x: str, axes: list[int]) -> str:
    if n.opset >= 13:
        return n.op("Unsqueeze", [x, n.ints(axes)])
    return n.op("Unsqueeze", [x], axes=axes)


def reshape_computed(n: Net) -> list[str]:
    """``x.view(x.size(0), -1)`` as the legacy exporter writes it."""
    feature = n.body()
    batch = unsqueeze(n, n.op("Gather", [n.op("Shape", [feature]), n.ints([0])], axis=0), [0])
    shape = n.op("Concat", [n.op("Reshape", [batch, n.ints([1])]), n.ints([-1])], axis=0)
    return [n.gemm(n.op("Reshape", [feature, shape]), FLAT, CLASSES)]


def paddle_slice(n: Net, x: str) -> str:
    if n.opset >= 10:
        return n.op("Slice", [x, n.ints([0]), n.ints([1]), n.ints([0])])
    return n.op("Slice", [x], starts=[0], ends=[1], axes=[0])


def paddle2onnx_flatten(n: Net) -> list[str]:
    """paddle2onnx's flatten: Shape -> Cast -> Slice -> Cast -> Concat -> Reshape, then
    MatMul + Add + Softmax."""
    pooled = n.op("GlobalAveragePool", [n.body()])
    dims = n.op("Cast", [n.op("Shape", [pooled])], to=TensorProto.INT32)
    batch = n.op("Cast", [paddle_slice(n, dims)], to=TensorProto.INT64)
    x = n.op("Reshape", [pooled, n.op("Concat", [batch, n.ints([-1])], axis=0)])
    x = n.op("Add", [n.op("MatMul", [x, n.w(C, CLASSES)]), n.w(CLASSES)])
    return [n.op("Softmax", [x], axis=1)]


def tf2onnx_nhwc_flatten(n: Net) -> list[str]:
    x = n.op("Transpose", [n.body()], perm=[0, 2, 3, 1])
    x = n.op("Reshape", [x, n.ints([-1, FLAT])])
    return [n.op("Add", [n.op("MatMul", [x, n.w(FLAT, CLASSES, scale=0.1)]), n.w(CLASSES)])]


def tf2onnx_nhwc_reducemean(n: Net) -> list[str]:
    x = n.op("Transpose", [n.body()], perm=[0, 2, 3, 1])
    x = n.op("ReduceMean", [x], axes=[1, 2], keepdims=0)
    return [n.op("Add", [n.op("MatMul", [x, n.w(C, CLASSES)]), n.w(CLASSES)])]


def gemm_trans_a(n: Net) -> list[str]:
    """Features laid out (features, batch) by a Transpose, read by Gemm(transA=1)."""
    x = n.op("Transpose", [n.op("Flatten", [n.body()])], perm=[1, 0])
    return [n.op("Gemm", [x, n.w(FLAT, CLASSES, scale=0.1), n.w(CLASSES)], transA=1)]


def gemm_trans_a_pooled(n: Net) -> list[str]:
    x = n.op("Transpose", [gap_flatten(n)], perm=[1, 0])
    return [n.op("Gemm", [x, n.w(CLASSES, C), n.w(1, CLASSES)], transA=1, transB=1, alpha=0.5)]


def scores_and_boxes(n: Net) -> list[str]:
    """Class scores and box regression from one pooled vector."""
    x = gap_flatten(n)
    return [n.op("Softmax", [n.gemm(x, C, CLASSES)], axis=1), n.gemm(x, C, BOXES)]


def logits_and_probabilities(n: Net) -> list[str]:
    logits = n.gemm(n.op("Flatten", [n.body()]), FLAT, CLASSES)
    return [logits, n.op("Softmax", [logits], axis=1)]


def flatten_mlp_two_heads(n: Net) -> list[str]:
    x = n.op("Relu", [n.gemm(n.op("Flatten", [n.body()]), FLAT, HIDDEN)])
    return [n.gemm(x, HIDDEN, BOXES), n.gemm(x, HIDDEN, CLASSES)]


@dataclass(frozen=True)
class Form:
    build: Callable[[Net], list[str]]
    opsets: tuple[int, ...] = OPSETS


FORMS: dict[str, Form] = {
    "softmax_default_axis": Form(softmax_default_axis),
    "logsoftmax_after_flatten_mlp": Form(logsoftmax_after_flatten_mlp),
    "hardmax_last_axis": Form(hardmax_last_axis),
    "squeezenet_pooled_softmax": Form(squeezenet_pooled_softmax),
    "pooled_nhwc_logsoftmax": Form(pooled_nhwc_logsoftmax),
    "flatten_axis0": Form(flatten_axis0),
    "flatten_axis0_map": Form(flatten_axis0_map),
    "flatten_negative_axis": Form(flatten_negative_axis, (11, 12, 13)),
    "batchnorm_spatial": Form(batchnorm_spatial, (7, 8)),
    "batchnorm_pooled_and_vector": Form(batchnorm_pooled_and_vector),
    "dropout_with_mask": Form(dropout_with_mask, (7, 9, 11, 12, 13)),
    "reshape_constant": Form(reshape_constant),
    "reshape_computed": Form(reshape_computed),
    "paddle2onnx_flatten": Form(paddle2onnx_flatten),
    "tf2onnx_nhwc_flatten": Form(tf2onnx_nhwc_flatten),
    "tf2onnx_nhwc_reducemean": Form(tf2onnx_nhwc_reducemean),
    "gemm_trans_a": Form(gemm_trans_a),
    "gemm_trans_a_pooled": Form(gemm_trans_a_pooled),
    "scores_and_boxes": Form(scores_and_boxes),
    "logits_and_probabilities": Form(logits_and_probabilities),
    "flatten_mlp_two_heads": Form(flatten_mlp_two_heads),
}
CASES = [(form, opset) for form, spec in FORMS.items() for opset in spec.opsets]


def build(form: str, opset: int, **net: object) -> onnx.ModelProto:
    n = Net(opset, **net)  # type: ignore[arg-type]
    return n.model(*FORMS[form].build(n))


def check_maps(model: onnx.ModelProto, fcn: onnx.ModelProto, size: tuple[int, int] = LARGER,
               input_size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Native equality of every output, then every map at ``size`` against true crops."""
    original, converted = Predictor(model).run_all, Predictor(fcn).run_all
    x = random_image(NATIVE, seed=3)
    for ours, theirs in zip(converted(x), original(x), strict=True):
        assert ours.shape[-2:] == (1, 1) or ours.shape[1:3] == (1, 1)
        assert rel_error(ours.reshape(theirs.shape), theirs) < RTOL
    geometry = geometry_of(fcn)
    rows, cols = geometry.cells(*size)
    x = random_image(size)
    maps = converted(x)
    for ours, theirs in zip(maps, crops(original, x, geometry, rows, cols), strict=True):
        assert ours.shape == theirs.shape == (1, theirs.shape[1], rows, cols)
        assert rel_error(ours, theirs) < RTOL
    return maps


@pytest.mark.parametrize(("form", "opset"), CASES, ids=[f"{f}-opset{o}" for f, o in CASES])
def test_form_at_opset(form: str, opset: int) -> None:
    model = build(form, opset)
    fcn = convolutionalize_onnx(model, None, "window")
    onnx.checker.check_model(fcn, full_check=True)
    assert opset_of(fcn) == opset  # the graph keeps its opset
    assert [o.name for o in fcn.graph.output] == [o.name for o in model.graph.output]
    maps = check_maps(model, fcn)
    assert all(m.shape[-2:] == (3, 4) for m in maps)
    # structural: no op reads a vector any more; the head ops that were coerced run per location
    assert not {n.op_type for n in fcn.graph.node} & {"Gemm", "Flatten", "Shape", "Dropout"}
    check = self_check_of(fcn)
    assert check is not None and check.native_error is not None and check.native_error < RTOL
    assert check.size == (13 + 2 * 2, 13 + 3 * 2) and check.cells == geometry_of(fcn).cells(*check.size)
    assert check.crop_error is not None and check.crop_error < RTOL


UPGRADABLE = [(f, o) for f, o in CASES if o < 13 and f not in {
    "batchnorm_spatial",  # the version converter refuses spatial=0 (no exact opset-9 form)
}]


@pytest.mark.parametrize(("form", "opset"), UPGRADABLE, ids=[f"{f}-opset{o}" for f, o in UPGRADABLE])
def test_version_converter_upgrade_gives_the_same_map(form: str, opset: int) -> None:
    """The per-opset handlers agree with converting onnx's own upgrade of the graph to 13."""
    model = build(form, opset)
    upgraded = version_converter.convert_version(model, 13)
    x = random_image(LARGER, seed=4)
    ours = Predictor(convolutionalize_onnx(model, None, "window")).run_all(x)
    theirs = Predictor(convolutionalize_onnx(upgraded, None, "window")).run_all(x)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and rel_error(a, b) < RTOL


def test_coerced_softmax_is_rewritten_channels_last() -> None:
    fcn = convolutionalize_onnx(build("softmax_default_axis", 9), None, "window")
    ops = [n.op_type for n in fcn.graph.node]
    at = ops.index("Softmax")
    assert ops[at - 1:at + 2] == ["Transpose", "Softmax", "Transpose"]
    softmax = fcn.graph.node[at]
    assert helper.get_attribute_value(softmax.attribute[0]) == 3
    assert "coerced to 2-D at axis 1" in {p.key: p.value for p in fcn.metadata_props}[
        "convolutionalize.plan"]


def test_batchnorm_spatial_attribute_is_dropped() -> None:
    fcn = convolutionalize_onnx(build("batchnorm_spatial", 7), None, "window")
    norms = [n for n in fcn.graph.node if n.op_type == "BatchNormalization"]
    assert len(norms) == 2 and not any(a.name == "spatial" for n in norms for a in n.attribute)


def test_several_outputs_become_maps_in_order() -> None:
    model = build("scores_and_boxes", 13)
    fcn = convolutionalize_onnx(model, None, "window")
    assert [o.name for o in fcn.graph.output] == [o.name for o in model.graph.output]
    scores, boxes = Predictor(fcn).run_all(random_image((21, 15)))
    assert scores.shape == (1, CLASSES, 5, 2) and boxes.shape == (1, BOXES, 5, 2)
    np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-5)  # a softmax over channels per cell
    plan = {p.key: p.value for p in fcn.metadata_props}["convolutionalize.plan"]
    assert "outputs: 2 maps on one geometry" in plan
    dims = [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in fcn.graph.output]
    assert dims == [["batch", CLASSES, "rows", "cols"], ["batch", BOXES, "rows", "cols"]]


@pytest.mark.parametrize(("form", "pool", "shapes"), [
    ("scores_and_boxes", "none", [(1, CLASSES, 7, 8), (1, BOXES, 7, 8)]),  # CAM: one cell per feature
    ("scores_and_boxes", "global", [(1, CLASSES), (1, BOXES)]),
    ("flatten_mlp_two_heads", "none", [(1, BOXES, 3, 4), (1, CLASSES, 3, 4)]),  # a flatten head slides
    ("flatten_mlp_two_heads", "global", [(1, BOXES), (1, CLASSES)]),  # the mean of each window map
])
def test_several_outputs_with_other_pool_modes(form: str, pool: str, shapes: list[tuple[int, ...]]) -> None:
    model = build(form, 11)
    fcn = convolutionalize_onnx(model, None, pool)  # type: ignore[arg-type]
    x = random_image(LARGER)
    outs = Predictor(fcn).run_all(x)
    assert [o.shape for o in outs] == shapes
    if form == "flatten_mlp_two_heads" and pool == "global":
        window = Predictor(convolutionalize_onnx(model, None, "window")).run_all(x)
        for mean, full in zip(outs, window, strict=True):
            assert rel_error(mean, full.mean((2, 3))) < RTOL


# --------------------------------------------------------------------------- symbolic input dims


@pytest.mark.parametrize(("dims", "kept"), [
    ((-1, 3, -1, -1), ["batch", "height", "width"]),  # exporters' -1
    (("?", 3, "?", "?"), ["batch", "height", "width"]),  # one name for several axes: renamed
    (("N", 3, "H", "W"), ["N", "H", "W"]),  # the graph's own names are kept
], ids=["minus_one", "question_mark", "named"])
def test_symbolic_input_dims_with_input_size(dims: tuple, kept: list[str]) -> None:
    model = build("reshape_computed", 11, dims=dims)
    with pytest.raises(ValueError, match="input_size is required"):
        convolutionalize_onnx(model, None, "window")
    fcn = convolutionalize_onnx(model, NATIVE, "window")
    assert geometry_of(fcn).input_size == NATIVE
    image = fcn.graph.input[0].type.tensor_type.shape.dim
    assert [image[a].dim_param for a in (0, 2, 3)] == kept and image[1].dim_value == 3
    check_maps(model, fcn)
    out = Predictor(fcn)(random_image((15, 21), batch=2))
    assert out.shape == (2, CLASSES, 2, 5)


def test_paddle2onnx_graph_with_symbolic_dims_converts_with_input_size() -> None:
    model = build("paddle2onnx_flatten", 11, dims=(-1, 3, -1, -1))
    fcn = convolutionalize_onnx(model, (13, 13), "window")
    onnx.checker.check_model(fcn, full_check=True)
    check_maps(model, fcn)
    assert not {n.op_type for n in fcn.graph.node} & {"Shape", "Cast", "Slice", "Concat", "Reshape"}


def test_model_local_functions_are_inlined() -> None:
    """A flatten written as a model-local function (a custom op defined in the file, computing
    its target shape) is read through: the function's nodes are inlined first."""
    net = Net(opset=13, dims=(-1, 3, "h", "w"))
    x = net.op("Identity", [net.body()])
    const = [helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                                [1], [v]))
             for name, v in (("zero", 0), ("one", 1), ("rest", -1))]
    flatten = helper.make_function("custom", "MyFlatten", ["X"], ["Y"], [
        helper.make_node("Shape", ["X"], ["s"]), *const,
        helper.make_node("Slice", ["s", "zero", "one"], ["b"]),
        helper.make_node("Concat", ["b", "rest"], ["t"], axis=0),
        helper.make_node("Reshape", ["X", "t"], ["Y"])], [helper.make_opsetid("", 13)])
    net.nodes.append(helper.make_node("MyFlatten", [x], ["flat"], domain="custom", name="flatten"))
    out = net.gemm("flat", int(np.prod(FEATURE)), CLASSES)
    graph = helper.make_graph(net.nodes, "net", [net.input],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], net.inits)
    model = helper.make_model(graph, functions=[flatten], opset_imports=[
        helper.make_opsetid("", 13), helper.make_opsetid("custom", 1)])
    model.ir_version = 8
    fcn = convolutionalize_onnx(model, NATIVE, "window")
    onnx.checker.check_model(fcn, full_check=True)
    check_maps(model, fcn)


# --------------------------------------------------------------------------- Caffe2-era files


def test_initializers_listed_as_inputs_ir3() -> None:
    model = build("dropout_with_mask", 7, ir=3, inits_as_inputs=True)
    assert len(model.graph.input) == 1 + len(model.graph.initializer)
    fcn = convolutionalize_onnx(model, None, "window")
    assert [i.name for i in fcn.graph.input] == ["image"] and fcn.ir_version >= 4
    onnx.checker.check_model(fcn, full_check=True)
    check_maps(model, fcn)


def test_constant_subgraphs_are_folded_into_initializers() -> None:
    """Weights from Constant, ConstantOfShape, Cast (float16), Reshape and Unsqueeze."""
    n = Net(11)
    x = gap_flatten(n)
    values = n.rng.standard_normal((HIDDEN, C)).astype(np.float32)
    flat = helper.make_tensor("flat_w", TensorProto.FLOAT, [HIDDEN * C], values.reshape(-1))
    weight = n.op("Reshape", [n.op("Constant", [], value=flat), n.ints([HIDDEN, C])])
    bias = n.op("ConstantOfShape", [n.ints([HIDDEN])],
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.25]))
    x = n.op("Relu", [n.op("Gemm", [x, weight, bias], transB=1)])
    half = n.op("Cast", [n.w(array=n.rng.standard_normal((CLASSES, HIDDEN)).astype(np.float16))],
                to=TensorProto.FLOAT)
    scale = n.op("Unsqueeze", [n.w(array=np.float32(0.5).reshape(()))], axes=[0])
    x = n.op("Mul", [n.op("Gemm", [x, half], transB=1), scale])
    model = n.model(x)
    fcn = convolutionalize_onnx(model, None, "window")
    ops = {node.op_type for node in fcn.graph.node}
    assert not ops & {"Constant", "ConstantOfShape", "Cast", "Reshape", "Unsqueeze"}, ops
    check_maps(model, fcn)


# --------------------------------------------------------------------------- refusals


def refusal(build_head: Callable[[Net], list[str]], opset: int = 11) -> onnx.ModelProto:
    n = Net(opset)
    return n.model(*build_head(n))


@pytest.mark.parametrize(("head", "opset", "match"), [
    (lambda n: [n.op("Softmax", [n.gemm(gap_flatten(n), C, CLASSES)], axis=0)], 9,
     r"n\d+_Softmax.*axis=0 runs over the batch"),
    (lambda n: [n.op("Softmax", [n.op("GlobalAveragePool", [n.conv(n.body(), C, CLASSES, 1)])],
                     axis=2)], 11, r"n\d+_Softmax.*over the spatial axes"),
    (lambda n: [n.op("Softmax", [n.op("GlobalAveragePool", [n.conv(n.body(), C, CLASSES, 1)])])],
     13, r"n\d+_Softmax.*axis 3 is not the classes axis"),
    (lambda n: [n.op("Gemm", [gap_flatten(n), n.w(1, CLASSES)], transA=1)], 11,
     r"n\d+_Gemm.*transA=1.*features must be the rows"),
    (lambda n: [n.op("Gemm", [n.op("Transpose", [gap_flatten(n)], perm=[1, 0]), n.w(CLASSES, 1)])],
     11, r"n\d+_Gemm.*without transA=1"),
    (lambda n: [n.gemm(n.op("Flatten", [n.body()], axis=2), FH * FW, CLASSES)], 11,
     r"n\d+_Flatten.*neither CHW nor HWC"),
    (lambda n: [n.op("Dropout", [n.gemm(gap_flatten(n), C, CLASSES)], outputs=2),
                (f"dropout_{n.count}_1", None, TensorProto.BOOL)], 11,
     r"n\d+_Dropout.*mask output .* is used"),
    (lambda n: [n.op("Dropout", [n.gemm(gap_flatten(n), C, CLASSES), n.w(array=np.float32(0.5)),
                                 n.w(array=np.array(True))])], 12, r"n\d+_Dropout.*training mode"),
    (lambda n: [n.gemm(gap_flatten(n), C, CLASSES),
                n.gemm(n.op("Flatten", [n.op("GlobalMaxPool", [n.op("Relu", [n.conv("image", 3, C, 3)])])]),
                       C, BOXES)], 11, r"outputs start from different feature maps"),
], ids=["softmax_over_batch", "coerced_softmax_over_space", "softmax13_over_width", "transA_on_rows",
        "transposed_without_transA", "flatten_axis2", "dropout_mask_used", "dropout_training",
        "outputs_on_two_features"])
def test_refusals_name_the_node(head: Callable[[Net], list[str]], opset: int, match: str) -> None:
    with pytest.raises(NotConvolutionalizable, match=match):
        convolutionalize_onnx(refusal(head, opset), None, "window")


def test_refusals_of_files_are_one_line_exit_2(tmp_path: Path) -> None:
    from convolutionalize.cli import main

    old = build("softmax_default_axis", 9, inits_as_inputs=True)
    old.opset_import[0].version = 6  # Softmax-1, Gemm-6 and Flatten-1 exist there too
    old.ir_version = 3
    n = Net(11)
    weights = helper.make_tensor_value_info("fc_weight", TensorProto.FLOAT, [CLASSES, C])
    runtime = n.model(n.op("Gemm", [gap_flatten(n), "fc_weight"], transB=1), runtime_inputs=(weights,))
    cases = {"opset6.onnx": (old, "opset 6 is below 7"),
             "runtime.onnx": (runtime, "weights must be initializers")}
    for name, (model, message) in cases.items():
        path = save_onnx(model, tmp_path / name)
        err = io.StringIO()
        with redirect_stderr(err):
            code = main(["inspect", str(path)])
        lines = err.getvalue().strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (name, lines)


def test_self_check_refuses_a_map_with_the_wrong_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """A geometry that predicts the wrong rows and columns is caught at the larger size."""
    from convolutionalize.frameworks.onnx import model as onnx_model

    real = onnx_model.geometry_from_plan

    def off_by_one(*args, **kwargs):  # type: ignore[no-untyped-def]
        import dataclasses

        geo = real(*args, **kwargs)
        return dataclasses.replace(geo, stride=(geo.stride[0], geo.stride[1] + 1))

    monkeypatch.setattr(onnx_model, "geometry_from_plan", off_by_one)
    with pytest.raises(NotConvolutionalizable, match="geometry predicts"):
        convolutionalize_onnx(build("softmax_default_axis", 13), None, "window")
