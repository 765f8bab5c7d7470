"""The papers' baseline: a plan run the way Caffe's CPU path runs a network, sequentially.

DyVEDeep's papers give their speed-ups over Caffe on one thread. Caffe computes a convolution
as im2col of the whole input followed by one BLAS sgemm per group (for a 1x1 kernel with stride
1 and no padding it skips im2col and multiplies the input itself), then adds the bias; a
fully-connected layer is one BLAS product (sgemv for one image); every layer writes its own
output blob. :class:`CaffeBaseline` does the same with numpy's BLAS limited to one thread; the
layers without weights (ReLU, pooling, LRN, softmax, elementwise) run on the engine's own
kernels (``Engine.run_layer``, one thread), a Concat copies its inputs. ``dyvedeep bench``
times it as the engine ``caffe``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import DyveError
from ..plan import Layer, Op, Plan
from .core import Engine, set_blas_threads
from .memory import aligned_zeros


def im2col(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
           dilation: tuple[int, int] = (1, 1), out: np.ndarray | None = None) -> np.ndarray:
    """Caffe's im2col of ``x`` (C, H, W): one row per (channel, kernel row, kernel column), one
    column per output position (row-major), zeros where a tap falls in the padding.

    ``pads`` are ONNX's (top, left, bottom, right). As Caffe's, it reads the input in place, with
    no padded copy; the taps in the padding are never written, so ``out``, when given, must hold
    zeros there (a zeroed buffer, or one this function filled for the same shapes)."""
    c, h, w = x.shape
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = kernel, stride, pads, dilation
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    cols = np.zeros((c, kh, kw, ho, wo), np.float32) if out is None else out.reshape(c, kh, kw, ho, wo)
    for ky in range(kh):
        y0, y1 = inside(h, ky * dh - pt, sh, ho)
        for kx in range(kw):
            x0, x1 = inside(w, kx * dw - pl, sw, wo)
            if y0 < y1 and x0 < x1:
                iy, ix = y0 * sh + ky * dh - pt, x0 * sw + kx * dw - pl
                rows, columns = slice(iy, iy + sh * (y1 - y0 - 1) + 1, sh), slice(ix, ix + sw * (x1 - x0 - 1) + 1, sw)
                cols[:, ky, kx, y0:y1, x0:x1] = x[:, rows, columns]
    return cols.reshape(c * kh * kw, ho * wo)


def inside(size: int, offset: int, stride: int, count: int) -> tuple[int, int]:
    """The output indices o in [first, last) whose tap o * stride + offset lies in [0, size)."""
    first = max(0, -(offset // stride))  # ceil(-offset / stride)
    last = min(count, (size - 1 - offset) // stride + 1)
    return first, max(first, last)


def skips_im2col(layer: Layer) -> bool:
    """Caffe's ``is_1x1_``: a 1x1 kernel, stride 1, no padding multiplies the input as it is."""
    a = layer.attrs
    return a["kernel"] == (1, 1) and tuple(a["stride"]) == (1, 1) and not any(a["pads"])


class CaffeBaseline:
    """Runs a plan as Caffe's CPU path does (im2col + sgemm, sequential); the dense network only."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.engine = Engine(plan, threads=1, compiled=False)  # the layers without weights
        # one output blob per layer, and one col buffer per conv layer, allocated once as Caffe does
        self.outputs = {layer.output: aligned_zeros(layer.out_shape) for layer in plan.layers if layer.op != Op.ALIAS}
        self.cols = {layer.name: aligned_zeros((layer.weight[0].size * layer.attrs["group"],
                                                int(np.prod(layer.out_shape[1:]))))
                     for layer in plan.layers if layer.op == Op.CONV and not skips_im2col(layer)}

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Outputs (N, ...) of a batch of preprocessed inputs (N, C, H, W), one image at a time."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(self.plan.input_shape):
            raise DyveError(f"{self.plan.path}: input shape {tuple(batch.shape)} does not match the model's "
                            f"(N, {', '.join(map(str, self.plan.input_shape))})")
        set_blas_threads(1)
        outputs = np.empty((batch.shape[0],) + tuple(self.plan.output_shape), np.float32)
        for n in range(batch.shape[0]):
            values = {self.plan.input_name: batch[n]}
            for layer in self.plan.layers:
                runner = BASELINE_RUNNERS.get(layer.op, CaffeBaseline._engine_layer)
                values[layer.output] = runner(self, layer, [values[t] for t in layer.inputs])
            outputs[n] = values[self.plan.output_name].reshape(outputs.shape[1:])
        return outputs

    def _conv(self, layer: Layer, inputs: list[np.ndarray]) -> np.ndarray:
        a, out = layer.attrs, self.outputs[layer.output]
        group, cout = a["group"], layer.out_shape[0] // a["group"]
        if skips_im2col(layer):
            cols = inputs[0].reshape(inputs[0].shape[0], -1)
        else:
            cols = im2col(inputs[0], a["kernel"], a["stride"], a["pads"], a["dilation"], self.cols[layer.name])
        weights = layer.weight.reshape(layer.weight.shape[0], -1)
        out2 = out.reshape(layer.out_shape[0], -1)
        rows = weights.shape[1]
        for g in range(group):  # one sgemm per group
            out_g = out2[g * cout:(g + 1) * cout]
            np.matmul(weights[g * cout:(g + 1) * cout], cols[g * rows:(g + 1) * rows], out=out_g)
        out2 += layer.bias[:, None]
        if layer.relu:
            np.maximum(out2, 0, out=out2)
        return out

    def _fc(self, layer: Layer, inputs: list[np.ndarray]) -> np.ndarray:
        out = self.outputs[layer.output]
        np.matmul(layer.weight, inputs[0].reshape(-1), out=out)  # sgemv
        out += layer.bias
        if layer.relu:
            np.maximum(out, 0, out=out)
        return out

    def _concat(self, layer: Layer, inputs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(inputs, axis=0, out=self.outputs[layer.output])

    def _alias(self, layer: Layer, inputs: list[np.ndarray]) -> np.ndarray:
        return inputs[0].reshape(layer.out_shape)

    def _engine_layer(self, layer: Layer, inputs: list[np.ndarray]) -> np.ndarray:
        return self.engine.run_layer(layer, [np.ascontiguousarray(x) for x in inputs], self.outputs[layer.output])


#: The layers the baseline computes itself; every other op runs on ``Engine.run_layer``.
BASELINE_RUNNERS: dict[Op, Callable[[CaffeBaseline, Layer, list[np.ndarray]], np.ndarray]] = {
    Op.CONV: CaffeBaseline._conv, Op.FC: CaffeBaseline._fc, Op.CONCAT: CaffeBaseline._concat,
    Op.ALIAS: CaffeBaseline._alias,
}
