"""The knob-free path: each layer's kernels with no knob, run now or, given a ``K.Program``,
appended to it as steps (a compiled run). A conv layer runs on its route (conv_plan.py); SFMA
alone runs the same route over the maps it keeps (:class:`KeptChannels`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _kernels as K
from ..plan import Layer, Op
from .bands import ConvPoolBands
from .conv_plan import ConvPlan
from .memory import Scratch


def conv_plain(cp: ConvPlan, scratch: Scratch, x: np.ndarray, out: np.ndarray, threads: int,
               program: K.Program | None = None) -> None:
    """A conv layer on its route into ``out`` (cout_total x positions)."""
    cout = cp.geom.cout
    for g in range(cp.geom.groups):
        conv_group(cp, scratch, x, g, out[g * cout:(g + 1) * cout], cp.layer.relu, threads, program)


@dataclass(frozen=True)
class KeptChannels:
    """Some input channels of a group (SFMA's kept maps, in increasing order) as the layer's
    route reads them: their weight columns, their unfolded rows' offsets in the route's source,
    and their indices in the layer's input."""

    weights: np.ndarray  # cout x (kept x kk)
    tap_off: np.ndarray  # kept x kk
    channels: np.ndarray  # kept


def kept_channels(cp: ConvPlan, scratch: Scratch, group: int, kept: np.ndarray) -> KeptChannels:
    """The route's tables of the kept channels ``kept`` (indices in the group, increasing); the
    weight columns go to the scratch ``kept_weights``."""
    geom, route = cp.geom, cp.route
    n = len(kept) * geom.kk
    tap_off = np.empty(n, np.int64)
    weights = scratch.kept_weights[:geom.cout * n].reshape(geom.cout, n)
    K.gather_channels(W=cp.weights[group], channels=kept, kk=geom.kk,
                      tap_off=route.phase_tap_off if route.name == "phase" else route.tap_off, w_out=weights,
                      tap_out=tap_off)
    return KeptChannels(weights, tap_off, cp.channels[group][kept])


def conv_group(cp: ConvPlan, scratch: Scratch, x: np.ndarray, group: int, out_g: np.ndarray, relu: bool,
               threads: int, program: K.Program | None = None, kept: KeptChannels | None = None,
               sfma: K.SfmaLayer | None = None) -> None:
    """Group ``group`` of a conv layer on its route into ``out_g`` (cout x positions): over all
    its input channels, or over the ``kept`` ones alone (SFMA; at least one); ReLU if asked.
    ``sfma``: the conv step of a compiled SFMA layer (engine/sfma_alone.py; direct, phase or panel
    route), which runs the maps its select steps keep."""
    geom, route = cp.geom, cp.route
    bias = cp.layer.bias[group * geom.cout:(group + 1) * geom.cout]
    weights = cp.weights[group] if kept is None else kept.weights
    if route.name == "direct":  # stride 1 along rows: the tiles read the source in place
        K.conv_direct(x=x, channel0=group * geom.cin, pt=geom.pt, pl=geom.pl, Hp=route.src_hw[0], Wp=route.src_hw[1],
                      pad=route.pad_src, pad_buffer=scratch.source,
                      tap_off=route.tap_off if kept is None else kept.tap_off, vectors=route.vectors, W=weights,
                      bias=bias, relu=relu, out=out_g, threads=threads, src_offset=0, program=program, sfma=sfma,
                      rows_below_tiles=route.rows_below_tiles)
    elif route.name == "phase":  # stride s: phase planes, then the direct route's tiles
        planes = phase_planes(cp, scratch, x, group, threads, program)
        K.conv_direct(x=planes, channel0=0, pt=0, pl=0, Hp=planes.shape[1], Wp=planes.shape[2], pad=False,
                      pad_buffer=scratch.source, tap_off=route.phase_tap_off if kept is None else kept.tap_off,
                      vectors=route.vectors, W=weights, bias=bias, relu=relu, out=out_g, threads=threads,
                      src_offset=0, program=program, sfma=sfma, rows_below_tiles=route.rows_below_tiles)
    elif route.name == "ocvec":  # knob-free: vectors over output channels (conv_plan.ocvec_route)
        K.conv_ocvec(x=x, channel0=group * geom.cin, pt=geom.pt, pl=geom.pl, Hp=route.src_hw[0], Wp=route.src_hw[1],
                     pad=route.pad_src, pad_buffer=scratch.source, tap_off=route.tap_off, pos_off=route.pos_off,
                     Wb=cp.weight_blocks[group], bias=bias, relu=relu, out=out_g, partial=cp.ocvec_partial,
                     threads=threads, program=program)
    elif route.name == "unfold":  # large weights, small map: unfold once, weights stay in L1
        K.im2col_packed(x=x, channels=cp.channels[group] if kept is None else kept.channels, kh=geom.kh, kw=geom.kw,
                        sh=geom.sh, sw=geom.sw, pt=geom.pt, pl=geom.pl, dh=geom.dh, dw=geom.dw, ho=geom.ho,
                        wo=geom.wo, cols=cp.cols, threads=threads, program=program)
        K.conv_gemm(W=weights, cols=cp.cols, N=geom.positions, out=out_g, bias=bias, relu=relu, threads=threads,
                    program=program)
    else:  # panel: im2col fused into the GEMM, one 32-position panel at a time
        K.conv_panel(x=x, channel0=group * geom.cin, pt=geom.pt, pl=geom.pl, Hp=route.src_hw[0], Wp=route.src_hw[1],
                     pad=route.pad_src, pad_buffer=scratch.source,
                     tap_off=route.tap_off if kept is None else kept.tap_off, sw=geom.sw, runs=route.runs,
                     panel_first=route.panel_first, W=weights, bias=bias, relu=relu, out=out_g,
                     panels=scratch.panels, threads=threads, program=program, sfma=sfma)


def phase_planes(cp: ConvPlan, scratch: Scratch, x: np.ndarray, group: int, threads: int,
                 program: K.Program | None = None) -> np.ndarray:
    """Group ``group``'s input split into the phase route's planes (K.phase_planes), in the
    source scratch: (cin * s * s, hq, wq)."""
    geom, (hq, wq) = cp.geom, cp.route.phase_hw
    s = geom.sh
    planes = scratch.source[:geom.cin * s * s * hq * wq].reshape(-1, hq, wq)
    K.phase_planes(x=x, channel0=group * geom.cin, nch=geom.cin, pt=geom.pt, pl=geom.pl, s=s, dst=planes,
                   threads=threads, program=program)
    return planes


def conv_pool_bands(bands: ConvPoolBands, cp: ConvPlan, pool: Layer, scratch: Scratch, x: np.ndarray,
                    out: np.ndarray, conv_threads: int, pool_threads: int, program: K.Program | None = None) -> None:
    """A conv layer and its max-pooling band by band (ConvPoolBands), the pooled map into ``out``."""
    geom, route = cp.geom, cp.route
    if route.name == "phase":
        src, tap_off = phase_planes(cp, scratch, x, 0, conv_threads, program), route.phase_tap_off
    elif route.pad_src:
        hp, wp = route.src_hw
        K.pad_planes(x=x, channel0=0, nch=geom.cin, pt=geom.pt, pl=geom.pl, Hp=hp, Wp=wp, dst=scratch.source,
                     threads=conv_threads, program=program)
        src, tap_off = scratch.source[:geom.cin * hp * wp].reshape(geom.cin, hp, wp), route.tap_off
    else:
        src, tap_off = x, route.tap_off
    kh, kw = pool.attrs["kernel"]
    psh, psw = pool.attrs["stride"]
    ppl = pool.attrs["pads"][1]
    for band in bands.bands:
        conv_out = scratch.bands[:geom.cout * band.rows * geom.wo].reshape(geom.cout, band.rows * geom.wo)
        if route.name == "ocvec":
            K.conv_ocvec(x=src, channel0=0, pt=0, pl=0, Hp=src.shape[1], Wp=src.shape[2], pad=False,
                         pad_buffer=scratch.source, tap_off=tap_off, pos_off=band.pos_off, Wb=cp.weight_blocks[0],
                         bias=cp.layer.bias, relu=cp.layer.relu, out=conv_out, partial=cp.ocvec_partial,
                         threads=conv_threads, program=program)
        else:
            K.conv_direct(x=src, channel0=0, pt=0, pl=0, Hp=src.shape[1], Wp=src.shape[2], pad=False,
                          pad_buffer=scratch.source, tap_off=tap_off, vectors=band.vectors, W=cp.weights[0],
                          bias=cp.layer.bias, relu=cp.layer.relu, out=conv_out, threads=conv_threads,
                          src_offset=band.src_offset, program=program, rows_first=bands.conv_rows_first,
                          rows_below_tiles=cp.route.rows_below_tiles)
        # on the channel-vector route the conv's threads shared out positions: each pools its rows
        K.maxpool(x=conv_out.reshape(geom.cout, band.rows, geom.wo), out=out[:, band.p0:band.p1], kh=kh, kw=kw,
                  sh=psh, sw=psw, pt=band.pad_top, pl=ppl, threads=pool_threads, program=program,
                  rows_shared=route.name == "ocvec")


def pool(layer: Layer, x: np.ndarray, out: np.ndarray, threads: int, program: K.Program | None = None) -> None:
    """A max, average or global average pooling of x into out."""
    if layer.op == Op.GAP:
        K.global_avgpool(x=x.reshape(x.shape[0], -1), out=out.reshape(-1), threads=threads, program=program)
        return
    kh, kw = layer.attrs["kernel"]
    sh, sw = layer.attrs["stride"]
    pt, pl, pb, pr = layer.attrs["pads"]
    if layer.op == Op.MAXPOOL:
        K.maxpool(x=x, out=out, kh=kh, kw=kw, sh=sh, sw=sw, pt=pt, pl=pl, threads=threads, program=program)
    else:
        K.avgpool(x=x, out=out, kh=kh, kw=kw, sh=sh, sw=sw, pt=pt, pl=pl, pb=pb, pr=pr,
                  count_include_pad=layer.attrs["count_include_pad"], threads=threads, program=program)


def eltwise(layer: Layer, inputs: list[np.ndarray]) -> np.ndarray:
    """An elementwise Add / Sub / Mul / Div / Pow of tensors and constants (scalars, or arrays
    broadcast per image as numpy does)."""
    it = iter(inputs)
    arrays = layer.attrs.get("arrays") or [None] * len(layer.attrs["scalars"])
    a, b = (np.float32(s) if s is not None else c if c is not None else next(it)
            for s, c in zip(layer.attrs["scalars"], arrays))
    kind = layer.attrs["kind"]
    if kind == "add":
        r = a + b
    elif kind == "sub":
        r = a - b
    elif kind == "mul":
        r = a * b
    elif kind == "div":
        r = a / b
    else:
        r = np.power(a, b)
    return np.asarray(r, dtype=np.float32).reshape(layer.out_shape)


def is_residual_add_or_relu(layer: Layer) -> bool:
    """A ReLU, or an Add of two tensors of the output's shape (no constants, no broadcasting): the
    elementwise layers a compiled run takes (dv_add_relu)."""
    if layer.op == Op.RELU:
        return True
    shape = tuple(layer.out_shape)
    return (layer.op == Op.ELTWISE and layer.attrs["kind"] == "add" and len(layer.inputs) == 2
            and all(s is None for s in layer.attrs["scalars"]) and not any(
                a is not None for a in layer.attrs.get("arrays") or ())
            and all(tuple(t) == shape for t in layer.in_shapes))


def add_or_relu(layer: Layer, inputs: list[np.ndarray], out: np.ndarray, threads: int,
                program: K.Program | None = None) -> None:
    """A layer that :func:`is_residual_add_or_relu` takes, by dv_add_relu into ``out``: the same
    bits as :func:`eltwise` and the ReLU of the Python path."""
    flat = [x.reshape(-1) for x in inputs]
    K.add_relu(x=flat[0], b=flat[1] if layer.op == Op.ELTWISE else None, out=out.reshape(-1),
               relu=layer.op == Op.RELU, threads=threads, program=program)


def is_simple_eltwise(layer: Layer) -> bool:
    """An Add, Sub, Mul, Div or Pow of two operands, each a tensor of the output's shape or a
    scalar, at least one a tensor (no constant arrays, no broadcasting): what K.eltwise runs,
    in a compiled run or on the Python path (cifar10_full's LRNs are chains of them)."""
    if layer.op != Op.ELTWISE or layer.attrs["kind"] not in K.ELTWISE_OPS:
        return False
    if any(a is not None for a in layer.attrs.get("arrays") or ()):
        return False
    scalars = layer.attrs["scalars"]
    shape = tuple(layer.out_shape)
    return (len(scalars) == 2 and len(layer.inputs) == sum(s is None for s in scalars) >= 1
            and all(tuple(t) == shape for t in layer.in_shapes))


def eltwise_into(layer: Layer, inputs: list[np.ndarray], out: np.ndarray, threads: int,
                 program: K.Program | None = None) -> None:
    """A layer that :func:`is_simple_eltwise` takes, by K.eltwise into ``out``."""
    it = iter(x.reshape(-1) for x in inputs)
    first, second = (np.float32(s) if s is not None else next(it) for s in layer.attrs["scalars"])
    kind, flat = layer.attrs["kind"], out.reshape(-1)
    if isinstance(first, np.ndarray) and isinstance(second, np.ndarray):
        K.eltwise(x=first, b=second, out=flat, kind=kind, threads=threads, program=program)
    elif isinstance(first, np.ndarray):
        K.eltwise(x=first, b=None, out=flat, kind=kind, scalar=second, threads=threads, program=program)
    else:
        K.eltwise(x=second, b=None, out=flat, kind=kind, scalar=first, scalar_first=True, threads=threads,
                  program=program)


def batchnorm(layer: Layer, x: np.ndarray, out: np.ndarray) -> None:
    """A BatchNormalization not folded into a conv: x * scale + shift per channel (the plan's
    weight and bias), then the folded ReLU."""
    per_channel = (-1,) + (1,) * (x.ndim - 1)
    np.multiply(x, layer.weight.reshape(per_channel), out=out)
    out += layer.bias.reshape(per_channel)
    if layer.relu:
        np.maximum(out, 0, out=out)


def sum_inputs(inputs: list[np.ndarray], out: np.ndarray) -> None:
    """A Sum: the inputs added in order (as onnxruntime does)."""
    np.copyto(out, inputs[0])
    for x in inputs[1:]:
        out += x


def transpose(layer: Layer, x: np.ndarray, out: np.ndarray) -> None:
    """A Transpose of the per-image axes (``perm`` without the batch axis)."""
    np.copyto(out, x.reshape(layer.in_shapes[0]).transpose(layer.attrs["perm"]))
