"""Conv planning: a conv layer's geometry, its knob-free route (how its kernels read the input)
and its knob plan, each a small object fixed at construction, gathered in :class:`ConvPlan`.

Routes (docs/engine.md): ``direct`` (stride 1 along rows: the tiles read the source in place),
``phase`` (stride s both ways: s x s phase planes read with stride 1 by the direct tiles),
``panel`` (im2col of one 32-position panel at a time, fused into the GEMM) and ``unfold``
(the whole input unfolded once, for more output channels than positions).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .. import _kernels as K
from ..knobs import KnobConfig, KnobSetting
from ..plan import Layer
from .memory import aligned_copy, aligned_zeros, packed_cols
from .sdss import SdssGrid, sdss_grid
from .sfma import border_classes
from .spet import SpetBound, channel_nonzeros, spet_bound, spet_channel_order
from .tuning import EngineTuning


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes of one conv layer (per group) and of its input."""

    groups: int
    cin: int  # input channels per group
    cout: int  # output channels per group
    kh: int
    kw: int
    sh: int
    sw: int
    pt: int
    pl: int
    dh: int
    dw: int
    ho: int
    wo: int
    h: int  # input height
    w: int  # input width

    @classmethod
    def of(cls, layer: Layer) -> "ConvGeometry":
        cout_total, cin, kh, kw = layer.weight.shape
        groups = layer.attrs["group"]
        pt, pl = layer.attrs["pads"][:2]  # the end pads only shape the output
        return cls(groups, cin, cout_total // groups, kh, kw, *layer.attrs["stride"], pt, pl,
                   *layer.attrs["dilation"], *layer.out_shape[1:], *layer.in_shapes[0][1:])

    @property
    def kk(self) -> int:
        return self.kh * self.kw

    @property
    def positions(self) -> int:
        return self.ho * self.wo


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


def choose_route(cout: int, ho: int, wo: int, sw: int, lane_use: float, tuning: EngineTuning, threads: int = 1) -> str:
    """The knob-free conv route (docs/engine.md): ``direct`` (no unfolding) for stride 1 along
    rows when its vectors are nearly full (``lane_use`` from :func:`direct_lane_use`; less full
    in an engine of several ``threads``) and the map is not much smaller than the weights; else
    ``panel`` (im2col fused into the GEMM), or ``unfold`` (once) when there are more output
    channels than positions."""
    min_lane_use = tuning.direct_min_lane_use if threads <= 1 else tuning.direct_min_lane_use_threads
    if (sw == 1 and cout <= tuning.direct_max_rows_per_position * ho * wo
            and lane_use >= min_lane_use):
        return "direct"
    return "unfold" if cout > ho * wo else "panel"


@dataclass(frozen=True)
class ConvRoute:
    """How a conv layer's kernels read its input: the source planes (zero-padded copies when
    ``pad_src``, hp x wp), the offset of each unfolded row in them, and the route's tables."""

    name: str  # "direct", "phase", "panel", "unfold" or "ocvec"
    pad_src: bool
    src_hw: tuple[int, int]  # hp, wp of the padded planes
    src_row_width: int  # floats between two source rows
    tap_off: np.ndarray  # each unfolded row's offset in the source (natural channel order)
    runs: np.ndarray  # the panel route's runs of each 32-position panel (K.im2col_run_table)
    panel_first: np.ndarray
    vectors: np.ndarray | None = None  # the direct and phase routes' vectors (K.direct_vectors)
    phase_hw: tuple[int, int] = (0, 0)  # phase route: hq, wq of the phase planes (K.phase_planes)
    phase_tap_off: np.ndarray | None = None  # phase route: each unfolded row's offset in them
    pos_off: np.ndarray | None = None  # ocvec route: each output position's source offset of tap (0, 0)
    rows_below_tiles: int = 4  # direct and phase routes: weight rows shared out below this many tiles per thread

    def source_floats(self, geom: ConvGeometry) -> int:
        """Floats of the source scratch the layer needs: its padded planes (with padding, on
        every route and the knob path) and its phase planes (phase route); 0: none."""
        padded = geom.cin * self.src_hw[0] * self.src_hw[1] if self.pad_src else 0
        if self.name != "phase":
            return padded
        return max(padded, geom.cin * geom.sh * geom.sh * self.phase_hw[0] * self.phase_hw[1])


def plan_route(geom: ConvGeometry, tuning: EngineTuning, threads: int = 1) -> ConvRoute:
    """The knob-free route of a conv layer (in an engine of ``threads``) and the tables it reads."""
    g = geom
    hp, wp = (g.ho - 1) * g.sh + (g.kh - 1) * g.dh + 1, (g.wo - 1) * g.sw + (g.kw - 1) * g.dw + 1
    pad_src = not (g.pt == 0 and g.pl == 0 and hp <= g.h and wp <= g.w)
    rows_apart, plane = (wp, hp * wp) if pad_src else (g.w, g.h * g.w)
    lane_use, across = direct_lane_use(g.ho, g.wo, g.sh, rows_apart)
    name = choose_route(g.cout, g.ho, g.wo, g.sw, lane_use, tuning, threads)
    vectors = phase_tap_off = None
    phase_hw = (0, 0)
    if name == "direct":
        vectors = K.direct_vectors(ho=g.ho, wo=g.wo, sh=g.sh, row_width=rows_apart, across=across)
    elif g.sh == g.sw > 1 and g.dh == g.dw == 1:
        # the phase route: the zero-padded input (hp x wp) split into s x s phase planes, read by
        # the direct route's tiles with stride 1, when those vectors are full enough for it
        s = g.sh
        hq, wq = -(-hp // s), -(-wp // s)
        lane_use, across = direct_lane_use(g.ho, g.wo, 1, wq)
        if choose_route(g.cout, g.ho, g.wo, 1, lane_use, tuning, threads) == "direct":
            ky, kx = np.arange(g.kh)[:, None], np.arange(g.kw)[None, :]
            planes = (np.arange(g.cin)[:, None, None] * s + ky % s) * s + kx % s  # cin x kh x kw
            name, phase_hw = "phase", (hq, wq)
            phase_tap_off = (planes * hq * wq + (ky // s) * wq + kx // s).reshape(-1).astype(np.int64)
            vectors = K.direct_vectors(ho=g.ho, wo=g.wo, sh=1, row_width=wq, across=across)
    runs, panel_first = K.im2col_run_table(ho=g.ho, wo=g.wo, sh=g.sh, sw=g.sw, row_width=rows_apart)
    taps = (np.arange(g.kh)[:, None] * g.dh * rows_apart + np.arange(g.kw)[None, :] * g.dw).reshape(-1)
    tap_off = (np.arange(g.cin)[:, None] * plane + taps[None, :]).reshape(-1).astype(np.int64)
    # kernels of 3x3 or larger whose input outweighs their weights: positions sooner (EngineTuning)
    input_larger = g.cin * hp * wp >= g.cout * g.cin * g.kk
    rows_below_tiles = (tuning.direct_rows_below_tiles_kxk if g.kk > 1 and input_larger
                        else tuning.direct_rows_below_tiles)
    return ConvRoute(name, pad_src, (hp, wp), rows_apart, tap_off, runs, panel_first, vectors, phase_hw,
                     phase_tap_off, rows_below_tiles=rows_below_tiles)


@dataclass(frozen=True)
class ConvKnobPlan:
    """A conv layer's knobs (the enabled ones) and what they precompute."""

    spet: KnobSetting | None
    sdss: KnobSetting | None
    sfma: KnobSetting | None
    order: list[np.ndarray]  # per group, the channel order of the knob path (SPET's, else natural)
    order_weights: list[np.ndarray]  # per group, the weight columns in that order
    order_tap_off: list[np.ndarray]  # per group, the unfolded rows' offsets in that order
    all_positions: np.ndarray  # every output position (positions computed without SDSS)
    grid: SdssGrid | None = None  # SDSS
    tap_class: np.ndarray | None = None  # SFMA: per output position its border class ...
    class_taps: np.ndarray | None = None  # ... and per class its valid kernel taps (kk mask)
    class_tap_count: int = 0  # valid taps summed over the border classes
    spet_bounds: list[SpetBound] | None = None  # SPET ``test: bound``: per group, the bound's static data
    channel_nonzeros: list[np.ndarray] | None = None  # a pruned layer: per group, spet.channel_nonzeros


def plan_knobs(layer: Layer, geom: ConvGeometry, route: ConvRoute, weights: list[np.ndarray],
               knobs: KnobConfig) -> ConvKnobPlan | None:
    """The knob plan of a conv layer, or None when no knob is on in it."""
    spet, sdss, sfma = (knobs.get(layer.name, k) for k in ("spet", "sdss", "sfma"))
    if spet is None and sdss is None and sfma is None:
        return None
    g = geom
    order, order_weights = [], []
    for group in range(g.groups):
        if spet is not None:
            wg = layer.weight[group * g.cout:(group + 1) * g.cout]
            order.append(spet_channel_order(wg))
            order_weights.append(aligned_copy(wg[:, order[-1]].reshape(g.cout, -1)))
        else:
            order.append(np.arange(g.cin, dtype=np.int32))
            order_weights.append(weights[group])
    order_tap_off = [np.ascontiguousarray(route.tap_off.reshape(g.cin, g.kk)[o].reshape(-1)) for o in order]
    grid = sdss_grid(g.ho, g.wo, int(sdss.option("sdss", "stride"))) if sdss is not None else None
    tap_class = class_taps = None
    class_tap_count = 0
    if sfma is not None:
        if sfma.option("sfma", "border") == "interior":
            class_taps, tap_class = np.ones((1, g.kk), np.float32), np.zeros(g.positions, np.int64)
        else:
            tap_class, class_taps = border_classes(g.ho, g.wo, g.kh, g.kw, (g.sh, g.sw, g.pt, g.pl, g.dh, g.dw),
                                                   g.h, g.w)
        class_tap_count = int(class_taps.sum())
    spet_bounds = None
    if spet is not None and spet.option("spet", "test") == "bound":
        spet_bounds = [spet_bound(order_weights[group], layer.bias[group * g.cout:(group + 1) * g.cout], g.kk,
                                  spet.threshold) for group in range(g.groups)]
    nonzeros = ([channel_nonzeros(layer.weight[group * g.cout:(group + 1) * g.cout]) for group in range(g.groups)]
                if layer.has_zero_weights else None)
    return ConvKnobPlan(spet, sdss, sfma, order, order_weights, order_tap_off,
                        np.arange(g.positions, dtype=np.int32), grid, tap_class, class_taps, class_tap_count,
                        spet_bounds, nonzeros)


@dataclass
class ConvPlan:
    """Everything the engine precomputes for one conv layer."""

    layer: Layer
    geom: ConvGeometry
    weights: list[np.ndarray]  # per group, (cout, cin*kh*kw), natural channel order
    channels: list[np.ndarray]  # per group, the absolute input channel indices
    route: ConvRoute
    knobs: ConvKnobPlan | None  # None: the layer runs its knob-free route
    cols: np.ndarray  # the unfold route's unfolded input (a view of the engine's scratch)
    weight_blocks: list[np.ndarray] | None = None  # ocvec route: per group, the weights as cout/64 x K x 64
    ocvec_partial: np.ndarray | None = None  # ocvec route: each thread's running sums (K.ocvec_partial_floats)

    @property
    def source_floats(self) -> int:
        return self.route.source_floats(self.geom)


def ocvec_route(route: ConvRoute, geom: ConvGeometry, tuning: EngineTuning, threads: int = 1) -> ConvRoute | None:
    """The channel-vector route (vectors over output channels, one broadcast input per
    position: K.conv_ocvec) in place of ``route``, for a knob-free layer that qualifies
    (EngineTuning), else None: stride 1, 3x3 or larger with output channels a multiple of
    ``ocvec_channel_multiple`` (``ocvec_route``); 1x1 on an unfolding route, any number of
    output channels, the last block padded (``ocvec_pointwise``); 1x1 on the direct route with
    output channels a multiple of 16 (``ocvec_pointwise_direct``); strided, 3x3 or larger, in
    an engine of at most ``ocvec_strided_threads`` (each position's tap (0, 0) stride rows and
    columns apart)."""
    g = geom
    pointwise = g.kk == 1 and (
        (tuning.ocvec_pointwise and route.name in ("panel", "unfold"))
        or (tuning.ocvec_pointwise_direct and route.name == "direct" and g.cout % 16 == 0))
    strided_ok = (g.sh == g.sw == 1) or (g.kk > 1 and max(threads, 1) <= tuning.ocvec_strided_threads)
    if not (tuning.ocvec_route and strided_ok
            and ((g.kk > 1 and g.cout % tuning.ocvec_channel_multiple == 0) or pointwise)):
        return None
    oy, ox = np.divmod(np.arange(g.positions), g.wo)
    pos_off = (oy * g.sh * route.src_row_width + ox * g.sw).astype(np.int32)
    return dataclasses.replace(route, name="ocvec", pos_off=pos_off)


def ocvec_weight_blocks(weights: np.ndarray) -> np.ndarray:
    """One group's weights (cout x K) as the channel-vector route reads them: ceil(cout / 64)
    blocks of K x 64 (block b, row k: tap k's weights of output channels 64 b..64 b+63), zeros
    past the last channel, 64-byte aligned."""
    cout, k = weights.shape
    padded = np.zeros((-(-cout // 64) * 64, k), np.float32)
    padded[:cout] = weights
    return aligned_copy(padded.reshape(-1, 64, k).transpose(0, 2, 1))


def plan_conv(layer: Layer, knobs: KnobConfig, tuning: EngineTuning, threads: int = 1) -> ConvPlan:
    """Static data of a conv layer for an engine of ``threads``."""
    geom = ConvGeometry.of(layer)
    g = geom
    weights = [aligned_copy(layer.weight[i * g.cout:(i + 1) * g.cout].reshape(g.cout, -1)) for i in range(g.groups)]
    channels = [np.arange(i * g.cin, (i + 1) * g.cin, dtype=np.int32) for i in range(g.groups)]
    route = plan_route(geom, tuning, threads)
    knob_plan = plan_knobs(layer, geom, route, weights, knobs)
    weight_blocks = partial = None
    if knob_plan is None and (ocvec := ocvec_route(route, geom, tuning, threads)) is not None:
        route = ocvec
        weight_blocks = [ocvec_weight_blocks(w) for w in weights]
        partial = aligned_zeros((max(threads, 1), K.ocvec_partial_floats()))
    return ConvPlan(layer, geom, weights, channels, route, knob_plan,
                    packed_cols(g.cin * g.kk, g.positions, allocate=False), weight_blocks, partial)

