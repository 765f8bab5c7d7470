"""Caffe's pooling, reproduced exactly with ONNX MaxPool / AveragePool.

Caffe (pooling_layer.cpp) sizes the output with ceil rounding, ``ceil((H + 2p - k) / s) + 1``,
minus one when padded and the last window would start at or beyond ``H + p``. Its MAX ignores the
padding; its AVE divides by the window clipped to ``[-p, H + p)`` (the padding counts, the ceil
overhang past ``H + p`` does not).

ONNX's ``ceil_mode`` differs between runtimes in exactly these corner cases, so the converters
always write ``ceil_mode=0`` with explicit end padding chosen to give Caffe's output size, and
pick the AVE divisor rule that matches Caffe: ``count_include_pad=0`` when there is no padding,
``count_include_pad=1`` when no window reaches past the declared padding, otherwise an explicit
zero ``Pad`` (which then counts) followed by ``count_include_pad=0`` for the overhang.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .onnx_graph import GraphBuilder


@dataclass(frozen=True)
class PoolAxis:
    """Geometry of pooling along one spatial axis."""

    size: int  # input extent
    kernel: int
    stride: int
    pad: int  # padding before (Caffe pads both sides by this)
    out: int  # output extent

    @property
    def pad_end(self) -> int:
        """End padding that makes floor rounding yield ``out`` windows (never negative)."""
        return max(0, (self.out - 1) * self.stride + self.kernel - self.size - self.pad)

    @property
    def last_start(self) -> int:
        """Input coordinate where the last window starts."""
        return (self.out - 1) * self.stride - self.pad


def caffe_pooled_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Caffe's pooling output extent (ceil rounding, last window must start inside H + pad)."""
    out = int(math.ceil((size + 2 * pad - kernel) / stride)) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def caffe_pool_axis(size: int, kernel: int, stride: int, pad: int) -> PoolAxis:
    """The :class:`PoolAxis` of a Caffe pooling layer along one axis."""
    return PoolAxis(size, kernel, stride, pad, caffe_pooled_size(size, kernel, stride, pad))


def emit_max_pool(
    graph: GraphBuilder, x: str, name: str, axes: tuple[PoolAxis, PoolAxis], channels: int,
    output: str | None = None,
) -> str:
    """MaxPool over both spatial axes with explicit pads (padding never wins a max).

    Returns the output tensor, named ``output`` (default: the node name)."""
    h, w = axes
    return graph.add_node(
        "MaxPool",
        [x],
        name,
        (channels, h.out, w.out),
        output=output,
        kernel_shape=[h.kernel, w.kernel],
        strides=[h.stride, w.stride],
        pads=[h.pad, w.pad, h.pad_end, w.pad_end],
    )


def emit_caffe_average_pool(
    graph: GraphBuilder, x: str, name: str, axes: tuple[PoolAxis, PoolAxis], channels: int,
    output: str | None = None,
) -> str:
    """AveragePool with Caffe's divisor (padding counts, ceil overhang does not).

    Returns the output tensor, named ``output`` (default: the node name)."""
    h, w = axes
    out_shape = (channels, h.out, w.out)
    common = dict(kernel_shape=[h.kernel, w.kernel], strides=[h.stride, w.stride], output=output)
    if h.pad == 0 and w.pad == 0:
        return graph.add_node(
            "AveragePool", [x], name, out_shape,
            pads=[0, 0, h.pad_end, w.pad_end], count_include_pad=0, **common,
        )
    if all(a.pad_end <= a.pad for a in axes):
        return graph.add_node(
            "AveragePool", [x], name, out_shape,
            pads=[h.pad, w.pad, h.pad_end, w.pad_end], count_include_pad=1, **common,
        )
    # The last window reaches past H + p on some axis: pad with zeros explicitly so that the
    # padding counts, and let the pool exclude the remaining overhang.
    pad_end = [min(a.pad, a.pad_end) for a in axes]
    pads = graph.add_int64(f"{name}_pads", [0, 0, h.pad, w.pad, 0, 0, *pad_end])
    padded_shape = (channels, h.size + h.pad + pad_end[0], w.size + w.pad + pad_end[1])
    padded = graph.add_node("Pad", [x, pads], f"{name}/pad", padded_shape, mode="constant")
    overhang = [a.pad_end - e for a, e in zip(axes, pad_end)]
    return graph.add_node(
        "AveragePool", [padded], name, out_shape,
        pads=[0, 0, *overhang], count_include_pad=0, **common,
    )
