"""The knob path of a conv layer, one group at a time, in the specification's order: SFMA drops
near-uniform input maps (their contribution becomes mean x kernel sum), SDSS computes the output
on a coarse grid and interpolates insignificant cells, SPET stops the neurons whose partial sum
over the leading input channels predicts a negative result. The knobs' kernels share one count.
A layer whose only knob is SFMA takes its own route instead (sfma_alone.py).
"""
from __future__ import annotations

import numpy as np

from .. import _kernels as K
from .conv_plan import ConvPlan
from .counting import new_counts, sfma_saved_ops
from .memory import Scratch
from .sdss import sdss_rest
from .sfma import sfma_constant, sfma_select
from .sfma_alone import is_sfma_alone, sfma_alone
from .spet import conv_neurons, lead_rest_nonzeros, spet_lead, spet_test_margins


def conv_group_with_knobs(cp: ConvPlan, scratch: Scratch, x: np.ndarray, out_g: np.ndarray, group: int,
                          threads: int) -> tuple[dict[str, int], bool]:
    """One group of a conv layer with its knobs into ``out_g``; returns its counts and whether
    its output stands: a knob skipped work, or (SFMA alone, nothing dropped) the output already
    is the knob-free result. Else the caller reruns the layer on its knob-free path."""
    geom, knobs = cp.geom, cp.knobs
    if is_sfma_alone(cp):
        return sfma_alone(cp, scratch, x, out_g, group, threads), True
    cin, cout = geom.cin, geom.cout
    xg = x[group * cin:(group + 1) * cin]
    bias = cp.layer.bias[group * cout:(group + 1) * cout]
    count = new_counts()
    count["images"] = int(group == 0)
    order, wmat = knobs.order[group], knobs.order_weights[group]  # SPET's order, else natural

    # ---- SFMA: drop near-uniform input maps (their contribution becomes a constant map)
    constant = None
    kept = order
    if knobs.sfma is not None:
        dropped, means = sfma_select(cp, xg, threads, count)
        if dropped.any():
            kept = order[~dropped[order]]
            drop = np.flatnonzero(dropped).astype(np.int32)
            constant = sfma_constant(cp, group, drop, means[drop], scratch.constant, count)
            count["dropped_maps"] += len(drop)
            count["saved_sfma"] += sfma_saved_ops(cout, geom.positions, geom.kk, len(drop))
    channel_nonzeros = knobs.channel_nonzeros[group] if knobs.channel_nonzeros else None
    lead_channels = len(kept)
    margins = None
    if knobs.spet is not None:
        lead_channels = spet_lead(knobs.spet.option("spet", "fraction"), len(kept))
        # the bound covers order[lead_channels:], a superset of the kept channels left after the
        # lead when SFMA dropped some (each kept channel sits at least as far in the order)
        margins = spet_test_margins(knobs.spet, knobs.spet_bounds[group] if knobs.spet_bounds else None, cout,
                                    lead_channels, xg, order, cp.layer.input_nonneg, count)
    lead = lead_channels * geom.kk
    nonzeros = lead_rest_nonzeros(channel_nonzeros, kept, lead_channels) if channel_nonzeros is not None else None

    # ---- the positions computed first (the SDSS grid, or all), with SPET inside
    src, tap_off, wmat = knob_source(cp, scratch, x, group, kept, wmat)
    positions = knobs.grid.grid_positions if knobs.sdss is not None else knobs.all_positions
    conv_neurons(cp, src, tap_off, wmat, lead, margins, bias, constant, positions, None, out_g, scratch.panels,
                 threads, count, nonzeros)
    if knobs.sdss is not None:
        # ---- SDSS: interpolate insignificant cells, compute the rest of the map
        sdss_rest(cp, out_g, src, tap_off, wmat, lead, margins, bias, constant, scratch.panels, threads, count,
                  nonzeros)

    count["ops"] += count["overhead_sfma"] + count["overhead_sdss"] + count["overhead_spet"]
    return count, bool(count["dropped_maps"] or count["filled"] or count["terminated"])


def knob_source(cp: ConvPlan, scratch: Scratch, x: np.ndarray, group: int, kept: np.ndarray,
                wmat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The group's input planes as the unfolding reads them (zero-padded copies when the layer
    pads), the offset of every unfolded row of the kept channels and their weight columns
    (``wmat``'s columns are in the knob order; ``kept`` lists the kept channels in that order)."""
    geom, route = cp.geom, cp.route
    if route.pad_src:
        src = scratch.source
        K.pad_planes(x=x, channel0=group * geom.cin, nch=geom.cin, pt=geom.pt, pl=geom.pl, Hp=route.src_hw[0],
                     Wp=route.src_hw[1], dst=src)
    else:
        src = x[group * geom.cin:(group + 1) * geom.cin].reshape(-1)
    if len(kept) == geom.cin:  # nothing dropped: the order's own columns and offsets
        return src, cp.knobs.order_tap_off[group], wmat
    n = len(kept) * geom.kk
    tap_off = np.empty(n, np.int64)
    w_kept = scratch.kept_weights[:geom.cout * n].reshape(geom.cout, n)
    K.gather_channels(W=cp.weights[group], channels=kept, kk=geom.kk, tap_off=cp.route.tap_off, w_out=w_kept,
                      tap_out=tap_off)
    return src, tap_off, w_kept
