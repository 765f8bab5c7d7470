"""SPET (speculative early termination): a neuron whose partial sum over its leading inputs
(by decreasing weight L1 norm) is below -threshold stops there, its output taken as 0 (ReLU).

Here: the input order, the lead, the conv neurons of the knob path (SPET inside when on; the
other knobs compute their neurons through :func:`conv_neurons` too) and the fully-connected layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import _kernels as K
from ..knobs import KnobConfig, KnobSetting
from ..plan import Layer
from .counting import fc_spet_costs, neuron_costs, spet_neuron_costs, tally

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


def conv_neurons(cp: "ConvPlan", src: np.ndarray, tap_off: np.ndarray, wmat: np.ndarray, lead: int,
                 bias: np.ndarray, constant: np.ndarray | None, positions: np.ndarray, mask: np.ndarray | None,
                 out_g: np.ndarray, panels: np.ndarray, threads: int, count: dict[str, int]) -> None:
    """The outputs at ``positions`` (where ``mask``, if given) of one group, SPET inside when on,
    written to ``out_g`` (ReLU'd when the layer has one); counts their MACs and ops."""
    g, relu = cp.geom, cp.layer.relu
    spet = cp.knobs.spet
    terminated, n_active = K.knob_conv(
        src=src, tap_off=tap_off, positions=positions, wo=g.wo, sh=g.sh, sw=g.sw,
        row_width=cp.route.src_row_width, W=wmat, lead=lead, spet=spet is not None,
        margin=float(spet.threshold) if spet is not None else 0.0, relu=relu, bias=bias, cst=constant,
        mask=mask, out=out_g, panels=panels, threads=threads)
    kdim = wmat.shape[1]
    if spet is None:
        tally(count, neuron_costs(n_active, kdim, relu))
    else:
        tally(count, spet_neuron_costs(n_active, terminated, kdim, lead, relu))


@dataclass(frozen=True)
class FcPlan:
    """A fully-connected layer's SPET plan: its input order and weight columns in that order."""

    layer: Layer
    spet: KnobSetting | None
    order: np.ndarray | None = None
    weight_perm: np.ndarray | None = None


def plan_fc(layer: Layer, knobs: KnobConfig) -> FcPlan:
    """Static data of a fully-connected layer for the engine."""
    spet = knobs.get(layer.name, "spet")
    if spet is None:
        return FcPlan(layer, None)
    order = fc_input_order(layer.weight).astype(np.int32)
    return FcPlan(layer, spet, order, np.ascontiguousarray(layer.weight[:, order]))


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
    terminated = K.spet_decide(partial=out[None, :], margin=fp.spet.threshold, active=np.ones((1, o), U8),
                               cont=cont)
    K.gemv_rows(W=fp.weight_perm, x=xp, out=out, k0=lead, k1=kin, mask=cont[0], threads=threads)
    K.finish_act(out=out[None, :], active=np.ones((1, o), U8), cont=cont, relu=True)
    counts = fc_spet_costs(o, kin, lead, terminated)
    counts["fallbacks"] = 0
    if terminated == 0:
        K.gemv_bias(W=w, x=x, bias=layer.bias, out=out, relu=layer.relu)
        counts["fallbacks"] = 1
    return counts
