"""A measured study of stronger knob predictors (issue 15), simulated in numpy on a real model.

    python tools/knob_study.py --benchmark cifar10_quick [--select 0:600] [--check 2000:2600]

Prints, per conv layer followed by ReLU: the headroom (share of outputs an oracle skips, per
granularity, and before a max-pooling the share that wins no window); then, per predictor and
granularity, the most aggressive setting that changes the top-1 of at most --changed of the
--select images, with its op reduction there and on the --check images; then chained
combinations over all layers. Findings: docs/notes/2026-12-03-predictors.md.

A predictor decides which outputs to skip (0 after ReLU; before a max-pooling, left out of
the pooling), per unit of a granularity: a unit is skipped only when every output in it is.

    neuron   1 output channel x 1 position (the reconstruction's SPET and SDSS)
    ch2/4/8  2, 4 or 8 output channels x 1 position (positions gathered into dense panels
             per block of output channels)
    tile     8 output channels x 16 positions (a whole register tile, no gather)
    allch    every output channel x 1 position (the position leaves the im2col panel)

Predictors: ``oracle`` (the true pre-activation, < -t; t < 0 spends the budget);
``partial:F`` (SPET: partial sum over the first F of the input channels in the shared L1
order, < -t); ``bound`` (check points after 1/8, 1/4, 1/2 of the ordered channels: partial +
s x the exact upper bound of the rest, sum over the remaining channels of sum(max(w, 0)) x
the window maximum of x, < 0; inputs >= 0 only; s = 1 never changes an output);
``meanfield`` (partial + kernel sums x window means of the rest, < -t); ``lowrank:R`` (rank-R
SVD estimate of the pre-activation, < -t); ``sdss`` (stride-2 grid exact for every channel, a
cell filled with 0 when its four corners are <= t); ``sdss+bound:S`` (both, the bound at scale
S). Before a max-pooling: ``pool:R`` (rank-R estimate, ``pool:0`` the true value; only each
window's candidates, estimate >= max(window max - d, -d), are computed) and ``poolpartial``
(the partial sum over the first check point as the estimate; candidates finish their sums).

Ops follow docs/ops.md (2 per MAC, bias and ReLU per computed output) plus each predictor's
own overhead (``Checks.overhead``, ``apply``). The simulated output is the engine's own dense
output with the skipped outputs set to 0, and the rest of the network runs on the engine
(``Engine.run_image``), so an image whose skipped outputs were all 0 is unchanged bit for bit.
Models with a Concat are refused (a resumed run would need every earlier tensor). Never a test
split. Nothing is random; --seed seeds numpy for any later use.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from numpy.lib.stride_tricks import sliding_window_view

from dyvedeep.convert import convert, preset_preprocess
from dyvedeep.engine import Engine
from dyvedeep.errors import DyveError
from dyvedeep.cli_support import open_dataset
from dyvedeep.fetch import resolve_mirror, url_relpath
from dyvedeep.plan import Layer, Plan, build_plan

GRANULARITIES = {"neuron": (1, 1), "ch2": (2, 1), "ch4": (4, 1), "ch8": (8, 1), "tile": (8, 16), "allch": (0, 1)}  # 0: every channel
CHECKS = (1 / 8, 1 / 4, 1 / 2)
CHUNK = 100  # images per numpy batch


# ----------------------------------------------------------------------------- model and data

def load_model(args: argparse.Namespace, workdir: Path) -> Plan:
    """The plan of --model, or of --benchmark converted from the mirror (config/config.yaml)."""
    if args.model:
        return build_plan(args.model)
    config = yaml.safe_load(Path(args.config).read_text())
    bench = config["benchmarks"].get(args.benchmark)
    if bench is None:
        raise DyveError(f"{args.config}: no benchmark {args.benchmark!r}")
    mirror = resolve_mirror(args.mirror)
    if mirror is None:
        raise DyveError("no mirror: give --mirror DIR or set DYVEDEEP_MIRROR")
    files = {role: mirror / url_relpath(f["url"]) for role, f in bench["files"].items()}
    preprocess, labels = preset_preprocess(bench["preset"], files.get("mean"))
    out = workdir / f"{args.benchmark}.onnx"
    convert(files["source"], files.get("weights"), out, preprocess, labels)
    return build_plan(out)


def span(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B)."""
    a, _, b = text.partition(":")
    if not b or int(a) >= int(b):
        raise argparse.ArgumentTypeError(f"expected START:STOP with START < STOP, got {text!r}")
    return int(a), int(b)


# ----------------------------------------------------------------------------- numpy conv pieces

def padded(x: np.ndarray, layer: Layer) -> np.ndarray:
    """x (N, C, H, W) with the layer's zero padding."""
    pt, pl, pb, pr = layer.attrs["pads"]
    return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))


def windows(x: np.ndarray, layer: Layer) -> np.ndarray:
    """(N, C, kh, kw, Ho, Wo) view of the padded input's receptive fields."""
    kh, kw = layer.attrs["kernel"]
    sh, sw = layer.attrs["stride"]
    v = sliding_window_view(padded(x, layer), (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    return v.transpose(0, 1, 4, 5, 2, 3)


def channel_contributions(x: np.ndarray, layer: Layer, groups: list[np.ndarray]) -> list[np.ndarray]:
    """Per group of input channels, its contribution to every output (N, Cout, P), no bias."""
    w = layer.weight.astype(np.float64)
    cols = windows(x, layer)
    n = x.shape[0]
    out = []
    for g in groups:
        c = np.ascontiguousarray(cols[:, g]).reshape(n, -1, cols.shape[-2] * cols.shape[-1])
        out.append(np.einsum("ok,nkp->nop", w[:, g].reshape(w.shape[0], -1), c, optimize=True))
    return out


def window_stat(x: np.ndarray, layer: Layer, how: str) -> np.ndarray:
    """Per input channel and output position, the max or mean of x over the receptive field (N, C, P)."""
    v = windows(x, layer)
    r = v.max(axis=(2, 3)) if how == "max" else v.mean(axis=(2, 3))
    return r.reshape(x.shape[0], x.shape[1], -1)


def spet_order(layer: Layer) -> np.ndarray:
    """Input channels by the L1 norm of their kernel slices summed over outputs (docs/knobs.md)."""
    return np.argsort(-np.abs(layer.weight).sum(axis=(0, 2, 3)), kind="stable")


def check_groups(layer: Layer) -> tuple[list[np.ndarray], list[float]]:
    """The ordered input channels cut at the check points; the fraction of channels before each cut."""
    order, c = spet_order(layer), layer.weight.shape[1]
    cuts = sorted({max(1, round(f * c)) for f in CHECKS} - {c})
    bounds = [0] + cuts + [c]
    return [order[a:b] for a, b in zip(bounds, bounds[1:])], [k / c for k in cuts]


# ----------------------------------------------------------------------------- predictors

@dataclass
class Checks:
    """A predictor's tests on one batch: at check k a neuron stops when A[k] + param * B[k] < 0
    (B None: B = 1; B = 0: the check ignores the parameter); ``fractions[k]``: the share of its
    MACs done when it stops there (0: none); ``never``: neurons that check 0 never stops (SDSS
    grid points); ``overhead``: ops per image."""

    A: list[np.ndarray]
    B: list[np.ndarray | None]
    fractions: list[float]
    overhead: float
    never: np.ndarray | None = None


def predictor_checks(name: str, layer: Layer, x: np.ndarray, z: np.ndarray, lowrank: dict) -> Checks:
    """The tests of predictor ``name`` on inputs x (N, C, H, W); z: the true pre-activation (N, Cout, P)."""
    cout, cin, kh, kw = layer.weight.shape
    kk, p = kh * kw, z.shape[2]
    k_all = cin * kk
    b = layer.bias.astype(np.float64)[None, :, None]
    kind, _, arg = name.partition(":")
    if kind == "oracle":
        return Checks([z], [None], [0.0], 0.0)
    if kind == "lowrank":
        r = int(arg)
        u, v = lowrank[r]
        cols = np.ascontiguousarray(windows(x, layer)).reshape(x.shape[0], k_all, p)
        est = np.einsum("or,rk,nkp->nop", u, v, cols, optimize=True) + b
        return Checks([est], [None], [0.0], 2.0 * p * (r * k_all + cout * r) + p * cout)
    if kind == "sdss+bound":  # the SDSS cells first (the parameter), then the bound at scale arg
        cells, bound = predictor_checks("sdss", layer, x, z, lowrank), predictor_checks("bound", layer, x, z, lowrank)
        scale = float(arg)
        return Checks(cells.A + [a + scale * b for a, b in zip(bound.A, bound.B)], cells.B + [0.0] * len(bound.A),
                      cells.fractions + bound.fractions, cells.overhead + bound.overhead, cells.never)
    if kind == "sdss":
        ho, wo = layer.out_shape[1:]
        rows = np.unique(np.r_[np.arange(0, ho, 2), ho - 1])
        cols_ = np.unique(np.r_[np.arange(0, wo, 2), wo - 1])
        corner = np.maximum(z, 0).reshape(z.shape[0], cout, ho, wo)
        # each off-grid position's cell: the grid row/column at or before it and the next one
        ri = np.searchsorted(rows, np.arange(ho), side="right") - 1
        ci = np.searchsorted(cols_, np.arange(wo), side="right") - 1
        r0, r1 = rows[np.minimum(ri, len(rows) - 2)], rows[np.minimum(ri, len(rows) - 2) + 1]
        c0, c1 = cols_[np.minimum(ci, len(cols_) - 2)], cols_[np.minimum(ci, len(cols_) - 2) + 1]
        m = np.maximum.reduce([corner[:, :, r0][:, :, :, c0], corner[:, :, r0][:, :, :, c1],
                               corner[:, :, r1][:, :, :, c0], corner[:, :, r1][:, :, :, c1]])
        grid = np.zeros((ho, wo), bool)
        grid[np.ix_(rows, cols_)] = True
        cells = (len(rows) - 1) * (len(cols_) - 1)
        # stat: corner max - t; param = -t (t > 0 so that all-zero corners stop)
        return Checks([m.reshape(z.shape)], [None], [0.0], cout * (grid.sum() + 3 * cells),
                      never=np.broadcast_to(grid.reshape(1, 1, -1), z.shape))
    groups, fracs = check_groups(layer)
    parts = np.cumsum(channel_contributions(x, layer, groups), axis=0)[:-1] + b  # partial sums at the cuts
    if kind == "partial":
        f = float(arg)
        k = int(np.argmin([abs(q - f) for q in fracs]))
        return Checks([parts[k]], [None], [fracs[k]], 0.0)
    stat = window_stat(x, layer, "max" if kind == "bound" else "mean")
    wsum = np.maximum(layer.weight, 0).sum(axis=(2, 3)) if kind == "bound" else layer.weight.sum(axis=(2, 3))
    rest = [np.einsum("oc,ncp->nop", wsum[:, np.concatenate(groups[k + 1:])],
                      stat[:, np.concatenate(groups[k + 1:])], optimize=True) for k in range(len(fracs))]
    c_rest = cin - len(groups[0])
    # window max/mean per remaining channel and position: 2 (kh - 1 + kw - 1) separable ops;
    # the rest per check: one MAC per output neuron per remaining channel (segments, then suffix sums)
    overhead = c_rest * p * 2 * (kh - 1 + kw - 1) + 2.0 * p * cout * c_rest + p * cout * len(fracs) * 3
    if kind == "bound":
        return Checks(list(parts), rest, fracs, overhead)
    return Checks([parts[k] + rest[k] for k in range(len(fracs))], [None] * len(fracs), fracs, overhead)


PREDICTORS = ("oracle", "partial:0.125", "partial:0.25", "partial:0.5", "bound", "meanfield",
              "lowrank:2", "lowrank:4", "sdss", "sdss+bound:0.3")


def unit_max(stat: np.ndarray, gc: int, gp: int) -> np.ndarray:
    """Max of stat (N, Cout, P) over each unit of gc channels x gp positions, broadcast back."""
    n, cout, p = stat.shape
    gc = gc or cout
    u = stat.reshape(n, cout // gc, gc, p // gp, gp).max(axis=(2, 4), keepdims=True)
    return np.broadcast_to(u, (n, cout // gc, gc, p // gp, gp)).reshape(n, cout, p)


def decide(ch: Checks, param: float, gc: int, gp: int) -> np.ndarray:
    """Check level at which each neuron stops (len(A): computed in full), per unit."""
    n_checks = len(ch.A)
    level = np.full(ch.A[0].shape, n_checks, np.int8)
    for k in range(n_checks - 1, -1, -1):  # the first check that stops a unit wins
        s = ch.A[k] + (param if ch.B[k] is None else param * ch.B[k])
        if ch.never is not None and k == 0:
            s = np.where(ch.never, np.inf, s)
        level[unit_max(s, gc, gp) < 0] = k
    return level


def layer_ops(layer: Layer, ch: Checks, level: np.ndarray) -> np.ndarray:
    """Ops per image of the layer under these decisions (docs/ops.md), overhead included."""
    cout, cin, kh, kw = layer.weight.shape
    k_all = cin * kh * kw
    n = level.shape[0]
    full = (level == len(ch.A)).reshape(n, -1).sum(1)
    ops = full * (2.0 * k_all + 2 + len(ch.A))
    for k, f in enumerate(ch.fractions):
        stopped = (level == k).reshape(n, -1).sum(1)
        # stopped at check k: its MACs so far, the bias when anything was computed, k + 1 compares
        ops += stopped * (2.0 * f * k_all + (1 if f > 0 else 0) + k + 1)
    return ops + ch.overhead


# ----------------------------------------------------------------------------- pooling-aware

@dataclass
class PoolGeometry:
    """The max-pooling that alone reads a conv's output: its windows on the conv's (h, w) map."""

    h: int
    w: int
    rows: list[tuple[np.ndarray, np.ndarray]]  # per tap row offset: (window rows, input rows) valid
    cols: list[tuple[np.ndarray, np.ndarray]]
    out: tuple[int, int]
    taps: float  # mean taps inside the input per window


def pool_geometry(plan: Plan, index: int) -> PoolGeometry | None:
    readers = [l for l in plan.layers if plan.layers[index].output in l.inputs]
    if len(readers) != 1 or readers[0].op != "maxpool":
        return None
    pool, (_, h, w) = readers[0], plan.layers[index].out_shape
    (kh, kw), (sh, sw), (pt, pl, _, _) = pool.attrs["kernel"], pool.attrs["stride"], pool.attrs["pads"]
    ho, wo = pool.out_shape[1:]

    def axis(k: int, s: int, pad: int, n_out: int, n_in: int) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for d in range(k):
            src = np.arange(n_out) * s - pad + d
            ok = (src >= 0) & (src < n_in)
            out.append((np.flatnonzero(ok), src[ok]))
        return out

    rows, cols = axis(kh, sh, pt, ho, h), axis(kw, sw, pl, wo, w)
    taps = sum(len(a) for a, _ in rows) * sum(len(a) for a, _ in cols) / (ho * wo)
    return PoolGeometry(h, w, rows, cols, (ho, wo), taps)


def pool_needed(est: np.ndarray, g: PoolGeometry, d: float) -> np.ndarray:
    """Positions computed (N, Cout, P): candidates of some window (estimate >= max(window max - d, -d))."""
    n, c, _ = est.shape
    e = est.reshape(n, c, g.h, g.w)
    wmax = np.full((n, c) + g.out, -np.inf)
    taps = [(ri, rs, ci, cs) for ri, rs in g.rows for ci, cs in g.cols]
    for ri, rs, ci, cs in taps:
        idx = (slice(None), slice(None), ri[:, None], ci[None, :])
        wmax[idx] = np.maximum(wmax[idx], e[:, :, rs[:, None], cs[None, :]])
    bar = np.maximum(wmax - d, -d)
    need_bar = np.full(e.shape, np.inf)
    for ri, rs, ci, cs in taps:
        idx = (slice(None), slice(None), rs[:, None], cs[None, :])
        need_bar[idx] = np.minimum(need_bar[idx], bar[:, :, ri[:, None], ci[None, :]])
    return (e >= need_bar).reshape(est.shape)


# ----------------------------------------------------------------------------- one layer

@dataclass
class LayerBatch:
    """One layer's dense inputs (N, C, H, W) and the engine's dense outputs (N, Cout, P) on a set
    of images, and the dense top-1 of those images."""

    index: int
    x: np.ndarray
    y: np.ndarray
    top1: np.ndarray


def lowrank_factors(layer: Layer) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Rank-r factors (U S, V) of the weights (Cout x Cin kh kw) by SVD."""
    w = layer.weight.reshape(layer.weight.shape[0], -1).astype(np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return {r: (u[:, :r] * s[:r], vt[:r]) for r in (2, 4, 8, 16)}


def preact(layer: Layer, x: np.ndarray) -> np.ndarray:
    """The true pre-activation (N, Cout, P) in float64."""
    z = channel_contributions(x, layer, [np.arange(layer.weight.shape[1])])[0]
    return z + layer.bias.astype(np.float64)[None, :, None]


def prepare(layer: Layer, predictor: str, x: np.ndarray) -> list:
    """Per chunk of images, what the predictor computes once (independent of its parameter)."""
    lowrank = lowrank_factors(layer)
    caches = []
    for a in range(0, len(x), CHUNK):
        xb = x[a:a + CHUNK]
        z = preact(layer, xb)
        if predictor == "poolpartial":
            groups, fracs = check_groups(layer)
            est = channel_contributions(xb, layer, groups[:1])[0] + layer.bias[None, :, None]
            caches.append((est, -1, fracs[0]))
        elif predictor.startswith("pool"):
            r = int(predictor.partition(":")[2])
            if r == 0:
                est = z
            else:
                cols = np.ascontiguousarray(windows(xb, layer)).reshape(len(xb), -1, z.shape[2])
                est = np.einsum("or,rk,nkp->nop", *lowrank[r], cols, optimize=True) + layer.bias[None, :, None]
            caches.append((est, r, 0.0))
        else:
            caches.append(predictor_checks(predictor, layer, xb, z, lowrank))
    return caches


def apply(layer: Layer, predictor: str, caches: list, param: float, gran: str,
          pool: PoolGeometry | None) -> tuple[np.ndarray, np.ndarray]:
    """(skipped neurons (N, Cout, P), ops per image) at one parameter and granularity."""
    gc, gp = GRANULARITIES[gran]
    cout, cin, kh, kw = layer.weight.shape
    k_all = cin * kh * kw
    skipped, ops = [], []
    for cache in caches:
        if predictor.startswith("pool"):
            est, r, f = cache
            need = pool_needed(est, pool, param)
            if gc != 1:
                need = unit_max(need.astype(np.int8), gc, gp) > 0
            p = est.shape[2]
            # the estimate: rank r (r > 0), the partial sum over a fraction f that computed
            # neurons then finish (r < 0), or free (r = 0, the oracle)
            over = 2.0 * p * (r * k_all + cout * r) + p * cout if r > 0 else p * cout * (2.0 * f * k_all + 1)
            # per window and channel: its max over the estimates, and a compare per tap
            over += cout * pool.out[0] * pool.out[1] * 2 * pool.taps
            rest = 2.0 * (1 - f) * k_all + 1 if r < 0 else 2.0 * k_all + 2
            ops.append(need.reshape(len(est), -1).sum(1) * rest + over)
            skipped.append(~need)
        else:
            level = decide(cache, param, gc, gp)
            ops.append(layer_ops(layer, cache, level))
            skipped.append(level < len(cache.A))
    return np.concatenate(skipped), np.concatenate(ops)


def rest_top1(engine: Engine, index: int, y: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Top-1 of images ``which`` when layer ``index`` outputs y (N, Cout, P) and the rest runs dense."""
    plan = engine.plan
    layer = plan.layers[index]
    out = np.empty(len(which), int)
    for k, n in enumerate(which):
        values = engine.run_image(None, start=index + 1, tensors={layer.output: y[n].reshape(layer.out_shape)})
        out[k] = int(np.argmax(values[plan.output_name]))
    return out


def changed_share(engine: Engine, batch: LayerBatch, skipped: np.ndarray) -> tuple[np.ndarray, float]:
    """The layer's simulated output and the share of images whose top-1 it changes."""
    y = np.where(skipped, np.float32(0), batch.y)
    differs = np.flatnonzero((y != batch.y).reshape(len(y), -1).any(1))
    changed = (rest_top1(engine, batch.index, y, differs) != batch.top1[differs]).sum() if len(differs) else 0
    return y, changed / len(y)


def curve(engine: Engine, batch: LayerBatch, predictor: str, grans: list[str], allowances: list[float],
          fixed: list[float] | None = None) -> list[dict]:
    """Rows (parameter, ops, share changed) of one layer and predictor: per granularity and
    allowance, a binary search over the parameters (cautious to aggressive; the share changed
    taken as monotone) for the most aggressive one within the allowance; with ``fixed``, each
    of those parameters instead."""
    plan = engine.plan
    layer = plan.layers[batch.index]
    pool = pool_geometry(plan, batch.index)
    caches = prepare(layer, predictor, batch.x)
    params = fixed if fixed is not None else default_params(predictor, caches)
    rows = []
    for gran in grans:
        seen: dict[int, dict] = {}

        def row(k: int) -> dict:
            if k not in seen:
                skipped, ops = apply(layer, predictor, caches, params[k], gran, pool)
                _, changed = changed_share(engine, batch, skipped)
                saved = layer.dense_ops - ops.mean()
                seen[k] = dict(layer=layer.name, predictor=predictor, gran=gran, param=float(params[k]),
                               layer_ops=ops.mean(), layer_x=layer.dense_ops / ops.mean(),
                               net_x=plan.dense_ops / (plan.dense_ops - saved), changed=changed, n=len(skipped))
            return seen[k]

        if fixed is not None:
            for k in range(len(params)):
                row(k)
        for allowance in allowances if fixed is None else []:
            lo, hi = 0, len(params) - 1
            while lo <= hi:
                mid = (lo + hi) // 2
                if row(mid)["changed"] <= allowance:
                    lo = mid + 1
                else:
                    hi = mid - 1
        rows += [seen[k] for k in sorted(seen)]
    return rows


def default_params(predictor: str, caches: list) -> list[float]:
    """Parameters from the most cautious to the most aggressive."""
    kind = predictor.partition(":")[0]
    if kind in ("pool", "poolpartial"):
        scale = float(np.std(np.concatenate([e for e, _, _ in caches])))
        return [f * scale for f in (3.0, 2.0, 1.5, 1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05, 0.02, 0.0)]
    if kind == "bound":
        return [1.0, 0.5, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.015, 0.0]
    a = np.concatenate([c.A[-1] for c in caches]).ravel()
    if kind.startswith("sdss"):
        a = np.concatenate([c.A[0] for c in caches]).ravel()
        pos = a[a > 0]
        return [-1e-9] + [-float(np.quantile(pos, q)) for q in (0.01, 0.03, 0.06, 0.1, 0.15, 0.2)]
    scale = float(np.std(a))
    if kind == "oracle":
        return [0.0, -0.02 * scale, -0.05 * scale, -0.1 * scale]
    return [f * scale for f in (3.0, 2.0, 1.5, 1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05, 0.0)]


def pick(rows: list[dict], allowance: float) -> dict | None:
    """The row that saves the most ops with share changed <= allowance."""
    ok = [r for r in rows if r["changed"] <= allowance]
    return min(ok, key=lambda r: r["layer_ops"]) if ok else None


# ----------------------------------------------------------------------------- dense runs and chains

def dense_batches(engine: Engine, images: np.ndarray, targets: list[int]) -> dict[int, LayerBatch]:
    """Each target layer's dense inputs and outputs on the images."""
    plan = engine.plan
    xs = {i: [] for i in targets}
    ys = {i: [] for i in targets}
    top1 = []
    for img in images:
        for i in targets:  # forward's views of dead tensors may hold later ones: stop after layer i
            layer = plan.layers[i]
            values = engine.forward(img, stop=i + 1)
            xs[i].append(np.array(values[layer.inputs[0]]))
            ys[i].append(np.array(values[layer.output]).reshape(layer.out_shape[0], -1))
        top1.append(int(np.argmax(engine.run_image(img)[plan.output_name])))
    top1 = np.array(top1)
    return {i: LayerBatch(i, np.stack(xs[i]), np.stack(ys[i]), top1) for i in targets}


def chain(engine: Engine, images: np.ndarray, settings: dict[int, tuple[str, str, float]]) -> tuple[float, float]:
    """Every image with each layer of ``settings`` simulated in order, on the inputs that the
    earlier simulated layers produced: (network op reduction, share of images changed)."""
    plan = engine.plan
    n = len(images)
    dense_top1 = np.array([int(np.argmax(engine.run_image(img)[plan.output_name])) for img in images])
    tensors: list[dict | None] = [None] * n
    start, saved = 0, np.zeros(n)
    for i in sorted(settings):
        layer = plan.layers[i]
        predictor, gran, param = settings[i]
        x = np.stack([engine.run_image(images[k] if start == 0 else None, start=start, stop=i,
                                       tensors=tensors[k])[layer.inputs[0]] for k in range(n)])
        y = np.stack([engine.run_image(None, start=i, stop=i + 1, tensors={layer.inputs[0]: x[k]})[layer.output]
                      for k in range(n)]).reshape(n, layer.out_shape[0], -1)
        skipped, ops = apply(layer, predictor, prepare(layer, predictor, x), param, gran, pool_geometry(plan, i))
        y = np.where(skipped, np.float32(0), y)
        saved += layer.dense_ops - ops
        tensors = [{layer.output: y[k].reshape(layer.out_shape)} for k in range(n)]
        start = i + 1
    top1 = np.array([int(np.argmax(engine.run_image(images[k] if start == 0 else None, start=start,
                                                    tensors=tensors[k])[plan.output_name])) for k in range(n)])
    return plan.dense_ops / (plan.dense_ops - saved.mean()), float((top1 != dense_top1).mean())


def greedy_groups(zero: np.ndarray, size: int) -> np.ndarray:
    """An order of the output channels in groups of ``size`` that are often zero together: each
    group starts from the channel with the most zeros left and adds the one that keeps the
    group's all-zero share highest."""
    left, order = list(range(zero.shape[1])), []
    while left:
        group = [max(left, key=lambda c: zero[:, c].mean())]
        left.remove(group[0])
        together = zero[:, group[0]]
        while len(group) < size and left:
            best = max(left, key=lambda c: (together & zero[:, c]).mean())
            group.append(best)
            left.remove(best)
            together = together & zero[:, best]
        order += group
    return np.array(order)


def all_zero_share(zero: np.ndarray, order: np.ndarray, size: int) -> float:
    """Share of neurons in (size channels x 1 position) units that are all zero, channels in ``order``."""
    n, c, p = zero.shape
    return float(zero[:, order].reshape(n, c // size, size, p).all(axis=2).mean())


def print_headroom(plan: Plan, batches: dict[int, LayerBatch], grans: list[str]) -> None:
    """Per layer: the share of neurons an oracle skips at no top-1 change, per granularity (a unit
    is skipped when all its outputs are 0 after ReLU) and, before a max-pooling, the share of
    neurons that win no window with a positive maximum."""
    for i, batch in batches.items():
        layer = plan.layers[i]
        zero = (batch.y <= 0).astype(np.int8)
        shares = [f"{g} {100 * (1 - unit_max(1 - zero, *GRANULARITIES[g])).mean():.1f} %" for g in grans]
        line = f"headroom {layer.name}: zero outputs skippable per " + ", ".join(shares)
        grouped = [f"ch{g} {100 * all_zero_share(zero.astype(bool), greedy_groups(zero.astype(bool), g), g):.1f} %"
                   for g in (2, 4, 8)]
        line += "; output channels grouped by co-zero rate (on these images): " + ", ".join(grouped)
        pool = pool_geometry(plan, i)
        if pool is not None:
            losers = np.concatenate([~pool_needed(preact(layer, batch.x[a:a + CHUNK]), pool, 0.0)
                                     for a in range(0, len(batch.x), CHUNK)])
            line += f"; not a winner of any window (max-pooling): {100 * losers.mean():.1f} %"
        print(line, flush=True)


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a converted MODEL.onnx")
    src.add_argument("--benchmark", help="a benchmark of --config, converted from the mirror")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--mirror", default=None, help="mirror directory (default: DYVEDEEP_MIRROR or ../shared/mirror)")
    parser.add_argument("--data", default="cifar10:calib", help="data spec; never a test split")
    parser.add_argument("--select", type=span, default=(0, 600), help="images that choose thresholds (START:STOP)")
    parser.add_argument("--check", type=span, default=(2000, 2600), help="images that check them (START:STOP)")
    parser.add_argument("--predictors", default=",".join(PREDICTORS) + ",pool:0,pool:2,poolpartial",
                        help="comma-separated; pool:R and poolpartial only before a max-pooling (pool:0 = oracle)")
    parser.add_argument("--grans", default="neuron,ch2,ch4,ch8,tile,allch", help=f"of {', '.join(GRANULARITIES)}")
    parser.add_argument("--changed", type=float, default=0.01, help="share of images allowed to change top-1")
    parser.add_argument("--combos", default="neuron,ch4,tile", help="granularities for which a chained combination is chosen and checked")
    parser.add_argument("--params", type=lambda t: [float(v) for v in t.split(",")], default=None,
                        help="evaluate these parameters of every predictor on --select (no search, no combos)")
    parser.add_argument("--csv", type=Path, help="write every curve row here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.data.endswith(":test"):
        raise DyveError("the study chooses and checks on calibration images only, not a test split")
    np.random.seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        plan = load_model(args, Path(tmp))
    if any(l.op == "concat" for l in plan.layers):
        raise DyveError(f"{plan.path}: has a Concat; resumed runs would need every earlier tensor (not supported)")
    dataset = open_dataset(plan, args.data, None, resolve_mirror(args.mirror))
    engine = Engine(plan)
    targets = [i for i, l in enumerate(plan.layers) if l.op == "conv" and l.relu and l.attrs.get("group", 1) == 1]
    selected = dataset.images(*args.select)
    batches = dense_batches(engine, selected, targets)
    checked = dataset.images(*args.check)
    check_batches = dense_batches(engine, checked, targets)
    grans = args.grans.split(",")
    print_headroom(plan, batches, grans)
    if not args.predictors:
        return 0
    total = sum(plan.layers[i].dense_ops for i in targets)
    rows = []
    for i in targets:
        layer = plan.layers[i]
        for predictor in args.predictors.split(","):
            if predictor.startswith("pool") and pool_geometry(plan, i) is None:
                continue
            if "bound" in predictor and batches[i].x.min() < 0:  # the bound needs inputs >= 0
                continue
            usable = [g for g in grans if not (g == "tile" and predictor.startswith(("sdss", "pool")))]
            allowances = [args.changed, args.changed * plan.layers[i].dense_ops / total]
            got = curve(engine, batches[i], predictor, usable, allowances, args.params)
            if args.params is not None:
                for r in got:
                    print(f"{layer.name:8s} {predictor:14s} {r['gran']:7s} param {r['param']:.4g}: layer "
                          f"{r['layer_x']:.2f}x, network {r['net_x']:.3f}x, changed {100 * r['changed']:.1f} %")
                rows += got
                continue
            rows += got
            check_caches = prepare(layer, predictor, check_batches[i].x)
            for gran in usable:
                best = pick([r for r in got if r["gran"] == gran], args.changed)
                text = "nothing within the allowance"
                if best:
                    skipped, ops = apply(layer, predictor, check_caches, best["param"], gran, pool_geometry(plan, i))
                    _, changed = changed_share(engine, check_batches[i], skipped)
                    saved = layer.dense_ops - ops.mean()
                    best.update(check_layer_x=layer.dense_ops / ops.mean(),
                                check_net_x=plan.dense_ops / (plan.dense_ops - saved), check_changed=changed,
                                picked=True)
                    text = (f"param {best['param']:.4g}: select: layer {best['layer_x']:.2f}x, network "
                            f"{best['net_x']:.3f}x, changed {100 * best['changed']:.1f} % | check: layer "
                            f"{best['check_layer_x']:.2f}x, network {best['check_net_x']:.3f}x, changed "
                            f"{100 * changed:.1f} %")
                print(f"{layer.name:8s} {predictor:14s} {gran:7s} {text}", flush=True)
    if args.csv:
        import pandas as pd
        pd.DataFrame(rows).to_csv(args.csv, index=False)
    if args.params is not None:
        return 0
    for gran, split in ((g, s) for g in args.combos.split(",") for s in ("share", "whole")):
        settings = {}
        for i in targets:
            # "share": each layer may change its op share of the allowance; "whole": each the whole
            allowance = args.changed * (plan.layers[i].dense_ops / total if split == "share" else 1.0)
            found = pick([r for r in rows if r["layer"] == plan.layers[i].name and r["gran"] == gran
                          and r["predictor"] not in ("oracle", "pool:0")], allowance)
            if found and found["layer_x"] > 1.0:
                settings[i] = (found["predictor"], gran, found["param"])
        names = ", ".join(f"{plan.layers[i].name}={p}@{v:.4g}" for i, (p, _, v) in settings.items())
        for label, (a, b), images in (("select", args.select, selected), ("check", args.check, checked)):
            reduction, changed = chain(engine, images, settings)
            print(f"combo {gran} ({split}): {names} | {label} {a}:{b}: {reduction:.3f}x, changed "
                  f"{100 * changed:.2f} %", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DyveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
