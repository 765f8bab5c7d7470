"""Hand-built Caffe nets with BatchNorm, Scale and Data layers (test nets ending in Accuracy and
SoftmaxWithLoss), their caffemodels, and a numpy forward pass of the unfolded layers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from google.protobuf import text_format

from dyvedeep import caffe_pb2

# conv1 (bias) -> BatchNorm -> Scale (bias) -> ReLU -> conv2 (no bias, stride 2) -> BatchNorm ->
# Scale (no bias) -> global average pool -> ip -> BatchNorm -> SoftmaxWithLoss, Accuracy.
BN_NET_LAYERS = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1"
  batch_norm_param { use_global_stats: true } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 5 kernel_size: 3 stride: 2 bias_term: false } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" batch_norm_param { eps: 0.001 } }
layer { name: "scale2" type: "Scale" bottom: "conv2" top: "conv2" }
layer { name: "pool" type: "Pooling" bottom: "conv2" top: "pool"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "bn_ip" type: "BatchNorm" bottom: "ip" top: "ip" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""

INPUT_LAYER = ('layer { name: "input" type: "Input" top: "data" '
               'input_param { shape { dim: 1 dim: 3 dim: 7 dim: 7 } } }\n')


def data_layer(transform: str) -> str:
    """A Data layer (LMDB source, as in a test net) with the given transform_param body."""
    return (f'layer {{ name: "Data1" type: "Data" top: "data" top: "label" '
            f'transform_param {{ {transform} }} '
            f'data_param {{ source: "test_lmdb" batch_size: 10 backend: LMDB }} }}\n')


def bn_net_weights(seed: int = 0, scale_factor: float = 0.5) -> dict[str, list[np.ndarray]]:
    """Random blobs for :data:`BN_NET_LAYERS` (BatchNorm: mean, variance, scale factor)."""
    rng = np.random.default_rng(seed)

    def f32(*shape, low=-1.0, high=1.0):
        return rng.uniform(low, high, shape).astype(np.float32)

    def batch_norm(c):
        return [f32(c) * np.float32(scale_factor), f32(c, low=0.2, high=2.0) * np.float32(scale_factor),
                np.array([scale_factor], dtype=np.float32)]

    return {
        "conv1": [f32(4, 3, 3, 3), f32(4)], "bn1": batch_norm(4), "scale1": [f32(4, low=0.5, high=1.5), f32(4)],
        "conv2": [f32(5, 4, 3, 3)], "bn2": batch_norm(5), "scale2": [f32(5, low=0.5, high=1.5)],
        "ip": [f32(3, 5), f32(3)], "bn_ip": batch_norm(3),
    }


def write_net(directory: Path, name: str, text: str, weights: dict[str, list[np.ndarray]]) -> tuple[Path, Path]:
    """Write ``name``.prototxt and ``name``.caffemodel (new format, blobs with shapes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prototxt = directory / f"{name}.prototxt"
    prototxt.write_text(text)
    net = text_format.Parse(text, caffe_pb2.NetParameter())
    model = caffe_pb2.NetParameter(name=name)
    for layer in net.layer:
        entry = model.layer.add(name=layer.name, type=layer.type, bottom=layer.bottom, top=layer.top)
        for array in weights.get(layer.name, []):
            blob = entry.blobs.add()
            blob.shape.dim.extend(array.shape)
            blob.data.extend(array.reshape(-1).tolist())
    caffemodel = directory / f"{name}.caffemodel"
    caffemodel.write_bytes(model.SerializeToString())
    return prototxt, caffemodel


def write_mean_file(path: Path, mean: np.ndarray) -> None:
    """A mean.binaryproto holding ``mean`` (C, H, W) as a 1 x C x H x W blob."""
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend((1, *mean.shape))
    blob.data.extend(mean.reshape(-1).tolist())
    path.write_bytes(blob.SerializeToString())


# --------------------------------------------------------------------------- numpy reference


def conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pad: int, stride: int) -> np.ndarray:
    """Caffe convolution of a batch (N, C, H, W) in float64."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[2]
    out_h = (x.shape[2] - k) // stride + 1
    out_w = (x.shape[3] - k) // stride + 1
    y = np.zeros((x.shape[0], w.shape[0], out_h, out_w))
    for i in range(k):
        for j in range(k):
            patch = x[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return y if b is None else y + b[None, :, None, None]


def batch_norm(x: np.ndarray, blobs: list[np.ndarray], eps: float) -> np.ndarray:
    """Caffe's BatchNorm with stored statistics, in its own (unfolded) form."""
    mean, var, factor = (np.asarray(b, dtype=np.float64) for b in blobs)
    s = 0.0 if factor[0] == 0 else 1.0 / factor[0]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - (mean * s).reshape(shape)) / np.sqrt((var * s).reshape(shape) + eps)


def bn_net_forward(x: np.ndarray, weights: dict[str, list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """:data:`BN_NET_LAYERS` layer by layer (BatchNorm and Scale as Caffe computes them): the
    logits (after bn_ip) and the softmax of SoftmaxWithLoss."""
    w = {k: [np.asarray(a, dtype=np.float64) for a in v] for k, v in weights.items()}
    y = conv(x.astype(np.float64), w["conv1"][0], w["conv1"][1], pad=1, stride=1)
    y = batch_norm(y, w["bn1"], 1e-5)
    y = y * w["scale1"][0][None, :, None, None] + w["scale1"][1][None, :, None, None]
    y = np.maximum(y, 0)
    y = conv(y, w["conv2"][0], None, pad=0, stride=2)
    y = batch_norm(y, w["bn2"], 1e-3) * w["scale2"][0][None, :, None, None]
    y = y.mean(axis=(2, 3))
    y = y @ w["ip"][0].T + w["ip"][1]
    y = batch_norm(y, w["bn_ip"], 1e-5)
    e = np.exp(y - y.max(axis=1, keepdims=True))
    return y, e / e.sum(axis=1, keepdims=True)
