"""``dyvedeep gates``: place decision gates (docs/gates.md; beyond the specification), train them
with the backbone frozen, and choose their thresholds under the accuracy budget.

- placement (default): after each stage of a ResNet (the last residual block of each feature-map
  shape, the last stage left out: the network's own head follows it), else after each pooling
  that makes the map smaller and is not global; ``--after`` names the layers instead;
- features: the global average of the layer's output, under the knobs of ``--knobs`` if given
  (the gates then decide first, the knobs act in the layers that run);
- training: the first ``--train-fraction`` of the calibration images, one scikit-learn linear
  classifier per gate (``--loss log``: LogisticRegression; ``hinge``: SGDClassifier) on
  standardised features, the standardisation folded into the gate's weights;
- thresholds: on the other calibration images, greedily (each step the threshold change that
  saves the most ops per point of risk), accepted while the risk of the final top-1 against the
  dense network stays within the budget. The risk (``--risk``): ``changed-ucb`` (default,
  labels unused) the share of images whose top-1 differs from the dense network's plus ``--z``
  (2) binomial standard errors; ``criterion`` the criterion of ``dyvedeep calibrate``
  (:func:`dyvedeep.calibrate.risk_pt`; ``disagree`` with weight 0.5 by default, the rule before
  2026-12-04, which exceeds the budget on the test split: docs/notes/2026-12-04-gates.md). A
  gate that never exits is left out of the knob file.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .calibrate import CRITERIA, risk_pt
from .cli_support import Progress, add_data_arguments, load_plan, open_dataset
from .datasets import parse_spec
from .engine import Engine, set_blas_threads
from .errors import DyveError
from .gates import Gate, pooled_features, run_segments, save_gate_weights, sidecar_path
from .knobs import GATE_CONFIDENCES, GateSetting, GateSettings, KnobConfig, load_knobs
from .plan import Op, Plan

LOSSES = ("log", "hinge")
#: The threshold search's risk (``--risk``; module docstring).
RISKS = ("changed-ucb", "criterion")
#: ``--z`` by risk: standard errors of the changed share (changed-ucb), as dyvedeep calibrate's (criterion).
DEFAULT_Z = {"changed-ucb": 2.0, "criterion": 1.0}
#: Quantiles of a gate's confidence (on every selection image) tried as its thresholds.
THRESHOLD_QUANTILES = tuple(np.linspace(0.0, 0.99, 34))


def log(message: str) -> None:
    print(f"gates: {message}", file=sys.stderr, flush=True)


def default_gate_layers(plan: Plan) -> list[str]:
    """After each stage of a ResNet (a net with residual additions), else after each pooling that
    makes the map smaller (not global) and has weighted layers after it (see the module docstring)."""
    produced = {layer.output for layer in plan.layers}
    adds = [i for i, layer in enumerate(plan.layers)  # residual additions: two different tensors added
            if layer.op == Op.ELTWISE and layer.attrs.get("kind") in ("add", "sum")
            and len({t for t in layer.inputs if t in produced}) >= 2]
    if adds:
        blocks = []
        for i in adds:  # a block's output: the addition, or the ReLU that follows it
            nxt = plan.layers[i + 1] if i + 1 < len(plan.layers) else None
            blocks.append(i + 1 if nxt is not None and nxt.op == Op.RELU and nxt.inputs == [plan.layers[i].output]
                          else i)
        ends = [b for b, after in zip(blocks, blocks[1:]) if plan.layers[b].out_shape != plan.layers[after].out_shape]
        return [plan.layers[i].name for i in ends]
    last_compute = max((i for i, layer in enumerate(plan.layers) if layer.is_compute), default=-1)
    # a pooling that keeps the map's size (the average inside a WITHIN_CHANNEL LRN) is no stage
    return [layer.name for i, layer in enumerate(plan.layers)
            if layer.op in (Op.MAXPOOL, Op.AVGPOOL) and i < last_compute
            and layer.out_shape[1:] != layer.in_shapes[0][1:]]


@dataclass
class Traces:
    """Per calibration image: the pooled features at each gate layer, the ops done up to each
    gate layer and in all, and the network's top-1 (with the backbone's knobs)."""

    features: list[np.ndarray]  # per gate: (n, channels)
    ops_at: np.ndarray  # (n, gates)
    ops_total: np.ndarray  # (n,)
    pred: np.ndarray  # (n,)


def trace_images(engine: Engine, images: np.ndarray, indices: list[int]) -> Traces:
    """Run every image to the end, recording the features and ops at each gate layer."""
    n, plan = len(images), engine.plan
    features = [np.empty((n, plan.layers[i].out_shape[0])) for i in indices]
    ops_at, ops_total, pred = np.zeros((n, len(indices))), np.zeros(n), np.zeros(n, np.int64)
    progress = Progress("gates: features", n)
    for k, image in enumerate(images):
        before = engine.counter.total("ops")
        for g, (stop, values) in enumerate(run_segments(engine, image, indices)):
            done = engine.counter.total("ops") - before
            if stop is None:
                ops_total[k] = done
                pred[k] = int(values[plan.output_name].reshape(-1).argmax())
            else:
                ops_at[k, g] = done
                features[g][k] = pooled_features(values[plan.layers[stop].output])
        progress.update(k + 1)
    return Traces(features, ops_at, ops_total, pred)


def train_gate(x: np.ndarray, y: np.ndarray, classes: int, loss: str, seed: int = 0,
               source: str = "calibration data") -> tuple[np.ndarray, np.ndarray]:
    """One gate's (weight (classes, channels), bias) from features ``x`` and labels ``y``: a
    scikit-learn linear classifier on standardised features, the standardisation folded in."""
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.preprocessing import StandardScaler

    present = np.unique(y)
    if len(present) != classes:
        raise DyveError(f"{source}: the gates' training images hold {len(present)} of the {classes} classes; "
                        "use more calibration images")
    scaler = StandardScaler().fit(x)
    if loss == "log":
        model = LogisticRegression(max_iter=2000)
    else:
        model = SGDClassifier(loss="hinge", alpha=1e-4, max_iter=2000, tol=1e-5, random_state=seed)
    model.fit(scaler.transform(x), y)
    coef = np.zeros((classes, x.shape[1]))
    intercept = np.zeros(classes)
    coef[model.classes_] = model.coef_
    intercept[model.classes_] = model.intercept_
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    weight = coef / scale
    return weight, intercept - weight @ scaler.mean_


@dataclass
class GateChoice:
    """The thresholds chosen and what they give on the selection images."""

    thresholds: list[float]  # inf: the gate is left out
    ops: float  # mean per image, gates included
    risk: float
    top1: float


class ThresholdSearch:
    """Greedy threshold search on precomputed gate decisions (no network run per candidate)."""

    def __init__(self, conf: np.ndarray, gate_pred: np.ndarray, traces: Traces, gate_ops: list[int],
                 dense_pred: np.ndarray, labels: np.ndarray, criterion: str, z: float, changed_weight: float,
                 risk: str = "changed-ucb") -> None:
        if risk not in RISKS:
            raise DyveError(f"--risk: one of {', '.join(RISKS)}, got {risk!r}")
        self.conf, self.gate_pred, self.traces = conf, gate_pred, traces
        self.gate_ops = np.asarray(gate_ops, np.float64)
        self.dense_pred, self.labels = dense_pred, labels
        self.dense_correct = dense_pred == labels
        self.criterion, self.z, self.changed_weight, self.risk = criterion, z, changed_weight, risk
        self.risk_name = "changed + %g SE" % z if risk == "changed-ucb" else criterion

    def risk_of(self, pred: np.ndarray, correct: np.ndarray) -> float:
        """The risk (pt) of the final top-1 ``pred``: with ``changed-ucb``, calibrate's ``lost``
        statistic against the dense network's top-1 in place of the labels (the share of images
        changed plus z binomial standard errors); else calibrate's criterion."""
        if self.risk == "changed-ucb":
            return risk_pt("lost", self.z, np.ones_like(self.dense_correct), self.dense_pred, pred == self.dense_pred,
                           pred)[0]
        return risk_pt(self.criterion, self.z, self.dense_correct, self.dense_pred, correct, pred,
                       self.changed_weight)[0]

    def outcome(self, thresholds: list[float]) -> tuple[float, float, float]:
        """(mean ops per image, risk pt, top-1 %) with ``thresholds``."""
        n, gates = self.conf.shape
        on = np.isfinite(np.asarray(thresholds))
        exits = (self.conf >= np.asarray(thresholds)[None, :]) & on[None, :]
        first = np.where(exits.any(axis=1), exits.argmax(axis=1), gates)
        paid = np.cumsum(self.gate_ops * on)  # gate ops up to and including each gate
        rows = np.arange(n)
        clipped = np.minimum(first, gates - 1)
        ops = np.where(first < gates, self.traces.ops_at[rows, clipped] + paid[clipped],
                       self.traces.ops_total + (paid[-1] if gates else 0.0))
        pred = np.where(first < gates, self.gate_pred[rows, clipped], self.traces.pred)
        correct = pred == self.labels
        return float(ops.mean()), self.risk_of(pred, correct), float(correct.mean() * 100)

    def candidates(self, g: int, thresholds: list[float]) -> list[float]:
        """Thresholds of gate ``g`` below its current one: quantiles of its confidence."""
        values = np.unique(np.quantile(self.conf[:, g], THRESHOLD_QUANTILES))
        return [float(v) for v in values if v < thresholds[g]]

    def run(self, budget: float) -> GateChoice:
        gates = self.conf.shape[1]
        thresholds = [np.inf] * gates
        ops, risk, top1 = self.outcome(thresholds)
        step = 0
        while True:
            best = None  # (score, saved, g, t, outcome)
            for g in range(gates):
                for t in self.candidates(g, thresholds):
                    trial = list(thresholds)
                    trial[g] = t
                    t_ops, t_risk, t_top1 = self.outcome(trial)
                    if t_risk > budget + 1e-9 or t_ops >= ops:
                        continue
                    saved = ops - t_ops
                    score = saved / max(t_risk - risk, 1e-6)
                    if best is None or (score, saved) > (best[0], best[1]):
                        best = (score, saved, g, t, (t_ops, t_risk, t_top1))
            if best is None:
                break
            _, _, g, t, (ops, risk, top1) = best
            thresholds[g] = t
            step += 1
            log(f"step {step}: gate {g + 1} threshold {t:.4g}: ops {self.traces.ops_total.mean() / ops:.3f}x fewer, "
                f"{self.risk_name} {risk:.2f} pt, top-1 {top1:.2f} %")
        return GateChoice(thresholds, ops, risk, top1)


def gate_decisions(gates: list[Gate], features: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per image and gate: the gate's confidence and predicted class (the runtime's own code)."""
    n = len(features[0]) if features else 0
    conf, pred = np.zeros((n, len(gates))), np.zeros((n, len(gates)), np.int64)
    for g, gate in enumerate(gates):
        for k in range(n):
            probs, conf[k, g], _ = gate.decide_pooled(features[g][k])
            pred[k, g] = int(probs.argmax())
    return conf, pred


@dataclass
class FittedGates:
    """The outcome of :func:`fit_gates`: every gate trained, the thresholds chosen (inf: left
    out) and what they give on the selection images."""

    gates: list[Gate]  # in layer order, thresholds as chosen
    choice: GateChoice
    ops_without_gates: float  # mean per image on the selection images (the backbone's knobs only)
    selection: slice  # the calibration images the thresholds were chosen on

    def kept(self) -> list[Gate]:
        return [g for g in self.gates if np.isfinite(g.threshold)]

    def config(self, backbone: KnobConfig, knob_file: Path) -> KnobConfig:
        """``backbone`` with the kept gates; writes their weights beside ``knob_file``."""
        config = backbone.copy()
        kept = self.kept()
        if kept:
            npz = sidecar_path(knob_file)
            digest = save_gate_weights(npz, {g.layer: (g.weight, g.bias) for g in kept})
            config.gates = GateSettings(npz.name, digest, [GateSetting(g.layer, g.threshold, g.confidence)
                                                           for g in kept], knob_file)
        return config


def fit_gates(plan: Plan, images: np.ndarray, labels: np.ndarray, layer_names: list[str], backbone: KnobConfig,
              budget: float, loss: str = "log", confidence: str = "softmax", train_fraction: float = 0.5,
              criterion: str = "disagree", z: float | None = None, changed_weight: float = 0.5, threads: int = 1,
              source: str = "calibration data", risk: str = "changed-ucb") -> FittedGates:
    """Train a gate after each of ``layer_names`` on the first ``train_fraction`` of the images and
    choose the thresholds on the rest (see the module docstring)."""
    n = len(images)
    n_train = int(round(train_fraction * n))
    if n_train < 1 or n - n_train < 1:
        raise DyveError(f"{source}: {n} calibration images; too few to train and select gates")
    index = {layer.name: i for i, layer in enumerate(plan.layers)}
    for name in layer_names:
        if name not in index or len(plan.layers[index[name]].out_shape) != 3:
            raise DyveError(f"--after: {name!r} is not a layer of {plan.path} with a (C, H, W) output")
    if not layer_names:
        raise DyveError(f"{plan.path}: no layer to place a gate after (no pooling, no ResNet stage); use --after")
    layer_names = sorted(set(layer_names), key=index.get)
    indices = [index[name] for name in layer_names]
    classes = int(np.prod(plan.output_shape))
    labels = np.asarray(labels, np.int64)
    set_blas_threads(threads)
    log(f"{n} calibration images ({n_train} to train, {n - n_train} to select); gates after {', '.join(layer_names)}")
    traces = trace_images(Engine(plan, backbone, threads, segment_ends=indices), images, indices)
    if backbone.layers:
        dense_pred = Engine(plan, None, threads).run(images).reshape(n, -1).argmax(axis=1)
    else:
        dense_pred = traces.pred
    gates = []
    for name, i, feats in zip(layer_names, indices, traces.features):
        t0 = time.monotonic()
        w, b = train_gate(feats[:n_train], labels[:n_train], classes, loss, source=source)
        gates.append(Gate(name, i, w, b, np.inf, confidence))
        train_acc = float(((feats[:n_train] @ w.T + b).argmax(axis=1) == labels[:n_train]).mean() * 100)
        log(f"gate after {name}: trained ({loss} loss) in {time.monotonic() - t0:.1f} s, "
            f"training top-1 {train_acc:.1f} %")
    sel = slice(n_train, n)
    conf, gate_pred = gate_decisions(gates, [f[sel] for f in traces.features])
    for g, name in enumerate(layer_names):
        agree = float((gate_pred[:, g] == dense_pred[sel]).mean() * 100)
        log(f"gate after {name}: selection top-1 {float((gate_pred[:, g] == labels[sel]).mean() * 100):.1f} %, "
            f"agrees with the network on {agree:.1f} %")
    sel_traces = Traces([f[sel] for f in traces.features], traces.ops_at[sel], traces.ops_total[sel], traces.pred[sel])
    search = ThresholdSearch(conf, gate_pred, sel_traces, [g.costs(plan)["ops"] for g in gates], dense_pred[sel],
                             labels[sel], criterion, DEFAULT_Z.get(risk, 1.0) if z is None else z, changed_weight, risk)
    choice = search.run(budget)
    for gate, t in zip(gates, choice.thresholds):
        gate.threshold = t
    return FittedGates(gates, choice, float(traces.ops_total[sel].mean()), sel)


def cmd_gates(args: argparse.Namespace) -> int:
    start_time = time.monotonic()
    plan = load_plan(args.model)
    if parse_spec(args.data)[2] == "test":
        raise DyveError(f"{args.data}: calibration never uses the test split; use the calib split")
    if args.risk != "criterion" and (args.criterion is not None or args.changed_weight is not None):
        raise DyveError(f"--criterion and --changed-weight act with --risk criterion, not --risk {args.risk}")
    if not 0 < args.train_fraction < 1:
        raise DyveError(f"--train-fraction: a fraction in (0, 1), got {args.train_fraction}")
    backbone = load_knobs(args.knobs, plan) if args.knobs else KnobConfig(model=plan.path.name)
    if backbone.gates is not None:
        raise DyveError(f"{args.knobs}: already has decision gates; give a knob file without them")
    dataset = open_dataset(plan, args.data, args.limit, args.mirror, args.mix)
    layer_names = [l for l in args.after.split(",") if l] if args.after else default_gate_layers(plan)
    if args.knobs:
        log(f"the other knobs from {args.knobs}")
    fitted = fit_gates(plan, dataset.images(0, len(dataset)), np.asarray(dataset.labels), layer_names, backbone,
                       args.budget - args.margin, args.loss, args.confidence, args.train_fraction,
                       args.criterion or "disagree", args.z, 0.5 if args.changed_weight is None else args.changed_weight,
                       args.threads, source=args.data, risk=args.risk)
    fitted.config(backbone, args.output).save(args.output)
    choice = fitted.choice
    print(f"{len(fitted.kept())} of {len(fitted.gates)} gate(s) kept; selection images: ops "
          f"{fitted.ops_without_gates / choice.ops:.3f}x fewer than without gates, risk {choice.risk:.2f} pt, "
          f"top-1 {choice.top1:.2f} %; knobs written to {args.output} ({time.monotonic() - start_time:.0f} s)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``gates``."""
    p = subparsers.add_parser("gates", help="decision gates: place, train and calibrate them under a budget")
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    add_data_arguments(p, calibration=True)
    p.add_argument("--budget", type=float, default=0.5, help="top-1 loss budget, percentage points (default 0.5)")
    p.add_argument("--margin", type=float, default=0.0, help="kept in reserve from the budget (default 0 pt)")
    p.add_argument("--knobs", type=Path, default=None, metavar="EXISTING.yaml",
                   help="the other knobs to run with (the gates decide first); kept in the output")
    p.add_argument("--after", default="", metavar="LAYER,...",
                   help="the layers to place gates after (default: each ResNet stage, else each pooling)")
    p.add_argument("--loss", choices=LOSSES, default="log",
                   help="log: LogisticRegression (cross-entropy); hinge: SGDClassifier (default log)")
    p.add_argument("--confidence", choices=GATE_CONFIDENCES, default="softmax",
                   help="softmax: the largest probability; margin: the top two's difference (default softmax)")
    p.add_argument("--train-fraction", type=float, default=0.5,
                   help="the first part of the calibration images that trains the gates (default 0.5)")
    p.add_argument("--risk", choices=RISKS, default="changed-ucb",
                   help="changed-ucb: the share of images whose top-1 differs from the dense network's plus --z "
                        "standard errors (labels unused); criterion: dyvedeep calibrate's --criterion (the rule "
                        "before 2026-12-04) (default changed-ucb)")
    p.add_argument("--criterion", choices=CRITERIA, default=None,
                   help="with --risk criterion: as dyvedeep calibrate's (default disagree)")
    p.add_argument("--z", type=float, default=None,
                   help="standard errors: default 2 with --risk changed-ucb, 1 (as dyvedeep calibrate's) with criterion")
    p.add_argument("--changed-weight", type=float, default=None,
                   help="with --risk criterion: as dyvedeep calibrate's (default 0.5)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="KNOBS.yaml")
    p.set_defaults(func=cmd_gates)
