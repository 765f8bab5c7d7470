"""SFMA alone in a conv layer (no SPET, no SDSS): the layer's own dense route over the maps SFMA
keeps, then the dropped maps' constant, so that skipped maps are skipped time. Run from Python
(:func:`sfma_alone`, the knob path) or as steps of a compiled run (:func:`sfma_alone_steps`:
the same kernels, decisions and floats, no Python per image), both counted by
:func:`sfma_alone_counts`.
"""
from __future__ import annotations

import numpy as np

from .. import _kernels as K
from . import plain
from .conv_plan import ConvPlan
from .counting import neuron_costs, new_counts, sfma_constant_ops, sfma_saved_ops, sfma_select_ops, tally
from .memory import Scratch
from .sfma import sfma_constant, sfma_select


def is_sfma_alone(cp: ConvPlan) -> bool:
    """Whether SFMA is the layer's only knob."""
    knobs = cp.knobs
    return knobs is not None and knobs.sfma is not None and knobs.spet is None and knobs.sdss is None


def sfma_alone_counts(cp: ConvPlan, dropped: int, kept_nonzeros: int | None) -> dict[str, int]:
    """One image's counts of a group with SFMA alone that dropped ``dropped`` maps: the statistic,
    the constant (when a map was dropped), the kept maps' neurons, all of them run (executed =
    counted); ``kept_nonzeros`` (a pruned layer): the kept maps' non-zero weights, giving the
    MACs on non-zero weights."""
    geom, relu = cp.geom, cp.layer.relu
    count = new_counts()
    count["images"] = 1
    count["overhead_sfma"] = sfma_select_ops(geom.cin, geom.h * geom.w, cp.layer.input_nonneg,
                                             cp.knobs.sfma.option("sfma", "statistic") == "relative_std")
    if dropped:
        count["overhead_sfma"] += sfma_constant_ops(geom.cout, dropped, geom.kk, cp.knobs.class_tap_count,
                                                    geom.positions)
        count["dropped_maps"] = dropped
        count["saved_sfma"] = sfma_saved_ops(geom.cout, geom.positions, geom.kk, dropped)
    costs = neuron_costs(geom.cout * geom.positions, (geom.cin - dropped) * geom.kk, relu)
    costs["executed_macs"] = costs["macs"]
    costs["nonzero_macs"] = geom.positions * kept_nonzeros if kept_nonzeros is not None else costs["macs"]
    costs["ops"] += count["overhead_sfma"]
    tally(count, costs)
    return count


def sfma_alone(cp: ConvPlan, scratch: Scratch, x: np.ndarray, out_g: np.ndarray, group: int,
               threads: int) -> dict[str, int]:
    """Group ``group`` with SFMA alone into ``out_g``: the layer's own dense route over the kept
    maps (the knob-free route itself when none is dropped: its floats), then the dropped maps'
    constant (if any) added before the ReLU. Returns its counts (:func:`sfma_alone_counts`)."""
    geom, relu = cp.geom, cp.layer.relu
    xg = x[group * geom.cin:(group + 1) * geom.cin]
    dropped, means = sfma_select(cp, xg, threads, new_counts())
    drop = np.flatnonzero(dropped).astype(np.int32)
    kept = np.flatnonzero(~dropped).astype(np.int32)
    per_channel = cp.knobs.channel_nonzeros[group].sum(axis=0) if cp.knobs.channel_nonzeros else None
    if not len(drop):
        plain.conv_group(cp, scratch, x, group, out_g, relu, threads)
    else:
        constant = sfma_constant(cp, group, drop, means[drop], scratch.constant, new_counts())
        if len(kept):
            tables = plain.kept_channels(cp, scratch, group, kept)
            plain.conv_group(cp, scratch, x, group, out_g, relu and constant is None, threads, kept=tables)
        else:  # every map dropped: the bias alone
            out_g[:] = cp.layer.bias[group * geom.cout:(group + 1) * geom.cout, None]
        if constant is not None or (relu and not len(kept)):
            K.add_relu(x=out_g.reshape(-1), b=None if constant is None else constant.reshape(-1),
                       out=out_g.reshape(-1), relu=relu, threads=threads)
    count = sfma_alone_counts(cp, len(drop), int(per_channel[kept].sum()) if per_channel is not None else None)
    count["images"] = int(group == 0)
    return count


def sfma_alone_compilable(cp: ConvPlan) -> bool:
    """Whether a layer with SFMA alone joins a compiled run: one group, on the direct, phase or
    panel route (their conv steps run the kept maps, dv_sfma_product)."""
    return is_sfma_alone(cp) and cp.geom.groups == 1 and cp.route.name in ("direct", "phase", "panel")


def sfma_alone_steps(cp: ConvPlan, scratch: Scratch, x: np.ndarray, out: np.ndarray, threads: int,
                     program: K.Program) -> K.SfmaLayer:
    """Append a layer's SFMA-alone steps to ``program``: the statistic and the choice of maps, the
    route's steps over the kept maps, the constant; returns the layer's K.SfmaLayer, whose
    totals :func:`sfma_alone_totals` turns into counts."""
    geom, knobs, route = cp.geom, cp.knobs, cp.route
    per_channel = knobs.channel_nonzeros[0].sum(axis=0) if knobs.channel_nonzeros else None
    state = K.SfmaLayer(W=cp.weights[0], tap_off=route.phase_tap_off if route.name == "phase" else route.tap_off,
                        bias=cp.layer.bias, relu=cp.layer.relu, kk=geom.kk, hw=geom.h * geom.w,
                        nonneg=cp.layer.input_nonneg,
                        relative=knobs.sfma.option("sfma", "statistic") == "relative_std",
                        threshold=knobs.sfma.threshold, class_taps=knobs.class_taps, tap_class=knobs.tap_class,
                        channel_nnz=per_channel, threads=threads)
    state.select_steps(x=x[:geom.cin], threads=threads, program=program)
    plain.conv_group(cp, scratch, x, 0, out, cp.layer.relu, threads, program, sfma=state)
    state.constant_step(out=out, threads=threads, program=program)
    return state


def sfma_alone_totals(cp: ConvPlan, state: K.SfmaLayer) -> dict[str, int]:
    """The counts of the images a compiled layer ran since the last call (:func:`sfma_alone_counts`
    per image, from the layer's totals of images by maps dropped)."""
    by_drops, kept_nonzeros = state.take_counts()
    pruned = cp.knobs.channel_nonzeros is not None
    total = new_counts()
    for dropped in np.flatnonzero(by_drops):
        count = sfma_alone_counts(cp, int(dropped), 0 if pruned else None)
        tally(total, {key: value * int(by_drops[dropped]) for key, value in count.items()})
    if pruned:
        total["nonzero_macs"] += cp.geom.positions * kept_nonzeros
    return total
