"""Deep Compression ``.net`` files for the tests: Caffe weights pruned, quantized and encoded in
the layout of the Deep Compression release files (entry counts, then per layer the codebook, the
bias, the codes and the 4-bit index gaps)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dyvedeep import caffe_pb2
from tests.factories.caffe import layers_of


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

