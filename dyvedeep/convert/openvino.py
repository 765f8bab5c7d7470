"""OpenVINO IR (``.xml`` topology + ``.bin`` weights, IR v10/v11, FP16 or FP32) to ONNX.

Covers the operations of Caffe-style classification nets such as SqueezeNet v1.1 as the Model
Optimizer writes them: Parameter, Const (+ Convert decompressing FP16 weights to float32),
Convolution / GroupConvolution followed by an Add of the bias (fused back into one Conv), Add,
ReLU, MaxPool / AvgPool (``rounding_type`` ceil and ``auto_pad`` reproduced with explicit pads),
Concat, ReduceMean / ReduceMax over H, W (global pooling), SoftMax, Reshape / Squeeze /
Unsqueeze, Result. Each IR operation type has one function in :data:`IR_CONVERTERS`. Nodes and
weights are named after the Caffe layers where the IR keeps their names (``conv1``,
``fire2/squeeze1x1``, ...), else after the IR layers.
"""
from __future__ import annotations

import heapq
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import numpy as np

from ..errors import DyveError
from ..metadata_keys import SOURCE_KEY
from .onnx_graph import INPUT_NAME, ConvertedModel, GraphBuilder, Shape, source_metadata
from .pooling import PoolAxis, emit_max_pool

# IR element types -> numpy dtypes.
ELEMENT_TYPES: dict[str, type] = {
    "f16": np.float16, "f32": np.float32, "f64": np.float64, "i8": np.int8, "i16": np.int16,
    "i32": np.int32, "i64": np.int64, "u8": np.uint8, "u16": np.uint16, "u32": np.uint32,
    "u64": np.uint64, "boolean": np.bool_,
}
SUPPORTED_IR_VERSIONS = ("10", "11")
# Suffixes the Model Optimizer appends to Caffe layer names.
IR_NAME_SUFFIXES = ("/WithoutBiases",)


@dataclass
class IrPort:
    """One input or output port of an IR layer."""

    id: int
    dims: tuple[int, ...]
    names: list[str]


@dataclass
class IrLayer:
    """One ``<layer>`` of the IR."""

    id: int
    name: str
    type: str
    data: dict[str, str]
    inputs: list[IrPort]
    outputs: list[IrPort]

    def ints(self, key: str, default: list[int] | None = None) -> list[int]:
        """A comma-separated integer attribute of ``<data>``."""
        text = self.data.get(key)
        if text is None:
            if default is None:
                raise KeyError(key)
            return list(default)
        try:
            return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
        except ValueError:
            raise ValueError(f"attribute {key}={text!r} is not a comma-separated list of integers") from None

    @property
    def caffe_name(self) -> str:
        """The Caffe layer name the IR layer stands for (suffixes and sub-names stripped)."""
        name = self.name
        for suffix in IR_NAME_SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)]
        for port in self.outputs:
            for port_name in port.names:
                if name.startswith(port_name + "/"):
                    return port_name
        return name


@dataclass
class Tensor:
    """A graph tensor (as opposed to a constant folded at conversion time)."""

    name: str


Value = Union[Tensor, np.ndarray]


@dataclass
class IrContext:
    """State while converting one IR: the graph, the .bin, and edge bookkeeping."""

    graph: GraphBuilder
    xml_path: Path
    bin_path: Path
    weights: bytes | None
    consumers: dict[tuple[int, int], int]  # (layer id, output port id) -> number of readers
    tensor_consumers: dict[str, int] = field(default_factory=dict)  # tensor -> number of readers
    conv_nodes: dict[str, int] = field(default_factory=dict)  # bias-less Conv output -> node index
    input_name: str | None = None
    output_name: str | None = None

    def fail(self, layer: IrLayer, problem: str) -> DyveError:
        """A DyveError naming the .xml, the layer and its type."""
        return DyveError(f"{self.xml_path}: layer '{layer.name}' (type {layer.type}): {problem}")

    def tensor(self, layer: IrLayer, value: Value) -> str:
        """``value`` as a graph tensor name (constants become initializers)."""
        if isinstance(value, Tensor):
            return value.name
        return self.graph.add_initializer(f"{layer.caffe_name}_const", np.asarray(value))

    def check_shape(self, layer: IrLayer, tensor: str, port: int = 0) -> None:
        """Fail unless the per-sample shape of ``tensor`` equals the IR's output dims."""
        declared = layer.outputs[port].dims[1:]
        if tuple(self.graph.shape(tensor)) != tuple(declared):
            raise self.fail(layer, f"converted output shape {list(self.graph.shape(tensor))} differs "
                                   f"from the IR's {list(declared)}")


IrConverter = Callable[[IrLayer, list[Value], IrContext], list[Value]]
IR_CONVERTERS: dict[str, IrConverter] = {}


def converts(*layer_types: str) -> Callable[[IrConverter], IrConverter]:
    """Register the decorated function as the converter of the IR ``layer_types``."""

    def register(fn: IrConverter) -> IrConverter:
        for layer_type in layer_types:
            IR_CONVERTERS[layer_type] = fn
        return fn

    return register


# --------------------------------------------------------------------------- reading the IR


MAX_DIM = 1 << 31  # a dimension or id beyond this is a broken file, not a model


def int_field(xml_path: Path, where: str, name: str, text: str | None, low: int = 0) -> int:
    """The integer ``text`` of field ``name`` of ``where``; one line naming all three otherwise."""
    if text is None:
        raise DyveError(f"{xml_path}: {where}: {name} is missing")
    try:
        value = int(text.strip())
    except ValueError:
        raise DyveError(f"{xml_path}: {where}: {name} {text[:40]!r} is not an integer") from None
    if not low <= value < MAX_DIM:
        raise DyveError(f"{xml_path}: {where}: {name} {value} is out of range [{low}, {MAX_DIM})")
    return value


# The integer (list) attributes of <data> the converters read, and their lowest valid value.
INT_DATA_FIELDS = {"strides": 1, "dilations": 1, "kernel": 1, "pads_begin": 0, "pads_end": 0, "shape": 0,
                   "offset": 0, "size": 0, "axis": -8}


def check_data_fields(xml_path: Path, where: str, data: dict[str, str]) -> None:
    """Every integer attribute of a layer's <data> parsed once here, so that the converters
    read only well-formed values; one line naming the layer and the field otherwise."""
    for key, low in INT_DATA_FIELDS.items():
        text = data.get(key)
        if text is None:
            continue
        items = [v for v in text.replace(" ", "").split(",")]
        if key in ("strides", "dilations", "kernel") and items == [""]:
            raise DyveError(f"{xml_path}: {where}: {key} is empty")
        for item in items:
            if item != "" or key not in ("shape", "pads_begin", "pads_end"):
                int_field(xml_path, where, key, item, low)


def parse_port(element: ET.Element, xml_path: Path, where: str) -> IrPort:
    """An IR ``<port>`` element (its id and dims checked)."""
    names = [n.strip() for n in element.get("names", "").split(",") if n.strip()]
    port_id = int_field(xml_path, where, "port id", element.get("id", "0"))
    dims = tuple(int_field(xml_path, f"{where}, port {port_id}", "dim", d.text or "")
                 for d in element.findall("dim"))
    return IrPort(port_id, dims, names)


def read_ir(xml_path: Path) -> tuple[str, list[IrLayer], list[tuple[int, int, int, int]]]:
    """The net name, layers and edges (from layer, from port, to layer, to port) of an IR .xml."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as err:
        raise DyveError(f"{xml_path}: not a readable OpenVINO IR: {err}") from err
    if root.tag != "net":
        raise DyveError(f"{xml_path}: not an OpenVINO IR (root element <{root.tag}>)")
    if root.get("version") not in SUPPORTED_IR_VERSIONS:
        raise DyveError(f"{xml_path}: IR version {root.get('version')} is not supported "
                        f"(only {', '.join(SUPPORTED_IR_VERSIONS)})")
    layers = []
    for element in root.iterfind("layers/layer"):
        data = element.find("data")
        where = f"layer '{element.get('name', '')}'"
        check_data_fields(xml_path, where, dict(data.attrib) if data is not None else {})
        layers.append(IrLayer(
            id=int_field(xml_path, where, "id", element.get("id")),
            name=element.get("name", ""),
            type=element.get("type", ""),
            data=dict(data.attrib) if data is not None else {},
            inputs=[parse_port(p, xml_path, where) for p in element.iterfind("input/port")],
            outputs=[parse_port(p, xml_path, where) for p in element.iterfind("output/port")],
        ))
    if len({layer.id for layer in layers}) != len(layers):
        raise DyveError(f"{xml_path}: two layers have the same id")
    edges = [
        tuple(int_field(xml_path, f"edge {i}", key, e.get(key))
              for key in ("from-layer", "from-port", "to-layer", "to-port"))
        for i, e in enumerate(root.iterfind("edges/edge"))
    ]
    return root.get("name") or Path(xml_path).stem, layers, edges


def topological_order(layers: list[IrLayer], edges: list[tuple[int, int, int, int]], xml_path: Path) -> list[IrLayer]:
    """``layers`` sorted so that every layer follows the layers it reads (ties in file order)."""
    position = {layer.id: i for i, layer in enumerate(layers)}
    pending = {layer.id: 0 for layer in layers}
    readers: dict[int, list[int]] = {}
    for src, _, dst, _ in edges:
        if src not in position or dst not in position:
            raise DyveError(f"{xml_path}: an edge refers to a missing layer ({src} -> {dst})")
        pending[dst] += 1
        readers.setdefault(src, []).append(dst)
    ready = [position[layer.id] for layer in layers if pending[layer.id] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        current = layers[heapq.heappop(ready)]
        order.append(current)
        for dst in readers.get(current.id, []):
            pending[dst] -= 1
            if pending[dst] == 0:
                heapq.heappush(ready, position[dst])
    if len(order) != len(layers):
        raise DyveError(f"{xml_path}: the IR graph has a cycle")
    return order


# --------------------------------------------------------------------------- converters


@converts("Parameter")
def convert_parameter(layer: IrLayer, inputs: list[Value], ctx: IrContext) -> list[Value]:
    """The network input, renamed ``data``, with a symbolic batch dimension."""
    if ctx.input_name is not None:
        raise ctx.fail(layer, "nets with more than one input are not supported")
    dims = layer.outputs[0].dims or tuple(layer.ints("shape"))
    if len(dims) < 2:
        raise ctx.fail(layer, f"input shape {list(dims)} is not N x C x ...")
    ctx.input_name = ctx.graph.add_input(INPUT_NAME, dims[1:])
    return [Tensor(ctx.input_name)]


@converts("Const")
def convert_const(layer: IrLayer, inputs: list[Value], ctx: IrContext) -> list[Value]:
    """A constant read from the .bin (folded, not a graph node)."""
    element_type = layer.data.get("element_type", "")
    if element_type not in ELEMENT_TYPES:
        raise ctx.fail(layer, f"element type {element_type!r} is not supported")
    dtype = np.dtype(ELEMENT_TYPES[element_type]).newbyteorder("<")
    shape = tuple(layer.ints("shape", []))
    offset, size = int(layer.data.get("offset", -1)), int(layer.data.get("size", -1))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != expected:
        raise ctx.fail(layer, f"size {size} does not fit shape {list(shape)} of {element_type}")
    if ctx.weights is None:
        raise DyveError(f"{ctx.bin_path}: weights file not found (needed by layer '{layer.name}')")
    if offset < 0 or offset + size > len(ctx.weights):
        raise DyveError(f"{ctx.bin_path}: too short for layer '{layer.name}' "
                        f"(needs bytes {offset}..{offset + size}, has {len(ctx.weights)})")
    array = np.frombuffer(ctx.weights, dtype=dtype, count=size // dtype.itemsize, offset=offset)
    return [array.reshape(shape).astype(dtype.newbyteorder("="))]


@converts("Convert")
def convert_convert(layer: IrLayer, inputs: list[Value], ctx: IrContext) -> list[Value]:
    """Convert: folded on constants (FP16 decompression); float32 tensors pass through."""
    target = layer.data.get("destination_type", "")
    if target not in ELEMENT_TYPES:
        raise ctx.fail(layer, f"destination type {target!r} is not supported")
    (value,) = inputs
    if isinstance(value, np.ndarray):
        return [value.astype(ELEMENT_TYPES[target])]
    if target != "f32":
        raise ctx.fail(layer, "only conversions of tensors to f32 are supported")
    return [value]


def explicit_pads(layer: IrLayer, in_hw: Shape, out_hw: Shape, kernel: list[int],
                  strides: list[int], dilations: list[int]) -> list[int]:
    """Begin pads of a conv/pool: from pads_begin, or derived from auto_pad."""
    auto_pad = layer.data.get("auto_pad", "explicit")
    if auto_pad in ("explicit", "notset", ""):
        return layer.ints("pads_begin", [0] * len(kernel))
    if auto_pad == "valid":
        return [0] * len(kernel)
    totals = [max(0, (o - 1) * s + d * (k - 1) + 1 - i)
              for i, o, k, s, d in zip(in_hw, out_hw, kernel, strides, dilations)]
    if auto_pad == "same_upper":
        return [t // 2 for t in totals]
    if auto_pad == "same_lower":
        return [t - t // 2 for t in totals]
    raise ValueError(auto_pad)


@converts("Convolution", "GroupConvolution")
def convert_convolution(layer: IrLayer, inputs: list[Value], ctx: IrContext) -> list[Value]:
    """(Group)Convolution -> Conv without bias (a following Add of a constant becomes it)."""
    x, weight = inputs
    if not isinstance(x, Tensor) or not isinstance(weight, np.ndarray):
        raise ctx.fail(layer, "only convolutions of a tensor with constant weights are supported")
    group = 1
    if layer.type == "GroupConvolution":
        group = weight.shape[0]
        weight = weight.reshape(group * weight.shape[1], *weight.shape[2:])
    weight = weight.astype(np.float32)
    in_shape = ctx.graph.shape(x.name)
    out_dims = layer.outputs[0].dims[1:]
    kernel = list(weight.shape[2:])
    if len(kernel) != 2 or len(in_shape) != 3:
        raise ctx.fail(layer, "only 2-D convolutions are supported")
    strides = layer.ints("strides", [1, 1])
    dilations = layer.ints("dilations", [1, 1])
    pads_begin = explicit_pads(layer, in_shape[1:], out_dims[1:], kernel, strides, dilations)
    if layer.data.get("auto_pad", "explicit") in ("explicit", "notset", ""):
        pads_end = layer.ints("pads_end", [0, 0])
    else:
        pads_end = [max(0, (o - 1) * s + d * (k - 1) + 1 - i - p) for i, o, k, s, d, p in
                    zip(in_shape[1:], out_dims[1:], kernel, strides, dilations, pads_begin)]
    out_hw = [(i + b + e - d * (k - 1) - 1) // s + 1 for i, b, e, k, s, d in
              zip(in_shape[1:], pads_begin, pads_end, kernel, strides, dilations)]
    if weight.shape[1] * group != in_shape[0]:
        raise ctx.fail(layer, f"weights {list(weight.shape)} do not fit {in_shape[0]} input channels")
    name = layer.caffe_name
    w_name = ctx.graph.add_initializer(f"{name}_W", weight)
    out = ctx.graph.add_node(
        "Conv", [x.name, w_name], name, (weight.shape[0], *out_hw),
        kernel_shape=kernel, strides=strides, pads=[*pads_begin, *pads_end],
        dilations=dilations, group=group,
    )
    ctx.check_shape(layer, out)
    ctx.conv_nodes[out] = len(ctx.graph.nodes) - 1
    return [Tensor(out)]


def as_channel_bias(value: np.ndarray, channels: int) -> np.ndarray | None:
    """``value`` as a (channels,) bias if it broadcasts as one over N x C x H x W, else None."""
    if value.size != channels or channels == 0:
        return None
    dims = list(value.shape)
    if len(dims) == 4 and dims[0] == 1 and dims[2] == 1 and dims[3] == 1:
        return value.reshape(channels).astype(np.float32)
    if len(dims) == 3 and dims[1] == 1 and dims[2] == 1:
        return value.reshape(channels).astype(np.float32)
    return None


@converts("Add")
def convert_add(layer: IrLayer, inputs: list[Value], ctx: IrContext) -> list[Value]:
    """Add: folded into the preceding Conv as its bias where possible, else an ONNX Add."""
    a, b = inputs
    if isinstance(b, Tensor) and isinstance(a, np.ndarray):
        a, b = b, a
    if not isinstance(a, Tensor):
        raise ctx.fail(layer, "adding two constants is not supported")
    if isinstance(b, np.ndarray) and a.name in ctx.conv_nodes and ctx.tensor_consumers.get(a.name) == 1:
        bias = as_channel_bias(b, ctx.graph.shape(a.name)[0])
        if bias is not None:
            return [Tensor(fuse_conv_bias(ctx, a.name, bias, layer.caffe_name))]
    out = ctx.graph.add_node("Add", [a.name, ctx.tensor(layer, b)], layer.caffe_name,
                             tuple(layer.outputs[0].dims[1:]))
    return [Tensor(out)]


def fuse_conv_bias(ctx: IrContext, conv_output: str, bias: np.ndarray, name: str) -> str:
    """Give the bias-less Conv producing ``conv_output`` the bias ``bias``; the node, its weights
    and its output take the Add's (Caffe) ``name``. Returns the output tensor."""
    node = ctx.graph.nodes[ctx.conv_nodes.pop(conv_output)]
    if node.name != name:
        node.name = name
        ctx.graph.rename_initializer(node.input[1], f"{name}_W")
        conv_output = ctx.graph.rename_tensor(conv_output, name)
    node.input.append(ctx.graph.add_initializer(f"{name}_b", bias))
    return conv_output


@converts("ReLU")
def convert_relu(layer: IrLayer, inputs: list[Value], ctx: IrContext) -> list[Value]:
    """ReLU -> Relu."""
    (x,) = inputs
    name = ctx.tensor(layer, x)
    return [Tensor(ctx.graph.add_node("Relu", [name], layer.caffe_name, ctx.graph.shape(name)))]


def pooled_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, rounding: str) -> int:
    """Output extent of IR pooling with explicit pads: ``floor``, ``ceil`` or ``ceil_torch``
    rounding (the last drops a window that would start in the end padding)."""
    span = size + pad_begin + pad_end - kernel
    if rounding == "floor":
        return span // stride + 1
    out = -(-span // stride) + 1
    if rounding == "ceil_torch" and (out - 1) * stride >= size + pad_begin:
        out -= 1
    return out


def pool_axes(layer: IrLayer, ctx: IrContext, in_shape: Shape) -> tuple[PoolAxis, PoolAxis]:
    """Pooling geometry per spatial axis; the output size computed from the attributes must
    equal the IR's declared dims."""
    kernel = layer.ints("kernel")
    strides = layer.ints("strides", [1] * len(kernel))
    if layer.ints("dilations", [1] * len(kernel)) != [1] * len(kernel):
        raise ctx.fail(layer, "dilated pooling is not supported")
    if len(kernel) != 2 or len(in_shape) != 3:
        raise ctx.fail(layer, "only 2-D pooling is supported")
    declared = layer.outputs[0].dims[2:]
    rounding = layer.data.get("rounding_type", "floor").lower()
    if rounding not in ("floor", "ceil", "ceil_torch"):
        raise ctx.fail(layer, f"rounding_type {rounding!r} is not supported")
    if layer.data.get("auto_pad", "explicit") in ("explicit", "notset", ""):
        pads_begin = layer.ints("pads_begin", [0, 0])
        pads_end = layer.ints("pads_end", [0, 0])
        out = [pooled_size(i, k, s, b, e, rounding)
               for i, k, s, b, e in zip(in_shape[1:], kernel, strides, pads_begin, pads_end)]
        if tuple(out) != tuple(declared):
            raise ctx.fail(layer, f"its attributes give a {out[0]} x {out[1]} output, the IR declares "
                                  f"{' x '.join(map(str, declared))}")
    else:
        pads_begin, out = explicit_pads(layer, in_shape[1:], declared, kernel, strides, [1, 1]), list(declared)
    axes = tuple(PoolAxis(i, k, s, p, o) for i, k, s, p, o in zip(in_shape[1:], kernel, strides, pads_begin, out))
    if any(a.last_start >= a.size or a.out < 1 for a in axes):
        raise ctx.fail(layer, "a pooling window lies outside the input")
    return axes  # type: ignore[return-value]


@converts("MaxPool")
def convert_max_pool(layer: IrLayer, inputs: list[Value], ctx: IrContext) -> list[Value]:
    """MaxPool (floor or ceil rounding) -> MaxPool with explicit pads giving the IR's size."""
    x = ctx.tensor(layer, inputs[0])
    if len(layer.outputs) > 1 and ctx.consumers.get((layer.id, layer.outputs[1].id), 0):
        raise ctx.fail(layer, "using the indices output is not supported")
    in_shape = ctx.graph.shape(x)
    out = emit_max_pool(ctx.graph, x, layer.caffe_name, pool_axes(layer, ctx, in_shape), in_shape[0])
    ctx.check_shape(layer, out)
    return [Tensor(out)] + [Tensor("")] * (len(layer.outputs) - 1)


@converts("AvgPool")
def convert_avg_pool(layer: IrLayer, inputs: list[Value], ctx: IrContext) -> list[Value]:
    """AvgPool -> AveragePool: ``exclude-pad`` true maps to count_include_pad=0; counting the
    padding is supported where no window reaches past the declared end padding."""
    x = ctx.tensor(layer, inputs[0])
    in_shape = ctx.graph.shape(x)
    h, w = pool_axes(layer, ctx, in_shape)
    exclude_pad = layer.data.get("exclude-pad", "false").lower() == "true"
    explicit = layer.data.get("auto_pad", "explicit") in ("explicit", "notset", "")
    declared_end = layer.ints("pads_end", [0, 0]) if explicit else [h.pad_end, w.pad_end]
    if not exclude_pad and any(a.pad_end > end for a, end in zip((h, w), declared_end)):
        raise ctx.fail(layer, "ceil-rounded average pooling that counts padding is not supported")
    out = ctx.graph.add_node(
        "AveragePool", [x], layer.caffe_name, (in_shape[0], h.out, w.out),
        kernel_shape=[h.kernel, w.kernel], strides=[h.stride, w.stride],
        pads=[h.pad, w.pad, h.pad_end, w.pad_end], count_include_pad=0 if exclude_pad else 1,
    )
    ctx.check_shape(layer, out)
    return [Tensor(out)]


@converts("ReduceMean", "ReduceMax")
def convert_reduce(layer: IrLayer, inputs: list[Value], ctx: IrContext) -> list[Value]:
    """ReduceMean / ReduceMax over H and W with keep_dims -> GlobalAveragePool / GlobalMaxPool."""
    x, axes = inputs
    if not isinstance(x, Tensor) or not isinstance(axes, np.ndarray):
        raise ctx.fail(layer, "only reductions of a tensor over constant axes are supported")
    rank = len(ctx.graph.shape(x.name)) + 1
    normalized = sorted(int(a) % rank for a in axes.reshape(-1))
    keep_dims = layer.data.get("keep_dims", "false").lower() == "true"
    if rank != 4 or normalized != [2, 3] or not keep_dims:
        raise ctx.fail(layer, f"only reductions over H, W with keep_dims are supported (axes {normalized})")
    op = "GlobalAveragePool" if layer.type == "ReduceMean" else "GlobalMaxPool"
    channels = ctx.graph.shape(x.name)[0]
    out = ctx.graph.add_node(op, [x.name], layer.caffe_name, (channels, 1, 1))
    ctx.check_shape(layer, out)
    return [Tensor(out)]


@converts("SoftMax", "Softmax")
def convert_softmax(layer: IrLayer, inputs: list[Value], ctx: IrContext) -> list[Value]:
    """SoftMax -> Softmax over the same axis."""
    x = ctx.tensor(layer, inputs[0])
    rank = len(ctx.graph.shape(x)) + 1
    axis = int(layer.data.get("axis", "1")) % rank
    if axis == 0:
        raise ctx.fail(layer, "softmax over the batch axis is not supported")
    return [Tensor(ctx.graph.add_node("Softmax", [x], layer.caffe_name, ctx.graph.shape(x), axis=axis))]


@converts("Concat")
def convert_concat(layer: IrLayer, inputs: list[Value], ctx: IrContext) -> list[Value]:
    """Concat along the same axis (not the batch axis)."""
    names = [ctx.tensor(layer, v) for v in inputs]
    rank = len(layer.outputs[0].dims)
    axis = int(layer.data.get("axis", "1")) % rank
    if axis == 0:
        raise ctx.fail(layer, "concatenation along the batch axis is not supported")
    out = ctx.graph.add_node("Concat", names, layer.caffe_name, tuple(layer.outputs[0].dims[1:]), axis=axis)
    return [Tensor(out)]


@converts("Reshape", "Squeeze", "Unsqueeze")
def convert_reshape(layer: IrLayer, inputs: list[Value], ctx: IrContext) -> list[Value]:
    """Reshape / Squeeze / Unsqueeze keeping the batch axis -> Reshape to the IR's dims."""
    x = inputs[0]
    if not isinstance(x, Tensor):
        raise ctx.fail(layer, "reshaping a constant is not supported")
    in_dims = layer.inputs[0].dims
    out_dims = layer.outputs[0].dims
    if not out_dims or not in_dims or out_dims[0] != in_dims[0]:
        raise ctx.fail(layer, "only reshapes that keep the batch axis are supported")
    target = ctx.graph.add_int64(f"{layer.caffe_name}_shape", [0, *out_dims[1:]])
    return [Tensor(ctx.graph.add_node("Reshape", [x.name, target], layer.caffe_name, tuple(out_dims[1:])))]


@converts("Result")
def convert_result(layer: IrLayer, inputs: list[Value], ctx: IrContext) -> list[Value]:
    """Result: marks the graph output."""
    if ctx.output_name is not None:
        raise ctx.fail(layer, "nets with more than one output are not supported")
    ctx.output_name = ctx.tensor(layer, inputs[0])
    return []


# --------------------------------------------------------------------------- whole IR


def convert_openvino(xml_path: Path, bin_path: Path | None = None) -> ConvertedModel:
    """Convert an OpenVINO IR (.xml, with its .bin beside it unless given)."""
    xml_path = Path(xml_path)
    bin_path = Path(bin_path) if bin_path is not None else xml_path.with_suffix(".bin")
    net_name, layers, edges = read_ir(xml_path)
    try:
        weights = bin_path.read_bytes() if bin_path.exists() else None
    except OSError as err:
        raise DyveError(f"{bin_path}: cannot read weights: {err}") from err
    consumers: dict[tuple[int, int], int] = {}
    for src, src_port, _, _ in edges:
        consumers[(src, src_port)] = consumers.get((src, src_port), 0) + 1
    ctx = IrContext(GraphBuilder(net_name), xml_path, bin_path, weights, consumers)
    values: dict[tuple[int, int], Value] = {}
    sources = {(dst, dst_port): (src, src_port) for src, src_port, dst, dst_port in edges}
    for layer in topological_order(layers, edges, xml_path):
        converter = IR_CONVERTERS.get(layer.type)
        if converter is None:
            raise ctx.fail(layer, "this operation type is not supported")
        try:
            inputs = [values[sources[(layer.id, port.id)]] for port in layer.inputs]
        except KeyError:
            raise ctx.fail(layer, "an input port is not connected") from None
        for port, value in zip(layer.inputs, inputs):
            if isinstance(value, Tensor) and port.dims and tuple(port.dims[1:]) != ctx.graph.shape(value.name):
                raise ctx.fail(layer, f"input port {port.id} declares {list(port.dims[1:])} per sample, "
                                      f"the tensor it reads has {list(ctx.graph.shape(value.name))}")
        try:
            outputs = converter(layer, inputs, ctx)
        except KeyError as err:  # a required <data> attribute
            raise ctx.fail(layer, f"attribute {err.args[0]} is missing") from None
        except (ValueError, IndexError, ZeroDivisionError, OverflowError) as err:  # a malformed one
            raise ctx.fail(layer, str(err).splitlines()[0] if str(err) else type(err).__name__) from None
        for port, value in zip(layer.outputs, outputs):
            values[(layer.id, port.id)] = value
            if isinstance(value, Tensor) and value.name:
                readers = consumers.get((layer.id, port.id), 0)
                ctx.tensor_consumers[value.name] = ctx.tensor_consumers.get(value.name, 0) + readers
    if ctx.input_name is None or ctx.output_name is None:
        raise DyveError(f"{xml_path}: the IR has no Parameter or no Result")
    model = ctx.graph.to_model(INPUT_NAME, ctx.output_name, producer="dyvedeep.convert.openvino")
    return ConvertedModel(model, {SOURCE_KEY: source_metadata("openvino", [xml_path, bin_path])})
