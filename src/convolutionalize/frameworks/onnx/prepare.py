"""Older graph forms brought, exactly, into the one the analysis reads.

- Opsets below 7 are refused (their ``BatchNormalization``, ``Dropout`` and broadcasting
  rules predate everything the head analysis knows): upgrade them first.
- Initializers also listed as graph inputs (IR version < 4, Caffe2-era model-zoo files,
  ``torch.onnx.export(keep_initializers_as_inputs=True)``) are constants: they leave the
  input list, and the IR version rises to 4, the first that allows that.
- Model-local functions (a custom op defined in the file) are inlined: the analysis reads
  their nodes like any other.
- Constant subgraphs (``Constant``, ``ConstantOfShape``, ``Cast``, ``Reshape`` / ``Unsqueeze``
  / ``Identity`` of initializers, ...) are evaluated once with onnx's reference evaluator and
  replaced by initializers, so every weight the head reads is an initializer, except the
  ``DequantizeLinear`` of an integer weight (QDQ graphs), kept so that the graph stays quantized.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper

from ...errors import NotConvolutionalizable, first_line
from .graph import all_inputs, opset_of

__all__ = ["MIN_OPSET", "fold_constants", "prepare"]

logger = logging.getLogger(__name__)

MIN_OPSET = 7
MIN_IR_WITHOUT_INPUT_INITIALIZERS = 4
RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                        "Multinomial", "Bernoulli"})


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """A private copy of ``model`` with its weights as plain initializers (see the module)."""
    opset = opset_of(model)
    if opset < MIN_OPSET:
        raise NotConvolutionalizable(
            f"the graph's opset {opset} is below {MIN_OPSET}, the oldest this converter reads; "
            "upgrade it first (onnx.version_converter.convert_version(model, 13))")
    private = onnx.ModelProto()
    private.CopyFrom(model)
    if private.functions:  # model-local functions: their nodes, in the graph
        private = onnx.inliner.inline_local_functions(private)
    _initializers_as_constants(private)
    fold_constants(private)
    return private


def _initializers_as_constants(model: onnx.ModelProto) -> None:
    g = model.graph
    inits = {i.name for i in g.initializer}
    listed = [i for i in g.input if i.name in inits]
    if not listed:
        return
    kept = [i for i in g.input if i.name not in inits]
    del g.input[:]
    g.input.extend(kept)
    model.ir_version = max(model.ir_version, MIN_IR_WITHOUT_INPUT_INITIALIZERS)
    logger.debug("%d initializers listed as graph inputs are read as constants", len(listed))


def fold_constants(model: onnx.ModelProto) -> None:
    """Replace every node computed from constants alone by initializers (in place)."""
    g = model.graph
    constant = {i.name for i in g.initializer}
    initial = {i.name: i for i in g.initializer}
    outputs = {o.name for o in g.output}
    folded: list[onnx.NodeProto] = []
    for node in g.node:  # graph order is topological
        ins = [n for n in node.input if n]
        if (node.domain not in ("", "ai.onnx") or node.op_type in RANDOM_OPS
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                       for a in node.attribute)
                or any(o in outputs for o in node.output)):
            continue
        if node.op_type == "DequantizeLinear" and ins[0] in initial and _integer(initial[ins[0]]):
            continue  # a quantized weight stays quantized (the rewrite reshapes its integers)
        if node.op_type == "Constant" or (ins and all(n in constant for n in ins)):
            folded.append(node)
            constant.update(o for o in node.output if o)
    if not folded:
        return
    produced = {o for n in folded for o in n.output if o}
    ids = {id(n) for n in folded}
    rest = [n for n in g.node if id(n) not in ids]
    needed = list(dict.fromkeys(i for n in rest for i in all_inputs(n) if i in produced))
    values = _evaluate(model, folded, needed) if needed else []
    if values is None:
        return
    del g.node[:]
    g.node.extend(rest)
    g.initializer.extend(numpy_helper.from_array(v, name) for name, v in zip(needed, values))
    logger.debug("folded %d constant nodes into %d initializers", len(folded), len(needed))


def _integer(tensor: onnx.TensorProto) -> bool:
    return np.issubdtype(helper.tensor_dtype_to_np_dtype(tensor.data_type), np.integer)


def _evaluate(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
              names: list[str]) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    reads = {i for n in nodes for i in n.input if i}
    inits = [i for i in model.graph.initializer if i.name in reads]
    outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in names]
    sub = helper.make_model(helper.make_graph(nodes, "constants", [], outputs, inits),
                            opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        return [np.asarray(v) for v in ReferenceEvaluator(sub).run(None, {})]
    except Exception as exc:  # an op the evaluator lacks: the analysis then names the weight
        logger.info("constant subgraph not folded: %s", first_line(exc))
        return None
