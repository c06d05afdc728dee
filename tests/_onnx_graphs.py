"""Hand-built ONNX graphs (onnx.helper) for the legacy-form and Caffe2-zoo tests.

:class:`Net` writes any opset and IR version, optionally with every initializer also listed
among the graph inputs (Caffe2-era files) and with symbolic input dims. ``body`` adds the
padding-free body of ``test_onnx.py`` (13x13 -> 11x11 -> 5x5, 6 channels, stride 2), whose
dense maps must equal the original graph on every cell's 13x13 crop.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["CLASSES", "FEATURE", "NATIVE", "Net", "crops", "random_image", "rel_error"]

NATIVE = (13, 13)
FEATURE = (6, 5, 5)  # channels, height, width of the body's feature map
CLASSES = 4

Dim = int | str


class Net:
    """A graph under construction: ``w``/``ints`` add initializers, ``op`` adds a node."""

    def __init__(self, opset: int = 13, ir: int | None = None, inits_as_inputs: bool = False,
                 dims: tuple[Dim, Dim, Dim, Dim] = (1, 3, *NATIVE), seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset, self.ir, self.inits_as_inputs = opset, ir, inits_as_inputs
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.input = helper.make_tensor_value_info("image", TensorProto.FLOAT, list(dims))
        for dim, value in zip(self.input.type.tensor_type.shape.dim, dims):
            if isinstance(value, int) and value < 0:  # exporters' -1 (make_tensor_value_info drops it)
                dim.Clear()
                dim.dim_value = value

    def w(self, *shape: int, array: np.ndarray | None = None, scale: float = 1.0) -> str:
        name = f"w{len(self.inits)}"
        if array is None:
            array = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, values: list[int]) -> str:
        return self.w(array=np.array(values, np.int64))

    def positive(self, n: int) -> str:
        return self.w(array=self.rng.uniform(0.5, 2.0, n).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs: object) -> str:
        """Add a node; its first output's name (the others are ``<name>_<k>``)."""
        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        names = [out] + [f"{out}_{k}" for k in range(1, outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"n{self.count}_{op_type}",
                                           **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0,
             group: int = 1) -> str:
        attrs: dict[str, object] = {"kernel_shape": [k, k], "strides": [stride, stride],
                                    "pads": [pad] * 4}
        if group > 1:
            attrs["group"] = group
        return self.op("Conv", [x, self.w(cout, cin // group, k, k, scale=(cin * k * k) ** -0.5),
                                self.w(cout, scale=0.1)], **attrs)

    def bn(self, x: str, c: int, **attrs: object) -> str:
        return self.op("BatchNormalization", [x, self.positive(c), self.w(c, scale=0.1),
                                              self.w(c, scale=0.1), self.positive(c)], **attrs)

    def gemm(self, x: str, n_in: int, n_out: int, **attrs: object) -> str:
        return self.op("Gemm", [x, self.w(n_out, n_in, scale=n_in ** -0.5), self.w(n_out, scale=0.1)],
                       transB=1, **attrs)

    def body(self) -> str:
        """The padding-free body of ``test_onnx.py``: its 6x5x5 feature map at 13x13."""
        x = self.op("Relu", [self.conv("image", 3, 4, 3)])
        return self.op("Relu", [self.conv(x, 4, FEATURE[0], 3, stride=2)])

    def model(self, *outputs: str | tuple, runtime_inputs: tuple[onnx.ValueInfoProto, ...] = ()
              ) -> onnx.ModelProto:
        """The graph with these outputs (a name, or a name, its shape and its element type),
        checked; ``runtime_inputs`` are more graph inputs (weights fed at run time)."""
        values = []
        for out in outputs:
            name, shape, elem = (out, None, TensorProto.FLOAT) if isinstance(out, str) else (
                *out, TensorProto.FLOAT)[:3]
            values.append(helper.make_tensor_value_info(name, elem, shape))
        ir = self.ir or helper.find_min_ir_version_for([helper.make_opsetid("", self.opset)])
        inputs = [self.input, *runtime_inputs]
        if self.inits_as_inputs or ir < 4:  # IR 3 lists every initializer among the inputs
            inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                       for i in self.inits]
        graph = helper.make_graph(self.nodes, "net", inputs, values, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        _declare_output_shapes(model)  # IR < 7 needs them
        model.ir_version = ir
        onnx.checker.check_model(model, full_check=True)
        return model


def _declare_output_shapes(model: onnx.ModelProto) -> None:
    """Output shapes from shape inference, else from one onnxruntime run (computed reshapes)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph.output
    for value, known in zip(model.graph.output, inferred):
        if not value.type.tensor_type.HasField("shape"):
            value.type.CopyFrom(known.type)
    if all(v.type.tensor_type.HasField("shape") for v in model.graph.output):
        return
    import onnxruntime

    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.dim_value > 0 else n for d, n in zip(dims, (1, 3, *NATIVE))]
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run(None, {model.graph.input[0].name: np.zeros(shape, np.float32)})
    for value, out in zip(model.graph.output, outs):
        if not value.type.tensor_type.HasField("shape"):
            value.type.tensor_type.shape.SetInParent()
            for k in out.shape:
                value.type.tensor_type.shape.dim.add().dim_value = k


def random_image(size: tuple[int, int], seed: int = 1, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, *size)).astype(np.float32)


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-30))


def crops(run, x: np.ndarray, geometry, rows: int, cols: int) -> list[np.ndarray]:
    """Every output of ``run`` (an onnxruntime predictor's ``run_all``) on each cell's window:
    one (1, K, rows, cols) array per output."""
    cells = [[run(x[:, :, y0:y1, x0:x1]) for x0, y0, x1, y1 in (geometry.box(i, j) for j in range(cols))]
             for i in range(rows)]
    count = len(cells[0][0])
    return [np.array([[c[k].reshape(-1) for c in row] for row in cells]).transpose(2, 0, 1)[None]
            for k in range(count)]
