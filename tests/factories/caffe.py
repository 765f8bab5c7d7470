"""Caffe nets for the tests: the structure of a parsed net (TEST-phase layers, blob and parameter
shapes, from the layer parameters alone) and writers of random-weight caffemodels (new or V1
format, deterministic, He-scaled) and mean.binaryproto files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from dyvedeep import caffe_pb2
from dyvedeep.fetch import mirror_path
from tests.factories.prototxts import (
    ALEXNET_PROTOTXT_URL,
    BVLC_ALEXNET_DEPLOY,
    OVERFEAT_FAST_PROTOTXT,
    TINY_NETS,
    vgg16_prototxt,
)

# V1 enum names used by the tiny nets -> layer type strings.
_V1_TYPES = {
    "CONVOLUTION": "Convolution", "RELU": "ReLU", "LRN": "LRN", "POOLING": "Pooling",
    "SPLIT": "Split", "ELTWISE": "Eltwise", "CONCAT": "Concat", "FLATTEN": "Flatten",
    "INNER_PRODUCT": "InnerProduct", "DROPOUT": "Dropout", "SOFTMAX": "Softmax",
}


# --------------------------------------------------------------------------- net structure


def parse_prototxt(text: str) -> caffe_pb2.NetParameter:
    """A prototxt text as a NetParameter."""
    return text_format.Parse(text, caffe_pb2.NetParameter())


@dataclass
class Layer:
    """The parts of a (new or V1) layer the factory uses."""

    name: str
    type: str
    bottom: list[str]
    top: list[str]
    param: object  # the LayerParameter or V1LayerParameter


def layers_of(net: caffe_pb2.NetParameter) -> list[Layer]:
    """The layers of ``net`` in the TEST phase, V1 types named as in the new format."""
    result = []
    for layer in net.layer:
        if layer.include and not any(r.phase == caffe_pb2.TEST for r in layer.include):
            continue
        result.append(Layer(layer.name, layer.type, list(layer.bottom), list(layer.top), layer))
    for v1 in net.layers:
        type_name = caffe_pb2.V1LayerParameter.LayerType.Name(v1.type)
        result.append(Layer(v1.name, _V1_TYPES[type_name], list(v1.bottom), list(v1.top), v1))
    return result


def net_input(net: caffe_pb2.NetParameter) -> tuple[str, tuple[int, ...]]:
    """Name and N x C x H x W shape of the net's input."""
    if net.input:
        dims = net.input_shape[0].dim if net.input_shape else net.input_dim[:4]
        return net.input[0], tuple(int(d) for d in dims)
    for layer in layers_of(net):
        if layer.type == "Input":
            return layer.top[0], tuple(int(d) for d in layer.param.input_param.shape[0].dim)
    raise ValueError("net has no input")


def _pair(values, h_w: tuple[int, int] | None, default: int) -> tuple[int, int]:
    if h_w is not None:
        return h_w
    values = list(values)
    if not values:
        return default, default
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def conv_params(p: caffe_pb2.ConvolutionParameter) -> tuple[tuple[int, int], ...]:
    """(kernel, pad, stride, dilation) of a convolution, each (h, w)."""
    kernel = _pair(p.kernel_size, (p.kernel_h, p.kernel_w) if p.HasField("kernel_h") else None, 0)
    pad = _pair(p.pad, (p.pad_h, p.pad_w) if p.HasField("pad_h") else None, 0)
    stride = _pair(p.stride, (p.stride_h, p.stride_w) if p.HasField("stride_h") else None, 1)
    dilation = _pair(p.dilation, None, 1)
    return kernel, pad, stride, dilation


def pool_params(p: caffe_pb2.PoolingParameter) -> tuple[tuple[int, int], ...]:
    """(kernel, pad, stride) of a pooling layer, each (h, w)."""
    kernel = (p.kernel_size,) * 2 if p.HasField("kernel_size") else (p.kernel_h, p.kernel_w)
    pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad,) * 2
    stride = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride,) * 2
    return kernel, pad, stride


def pooled_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Caffe's pooling output size (pooling_layer.cpp)."""
    out = int(math.ceil((size + 2 * pad - kernel) / stride)) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def blob_shapes(net: caffe_pb2.NetParameter) -> dict[str, tuple[int, ...]]:
    """Shape (with N) of every blob, from the layer parameters alone."""
    name, dims = net_input(net)
    shapes = {name: dims}
    for layer in layers_of(net):
        p = layer.param
        ins = [shapes[b] for b in layer.bottom]
        if layer.type in ("Input",):
            continue
        if layer.type == "Convolution":
            (kh, kw), (ph, pw), (sh, sw), (dh, dw) = conv_params(p.convolution_param)
            n, _, h, w = ins[0]
            out = (n, p.convolution_param.num_output,
                   (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
        elif layer.type == "Pooling":
            n, c, h, w = ins[0]
            if p.pooling_param.global_pooling:
                out = (n, c, 1, 1)
            else:
                (kh, kw), (ph, pw), (sh, sw) = pool_params(p.pooling_param)
                out = (n, c, pooled_size(h, kh, sh, ph), pooled_size(w, kw, sw, pw))
        elif layer.type == "InnerProduct":
            out = (ins[0][0], p.inner_product_param.num_output)
        elif layer.type == "Concat":
            axis = p.concat_param.axis if p.concat_param.HasField("axis") else p.concat_param.concat_dim
            out = list(ins[0])
            out[axis] = sum(s[axis] for s in ins)
            out = tuple(out)
        elif layer.type == "Flatten":
            fp = getattr(p, "flatten_param", caffe_pb2.FlattenParameter())
            start, end = fp.axis % len(ins[0]), fp.end_axis % len(ins[0])
            out = (*ins[0][:start], math.prod(ins[0][start : end + 1]), *ins[0][end + 1 :])
        else:  # ReLU, LRN, Softmax, Dropout, Split, Eltwise keep the shape
            out = ins[0]
        for top in layer.top:
            shapes[top] = tuple(out)
    return shapes


def param_shapes(net: caffe_pb2.NetParameter) -> dict[str, list[tuple[int, ...]]]:
    """Shapes of the weight and bias blobs of every Convolution / InnerProduct layer."""
    shapes = blob_shapes(net)
    params = {}
    for layer in layers_of(net):
        p = layer.param
        if layer.type == "Convolution":
            cp = p.convolution_param
            (kh, kw), *_ = conv_params(cp)
            c_in = shapes[layer.bottom[0]][1]
            params[layer.name] = [(cp.num_output, c_in // cp.group, kh, kw)] + (
                [(cp.num_output,)] if cp.bias_term else [])
        elif layer.type == "InnerProduct":
            ip = p.inner_product_param
            fan_in = math.prod(shapes[layer.bottom[0]][1:])
            w = (fan_in, ip.num_output) if ip.transpose else (ip.num_output, fan_in)
            params[layer.name] = [w] + ([(ip.num_output,)] if ip.bias_term else [])
    return params


# --------------------------------------------------------------------------- weights and files


def random_weights(net: caffe_pb2.NetParameter, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Deterministic He-scaled float32 weights and small biases for every layer with parameters."""
    rng = np.random.default_rng(seed)
    transposed = _transposed_ip(net)
    weights = {}
    for name, shapes in param_shapes(net).items():
        w_shape = shapes[0]
        if len(w_shape) == 4:
            fan_in = math.prod(w_shape[1:])
        else:  # inner product: (out, in), or (in, out) when transposed
            fan_in = w_shape[0] if name in transposed else w_shape[1]
        blobs = [rng.standard_normal(w_shape, dtype=np.float32) * np.float32(math.sqrt(2.0 / fan_in))]
        if len(shapes) > 1:
            blobs.append(rng.uniform(-0.1, 0.1, shapes[1]).astype(np.float32))
        weights[name] = blobs
    return weights


def _transposed_ip(net: caffe_pb2.NetParameter) -> set[str]:
    return {l.name for l in layers_of(net)
            if l.type == "InnerProduct" and l.param.inner_product_param.transpose}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def fill_blob(blob: caffe_pb2.BlobProto, array: np.ndarray, legacy: bool) -> None:
    """Set ``blob`` to ``array``: shape (or legacy num/channels/height/width) and packed data.

    The data goes in through protobuf's own parser (``MergeFromString`` of the packed field
    ``data = 5``), which takes well under a second for VGG-16 where ``extend`` takes a minute.
    """
    if legacy:
        dims = (1,) * (4 - array.ndim) + array.shape
        blob.num, blob.channels, blob.height, blob.width = (int(d) for d in dims)
    else:
        blob.shape.dim.extend(int(d) for d in array.shape)
    payload = np.ascontiguousarray(array, dtype="<f4").tobytes()
    blob.MergeFromString(_varint((5 << 3) | 2) + _varint(len(payload)) + payload)


def write_caffemodel(path: Path, net: caffe_pb2.NetParameter, weights: dict[str, list[np.ndarray]],
                     v1: bool = False) -> None:
    """Write ``weights`` as a caffemodel: new format (``layer``, blob shapes) or old V1 format
    (``layers`` with type enums, legacy 4-D blob dims). Written layer by layer: concatenated
    serialized NetParameters merge into one."""
    with open(path, "wb") as f:
        f.write(caffe_pb2.NetParameter(name=net.name or "net").SerializeToString())
        for layer in layers_of(net):
            entry = caffe_pb2.NetParameter()
            if v1:
                if layer.type not in _V1_TYPES.values():  # e.g. Input: no V1 type, no weights
                    continue
                item = entry.layers.add(name=layer.name, bottom=layer.bottom, top=layer.top)
                item.type = {v: k for k, v in _V1_TYPES.items()}[layer.type]
            else:
                item = entry.layer.add(name=layer.name, type=layer.type, bottom=layer.bottom, top=layer.top)
            for array in weights.get(layer.name, []):
                fill_blob(item.blobs.add(), array, legacy=v1)
            f.write(entry.SerializeToString())


@dataclass
class CaffeFiles:
    """A prototxt and caffemodel the factory wrote, with the parsed net and the weights."""

    prototxt: Path
    caffemodel: Path
    net: caffe_pb2.NetParameter
    weights: dict[str, list[np.ndarray]] | None


def write_caffe_model(directory: Path, name: str, prototxt_text: str, seed: int = 0,
                      v1_weights: bool = False, keep_weights: bool = True) -> CaffeFiles:
    """Write ``name``.prototxt and a random-weight ``name``.caffemodel into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prototxt = directory / f"{name}.prototxt"
    prototxt.write_text(prototxt_text)
    net = parse_prototxt(prototxt_text)
    weights = random_weights(net, seed)
    caffemodel = directory / f"{name}.caffemodel"
    write_caffemodel(caffemodel, net, weights, v1=v1_weights)
    return CaffeFiles(prototxt, caffemodel, net, weights if keep_weights else None)


def tiny_model(directory: Path, name: str, seed: int = 0, v1_weights: bool = False) -> CaffeFiles:
    """One of :data:`TINY_NETS` with random weights."""
    return write_caffe_model(directory, name, TINY_NETS[name], seed, v1_weights)


def alexnet(directory: Path, mirror: Path | None = None, seed: int = 0) -> CaffeFiles:
    """AlexNet with random weights; the real BVLC deploy prototxt from the mirror when present."""
    text = BVLC_ALEXNET_DEPLOY
    if mirror is not None:
        real = mirror_path(mirror, ALEXNET_PROTOTXT_URL)
        if real.is_file():
            text = real.read_text()
    return write_caffe_model(directory, "alexnet", text, seed)


def vgg16(directory: Path, seed: int = 0) -> CaffeFiles:
    """VGG-16 (V1 prototxt and V1 caffemodel, 138M random weights; weights not kept)."""
    return write_caffe_model(directory, "vgg16", vgg16_prototxt(), seed, v1_weights=True, keep_weights=False)


def overfeat_fast(directory: Path, seed: int = 0) -> CaffeFiles:
    """OverFeat fast (145M random weights; weights not kept)."""
    return write_caffe_model(directory, "overfeat_fast", OVERFEAT_FAST_PROTOTXT, seed, keep_weights=False)


def random_input(net: caffe_pb2.NetParameter, batch: int = 1, seed: int = 1) -> np.ndarray:
    """A standard-normal float32 input batch for ``net``."""
    _, dims = net_input(net)
    return np.random.default_rng(seed).standard_normal((batch, *dims[1:]), dtype=np.float32)


def write_mean_binaryproto(path: Path, mean: np.ndarray) -> None:
    """Write a Caffe mean.binaryproto holding ``mean`` (C, H, W) as a 1 x C x H x W blob."""
    blob = caffe_pb2.BlobProto()
    fill_blob(blob, np.asarray(mean, np.float32)[None], legacy=True)
    Path(path).write_bytes(blob.SerializeToString())
