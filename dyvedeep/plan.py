"""Plan: turn an ONNX model (as the converters write it) into the engine's graph.

The plan is a list of :class:`Layer` in execution order with static per-image shapes, weights as
contiguous float32 arrays, fused ReLUs, and the exact dense op count of every layer. It also
applies one exact rewrite: ``Conv -> MaxPool -> Relu`` becomes ``Conv+Relu -> MaxPool``
(max and ReLU commute bit for bit), so that the knobs that need a ReLU (SPET, SDSS) see it.

Op accounting (scalar operations per image; ``docs/ops.md`` has the table):
conv / fully connected: 2 per MAC, + 1 per output for the bias, + 1 per output for a fused ReLU;
ReLU: 1 per element; max pooling: (window - 1) compares per output, average pooling:
(window - 1) adds + 1 divide per output (window = elements inside the input, counted exactly);
LRN: per element 2 per window element (square, add) + 4 (scale, shift, power, divide);
softmax: per row (F - 1) compares + 4F (subtract, exp, add, divide); Add / Mul / Div / Pow:
1 per element; Concat, Flatten, Reshape, Dropout: 0.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import DyveError
from .preprocess import LABELS_KEY, METADATA_KEY, Preprocess

SUPPORTED_OPS = (
    "Conv", "Gemm", "MatMul", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
    "LRN", "Concat", "Softmax", "Flatten", "Reshape", "Squeeze", "Dropout", "Identity",
    "Add", "Mul", "Div", "Pow", "Sub",
)


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
    ELTWISE = "eltwise"  # Add, Sub, Mul, Div, Pow with tensors and scalar constants

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
    relu: bool = False
    input_nonneg: bool = False
    dense_macs: int = 0
    dense_ops: int = 0
    nonzero_macs: int = 0

    @property
    def is_compute(self) -> bool:
        """Whether this layer has weights (conv or fully connected)."""
        return self.op in ("conv", "fc")


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
    model = load_onnx(path)
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts: dict[str, np.ndarray] = dict(inits)
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(_attr(node, "value"))
    for node in graph.node:
        if node.op_type not in SUPPORTED_OPS and node.op_type != "Constant":
            raise DyveError(f"{path}: unsupported ONNX op {node.op_type} (node {node.name or node.output[0]}); "
                            f"the engine runs {', '.join(SUPPORTED_OPS)}")
    real_inputs = [i for i in graph.input if i.name not in inits]
    if len(real_inputs) != 1 or len(graph.output) != 1:
        raise DyveError(f"{path}: the engine needs exactly one input and one output")
    shapes = _shapes(model, path)
    metadata = {p.key: p.value for p in model.metadata_props}
    preprocess = Preprocess.from_json(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None
    nonzero = json.loads(metadata.get("dyvedeep.nonzero_weights", "{}"))

    layers: list[Layer] = []
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        layer = _make_layer(node, shapes, consts, path)
        if layer is not None:
            layers.append(layer)
    layers = _fuse(layers, graph.output[0].name)
    _mark_nonneg(layers, real_inputs[0].name)
    for layer in layers:
        _count_dense(layer, nonzero)
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


def _const_input(node: onnx.NodeProto, index: int, consts: dict[str, np.ndarray], path: Path) -> np.ndarray:
    name = node.input[index]
    if name not in consts:
        raise DyveError(f"{path}: node {node.name or node.output[0]} ({node.op_type}) needs a constant input {name}")
    return consts[name]


def _make_layer(node: onnx.NodeProto, shapes: dict, consts: dict, path: Path) -> Layer | None:
    """One ONNX node -> one engine layer (or an alias layer for shape-only ops)."""
    op = node.op_type
    name = node.name or node.output[0]
    tensor_inputs = [i for i in node.input if i and i not in consts]
    in_shapes = [shapes[i] for i in tensor_inputs if i in shapes]
    out = node.output[0]
    if out not in shapes:
        raise DyveError(f"{path}: cannot infer the shape of {out} (node {name})")
    out_shape = shapes[out]
    base = dict(name=name, inputs=tensor_inputs, output=out, in_shapes=in_shapes, out_shape=out_shape)

    if op == "Conv":
        w = np.ascontiguousarray(_const_input(node, 1, consts, path), dtype=np.float32)
        b = (np.ascontiguousarray(_const_input(node, 2, consts, path), dtype=np.float32)
             if len(node.input) > 2 and node.input[2] else np.zeros(w.shape[0], np.float32))
        if w.ndim != 4:
            raise DyveError(f"{path}: Conv {name} must be 2-D (weight of rank 4), got rank {w.ndim}")
        if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise DyveError(f"{path}: Conv {name}: auto_pad is not supported; use explicit pads")
        pads = list(_attr(node, "pads", [0, 0, 0, 0]))
        attrs = dict(kernel=(int(w.shape[2]), int(w.shape[3])),
                     stride=tuple(_attr(node, "strides", [1, 1])),
                     pads=tuple(int(p) for p in pads),
                     dilation=tuple(_attr(node, "dilations", [1, 1])),
                     group=int(_attr(node, "group", 1)))
        if in_shapes[0][0] != w.shape[1] * attrs["group"]:
            raise DyveError(f"{path}: Conv {name}: weight {tuple(w.shape)} does not fit input {in_shapes[0]} "
                            f"with group {attrs['group']}")
        return Layer(op=Op.CONV, attrs=attrs, weight=w, bias=b, **base)
    if op in ("Gemm", "MatMul"):
        w = np.asarray(_const_input(node, 1, consts, path), dtype=np.float32)
        if op == "Gemm":
            alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
            if _attr(node, "transA", 0):
                raise DyveError(f"{path}: Gemm {name} with transA=1 is not supported")
            if not _attr(node, "transB", 0):
                w = w.T
            w = w * np.float32(alpha) if alpha != 1.0 else w
            b = (np.asarray(_const_input(node, 2, consts, path), dtype=np.float32).reshape(-1) * np.float32(beta)
                 if len(node.input) > 2 and node.input[2] else np.zeros(w.shape[0], np.float32))
        else:
            w = w.T
            b = np.zeros(w.shape[0], np.float32)
        if b.size == 1 and w.shape[0] != 1:
            b = np.full(w.shape[0], b.item(), np.float32)
        return Layer(op=Op.FC, weight=np.ascontiguousarray(w), bias=np.ascontiguousarray(b), **base)
    if op == "Relu":
        return Layer(op=Op.RELU, **base)
    if op in ("MaxPool", "AveragePool"):
        if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise DyveError(f"{path}: {op} {name}: auto_pad is not supported; use explicit pads")
        kernel = tuple(int(k) for k in _attr(node, "kernel_shape"))
        attrs = dict(kernel=kernel,
                     stride=tuple(int(s) for s in _attr(node, "strides", [1, 1])),
                     pads=tuple(int(p) for p in _attr(node, "pads", [0, 0, 0, 0])),
                     dilation=tuple(int(d) for d in _attr(node, "dilations", [1, 1])),
                     count_include_pad=int(_attr(node, "count_include_pad", 0)))
        if attrs["dilation"] != (1, 1):
            raise DyveError(f"{path}: {op} {name}: dilated pooling is not supported")
        return Layer(op=Op.MAXPOOL if op == "MaxPool" else Op.AVGPOOL, attrs=attrs, **base)
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        return Layer(op=Op.GAP if op == "GlobalAveragePool" else Op.GMP, **base)
    if op == "LRN":
        attrs = dict(size=int(_attr(node, "size")), alpha=float(_attr(node, "alpha", 1e-4)),
                     beta=float(_attr(node, "beta", 0.75)), bias=float(_attr(node, "bias", 1.0)))
        return Layer(op=Op.LRN, attrs=attrs, **base)
    if op == "Concat":
        axis = int(_attr(node, "axis"))
        if axis not in (1, 1 - (len(out_shape) + 1)):
            raise DyveError(f"{path}: Concat {name} on axis {axis}: only channel concat (axis 1) is supported")
        return Layer(op=Op.CONCAT, **base)
    if op == "Softmax":
        axis = int(_attr(node, "axis", -1))
        if len(out_shape) != 1 and axis not in (1,):
            raise DyveError(f"{path}: Softmax {name} over axis {axis} of a {len(out_shape) + 1}-D tensor is not supported")
        return Layer(op=Op.SOFTMAX, **base)
    if op in ("Flatten", "Reshape", "Squeeze", "Dropout", "Identity"):
        return Layer(op=Op.ALIAS, **base)
    if op in ("Add", "Mul", "Div", "Pow", "Sub"):
        scalars = [float(consts[i].reshape(-1)[0]) if i in consts and consts[i].size == 1 else None for i in node.input]
        for i in node.input:
            if i in consts and consts[i].size != 1:
                raise DyveError(f"{path}: {op} {name}: only scalar constants are supported")
        # in_shapes must follow the tensor inputs; record which inputs are scalars.
        return Layer(op=Op.ELTWISE, attrs=dict(kind=op.lower(), scalars=scalars, order=list(node.input)), **base)
    raise DyveError(f"{path}: unsupported ONNX op {op} (node {name})")


def _fuse(layers: list[Layer], graph_output: str) -> list[Layer]:
    """Fuse ReLUs into conv / fc, and rewrite Conv -> MaxPool -> Relu as Conv+Relu -> MaxPool."""
    consumers: dict[str, list[Layer]] = {}
    for layer in layers:
        for i in layer.inputs:
            consumers.setdefault(i, []).append(layer)

    def sole_consumer(tensor: str) -> Layer | None:
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor != graph_output else None

    removed: set[int] = set()
    for layer in layers:
        if not layer.is_compute or layer.relu:
            continue
        nxt = sole_consumer(layer.output)
        if nxt is not None and nxt.op == "relu":
            layer.relu = True
            removed.add(id(nxt))
            layer.output = nxt.output  # consumers of the ReLU's output now read the conv directly
            continue
        if layer.op == "conv" and nxt is not None and nxt.op == "maxpool":
            after = sole_consumer(nxt.output)
            if after is not None and after.op == "relu":
                layer.relu = True
                removed.add(id(after))
                # the pool now reads the conv (which applies the ReLU) and writes the ReLU's output
                nxt.output = after.output
    return [layer for layer in layers if id(layer) not in removed]


def _mark_nonneg(layers: list[Layer], input_name: str) -> None:
    """Record for each layer whether its inputs are known to be >= 0 (after a ReLU, and layers
    that keep the sign: pooling, views, concatenation, LRN)."""
    nonneg: dict[str, bool] = {input_name: False}
    for layer in layers:
        layer.input_nonneg = all(nonneg.get(i, False) for i in layer.inputs) if layer.inputs else False
        if layer.op == "relu" or (layer.is_compute and layer.relu):
            nonneg[layer.output] = True
        elif layer.op in ("maxpool", "avgpool", "gap", "gmp", "alias", "concat"):
            nonneg[layer.output] = layer.input_nonneg
        elif layer.op == "lrn":  # x / (bias + ...)^beta keeps the sign of x when bias > 0
            nonneg[layer.output] = layer.input_nonneg and layer.attrs["bias"] > 0
        elif layer.op == "softmax":
            nonneg[layer.output] = True
        else:
            nonneg[layer.output] = False


def _count_dense(layer: Layer, nonzero: dict[str, int]) -> None:
    """Exact dense MACs and scalar ops of one layer, per image."""
    out_elems = int(np.prod(layer.out_shape)) if layer.out_shape else 0
    if layer.op == "conv":
        oc, ho, wo = layer.out_shape
        w = layer.weight
        layer.dense_macs = oc * ho * wo * int(np.prod(w.shape[1:]))
        nnz = int(nonzero.get(layer.name, np.count_nonzero(w)))
        layer.nonzero_macs = ho * wo * nnz
        layer.dense_ops = 2 * layer.dense_macs + out_elems * (1 + int(layer.relu))
    elif layer.op == "fc":
        w = layer.weight
        layer.dense_macs = int(w.size)
        nnz = int(nonzero.get(layer.name, np.count_nonzero(w)))
        layer.nonzero_macs = nnz
        layer.dense_ops = 2 * layer.dense_macs + out_elems * (1 + int(layer.relu))
    elif layer.op in ("relu", "eltwise"):
        layer.dense_ops = out_elems
    elif layer.op in ("maxpool", "avgpool"):
        c, h, w_ = layer.in_shapes[0]
        _, ho, wo = layer.out_shape
        kh, kw = layer.attrs["kernel"]
        sh, sw = layer.attrs["stride"]
        pt, pl = layer.attrs["pads"][0], layer.attrs["pads"][1]
        window = np.outer(_window_counts(h, kh, sh, pt, ho), _window_counts(w_, kw, sw, pl, wo))
        if layer.op == "maxpool":
            layer.dense_ops = c * int(np.sum(np.maximum(window - 1, 0)))
        else:
            layer.dense_ops = c * int(np.sum(window))  # (window - 1) adds + 1 divide
    elif layer.op in ("gap", "gmp"):
        c, h, w_ = layer.in_shapes[0]
        layer.dense_ops = c * (h * w_ if layer.op == "gap" else h * w_ - 1)
    elif layer.op == "lrn":
        c = layer.in_shapes[0][0]
        hw = int(np.prod(layer.in_shapes[0][1:]))
        size = layer.attrs["size"]
        lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
        taps = sum(min(c - 1, ch + hi) - max(0, ch - lo) + 1 for ch in range(c))
        layer.dense_ops = hw * (2 * taps + 4 * c)
    elif layer.op == "softmax":
        f = layer.out_shape[0]
        rows = out_elems // f
        layer.dense_ops = rows * ((f - 1) + 4 * f)
    else:
        layer.dense_ops = 0
