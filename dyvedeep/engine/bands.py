"""Conv+pool bands: a conv layer (direct, phase or channel-vector route, no knobs) and the
max-pooling that alone reads it, run band by band of output rows, so that each band of the conv
output is pooled while it is still in L2. The same floats as the two layers one after the other
(the rows a band shares with the next, kh - stride of the pooling, are computed twice)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _kernels as K
from ..plan import Op, Plan
from .conv_plan import ConvPlan, direct_lane_use
from .tuning import EngineTuning


@dataclass(frozen=True)
class PoolBand:
    """One band: conv output rows y0..y0+rows-1 (computed into the band scratch: from source
    offset src_offset with ``vectors`` on the direct and phase routes, at positions ``pos_off``
    on the channel-vector route), pooled into output rows p0..p1-1 (the pooling's top padding
    as seen from the band: pad_top)."""

    y0: int
    rows: int
    p0: int
    p1: int
    pad_top: int
    src_offset: int
    vectors: np.ndarray | None
    pos_off: np.ndarray | None = None


@dataclass(frozen=True)
class ConvPoolBands:
    """The band plan of conv layer ``conv`` and the max-pooling after it (layer ``conv + 1``)."""

    conv: int
    bands: list[PoolBand]
    band_floats: int
    conv_rows_first: bool = False  # the conv's threads share out its weight rows (EngineTuning)


def plan_conv_pool_bands(plan: Plan, index: int, cp: ConvPlan, readers: dict[str, list[int]],
                         tuning: EngineTuning) -> ConvPoolBands | None:
    """The band plan of conv layer ``index`` with the max-pooling after it, or None when the
    pair does not qualify (see EngineTuning.conv_pool_bands and conv_pool_min_bytes)."""
    layer, geom, route = cp.layer, cp.geom, cp.route
    if (not tuning.conv_pool_bands or index + 1 >= len(plan.layers) or geom.groups != 1
            or route.name not in ("direct", "phase", "ocvec") or cp.knobs is not None):
        return None
    pool = plan.layers[index + 1]
    if (pool.op != Op.MAXPOOL or pool.inputs != [layer.output] or readers.get(layer.output) != [index + 1]
            or layer.output == plan.output_name or 4 * geom.cout * geom.positions < tuning.conv_pool_min_bytes):
        return None
    kh = pool.attrs["kernel"][0]
    stride, pad_top = pool.attrs["stride"][0], pool.attrs["pads"][0]
    pool_rows = pool.out_shape[1]
    conv_sh = 1 if route.name == "phase" else geom.sh  # source rows per output row
    row_width = route.phase_hw[1] if route.name == "phase" else route.src_row_width
    max_rows = max(kh, tuning.conv_pool_band_bytes // (4 * geom.cout * geom.wo))
    per_band = max(1, (max_rows - kh) // stride + 1)  # pooled rows per band
    bands = []
    for p0 in range(0, pool_rows, per_band):
        p1 = min(pool_rows, p0 + per_band)
        y0 = max(0, p0 * stride - pad_top)
        y1 = min(geom.ho, (p1 - 1) * stride - pad_top + kh)
        vectors = pos_off = None
        if route.name == "ocvec":
            pos_off = route.pos_off[y0 * geom.wo:y1 * geom.wo]
        else:
            _, across = direct_lane_use(y1 - y0, geom.wo, conv_sh, row_width)
            vectors = K.direct_vectors(ho=y1 - y0, wo=geom.wo, sh=conv_sh, row_width=row_width, across=across)
        bands.append(PoolBand(y0, y1 - y0, p0, p1, y0 - (p0 * stride - pad_top), y0 * conv_sh * row_width, vectors,
                              pos_off))
    return ConvPoolBands(index, bands, max(geom.cout * b.rows * geom.wo for b in bands), tuning.conv_pool_rows_first)
