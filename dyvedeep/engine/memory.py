"""Memory of the engine: aligned buffers, the kernels' packed layout, the layers' output buffers
(planned as onnxruntime's memory planner does) and the scratch the conv kernels share."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..plan import Op, Plan

#: Alignment (bytes) of every buffer the kernels stream through: a cache line, so that a
#: 64-byte vector load never straddles two lines (a misaligned scratch made a whole network
#: 1.6x slower, depending on where malloc happened to place it).
ALIGN = 64


def aligned_zeros(shape: int | tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """A zeroed C-contiguous array whose data starts on an ALIGN-byte boundary."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    itemsize = np.dtype(dtype).itemsize
    count = int(np.prod(shape))
    raw = np.zeros(count * itemsize + ALIGN, np.uint8)
    offset = (-raw.ctypes.data) % ALIGN
    return raw[offset:offset + count * itemsize].view(dtype).reshape(shape)


def aligned_copy(array: np.ndarray) -> np.ndarray:
    """A C-contiguous, ALIGN-byte aligned copy of ``array``."""
    out = aligned_zeros(array.shape, array.dtype)
    out[...] = array
    return out


def packed_cols(rows: int, positions: int, allocate: bool = True) -> np.ndarray:
    """A buffer for an unfolded input in the kernels' packed layout: panels of 32 output
    positions, each ``rows`` x 32 (the kernels never read the lanes past the last position).
    ``allocate=False`` gives a broadcast placeholder of the right shape (no memory)."""
    shape = ((positions + 31) // 32, max(rows, 1), 32)
    return aligned_zeros(shape) if allocate else np.broadcast_to(np.float32(0), shape)


@dataclass
class Scratch:
    """The scratch all conv layers of an engine share (sized for the largest), so that it stays
    in cache from layer to layer."""

    cols: np.ndarray  # the unfold route's unfolded input (flat; each layer views its packed shape)
    source: np.ndarray  # padded input planes, or the phase route's phase planes
    panels: np.ndarray  # one row per thread: a panel of K x 32 floats, whole cache lines
    kept_weights: np.ndarray  # the knob path's weight columns of the kept input maps (SFMA)
    constant: np.ndarray  # SFMA: the dropped maps' constant contribution
    bands: np.ndarray  # one band of a conv output (ConvPoolBands)


def tensor_readers(plan: Plan) -> dict[str, list[int]]:
    """For each tensor, the indices of the layers that read it, in order."""
    readers: dict[str, list[int]] = {}
    for i, layer in enumerate(plan.layers):
        for t in layer.inputs:
            readers.setdefault(t, []).append(i)
    return readers


def in_place_concat_inputs(plan: Plan) -> dict[str, tuple[str, int]]:
    """The Concat inputs written in place into their slices of the Concat's buffer: those made
    by a layer that writes into a buffer (not an alias, not the graph input or output) and read
    by that Concat alone. Returns tensor -> (the Concat's output, its first channel there)."""
    producer = {layer.output: layer for layer in plan.layers}
    readers = tensor_readers(plan)
    in_place: dict[str, tuple[str, int]] = {}
    for layer in plan.layers:
        if layer.op != Op.CONCAT:
            continue
        channel = 0
        for t, shape in zip(layer.inputs, layer.in_shapes):
            src = producer.get(t)
            if (src is not None and src.op != Op.ALIAS and len(readers.get(t, [])) == 1 and t != plan.output_name
                    and layer.inputs.count(t) == 1 and t not in in_place):
                in_place[t] = (layer.output, channel)
            channel += shape[0]
    return in_place


def _lifetimes(plan: Plan, in_place: dict[str, tuple[str, int]]) -> tuple[dict[str, int], dict[str, int]]:
    """Per buffer owner (the tensor whose buffer holds others: its aliases, its in-place Concat
    inputs), the index of the first layer that writes it and of the last that reads it."""
    producer = {layer.output: layer for layer in plan.layers}
    readers = tensor_readers(plan)

    def owner(t: str) -> str:
        while True:
            if t in in_place:
                t = in_place[t][0]
            elif t in producer and producer[t].op == Op.ALIAS:
                t = producer[t].inputs[0]
            else:
                return t

    produced_at = {layer.output: i for i, layer in enumerate(plan.layers)}
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    for t, i in produced_at.items():
        o = owner(t)
        if o == plan.input_name:
            continue
        last = len(plan.layers) if t == plan.output_name else max(readers.get(t, [i]))
        start[o] = min(start.get(o, i), i)
        end[o] = max(end.get(o, last), last)
    return start, end


def plan_buffers(plan: Plan) -> tuple[dict[str, np.ndarray], set[str]]:
    """Output buffers of the layers, as onnxruntime's memory planner does: a buffer is reused
    once every reader of its tensor has run, so that the working set stays in cache.

    A Concat's inputs are written in place into their slices of its buffer
    (:func:`in_place_concat_inputs`). Aliases (Flatten, Reshape) are views of their input and
    keep it live. Returns the buffer of every tensor that has one and the set of in-place Concat
    inputs."""
    producer = {layer.output: layer for layer in plan.layers}
    produced_at = {layer.output: i for i, layer in enumerate(plan.layers)}
    in_place = in_place_concat_inputs(plan)
    start, end = _lifetimes(plan, in_place)
    buffers: dict[str, np.ndarray] = {}
    blocks: dict[str, np.ndarray] = {}  # owner -> the flat block its buffer is cut from
    free: list[np.ndarray] = []  # flat float32 blocks no longer in use
    releases: dict[int, list[str]] = {}
    for o in sorted(start, key=lambda t: (start[t], produced_at[t])):
        i = start[o]
        for j in sorted(k for k in releases if k < i):  # owners whose last reader has run
            free.extend(blocks[t] for t in releases.pop(j))
        size = int(np.prod(producer[o].out_shape))
        fits = [k for k, block in enumerate(free) if block.size >= size]
        block = free.pop(min(fits, key=lambda k: free[k].size)) if fits else aligned_zeros(size)
        blocks[o] = block
        buffers[o] = block[:size].reshape(producer[o].out_shape)
        releases.setdefault(end[o], []).append(o)

    def place(t: str) -> np.ndarray:
        if t not in buffers:
            concat, channel = in_place[t]
            buffers[t] = place(concat)[channel:channel + producer[t].out_shape[0]]
        return buffers[t]

    for t in in_place:
        place(t)
    return buffers, set(in_place)
