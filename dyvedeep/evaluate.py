"""Evaluate: ``dyvedeep verify`` (our dense engine against onnxruntime, image by image) and
``dyvedeep eval`` (top-1 / top-5, op counts dense and DyVEDeep, the top-1 loss with a paired
bootstrap 95 % interval, and the per-layer, per-knob breakdown)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .cli_support import (Progress, add_data_arguments, load_plan, onnxruntime_outputs, onnxruntime_session,
                          open_dataset, platform_info)
from .engine import Engine
from .errors import DyveError
from .io_utils import write_json_atomic
from .knobs import KNOB_NAMES, KnobConfig, load_knobs
from .metadata_keys import NONZERO_KEY
from .plan import Plan

#: verify's tolerance: per image, max |ours - onnxruntime| <= RELATIVE_TOLERANCE * max |onnxruntime|.
RELATIVE_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- shared helpers


def run_engine(engine: Engine, dataset, label: str, batch_size: int = 64) -> np.ndarray:
    """Outputs of ``engine`` on every image of ``dataset`` (with progress)."""
    outputs = []
    progress = Progress(label, len(dataset))
    done = 0
    for x, _ in dataset.batches(batch_size):
        outputs.append(engine.run(x))
        done += len(x)
        progress.update(done)
    return np.concatenate(outputs) if outputs else np.zeros((0,) + tuple(engine.plan.output_shape), np.float32)


def topk_correct(outputs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per image, whether the label is among the k highest scores (ties broken by index)."""
    order = np.argsort(-outputs, axis=1, kind="stable")[:, :k]
    return (order == labels[:, None]).any(axis=1)


def paired_bootstrap(dense_ok: np.ndarray, knob_ok: np.ndarray, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the top-1 loss (dense - DyVEDeep, percentage points) by resampling images."""
    n = len(dense_ok)
    if n == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    diff = dense_ok.astype(np.float64) - knob_ok.astype(np.float64)
    idx = rng.integers(0, n, size=(rounds, n))
    losses = diff[idx].mean(axis=1) * 100.0
    return float(np.percentile(losses, 2.5)), float(np.percentile(losses, 97.5))


def layer_breakdown(plan: Plan, engine: Engine, n: int) -> list[dict[str, Any]]:
    """Per layer: dense and DyVEDeep ops per image (knob 'all'), and per enabled knob the ops
    the layer would cost with only that knob's savings and overhead."""
    rows = []
    c = engine.counter
    for layer in plan.layers:
        if layer.dense_ops == 0:
            continue
        ops = c.get(layer.name, "ops") / n
        rows.append({"layer": layer.name, "knob": "all", "ops_dense": layer.dense_ops, "ops_dyvedeep": ops})
        for knob in KNOB_NAMES:
            if engine.knobs.get(layer.name, knob) is None:
                continue
            saved = c.get(layer.name, f"saved_{knob}") / n
            overhead = c.get(layer.name, f"overhead_{knob}") / n
            rows.append({"layer": layer.name, "knob": knob, "ops_dense": layer.dense_ops,
                         "ops_dyvedeep": layer.dense_ops - saved + overhead,
                         "saved": saved, "overhead": overhead})
    return rows


# ----------------------------------------------------------------------------- verify


@dataclass
class VerifyResult:
    """Per-image comparison of our dense engine with onnxruntime."""

    n: int
    max_abs: float
    max_rel: float
    failures: list[int]
    top1_disagreements: list[tuple[int, float]]  # (image, onnxruntime's top-2 margin)

    @property
    def ok(self) -> bool:
        return not self.failures and all(margin <= 1e-4 for _, margin in self.top1_disagreements)


def verify(plan: Plan, batches: Iterable[np.ndarray], threads: int = 1, total: int | None = None) -> VerifyResult:
    """Compare the dense engine with onnxruntime on every image of ``batches``."""
    engine = Engine(plan, threads=threads)
    session = onnxruntime_session(plan.path, threads)
    input_name = session.get_inputs()[0].name
    n, max_abs, max_rel = 0, 0.0, 0.0
    failures: list[int] = []
    disagreements: list[tuple[int, float]] = []
    progress = Progress("verify", total or 0)
    for x in batches:
        ours = engine.run(x)
        ref = onnxruntime_outputs(session, input_name, x, plan.path).reshape(ours.shape)
        if not np.isfinite(ref).all():
            raise DyveError(f"{plan.path}: onnxruntime's output holds NaN or Inf (image {n}); "
                            "nothing to verify against", exit_code=1)
        for i in range(len(x)):
            diff = float(np.abs(ours[i] - ref[i]).max())
            scale = float(np.abs(ref[i]).max())
            rel = diff / scale if scale > 0 else diff
            # NaN first: max() keeps its first argument when the second is NaN
            max_abs, max_rel = max(diff, max_abs), max(rel, max_rel)
            if not diff <= RELATIVE_TOLERANCE * scale:  # a NaN difference fails too
                failures.append(n + i)
            flat_o, flat_r = ours[i].reshape(-1), ref[i].reshape(-1)
            if flat_o.argmax() != flat_r.argmax():
                top2 = np.sort(flat_r)[-2:]
                disagreements.append((n + i, float(top2[1] - top2[0]) / max(scale, 1e-30)))
        n += len(x)
        progress.update(n)
    return VerifyResult(n, max_abs, max_rel, failures, disagreements)


def cmd_verify(args: argparse.Namespace) -> int:
    plan = load_plan(args.model)
    dataset = open_dataset(plan, args.data, args.limit, args.mirror)
    result = verify(plan, (x for x, _ in dataset.batches(args.batch)), args.threads, len(dataset))
    print(f"images: {result.n}")
    print(f"max |ours - onnxruntime|: {result.max_abs:.3e}")
    print(f"max relative difference (per image, to max |onnxruntime|): {result.max_rel:.3e} "
          f"(tolerance {RELATIVE_TOLERANCE:.0e})")
    print(f"top-1 agreement: {result.n - len(result.top1_disagreements)}/{result.n}")
    for image, margin in result.top1_disagreements:
        print(f"  image {image}: top-1 differs; onnxruntime's top-2 margin {margin:.2e} (relative)")
    if result.failures:
        print(f"FAIL: {len(result.failures)} image(s) past the tolerance, first: {result.failures[:10]}")
    elif not result.ok:
        print("FAIL: a top-1 disagreement that is not a near-tie")
    else:
        print("OK")
    return 0 if result.ok else 1


# ----------------------------------------------------------------------------- eval


def evaluate(plan: Plan, dataset, knobs: KnobConfig | None, threads: int = 1) -> dict[str, Any]:
    """Accuracy and op counts, dense and with ``knobs``, on every image of ``dataset``."""
    labels = np.asarray(dataset.labels)
    dense = Engine(plan, threads=threads)
    out_dense = run_engine(dense, dataset, "eval dense")
    if knobs is not None and knobs.layers:
        dyve = Engine(plan, knobs, threads=threads)
        out_dyve = run_engine(dyve, dataset, "eval dyvedeep")
    else:
        dyve, out_dyve = dense, out_dense
    n = len(labels)
    flat_d, flat_k = out_dense.reshape(n, -1), out_dyve.reshape(n, -1)
    ok_dense, ok_dyve = topk_correct(flat_d, labels, 1), topk_correct(flat_k, labels, 1)
    low, high = paired_bootstrap(ok_dense, ok_dyve)
    nn = max(n, 1)
    ops_dense = dense.counter.total("ops") / nn
    ops_dyve = dyve.counter.total("ops") / nn
    nonzero = plan.nonzero_ops if NONZERO_KEY in plan.metadata else None
    return {
        "model": str(plan.path),
        "data": getattr(dataset, "name", "") + (":" + dataset.split if getattr(dataset, "split", "") else ""),
        "n": n,
        "top1_dense": float(ok_dense.mean() * 100) if n else 0.0,
        "top5_dense": float(topk_correct(flat_d, labels, 5).mean() * 100) if n else 0.0,
        "top1_dyvedeep": float(ok_dyve.mean() * 100) if n else 0.0,
        "top5_dyvedeep": float(topk_correct(flat_k, labels, 5).mean() * 100) if n else 0.0,
        "top1_loss_pt": float((ok_dense.mean() - ok_dyve.mean()) * 100) if n else 0.0,
        "loss_ci_low": low,
        "loss_ci_high": high,
        "top1_agreement": float((flat_d.argmax(1) == flat_k.argmax(1)).mean() * 100) if n else 100.0,
        "ops_dense": ops_dense,
        "ops_dyvedeep": ops_dyve,
        "macs_dense": dense.counter.total("macs") / nn,
        "macs_dyvedeep": dyve.counter.total("macs") / nn,
        "ops_reduction": ops_dense / ops_dyve if ops_dyve else 1.0,
        "nonzero_ops_dense": nonzero,
        "knob_ops": {k: {"saved": dyve.counter.total(f"saved_{k}") / nn,
                         "overhead": dyve.counter.total(f"overhead_{k}") / nn} for k in KNOB_NAMES},
        "layers": layer_breakdown(plan, dyve, nn),
        "platform": platform_info(),
    }


def cmd_eval(args: argparse.Namespace) -> int:
    plan = load_plan(args.model)
    knobs = load_knobs(args.knobs, plan) if args.knobs else None
    dataset = open_dataset(plan, args.data, args.limit, args.mirror)
    result = evaluate(plan, dataset, knobs, args.threads)
    print(f"n: {result['n']}")
    print(f"top-1: {result['top1_dense']:.2f} % dense, {result['top1_dyvedeep']:.2f} % DyVEDeep "
          f"(loss {result['top1_loss_pt']:+.2f} pt, 95 % CI [{result['loss_ci_low']:+.2f}, {result['loss_ci_high']:+.2f}])")
    print(f"top-5: {result['top5_dense']:.2f} % dense, {result['top5_dyvedeep']:.2f} % DyVEDeep")
    print(f"MACs per image: {result['macs_dense']:.4g} dense, {result['macs_dyvedeep']:.4g} DyVEDeep")
    print(f"scalar ops per image: {result['ops_dense']:.4g} dense, {result['ops_dyvedeep']:.4g} DyVEDeep "
          f"({result['ops_reduction']:.2f}x fewer)")
    if result["nonzero_ops_dense"] is not None:
        print(f"scalar ops per image on non-zero weights (dense): {result['nonzero_ops_dense']:.4g}")
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``verify`` and ``eval``."""
    p = subparsers.add_parser("verify", help="compare the dense engine with onnxruntime image by image")
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    add_data_arguments(p)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("eval", help="accuracy and op counts, dense and with a knob file")
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    add_data_arguments(p)
    p.add_argument("--knobs", type=Path, default=None, metavar="KNOBS.yaml")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, metavar="OUT.json")
    p.set_defaults(func=cmd_eval)
