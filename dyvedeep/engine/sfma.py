"""SFMA (significance of feature maps): an input map whose spread is below the threshold is
taken as its mean; its contribution becomes that mean times each output channel's kernel,
summed over each output position's valid taps (its border class).

Here: the statistic, the border classes and the knob path's two SFMA steps (SFMA alone in a
layer: sfma_alone.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import _kernels as K
from .counting import sfma_constant_ops, sfma_select_ops

if TYPE_CHECKING:
    from .conv_plan import ConvPlan


def sfma_spread(xg: np.ndarray, nonneg: bool, statistic: str, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """SFMA's statistic of each input map of ``xg`` (C, H, W), and each map's mean: the standard
    deviation, relative to the maps' mean |x| for ``relative_std`` (``nonneg``: x >= 0 known)."""
    spread, means = np.empty(xg.shape[0]), np.empty(xg.shape[0])
    K.channel_spread(x=xg, nonneg=nonneg, relative=statistic == "relative_std", spread=spread, means=means,
                     threads=threads)
    return spread, means


def border_classes(ho: int, wo: int, kh: int, kw: int, geometry: tuple[int, ...], h: int,
                   w: int) -> tuple[np.ndarray, np.ndarray]:
    """For SFMA's exact border: each output position's class of valid kernel taps, and each
    class's taps (a kh*kw mask); ``geometry`` is (sh, sw, pt, pl, dh, dw), the input h x w."""
    sh, sw, pt, pl, dh, dw = geometry
    ys = np.arange(ho)[:, None] * sh - pt + np.arange(kh)[None, :] * dh
    xs = np.arange(wo)[:, None] * sw - pl + np.arange(kw)[None, :] * dw
    vy = (ys >= 0) & (ys < h)
    vx = (xs >= 0) & (xs < w)
    taps = (vy[:, None, :, None] & vx[None, :, None, :]).reshape(ho * wo, kh * kw)
    classes, inverse = np.unique(taps, axis=0, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64), classes.astype(np.float32)


def sfma_select(cp: "ConvPlan", xg: np.ndarray, threads: int, count: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Which input maps of the group are near-uniform, and every map's mean."""
    setting = cp.knobs.sfma
    nonneg = cp.layer.input_nonneg
    statistic = setting.option("sfma", "statistic")
    spread, means = sfma_spread(xg, nonneg, statistic, threads)
    count["overhead_sfma"] += sfma_select_ops(cp.geom.cin, xg.shape[1] * xg.shape[2], nonneg,
                                              statistic == "relative_std")
    return spread < setting.threshold, means.astype(np.float32)


def sfma_constant(cp: "ConvPlan", group: int, drop: np.ndarray, means: np.ndarray, out: np.ndarray,
                  count: dict[str, int]) -> np.ndarray | None:
    """Contribution (cout x positions, into the scratch ``out``) of the dropped maps, each taken
    as its mean: per output channel, the mean-weighted kernel restricted to each position's
    valid taps. None when every mean is 0 (dead maps after a ReLU): it adds nothing, though the
    op model counts it as made."""
    geom, knobs = cp.geom, cp.knobs
    count["overhead_sfma"] += sfma_constant_ops(geom.cout, len(drop), geom.kk, knobs.class_tap_count, geom.positions)
    if not means.any():
        return None
    out = out[:geom.cout * geom.positions].reshape(geom.cout, geom.positions)
    K.sfma_constant(W=cp.weights[group], dropped=drop, means=means, kk=geom.kk, class_taps=knobs.class_taps,
                    tap_class=knobs.tap_class, out=out)
    return out

