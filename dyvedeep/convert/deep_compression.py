"""Deep Compression ``.net`` files (Han et al.; SqueezeNet and AlexNet releases) to ONNX.

Layout (docs: ../shared/docs/data.md): one uint32 non-zero count ``n`` per weight layer (the
Convolution / InnerProduct layers whose name contains ``conv``, ``fc`` or ``ip``, in prototxt
order); then per layer a float32 codebook of ``2**b`` entries (b = 8 when the name contains
``conv``, else 4), the float32 biases, the ``n`` codes packed (b = 8: a byte each; b = 4: two per
byte, low nibble first) and ``n`` 4-bit position gaps packed two per byte, low nibble first.
Positions are ``cumsum(gap + 1) - 1`` over the flattened weight array. The file must be consumed
exactly. The prototxt supplies shapes; the graph is built by the Caffe converter.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import caffe_pb2
from ..errors import DyveError
from .caffe import caffe_model, fit_blob, read_prototxt, weight_layers
from ..metadata_keys import NONZERO_KEY
from .onnx_graph import ConvertedModel, Shape


@dataclass
class SparseLayer:
    """One decoded layer: non-zero positions in the flattened weights, their values, biases."""

    positions: np.ndarray  # int64, strictly increasing
    values: np.ndarray  # float32, codebook[code] (may contain zeros used as gap fillers)
    bias: np.ndarray  # float32


def compressed_layer_names(net: caffe_pb2.NetParameter) -> list[str]:
    """The weight layers stored in a .net file, in order."""
    return [layer.name for layer in weight_layers(net)
            if any(key in layer.name for key in ("conv", "fc", "ip"))]


def code_bits(layer_name: str) -> int:
    """Bits per code: 8 for conv layers, 4 for the others (as the reference decoder)."""
    return 8 if "conv" in layer_name else 4


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """``count`` 4-bit values packed two per byte, low nibble first."""
    pairs = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)
    return pairs[:count]


class NetFileReader:
    """Sequential reads from the bytes of a .net file, failing with a DyveError when short."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.data = self.path.read_bytes()
        except OSError as err:
            raise DyveError(f"{path}: cannot read Deep Compression file: {err}") from err
        self.offset = 0

    def take(self, dtype: type, count: int, what: str) -> np.ndarray:
        """The next ``count`` items of ``dtype`` (little-endian)."""
        dt = np.dtype(dtype).newbyteorder("<")
        size = dt.itemsize * count
        if self.offset + size > len(self.data):
            raise DyveError(
                f"{self.path}: truncated Deep Compression file: {what} needs {size} bytes at offset "
                f"{self.offset}, only {len(self.data) - self.offset} remain"
            )
        array = np.frombuffer(self.data, dtype=dt, count=count, offset=self.offset)
        self.offset += size
        return array

    def finish(self) -> None:
        """Fail unless every byte was consumed."""
        if self.offset != len(self.data):
            raise DyveError(
                f"{self.path}: not a matching Deep Compression file: {len(self.data) - self.offset} "
                f"bytes remain after the last layer (read {self.offset} of {len(self.data)})"
            )


def decode_net_file(path: Path, net: caffe_pb2.NetParameter) -> dict[str, SparseLayer]:
    """Decode a .net file against the prototxt ``net`` (which gives layer order and bias sizes)."""
    layers = {layer.name: layer for layer in weight_layers(net)}
    names = compressed_layer_names(net)
    if not names:
        raise DyveError(f"{path}: the prototxt has no conv/fc/ip layers to decode")
    reader = NetFileReader(path)
    counts = reader.take(np.uint32, len(names), "the non-zero counts").astype(np.int64)
    decoded: dict[str, SparseLayer] = {}
    for name, count in zip(names, counts):
        layer = layers[name]
        param = layer.convolution_param if layer.type == "Convolution" else layer.inner_product_param
        bits = code_bits(name)
        codebook = reader.take(np.float32, 2**bits, f"layer '{name}' codebook")
        bias = reader.take(np.float32, param.num_output if param.bias_term else 0, f"layer '{name}' biases")
        if count == 0:
            decoded[name] = SparseLayer(np.zeros(0, np.int64), np.zeros(0, np.float32), bias.copy())
            continue
        per_byte = 8 // bits
        packed_codes = reader.take(np.uint8, (count - 1) // per_byte + 1, f"layer '{name}' codes")
        codes = packed_codes[:count] if bits == 8 else unpack_nibbles(packed_codes, count)
        gaps = unpack_nibbles(reader.take(np.uint8, (count - 1) // 2 + 1, f"layer '{name}' positions"), count)
        positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
        decoded[name] = SparseLayer(positions, codebook[codes].astype(np.float32), bias.copy())
    reader.finish()
    return decoded


@dataclass
class DeepCompressionWeights:
    """Weights decoded from a .net file, made dense on request in the prototxt's shapes."""

    path: Path
    layers: dict[str, SparseLayer]

    def get(self, layer: str, index: int, expected: Shape, any_shape: bool = False) -> np.ndarray:
        sparse = self.layers.get(layer)
        if sparse is None:
            raise DyveError(f"{self.path}: holds no weights for layer '{layer}' (name without conv/fc/ip)")
        if index == 1:
            fitted = fit_blob(sparse.bias, expected, any_shape=True)
            if fitted is None:
                raise DyveError(f"{self.path}: layer '{layer}' biases: expected shape {list(expected)}, "
                                f"found {list(sparse.bias.shape)}")
            return fitted
        size = int(np.prod(expected))
        if len(sparse.positions) and sparse.positions[-1] >= size:
            raise DyveError(
                f"{self.path}: layer '{layer}': weight position {int(sparse.positions[-1])} lies "
                f"outside the prototxt's shape {list(expected)} ({size} weights)"
            )
        dense = np.zeros(size, np.float32)
        dense[sparse.positions] = sparse.values
        return dense.reshape(expected)

    def nonzero_counts(self) -> dict[str, int]:
        """Non-zero weights per layer (codebook entry 0 used as a gap filler not counted)."""
        return {name: int(np.count_nonzero(s.values)) for name, s in self.layers.items()}


def convert_deep_compression(prototxt: Path, net_file: Path) -> ConvertedModel:
    """Convert a Deep Compression .net file with its deploy prototxt."""
    net = read_prototxt(prototxt)
    weights = DeepCompressionWeights(Path(net_file), decode_net_file(net_file, net))
    converted = caffe_model(net, weights, Path(prototxt), "deep_compression",
                            [Path(prototxt), Path(net_file)])
    converted.metadata[NONZERO_KEY] = json.dumps(weights.nonzero_counts(), sort_keys=True)
    return converted
