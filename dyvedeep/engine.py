"""The engine: runs a :class:`~dyvedeep.plan.Plan` one image at a time on the Cython kernels,
with the three dynamic-effort knobs inside the conv and fully-connected layers, and counts
scalar operations exactly in one :class:`OpCounter` shared by all knobs.

Inside a conv layer the knobs apply in the specification's order: SFMA drops near-uniform input
maps (their contribution becomes mean x kernel sum), SDSS computes the output on a coarse grid
and interpolates insignificant cells, SPET stops the neurons whose partial sum over the leading
input channels predicts a negative result. Whenever no knob fired in a layer for an image, the
layer's result is the dense path's, bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import ThreadpoolController

from . import _kernels as K
from .errors import DyveError
from .knobs import DEFAULT_OPTIONS, KnobConfig, KnobSetting
from .plan import Layer, Plan

U8 = np.uint8
#: Scalar ops of one bilinear fill (three lerps of 3 ops each); a zero fill costs nothing.
BILINEAR_FILL_OPS = 9
#: On the Python path, a layer gets several threads for its own kernels only above this much
#: work (MACs, or 8 per output or input element for the layers without weights, whichever is
#: more: pooling reads its whole input): starting a parallel loop costs ~6 us, more than small
#: kernels take (SqueezeNet on 2 threads: 1M ran 5 % faster than 2M, 0.5M no better). In a
#: compiled run (DenseRun) every step is shared by all threads: a barrier costs far less.
PARALLEL_MIN_WORK = 1_000_000
#: On the dense path, a conv layer (direct or phase route, no knobs) whose only reader is a
#: max-pooling runs with it band by band of output rows when its output has at least this many
#: bytes: each band of the conv output is pooled while it is still in L2, instead of the whole
#: map going out to memory and back (SqueezeNet's conv1: 3.2 MB). See FusedPool.
FUSE_MIN_BYTES = 1 << 20
#: Bytes of one band of the conv output in a fused pair (well inside L2).
FUSE_BAND_BYTES = 1 << 19
#: The direct conv route needs its vectors this full: maps 16 or 32 wide, or 1x1 layers
#: without padding, ran 1.15x-1.8x faster direct; with vectors per output row, 56-, 27- and
#: 14-wide maps (0.875, 0.84 and 0.875 of the lanes) ran as fast or faster unfolded ...
DIRECT_MIN_LANE_USE = 0.9
#: ... and at most this many output channels per output position (past it the weights are the
#: large operand, and the unfolded panels, read in order, feed the GEMM better).
DIRECT_MAX_ROWS_PER_POSITION = 2
#: Scalar ops to turn one map's sums into its spread and test it (mean, variance, sqrt, ratio, compare).
SFMA_TEST_OPS = 7

# Counter columns: one row per layer.
COUNTER_FIELDS = (
    "images", "macs", "ops",
    "overhead_sfma", "overhead_sdss", "overhead_spet",
    "saved_sfma", "saved_sdss", "saved_spet",
    "dropped_maps", "filled", "terminated", "fallbacks",
)


class OpCounter:
    """Exact per-layer totals over the images run: MACs, scalar ops, and per knob the overhead
    ops it added and the ops it saved. One instance is shared by every kernel path."""

    def __init__(self, layer_names: list[str], dense_rows: np.ndarray | None = None) -> None:
        self.layer_names = list(layer_names)
        self.index = {name: i for i, name in enumerate(layer_names)}
        self._table = np.zeros((len(layer_names), len(COUNTER_FIELDS)), dtype=np.int64)
        self.col = {name: j for j, name in enumerate(COUNTER_FIELDS)}
        # Layers run on their dense path are counted by run (one int per layer, no per-field
        # work on the hot path) and folded in as multiples of their dense row when read.
        self.dense_rows = (dense_rows if dense_rows is not None
                           else np.zeros((len(layer_names), len(COUNTER_FIELDS)), dtype=np.int64))
        self.dense_runs = [0] * len(layer_names)

    @property
    def table(self) -> np.ndarray:
        """The per-layer totals (layers x COUNTER_FIELDS)."""
        if any(self.dense_runs):
            self._table += np.asarray(self.dense_runs, dtype=np.int64)[:, None] * self.dense_rows
            self.dense_runs = [0] * len(self.layer_names)
        return self._table

    def add(self, layer: str, **counts: int) -> None:
        """Add ``counts`` (field=value) to ``layer``'s row."""
        row = self._table[self.index[layer]]
        for key, value in counts.items():
            row[self.col[key]] += int(value)

    def add_counts(self, index: int, counts: list[int]) -> None:
        """Add one value per COUNTER_FIELDS column to row ``index`` (the knob paths' hot path)."""
        self._table[index] += np.asarray(counts, dtype=np.int64)

    def get(self, layer: str, key: str) -> int:
        """Total of ``key`` for ``layer``."""
        return int(self.table[self.index[layer], self.col[key]])

    def reset(self) -> None:
        """Zero every count."""
        self._table[:] = 0
        self.dense_runs = [0] * len(self.layer_names)

    def total(self, key: str) -> int:
        """Sum of ``key`` over layers."""
        return int(self.table[:, self.col[key]].sum())

    def merge(self, other: "OpCounter") -> None:
        """Add another counter of the same plan."""
        totals = self.table  # folds this counter's dense runs in (as reading other.table does)
        totals += other.table


# ----------------------------------------------------------------------------- per-layer state


@dataclass
class SdssGrid:
    """Static SDSS geometry of one output map: grid rows/cols and each off-grid position's cell."""

    gy: np.ndarray
    gx: np.ndarray
    grid_positions: np.ndarray
    off_positions: np.ndarray
    off_y: np.ndarray
    off_x: np.ndarray
    cell_y: np.ndarray
    cell_x: np.ndarray


def sdss_grid(ho: int, wo: int, stride: int) -> SdssGrid:
    """Grid rows 0, s, 2s, ... plus the last row (likewise columns); every off-grid position
    belongs to the cell whose top-left grid corner precedes it."""
    gy = np.unique(np.r_[np.arange(0, ho, stride), ho - 1]).astype(np.int32)
    gx = np.unique(np.r_[np.arange(0, wo, stride), wo - 1]).astype(np.int32)
    on_y = np.zeros(ho, bool)
    on_y[gy] = True
    on_x = np.zeros(wo, bool)
    on_x[gx] = True
    yy, xx = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
    grid = on_y[yy] & on_x[xx]
    grid_positions = np.flatnonzero(grid.ravel()).astype(np.int32)
    off = np.flatnonzero(~grid.ravel()).astype(np.int32)
    off_y, off_x = (off // wo).astype(np.int32), (off % wo).astype(np.int32)
    cell_y = np.minimum(np.searchsorted(gy, off_y, side="right") - 1, len(gy) - 2).astype(np.int32)
    cell_x = np.minimum(np.searchsorted(gx, off_x, side="right") - 1, len(gx) - 2).astype(np.int32)
    return SdssGrid(gy, gx, grid_positions, off, off_y, off_x, cell_y, cell_x)


@dataclass
class ConvState:
    """Precomputed data of one conv layer: weights per group in natural and SPET order,
    geometry, SFMA border classes and scratch buffers."""

    layer: Layer
    groups: int
    cin: int  # input channels per group
    cout: int  # output channels per group
    kh: int
    kw: int
    geometry: tuple[int, ...]  # sh, sw, pt, pl, dh, dw
    ho: int
    wo: int
    weights: list[np.ndarray]  # per group, (cout, cin*kh*kw), natural channel order
    channels: list[np.ndarray]  # per group, the absolute input channel indices in natural order
    cols: np.ndarray  # the unfolded input, packed: (panels of 32 positions, cin*kh*kw rows, 32) scratch
    spet: KnobSetting | None = None
    sdss: KnobSetting | None = None
    sfma: KnobSetting | None = None
    spet_order: list[np.ndarray] = field(default_factory=list)  # per group, channel order (relative)
    spet_weights: list[np.ndarray] = field(default_factory=list)  # per group, columns in SPET order
    grid: SdssGrid | None = None
    # Dense path (im2col fused into the GEMM): the source planes (padded copies when the layer
    # pads), the runs of each 32-position panel, and each unfolded row's offset in the source.
    dense_route: str = "fused"  # "direct", "phase", "fused" or "unfold": see dense_route()
    pad_src: bool = False
    src_row_width: int = 0
    all_positions: np.ndarray | None = None
    src_hw: tuple[int, int] = (0, 0)  # Hp, Wp of the padded planes
    runs: np.ndarray | None = None
    vectors: np.ndarray | None = None  # the direct and phase routes' source vectors (K.direct_vectors)
    phase_hw: tuple[int, int] = (0, 0)  # phase route: Hq, Wq of the phase planes (K.phase_planes)
    phase_tap_off: np.ndarray | None = None  # phase route: each unfolded row's offset in those planes
    panel_first: np.ndarray | None = None
    tap_off: np.ndarray | None = None
    # SFMA: per output position its border class; per class the valid kernel taps (kh*kw mask).
    tap_class: np.ndarray | None = None
    class_taps: np.ndarray | None = None
    class_tap_count: int = 0  # valid taps summed over the border classes
    order_tap_off: list[np.ndarray] = field(default_factory=list)  # per group, tap_off in the knob order

    @property
    def kk(self) -> int:
        return self.kh * self.kw

    @property
    def source_floats(self) -> int:
        """Floats of the source scratch the layer needs: its padded planes (dense path with
        padding, and the knob path) and its phase planes (phase route); 0: none."""
        padded = self.cin * self.src_hw[0] * self.src_hw[1] if self.pad_src else 0
        if self.dense_route != "phase":
            return padded
        stride = self.geometry[0]
        return max(padded, self.cin * stride * stride * self.phase_hw[0] * self.phase_hw[1])


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


def _spet_channel_order(w: np.ndarray) -> np.ndarray:
    """Input channels by decreasing L1 norm of their kernel slices over all outputs (shared order)."""
    norms = np.abs(w).sum(axis=(0, 2, 3))
    return np.argsort(-norms, kind="stable").astype(np.int32)


def _border_classes(st: ConvState, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """For SFMA's exact border: each output position's class of valid kernel taps."""
    sh, sw, pt, pl, dh, dw = st.geometry
    ys = np.arange(st.ho)[:, None] * sh - pt + np.arange(st.kh)[None, :] * dh
    xs = np.arange(st.wo)[:, None] * sw - pl + np.arange(st.kw)[None, :] * dw
    vy = (ys >= 0) & (ys < h)
    vx = (xs >= 0) & (xs < w)
    taps = (vy[:, None, :, None] & vx[None, :, None, :]).reshape(st.ho * st.wo, st.kk)
    classes, inverse = np.unique(taps, axis=0, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64), classes.astype(np.float32)


def layer_work(layer: Layer) -> int:
    """A layer's work for the choice of its threads (PARALLEL_MIN_WORK): its MACs, or 8 per
    element of its output or of its largest input."""
    elements = [int(np.prod(shape)) for shape in [layer.out_shape, *layer.in_shapes]]
    return max(layer.dense_macs, 8 * max(elements))


def direct_lane_use(ho: int, wo: int, sh: int, src_row_width: int) -> tuple[float, bool]:
    """Share of the vector lanes the direct route fills, and whether its vectors run across the
    output rows (see ``dv_direct_vectors``): per row, 16-lane vectors cover wo positions; across
    the rows (stride 1 down the rows), they cover the source offsets of the whole map, the
    src_row_width - wo columns past each output row computed and dropped."""
    per_row = wo / (16 * -(-wo // 16))
    if sh != 1 or src_row_width < wo:
        return per_row, False
    span = (ho - 1) * src_row_width + wo
    across = ho * wo / (16 * -(-span // 16))
    return (across, True) if across > per_row else (per_row, False)


def dense_route(cout: int, ho: int, wo: int, sw: int, lane_use: float) -> str:
    """The dense path's conv route (docs/engine.md): ``direct`` (no unfolding) for stride 1
    along rows when its vectors are nearly full (``lane_use`` from :func:`direct_lane_use`) and
    the map is not much smaller than the weights; else the fused unfolding, or ``unfold`` (once)
    when there are more output channels than positions."""
    if sw == 1 and cout <= DIRECT_MAX_ROWS_PER_POSITION * ho * wo and lane_use >= DIRECT_MIN_LANE_USE:
        return "direct"
    return "unfold" if cout > ho * wo else "fused"


def _plan_phase_route(st: ConvState, hp: int, wp: int) -> None:
    """The phase route of a conv with the same stride s > 1 both ways (docs/engine.md): its
    zero-padded input (hp x wp) split into s x s phase planes (K.phase_planes), read by the
    direct route's tiles with stride 1, when those vectors are full enough for it."""
    s = st.geometry[0]
    hq, wq = -(-hp // s), -(-wp // s)
    lane_use, across = direct_lane_use(st.ho, st.wo, 1, wq)
    if dense_route(st.cout, st.ho, st.wo, 1, lane_use) != "direct":
        return
    ky, kx = np.arange(st.kh)[:, None], np.arange(st.kw)[None, :]
    plane = (np.arange(st.cin)[:, None, None] * s + ky % s) * s + kx % s  # cin x kh x kw
    st.dense_route = "phase"
    st.phase_hw = (hq, wq)
    st.phase_tap_off = (plane * hq * wq + (ky // s) * wq + kx // s).reshape(-1).astype(np.int64)
    st.vectors = K.direct_vectors(st.ho, st.wo, 1, wq, across)


def make_conv_state(layer: Layer, knobs: KnobConfig | None) -> ConvState:
    """Static data of a conv layer for the engine."""
    w = layer.weight
    groups = layer.attrs["group"]
    cout_total, cin, kh, kw = w.shape
    cout = cout_total // groups
    _, ho, wo = layer.out_shape
    sh, sw = layer.attrs["stride"]
    pt, pl = layer.attrs["pads"][:2]  # the end pads only shape the output
    dh, dw = layer.attrs["dilation"]
    weights = [aligned_copy(w[g * cout:(g + 1) * cout].reshape(cout, -1)) for g in range(groups)]
    st = ConvState(layer=layer, groups=groups, cin=cin, cout=cout, kh=kh, kw=kw,
                   geometry=(sh, sw, pt, pl, dh, dw), ho=ho, wo=wo,
                   weights=weights, channels=[np.arange(g * cin, (g + 1) * cin, dtype=np.int32) for g in range(groups)],
                   cols=packed_cols(cin * kh * kw, ho * wo, allocate=False))
    _, h_in, w_in = layer.in_shapes[0]
    hp, wp = (ho - 1) * sh + (kh - 1) * dh + 1, (wo - 1) * sw + (kw - 1) * dw + 1
    st.pad_src = not (pt == 0 and pl == 0 and hp <= h_in and wp <= w_in)
    rows_apart, plane = (wp, hp * wp) if st.pad_src else (w_in, h_in * w_in)
    st.src_hw = (hp, wp)
    st.src_row_width = rows_apart
    st.all_positions = np.arange(ho * wo, dtype=np.int32)
    lane_use, across = direct_lane_use(ho, wo, sh, rows_apart)
    st.dense_route = dense_route(cout, ho, wo, sw, lane_use)
    if st.dense_route == "direct":
        st.vectors = K.direct_vectors(ho, wo, sh, rows_apart, across)
    elif sh == sw > 1 and dh == dw == 1:
        _plan_phase_route(st, hp, wp)
    st.runs, st.panel_first = K.im2col_run_table(ho, wo, sh, sw, rows_apart)
    taps = (np.arange(kh)[:, None] * dh * rows_apart + np.arange(kw)[None, :] * dw).reshape(-1)
    st.tap_off = (np.arange(cin)[:, None] * plane + taps[None, :]).reshape(-1).astype(np.int64)
    if knobs is not None:
        st.spet, st.sdss, st.sfma = (knobs.get(layer.name, k) for k in ("spet", "sdss", "sfma"))
    if st.spet is not None:
        for g in range(groups):
            wg = w[g * cout:(g + 1) * cout]
            order = _spet_channel_order(wg)
            st.spet_order.append(order)
            st.spet_weights.append(aligned_copy(wg[:, order].reshape(cout, -1)))
    if st.sdss is not None:
        st.grid = sdss_grid(ho, wo, int(st.sdss.option("sdss", "stride")))
    if st.sfma is not None:
        _, h, wi = layer.in_shapes[0]
        st.tap_class, st.class_taps = _border_classes(st, h, wi)
        if st.sfma.option("sfma", "border") == "interior":
            st.class_taps = np.ones((1, st.kk), np.float32)
            st.tap_class = np.zeros(ho * wo, np.int64)
        st.class_tap_count = int(st.class_taps.sum())
    for g in range(groups):  # the unfolded rows' offsets in the knob path's channel order
        order = st.spet_order[g] if st.spet is not None else np.arange(cin)
        st.order_tap_off.append(np.ascontiguousarray(st.tap_off.reshape(cin, kh * kw)[order].reshape(-1)))
    return st


@dataclass
class FcState:
    """Precomputed data of a fully-connected layer (SPET input order when SPET is on)."""

    layer: Layer
    spet: KnobSetting | None = None
    order: np.ndarray | None = None
    weight_perm: np.ndarray | None = None


def make_fc_state(layer: Layer, knobs: KnobConfig | None) -> FcState:
    """Static data of a fully-connected layer for the engine."""
    st = FcState(layer=layer, spet=knobs.get(layer.name, "spet") if knobs is not None else None)
    if st.spet is not None:
        st.order = np.argsort(-np.abs(layer.weight).sum(axis=0), kind="stable").astype(np.int32)
        st.weight_perm = np.ascontiguousarray(layer.weight[:, st.order])
    return st


@dataclass
class PoolBand:
    """One band of a FusedPool: conv output rows y0..y0+rows-1 (computed into the band scratch,
    from source offset src_offset with `vectors`), pooled into output rows p0..p1-1 (the
    pooling's top padding as seen from the band: pad_top)."""

    y0: int
    rows: int
    p0: int
    p1: int
    pad_top: int
    src_offset: int
    vectors: np.ndarray


@dataclass
class FusedPool:
    """A conv layer and the max-pooling that alone reads it, run band by band on the dense path
    (Engine.forward with fuse=True): the same floats as the two layers one after the other (the
    rows a band shares with the next, kh - stride of the pooling, are computed twice)."""

    conv: int  # layer index of the conv; the pooling is the next layer
    bands: list[PoolBand]
    band_floats: int


def plan_fused_pool(plan: Plan, index: int, st: ConvState, readers: dict[str, list[int]]) -> FusedPool | None:
    """The band plan of conv layer ``index`` with the max-pooling after it, or None when the
    pair does not qualify (see FUSE_MIN_BYTES)."""
    layer = st.layer
    if (index + 1 >= len(plan.layers) or st.groups != 1 or st.dense_route not in ("direct", "phase")
            or st.spet is not None or st.sdss is not None or st.sfma is not None):
        return None
    pool = plan.layers[index + 1]
    if (pool.op != "maxpool" or pool.inputs != [layer.output] or readers.get(layer.output) != [index + 1]
            or layer.output == plan.output_name or 4 * st.cout * st.ho * st.wo < FUSE_MIN_BYTES):
        return None
    kh = pool.attrs["kernel"][0]
    stride, pad_top = pool.attrs["stride"][0], pool.attrs["pads"][0]
    pool_rows = pool.out_shape[1]
    conv_sh = 1 if st.dense_route == "phase" else st.geometry[0]  # source rows per output row
    row_width = st.phase_hw[1] if st.dense_route == "phase" else st.src_row_width
    max_rows = max(kh, FUSE_BAND_BYTES // (4 * st.cout * st.wo))
    per_band = max(1, (max_rows - kh) // stride + 1)  # pooled rows per band
    bands = []
    for p0 in range(0, pool_rows, per_band):
        p1 = min(pool_rows, p0 + per_band)
        y0 = max(0, p0 * stride - pad_top)
        y1 = min(st.ho, (p1 - 1) * stride - pad_top + kh)
        _, across = direct_lane_use(y1 - y0, st.wo, conv_sh, row_width)
        bands.append(PoolBand(y0, y1 - y0, p0, p1, y0 - (p0 * stride - pad_top), y0 * conv_sh * row_width,
                              K.direct_vectors(y1 - y0, st.wo, conv_sh, row_width, across)))
    return FusedPool(index, bands, max(st.cout * b.rows * st.wo for b in bands))


@dataclass
class DenseRun:
    """Consecutive layers of the dense path compiled into one K.Program: their kernels run in
    one parallel region per image (Engine.run), not one per kernel called from Python."""

    program: K.Program
    layers: list[int]  # the layer indices it runs
    views: dict[str, np.ndarray]  # the tensors it produces, as views of the engine's buffers


_BLAS = {"controller": None, "threads": None}


def set_blas_threads(threads: int) -> None:
    """Limit the BLAS libraries to ``threads`` threads for the process (only when it changes:
    looking the libraries up costs far more than a small network's batch-1 run)."""
    if _BLAS["threads"] == threads:
        return
    if _BLAS["controller"] is None:
        _BLAS["controller"] = ThreadpoolController()
    _BLAS["controller"].limit(limits=threads, user_api="blas")
    _BLAS["threads"] = threads


def sfma_spread(xg: np.ndarray, nonneg: bool, statistic: str, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """SFMA's statistic of each input map of ``xg`` (C, H, W), and each map's mean: the standard
    deviation, relative to the maps' mean |x| for ``relative_std`` (``nonneg``: x >= 0 known)."""
    spread, means = np.empty(xg.shape[0]), np.empty(xg.shape[0])
    K.channel_spread(xg, nonneg, statistic == "relative_std", spread, means, threads)
    return spread, means


def tensor_readers(plan: Plan) -> dict[str, list[int]]:
    """For each tensor, the indices of the layers that read it, in order."""
    readers: dict[str, list[int]] = {}
    for i, layer in enumerate(plan.layers):
        for t in layer.inputs:
            readers.setdefault(t, []).append(i)
    return readers


def _plan_buffers(plan: Plan) -> tuple[dict[str, np.ndarray], set[str]]:
    """Output buffers of the layers, as onnxruntime's memory planner does: a buffer is reused
    once every reader of its tensor has run, so that the working set stays in cache.

    A Concat's inputs are written in place into their slices of its buffer when they are made
    by a layer that writes into a buffer (not an alias, not the graph input or output) and read
    by that Concat alone. Aliases (Flatten, Reshape) are views of their input and keep it live.
    Returns the buffer of every tensor that has one and the set of in-place Concat inputs."""
    layers = plan.layers
    producer = {layer.output: layer for layer in layers}
    produced_at = {layer.output: i for i, layer in enumerate(layers)}
    readers = tensor_readers(plan)
    # in-place Concat inputs: tensor -> (concat output, first channel)
    in_place: dict[str, tuple[str, int]] = {}
    for layer in layers:
        if layer.op != "concat":
            continue
        channel = 0
        for t, shape in zip(layer.inputs, layer.in_shapes):
            src = producer.get(t)
            if (src is not None and src.op != "alias" and len(readers.get(t, [])) == 1 and t != plan.output_name
                    and layer.inputs.count(t) == 1 and t not in in_place):
                in_place[t] = (layer.output, channel)
            channel += shape[0]

    def owner(t: str) -> str:
        """The tensor whose buffer holds ``t`` (itself, its alias source, or its Concat)."""
        while True:
            if t in in_place:
                t = in_place[t][0]
            elif t in producer and producer[t].op == "alias":
                t = producer[t].inputs[0]
            else:
                return t

    end_of_graph = len(layers)
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    for t, i in produced_at.items():
        o = owner(t)
        if o == plan.input_name:
            continue
        last = end_of_graph if t == plan.output_name else max(readers.get(t, [i]))
        start[o] = min(start.get(o, i), i)
        end[o] = max(end.get(o, last), last)
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
        if fits:
            block = free.pop(min(fits, key=lambda k: free[k].size))
        else:
            block = aligned_zeros(size)
        blocks[o] = block
        buffers[o] = block[:size].reshape(producer[o].out_shape)
        releases.setdefault(end[o], []).append(o)

    def place(t: str) -> np.ndarray:
        if t not in buffers:
            concat, channel = in_place[t]
            shape = producer[t].out_shape
            buffers[t] = place(concat)[channel:channel + shape[0]]
        return buffers[t]

    for t in in_place:
        place(t)
    return buffers, set(in_place)


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Runs a plan on batches of images; ``knobs=None`` (or an empty config) is the dense path.

    Every layer writes into an output buffer allocated once per engine (no allocation, hence no
    page faults, per image); a Concat's inputs are written in place into their slices of its
    buffer. :meth:`forward` returns views of these buffers (valid until the next call);
    :meth:`run` and :meth:`run_image` return copies.

    With ``compiled`` (the default), the runs of consecutive layers that take the dense path
    with no knob (convolutions, poolings, in-place concatenations, views) are compiled into
    programs (DenseRun): :meth:`run` then runs each in one parallel region per image, the same
    kernels with the same shares, hence the same floats."""

    def __init__(self, plan: Plan, knobs: KnobConfig | None = None, threads: int = 1, compiled: bool = True) -> None:
        if threads < 1:
            raise DyveError(f"threads must be >= 1, got {threads}")
        self.plan = plan
        self.knobs = knobs if knobs is not None else KnobConfig()
        self.threads = int(threads)
        dense_rows = np.zeros((len(plan.layers), len(COUNTER_FIELDS)), np.int64)
        for i, layer in enumerate(plan.layers):
            dense_rows[i, [COUNTER_FIELDS.index(f) for f in ("images", "macs", "ops")]] = \
                (1, layer.dense_macs if layer.is_compute else 0, layer.dense_ops)
        self.counter = OpCounter([layer.name for layer in plan.layers], dense_rows)
        self.states: dict[str, ConvState | FcState] = {}
        self.layer_threads = {layer.name: self.threads if layer_work(layer) >= PARALLEL_MIN_WORK else 1
                              for layer in plan.layers}
        self.kernel_threads = 1
        for layer in plan.layers:
            if layer.op == "conv":
                self.states[layer.name] = make_conv_state(layer, self.knobs)
            elif layer.op == "fc":
                self.states[layer.name] = make_fc_state(layer, self.knobs)
        # one unfolded-input scratch for all conv layers (it stays in cache from layer to layer)
        conv_states = [st for st in self.states.values() if isinstance(st, ConvState)]
        scratch = aligned_zeros(max([st.cols.size for st in conv_states], default=0))
        for st in conv_states:
            st.cols = scratch[:st.cols.size].reshape(st.cols.shape)
        # the knob path's kept weight columns and SFMA constant maps
        self._kept_weights = aligned_zeros(max([st.cout * st.cin * st.kk for st in conv_states], default=1))
        self._constant = aligned_zeros(max([st.cout * st.ho * st.wo for st in conv_states], default=1))
        # the dense path's padded input planes and per-thread panels
        self._pad_scratch = aligned_zeros(max([st.source_floats for st in conv_states], default=1))
        # one row per thread; a row (K x 32 floats) is a whole number of cache lines
        self._panels = aligned_zeros((self.threads, max([st.cin * st.kk * 32 for st in conv_states], default=32)))
        self.buffers, self.in_place = _plan_buffers(plan)
        readers = tensor_readers(plan)
        self._fused = {}  # conv layer index -> FusedPool (dense path, forward(fuse=True))
        for i, layer in enumerate(plan.layers):
            if layer.op == "conv" and layer.output not in self.in_place:
                fused = plan_fused_pool(plan, i, self.states[layer.name], readers)
                if fused is not None:
                    self._fused[i] = fused
        self._band_scratch = aligned_zeros(max([f.band_floats for f in self._fused.values()], default=1))
        self._steps = [(i, layer, layer.inputs, self.buffers.get(layer.output)) for i, layer in enumerate(plan.layers)]
        self._image = aligned_zeros(plan.input_shape)  # stands for the image in the compiled runs
        self._runs = self._compile_runs() if compiled else None

    # -- public API ------------------------------------------------------------------------

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Outputs (N, ...) of a batch of preprocessed inputs (N, C, H, W)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(self.plan.input_shape):
            raise DyveError(f"{self.plan.path}: input shape {tuple(batch.shape)} does not match the model's "
                            f"(N, {', '.join(map(str, self.plan.input_shape))})")
        outputs = np.empty((batch.shape[0],) + tuple(self.plan.output_shape), np.float32)
        set_blas_threads(self.threads)
        for n in range(batch.shape[0]):
            outputs[n] = self.forward(batch[n], fuse=True)[self.plan.output_name]
        return outputs

    def run_image(self, image: np.ndarray, start: int = 0, tensors: dict[str, np.ndarray] | None = None,
                  stop: int | None = None) -> dict[str, np.ndarray]:
        """Run layers ``start``..``stop`` on one image; returns copies of the tensors still live
        after it: those that later layers read, and the graph output once made.

        ``tensors`` supplies the inputs of the first layer run (for cached activations)."""
        values = self.forward(image, start, tensors, stop)
        later = self.plan.layers[stop:] if stop is not None else []
        live = {t for layer in later for t in layer.inputs} | {self.plan.output_name}
        return {name: np.array(v, copy=True) for name, v in values.items() if name in live}

    def forward(self, image: np.ndarray | None, start: int = 0, tensors: dict[str, np.ndarray] | None = None,
                stop: int | None = None, fuse: bool = False) -> dict[str, np.ndarray]:
        """As :meth:`run_image`, but returns every tensor produced as a view of the engine's
        buffers: a dead tensor's buffer may already hold a later tensor, and the next call
        overwrites them all. With ``fuse``, a conv and the max-pooling that alone reads it run
        band by band (FusedPool): the same floats, but the conv's own output is not returned."""
        if fuse and self._runs is not None and image is not None and start == 0 and stop is None and not tensors:
            return self._forward_compiled(np.ascontiguousarray(image, dtype=np.float32))
        values: dict[str, np.ndarray] = dict(tensors) if tensors else {}
        if image is not None:
            values[self.plan.input_name] = image
        steps = self._steps[start:stop]
        last = steps[-1][0] if steps else -1
        skip = -1
        for i, layer, inputs, out in steps:
            if i == skip:
                continue
            if fuse and i in self._fused and i + 1 <= last:
                pool = self.plan.layers[i + 1]
                values[pool.output] = self._run_fused_pool(self._fused[i], values[inputs[0]])
                skip = i + 1
                continue
            values[layer.output] = self._run_layer(layer, [values[t] for t in inputs], out, i)
        return values

    def _forward_compiled(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """forward(image, fuse=True) through the compiled runs (DenseRun) and, between them,
        the layers on the Python path."""
        values: dict[str, np.ndarray] = {self.plan.input_name: image}
        runs = self.counter.dense_runs
        for part in self._runs:
            if isinstance(part, DenseRun):
                part.program.run(image)
                values.update(part.views)
                for i in part.layers:
                    runs[i] += 1
            else:
                i, layer, inputs, out = self._steps[part]
                values[layer.output] = self._run_layer(layer, [values[t] for t in inputs], out, i)
        return values

    def _compilable(self, i: int, layer: Layer, values: dict[str, np.ndarray]) -> bool:
        """Whether layer i joins a compiled run: a conv without knobs, a pooling, a Concat whose
        inputs are all written in place, or a view (not of the image, which changes per call)."""
        if layer.op == "conv":
            st = self.states[layer.name]
            return st.spet is None and st.sdss is None and st.sfma is None
        if layer.op == "alias":
            return not np.shares_memory(values[layer.inputs[0]], self._image)
        if layer.op == "concat":
            return all(t in self.in_place for t in layer.inputs)
        return layer.op in ("maxpool", "avgpool", "gap")

    def _compile_runs(self) -> list[DenseRun | int]:
        """The layers in order as DenseRuns and, between them, the indices of the layers left
        to the Python path (knobs, fully connected, softmax, ...). Each run's steps are built by
        the same code as forward(fuse=True), given a program to append to."""
        parts: list[DenseRun | int] = []
        values: dict[str, np.ndarray] = {self.plan.input_name: self._image}
        current: DenseRun | None = None
        last = len(self.plan.layers) - 1
        skip = -1
        for i, layer, inputs, out in self._steps:
            if i == skip:
                continue
            if not self._compilable(i, layer, values):
                current = None
                parts.append(i)
                values[layer.output] = out if out is not None else values[inputs[0]].reshape(layer.out_shape)
                continue
            if current is None:
                current = DenseRun(K.Program(self._image), [], {})
                parts.append(current)
            if i in self._fused and i + 1 <= last:
                pool = self.plan.layers[i + 1]
                produced = {pool.output: self._fused_pool_steps(self._fused[i], values[inputs[0]], current.program)}
                current.layers += [i, i + 1]
                skip = i + 1
            else:
                produced = {layer.output: self._layer_steps(layer, [values[t] for t in inputs], out, current.program)}
                current.layers.append(i)
            values.update(produced)
            current.views.update(produced)
        return parts

    def _layer_steps(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray | None,
                     program: K.Program) -> np.ndarray:
        """Append a compilable layer's steps (see _compilable) to ``program``; returns its output."""
        threads = self._threads_of(layer, program)
        if layer.op == "conv":
            st = self.states[layer.name]
            self._conv_dense(st, inputs[0], out.reshape(layer.out_shape[0], st.ho * st.wo), threads, program)
            return out
        if layer.op == "alias":
            return inputs[0].reshape(layer.out_shape)
        if layer.op == "concat":  # every input was written in place
            return out
        self._pool(layer, inputs[0], out, threads, program)
        return out

    def _threads_of(self, layer: Layer, program: K.Program | None) -> int:
        """Threads of a layer's kernels: all the engine's in a compiled run (sharing out a step
        costs a barrier there, not the start of a parallel loop), else by its work
        (PARALLEL_MIN_WORK)."""
        return self.threads if program is not None else self.layer_threads[layer.name]

    # -- dispatch --------------------------------------------------------------------------

    def _run_layer(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray | None = None,
                   index: int | None = None) -> np.ndarray:
        """One layer into ``out`` (allocated when None); counts its ops. Returns its output."""
        if index is None:
            index = self.counter.index[layer.name]
        if out is None and layer.op != "alias":
            out = np.empty(layer.out_shape, np.float32)
        self.kernel_threads = self.layer_threads[layer.name]  # threads of this layer's own kernels
        op = layer.op
        if op == "conv":
            return self._conv(self.states[layer.name], inputs[0], out, index)
        if op == "fc":
            return self._fc(self.states[layer.name], inputs[0], out, index)
        self.counter.dense_runs[index] += 1
        x = inputs[0] if inputs else None
        if op == "alias":
            return x.reshape(layer.out_shape)
        if op == "relu":
            np.copyto(out, x.reshape(layer.out_shape))
            K.relu_inplace(out.reshape(-1))
            return out
        if op in ("maxpool", "avgpool", "gap"):
            self._pool(layer, x, out, self.kernel_threads)
            return out
        if op == "gmp":
            np.max(x.reshape(x.shape[0], -1), axis=1, out=out.reshape(-1))
            return out
        if op == "lrn":
            a = layer.attrs
            K.lrn_across(x, out, a["size"], a["alpha"], a["beta"], a["bias"], self.kernel_threads)
            return out
        if op == "concat":
            channel = 0
            for name, t in zip(layer.inputs, inputs):
                if name not in self.in_place:  # written in place by its producer otherwise
                    out[channel:channel + t.shape[0]] = t
                channel += t.shape[0]
            return out
        if op == "softmax":
            flat = x.reshape(-1, 1) if len(layer.out_shape) == 1 else x.reshape(x.shape[0], -1)
            K.softmax_columns(np.ascontiguousarray(flat), out.reshape(flat.shape))
            return out
        if op == "eltwise":
            out[...] = self._eltwise(layer, inputs)
            return out
        raise DyveError(f"{self.plan.path}: layer {layer.name}: op {op} is not supported by the engine")

    def _pool(self, layer: Layer, x: np.ndarray, out: np.ndarray, threads: int,
              program: K.Program | None = None) -> None:
        """A max, average or global average pooling of x into out (appended to ``program``
        when given)."""
        if layer.op == "gap":
            K.global_avgpool(x.reshape(x.shape[0], -1), out.reshape(-1), threads, program)
            return
        kh, kw = layer.attrs["kernel"]
        sh, sw = layer.attrs["stride"]
        pt, pl, pb, pr = layer.attrs["pads"]
        if layer.op == "maxpool":
            K.maxpool(x, out, kh, kw, sh, sw, pt, pl, threads, program)
        else:
            K.avgpool(x, out, kh, kw, sh, sw, pt, pl, pb, pr, layer.attrs["count_include_pad"], threads, program)

    def _eltwise(self, layer: Layer, inputs: list[np.ndarray]) -> np.ndarray:
        it = iter(inputs)
        args = [np.float32(s) if s is not None else next(it) for s in layer.attrs["scalars"]]
        kind = layer.attrs["kind"]
        a, b = args
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

    # -- fully connected -------------------------------------------------------------------

    def _fc(self, st: FcState, x: np.ndarray, out: np.ndarray, index: int) -> np.ndarray:
        layer = st.layer
        x = np.ascontiguousarray(x.reshape(-1))
        w, b = layer.weight, layer.bias
        o = w.shape[0]
        out = out.reshape(-1)
        if st.spet is None:
            self._fc_dense(layer, x, out)
            self.counter.dense_runs[index] += 1
            return out
        kin = w.shape[1]
        lead = min(kin, max(1, math.ceil(st.spet.option("spet", "fraction") * kin)))
        xp = np.ascontiguousarray(x[st.order])
        out[:] = b
        K.gemm(st.weight_perm[:, :lead], xp[:lead, None], out[:, None], 1.0)
        cont = np.empty((1, o), U8)
        terminated = K.spet_decide(out[None, :], st.spet.threshold, np.ones((1, o), U8), cont)
        K.gemv_rows(st.weight_perm, xp, out, lead, kin, cont[0], self.kernel_threads)
        K.finish_act(out[None, :], np.ones((1, o), U8), cont, True)
        fallbacks = 0
        if terminated == 0:
            self._fc_dense(layer, x, out)
            fallbacks = 1
        macs = o * lead + (o - terminated) * (kin - lead)
        # bias add per neuron, one compare per neuron (SPET), ReLU compare per finished neuron
        ops = 2 * macs + o + o + (o - terminated)
        self.counter.add(layer.name, images=1, macs=macs, ops=ops, overhead_spet=o, fallbacks=fallbacks,
                         saved_spet=2 * terminated * (kin - lead) + terminated, terminated=terminated)
        return out

    def _fc_dense(self, layer: Layer, x: np.ndarray, out: np.ndarray) -> None:
        K.gemv_bias(layer.weight, x, layer.bias, out, layer.relu)

    # -- convolution -----------------------------------------------------------------------

    def _conv(self, st: ConvState, x: np.ndarray, out: np.ndarray, index: int) -> np.ndarray:
        layer = st.layer
        out2 = out.reshape(layer.out_shape[0], st.ho * st.wo)
        if st.spet is None and st.sdss is None and st.sfma is None:
            self._conv_dense(st, x, out2, self.kernel_threads)
            self.counter.dense_runs[index] += 1
            return out
        fired = False
        for g in range(st.groups):
            fired |= self._conv_group_knobs(st, x, out2[g * st.cout:(g + 1) * st.cout], g, index)
        if not fired:
            # nothing was skipped: give the dense path's result exactly (ops were counted above)
            self._conv_dense(st, x, out2, self.kernel_threads)
            self.counter.add(layer.name, fallbacks=1)
        return out

    def _phase_planes(self, st: ConvState, x: np.ndarray, g: int, threads: int,
                      program: K.Program | None = None) -> np.ndarray:
        """Group g's input split into the phase route's planes (K.phase_planes), in the source
        scratch: (cin * s * s, Hq, Wq)."""
        stride, _, pt, pl, _, _ = st.geometry
        hq, wq = st.phase_hw
        planes = self._pad_scratch[:st.cin * stride * stride * hq * wq].reshape(-1, hq, wq)
        K.phase_planes(x, g * st.cin, st.cin, pt, pl, stride, planes, threads, program)
        return planes

    def _run_fused_pool(self, fused: FusedPool, x: np.ndarray) -> np.ndarray:
        """A conv layer and its max-pooling, band by band (FusedPool); returns the pooled map."""
        out = self._fused_pool_steps(fused, x)
        self.counter.dense_runs[fused.conv] += 1
        self.counter.dense_runs[fused.conv + 1] += 1
        return out

    def _fused_pool_steps(self, fused: FusedPool, x: np.ndarray, program: K.Program | None = None) -> np.ndarray:
        """The kernels of _run_fused_pool, run now or appended to ``program``; returns the pooled map."""
        layer, pool = self.plan.layers[fused.conv], self.plan.layers[fused.conv + 1]
        st = self.states[layer.name]
        out = self.buffers.get(pool.output)
        conv_threads, pool_threads = self._threads_of(layer, program), self._threads_of(pool, program)
        _, _, pt, pl, _, _ = st.geometry
        if st.dense_route == "phase":
            src, tap_off = self._phase_planes(st, x, 0, conv_threads, program), st.phase_tap_off
        elif st.pad_src:
            hp, wp = st.src_hw
            K.pad_planes(x, 0, st.cin, pt, pl, hp, wp, self._pad_scratch, conv_threads, program)
            src, tap_off = self._pad_scratch[:st.cin * hp * wp].reshape(st.cin, hp, wp), st.tap_off
        else:
            src, tap_off = x, st.tap_off
        kh, kw = pool.attrs["kernel"]
        psh, psw = pool.attrs["stride"]
        ppl = pool.attrs["pads"][1]
        for band in fused.bands:
            conv_out = self._band_scratch[:st.cout * band.rows * st.wo].reshape(st.cout, band.rows * st.wo)
            K.conv_direct(src, 0, 0, 0, src.shape[1], src.shape[2], False, self._pad_scratch, tap_off, band.vectors,
                          st.weights[0], layer.bias, layer.relu, conv_out, conv_threads, band.src_offset, program)
            K.maxpool(conv_out.reshape(st.cout, band.rows, st.wo), out[:, band.p0:band.p1], kh, kw, psh, psw,
                      band.pad_top, ppl, pool_threads, program)
        return out

    def _conv_dense(self, st: ConvState, x: np.ndarray, out: np.ndarray, threads: int,
                    program: K.Program | None = None) -> None:
        """The dense path of a conv layer on its route, run now or appended to ``program``."""
        sh, sw, pt, pl, dh, dw = st.geometry
        bias = st.layer.bias
        for g in range(st.groups):
            og, bg = out[g * st.cout:(g + 1) * st.cout], bias[g * st.cout:(g + 1) * st.cout]
            if st.dense_route == "direct":  # stride 1 along rows: the tiles read the source in place
                K.conv_direct(x, g * st.cin, pt, pl, st.src_hw[0], st.src_hw[1], st.pad_src, self._pad_scratch,
                              st.tap_off, st.vectors, st.weights[g], bg, st.layer.relu, og, threads, 0, program)
            elif st.dense_route == "phase":  # stride s: phase planes, then the direct route's tiles
                planes = self._phase_planes(st, x, g, threads, program)
                K.conv_direct(planes, 0, 0, 0, planes.shape[1], planes.shape[2], False, self._pad_scratch,
                              st.phase_tap_off, st.vectors, st.weights[g], bg, st.layer.relu, og, threads, 0, program)
            elif st.dense_route == "unfold":  # large weights, small map: unfold once, weights stay in L1
                K.im2col_packed(x, st.channels[g], st.kh, st.kw, sh, sw, pt, pl, dh, dw, st.ho, st.wo, st.cols,
                                threads, program)
                K.conv_gemm(st.weights[g], st.cols, st.ho * st.wo, og, bg, st.layer.relu, threads, program)
            else:  # im2col fused into the GEMM, one 32-position panel at a time
                K.conv_dense(x, g * st.cin, pt, pl, st.src_hw[0], st.src_hw[1], st.pad_src, self._pad_scratch,
                             st.tap_off, sw, st.runs, st.panel_first, st.weights[g], bg, st.layer.relu, og,
                             self._panels, threads, program)

    def _conv_group_knobs(self, st: ConvState, x: np.ndarray, out_g: np.ndarray, g: int, index: int) -> bool:
        """One group of a conv layer with its knobs; returns whether any knob skipped work."""
        layer = st.layer
        cin, cout, kk, npos = st.cin, st.cout, st.kk, st.ho * st.wo
        xg = x[g * cin:(g + 1) * cin]
        bias = layer.bias[g * cout:(g + 1) * cout]
        count: dict[str, int] = dict.fromkeys(COUNTER_FIELDS, 0)
        count["images"] = int(g == 0)
        # channel order: SPET's significance order, else natural
        if st.spet is not None:
            order, wmat = st.spet_order[g], st.spet_weights[g]
        else:
            order, wmat = np.arange(cin, dtype=np.int32), st.weights[g]

        # ---- SFMA: drop near-uniform input maps (their contribution becomes a constant map)
        constant = None
        kept_rel = order
        if st.sfma is not None:
            dropped, means = self._sfma_select(st, xg, count)
            if dropped.any():
                keep_mask = ~dropped[order]
                kept_rel = order[keep_mask]
                drop_rel = np.flatnonzero(dropped).astype(np.int32)
                constant = self._sfma_constant(st, g, drop_rel, means[drop_rel], count)
                count["dropped_maps"] += len(drop_rel)
                count["saved_sfma"] += 2 * cout * npos * kk * len(drop_rel)
        kdim = len(kept_rel) * kk
        lead = kdim
        if st.spet is not None:
            lead = min(len(kept_rel), max(1, math.ceil(st.spet.option("spet", "fraction") * len(kept_rel)))) * kk \
                if len(kept_rel) else 0

        # ---- the positions computed first (the SDSS grid, or all), with SPET inside
        src, tap_off, wmat = self._knob_source(st, x, g, kept_rel, wmat)
        positions = st.grid.grid_positions if st.sdss is not None else st.all_positions
        self._knob_neurons(st, src, tap_off, wmat, lead, bias, constant, positions, None, out_g, count)
        if st.sdss is not None:
            # ---- SDSS: interpolate insignificant cells, compute the rest of the map
            self._sdss_rest(st, out_g, src, tap_off, wmat, lead, bias, constant, count)

        count["ops"] += count["overhead_sfma"] + count["overhead_sdss"] + count["overhead_spet"]
        self.counter.add_counts(index, list(count.values()))
        return bool(count["dropped_maps"] or count["filled"] or count["terminated"])

    def _knob_source(self, st: ConvState, x: np.ndarray, g: int, kept_rel: np.ndarray,
                     wmat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The group's input planes as the unfolding reads them (zero-padded copies when the layer
        pads), the offset of every unfolded row of the kept channels and their weight columns
        (``wmat``'s columns are in the order of ``st.spet_order`` or natural; ``kept_rel`` lists
        the kept channels in that order)."""
        sh, sw, pt, pl, dh, dw = st.geometry
        if st.pad_src:
            src = self._pad_scratch
            K.pad_planes(x, g * st.cin, st.cin, pt, pl, st.src_hw[0], st.src_hw[1], src)
        else:
            src = x[g * st.cin:(g + 1) * st.cin].reshape(-1)
        n = len(kept_rel) * st.kk
        if len(kept_rel) == st.cin:  # nothing dropped: the order's own columns and offsets
            return src, st.order_tap_off[g], wmat
        tap_off = np.empty(n, np.int64)
        w_kept = self._kept_weights[:st.cout * n].reshape(st.cout, n)
        K.gather_channels(st.weights[g], kept_rel, st.kk, st.tap_off, w_kept, tap_off)
        return src, tap_off, w_kept

    def _knob_neurons(self, st: ConvState, src: np.ndarray, tap_off: np.ndarray, wmat: np.ndarray, lead: int,
                      bias: np.ndarray, constant: np.ndarray | None, positions: np.ndarray, mask: np.ndarray | None,
                      out_g: np.ndarray, count: dict[str, int]) -> None:
        """The outputs at ``positions`` (where ``mask``, if given), SPET inside when on, written to
        ``out_g`` (ReLU'd when the layer has one); counts their MACs and ops."""
        sh, sw = st.geometry[0], st.geometry[1]
        relu = st.layer.relu
        spet = st.spet is not None
        margin = float(st.spet.threshold) if spet else 0.0
        terminated, n_active = K.knob_conv(src, tap_off, positions, st.wo, sh, sw, st.src_row_width, wmat, lead,
                                           spet, margin, relu, bias, constant, mask, out_g, self._panels,
                                           self.kernel_threads)
        kdim = wmat.shape[1]
        if not spet:
            count["macs"] += n_active * kdim
            count["ops"] += 2 * n_active * kdim + n_active * (1 + int(relu))
            return
        finished = n_active - terminated
        count["macs"] += n_active * lead + finished * (kdim - lead)
        count["ops"] += 2 * (n_active * lead + finished * (kdim - lead)) + n_active + finished * int(relu)
        count["overhead_spet"] += n_active
        count["saved_spet"] += 2 * terminated * (kdim - lead) + terminated * int(relu)
        count["terminated"] += terminated

    def _sdss_rest(self, st: ConvState, out_g: np.ndarray, src: np.ndarray, tap_off: np.ndarray, wmat: np.ndarray,
                   lead: int, bias: np.ndarray, constant: np.ndarray | None, count: dict[str, int]) -> None:
        """After the grid: decide the cells, compute the off-grid positions of significant cells
        (only the positions some map needs are unfolded; each map computes its own) and fill
        the others."""
        grid = st.grid
        cout = st.cout
        maps = out_g.reshape(cout, st.ho, st.wo)
        ncells = (len(grid.gy) - 1) * (len(grid.gx) - 1)
        insig = np.empty((cout, len(grid.gy) - 1, len(grid.gx) - 1), U8)
        K.sdss_cells(maps, grid.gy, grid.gx, st.sdss.threshold, insig)
        # one compare per grid point per map, three ANDs per cell per map
        count["overhead_sdss"] += cout * len(grid.grid_positions) + 3 * cout * ncells
        positions, needed, n_needed = K.sdss_union(insig, grid.off_positions, grid.cell_y, grid.cell_x)
        if n_needed:
            # the positions some map needs, unfolded compactly; each map computes its own
            self._knob_neurons(st, src, tap_off, wmat, lead, bias, constant, positions, needed, out_g, count)
        bilinear = st.sdss.option("sdss", "fill") == "bilinear"
        filled = K.sdss_fill(maps, grid.gy, grid.gx, grid.off_y, grid.off_x, grid.cell_y, grid.cell_x, insig,
                             bilinear)
        count["filled"] += filled
        count["overhead_sdss"] += filled * (BILINEAR_FILL_OPS if bilinear else 0)
        count["saved_sdss"] += filled * (2 * wmat.shape[1] + 1 + int(st.layer.relu))

    # -- SFMA helpers ----------------------------------------------------------------------

    def _sfma_select(self, st: ConvState, xg: np.ndarray, count: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
        """Which input maps of the group are near-uniform, and every map's mean."""
        cin, hw = st.cin, xg.shape[1] * xg.shape[2]
        nonneg = st.layer.input_nonneg
        statistic = st.sfma.option("sfma", "statistic")
        spread, means = sfma_spread(xg, nonneg, statistic, self.kernel_threads)
        if statistic == "relative_std":
            count["overhead_sfma"] += cin + 1  # the layer's mean |x|: one add per map, one divide
        # sum (1 add) and sum of squares (1 mul + 1 add) per element; |x| (abs + add) if signed
        count["overhead_sfma"] += cin * hw * (3 + (0 if nonneg else 2)) + cin * SFMA_TEST_OPS
        return spread < st.sfma.threshold, means.astype(np.float32)

    def _sfma_constant(self, st: ConvState, g: int, drop: np.ndarray, means: np.ndarray,
                       count: dict[str, int]) -> np.ndarray:
        """Contribution (cout x positions) of the dropped maps, each taken as its mean: per output
        channel, the mean-weighted kernel restricted to each position's valid taps."""
        out = self._constant[:st.cout * st.ho * st.wo].reshape(st.cout, st.ho * st.wo)
        K.sfma_constant(st.weights[g], drop, means, st.kk, st.class_taps, st.tap_class, out)
        # MACs for the weighted kernel; adds for the class sums; one add per output neuron
        count["overhead_sfma"] += 2 * st.cout * len(drop) * st.kk + st.cout * st.class_tap_count \
            + st.cout * st.ho * st.wo
        return out


# ----------------------------------------------------------------------------- knob statistics


def knob_statistics(engine: Engine, layer: Layer, x: np.ndarray, knob: str) -> np.ndarray:
    """The values that ``knob``'s threshold is compared with in ``layer`` for one input ``x``
    (under the engine's current knobs for the other knobs), for calibration's candidate grids:
    SFMA: each input map's spread; SDSS: each cell's largest grid corner (after ReLU);
    SPET: each neuron's margin -partial where the partial sum is negative."""
    if knob == "sfma":
        st = engine.states[layer.name]
        setting = engine.knobs.get(layer.name, "sfma")
        statistic = setting.option("sfma", "statistic") if setting else DEFAULT_OPTIONS["sfma"]["statistic"]
        return np.concatenate([sfma_spread(x[g * st.cin:(g + 1) * st.cin], layer.input_nonneg, statistic)[0]
                               for g in range(st.groups)])
    out = engine._run_layer(layer, [x]).reshape(layer.out_shape[0], -1)
    if knob == "sdss":
        ho, wo = layer.out_shape[1], layer.out_shape[2]
        setting = engine.knobs.get(layer.name, "sdss")
        stride = int(setting.option("sdss", "stride")) if setting else 2
        grid = sdss_grid(ho, wo, stride)
        maps = out.reshape(-1, ho, wo)
        corners = np.stack([maps[:, grid.gy[:-1]][:, :, grid.gx[:-1]], maps[:, grid.gy[:-1]][:, :, grid.gx[1:]],
                            maps[:, grid.gy[1:]][:, :, grid.gx[:-1]], maps[:, grid.gy[1:]][:, :, grid.gx[1:]]])
        return corners.max(axis=0).reshape(-1)
    if knob == "spet":
        return _spet_margins(engine, layer, x)
    raise ValueError(knob)


def _spet_margins(engine: Engine, layer: Layer, x: np.ndarray) -> np.ndarray:
    """-partial for the neurons whose partial sum (bias + leading inputs) is negative."""
    setting = engine.knobs.get(layer.name, "spet")
    fraction = float(setting.option("spet", "fraction")) if setting else 0.5
    w = layer.weight
    if layer.op == "fc":
        order = np.argsort(-np.abs(w).sum(axis=0), kind="stable")
        lead = max(1, math.ceil(fraction * w.shape[1]))
        partial = w[:, order[:lead]] @ x.reshape(-1)[order[:lead]] + layer.bias
    else:
        st = engine.states[layer.name]
        sh, sw, pt, pl, dh, dw = st.geometry
        parts = []
        for g in range(st.groups):
            wg = w[g * st.cout:(g + 1) * st.cout]
            order = _spet_channel_order(wg)
            lead_ch = order[: max(1, math.ceil(fraction * st.cin))].astype(np.int32) + g * st.cin
            cols = packed_cols(len(lead_ch) * st.kk, st.ho * st.wo)
            K.im2col_packed(x, lead_ch, st.kh, st.kw, sh, sw, pt, pl, dh, dw, st.ho, st.wo, cols, 1)
            wl = np.ascontiguousarray(wg[:, lead_ch - g * st.cin].reshape(st.cout, -1))
            part = np.empty((st.cout, st.ho * st.wo), np.float32)
            K.conv_gemm(wl, cols, st.ho * st.wo, part, layer.bias[g * st.cout:(g + 1) * st.cout])
            parts.append(part)
        partial = np.concatenate(parts).reshape(-1)
    return -partial[partial < 0]
