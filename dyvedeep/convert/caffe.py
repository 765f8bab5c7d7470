"""Caffe (deploy .prototxt + .caffemodel) to ONNX.

The prototxt is parsed with protobuf's text format into ``caffe.NetParameter`` (new ``layer`` or
legacy V1 ``layers``), the caffemodel with protobuf's binary parser (either format, independently
of the prototxt's). Weights are matched to prototxt layers by name. Each Caffe layer type has one
small function in :data:`LAYER_CONVERTERS`; in-place layers (top == bottom) get fresh ONNX tensor
names, so the graph is in SSA form. Also reads ``mean.binaryproto`` files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from onnx import numpy_helper
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from .. import caffe_pb2
from ..errors import DyveError
from ..metadata_keys import PREPROCESS_KEY, SOURCE_KEY
from ..preprocess import Preprocess
from .onnx_graph import (
    INPUT_NAME, ConvertedModel, GraphBuilder, Shape, source_metadata,
)
from .pooling import caffe_pool_axis, emit_caffe_average_pool, emit_max_pool

LayerParameter = caffe_pb2.LayerParameter

# V1 layer type enum -> the type string of the new format (Caffe's UpgradeV1LayerType).
V1_TYPE_NAMES: dict[str, str] = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DATA": "Data", "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

# Parameter messages a V1 layer may carry that the new LayerParameter has under the same name.
_V1_PARAM_FIELDS = (
    "concat_param", "convolution_param", "dropout_param", "eltwise_param",
    "inner_product_param", "lrn_param", "pooling_param", "relu_param", "softmax_param",
    "transform_param", "loss_param", "accuracy_param", "data_param",
)

# Per-channel affine layers folded into the Conv / Gemm that produces their bottom.
FOLDABLE_OPS = ("Conv", "Gemm")


# --------------------------------------------------------------------------- reading files


def read_prototxt(path: Path) -> caffe_pb2.NetParameter:
    """Parse a Caffe prototxt (text format) into a NetParameter."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DyveError(f"{path}: cannot read prototxt: {err}") from err
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as err:
        raise DyveError(f"{path}: not a valid Caffe prototxt: {err}") from err
    return net


def parse_binary_message(path: Path, message, what: str):
    """Fill protobuf ``message`` from the binary file ``path``; ``what`` names the kind of file in
    the one-line error an unreadable or corrupt file gives."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DyveError(f"{path}: cannot read {what}: {err}") from err
    try:
        message.ParseFromString(data)
    except DecodeError as err:
        raise DyveError(f"{path}: not a valid {what}: {err}") from err
    return message


def read_net_binary(path: Path, what: str) -> caffe_pb2.NetParameter:
    """Parse a binary NetParameter (caffemodel); ``what`` names the kind of file in errors."""
    net = parse_binary_message(path, caffe_pb2.NetParameter(), what)
    if not net.layer and not net.layers:
        raise DyveError(f"{path}: not a valid {what}: it holds no layers")
    return net


def blob_shape(blob: caffe_pb2.BlobProto) -> Shape:
    """A blob's declared shape: ``shape`` if present, else the legacy num/channels/height/width."""
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    legacy = ("num", "channels", "height", "width")
    if any(blob.HasField(f) for f in legacy):
        return tuple(int(getattr(blob, f)) for f in legacy)
    return (len(blob.data) or len(blob.double_data),)


def blob_to_array(blob: caffe_pb2.BlobProto) -> np.ndarray | None:
    """The blob's values as float32 in its declared shape; None if the counts disagree."""
    values = blob.data if len(blob.data) else blob.double_data
    array = np.array(values, dtype=np.float32)
    shape = blob_shape(blob)
    if array.size != math.prod(shape):
        return None
    return array.reshape(shape)


def read_caffemodel(path: Path) -> dict[str, list[np.ndarray]]:
    """The parameter blobs of every layer of a caffemodel (new or V1 format), by layer name."""
    net = read_net_binary(path, "caffemodel")
    blobs: dict[str, list[np.ndarray]] = {}
    for layer in [*net.layers, *net.layer]:  # new-format entries win over V1 ones
        if not layer.blobs:
            continue
        arrays = []
        for i, blob in enumerate(layer.blobs):
            array = blob_to_array(blob)
            if array is None:
                raise DyveError(
                    f"{path}: not a valid caffemodel: layer '{layer.name}' blob {i} declares shape "
                    f"{list(blob_shape(blob))} but holds {len(blob.data) or len(blob.double_data)} values"
                )
            arrays.append(array)
        blobs[layer.name] = arrays
    return blobs


def read_mean_binaryproto(path: Path) -> np.ndarray:
    """The mean image of a Caffe ``mean.binaryproto`` as float32 (C, H, W)."""
    blob = parse_binary_message(path, caffe_pb2.BlobProto(), "mean.binaryproto")
    array = blob_to_array(blob)
    if array is None or array.size == 0:
        raise DyveError(f"{path}: not a valid mean.binaryproto: shape and data disagree or are empty")
    shape = array.shape
    while len(shape) > 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3:
        raise DyveError(f"{path}: mean blob has shape {list(array.shape)}, expected 1 x C x H x W")
    return array.reshape(shape)


# --------------------------------------------------------------------------- net structure


def upgrade_v1_layer(v1: caffe_pb2.V1LayerParameter) -> LayerParameter:
    """A V1 ``layers`` entry as a new-format LayerParameter (type enum -> type string)."""
    layer = LayerParameter(name=v1.name, bottom=list(v1.bottom), top=list(v1.top))
    enum_name = caffe_pb2.V1LayerParameter.LayerType.Name(v1.type)
    layer.type = V1_TYPE_NAMES.get(enum_name, enum_name)
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    layer.blobs.extend(v1.blobs)
    for name in _V1_PARAM_FIELDS:
        if v1.HasField(name):
            getattr(layer, name).CopyFrom(getattr(v1, name))
    return layer


def net_layers(net: caffe_pb2.NetParameter) -> list[LayerParameter]:
    """The layers of ``net`` in order, V1 ones upgraded, those not in the TEST phase left out."""
    layers = list(net.layer) + [upgrade_v1_layer(v1) for v1 in net.layers]
    return [layer for layer in layers if in_test_phase(layer)]


def in_test_phase(layer: LayerParameter) -> bool:
    """Whether Caffe would instantiate ``layer`` in a TEST-phase net (phase rules only)."""
    test = caffe_pb2.TEST
    if layer.include:
        return any(not rule.HasField("phase") or rule.phase == test for rule in layer.include)
    return not any(rule.HasField("phase") and rule.phase == test for rule in layer.exclude)


def legacy_inputs(net: caffe_pb2.NetParameter, prototxt: Path) -> list[tuple[str, Shape]]:
    """Inputs declared by the deprecated ``input`` + ``input_dim`` / ``input_shape`` fields."""
    inputs = []
    for i, name in enumerate(net.input):
        if i < len(net.input_shape):
            dims = tuple(int(d) for d in net.input_shape[i].dim)
        elif len(net.input_dim) >= 4 * (i + 1):
            dims = tuple(int(d) for d in net.input_dim[4 * i : 4 * i + 4])
        else:
            raise DyveError(f"{prototxt}: input '{name}' has no input_shape or input_dim")
        inputs.append((name, dims))
    return inputs


# --------------------------------------------------------------------------- weights


class WeightSource(Protocol):
    """Where the converter gets a layer's parameter blobs from (caffemodel or .net)."""

    path: Path

    def get(self, layer: str, index: int, expected: Shape, any_shape: bool = False) -> np.ndarray:
        """Blob ``index`` of ``layer`` as float32 of shape ``expected`` or a DyveError."""
        ...


def fit_blob(array: np.ndarray, expected: Shape, any_shape: bool) -> np.ndarray | None:
    """``array`` reshaped to ``expected`` if its shape agrees (leading 1s of legacy 4-D blobs
    ignored), else None. With ``any_shape`` the trailing dimensions may be any of the right size
    (an InnerProduct's (out, C, H, W)), but the first must be ``expected``'s: a transposed
    (in, out) blob of the right size is refused."""
    shape = array.shape
    while len(shape) > len(expected) and shape[0] == 1:
        shape = shape[1:]
    if tuple(shape) == tuple(expected):
        return array.reshape(expected)
    if any_shape and array.size == math.prod(expected) and (
            len(expected) == 1 or (len(shape) >= 2 and shape[0] == expected[0])):
        return array.reshape(expected)
    return None


@dataclass
class CaffemodelWeights:
    """Blobs read from a caffemodel, looked up by layer name."""

    path: Path
    blobs: dict[str, list[np.ndarray]]

    def get(self, layer: str, index: int, expected: Shape, any_shape: bool = False) -> np.ndarray:
        arrays = self.blobs.get(layer)
        if arrays is None:
            raise DyveError(f"{self.path}: no weights for layer '{layer}' of the prototxt")
        if index >= len(arrays):
            raise DyveError(
                f"{self.path}: layer '{layer}' blob {index}: expected shape {list(expected)}, "
                f"found no blob (the layer has {len(arrays)})"
            )
        fitted = fit_blob(arrays[index], expected, any_shape)
        if fitted is None:
            raise DyveError(
                f"{self.path}: layer '{layer}' blob {index}: expected shape {list(expected)} "
                f"from the prototxt, found {list(arrays[index].shape)}"
            )
        if not np.isfinite(fitted).all():
            raise DyveError(f"{self.path}: layer '{layer}' blob {index} holds NaN or infinite values")
        return fitted


# --------------------------------------------------------------------------- conversion state


@dataclass
class CaffeContext:
    """State while converting one net: the graph so far and the ONNX tensor of each Caffe blob."""

    graph: GraphBuilder
    weights: WeightSource
    prototxt: Path
    tensors: dict[str, str] = field(default_factory=dict)  # Caffe blob -> current ONNX tensor
    input_name: str | None = None
    last_output: str | None = None
    input_hw: tuple[int, int] | None = None  # the input size when the prototxt does not fix it
    preprocess: Preprocess | None = None  # from a Data layer's transform_param

    def fail(self, layer: LayerParameter, problem: str) -> DyveError:
        """A DyveError naming the prototxt, the layer and its type."""
        return DyveError(f"{self.prototxt}: layer '{layer.name}' (type {layer.type}): {problem}")

    def bottom(self, layer: LayerParameter, index: int = 0) -> str:
        """The ONNX tensor holding bottom ``index`` of ``layer``."""
        if index >= len(layer.bottom):
            raise self.fail(layer, f"needs at least {index + 1} bottom blob(s)")
        blob = layer.bottom[index]
        if blob not in self.tensors:
            raise self.fail(layer, f"reads blob '{blob}' that no earlier layer produces")
        return self.tensors[blob]

    def bottoms(self, layer: LayerParameter) -> list[str]:
        """All bottom tensors of ``layer``."""
        return [self.bottom(layer, i) for i in range(len(layer.bottom))]

    def output_hint(self, layer: LayerParameter, index: int = 0) -> str:
        """Name for the tensor of top ``index``: the blob name, or ``blob/layer`` when in place."""
        if index >= len(layer.top):
            raise self.fail(layer, f"needs at least {index + 1} top blob(s)")
        top = layer.top[index]
        return f"{top}/{layer.name}" if top in self.tensors else top

    def set_top(self, layer: LayerParameter, tensor: str, index: int = 0) -> None:
        """Record that top ``index`` of ``layer`` is now ONNX tensor ``tensor``."""
        self.tensors[layer.top[index]] = tensor
        self.last_output = tensor

    def shape(self, tensor: str) -> Shape:
        """Per-sample shape of ``tensor``."""
        return self.graph.shape(tensor)

    def image_shape(self, layer: LayerParameter, tensor: str) -> tuple[int, int, int]:
        """(C, H, W) of a 4-D blob, or a DyveError for other ranks."""
        shape = self.shape(tensor)
        if len(shape) != 3:
            raise self.fail(layer, f"needs a 4-D input blob, got N x {' x '.join(map(str, shape))}")
        return shape  # type: ignore[return-value]

    def add_node(self, layer: LayerParameter, op: str, inputs: list[str], shape: Shape,
                 **attrs: object) -> None:
        """Append the node of a single-top layer (named after the layer) and set its top."""
        out = self.graph.add_node(op, inputs, layer.name, shape, output=self.output_hint(layer), **attrs)
        self.set_top(layer, out)


LayerConverter = Callable[[LayerParameter, CaffeContext], None]
LAYER_CONVERTERS: dict[str, LayerConverter] = {}


def converts(*layer_types: str) -> Callable[[LayerConverter], LayerConverter]:
    """Register the decorated function as the converter of ``layer_types``."""

    def register(fn: LayerConverter) -> LayerConverter:
        for layer_type in layer_types:
            LAYER_CONVERTERS[layer_type] = fn
        return fn

    return register


# --------------------------------------------------------------------------- helpers


def spatial_pair(values: list[int], h_field: tuple[bool, int], w_field: tuple[bool, int],
                 default: int) -> tuple[int, int]:
    """Resolve Caffe's ``x`` (repeated: 0, 1 or 2 values) versus ``x_h``/``x_w`` fields."""
    (has_h, h), (has_w, w) = h_field, w_field
    if has_h or has_w:
        return int(h), int(w)
    if len(values) == 0:
        return default, default
    if len(values) == 1:
        return int(values[0]), int(values[0])
    return int(values[0]), int(values[1])


def conv_geometry(p: caffe_pb2.ConvolutionParameter) -> dict[str, tuple[int, int]]:
    """Kernel, pad, stride and dilation of a Caffe convolution, each as (h, w)."""
    kernel = spatial_pair(list(p.kernel_size), (p.HasField("kernel_h"), p.kernel_h),
                          (p.HasField("kernel_w"), p.kernel_w), 0)
    pad = spatial_pair(list(p.pad), (p.HasField("pad_h"), p.pad_h), (p.HasField("pad_w"), p.pad_w), 0)
    stride = spatial_pair(list(p.stride), (p.HasField("stride_h"), p.stride_h),
                          (p.HasField("stride_w"), p.stride_w), 1)
    dilation = spatial_pair(list(p.dilation), (False, 0), (False, 0), 1)
    return {"kernel": kernel, "pad": pad, "stride": stride, "dilation": dilation}


def pool_geometry(p: caffe_pb2.PoolingParameter) -> dict[str, tuple[int, int]]:
    """Kernel, pad and stride of a Caffe pooling layer, each as (h, w)."""
    if p.HasField("kernel_size"):
        kernel = (p.kernel_size, p.kernel_size)
    else:
        kernel = (p.kernel_h, p.kernel_w)
    pad = (p.pad_h, p.pad_w) if (p.HasField("pad_h") or p.HasField("pad_w")) else (p.pad, p.pad)
    if p.HasField("stride_h") or p.HasField("stride_w"):
        stride = (p.stride_h, p.stride_w)
    else:
        stride = (p.stride, p.stride)
    return {"kernel": kernel, "pad": pad, "stride": stride}


def normalize_axis(axis: int, rank: int) -> int:
    """Caffe/ONNX axis (negative counts from the end) for a tensor of ``rank`` axes incl. N."""
    return axis + rank if axis < 0 else axis


# --------------------------------------------------------------------------- layer converters


@converts("Input")
def convert_input(layer: LayerParameter, ctx: CaffeContext) -> None:
    """Input layer: the graph input ``data`` (batch dimension made symbolic)."""
    shapes = list(layer.input_param.shape)
    for i, top in enumerate(layer.top):
        if not shapes:
            raise ctx.fail(layer, "input_param has no shape")
        dims = tuple(int(d) for d in shapes[min(i, len(shapes) - 1)].dim)
        define_input(ctx, top, dims, layer)


def define_input(ctx: CaffeContext, blob: str, dims: Shape, layer: LayerParameter | None = None) -> None:
    """Make Caffe blob ``blob`` (shape N x ...) the graph input, named ``data``."""
    where = f"layer '{layer.name}'" if layer is not None else f"input '{blob}'"
    if ctx.input_name is not None:
        raise DyveError(f"{ctx.prototxt}: {where}: nets with more than one input are not supported")
    if len(dims) < 2 or any(d <= 0 for d in dims[1:]):
        raise DyveError(f"{ctx.prototxt}: {where}: input shape {list(dims)} is not N x C x ...")
    ctx.input_name = ctx.graph.add_input(INPUT_NAME, dims[1:])
    ctx.tensors[blob] = ctx.input_name


@converts("Convolution")
def convert_convolution(layer: LayerParameter, ctx: CaffeContext) -> None:
    """Convolution -> Conv (group, strides, pads, dilations; bias optional)."""
    p = layer.convolution_param
    x = ctx.bottom(layer)
    channels, height, width = ctx.image_shape(layer, x)
    g = conv_geometry(p)
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = g["kernel"], g["pad"], g["stride"], g["dilation"]
    if p.axis != 1:
        raise ctx.fail(layer, f"axis {p.axis} is not supported (only 1)")
    if min(kh, kw, sh, sw, dh, dw) < 1 or p.num_output < 1:
        raise ctx.fail(layer, "kernel size, stride, dilation and num_output must be positive")
    group = p.group
    if group < 1 or channels % group or p.num_output % group:
        raise ctx.fail(layer, f"group {group} does not divide {channels} inputs and {p.num_output} outputs")
    out_h = (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    out_w = (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ctx.fail(layer, f"kernel larger than the padded {height} x {width} input")
    weight = ctx.weights.get(layer.name, 0, (p.num_output, channels // group, kh, kw))
    inputs = [x, ctx.graph.add_initializer(f"{layer.name}_W", weight)]
    if p.bias_term:
        bias = ctx.weights.get(layer.name, 1, (p.num_output,), any_shape=True)
        inputs.append(ctx.graph.add_initializer(f"{layer.name}_b", bias))
    ctx.add_node(
        layer, "Conv", inputs, (p.num_output, out_h, out_w),
        kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
        dilations=[dh, dw], group=group,
    )


@converts("InnerProduct")
def convert_inner_product(layer: LayerParameter, ctx: CaffeContext) -> None:
    """InnerProduct -> Flatten(axis=1) + Gemm(transB=1) with weights (num_output, K)."""
    p = layer.inner_product_param
    x = ctx.bottom(layer)
    shape = ctx.shape(x)
    if normalize_axis(p.axis, len(shape) + 1) != 1:
        raise ctx.fail(layer, f"axis {p.axis} is not supported (only 1)")
    fan_in = math.prod(shape)
    if len(shape) != 1:
        x = ctx.graph.add_node("Flatten", [x], f"{layer.name}/flatten", (fan_in,),
                               output=f"{layer.name}/flatten", axis=1)
    if p.transpose:
        weight = ctx.weights.get(layer.name, 0, (fan_in, p.num_output), any_shape=True).T
    else:
        weight = ctx.weights.get(layer.name, 0, (p.num_output, fan_in), any_shape=True)
    inputs = [x, ctx.graph.add_initializer(f"{layer.name}_W", np.ascontiguousarray(weight))]
    if p.bias_term:
        bias = ctx.weights.get(layer.name, 1, (p.num_output,), any_shape=True)
        inputs.append(ctx.graph.add_initializer(f"{layer.name}_b", bias))
    ctx.add_node(layer, "Gemm", inputs, (p.num_output,), transB=1)


@converts("ReLU")
def convert_relu(layer: LayerParameter, ctx: CaffeContext) -> None:
    """ReLU -> Relu (leaky ReLU is not supported)."""
    if layer.relu_param.negative_slope != 0:
        raise ctx.fail(layer, f"negative_slope {layer.relu_param.negative_slope} is not supported")
    x = ctx.bottom(layer)
    ctx.add_node(layer, "Relu", [x], ctx.shape(x))


@converts("LRN")
def convert_lrn(layer: LayerParameter, ctx: CaffeContext) -> None:
    """LRN: ACROSS_CHANNELS -> ONNX LRN; WITHIN_CHANNEL -> x / (1 + alpha * avg3x3(x^2))^beta."""
    p = layer.lrn_param
    x = ctx.bottom(layer)
    shape = ctx.image_shape(layer, x)
    size = int(p.local_size)
    if size < 1 or size % 2 == 0:
        raise ctx.fail(layer, f"local_size {size} must be odd (as Caffe requires)")
    if p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
        ctx.add_node(layer, "LRN", [x], shape, size=size, alpha=float(p.alpha),
                     beta=float(p.beta), bias=float(p.k))
        return
    graph, name, pad = ctx.graph, layer.name, (size - 1) // 2
    square = graph.add_node("Mul", [x, x], f"{name}/square", shape)
    mean = graph.add_node("AveragePool", [square], f"{name}/pool", shape, kernel_shape=[size, size],
                          pads=[pad] * 4, strides=[1, 1], count_include_pad=1)
    scaled = graph.add_node("Mul", [mean, graph.add_scalar(f"{name}_alpha", p.alpha)],
                            f"{name}/scale", shape)
    shifted = graph.add_node("Add", [scaled, graph.add_scalar(f"{name}_one", 1.0)],
                             f"{name}/shift", shape)
    denom = graph.add_node("Pow", [shifted, graph.add_scalar(f"{name}_beta", p.beta)],
                           f"{name}/pow", shape)
    ctx.add_node(layer, "Div", [x, denom], shape)


@converts("Pooling")
def convert_pooling(layer: LayerParameter, ctx: CaffeContext) -> None:
    """Pooling (MAX / AVE, global or windowed) with Caffe's output size and divisor."""
    p = layer.pooling_param
    x = ctx.bottom(layer)
    channels, height, width = ctx.image_shape(layer, x)
    methods = caffe_pb2.PoolingParameter
    if p.pool not in (methods.MAX, methods.AVE):
        raise ctx.fail(layer, f"pool method {methods.PoolMethod.Name(p.pool)} is not supported")
    is_max = p.pool == methods.MAX
    if p.global_pooling:
        op = "GlobalMaxPool" if is_max else "GlobalAveragePool"
        ctx.add_node(layer, op, [x], (channels, 1, 1))
        return
    g = pool_geometry(p)
    (kh, kw), (ph, pw), (sh, sw) = g["kernel"], g["pad"], g["stride"]
    if min(kh, kw, sh, sw) < 1:
        raise ctx.fail(layer, "kernel size and stride must be positive")
    if ph >= kh or pw >= kw:
        raise ctx.fail(layer, "pad must be smaller than the kernel (as Caffe requires)")
    if height + 2 * ph < kh or width + 2 * pw < kw:
        raise ctx.fail(layer, f"kernel larger than the padded {height} x {width} input")
    axes = (caffe_pool_axis(height, kh, sh, ph), caffe_pool_axis(width, kw, sw, pw))
    if any(a.last_start >= a.size for a in axes):
        raise ctx.fail(layer, "its last window lies outside the input (stride > kernel)")
    emit = emit_max_pool if is_max else emit_caffe_average_pool
    ctx.set_top(layer, emit(ctx.graph, x, layer.name, axes, channels, output=ctx.output_hint(layer)))


@converts("Dropout")
def convert_dropout(layer: LayerParameter, ctx: CaffeContext) -> None:
    """Dropout is the identity at test time: its top aliases its bottom."""
    ctx.set_top(layer, ctx.bottom(layer))


@converts("Split")
def convert_split(layer: LayerParameter, ctx: CaffeContext) -> None:
    """Split: every top aliases the bottom."""
    x = ctx.bottom(layer)
    for i in range(len(layer.top)):
        ctx.set_top(layer, x, i)


@converts("Softmax", "SoftmaxWithLoss")
def convert_softmax(layer: LayerParameter, ctx: CaffeContext) -> None:
    """Softmax over the channel axis (Caffe's axis, 1 by default); also a test net's
    SoftmaxWithLoss, whose loss is dropped so that the net ends in its Softmax."""
    x = ctx.bottom(layer)
    shape = ctx.shape(x)
    axis = normalize_axis(layer.softmax_param.axis, len(shape) + 1)
    if not 1 <= axis <= len(shape):
        raise ctx.fail(layer, f"axis {layer.softmax_param.axis} is not supported")
    ctx.add_node(layer, "Softmax", [x], shape, axis=axis)


@converts("Concat")
def convert_concat(layer: LayerParameter, ctx: CaffeContext) -> None:
    """Concat along Caffe's axis (``concat_dim`` in old nets)."""
    p = layer.concat_param
    inputs = ctx.bottoms(layer)
    shapes = [ctx.shape(t) for t in inputs]
    rank = len(shapes[0]) + 1
    axis = normalize_axis(p.axis if p.HasField("axis") or not p.HasField("concat_dim") else p.concat_dim, rank)
    if not 1 <= axis < rank:
        raise ctx.fail(layer, f"concatenation along axis {axis} is not supported")
    rest = {tuple(s[: axis - 1] + s[axis:]) for s in shapes}
    if len(rest) != 1 or any(len(s) + 1 != rank for s in shapes):
        raise ctx.fail(layer, f"bottom shapes {[list(s) for s in shapes]} disagree off axis {axis}")
    out_shape = list(shapes[0])
    out_shape[axis - 1] = sum(s[axis - 1] for s in shapes)
    ctx.add_node(layer, "Concat", inputs, tuple(out_shape), axis=axis)


@converts("Eltwise")
def convert_eltwise(layer: LayerParameter, ctx: CaffeContext) -> None:
    """Eltwise SUM with unit coefficients -> a chain of Add."""
    p = layer.eltwise_param
    if p.operation != caffe_pb2.EltwiseParameter.SUM:
        raise ctx.fail(layer, f"operation {caffe_pb2.EltwiseParameter.EltwiseOp.Name(p.operation)} is not supported")
    if any(c != 1.0 for c in p.coeff):
        raise ctx.fail(layer, f"coefficients {list(p.coeff)} are not supported (only 1)")
    inputs = ctx.bottoms(layer)
    if len(inputs) < 2:
        raise ctx.fail(layer, "needs at least two bottoms")
    shape = ctx.shape(inputs[0])
    if any(ctx.shape(t) != shape for t in inputs):
        raise ctx.fail(layer, "bottom shapes differ")
    total = inputs[0]
    for i, term in enumerate(inputs[1:-1], start=1):
        total = ctx.graph.add_node("Add", [total, term], f"{layer.name}/add{i}", shape)
    ctx.add_node(layer, "Add", [total, inputs[-1]], shape)


@converts("Flatten")
def convert_flatten(layer: LayerParameter, ctx: CaffeContext) -> None:
    """Flatten: axes [axis, end_axis] merged; Flatten(axis=1) in the usual case, else Reshape."""
    p = layer.flatten_param
    x = ctx.bottom(layer)
    shape = ctx.shape(x)
    rank = len(shape) + 1
    start, end = normalize_axis(p.axis, rank), normalize_axis(p.end_axis, rank)
    if not 1 <= start <= end < rank:
        raise ctx.fail(layer, f"flattening axes {p.axis}..{p.end_axis} is not supported")
    merged = math.prod(shape[start - 1 : end])
    out_shape = (*shape[: start - 1], merged, *shape[end:])
    if start == 1 and end == rank - 1:
        ctx.add_node(layer, "Flatten", [x], out_shape, axis=1)
    else:
        target = ctx.graph.add_int64(f"{layer.name}_shape", [0, *out_shape])
        ctx.add_node(layer, "Reshape", [x, target], out_shape)


@converts("Data")
def convert_data(layer: LayerParameter, ctx: CaffeContext) -> None:
    """Data layer of a train/test net: its first top is the graph input, its ``transform_param``
    (crop_size, mean_file or mean_value, scale) the model's preprocessing; the label top is unused.
    The size comes from crop_size, else the mean file, else ``ctx.input_hw``; colour images."""
    p = layer.transform_param
    if p.force_gray:
        raise ctx.fail(layer, "force_gray is not supported (the loaders give colour images)")
    if p.mean_file and p.mean_value:
        raise ctx.fail(layer, "transform_param has both mean_file and mean_value (Caffe refuses this)")
    preprocess = Preprocess(scale=float(p.scale))
    size = (int(p.crop_size),) * 2 if p.crop_size else None
    if p.crop_size:
        preprocess.crop = [int(p.crop_size)] * 2
    if p.mean_file:
        mean = read_mean_binaryproto(resolve_beside(ctx.prototxt, p.mean_file, layer, ctx))
        preprocess.mean_image = [float(v) for v in mean.reshape(-1)]
        preprocess.mean_shape = [int(d) for d in mean.shape]
        if size is not None and size != tuple(mean.shape[1:]):
            raise ctx.fail(layer, f"crop_size {p.crop_size} differs from the {mean.shape[1]} x "
                                  f"{mean.shape[2]} mean image")
        size = size or (int(mean.shape[1]), int(mean.shape[2]))
    elif p.mean_value:
        values = [float(v) for v in p.mean_value]
        if len(values) not in (1, 3):
            raise ctx.fail(layer, f"{len(values)} mean_value entries for a 3-channel image")
        preprocess.mean_values = values * (3 // len(values))
    try:
        preprocess.validate()
    except ValueError as err:
        raise ctx.fail(layer, f"transform_param: {err}") from None
    size = size or ctx.input_hw
    if not layer.top:
        raise ctx.fail(layer, "needs a top blob")
    if size is None:
        raise ctx.fail(layer, "the input size is not in the prototxt (no crop_size or mean_file): "
                              "give it, e.g. with --crop H,W")
    define_input(ctx, layer.top[0], (1, 3, *size), layer)
    ctx.preprocess = preprocess


def resolve_beside(prototxt: Path, name: str, layer: LayerParameter, ctx: CaffeContext) -> Path:
    """A file a prototxt names (relative to Caffe's working directory): as written if it exists,
    else the file of that name beside the prototxt."""
    for candidate in (Path(name), Path(prototxt).parent / Path(name).name):
        if candidate.is_file():
            return candidate
    raise ctx.fail(layer, f"mean_file {name} not found (looked beside the prototxt too)")


@converts("Accuracy")
def convert_accuracy(layer: LayerParameter, ctx: CaffeContext) -> None:
    """Accuracy of a test net: dropped (it needs the labels and computes no prediction)."""




def layer_blobs(layer: LayerParameter, ctx: CaffeContext, count: int, channels: int) -> list[np.ndarray]:
    """The ``count`` per-channel blobs of a BatchNorm / Scale layer (BatchNorm's third blob is
    its one scale factor) as float64, or a DyveError naming the layer when the count is wrong."""
    arrays = getattr(ctx.weights, "blobs", {}).get(layer.name)
    if arrays is not None and len(arrays) != count:
        raise DyveError(f"{ctx.weights.path}: layer '{layer.name}' (type {layer.type}) has "
                        f"{len(arrays)} blobs, expected {count}")
    shapes = [(1,) if layer.type == "BatchNorm" and i == 2 else (channels,) for i in range(count)]
    return [ctx.weights.get(layer.name, i, shape, any_shape=True).astype(np.float64)
            for i, shape in enumerate(shapes)]


def channel_count(layer: LayerParameter, ctx: CaffeContext, x: str) -> int:
    """Channels of the bottom ``x`` (axis 1)."""
    shape = ctx.shape(x)
    if not shape:
        raise ctx.fail(layer, "needs an input with a channel axis")
    return int(shape[0])


@converts("BatchNorm")
def convert_batch_norm(layer: LayerParameter, ctx: CaffeContext) -> None:
    """BatchNorm with stored statistics: y = (x - mean/s) / sqrt(var/s + eps), s the stored scale
    factor (0 meaning no statistics), folded into the preceding Conv / InnerProduct."""
    p = layer.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        raise ctx.fail(layer, "use_global_stats is false: batch statistics at test time are not supported")
    x = ctx.bottom(layer)
    channels = channel_count(layer, ctx, x)
    mean, var, factor = layer_blobs(layer, ctx, 3, channels)
    s = 0.0 if factor[0] == 0 else 1.0 / factor[0]  # Caffe's rule for a zero scale factor
    if not np.all(var * s + float(p.eps) > 0):
        raise ctx.fail(layer, "variance + eps is not positive for every channel")
    inv_std = 1.0 / np.sqrt(var * s + float(p.eps))
    fold_affine(layer, ctx, x, inv_std, -mean * s * inv_std)


@converts("Scale")
def convert_scale(layer: LayerParameter, ctx: CaffeContext) -> None:
    """Scale (per-channel gamma, optional beta) with learned blobs, folded into the preceding
    Conv / InnerProduct (usually through a BatchNorm already folded there)."""
    p = layer.scale_param
    if len(layer.bottom) != 1:
        raise ctx.fail(layer, "a scale taken from a second bottom is not supported")
    x = ctx.bottom(layer)
    if normalize_axis(p.axis, len(ctx.shape(x)) + 1) != 1 or p.num_axes != 1:
        raise ctx.fail(layer, f"axis {p.axis}, num_axes {p.num_axes}: only per-channel scales (1, 1)")
    channels = channel_count(layer, ctx, x)
    blobs = layer_blobs(layer, ctx, 2 if p.bias_term else 1, channels)
    gamma = blobs[0]
    beta = blobs[1] if p.bias_term else np.zeros_like(gamma)
    fold_affine(layer, ctx, x, gamma, beta)


def fold_affine(layer: LayerParameter, ctx: CaffeContext, x: str, mul: np.ndarray, add: np.ndarray) -> None:
    """Make y = x * mul + add (per channel) part of the Conv / Gemm node writing ``x``:
    w' = w * mul, b' = b * mul + add (in float64, rounded once). The top then names ``x``.

    Possible only when the node writes ``x`` for this layer alone (no node reads it yet and no
    other Caffe blob names it) and the layer runs in place; otherwise the per-channel Mul and Add
    would need broadcasting, which the engine's element-wise ops do not do."""
    graph = ctx.graph
    producer = next((n for n in graph.nodes if x in n.output), None)
    readers = [n for n in graph.nodes if x in n.input]
    aliases = [blob for blob, tensor in ctx.tensors.items() if tensor == x]
    in_place = layer.top and layer.top[0] == layer.bottom[0]
    if (producer is None or producer.op_type not in FOLDABLE_OPS or readers or not in_place
            or aliases != [layer.bottom[0]]
            or (producer.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1
                                                       for a in producer.attribute))):
        raise ctx.fail(layer, "cannot be folded into a preceding Convolution or InnerProduct "
                              "(run in place right after one), and the engine has no per-channel Mul/Add")
    inits = {t.name: i for i, t in enumerate(graph.initializers)}
    weight = numpy_helper.to_array(graph.initializers[inits[producer.input[1]]]).astype(np.float64)
    out_channels = weight.shape[0]
    if mul.shape != (out_channels,):
        raise ctx.fail(layer, f"has {mul.shape[0]} channels, its input {out_channels}")
    if len(producer.input) > 2:
        bias = numpy_helper.to_array(graph.initializers[inits[producer.input[2]]]).astype(np.float64)
    else:
        bias = np.zeros(out_channels)
        producer.input.append(graph.add_initializer(f"{producer.name}_b", bias.astype(np.float32)))
        inits[producer.input[2]] = len(graph.initializers) - 1
    scaled = weight * mul.reshape((-1,) + (1,) * (weight.ndim - 1))
    for index, array in ((1, scaled), (2, bias * mul + add)):
        name = producer.input[index]
        graph.initializers[inits[name]] = numpy_helper.from_array(array.astype(np.float32), name)
    ctx.set_top(layer, x)


# --------------------------------------------------------------------------- whole nets


def net_to_graph(
    net: caffe_pb2.NetParameter, weights: WeightSource, prototxt: Path,
    input_hw: tuple[int, int] | None = None,
) -> CaffeContext:
    """Convert every layer of ``net``; the context holds the graph and its output tensor (the
    last blob) and any preprocessing a Data layer gives."""
    ctx = CaffeContext(GraphBuilder(net.name or Path(prototxt).stem), weights, Path(prototxt),
                       input_hw=input_hw)
    for blob, dims in legacy_inputs(net, prototxt):
        define_input(ctx, blob, dims)
    for layer in net_layers(net):
        converter = LAYER_CONVERTERS.get(layer.type)
        if converter is None:
            raise ctx.fail(layer, "this layer type is not supported")
        converter(layer, ctx)
    if ctx.input_name is None:
        raise DyveError(f"{prototxt}: the net declares no input (Input layer or input/input_dim)")
    if ctx.last_output is None or ctx.last_output == ctx.input_name:
        raise DyveError(f"{prototxt}: the net computes nothing")
    check_in_place_tops(net_layers(net), prototxt)
    return ctx


IN_PLACE_TYPES = ("ReLU", "Dropout")


def check_in_place_tops(layers: list[LayerParameter], prototxt: Path) -> None:
    """Refuse an element-wise layer (run in place by convention) whose top is read by no later
    layer while its bottom is: a renamed in-place top (one changed byte) would otherwise drop
    the layer and silently rewire the net around it."""
    for i, layer in enumerate(layers):
        if layer.type not in IN_PLACE_TYPES or len(layer.top) != 1 or len(layer.bottom) != 1:
            continue
        top, bottom = layer.top[0], layer.bottom[0]
        later = [b for other in layers[i + 1:] for b in other.bottom]
        if top != bottom and top not in later and bottom in later:
            raise DyveError(f"{prototxt}: layer '{layer.name}' (type {layer.type}): its top '{top}' is "
                            f"read by no later layer while its bottom '{bottom}' is (a renamed in-place top?)")


def caffe_model(net: caffe_pb2.NetParameter, weights: WeightSource, prototxt: Path,
                fmt: str, files: list[Path], input_hw: tuple[int, int] | None = None) -> ConvertedModel:
    """Convert a parsed net with the given weights into a :class:`ConvertedModel` (with the
    preprocessing of its Data layer, if it has one, under ``dyvedeep.preprocess``)."""
    ctx = net_to_graph(net, weights, prototxt, input_hw)
    model = ctx.graph.to_model(INPUT_NAME, ctx.last_output, producer=f"dyvedeep.convert.{fmt}")
    metadata = {SOURCE_KEY: source_metadata(fmt, files)}
    if ctx.preprocess is not None:
        metadata[PREPROCESS_KEY] = ctx.preprocess.to_json()
    return ConvertedModel(model, metadata)


def convert_caffe(prototxt: Path, caffemodel: Path, input_hw: tuple[int, int] | None = None) -> ConvertedModel:
    """Convert a Caffe deploy or test prototxt and its caffemodel; ``input_hw`` is the input size
    of a Data layer that does not fix it."""
    net = read_prototxt(prototxt)
    weights = CaffemodelWeights(Path(caffemodel), read_caffemodel(caffemodel))
    return caffe_model(net, weights, Path(prototxt), "caffe", [Path(prototxt), Path(caffemodel)], input_hw)


def weight_layers(net: caffe_pb2.NetParameter) -> list[LayerParameter]:
    """The Convolution and InnerProduct layers of ``net``, in order."""
    return [layer for layer in net_layers(net) if layer.type in ("Convolution", "InnerProduct")]
