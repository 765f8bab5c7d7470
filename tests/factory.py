"""Models the tests build themselves, so that the suite runs without the mirror of real files.

- Caffe prototxts: tiny nets exercising every supported layer type (:data:`TINY_NETS`), and the
  real architectures AlexNet (BVLC deploy), VGG-16 (deploy, old V1 ``layers`` format) and
  OverFeat "fast";
- random-weight caffemodels for them (new or V1 format, deterministic, He-scaled), a Deep
  Compression ``.net`` encoder and a small OpenVINO IR writer;
- :func:`caffe_forward`, a float64 numpy reference of Caffe's forward pass (conv, pooling with
  Caffe's ceil rounding and AVE divisor, LRN in both regions, ...), written from Caffe's
  formulas independently of the converters.
"""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from PIL import Image

from dyvedeep import caffe_pb2
from dyvedeep.fetch import mirror_path as fetch_mirror_path

# --------------------------------------------------------------------------- prototxts

BVLC_ALEXNET_DEPLOY = """
name: "AlexNet"
input: "data"
input_dim: 10
input_dim: 3
input_dim: 227
input_dim: 227
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 96 kernel_size: 11 stride: 4 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1"
  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "pool1" type: "Pooling" bottom: "norm1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 256 pad: 2 kernel_size: 5 group: 2 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "norm2" type: "LRN" bottom: "conv2" top: "norm2"
  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "pool2" type: "Pooling" bottom: "norm2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "conv3" type: "Convolution" bottom: "pool2" top: "conv3"
  convolution_param { num_output: 384 pad: 1 kernel_size: 3 } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "conv4" type: "Convolution" bottom: "conv3" top: "conv4"
  convolution_param { num_output: 384 pad: 1 kernel_size: 3 group: 2 } }
layer { name: "relu4" type: "ReLU" bottom: "conv4" top: "conv4" }
layer { name: "conv5" type: "Convolution" bottom: "conv4" top: "conv5"
  convolution_param { num_output: 256 pad: 1 kernel_size: 3 group: 2 } }
layer { name: "relu5" type: "ReLU" bottom: "conv5" top: "conv5" }
layer { name: "pool5" type: "Pooling" bottom: "conv5" top: "pool5"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6"
  inner_product_param { num_output: 4096 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7"
  inner_product_param { num_output: 4096 } }
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "drop7" type: "Dropout" bottom: "fc7" top: "fc7" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8"
  inner_product_param { num_output: 1000 } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""

ALEXNET_PROTOTXT_URL = (
    "https://github.com/songhan/Deep-Compression-AlexNet/raw/"
    "a4ab6859e1bc86dec3607c8cdd53b0a72da6bcda/bvlc_alexnet_deploy.prototxt"
)


def vgg16_prototxt() -> str:
    """VGG-16's deploy prototxt (VGG_ILSVRC_16_layers_deploy) in the old V1 ``layers`` format."""
    lines = ['name: "VGG_ILSVRC_16_layers"', 'input: "data"',
             "input_dim: 10", "input_dim: 3", "input_dim: 224", "input_dim: 224"]
    bottom = "data"
    for block, (convs, width) in enumerate([(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)], start=1):
        for i in range(1, convs + 1):
            name = f"conv{block}_{i}"
            lines.append(f'layers {{ bottom: "{bottom}" top: "{name}" name: "{name}" type: CONVOLUTION '
                         f"convolution_param {{ num_output: {width} pad: 1 kernel_size: 3 }} }}")
            lines.append(f'layers {{ bottom: "{name}" top: "{name}" name: "relu{block}_{i}" type: RELU }}')
            bottom = name
        lines.append(f'layers {{ bottom: "{bottom}" top: "pool{block}" name: "pool{block}" type: POOLING '
                     "pooling_param { pool: MAX kernel_size: 2 stride: 2 } }")
        bottom = f"pool{block}"
    for name, width in (("fc6", 4096), ("fc7", 4096), ("fc8", 1000)):
        lines.append(f'layers {{ bottom: "{bottom}" top: "{name}" name: "{name}" type: INNER_PRODUCT '
                     f"inner_product_param {{ num_output: {width} }} }}")
        bottom = name
        if name != "fc8":
            k = name[2:]
            lines.append(f'layers {{ bottom: "{name}" top: "{name}" name: "relu{k}" type: RELU }}')
            lines.append(f'layers {{ bottom: "{name}" top: "{name}" name: "drop{k}" type: DROPOUT '
                         "dropout_param { dropout_ratio: 0.5 } }")
    lines.append('layers { bottom: "fc8" top: "prob" name: "prob" type: SOFTMAX }')
    return "\n".join(lines) + "\n"


# OverFeat "fast" (Sermanet et al. 2014, table 1): 231 x 231 input; conv3-5 pad 1, conv2 pad 0.
OVERFEAT_FAST_PROTOTXT = """
name: "OverFeat_fast"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 231 dim: 231 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 96 kernel_size: 11 stride: 4 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 256 kernel_size: 5 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv3" type: "Convolution" bottom: "pool2" top: "conv3"
  convolution_param { num_output: 512 pad: 1 kernel_size: 3 } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "conv4" type: "Convolution" bottom: "conv3" top: "conv4"
  convolution_param { num_output: 1024 pad: 1 kernel_size: 3 } }
layer { name: "relu4" type: "ReLU" bottom: "conv4" top: "conv4" }
layer { name: "conv5" type: "Convolution" bottom: "conv4" top: "conv5"
  convolution_param { num_output: 1024 pad: 1 kernel_size: 3 } }
layer { name: "relu5" type: "ReLU" bottom: "conv5" top: "conv5" }
layer { name: "pool5" type: "Pooling" bottom: "conv5" top: "pool5"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6" inner_product_param { num_output: 3072 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7" inner_product_param { num_output: 4096 } }
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "drop7" type: "Dropout" bottom: "fc7" top: "fc7" }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8" inner_product_param { num_output: 1000 } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""

# Blob shapes (C, H, W) the real architectures must have; checked by the tests.
OVERFEAT_FAST_SHAPES = {
    "conv1": (96, 56, 56), "pool1": (96, 28, 28), "conv2": (256, 24, 24), "pool2": (256, 12, 12),
    "conv3": (512, 12, 12), "conv4": (1024, 12, 12), "conv5": (1024, 12, 12), "pool5": (1024, 6, 6),
    "fc6": (3072,), "fc7": (4096,), "fc8": (1000,),
}


def _input_layer(c: int, h: int, w: int) -> str:
    return (f'layer {{ name: "data" type: "Input" top: "data" '
            f"input_param {{ shape {{ dim: 1 dim: {c} dim: {h} dim: {w} }} }} }}\n")


# Tiny nets, each exercising some layer types and parameter forms.
TINY_NETS: dict[str, str] = {
    "conv_group_dilation": 'name: "conv_group_dilation"\n' + _input_layer(4, 13, 11) + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 9 kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 0 stride_h: 2 stride_w: 1
                      dilation: 2 group: 3 bias_term: false } }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
  convolution_param { num_output: 5 kernel_size: 3 kernel_size: 1 pad: 0 pad: 1 stride: 1 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "conv3" top: "ip1" inner_product_param { num_output: 7 } }
layer { name: "relu2" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 bias_term: false } }
""",
    "pool_ceil": 'name: "pool_ceil"\n' + _input_layer(3, 12, 12) + """
layer { name: "max_pad" type: "Pooling" bottom: "data" top: "max_pad"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ave_pad_overhang" type: "Pooling" bottom: "data" top: "ave_pad_overhang"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ave_nopad" type: "Pooling" bottom: "data" top: "ave_nopad"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "ave_pad_exact" type: "Pooling" bottom: "max_pad" top: "ave_pad_exact"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "max_rect" type: "Pooling" bottom: "data" top: "max_rect"
  pooling_param { pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 } }
layer { name: "ave_rect" type: "Pooling" bottom: "data" top: "ave_rect"
  pooling_param { pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 } }
layer { name: "max_dropped_window" type: "Pooling" bottom: "data" top: "max_dropped_window"
  pooling_param { pool: MAX kernel_size: 3 stride: 4 pad: 2 } }
layer { name: "ave_dropped_window" type: "Pooling" bottom: "data" top: "ave_dropped_window"
  pooling_param { pool: AVE kernel_size: 3 stride: 4 pad: 2 } }
""",
    "lrn": 'name: "lrn"\n' + _input_layer(7, 6, 5) + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "across" type: "LRN" bottom: "conv1" top: "across"
  lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 } }
layer { name: "within" type: "LRN" bottom: "across" top: "within"
  lrn_param { local_size: 3 alpha: 0.3 beta: 0.6 norm_region: WITHIN_CHANNEL } }
layer { name: "across_defaults" type: "LRN" bottom: "within" top: "across_defaults"
  lrn_param { local_size: 3 } }
layer { name: "within5" type: "LRN" bottom: "across_defaults" top: "within5"
  lrn_param { local_size: 5 alpha: 2 beta: 0.75 norm_region: WITHIN_CHANNEL } }
""",
    "concat_eltwise_split": 'name: "concat_eltwise_split"\n' + _input_layer(3, 8, 8) + """
layer { name: "conv_a" type: "Convolution" bottom: "data" top: "conv_a"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "conv_b" type: "Convolution" bottom: "data" top: "conv_b"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "split" type: "Split" bottom: "conv_a" top: "a1" top: "a2" }
layer { name: "sum" type: "Eltwise" bottom: "a1" bottom: "conv_b" bottom: "a2" top: "sum"
  eltwise_param { operation: SUM coeff: 1 coeff: 1 coeff: 1 } }
layer { name: "sum2" type: "Eltwise" bottom: "sum" bottom: "conv_b" top: "sum2" }
layer { name: "cat" type: "Concat" bottom: "sum2" bottom: "conv_b" bottom: "a1" top: "cat" }
layer { name: "conv_c" type: "Convolution" bottom: "cat" top: "conv_c"
  convolution_param { num_output: 5 kernel_size: 1 } }
layer { name: "relu_c" type: "ReLU" bottom: "conv_c" top: "conv_c" }
layer { name: "flat" type: "Flatten" bottom: "conv_c" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip" inner_product_param { num_output: 6 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
""",
    "global_pool": 'name: "global_pool"\n' + """
layer { name: "train_data" type: "Data" top: "data" include { phase: TRAIN } }
layer { name: "data" type: "Input" top: "data" include { phase: TEST }
  input_param { shape { dim: 1 dim: 3 dim: 9 dim: 7 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "gap" type: "Pooling" bottom: "conv1" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "gmp" type: "Pooling" bottom: "conv1" top: "gmp" pooling_param { pool: MAX global_pooling: true } }
layer { name: "cat" type: "Concat" bottom: "gap" bottom: "gmp" top: "cat" concat_param { axis: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "cat" top: "ip" inner_product_param { num_output: 4 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" top: "loss" include { phase: TRAIN } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
""",
    "flatten_axes": 'name: "flatten_axes"\ninput: "image"\ninput_shape { dim: 1 dim: 2 dim: 5 dim: 6 }\n' + """
layer { name: "conv1" type: "Convolution" bottom: "image" top: "conv1"
  convolution_param { num_output: 3 kernel_size: 2 } }
layer { name: "flat12" type: "Flatten" bottom: "conv1" top: "flat12" flatten_param { axis: 1 end_axis: 2 } }
layer { name: "ip_t" type: "InnerProduct" bottom: "flat12" top: "ip_t"
  inner_product_param { num_output: 4 transpose: true } }
layer { name: "prob" type: "Softmax" bottom: "ip_t" top: "prob" softmax_param { axis: -1 } }
""",
    "v1_legacy": """
name: "v1_legacy"
input: "data"
input_dim: 1
input_dim: 3
input_dim: 10
input_dim: 10
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2 convolution_param { num_output: 4 kernel_size: 3 } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "norm1" type: LRN bottom: "conv1" top: "norm1" lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 } }
layers { name: "pool1" type: POOLING bottom: "norm1" top: "pool1" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layers { name: "split" type: SPLIT bottom: "pool1" top: "p1" top: "p2" }
layers { name: "sum" type: ELTWISE bottom: "p1" bottom: "p2" top: "sum" }
layers { name: "cat" type: CONCAT bottom: "sum" bottom: "p1" top: "cat" concat_param { concat_dim: 1 } }
layers { name: "flat" type: FLATTEN bottom: "cat" top: "flat" }
layers { name: "ip1" type: INNER_PRODUCT bottom: "flat" top: "ip1" inner_product_param { num_output: 5 } }
layers { name: "drop1" type: DROPOUT bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.5 } }
layers { name: "prob" type: SOFTMAX bottom: "ip1" top: "prob" }
""",
}

# A net for Deep Compression files: 8-bit conv layers, 4-bit fc/ip layers, a ReLU named *conv*.
DEEP_COMPRESSION_TINY = 'name: "dc_tiny"\n' + _input_layer(3, 12, 12) + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 16 kernel_size: 3 stride: 2 } }
layer { name: "relu_conv1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fire/conv3x3" type: "Convolution" bottom: "pool1" top: "fire/conv3x3"
  convolution_param { num_output: 24 kernel_size: 3 pad: 1 } }
layer { name: "relu_fire" type: "ReLU" bottom: "fire/conv3x3" top: "fire/conv3x3" }
layer { name: "fc6" type: "InnerProduct" bottom: "fire/conv3x3" top: "fc6" inner_product_param { num_output: 20 } }
layer { name: "ip7" type: "InnerProduct" bottom: "fc6" top: "ip7" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "ip7" top: "prob" }
"""

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
        real = Path(mirror) / ALEXNET_PROTOTXT_URL.split("://", 1)[1]
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


# --------------------------------------------------------------------------- Deep Compression


def _pack_nibbles(values: np.ndarray) -> bytes:
    values = np.asarray(values, dtype=np.uint8)
    if len(values) % 2:
        values = np.append(values, np.uint8(0))
    return (values[0::2] | (values[1::2] << 4)).astype(np.uint8).tobytes()


def encode_deep_compression(path: Path, net: caffe_pb2.NetParameter, weights: dict[str, list[np.ndarray]],
                            density: float = 0.25) -> dict[str, list[np.ndarray]]:
    """Prune, quantize and write ``weights`` as a Deep Compression .net file; returns the weights
    the file decodes to (dense, float32)."""
    names = [l.name for l in layers_of(net) if l.type in ("Convolution", "InnerProduct")
             and any(k in l.name for k in ("conv", "fc", "ip"))]
    counts, payload, decoded = [], [], {}
    for name in names:
        w, b = weights[name]
        bits = 8 if "conv" in name else 4
        flat = w.reshape(-1)
        keep = np.sort(np.argsort(-np.abs(flat), kind="stable")[: max(1, int(density * flat.size))])
        values = flat[keep]
        codebook = np.zeros(2**bits, np.float32)
        codebook[1:] = np.linspace(values.min(), values.max(), 2**bits - 1, dtype=np.float32)
        codes = 1 + np.abs(values[:, None] - codebook[None, 1:]).argmin(axis=1)
        positions, stream_codes, gaps, previous = [], [], [], -1
        for position, code in zip(keep, codes):
            while position - previous - 1 > 15:  # gap too long for 4 bits: a zero filler entry
                previous += 16
                positions.append(previous), stream_codes.append(0), gaps.append(15)
            gaps.append(position - previous - 1)
            positions.append(position), stream_codes.append(code)
            previous = position
        counts.append(len(positions))
        code_bytes = np.asarray(stream_codes, np.uint8).tobytes() if bits == 8 else _pack_nibbles(stream_codes)
        payload.append(codebook.astype("<f4").tobytes() + b.astype("<f4").tobytes() + code_bytes + _pack_nibbles(gaps))
        dense = np.zeros(flat.size, np.float32)
        dense[positions] = codebook[stream_codes]
        decoded[name] = [dense.reshape(w.shape), b.copy()]
    Path(path).write_bytes(np.asarray(counts, "<u4").tobytes() + b"".join(payload))
    return decoded


# --------------------------------------------------------------------------- OpenVINO IR


TINY_FIRE_PROTOTXT = 'name: "tiny_fire"\n' + _input_layer(3, 17, 17) + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 stride: 2 } }
layer { name: "relu_conv1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fire2/squeeze1x1" type: "Convolution" bottom: "pool1" top: "fire2/squeeze1x1"
  convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "fire2/relu_squeeze1x1" type: "ReLU" bottom: "fire2/squeeze1x1" top: "fire2/squeeze1x1" }
layer { name: "fire2/expand1x1" type: "Convolution" bottom: "fire2/squeeze1x1" top: "fire2/expand1x1"
  convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "fire2/relu_expand1x1" type: "ReLU" bottom: "fire2/expand1x1" top: "fire2/expand1x1" }
layer { name: "fire2/expand3x3" type: "Convolution" bottom: "fire2/squeeze1x1" top: "fire2/expand3x3"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "fire2/relu_expand3x3" type: "ReLU" bottom: "fire2/expand3x3" top: "fire2/expand3x3" }
layer { name: "fire2/concat" type: "Concat" bottom: "fire2/expand1x1" bottom: "fire2/expand3x3" top: "fire2/concat" }
layer { name: "conv10" type: "Convolution" bottom: "fire2/concat" top: "conv10"
  convolution_param { num_output: 5 kernel_size: 1 } }
layer { name: "relu_conv10" type: "ReLU" bottom: "conv10" top: "conv10" }
layer { name: "pool10" type: "Pooling" bottom: "conv10" top: "pool10" pooling_param { pool: AVE global_pooling: true } }
layer { name: "prob" type: "Softmax" bottom: "pool10" top: "prob" }
"""


@dataclass
class OpenVinoFiles:
    """An IR the factory wrote, with the equivalent Caffe net and the weights it holds."""

    xml: Path
    bin: Path
    net: caffe_pb2.NetParameter
    weights: dict[str, list[np.ndarray]]


class _IrWriter:
    """Accumulates IR layers, edges and the .bin blob."""

    def __init__(self, fp16: bool) -> None:
        self.fp16 = fp16
        self.layers = ET.Element("layers")
        self.edges = ET.Element("edges")
        self.blob = bytearray()
        self.next_id = 0

    def layer(self, name: str, op: str, version: str, data: dict[str, str] | None,
              inputs: list[tuple[int, int, tuple[int, ...]]], outputs: list[tuple[tuple[int, ...], str, str]]) -> list[int]:
        """Add a layer; ``inputs`` are (layer id, port, dims) sources; returns output port ids."""
        lid = self.next_id
        self.next_id += 1
        element = ET.SubElement(self.layers, "layer", id=str(lid), name=name, type=op, version=version)
        if data is not None:
            ET.SubElement(element, "data", data)
        if inputs:
            input_element = ET.SubElement(element, "input")
            for port, (src, src_port, dims) in enumerate(inputs):
                p = ET.SubElement(input_element, "port", id=str(port), precision="FP32")
                for d in dims:
                    ET.SubElement(p, "dim").text = str(d)
                ET.SubElement(self.edges, "edge", {"from-layer": str(src), "from-port": str(src_port),
                                                   "to-layer": str(lid), "to-port": str(port)})
        ports = []
        if outputs:
            output_element = ET.SubElement(element, "output")
            for k, (dims, precision, names) in enumerate(outputs):
                attrs = {"id": str(len(inputs) + k), "precision": precision}
                if names:
                    attrs["names"] = names
                p = ET.SubElement(output_element, "port", attrs)
                for d in dims:
                    ET.SubElement(p, "dim").text = str(d)
                ports.append(len(inputs) + k)
        self.last_id = lid
        return ports

    def const(self, name: str, array: np.ndarray) -> tuple[int, int, tuple[int, ...]]:
        """A (possibly FP16-compressed) float constant; returns its float32 source."""
        stored = array.astype(np.float16 if self.fp16 else np.float32)
        offset = len(self.blob)
        self.blob += stored.astype(stored.dtype.newbyteorder("<")).tobytes()
        kind, precision = ("f16", "FP16") if self.fp16 else ("f32", "FP32")
        shape = ", ".join(str(d) for d in array.shape)
        (port,) = self.layer(f"{name}_compressed" if self.fp16 else name, "Const", "opset1",
                             {"element_type": kind, "shape": shape, "offset": str(offset), "size": str(stored.nbytes)},
                             [], [(array.shape, precision, "")])
        source = (self.last_id, port, array.shape)
        if self.fp16:
            (port,) = self.layer(name, "Convert", "opset1", {"destination_type": "f32"}, [source],
                                 [(array.shape, "FP32", "")])
            source = (self.last_id, port, array.shape)
        return source


def write_openvino_ir(directory: Path, fp16: bool = True, seed: int = 0) -> OpenVinoFiles:
    """Write a small SqueezeNet-like IR (``tiny_fire.xml`` + ``.bin``) as the Model Optimizer
    writes SqueezeNet v1.1: FP16 Const + Convert, Convolution + Add bias, ReLU, MaxPool with
    ceil rounding, Concat, ReduceMean, SoftMax. Returns it with the equivalent Caffe net and
    the weights as stored (FP16-rounded when ``fp16``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    net = parse_prototxt(TINY_FIRE_PROTOTXT)
    weights = random_weights(net, seed)
    if fp16:
        weights = {k: [a.astype(np.float16).astype(np.float32) for a in v] for k, v in weights.items()}
    shapes = blob_shapes(net)
    ir = _IrWriter(fp16)
    tensors: dict[str, tuple[int, int, tuple[int, ...]]] = {}
    _, in_dims = net_input(net)
    (port,) = ir.layer("data", "Parameter", "opset1", {"shape": ",".join(map(str, in_dims)), "element_type": "f32"},
                       [], [(in_dims, "FP32", "data")])
    tensors["data"] = (ir.last_id, port, in_dims)
    for layer in layers_of(net):
        if layer.type == "Input":
            continue
        out_dims = shapes[layer.top[0]]
        source = tensors[layer.bottom[0]]
        names = layer.top[0]
        if layer.type == "Convolution":
            (kh, kw), (ph, pw), (sh, sw), _ = conv_params(layer.param.convolution_param)
            w, b = weights[layer.name]
            w_src = ir.const(f"{layer.name}/weights", w)
            conv_data = {"strides": f"{sh}, {sw}", "dilations": "1, 1", "pads_begin": f"{ph}, {pw}",
                         "pads_end": f"{ph}, {pw}", "auto_pad": "explicit"}
            (port,) = ir.layer(f"{layer.name}/WithoutBiases", "Convolution", "opset1", conv_data,
                               [source, w_src], [(out_dims, "FP32", "")])
            conv_src = (ir.last_id, port, out_dims)
            b_src = ir.const(f"{layer.name}/Dims", b.reshape(1, -1, 1, 1))
            (port,) = ir.layer(layer.name, "Add", "opset1", {"auto_broadcast": "numpy"}, [conv_src, b_src],
                               [(out_dims, "FP32", names)])
        elif layer.type == "ReLU":
            (port,) = ir.layer(layer.name, "ReLU", "opset1", None, [source], [(out_dims, "FP32", names)])
        elif layer.type == "Pooling" and not layer.param.pooling_param.global_pooling:
            (k, _), (p, _), (s, _) = pool_params(layer.param.pooling_param)
            pool_data = {"strides": f"{s}, {s}", "dilations": "1, 1", "pads_begin": f"{p}, {p}",
                         "pads_end": f"{p}, {p}", "kernel": f"{k}, {k}", "rounding_type": "ceil",
                         "auto_pad": "explicit", "index_element_type": "i64", "axis": "0"}
            port, _ = ir.layer(layer.name, "MaxPool", "opset8", pool_data, [source],
                               [(out_dims, "FP32", names), (out_dims, "I64", "")])
        elif layer.type == "Pooling":
            axes = np.array([2, 3], np.int64)
            offset = len(ir.blob)
            ir.blob += axes.astype("<i8").tobytes()
            (axes_port,) = ir.layer(f"{layer.name}/axes", "Const", "opset1",
                                    {"element_type": "i64", "shape": "2", "offset": str(offset), "size": "16"},
                                    [], [((2,), "I64", "")])
            axes_src = (ir.last_id, axes_port, (2,))
            (port,) = ir.layer(f"{layer.name}/reduce", "ReduceMean", "opset1", {"keep_dims": "true"},
                               [source, axes_src], [(out_dims, "FP32", names)])
        elif layer.type == "Concat":
            sources = [tensors[b] for b in layer.bottom]
            (port,) = ir.layer(layer.name, "Concat", "opset1", {"axis": "1"}, sources, [(out_dims, "FP32", names)])
        elif layer.type == "Softmax":
            (port,) = ir.layer(layer.name, "SoftMax", "opset8", {"axis": "1"}, [source], [(out_dims, "FP32", names)])
        else:
            raise ValueError(layer.type)
        tensors[layer.top[0]] = (ir.last_id, port, out_dims)
    last = tensors["prob"]
    ir.layer("prob/sink_port_0", "Result", "opset1", None, [last], [])
    root = ET.Element("net", name="tiny_fire", version="11")
    root.append(ir.layers)
    root.append(ir.edges)
    xml_path, bin_path = directory / "tiny_fire.xml", directory / "tiny_fire.bin"
    ET.ElementTree(root).write(xml_path, encoding="utf-8", xml_declaration=True)
    bin_path.write_bytes(bytes(ir.blob))
    return OpenVinoFiles(xml_path, bin_path, net, weights)


# --------------------------------------------------------------------------- numpy reference


def ref_convolution(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pad: tuple[int, int],
                    stride: tuple[int, int], dilation: tuple[int, int], group: int) -> np.ndarray:
    """Caffe convolution (cross-correlation, zero padding, groups, dilation)."""
    n, c, h, width = x.shape
    o, cg, kh, kw = w.shape
    (ph, pw), (sh, sw), (dh, dw) = pad, stride, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = np.zeros((n, o, oh, ow))
    og = o // group
    for g in range(group):
        xs, ws = xp[:, g * cg : (g + 1) * cg], w[g * og : (g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
                out[:, g * og : (g + 1) * og] += np.tensordot(patch, ws[:, :, i, j], axes=([1], [1])).transpose(0, 3, 1, 2)
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


def ref_pooling(x: np.ndarray, method: str, kernel: tuple[int, int], pad: tuple[int, int],
                stride: tuple[int, int]) -> np.ndarray:
    """Caffe pooling_layer.cpp forward: MAX ignores padding; AVE divides by the window clipped
    to the padded extent [-pad, size + pad)."""
    n, c, h, w = x.shape
    (kh, kw), (ph, pw), (sh, sw) = kernel, pad, stride
    oh, ow = pooled_size(h, kh, sh, ph), pooled_size(w, kw, sw, pw)
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * sh - ph, j * sw - pw
            if method == "MAX":
                he, we = min(hs + kh, h), min(ws + kw, w)
                out[:, :, i, j] = x[:, :, max(hs, 0) : he, max(ws, 0) : we].max(axis=(2, 3))
            else:
                he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
                size = (he - hs) * (we - ws)
                window = x[:, :, max(hs, 0) : min(he, h), max(ws, 0) : min(we, w)]
                out[:, :, i, j] = window.sum(axis=(2, 3)) / size
    return out


def ref_lrn(x: np.ndarray, p: caffe_pb2.LRNParameter) -> np.ndarray:
    """Caffe LRN: across channels x / (k + alpha/n sum x^2)^beta; within a channel
    x / (1 + alpha * mean_{n x n, zero padded} x^2)^beta."""
    n = p.local_size
    half = (n - 1) // 2
    sq = x**2
    if p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
        padded = np.pad(sq, ((0, 0), (half, half), (0, 0), (0, 0)))
        window = sum(padded[:, i : i + x.shape[1]] for i in range(n))
        return x / (p.k + p.alpha / n * window) ** p.beta
    padded = np.pad(sq, ((0, 0), (0, 0), (half, half), (half, half)))
    window = sum(padded[:, :, i : i + x.shape[2], j : j + x.shape[3]] for i in range(n) for j in range(n))
    return x / (1 + p.alpha * window / (n * n)) ** p.beta


def caffe_forward(net: caffe_pb2.NetParameter, weights: dict[str, list[np.ndarray]],
                  x: np.ndarray) -> dict[str, np.ndarray]:
    """Caffe's forward pass in float64; returns the (first) top of every layer, by layer name,
    in layer order (the last entry is the net's output)."""
    name, _ = net_input(net)
    blobs = {name: np.asarray(x, dtype=np.float64)}
    outputs: dict[str, np.ndarray] = {}
    for layer in layers_of(net):
        p = layer.param
        ins = [blobs[b] for b in layer.bottom]
        params = [np.asarray(a, np.float64) for a in weights.get(layer.name, [])]
        if layer.type == "Input":
            continue
        if layer.type == "Convolution":
            cp = p.convolution_param
            _, pad, stride, dilation = conv_params(cp)
            out = ref_convolution(ins[0], params[0], params[1] if cp.bias_term else None, pad, stride, dilation, cp.group)
        elif layer.type == "Pooling":
            pp = p.pooling_param
            method = caffe_pb2.PoolingParameter.PoolMethod.Name(pp.pool)
            if pp.global_pooling:
                reduce = np.max if method == "MAX" else np.mean
                out = reduce(ins[0], axis=(2, 3), keepdims=True)
            else:
                kernel, pad, stride = pool_params(pp)
                out = ref_pooling(ins[0], method, kernel, pad, stride)
        elif layer.type == "InnerProduct":
            ip = p.inner_product_param
            flat = ins[0].reshape(ins[0].shape[0], -1)
            w = params[0].T if ip.transpose else params[0]
            out = flat @ w.T + (params[1] if ip.bias_term else 0)
        elif layer.type == "ReLU":
            out = np.maximum(ins[0], 0)
        elif layer.type == "LRN":
            out = ref_lrn(ins[0], p.lrn_param)
        elif layer.type == "Softmax":
            axis = p.softmax_param.axis % ins[0].ndim
            e = np.exp(ins[0] - ins[0].max(axis=axis, keepdims=True))
            out = e / e.sum(axis=axis, keepdims=True)
        elif layer.type == "Concat":
            axis = p.concat_param.axis if p.concat_param.HasField("axis") else p.concat_param.concat_dim
            out = np.concatenate(ins, axis=axis)
        elif layer.type == "Eltwise":
            out = sum(ins)
        elif layer.type == "Flatten":
            fp = getattr(p, "flatten_param", caffe_pb2.FlattenParameter())
            start, end = fp.axis % ins[0].ndim, fp.end_axis % ins[0].ndim
            shape = ins[0].shape
            out = ins[0].reshape(*shape[:start], -1, *shape[end + 1 :])
        elif layer.type in ("Dropout", "Split"):
            out = ins[0]
        else:
            raise ValueError(f"no reference for layer type {layer.type}")
        for top in layer.top:
            blobs[top] = out
        outputs[layer.name] = out
    return outputs


# --------------------------------------------------------------------------- other files


def write_mean_binaryproto(path: Path, mean: np.ndarray) -> None:
    """Write a Caffe mean.binaryproto holding ``mean`` (C, H, W) as a 1 x C x H x W blob."""
    blob = caffe_pb2.BlobProto()
    fill_blob(blob, np.asarray(mean, np.float32)[None], legacy=True)
    Path(path).write_bytes(blob.SerializeToString())


# --------------------------------------------------------------------------- mirror data

CIFAR10_TEST_PNG = ("https://github.com/PeterJensen/cnn/raw/7246f8d20604aeff3d31080f28cb124a6171e6bd/"
                    "demo/cifar10/cifar10_batch_50.png")
CIFAR10_LABELS_JS = ("https://github.com/PeterJensen/cnn/raw/8f2fb298ae528a1fe410e580e4ad9f5b6813bb2a/"
                     "demo/cifar10/cifar10_labels.js")
IMAGENET_SAMPLE_DIR = ("https://github.com/EliSchwartz/imagenet-sample-images/raw/"
                       "bc69043e2862758a1906c6a24a792bb28c6bb2ff")


def mirror_file(mirror: Path, url: str) -> Path:
    """Where ``url`` lies in the mirror."""
    return fetch_mirror_path(mirror, url)


def cifar10_test_images(mirror: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 1000 lossless CIFAR-10 test images (1000, 32, 32, 3) uint8 RGB and their labels."""
    rows = np.asarray(Image.open(mirror_file(mirror, CIFAR10_TEST_PNG)).convert("RGB"))
    labels = [int(v) for v in re.findall(r"\d+", mirror_file(mirror, CIFAR10_LABELS_JS).read_text())]
    return rows.reshape(1000, 32, 32, 3), np.asarray(labels[50000:51000])


def imagenet_sample(mirror: Path, every: int = 1) -> tuple[list[Path], np.ndarray]:
    """Every ``every``-th ImageNet sample JPEG (sorted by wnid) and its Caffe class index."""
    files = sorted(mirror_file(mirror, IMAGENET_SAMPLE_DIR).glob("n*.JPEG"))
    wnids = sorted(f.name.split("_")[0] for f in files)
    chosen = files[::every]
    return chosen, np.asarray([wnids.index(f.name.split("_")[0]) for f in chosen])


def load_resized_rgb(path: Path, size: tuple[int, int]) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3) warped to ``size`` (bilinear, as Caffe's resize)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR))
