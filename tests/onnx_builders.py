"""Small ONNX graphs built in the tests (no converter involved), for the engine's own tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnxruntime in these environments reads IR <= 10 reliably


def save_model(path: Path, nodes: list, inits: dict[str, np.ndarray], in_shape: tuple, out_name: str,
               input_name: str = "data") -> Path:
    """Write a one-input, one-output ONNX model with float32 initializers."""
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)],  # rank left open
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)  # the graph must be well formed
    onnx.save(model, str(path))
    return path


def conv_model(path: Path, weight: np.ndarray, bias: np.ndarray, in_shape: tuple, relu: bool = True,
               **conv_attrs) -> Path:
    """data -> Conv (-> Relu) -> out."""
    nodes = [helper.make_node("Conv", ["data", "W", "b"], ["c"], name="conv", **conv_attrs)]
    out = "c"
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
        out = "r"
    return save_model(path, nodes, {"W": weight, "b": bias}, in_shape, out)


def fc_model(path: Path, weight: np.ndarray, bias: np.ndarray, relu: bool = True) -> Path:
    """data (N, K, 1, 1) -> Flatten -> Gemm (-> Relu) -> out."""
    nodes = [helper.make_node("Flatten", ["data"], ["f"], name="flat", axis=1),
             helper.make_node("Gemm", ["f", "W", "b"], ["g"], name="fc", transB=1)]
    out = "g"
    if relu:
        nodes.append(helper.make_node("Relu", ["g"], ["r"], name="relu"))
        out = "r"
    return save_model(path, nodes, {"W": weight, "b": bias}, (weight.shape[1], 1, 1), out)
