"""Prune: ``dyvedeep prune``, static sparsity at the same budget as the knobs - the comparison
family of issue 17, beyond the specification and not part of DyVEDeep (docs/pruning.md).

Magnitude pruning of the conv and fully-connected layers, without retraining:

- ``unstructured``: a layer keeps its ``round(density x size)`` weights of largest magnitude;
- ``fan-in``: every output neuron (a conv's output channel, a fully-connected output) keeps the
  same number, ``round(density x fan-in)``, of its inputs of largest magnitude (the pre-defined
  sparsity pattern of Dey, Shao, Chugg, Beerel, arXiv 1711.01343, chosen here by magnitude).

Ties of magnitude keep the weight of lower index (row-major order of the layer's weight); a
density that keeps no weight is refused. The density of each layer is chosen by the greedy
search of ``dyvedeep calibrate`` (:class:`~dyvedeep.calibrate.Calibrator`: the same budget,
margin, label-free criterion, early rejection and held-out check): layers in decreasing share of
the non-zero ops, the candidate densities tried from the most aggressive by binary search, the
allowance growing with the share done in the first pass, the whole of it in the second.

The pruned model is the same ONNX graph with the pruned weights set to 0 and
``dyvedeep.nonzero_weights`` in its metadata, so that ``dyvedeep eval`` reports its non-zero ops
(``Plan.nonzero_ops``, docs/ops.md, as for the Deep Compression nets) and the knobs calibrate on
top of it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from onnx import numpy_helper

from .calibrate import CRITERIA, GROUPINGS, Calibrator, Trial, greedy_allowances, shape_groups
from .cli_support import add_data_arguments, load_plan, open_dataset
from .convert.onnx_graph import set_metadata
from .datasets import parse_spec
from .errors import DyveError
from .evaluate import paired_bootstrap
from .io_utils import atomic_path, write_json_atomic, write_text_atomic
from .knobs import KnobConfig
from .metadata_keys import NONZERO_KEY
from .plan import OP_RULES, Layer, Op, Plan, load_onnx

METHODS = ("unstructured", "fan-in")
#: Candidate densities (share of a layer's weights kept), most aggressive first.
DENSITIES = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05, 0.1, ..., 0.95


def kept_count(size: int, density: float) -> int:
    """Weights kept of ``size`` at ``density``: density x size rounded half up."""
    return int(math.floor(density * size + 0.5))


def prune_mask(weight: np.ndarray, density: float, method: str) -> np.ndarray:
    """The weights ``method`` keeps of ``weight`` (output neurons along axis 0) at ``density``,
    as a boolean array of its shape; ties of magnitude keep the lower index."""
    if method not in METHODS:
        raise DyveError(f"--method: unknown method {method!r} (known: {', '.join(METHODS)})")
    if not 0 < density <= 1:
        raise DyveError(f"density {density}: a share of the weights in (0, 1]")
    rows = weight.reshape(weight.shape[0], -1)
    if method == "unstructured":
        rows = rows.reshape(1, -1)
    keep = kept_count(rows.shape[1], density)
    if keep == 0:
        raise DyveError(f"density {density} keeps no weight of {rows.shape[1]} ({method})")
    # a stable sort of -|w|: equal magnitudes stay in index order, so the lower index is kept
    order = np.argsort(-np.abs(rows), axis=1, kind="stable")[:, :keep]
    mask = np.zeros(rows.shape, bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask.reshape(weight.shape)


def prune_weight(weight: np.ndarray, density: float, method: str) -> np.ndarray:
    """``weight`` with what ``method`` drops at ``density`` set to 0 (a copy; density 1: equal)."""
    return np.where(prune_mask(weight, density, method), weight, np.zeros((), weight.dtype))


def candidate_densities(layer: Layer, method: str, below: float) -> list[float]:
    """The densities under ``below`` that keep at least one weight (per neuron for fan-in) of
    ``layer``, most aggressive first."""
    w = layer.weight
    size = w.size if method == "unstructured" else w.size // w.shape[0]
    return [d for d in DENSITIES if d < below and kept_count(size, d) >= 1]


class Pruner:
    """The greedy search of a density per conv / fully-connected layer, through a
    :class:`Calibrator` on the same plan whose weights it replaces between trials."""

    def __init__(self, plan: Plan, images: np.ndarray, labels: np.ndarray, method: str, budget: float,
                 margin: float = 0.0, min_share: float = 0.01, threads: int = 1, criterion: str = "disagree",
                 z: float = 1.0, holdout: float = 0.0, changed_weight: float = 0.5,
                 early_reject: bool = True, group: str = "layer") -> None:
        if method not in METHODS:
            raise DyveError(f"--method: unknown method {method!r} (known: {', '.join(METHODS)})")
        self.plan, self.method = plan, method
        self.cal = Calibrator(plan, images, labels, budget, margin, min_share, threads, knobs_allowed=(),
                              criterion=criterion, z=z, holdout=holdout, early_reject=early_reject,
                              changed_weight=changed_weight, group=group)
        self.budget, self.margin, self.min_share = budget, margin, min_share
        self.original = {layer.name: layer.weight for layer in plan.compute_layers()}
        self.density = {name: 1.0 for name in self.original}
        self.applied: dict[str, float] = {}  # the density each layer's weights are pruned at now
        self.apply(self.density)  # counted from the weights, as every setting after (not from metadata)
        self.dense_nonzero_macs = {layer.name: layer.nonzero_macs for layer in plan.compute_layers()}
        self.dense_nonzero_ops = plan.nonzero_ops
        self.accepted: list[dict[str, float]] = []  # the densities after each accepted change
        self.backed_off = 0
        self.current: Trial | None = None  # the run of the densities accepted so far

    # -- the network under a setting ------------------------------------------------------

    def apply(self, density: dict[str, float]) -> None:
        """Set every layer's weights to its original ones pruned at ``density`` (1: the original
        array itself) and recount its non-zero MACs (the plan's own count). Layers already at
        their density are left as they are."""
        for layer in self.plan.compute_layers():
            d = density[layer.name]
            if self.applied.get(layer.name) == d:
                continue
            original = self.original[layer.name]
            layer.weight = original if d >= 1 else np.ascontiguousarray(prune_weight(original, d, self.method))
            layer.nonzero_macs = OP_RULES[layer.op].count(layer, {})[2]
            self.applied[layer.name] = d

    def layers_by_share(self) -> list[tuple[str, float]]:
        """(layer, share of the dense non-zero ops) of the layers worth pruning, largest first."""
        total = self.dense_nonzero_ops or 1
        rows = [(name, 2 * macs / total) for name, macs in self.dense_nonzero_macs.items()
                if 2 * macs / total >= self.min_share]
        return sorted(rows, key=lambda r: -r[1])

    # -- search ---------------------------------------------------------------------------

    def run(self, passes: int = 2) -> dict[str, float]:
        """The greedy search, then the held-out check; returns the chosen density per layer (the
        plan is left pruned at it)."""
        start = time.monotonic()
        self.apply(dict.fromkeys(self.original, 1.0))  # the reference is the unpruned network
        dense = self.cal.run_dense()
        self.apply(self.density)
        held = f", {len(self.cal.hold_images)} held out" if len(self.cal.hold_images) else ""
        log(f"dense top-1 on {len(self.cal.images)} calibration images{held}: {dense.top1:.2f} %; "
            f"{self.method}, budget {self.budget} pt, margin {self.margin} pt, criterion {self.cal.criterion}")
        self.current = dense
        steps, limit = shape_groups(self.plan, self.layers_by_share(), self.cal.group), self.budget - self.margin
        for pass_no in range(1, passes + 1):
            for names, allowance in greedy_allowances(steps, limit, pass_no):
                self.search_layer(names, allowance, pass_no)
            log(f"pass {pass_no} done: calib top-1 {self.current.top1:.2f} % (loss "
                f"{dense.top1 - self.current.top1:.2f} pt), non-zero ops "
                f"{self.dense_nonzero_ops / self.plan.nonzero_ops:.3f}x fewer, {time.monotonic() - start:.0f} s")
        if len(self.cal.hold_images):
            self.check_holdout(limit)
        return dict(self.density)

    def search_layer(self, names: tuple[str, ...], allowance: float, pass_no: int) -> None:
        """Binary search for the smallest density of the layers ``names`` (one layer, or a shape
        group at one density) whose risk stays within ``allowance`` and which lowers the non-zero
        ops (the risk grows as the density falls)."""
        index = self.cal.index_of[names[0]]
        candidates = sorted(set.intersection(*(set(candidate_densities(
            self.plan.layers[self.cal.index_of[n]], self.method, self.density[n])) for n in names)))
        if not candidates:
            return
        label = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]} ({len(names)} layers)"
        cache = self.cal.cache_inputs(index, KnobConfig())  # under the densities accepted so far
        current_ops = self.plan.nonzero_ops
        lo, hi, best = 0, len(candidates) - 1, None
        try:
            while lo <= hi:
                mid = (lo + hi) // 2
                d = candidates[mid]
                self.apply({**self.density, **dict.fromkeys(names, d)})
                ops = self.plan.nonzero_ops
                trial = self.cal.trial_forked(index, cache, KnobConfig(), 0.0,
                                              allowance=allowance if self.cal.early_reject else None)
                risk, lost, gained, _ = self.cal.risk(trial)
                ok = not trial.partial and risk <= allowance + 1e-9 and ops < current_ops
                early = f" (stopped after {len(trial.correct)} images)" if trial.partial else ""
                log(f"pass {pass_no} {label} density {d:g}: top-1 {trial.top1:.2f} %{early} ({lost} lost, "
                    f"{gained} gained, {self.cal.criterion} {risk:.2f} pt of {allowance:.2f}), non-zero ops "
                    f"{self.dense_nonzero_ops / ops:.3f}x fewer -> {'candidate' if ok else 'rejected'}")
                if ok:
                    best, hi = (d, trial), mid - 1
                else:
                    lo = mid + 1
        finally:
            if best is not None:
                self.density.update(dict.fromkeys(names, best[0]))
                self.accepted.append(dict(self.density))
                self.current = best[1]
            self.apply(self.density)

    def check_holdout(self, limit: float) -> None:
        """Undo the latest accepted densities until the setting stays within ``limit`` on the
        held-out images (:meth:`Calibrator.holdout_back_off`)."""
        cal = self.cal
        ones = {name: 1.0 for name in self.original}

        def run_setting(density: dict[str, float]) -> Trial:
            self.apply(density)
            return cal.whole_run(cal.hold_images, cal.hold_labels, KnobConfig())

        dense = run_setting(ones)
        best = cal.holdout_back_off(len(self.accepted), lambda i: run_setting(self.accepted[i]), dense, limit)
        self.backed_off = len(self.accepted) - 1 - best
        self.density = dict(self.accepted[best]) if best >= 0 else ones
        self.apply(self.density)

    # -- results --------------------------------------------------------------------------

    def summary(self, model: Path, data: str) -> dict[str, Any]:
        """Per-layer densities and non-zero MACs, the non-zero ops, and the top-1 loss on the
        calibration images (held-out ones excluded) with its paired bootstrap 95 % interval,
        from a run of the pruned network as chosen."""
        cal = self.cal
        final = cal.whole_run(cal.images, cal.labels, KnobConfig())
        low, high = paired_bootstrap(cal.dense.correct, final.correct)
        layers = []
        for layer in self.plan.compute_layers():
            layers.append({"layer": layer.name, "density": self.density[layer.name],
                           "weights": int(layer.weight.size), "nonzero_weights": int(np.count_nonzero(layer.weight)),
                           "nonzero_macs_dense": int(self.dense_nonzero_macs[layer.name]),
                           "nonzero_macs": int(layer.nonzero_macs)})
        return {
            "model": str(model), "method": self.method, "data": data, "n": len(cal.images),
            "held_out": len(cal.hold_images), "backed_off": self.backed_off,
            "budget_pt": self.budget, "margin_pt": self.margin, "criterion": cal.criterion,
            "top1_dense": cal.dense.top1, "top1_pruned": final.top1,
            "top1_loss_pt": cal.dense.top1 - final.top1, "loss_ci_low": low, "loss_ci_high": high,
            "nonzero_ops_dense": int(self.dense_nonzero_ops), "nonzero_ops_pruned": int(self.plan.nonzero_ops),
            "nonzero_ops_reduction": self.dense_nonzero_ops / max(self.plan.nonzero_ops, 1),
            "layers": layers,
        }


def log(message: str) -> None:
    print(f"prune: {message}", file=sys.stderr, flush=True)


def write_pruned_model(source: Path, plan: Plan, out: Path) -> None:
    """Write ``source`` with each conv / fully-connected weight zeroed where ``plan``'s (pruned)
    weight is 0, the rest bit for bit, and the non-zero counts in its metadata; atomically."""
    model = load_onnx(source)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {node.name or node.output[0]: node for node in model.graph.node}
    weight_users: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            weight_users[node.input[1]] = weight_users.get(node.input[1], 0) + 1
    counts = {}
    for layer in plan.compute_layers():
        node = nodes.get(layer.name)
        name = node.input[1] if node is not None and len(node.input) > 1 else ""
        if name not in inits or weight_users.get(name, 0) != 1:
            raise DyveError(f"{source}: the weights of {layer.name} are not an initializer of its own; "
                            f"prune writes only those")
        array = numpy_helper.to_array(inits[name])
        keep = layer.weight != 0
        if layer.op == Op.FC and (node.op_type == "MatMul" or not _gemm_trans_b(node)):
            keep = keep.T  # the plan holds (outputs, inputs); the file (inputs, outputs)
        pruned = np.where(keep.reshape(array.shape), array, np.zeros((), array.dtype))
        inits[name].CopyFrom(numpy_helper.from_array(pruned, name))
        counts[layer.name] = int(np.count_nonzero(layer.weight))
    set_metadata(model, {NONZERO_KEY: json.dumps(counts, sort_keys=True)})
    data = model.SerializeToString()
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)


def _gemm_trans_b(node) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)


def cmd_prune(args: argparse.Namespace) -> int:
    if args.method not in METHODS:  # argparse checks it too; a direct call must not get past
        raise DyveError(f"--method: unknown method {args.method!r} (known: {', '.join(METHODS)})")
    if args.budget < 0 or args.margin < 0 or args.margin > args.budget:
        raise DyveError(f"--budget {args.budget}, --margin {args.margin}: need 0 <= margin <= budget")
    if args.threads < 1:
        raise DyveError(f"--threads: at least 1, got {args.threads}")
    plan = load_plan(args.model)
    if parse_spec(args.data)[2] == "test":
        raise DyveError(f"{args.data}: pruning never uses the test split; use the calib split")
    summary_path = args.summary or args.output.with_suffix(".yaml")
    if summary_path.resolve() == args.output.resolve() or args.output.resolve() == args.model.resolve():
        raise DyveError(f"{args.output}: the pruned model must not overwrite the input model or its summary")
    dataset = open_dataset(plan, args.data, args.limit, args.mirror, args.mix)
    images = dataset.images(0, len(dataset))
    pruner = Pruner(plan, images, np.asarray(dataset.labels), args.method, args.budget, args.margin,
                    args.min_share, args.threads, criterion=args.criterion, z=args.z, holdout=args.holdout,
                    changed_weight=args.changed_weight, group=args.group)
    pruner.run(passes=args.passes)
    summary = pruner.summary(args.model, args.data)
    write_pruned_model(args.model, plan, args.output)
    if summary_path.suffix == ".json":
        write_json_atomic(summary_path, summary)
    else:
        write_text_atomic(summary_path, yaml.safe_dump(summary, sort_keys=False))
    print(f"{args.method}: calibration top-1 {summary['top1_pruned']:.2f} % (dense {summary['top1_dense']:.2f} %, "
          f"loss {summary['top1_loss_pt']:.2f} pt [{summary['loss_ci_low']:.2f}, {summary['loss_ci_high']:.2f}]), "
          f"non-zero ops {summary['nonzero_ops_reduction']:.3f}x fewer; model written to {args.output}, "
          f"summary to {summary_path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``prune``."""
    p = subparsers.add_parser("prune", help="static magnitude pruning under the same budget (comparison, "
                                            "not DyVEDeep)")
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    add_data_arguments(p, calibration=True)
    p.add_argument("--method", choices=METHODS, required=True,
                   help="unstructured (per layer) or fan-in (the same number of inputs kept per output neuron)")
    p.add_argument("--budget", type=float, default=0.5, help="top-1 loss budget, percentage points (default 0.5)")
    p.add_argument("--margin", type=float, default=0.0, help="kept in reserve from the budget (default 0 pt)")
    p.add_argument("--min-share", type=float, default=0.01, help="skip layers under this share of the ops")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--criterion", choices=CRITERIA, default="disagree",
                   help="acceptance statistic, as for calibrate (default disagree)")
    p.add_argument("--z", type=float, default=1.0, help="standard errors added by lost and ucb (default 1)")
    p.add_argument("--changed-weight", type=float, default=0.5,
                   help="criterion disagree: points of loss counted per point of images changed (default 0.5)")
    p.add_argument("--group", choices=GROUPINGS, default="layer",
                   help="steps of the greedy search: each layer alone (default), or shape: the layers of "
                        "one shape at one density (as calibrate --group)")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of the calibration images held out to check the chosen densities (default 0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx")
    p.add_argument("--summary", type=Path, default=None, metavar="SUMMARY.yaml",
                   help="per-layer densities, non-zero ops and loss (.json or YAML; default OUT.yaml)")
    p.set_defaults(func=cmd_prune)
