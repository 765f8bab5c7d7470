"""Importing a researcher's own ONNX model: the rewrites that turn an ONNX file exported
elsewhere into the form the planner reads (docs/architecture.md, "Importing one's own ONNX").

- Initializers listed among the graph inputs (IR < 4 files) are constants, not inputs.
- Constant subgraphs (ConstantOfShape, Unsqueeze of a weight, ...) are folded by onnxruntime's
  offline graph optimisation at ORT_ENABLE_BASIC (only ONNX-standard ops come out of it).
- A Softmax of opset < 13 (default axis 1, over the axes from it on, flattened) gets the axis
  written out, when it means the same as a Softmax of opset 13 over that axis.
- BatchNormalization is folded into the Conv it alone reads; a Mul or Add by a per-channel
  constant is folded into the Conv or BatchNormalization it alone reads.

A model the converters wrote has none of these, and passes through unchanged.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import DyveError

#: The nodes a per-channel Mul / Add can be folded into.
_AFFINE_PRODUCERS = ("Conv", "BatchNormalization")


def import_model(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """``model`` (read from ``path``) rewritten for the planner; the original is not changed."""
    model = _copy(model)
    initializers_as_constants(model)
    explicit_softmax_axes(model, path)
    if has_constant_subgraphs(model):
        model = fold_constant_subgraphs(model, path)
    fold_affine_layers(model)
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def initializers_as_constants(model: onnx.ModelProto) -> None:
    """Drop the initializers from the graph inputs (they are weights, not inputs to feed)."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    if not any(i.name in inits for i in graph.input):
        return
    kept = [i for i in graph.input if i.name not in inits]
    del graph.input[:]
    graph.input.extend(kept)
    model.ir_version = max(model.ir_version, 4)  # IR 4 lets initializers be absent from the inputs


def explicit_softmax_axes(model: onnx.ModelProto, path: Path) -> None:
    """Write out the axis of each Softmax of opset < 13, whose default is 1 and which runs over
    the axes from ``axis`` on, flattened: the same as opset 13's Softmax over ``axis`` when the
    axes after it have size 1 (a (N, C, 1, 1) tensor) or there are none."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset >= 13 or not any(n.op_type == "Softmax" for n in model.graph.node):
        return
    dims = _dims(model)
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = dims.get(node.input[0])
        if shape is None:
            raise DyveError(f"{path}: Softmax {node.name or node.output[0]}: cannot infer the rank of its input")
        axis = axis + len(shape) if axis < 0 else axis
        if any(d != 1 for d in shape[axis + 1:]):
            raise DyveError(f"{path}: Softmax {node.name or node.output[0]} (opset {opset}) over the flattened axes "
                            f"{axis}.. of {shape} is not supported")
        del node.attribute[:]  # axis was its only attribute
        node.attribute.append(onnx.helper.make_attribute("axis", axis))


def _dims(model: onnx.ModelProto) -> dict[str, tuple]:
    """The shape of every tensor shape inference knows (None for an unknown dimension)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # the planner reports a graph that does not infer
        return {}
    dims = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            dims[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                  for d in vi.type.tensor_type.shape.dim)
    return dims


def has_constant_subgraphs(model: onnx.ModelProto) -> bool:
    """Whether some node other than Constant computes from constants alone."""
    constant = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            constant.update(node.output)
        elif all(i in constant for i in node.input if i):
            return True
    return False


def fold_constant_subgraphs(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """``model`` with its constant subgraphs folded by onnxruntime (ORT_ENABLE_BASIC, the
    optimized model written by SessionOptions.optimized_model_filepath); metadata kept."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise DyveError(f"{path}: folding its constant subgraphs needs onnxruntime: pip install onnxruntime") from None
    with tempfile.TemporaryDirectory(prefix="dyvedeep-import-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            folded = onnx.load(str(optimized))
        except Exception as err:  # onnxruntime raises its own Fail / InvalidGraph types
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DyveError(f"{path}: onnxruntime cannot fold its constant subgraphs: {first[:200]}") from None
    del folded.metadata_props[:]
    folded.metadata_props.extend(model.metadata_props)
    used = {node.domain for node in folded.graph.node}
    kept = [o for o in folded.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del folded.opset_import[:]
    folded.opset_import.extend(kept)  # onnxruntime lists its own domains, used or not
    return folded


# ----------------------------------------------------------------------------- affine folds


class _Graph:
    """The nodes of a graph with their producers and consumers, and new initializers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}
        self.ranks = _ranks(model)

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if tensor in n.input]

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        for n in self.graph.node:
            if tensor in n.output:
                return n
        return None

    def const(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def add_const(self, hint: str, array: np.ndarray) -> str:
        """A new float32 initializer (never changes one that other nodes may share)."""
        name, k = f"{hint}_folded", 1
        while name in self.inits:
            k += 1
            name = f"{hint}_folded{k}"
        tensor = numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def remove(self, node: onnx.NodeProto, producer: onnx.NodeProto) -> None:
        """Remove ``node``; ``producer`` (whose output it alone read) writes its output instead."""
        producer.output[0] = node.output[0]
        self.graph.node.remove(node)

    def drop_unused_initializers(self) -> None:
        used = {i for n in self.graph.node for i in n.input}
        kept = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every tensor whose rank shape inference knows."""
    return {name: len(shape) for name, shape in _dims(model).items()}


def per_channel(array: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``array`` as a vector of ``channels`` values when, broadcast (numpy rules) against a
    tensor of ``rank`` (batch included) and ``channels`` channels, it varies along axis 1 only;
    else None. Scalars are not per-channel (the eltwise op takes them as they are)."""
    if array.size <= 1 or array.ndim > rank or rank < 2:
        return None
    shape = (1,) * (rank - array.ndim) + array.shape
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] != channels:
        return None
    return array.reshape(channels).astype(np.float64)


def _channels(g: _Graph, node: onnx.NodeProto) -> int | None:
    """Output channels of a Conv or BatchNormalization with constant parameters."""
    w = g.const(node.input[1]) if len(node.input) > 1 else None
    return None if w is None else int(w.shape[0])


def _inference_batchnorm(node: onnx.NodeProto) -> bool:
    """Whether a BatchNormalization normalises per channel with its stored statistics (not in
    training mode, not ``spatial=0`` of opset < 9): the planner refuses the others."""
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    return not attrs.get("training_mode", 0) and attrs.get("spatial", 1) == 1


def _fold_one(g: _Graph, node: onnx.NodeProto) -> bool:
    """Fold ``node`` (BatchNormalization, Mul or Add) into the node it alone reads; whether it did."""
    data_inputs = [i for i in node.input if i and i not in g.inits]
    if len(data_inputs) != 1 or len(node.output) != 1:
        return False
    data = data_inputs[0]
    producer = g.producer(data)
    if (producer is None or producer.op_type not in _AFFINE_PRODUCERS or len(g.consumers(data)) != 1
            or data in g.outputs or len(producer.output) != 1):
        return False
    channels = _channels(g, producer)
    if channels is None:
        return False
    if producer.op_type == "Conv":
        has_bias = len(producer.input) > 2 and bool(producer.input[2])
        if has_bias and g.const(producer.input[2]) is None:
            return False
        weight = g.const(producer.input[1]).astype(np.float64)
        bias = g.const(producer.input[2]).astype(np.float64) if has_bias else np.zeros(channels)
    else:
        if any(g.const(i) is None for i in producer.input[1:5]) or not _inference_batchnorm(producer):
            return False
        weight, bias = g.const(producer.input[1]).astype(np.float64), g.const(producer.input[2]).astype(np.float64)
    if node.op_type == "BatchNormalization":
        if (producer.op_type != "Conv" or any(g.const(i) is None for i in node.input[1:5])
                or not _inference_batchnorm(node)):
            return False
        gamma, beta, mean, var = (g.const(i).astype(np.float64) for i in node.input[1:5])
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + np.float64(np.float32(eps)))
        shift = beta - mean * scale
    else:
        const = g.const(next(i for i in node.input if i in g.inits))
        vector = per_channel(const, g.ranks.get(data, 0), channels)
        if vector is None:
            return False
        scale, shift = (vector, vector * 0) if node.op_type == "Mul" else (np.ones(channels), vector)
    if producer.op_type == "Conv":
        # conv(x) * scale + shift: the weights of each output channel scaled, the bias mapped
        w_name = g.add_const(producer.input[1], weight * scale.reshape(-1, *([1] * (weight.ndim - 1))))
        b_name = g.add_const(producer.input[2] if has_bias else f"{producer.name or producer.output[0]}_bias",
                             bias * scale + shift)
        producer.input[1] = w_name
        if len(producer.input) > 2:
            producer.input[2] = b_name
        else:
            producer.input.append(b_name)
    else:
        # BN(x) * c + d == BN with gamma * c and beta * c + d (mean, variance and epsilon kept)
        producer.input[1] = g.add_const(producer.input[1], weight * scale)
        producer.input[2] = g.add_const(producer.input[2], bias * scale + shift)
    g.remove(node, producer)
    return True


def fold_affine_layers(model: onnx.ModelProto) -> None:
    """Fold BatchNormalization into the Conv it alone reads, and Mul / Add by a per-channel
    constant into the Conv or BatchNormalization it alone reads (in float64, then float32)."""
    candidates = ("BatchNormalization", "Mul", "Add")
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    if not any(n.op_type in candidates and any(producers.get(i) in _AFFINE_PRODUCERS for i in n.input)
               for n in model.graph.node):
        return
    g = _Graph(model)
    folded = False
    for node in list(g.graph.node):
        if node.op_type in candidates:
            folded |= _fold_one(g, node)
    if folded:
        g.drop_unused_initializers()
