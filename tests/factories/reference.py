"""A float64 numpy reference of Caffe's forward pass (conv, pooling with Caffe's ceil rounding
and AVE divisor, LRN in both regions, ...), written from Caffe's formulas independently of the
converters."""
from __future__ import annotations

import numpy as np

from dyvedeep import caffe_pb2
from tests.factories.caffe import conv_params, layers_of, net_input, pool_params, pooled_size

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
