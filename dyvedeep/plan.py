"""Plan: turn an ONNX model (as the converters write it) into the engine's graph.

The plan is a list of :class:`Layer` in execution order with static per-image shapes, weights as
contiguous float32 arrays, folded ReLUs (a conv or fully-connected layer applies the ReLU that
alone reads it), and the exact dense op count of every layer. It also applies one exact rewrite:
``Conv -> MaxPool -> Relu`` becomes ``Conv+Relu -> MaxPool`` (max and ReLU commute bit for bit),
so that the knobs that need a ReLU (SPET, SDSS) see it.

Each engine op is one entry of :data:`OP_RULES` (registered with :func:`op_rule`, as onnx2torch
registers converters): the ONNX ops it parses, its parsing, its dense count and whether its
output is known to be >= 0. Adding an op: an entry here and a runner in ``engine.core.RUNNERS``.

Op accounting (scalar operations per image; ``docs/ops.md`` has the table):
conv / fully connected: 2 per MAC, + 1 per output for the bias, + 1 per output for a folded ReLU;
ReLU: 1 per element; max pooling: (window - 1) compares per output, average pooling:
(window - 1) adds + 1 divide per output (window = elements inside the input, counted exactly);
LRN: per element 2 per window element (square, add) + 4 (scale, shift, power, divide);
softmax: per row (F - 1) compares + 4F (subtract, exp, add, divide); Add / Mul / Div / Pow:
1 per element; BatchNormalization (not folded into a conv): 2 per element (multiply, add) + 1 per
element for a folded ReLU; Sum of n inputs: n - 1 per element; Concat, Transpose, Flatten,
Reshape, Dropout: 0.

A model exported elsewhere is first rewritten by :func:`dyvedeep.convert.onnx_import.import_model`
(initializers listed as inputs, constant subgraphs, BatchNormalization and per-channel Mul / Add
folded into the conv before them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .convert.onnx_import import import_model
from .errors import DyveError
from .metadata_keys import LABELS_KEY, NONZERO_KEY, PREPROCESS_KEY
from .preprocess import Preprocess

class Op(str, Enum):
    """The engine's ops (a layer's ``op``); equal to their names as strings."""

    CONV = "conv"
    FC = "fc"
    RELU = "relu"
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"
    GAP = "gap"  # global average pooling
    GMP = "gmp"  # global max pooling
    LRN = "lrn"
    CONCAT = "concat"
    SOFTMAX = "softmax"
    ALIAS = "alias"  # a view of its input (Flatten, Reshape, Squeeze, Dropout, Identity)
    ELTWISE = "eltwise"  # Add, Sub, Mul, Div, Pow with tensors and constants (broadcast)
    BATCHNORM = "batchnorm"  # BatchNormalization not folded into a conv: per-channel scale + shift
    SUM = "sum"  # Sum: an n-ary Add of tensors of one shape
    TRANSPOSE = "transpose"  # a permutation of the per-image axes (ShuffleNet's channel shuffle)

    __str__ = str.__str__
    __format__ = str.__format__


@dataclass
class Layer:
    """One step of the engine graph, with per-image shapes (batch dimension dropped)."""

    name: str
    op: Op
    inputs: list[str]
    output: str
    in_shapes: list[tuple[int, ...]]
    out_shape: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    relu: bool = False  # a folded ReLU
    input_nonneg: bool = False
    dense_macs: int = 0
    dense_ops: int = 0
    nonzero_macs: int = 0

    @property
    def is_compute(self) -> bool:
        """Whether this layer has weights (conv or fully connected)."""
        return self.op in ("conv", "fc")

    @property
    def has_zero_weights(self) -> bool:
        """Whether some of its weights are 0 (a pruned layer): its MACs on non-zero weights fall
        short of its MACs."""
        return self.nonzero_macs < self.dense_macs


@dataclass
class Plan:
    """The engine graph of one model."""

    path: Path
    layers: list[Layer]
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    output_shape: tuple[int, ...]
    preprocess: Preprocess | None
    labels: str | None
    metadata: dict[str, str]

    @property
    def dense_macs(self) -> int:
        """MACs per image of the dense network."""
        return sum(layer.dense_macs for layer in self.layers)

    @property
    def dense_ops(self) -> int:
        """Scalar ops per image of the dense network."""
        return sum(layer.dense_ops for layer in self.layers)

    @property
    def nonzero_ops(self) -> int:
        """Scalar ops per image counting only MACs on non-zero weights (Deep Compression)."""
        return sum(layer.dense_ops - 2 * (layer.dense_macs - layer.nonzero_macs) for layer in self.layers)

    def layer(self, name: str) -> Layer:
        """The layer called ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def compute_layers(self) -> list[Layer]:
        """Conv and fully-connected layers, in order."""
        return [layer for layer in self.layers if layer.is_compute]


# ----------------------------------------------------------------------------- loading


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX file; a missing or corrupt file is a one-line DyveError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DyveError(f"{path}: no such model file")
    try:
        return onnx.load(str(path))
    except Exception as err:  # protobuf raises several types on corrupt input
        raise DyveError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from None


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _shapes(model: onnx.ModelProto, path: Path) -> dict[str, tuple[int, ...]]:
    """Per-image shape of every tensor, by ONNX shape inference with batch 1."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inp = m.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    dims[0].ClearField("dim_param")
    dims[0].dim_value = 1
    for d in list(dims)[1:]:
        if not d.HasField("dim_value"):
            raise DyveError(f"{path}: input {inp.name} needs fixed C, H, W dimensions")
    del m.graph.value_info[:]
    m.graph.output[0].type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    except Exception as err:
        raise DyveError(f"{path}: shape inference failed: {err}") from None
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        dd = vi.type.tensor_type.shape.dim
        if dd and all(d.HasField("dim_value") for d in dd):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dd)[1:]
    return shapes


def _window_counts(size: int, kernel: int, stride: int, pad_begin: int, out: int, dilation: int = 1) -> np.ndarray:
    """Number of window taps inside the input, per output index along one axis."""
    counts = np.zeros(out, dtype=np.int64)
    for o in range(out):
        start = o * stride - pad_begin
        taps = start + dilation * np.arange(kernel)
        counts[o] = int(np.count_nonzero((taps >= 0) & (taps < size)))
    return counts


def build_plan(path: str | Path) -> Plan:
    """Read ``path`` and build its engine graph; unsupported ops raise a one-line DyveError."""
    path = Path(path)
    model = import_model(load_onnx(path), path)
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts: dict[str, np.ndarray] = dict(inits)
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(_attr(node, "value"))
    for node in graph.node:
        if node.op_type not in ONNX_RULES and node.op_type != "Constant":
            raise DyveError(f"{path}: unsupported ONNX op {node.op_type} (node {node.name or node.output[0]}); "
                            f"the engine runs {', '.join(ONNX_RULES)}")
    real_inputs = [i for i in graph.input if i.name not in inits]
    if len(real_inputs) != 1 or len(graph.output) != 1:
        raise DyveError(f"{path}: the engine needs exactly one input and one output")
    shapes = _shapes(model, path)
    metadata = {p.key: p.value for p in model.metadata_props}
    preprocess = Preprocess.from_json(metadata[PREPROCESS_KEY]) if PREPROCESS_KEY in metadata else None
    nonzero = json.loads(metadata.get(NONZERO_KEY, "{}"))

    layers: list[Layer] = []
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        layers.append(_make_layer(node, shapes, consts, path))
    layers = _fold_relus(layers, graph.output[0].name)
    _mark_nonneg(layers, real_inputs[0].name)
    for layer in layers:
        layer.dense_macs, layer.dense_ops, layer.nonzero_macs = OP_RULES[layer.op].count(layer, nonzero)
    return Plan(
        path=path,
        layers=layers,
        input_name=real_inputs[0].name,
        input_shape=shapes[real_inputs[0].name],
        output_name=graph.output[0].name,
        output_shape=shapes.get(graph.output[0].name, ()),
        preprocess=preprocess,
        labels=metadata.get(LABELS_KEY),
        metadata=metadata,
    )


@dataclass
class Node:
    """One ONNX node as an op's parser sees it."""

    node: onnx.NodeProto
    name: str
    consts: dict[str, np.ndarray]
    path: Path
    in_shapes: list[tuple[int, ...]]
    out_shape: tuple[int, ...]

    @property
    def op_type(self) -> str:
        return self.node.op_type

    def attr(self, name: str, default: Any = None) -> Any:
        return _attr(self.node, name, default)

    def const(self, index: int) -> np.ndarray:
        """The node's constant input ``index`` (a one-line DyveError when it is not constant)."""
        name = self.node.input[index]
        if name not in self.consts:
            raise DyveError(f"{self.path}: node {self.name} ({self.op_type}) needs a constant input {name}")
        return self.consts[name]

    def has_input(self, index: int) -> bool:
        return len(self.node.input) > index and bool(self.node.input[index])

    def error(self, message: str) -> DyveError:
        return DyveError(f"{self.path}: {self.op_type} {self.name}: {message}")


#: The dense count of a layer: (MACs, scalar ops, MACs on non-zero weights) per image.
Count = tuple[int, int, int]


@dataclass(frozen=True)
class OpRule:
    """One engine op: the ONNX ops it parses, its parser (node -> the layer's attrs, weight and
    bias), its dense count (docs/ops.md) and whether its output is known to be >= 0."""

    op: Op
    onnx_types: tuple[str, ...]
    parse: Callable[[Node], dict[str, Any]]
    count: Callable[[Layer, dict[str, int]], Count]
    output_nonneg: Callable[[Layer], bool]


OP_RULES: dict[Op, OpRule] = {}
ONNX_RULES: dict[str, OpRule] = {}  # ONNX op type -> its rule, in the order registered


def op_rule(op: Op, *onnx_types: str, count: Callable[[Layer, dict[str, int]], Count],
            output_nonneg: Callable[[Layer], bool]) -> Callable:
    """Register the decorated parser as ``op``'s rule for ``onnx_types``."""
    def register(parse: Callable[[Node], dict[str, Any]]) -> Callable[[Node], dict[str, Any]]:
        rule = OpRule(op, onnx_types, parse, count, output_nonneg)
        OP_RULES[op] = rule
        ONNX_RULES.update(dict.fromkeys(onnx_types, rule))
        return parse
    return register


def _make_layer(node: onnx.NodeProto, shapes: dict, consts: dict, path: Path) -> Layer:
    """One ONNX node -> one engine layer (an alias layer for shape-only ops)."""
    name = node.name or node.output[0]
    tensor_inputs = [i for i in node.input if i and i not in consts]
    in_shapes = [shapes[i] for i in tensor_inputs if i in shapes]
    out = node.output[0]
    if out not in shapes:
        raise DyveError(f"{path}: cannot infer the shape of {out} (node {name})")
    rule = ONNX_RULES[node.op_type]
    fields = rule.parse(Node(node, name, consts, path, in_shapes, shapes[out]))
    return Layer(name=name, op=rule.op, inputs=tensor_inputs, output=out, in_shapes=in_shapes,
                 out_shape=shapes[out], **fields)


# ----------------------------------------------------------------------------- counts and signs


def _elements(layer: Layer) -> int:
    return int(np.prod(layer.out_shape)) if layer.out_shape else 0


def _count_weighted(layer: Layer, nonzero: dict[str, int]) -> Count:
    """conv / fully connected: 2 per MAC, 1 per output (bias), 1 per output (folded ReLU)."""
    w = layer.weight
    nnz = int(nonzero.get(layer.name, np.count_nonzero(w)))
    if layer.op == Op.CONV:
        oc, ho, wo = layer.out_shape
        macs, nonzero_macs = oc * ho * wo * int(np.prod(w.shape[1:])), ho * wo * nnz
    else:
        macs, nonzero_macs = int(w.size), nnz
    return macs, 2 * macs + _elements(layer) * (1 + int(layer.relu)), nonzero_macs


def _count_per_element(layer: Layer, nonzero: dict[str, int]) -> Count:
    """ReLU, Add / Sub / Mul / Div / Pow: 1 per element."""
    return 0, _elements(layer), 0


def _count_none(layer: Layer, nonzero: dict[str, int]) -> Count:
    """Concat, Transpose and views: 0."""
    return 0, 0, 0


def _count_pool(layer: Layer, nonzero: dict[str, int]) -> Count:
    """Max pooling: (window - 1) compares per output; average: (window - 1) adds + 1 divide
    (window = taps inside the input)."""
    c, h, w_ = layer.in_shapes[0]
    _, ho, wo = layer.out_shape
    kh, kw = layer.attrs["kernel"]
    sh, sw = layer.attrs["stride"]
    pt, pl = layer.attrs["pads"][0], layer.attrs["pads"][1]
    window = np.outer(_window_counts(h, kh, sh, pt, ho), _window_counts(w_, kw, sw, pl, wo))
    if layer.op == Op.MAXPOOL:
        return 0, c * int(np.sum(np.maximum(window - 1, 0))), 0
    return 0, c * int(np.sum(window)), 0


def _count_global_pool(layer: Layer, nonzero: dict[str, int]) -> Count:
    """Global average: H*W per channel (adds + divide); global max: H*W - 1 compares."""
    c, h, w_ = layer.in_shapes[0]
    return 0, c * (h * w_ if layer.op == Op.GAP else h * w_ - 1), 0


def _count_lrn(layer: Layer, nonzero: dict[str, int]) -> Count:
    """Per element: 2 per window tap (square, add) + 4 (scale, shift, power, divide)."""
    c = layer.in_shapes[0][0]
    hw = int(np.prod(layer.in_shapes[0][1:]))
    size = layer.attrs["size"]
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    taps = sum(min(c - 1, ch + hi) - max(0, ch - lo) + 1 for ch in range(c))
    return 0, hw * (2 * taps + 4 * c), 0


def _count_softmax(layer: Layer, nonzero: dict[str, int]) -> Count:
    """Per row: (F - 1) compares + 4 F (subtract, exp, add, divide)."""
    f = layer.out_shape[0]
    rows = _elements(layer) // f
    return 0, rows * ((f - 1) + 4 * f), 0


def _count_batchnorm(layer: Layer, nonzero: dict[str, int]) -> Count:
    """Per element: 2 (multiply, add) + 1 for a folded ReLU."""
    return 0, _elements(layer) * (2 + int(layer.relu)), 0


def _count_sum(layer: Layer, nonzero: dict[str, int]) -> Count:
    """n inputs: n - 1 adds per element."""
    return 0, _elements(layer) * (len(layer.inputs) - 1), 0


def _keeps_sign(layer: Layer) -> bool:
    return layer.input_nonneg


def _nonneg(layer: Layer) -> bool:
    return True


def _signed(layer: Layer) -> bool:
    return False


def _relu_folded(layer: Layer) -> bool:
    return layer.relu


# ----------------------------------------------------------------------------- the ops


def _no_auto_pad(node: Node) -> None:
    if node.attr("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise node.error("auto_pad is not supported; use explicit pads")


@op_rule(Op.CONV, "Conv", count=_count_weighted, output_nonneg=_relu_folded)
def _conv(node: Node) -> dict[str, Any]:
    w = np.ascontiguousarray(node.const(1), dtype=np.float32)
    b = (np.ascontiguousarray(node.const(2), dtype=np.float32) if node.has_input(2)
         else np.zeros(w.shape[0], np.float32))
    if w.ndim != 4:
        raise DyveError(f"{node.path}: Conv {node.name} must be 2-D (weight of rank 4), got rank {w.ndim}")
    _no_auto_pad(node)
    attrs = dict(kernel=(int(w.shape[2]), int(w.shape[3])),
                 stride=tuple(node.attr("strides", [1, 1])),
                 pads=tuple(int(p) for p in node.attr("pads", [0, 0, 0, 0])),
                 dilation=tuple(node.attr("dilations", [1, 1])),
                 group=int(node.attr("group", 1)))
    if node.in_shapes[0][0] != w.shape[1] * attrs["group"]:
        raise node.error(f"weight {tuple(w.shape)} does not fit input {node.in_shapes[0]} with group {attrs['group']}")
    return dict(attrs=attrs, weight=w, bias=b)


@op_rule(Op.FC, "Gemm", "MatMul", count=_count_weighted, output_nonneg=_relu_folded)
def _fc(node: Node) -> dict[str, Any]:
    w = np.asarray(node.const(1), dtype=np.float32)
    if node.op_type == "Gemm":
        alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
        if node.attr("transA", 0):
            raise DyveError(f"{node.path}: Gemm {node.name} with transA=1 is not supported")
        if not node.attr("transB", 0):
            w = w.T
        w = w * np.float32(alpha) if alpha != 1.0 else w
        b = (np.asarray(node.const(2), dtype=np.float32).reshape(-1) * np.float32(beta) if node.has_input(2)
             else np.zeros(w.shape[0], np.float32))
    else:
        w = w.T
        b = np.zeros(w.shape[0], np.float32)
    if b.size == 1 and w.shape[0] != 1:
        b = np.full(w.shape[0], b.item(), np.float32)
    return dict(weight=np.ascontiguousarray(w), bias=np.ascontiguousarray(b))


@op_rule(Op.RELU, "Relu", count=_count_per_element, output_nonneg=_nonneg)
def _relu(node: Node) -> dict[str, Any]:
    return {}


def _pool(node: Node) -> dict[str, Any]:
    _no_auto_pad(node)
    attrs = dict(kernel=tuple(int(k) for k in node.attr("kernel_shape")),
                 stride=tuple(int(s) for s in node.attr("strides", [1, 1])),
                 pads=tuple(int(p) for p in node.attr("pads", [0, 0, 0, 0])),
                 dilation=tuple(int(d) for d in node.attr("dilations", [1, 1])),
                 count_include_pad=int(node.attr("count_include_pad", 0)))
    if attrs["dilation"] != (1, 1):
        raise node.error("dilated pooling is not supported")
    return dict(attrs=attrs)


op_rule(Op.MAXPOOL, "MaxPool", count=_count_pool, output_nonneg=_keeps_sign)(_pool)
op_rule(Op.AVGPOOL, "AveragePool", count=_count_pool, output_nonneg=_keeps_sign)(_pool)


@op_rule(Op.GMP, "GlobalMaxPool", count=_count_global_pool, output_nonneg=_keeps_sign)
@op_rule(Op.GAP, "GlobalAveragePool", count=_count_global_pool, output_nonneg=_keeps_sign)
def _global_pool(node: Node) -> dict[str, Any]:
    return {}


@op_rule(Op.LRN, "LRN", count=_count_lrn,
         output_nonneg=lambda layer: layer.input_nonneg and layer.attrs["bias"] > 0)  # x / (bias + ...)^beta
def _lrn(node: Node) -> dict[str, Any]:
    return dict(attrs=dict(size=int(node.attr("size")), alpha=float(node.attr("alpha", 1e-4)),
                           beta=float(node.attr("beta", 0.75)), bias=float(node.attr("bias", 1.0))))


@op_rule(Op.CONCAT, "Concat", count=_count_none, output_nonneg=_keeps_sign)
def _concat(node: Node) -> dict[str, Any]:
    axis = int(node.attr("axis"))
    if axis not in (1, 1 - (len(node.out_shape) + 1)):
        raise DyveError(f"{node.path}: Concat {node.name} on axis {axis}: only channel concat (axis 1) is supported")
    return {}


@op_rule(Op.SOFTMAX, "Softmax", count=_count_softmax, output_nonneg=_nonneg)
def _softmax(node: Node) -> dict[str, Any]:
    axis = int(node.attr("axis", -1))
    if len(node.out_shape) != 1 and axis not in (1,):
        raise DyveError(f"{node.path}: Softmax {node.name} over axis {axis} of a {len(node.out_shape) + 1}-D tensor "
                        f"is not supported")
    return {}


@op_rule(Op.ALIAS, "Flatten", "Reshape", "Squeeze", "Dropout", "Identity", count=_count_none,
         output_nonneg=_keeps_sign)
def _alias(node: Node) -> dict[str, Any]:
    return {}


@op_rule(Op.ELTWISE, "Add", "Mul", "Div", "Pow", "Sub", count=_count_per_element, output_nonneg=_signed)
def _eltwise(node: Node) -> dict[str, Any]:
    consts = node.consts
    inputs = node.node.input
    scalars = [float(consts[i].reshape(-1)[0]) if i in consts and consts[i].size == 1 else None for i in inputs]
    arrays = [_broadcast_constant(node, consts[i]) if i in consts and consts[i].size != 1 else None
              for i in inputs]
    # in_shapes follow the tensor inputs; scalars and arrays record which inputs are constants
    return dict(attrs=dict(kind=node.op_type.lower(), scalars=scalars, arrays=arrays, order=list(inputs)))


def _broadcast_constant(node: Node, array: np.ndarray) -> np.ndarray:
    """A constant operand of an elementwise op per image (its batch axis of 1 dropped), checked
    to broadcast to the output (ONNX broadcasting is numpy's)."""
    array = np.asarray(array, dtype=np.float32)
    rank = len(node.out_shape)
    if array.ndim == rank + 1:
        if array.shape[0] != 1:
            raise node.error(f"constant of shape {array.shape} varies along the batch axis")
        array = array[0]
    try:
        shape = np.broadcast_shapes(array.shape, node.out_shape)
    except ValueError:
        shape = None
    if array.ndim > rank or shape != tuple(node.out_shape):
        raise node.error(f"constant of shape {array.shape} does not broadcast to the output {node.out_shape}")
    return np.ascontiguousarray(array)


@op_rule(Op.BATCHNORM, "BatchNormalization", count=_count_batchnorm, output_nonneg=_relu_folded)
def _batchnorm(node: Node) -> dict[str, Any]:
    gamma, beta, mean, var = (np.asarray(node.const(i), dtype=np.float64).reshape(-1) for i in range(1, 5))
    if node.attr("training_mode", 0) or node.attr("spatial", 1) != 1:
        raise node.error("only inference with per-channel statistics is supported (training_mode=0, spatial=1)")
    if len(node.out_shape) < 1 or not gamma.size == beta.size == mean.size == var.size == node.out_shape[0]:
        raise node.error(f"parameters of {gamma.size} channels do not fit the input {node.in_shapes[0]}")
    eps = np.float64(np.float32(node.attr("epsilon", 1e-5)))
    scale = gamma / np.sqrt(var + eps)
    # y = x * scale + shift per channel, both computed once in float64
    return dict(weight=scale.astype(np.float32), bias=(beta - mean * scale).astype(np.float32))


@op_rule(Op.SUM, "Sum", count=_count_sum, output_nonneg=_keeps_sign)
def _sum(node: Node) -> dict[str, Any]:
    if any(i in node.consts for i in node.node.input) or any(s != node.out_shape for s in node.in_shapes):
        raise node.error("only a Sum of tensors of one shape is supported")
    return {}


@op_rule(Op.TRANSPOSE, "Transpose", count=_count_none, output_nonneg=_keeps_sign)
def _transpose(node: Node) -> dict[str, Any]:
    rank = len(node.out_shape) + 1
    perm = [int(p) for p in node.attr("perm", list(range(rank))[::-1])]
    if sorted(perm) != list(range(rank)) or perm[0] != 0:
        raise node.error(f"perm {perm}: only permutations that keep the batch axis first are supported")
    return dict(attrs=dict(perm=tuple(p - 1 for p in perm[1:])))


# ----------------------------------------------------------------------------- graph rewrites


def _fold_relus(layers: list[Layer], graph_output: str) -> list[Layer]:
    """Fold ReLUs into conv / fc / batchnorm, and rewrite Conv -> MaxPool -> Relu as
    Conv+Relu -> MaxPool."""
    consumers: dict[str, list[Layer]] = {}
    for layer in layers:
        for i in layer.inputs:
            consumers.setdefault(i, []).append(layer)

    def sole_consumer(tensor: str) -> Layer | None:
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor != graph_output else None

    removed: set[int] = set()
    for layer in layers:
        if not (layer.is_compute or layer.op == Op.BATCHNORM) or layer.relu:
            continue
        nxt = sole_consumer(layer.output)
        if nxt is not None and nxt.op == Op.RELU:
            layer.relu = True
            removed.add(id(nxt))
            layer.output = nxt.output  # consumers of the ReLU's output now read the conv directly
            continue
        if layer.op == Op.CONV and nxt is not None and nxt.op == Op.MAXPOOL:
            after = sole_consumer(nxt.output)
            if after is not None and after.op == Op.RELU:
                layer.relu = True
                removed.add(id(after))
                # the pool now reads the conv (which applies the ReLU) and writes the ReLU's output
                nxt.output = after.output
    return [layer for layer in layers if id(layer) not in removed]


def _mark_nonneg(layers: list[Layer], input_name: str) -> None:
    """Record for each layer whether its inputs are known to be >= 0 (its op's output_nonneg)."""
    nonneg: dict[str, bool] = {input_name: False}
    for layer in layers:
        layer.input_nonneg = all(nonneg.get(i, False) for i in layer.inputs) if layer.inputs else False
        nonneg[layer.output] = bool(OP_RULES[layer.op].output_nonneg(layer))
