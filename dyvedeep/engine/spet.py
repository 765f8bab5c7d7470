"""SPET (speculative early termination): a neuron whose partial sum over its leading inputs
(by decreasing weight L1 norm) is below -threshold stops there, its output taken as 0 (ReLU).
Option ``test: bound`` (beyond the reconstruction, docs/knobs.md) compares the partial sum with
-threshold x an upper bound of what the rest can add instead: exact at threshold 1.

Here: the input order, the lead, each neuron's margin, the conv neurons of the knob path (SPET
inside when on; the other knobs compute their neurons through :func:`conv_neurons` too) and the
fully-connected layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import _kernels as K
from ..knobs import KnobConfig, KnobSetting
from ..plan import Layer
from .counting import (fallback_costs, fc_spet_costs, neuron_costs, spet_bound_channel_ops, spet_bound_shared_ops,
                       spet_neuron_costs, tally)

if TYPE_CHECKING:
    from .conv_plan import ConvPlan

U8 = np.uint8


def spet_channel_order(w: np.ndarray) -> np.ndarray:
    """Input channels by decreasing L1 norm of their kernel slices over all outputs (shared order)."""
    norms = np.abs(w).sum(axis=(0, 2, 3))
    return np.argsort(-norms, kind="stable").astype(np.int32)


def fc_input_order(w: np.ndarray) -> np.ndarray:
    """A fully-connected layer's inputs by decreasing L1 norm of their weight columns."""
    return np.argsort(-np.abs(w).sum(axis=0), kind="stable")


def spet_lead(fraction: float, n: int) -> int:
    """Leading inputs (channels, or fully-connected inputs) of ``n``: ceil(fraction n), at least
    1 (none of none)."""
    return min(n, max(1, math.ceil(fraction * n))) if n else 0


ROUNDING_ALLOWANCE = 3 * 2.0 ** -24
"""Per input of a neuron, times its largest possible |sum| of terms: what ``test: bound`` adds to
the bound of the rest so that float rounding (of the partial, of the dense path's full sum in any
order, of the margin itself) cannot make an exact stop wrong: a sum of n float32 terms is off by
at most n 2^-24 / (1 - n 2^-24) of the sum of their magnitudes."""


@dataclass(frozen=True)
class SpetBound:
    """``test: bound``'s static data of one group (conv) or layer (fully connected), the knob's
    threshold t folded in. The rest of output o (the inputs from position s of SPET's order on)
    adds at most sum_k max(w[o, k], 0) xhi_k + min(w[o, k], 0) xlo_k, where [xlo_k, xhi_k] holds
    input k and 0 (zero padding): per input channel its own range for conv (``pos`` and ``neg``,
    the positive and negative weight sums per output and channel), one range for all inputs for
    fully connected (``pos_rest``, ``neg_rest``: suffix sums, the allowance folded in). Output
    o's margin is t x (that bound + ROUNDING_ALLOWANCE x (fan-in + 6) x (|bias[o]| + |w[o]|_1 x
    (max xhi - min xlo))): ``spread[o]`` times the range plus ``const[o]``."""

    pos: np.ndarray | None  # conv: outputs x channels (float64)
    neg: np.ndarray | None
    pos_rest: np.ndarray | None  # fully connected: (inputs + 1) x outputs
    neg_rest: np.ndarray | None
    spread: np.ndarray  # outputs
    const: np.ndarray  # outputs
    never: bool  # t = .inf: margins are +inf (the test never fires)


def spet_bound(w_ordered: np.ndarray, bias: np.ndarray, per_input: int, threshold: float) -> SpetBound:
    """The bound's static data of the weights ``w_ordered`` (outputs x inputs x ``per_input``
    columns, the inputs in SPET's order): conv input channels of kk taps (each with its own
    range), or fully-connected inputs (``per_input`` 0: one range for all, suffix sums)."""
    shared = per_input == 0
    w = np.asarray(w_ordered, np.float64).reshape(w_ordered.shape[0], -1, max(per_input, 1))
    never = math.isinf(threshold)
    t = 0.0 if never else threshold
    pos = t * np.maximum(w, 0).sum(axis=2)  # outputs x inputs
    neg = t * np.minimum(w, 0).sum(axis=2)
    allowance = ROUNDING_ALLOWANCE * (w.shape[1] * w.shape[2] + 6)
    spread = t * allowance * np.abs(w).sum(axis=(1, 2))
    const = t * allowance * np.abs(np.asarray(bias, np.float64))
    if not shared:
        return SpetBound(pos, neg, None, None, spread, const, never)
    zero = np.zeros((1, w.shape[0]))
    pos_rest = np.concatenate([np.cumsum(pos.T[::-1], axis=0)[::-1], zero]) + spread
    neg_rest = np.concatenate([np.cumsum(neg.T[::-1], axis=0)[::-1], zero]) - spread
    return SpetBound(None, None, pos_rest, neg_rest, np.zeros_like(spread), const, never)


def input_ranges(x: np.ndarray, nonneg: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per input channel of ``x`` (channels x ...) [xlo, xhi] holding the channel and 0 (zero
    padding); after a ReLU (``nonneg``) xlo = 0 without a look."""
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] == 0:
        return np.zeros(x.shape[0]), np.zeros(x.shape[0])
    xhi = np.maximum(flat.max(axis=1), 0).astype(np.float64)
    xlo = np.zeros(x.shape[0]) if nonneg else np.minimum(flat.min(axis=1), 0).astype(np.float64)
    return xlo, xhi


def spet_test_margins(setting: KnobSetting, bound: SpetBound | None, outputs: int, rest_from: int,
                      x: np.ndarray, order: np.ndarray | None, nonneg: bool, count: dict[str, int]) -> np.ndarray:
    """Each output's SPET margin (float32): the threshold (``test: margin``) or, for
    ``test: bound``, t x the bound of the inputs from position ``rest_from`` of SPET's ``order``
    on, for the input ``x`` (conv: channels x H x W; fully connected: flat, ``order`` unused);
    its ops are counted as SPET overhead."""
    if bound is None:
        return np.full(outputs, setting.threshold, np.float32)
    if bound.pos is None:  # fully connected: one range
        count["overhead_spet"] += spet_bound_shared_ops(x.size, outputs, nonneg)
        if bound.never:
            return np.full(outputs, np.inf, np.float32)
        xlo, xhi = input_ranges(x.reshape(1, -1), nonneg)
        margins = bound.pos_rest[rest_from] * xhi[0] + bound.neg_rest[rest_from] * xlo[0] + bound.const
        return margins.astype(np.float32)
    channels = x.shape[0]
    count["overhead_spet"] += spet_bound_channel_ops(channels, x[0].size, outputs, channels - rest_from, nonneg)
    if bound.never:
        return np.full(outputs, np.inf, np.float32)
    xlo, xhi = input_ranges(x, nonneg)
    rest = order[rest_from:]
    margins = bound.pos[:, rest_from:] @ xhi[rest] + bound.spread * (xhi.max() - xlo.min()) + bound.const
    if not nonneg:
        margins += bound.neg[:, rest_from:] @ xlo[rest]
    return margins.astype(np.float32)


def row_nonzeros(wmat: np.ndarray, lead: int) -> np.ndarray:
    """Per row of ``wmat`` (output x inputs), its non-zero weights among the first ``lead``
    columns and among the rest (outputs x 2: SPET's lead and rest; without SPET, lead = all)."""
    nonzero = wmat != 0
    return np.stack([nonzero[:, :lead].sum(axis=1), nonzero[:, lead:].sum(axis=1)], axis=1)


def nonzero_neuron_macs(nonzeros: np.ndarray, rows: np.ndarray) -> int:
    """The MACs on non-zero weights of neurons computed, per output o ``rows[o, 0]`` over the lead
    and ``rows[o, 1]`` of them over the rest too, given :func:`row_nonzeros` (``nonzeros``)."""
    return int((rows * nonzeros).sum())


def channel_nonzeros(w: np.ndarray) -> np.ndarray:
    """A pruned conv group's non-zero weights per output and input channel (cout x cin), from
    its weights (cout x cin x kh x kw)."""
    return np.count_nonzero(w.reshape(w.shape[0], w.shape[1], -1), axis=2).astype(np.int64)


def lead_rest_nonzeros(per_channel: np.ndarray, kept: np.ndarray, lead_channels: int) -> np.ndarray:
    """Per output, its non-zero weights over the first ``lead_channels`` of the input channels
    ``kept`` (in the knob order) and over the rest of them (outputs x 2, as :func:`row_nonzeros`),
    from :func:`channel_nonzeros`."""
    return np.stack([per_channel[:, kept[:lead_channels]].sum(axis=1),
                     per_channel[:, kept[lead_channels:]].sum(axis=1)], axis=1)


def conv_neurons(cp: "ConvPlan", src: np.ndarray, tap_off: np.ndarray, wmat: np.ndarray, lead: int,
                 margins: np.ndarray | None, bias: np.ndarray, constant: np.ndarray | None, positions: np.ndarray,
                 mask: np.ndarray | None, out_g: np.ndarray, panels: np.ndarray, threads: int,
                 count: dict[str, int], nonzeros: np.ndarray | None = None) -> None:
    """The outputs at ``positions`` (where ``mask``, if given) of one group, SPET inside when on
    (``margins``: each output's, from :func:`spet_test_margins`), written to ``out_g`` (ReLU'd
    when the layer has one); counts their MACs and ops, and the MACs the kernel ran. A pruned
    layer gives ``nonzeros`` (:func:`lead_rest_nonzeros` of ``wmat``'s columns, ``lead`` split):
    then the MACs on non-zero weights are counted too."""
    g, relu = cp.geom, cp.layer.relu
    spet = cp.knobs.spet
    executed = np.zeros(1, np.int64)
    rows = np.zeros((g.cout, 2), np.int64) if nonzeros is not None else None
    terminated, n_active = K.knob_conv(
        src=src, tap_off=tap_off, positions=positions, wo=g.wo, sh=g.sh, sw=g.sw,
        row_width=cp.route.src_row_width, W=wmat, lead=lead, spet=spet is not None,
        margins=margins if margins is not None else np.zeros(g.cout, np.float32), relu=relu, bias=bias,
        cst=constant, mask=mask, out=out_g, panels=panels, threads=threads, executed=executed, row_counts=rows)
    count["executed_macs"] += int(executed[0])
    kdim = wmat.shape[1]
    costs = (neuron_costs(n_active, kdim, relu) if spet is None
             else spet_neuron_costs(n_active, terminated, kdim, lead, relu))
    costs["nonzero_macs"] = nonzero_neuron_macs(nonzeros, rows) if nonzeros is not None else costs["macs"]
    tally(count, costs)


@dataclass(frozen=True)
class FcPlan:
    """A fully-connected layer's SPET plan: its input order, weight columns in that order, for
    ``test: bound`` the bound's static data and, when some weights are 0 (a pruned layer), each
    output's non-zero weights in SPET's lead and rest (:func:`row_nonzeros`)."""

    layer: Layer
    spet: KnobSetting | None
    order: np.ndarray | None = None
    weight_perm: np.ndarray | None = None
    bound: SpetBound | None = None
    nonzeros: np.ndarray | None = None


def plan_fc(layer: Layer, knobs: KnobConfig) -> FcPlan:
    """Static data of a fully-connected layer for the engine."""
    spet = knobs.get(layer.name, "spet")
    if spet is None:
        return FcPlan(layer, None)
    order = fc_input_order(layer.weight).astype(np.int32)
    weight_perm = np.ascontiguousarray(layer.weight[:, order])
    bound = (spet_bound(weight_perm, layer.bias, 0, spet.threshold)
             if spet.option("spet", "test") == "bound" else None)
    # a per-image count would cost as much as the layer's own MACs: once here
    nonzeros = (row_nonzeros(weight_perm, spet_lead(spet.option("spet", "fraction"), weight_perm.shape[1]))
                if layer.has_zero_weights else None)
    return FcPlan(layer, spet, order, weight_perm, bound, nonzeros)


def fc_spet(fp: FcPlan, x: np.ndarray, out: np.ndarray, threads: int) -> dict[str, int]:
    """A fully-connected layer under SPET on the flat input ``x`` into ``out``; returns its counts.
    When no neuron stopped, ``out`` is recomputed on the knob-free kernel (bit for bit the
    knob-free result; a fallback)."""
    layer = fp.layer
    w = layer.weight
    o, kin = w.shape
    lead = spet_lead(fp.spet.option("spet", "fraction"), kin)
    xp = np.ascontiguousarray(x[fp.order])
    out[:] = layer.bias
    K.gemm(A=fp.weight_perm[:, :lead], B=xp[:lead, None], C=out[:, None], beta=1.0)
    cont = np.empty((1, o), U8)
    overhead: dict[str, int] = {"overhead_spet": 0}
    margins = spet_test_margins(fp.spet, fp.bound, o, lead, x, None, layer.input_nonneg, overhead)
    terminated = K.spet_decide(partial=out[None, :], margins=margins, active=np.ones((1, o), U8), cont=cont)
    K.gemv_rows(W=fp.weight_perm, x=xp, out=out, k0=lead, k1=kin, mask=cont[0], threads=threads)
    K.finish_act(out=out[None, :], active=np.ones((1, o), U8), cont=cont, relu=True)
    counts = fc_spet_costs(o, kin, lead, terminated)
    if fp.nonzeros is not None:  # pruned: the MACs on non-zero weights
        counts["nonzero_macs"] = nonzero_neuron_macs(fp.nonzeros, np.stack([np.ones(o, np.int64),
                                                                            cont[0].astype(np.int64)], 1))
    tally(counts, {"ops": overhead["overhead_spet"], "overhead_spet": overhead["overhead_spet"]})
    counts["fallbacks"] = 0
    if terminated == 0:
        K.gemv_bias(W=w, x=x, bias=layer.bias, out=out, relu=layer.relu, threads=threads)
        tally(counts, fallback_costs(layer.dense_macs))
    return counts
