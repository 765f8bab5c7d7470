"""Headroom: ``dyvedeep headroom``, the scalar ops an oracle would save without changing any
output, per layer and for the network, measured on the dense engine's activations.

Ceilings (each an exact count; an oracle's decisions cost nothing, so no overhead is counted):

- ``zeros`` (a): every conv / fully-connected output that its ReLU zeroes is skipped: its whole
  dot product, bias add and ReLU (the layer's dense ops per output, from the plan).
- ``pool`` (b): in addition, before a max-pooling, every output that is not the maximum of any
  pooling window it belongs to (one maximum per window: the first in row-major order).
- ``spet``, ``sdss``, ``sfma`` (c): each knob's own structure with the knobs' default options
  (``knobs.DEFAULT_OPTIONS``), as the study of docs/knobs.md did outside the harness:
  SPET stops every neuron whose output ends at 0 after its partial sum over the leading fraction
  of the ordered input channels (saving the rest); SDSS fills the off-grid positions of every
  cell whose outputs (corners included) are all zero after ReLU; SFMA drops every input map that
  is exactly uniform (all its values equal), saving its MACs.
- ``knobs`` (c): the three together, applied in the engine's order (SFMA, SDSS, SPET): the
  dropped maps shorten every neuron, SDSS fills cells, SPET stops the zero neurons left.

A neuron whose pre-activation is exactly 0 outputs 0 like a negative one, and skipping it gives
the same 0, so the post-ReLU tensors of :meth:`Engine.forward` suffice for every ceiling.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .engine import Engine, sdss_grid, spet_lead
from .errors import DyveError
from .cli_support import Progress, add_data_arguments, load_plan, open_dataset, platform_info
from .io_utils import write_json_atomic, write_text_atomic
from .knobs import DEFAULT_OPTIONS, applicable_knobs
from .plan import Layer, Plan

CEILINGS = ("zeros", "pool", "spet", "sdss", "sfma", "knobs")
CEILING_LABELS = {
    "zeros": "(a) ReLU zeros",
    "pool": "(b) zeros + max-pool losers",
    "spet": "(c) SPET oracle",
    "sdss": "(c) SDSS oracle",
    "sfma": "(c) SFMA oracle",
    "knobs": "(c) SPET+SDSS+SFMA oracle",
}
#: A multiply-accumulate is 2 scalar ops (docs/ops.md).
OPS_PER_MAC = 2


# ----------------------------------------------------------------------------- activations


def activations(engine: Engine, image: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor of one image on ``engine`` (a copy of each layer's output, taken as the
    layer runs: the engine reuses the buffers of dead tensors)."""
    plan = engine.plan
    values = {plan.input_name: np.ascontiguousarray(image, dtype=np.float32)}
    for i, layer in enumerate(plan.layers):
        out = engine.forward(None, start=i, stop=i + 1, tensors={t: values[t] for t in layer.inputs})
        values[layer.output] = np.array(out[layer.output], copy=True)
    return values


# ----------------------------------------------------------------------------- max pooling


def pool_winners(x: np.ndarray, layer: Layer) -> np.ndarray:
    """Boolean mask over ``x`` (C, H, W): the elements that are the maximum of at least one
    window of the max-pooling ``layer`` (the first maximum of a window in row-major order)."""
    c, h, w = x.shape
    if layer.op == "gmp":
        kh, kw, sh, sw, pt, pl, ho, wo = h, w, 1, 1, 0, 0, 1, 1
    else:
        kh, kw = layer.attrs["kernel"]
        sh, sw = layer.attrs["stride"]
        pt, pl = layer.attrs["pads"][0], layer.attrs["pads"][1]
        ho, wo = layer.out_shape[1], layer.out_shape[2]
    # pad with -inf (taps outside the input never win) far enough for every window
    hp, wp = max(pt + h, (ho - 1) * sh + kh), max(pl + w, (wo - 1) * sw + kw)
    padded = np.full((c, hp, wp), -np.inf, np.float32)
    padded[:, pt:pt + h, pl:pl + w] = x
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(1, 2))[:, ::sh, ::sw][:, :ho, :wo]
    arg = windows.reshape(c, ho, wo, kh * kw).argmax(axis=3)
    y = np.arange(ho)[None, :, None] * sh + arg // kw - pt
    xx = np.arange(wo)[None, None, :] * sw + arg % kw - pl
    mask = np.zeros((c, h, w), bool)
    mask[np.broadcast_to(np.arange(c)[:, None, None], arg.shape), y, xx] = True
    return mask


def pooled_convs(plan: Plan) -> dict[str, list[tuple[Layer, int, int]]]:
    """For each max-pooling (by its input tensor), the conv layers whose outputs only it reads:
    (pooling layer, conv layer, first channel of the conv's output in the pooling's input).
    A conv reaches a pooling directly or through channel Concats that only the pooling reads."""
    producer = {layer.output: layer for layer in plan.layers}
    readers: dict[str, list[Layer]] = {}
    for layer in plan.layers:
        for t in layer.inputs:
            readers.setdefault(t, []).append(layer)

    def sole_reader(t: str, layer: Layer) -> bool:
        return t != plan.output_name and [id(r) for r in readers.get(t, [])] == [id(layer)]

    def trace(t: str, reader: Layer, channel: int) -> list[tuple[Layer, int]]:
        src = producer.get(t)
        if src is None or not sole_reader(t, reader):
            return []
        if src.op == "conv":
            return [(src, channel)]
        if src.op == "concat" and src.inputs.count(t) <= 1:
            found, offset = [], channel
            for name, shape in zip(src.inputs, src.in_shapes):
                if src.inputs.count(name) == 1:
                    found += trace(name, src, offset)
                offset += shape[0]
            return found
        return []

    out: dict[str, list[tuple[Layer, int, int]]] = {}
    for layer in plan.layers:
        if layer.op in ("maxpool", "gmp"):
            for conv, channel in trace(layer.inputs[0], layer, 0):
                out.setdefault(conv.name, []).append((layer, conv, channel))
    return out


# ----------------------------------------------------------------------------- per-layer ceilings


def per_output_ops(layer: Layer) -> int:
    """Dense ops of one output neuron of a conv / fc layer (the plan's count, shared equally)."""
    n = int(np.prod(layer.out_shape))
    if layer.dense_ops % n:
        raise DyveError(f"layer {layer.name}: dense ops {layer.dense_ops} not a multiple of its {n} outputs")
    return layer.dense_ops // n


def macs_per_input_map(layer: Layer) -> int:
    """Dense MACs that one input map of a conv layer feeds (every output of its group, all taps)."""
    cin = layer.in_shapes[0][0]
    if layer.dense_macs % cin:
        raise DyveError(f"layer {layer.name}: dense MACs {layer.dense_macs} not a multiple of its {cin} input maps")
    return layer.dense_macs // cin


def spet_lead_macs(layer: Layer, kept: int, fraction: float) -> int:
    """MACs of SPET's partial sum per neuron: the leading ``fraction`` of the ``kept`` input
    channels (of one group) times the taps per channel, as the engine computes it."""
    taps = int(np.prod(layer.weight.shape[2:])) if layer.op == "conv" else 1
    return spet_lead(fraction, kept) * taps


def spet_stop_saving(neuron_ops: int, lead_macs: int) -> int:
    """Ops a neuron that SPET stops saves: all but its partial sum (leading MACs and bias add)."""
    return neuron_ops - OPS_PER_MAC * lead_macs - 1


def sdss_filled(zero: np.ndarray, stride: int) -> np.ndarray:
    """Per output map (C, H, W zero mask), the off-grid positions SDSS would fill exactly: those
    of the cells whose corners and off-grid positions are all zero."""
    c, ho, wo = zero.shape
    grid = sdss_grid(ho, wo, stride)
    ny, nx = len(grid.gy) - 1, len(grid.gx) - 1
    zc = zero[:, grid.gy][:, :, grid.gx]
    corners_zero = (zc[:, :-1, :-1] & zc[:, :-1, 1:] & zc[:, 1:, :-1] & zc[:, 1:, 1:]).reshape(c, -1)
    cell = grid.cell_y.astype(np.int64) * nx + grid.cell_x
    live_off = ~zero.reshape(c, -1)[:, grid.off_positions]
    rows = np.repeat(np.arange(c) * (ny * nx), len(cell)) + np.tile(cell, c)
    live = np.bincount(rows, weights=live_off.reshape(-1), minlength=c * ny * nx).reshape(c, -1)
    off_per_cell = np.bincount(cell, minlength=ny * nx)
    return ((corners_zero & (live == 0)) * off_per_cell).sum(axis=1)


def layer_savings(layer: Layer, x: np.ndarray, y: np.ndarray, winners: np.ndarray | None) -> dict[str, int]:
    """Ops each ceiling saves in one conv / fc ``layer`` for one image: input ``x``, output ``y``
    (after the fused ReLU), ``winners`` the mask of outputs a max-pooling needs (None: all)."""
    saved = dict.fromkeys(CEILINGS, 0)
    if not layer.is_compute:
        return saved
    unit = per_output_ops(layer)
    zero = (y == 0) if layer.relu else np.zeros(y.shape, bool)
    n_zero = int(zero.sum())
    saved["zeros"] = n_zero * unit
    saved["pool"] = saved["zeros"] + (int((~zero & ~winners).sum()) * unit if winners is not None else 0)
    knobs = applicable_knobs(layer)
    fraction = float(DEFAULT_OPTIONS["spet"]["fraction"])
    cin = layer.weight.shape[1]  # inputs per group (conv) or per neuron (fc)
    if "spet" in knobs:
        saved["spet"] = n_zero * spet_stop_saving(unit, spet_lead_macs(layer, cin, fraction))
    if layer.op != "conv":
        saved["knobs"] = saved["spet"]
        return saved
    cout = layer.out_shape[0]
    groups = layer.attrs["group"]
    taps = int(np.prod(layer.weight.shape[2:]))
    filled = (sdss_filled(zero, int(DEFAULT_OPTIONS["sdss"]["stride"])) if "sdss" in knobs
              else np.zeros(cout, np.int64))
    saved["sdss"] = int(filled.sum()) * unit
    flat = x.reshape(x.shape[0], -1)
    uniform = (flat == flat[:, :1]).all(axis=1)
    saved["sfma"] = int(uniform.sum()) * OPS_PER_MAC * macs_per_input_map(layer)
    # all three: SFMA's dropped maps shorten the neurons of their group
    total = saved["sfma"]
    zero_per_map = zero.reshape(cout, -1).sum(axis=1)
    og = cout // groups
    for g in range(groups):
        dropped = int(uniform[g * cin:(g + 1) * cin].sum())
        neuron = unit - OPS_PER_MAC * dropped * taps
        total += int(filled[g * og:(g + 1) * og].sum()) * neuron
        if "spet" in knobs:
            stopped = int((zero_per_map[g * og:(g + 1) * og] - filled[g * og:(g + 1) * og]).sum())
            total += stopped * spet_stop_saving(neuron, spet_lead_macs(layer, cin - dropped, fraction))
    saved["knobs"] = total
    return saved


def image_savings(plan: Plan, values: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Per conv / fc layer, the ops each ceiling saves on one image (``values``: every tensor)."""
    winners: dict[str, np.ndarray] = {}
    for conv_name, entries in pooled_convs(plan).items():
        for pool, conv, channel in entries:
            mask = pool_winners(values[pool.inputs[0]], pool)[channel:channel + conv.out_shape[0]]
            winners[conv_name] = winners[conv_name] | mask if conv_name in winners else mask
    return {layer.name: layer_savings(layer, values[layer.inputs[0]], values[layer.output].reshape(layer.out_shape),
                                      winners.get(layer.name))
            for layer in plan.layers if layer.is_compute}


# ----------------------------------------------------------------------------- the measurement


def reduction(dense: float, saved: float) -> float:
    """Op reduction ratio dense / (dense - saved); inf when everything is saved."""
    left = dense - saved
    return dense / left if left > 0 else math.inf


@dataclass
class Headroom:
    """Totals over ``n`` images: per layer (with dense ops) the ops each ceiling saved."""

    plan: Plan
    n: int = 0
    saved: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, savings: dict[str, dict[str, int]]) -> None:
        for name, counts in savings.items():
            row = self.saved.setdefault(name, dict.fromkeys(CEILINGS, 0))
            for k, v in counts.items():
                row[k] += v
        self.n += 1

    def rows(self) -> list[dict[str, Any]]:
        """Long table: one row per (layer with dense ops, ceiling) and per network ceiling;
        ops per image (means)."""
        n = max(self.n, 1)
        out = []
        total = dict.fromkeys(CEILINGS, 0)
        for layer in self.plan.layers:
            if layer.dense_ops == 0:
                continue
            counts = self.saved.get(layer.name, dict.fromkeys(CEILINGS, 0))
            for c in CEILINGS:
                total[c] += counts[c]
                mean = counts[c] / n
                out.append({"scope": "layer", "layer": layer.name, "op": layer.op, "ceiling": c,
                            "ops_dense": layer.dense_ops, "ops_saved": mean, "ops_left": layer.dense_ops - mean,
                            "reduction": reduction(layer.dense_ops, mean)})
        dense = self.plan.dense_ops
        for c in CEILINGS:
            mean = total[c] / n
            out.append({"scope": "network", "layer": "", "op": "", "ceiling": c, "ops_dense": dense,
                        "ops_saved": mean, "ops_left": dense - mean, "reduction": reduction(dense, mean)})
        return out

    def network(self) -> dict[str, float]:
        """Network op reduction ratio per ceiling."""
        return {r["ceiling"]: r["reduction"] for r in self.rows() if r["scope"] == "network"}


def measure(plan: Plan, images, threads: int = 1, total: int | None = None) -> Headroom:
    """The headroom of ``plan`` over ``images`` (an iterable of (C, H, W) arrays)."""
    engine = Engine(plan, threads=threads)
    result = Headroom(plan)
    progress = Progress("headroom", total or 0)
    for image in images:
        result.add(image_savings(plan, activations(engine, image)))
        progress.update(result.n)
    return result


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def to_json(result: Headroom, data: str) -> dict[str, Any]:
    """The JSON document of ``--json`` (reductions of layers whose ops are all saved: null)."""
    rows = result.rows()
    layers: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["scope"] == "layer":
            entry = layers.setdefault(r["layer"], {"layer": r["layer"], "op": r["op"], "ops_dense": r["ops_dense"],
                                                   "saved": {}, "reduction": {}})
            entry["saved"][r["ceiling"]] = r["ops_saved"]
            entry["reduction"][r["ceiling"]] = _finite(r["reduction"])
    net = [r for r in rows if r["scope"] == "network"]
    return {
        "model": str(result.plan.path),
        "data": data,
        "n": result.n,
        "options": {"spet_fraction": DEFAULT_OPTIONS["spet"]["fraction"],
                    "sdss_stride": DEFAULT_OPTIONS["sdss"]["stride"]},
        "ceilings": CEILING_LABELS,
        "order": list(CEILINGS),  # the JSON's mappings are written with sorted keys
        "ops_dense": result.plan.dense_ops,
        "saved": {r["ceiling"]: r["ops_saved"] for r in net},
        "reduction": {r["ceiling"]: _finite(r["reduction"]) for r in net},
        "layers": list(layers.values()),
        "platform": platform_info(),
    }


def to_csv(result: Headroom) -> str:
    """The long table of :meth:`Headroom.rows` as CSV."""
    buf = io.StringIO()
    columns = ["scope", "layer", "op", "ceiling", "ops_dense", "ops_saved", "ops_left", "reduction"]
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.rows())
    return buf.getvalue()


def cmd_headroom(args: argparse.Namespace) -> int:
    plan = load_plan(args.model)
    dataset = open_dataset(plan, args.data, args.limit, args.mirror)
    if len(dataset) == 0:
        raise DyveError(f"{args.data}: no images")
    images = (img for batch, _ in dataset.batches(32) for img in batch)
    result = measure(plan, images, args.threads, len(dataset))
    rows = result.rows()
    print(f"images: {result.n} ({args.data}); ops per image (means); reduction = dense / (dense - saved)")
    print(f"{'layer':<28}{'dense':>12}" + "".join(f"{c:>8}" for c in CEILINGS))
    for layer in plan.layers:
        mine = {r["ceiling"]: r for r in rows if r["scope"] == "layer" and r["layer"] == layer.name}
        if mine and any(r["ops_saved"] for r in mine.values()):
            print(f"{layer.name:<28}{layer.dense_ops:>12.4g}" + "".join(f"{mine[c]['reduction']:>7.2f}x" for c in CEILINGS))
    net = result.network()
    print(f"{'network':<28}{plan.dense_ops:>12.4g}" + "".join(f"{net[c]:>7.2f}x" for c in CEILINGS))
    for c in CEILINGS:
        print(f"  {c}: {CEILING_LABELS[c]}")
    if args.json:
        write_json_atomic(args.json, to_json(result, args.data))
    if args.csv:
        write_text_atomic(args.csv, to_csv(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``headroom``."""
    p = subparsers.add_parser("headroom", help="ops an oracle would save with no output change, per layer")
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    add_data_arguments(p)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, metavar="OUT.json")
    p.add_argument("--csv", type=Path, default=None, metavar="OUT.csv")
    p.set_defaults(func=cmd_headroom)
