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
from .counting import fc_spet_costs, neuron_costs, spet_bound_ops, spet_neuron_costs, tally

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
    threshold t folded in: output o's margin for an input within [xlo, xhi] (xlo <= 0 <= xhi),
    with the inputs from position s of SPET's order left, is
    hi[s, o] xhi + lo[s, o] xlo + const[o], i.e. t x (the rest's largest possible sum
    sum_k max(w, 0) xhi + min(w, 0) xlo, plus the rounding allowance)."""

    hi: np.ndarray  # (inputs + 1) x outputs, float64
    lo: np.ndarray
    const: np.ndarray  # outputs
    never: bool  # t = .inf: margins are +inf (the test never fires)


def spet_bound(w_ordered: np.ndarray, bias: np.ndarray, per_input: int, threshold: float) -> SpetBound:
    """The bound's static data of the weights ``w_ordered`` (outputs x inputs x ``per_input``
    columns, the inputs in SPET's order: conv input channels of kk taps, or fully-connected
    inputs with ``per_input`` 1): suffix sums of the positive and negative weights over the
    inputs, and the rounding allowance (ROUNDING_ALLOWANCE x (fan-in + 6) x (|bias| + |w|_1
    x max(xhi, -xlo)), the last factor taken as xhi - xlo)."""
    w = np.asarray(w_ordered, np.float64).reshape(w_ordered.shape[0], -1, per_input)
    pos = np.maximum(w, 0).sum(axis=2).T  # inputs x outputs
    neg = np.minimum(w, 0).sum(axis=2).T
    zero = np.zeros((1, w.shape[0]))
    pos_rest = np.concatenate([np.cumsum(pos[::-1], axis=0)[::-1], zero])
    neg_rest = np.concatenate([np.cumsum(neg[::-1], axis=0)[::-1], zero])
    allowance = ROUNDING_ALLOWANCE * (w.shape[1] * per_input + 6)
    l1 = np.abs(w).sum(axis=(1, 2))
    never = math.isinf(threshold)
    t = 0.0 if never else threshold
    return SpetBound(t * (pos_rest + allowance * l1), t * (neg_rest - allowance * l1),
                     t * allowance * np.abs(np.asarray(bias, np.float64)), never)


def input_range(x: np.ndarray, nonneg: bool) -> tuple[float, float]:
    """[xlo, xhi] with xlo <= min(0, min x) and xhi >= max(0, max x): the range of the inputs a
    neuron reads (zero padding included); after a ReLU (``nonneg``) xlo = 0 without a look."""
    xhi = max(float(x.max()), 0.0) if x.size else 0.0
    xlo = 0.0 if nonneg or not x.size else min(float(x.min()), 0.0)
    return xlo, xhi


def spet_test_margins(setting: KnobSetting, bound: SpetBound | None, outputs: int, rest_from: int,
                      x: np.ndarray, nonneg: bool, count: dict[str, int]) -> np.ndarray:
    """Each output's SPET margin (float32): the threshold (``test: margin``) or, for
    ``test: bound``, t x the bound of the inputs from position ``rest_from`` of SPET's order on
    for the input ``x`` (its ops counted as SPET overhead)."""
    if bound is None:
        return np.full(outputs, setting.threshold, np.float32)
    count["overhead_spet"] += spet_bound_ops(x.size, outputs, nonneg)
    if bound.never:
        return np.full(outputs, np.inf, np.float32)
    xlo, xhi = input_range(x, nonneg)
    margins = bound.hi[rest_from] * xhi + bound.const
    if xlo:
        margins += bound.lo[rest_from] * xlo
    return margins.astype(np.float32)


def conv_neurons(cp: "ConvPlan", src: np.ndarray, tap_off: np.ndarray, wmat: np.ndarray, lead: int,
                 margins: np.ndarray | None, bias: np.ndarray, constant: np.ndarray | None, positions: np.ndarray,
                 mask: np.ndarray | None, out_g: np.ndarray, panels: np.ndarray, threads: int,
                 count: dict[str, int]) -> None:
    """The outputs at ``positions`` (where ``mask``, if given) of one group, SPET inside when on
    (``margins``: each output's, from :func:`spet_test_margins`), written to ``out_g`` (ReLU'd
    when the layer has one); counts their MACs and ops."""
    g, relu = cp.geom, cp.layer.relu
    spet = cp.knobs.spet
    terminated, n_active = K.knob_conv(
        src=src, tap_off=tap_off, positions=positions, wo=g.wo, sh=g.sh, sw=g.sw,
        row_width=cp.route.src_row_width, W=wmat, lead=lead, spet=spet is not None,
        margins=margins if margins is not None else np.zeros(g.cout, np.float32), relu=relu, bias=bias,
        cst=constant, mask=mask, out=out_g, panels=panels, threads=threads)
    kdim = wmat.shape[1]
    if spet is None:
        tally(count, neuron_costs(n_active, kdim, relu))
    else:
        tally(count, spet_neuron_costs(n_active, terminated, kdim, lead, relu))


@dataclass(frozen=True)
class FcPlan:
    """A fully-connected layer's SPET plan: its input order, weight columns in that order and,
    for ``test: bound``, the bound's static data."""

    layer: Layer
    spet: KnobSetting | None
    order: np.ndarray | None = None
    weight_perm: np.ndarray | None = None
    bound: SpetBound | None = None


def plan_fc(layer: Layer, knobs: KnobConfig) -> FcPlan:
    """Static data of a fully-connected layer for the engine."""
    spet = knobs.get(layer.name, "spet")
    if spet is None:
        return FcPlan(layer, None)
    order = fc_input_order(layer.weight).astype(np.int32)
    weight_perm = np.ascontiguousarray(layer.weight[:, order])
    bound = (spet_bound(weight_perm, layer.bias, 1, spet.threshold)
             if spet.option("spet", "test") == "bound" else None)
    return FcPlan(layer, spet, order, weight_perm, bound)


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
    margins = spet_test_margins(fp.spet, fp.bound, o, lead, x, layer.input_nonneg, overhead)
    terminated = K.spet_decide(partial=out[None, :], margins=margins, active=np.ones((1, o), U8), cont=cont)
    K.gemv_rows(W=fp.weight_perm, x=xp, out=out, k0=lead, k1=kin, mask=cont[0], threads=threads)
    K.finish_act(out=out[None, :], active=np.ones((1, o), U8), cont=cont, relu=True)
    counts = fc_spet_costs(o, kin, lead, terminated)
    tally(counts, {"ops": overhead["overhead_spet"], "overhead_spet": overhead["overhead_spet"]})
    counts["fallbacks"] = 0
    if terminated == 0:
        K.gemv_bias(W=w, x=x, bias=layer.bias, out=out, relu=layer.relu)
        counts["fallbacks"] = 1
    return counts
