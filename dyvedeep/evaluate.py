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
from .engine import COUNTER_FIELDS, Engine, OpCounter
from .engine.counting import fallback_costs
from .errors import DyveError
from .gates import GatedEngine, engine_for, exit_rates
from .io_utils import write_json_atomic
from .knobs import KNOB_NAMES, KnobConfig, load_knobs
from .metadata_keys import NONZERO_KEY
from .plan import Plan

#: verify's tolerance: per image, max |ours - onnxruntime| <= RELATIVE_TOLERANCE * max |onnxruntime|.
RELATIVE_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- shared helpers


def run_engine(engine: Engine | GatedEngine, dataset, label: str, batch_size: int = 64) -> np.ndarray:
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


def layer_breakdown(plan: Plan, knobs: KnobConfig | None, counter: OpCounter, n: int,
                    dense: OpCounter | None = None) -> list[dict[str, Any]]:
    """Per layer: dense and DyVEDeep ops per image (knob 'all'), and per enabled knob the ops
    the layer would cost with only that knob's savings and overhead (``counter``: totals over
    ``n`` images). The 'all' rows also give the MACs per image: dense, counted and executed
    (docs/ops.md, executed MACs) with the knobs, the part of those the layer's knob-free reruns
    executed (``fallback_macs_dyvedeep``), and executed by the dense engine (``dense``'s)."""
    rows = []
    c = counter
    for layer in plan.layers:
        if layer.dense_ops == 0:
            continue
        ops = c.get(layer.name, "ops") / n
        row = {"layer": layer.name, "knob": "all", "ops_dense": layer.dense_ops, "ops_dyvedeep": ops,
               "macs_dense": layer.dense_macs if layer.is_compute else 0,
               "macs_dyvedeep": c.get(layer.name, "macs") / n,
               "executed_macs_dyvedeep": c.get(layer.name, "executed_macs") / n,
               "fallback_macs_dyvedeep": (c.get(layer.name, "fallbacks") / n
                                          * fallback_costs(layer.dense_macs)["executed_macs"])}
        if dense is not None:
            row["executed_macs_dense"] = dense.get(layer.name, "executed_macs") / n
        rows.append(row)
        for knob in KNOB_NAMES:
            if knobs is None or knobs.get(layer.name, knob) is None:
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
# An evaluation keeps its per-image results (each image's label and top-5 classes, dense and
# DyVEDeep) and its exact op counts (integer totals per layer and counter field); the summary
# (top-1, ops per image, the bootstrap interval, ...) is computed from them. Results of image
# ranges evaluated apart (shards) merge into the results of the whole split, so a sharded
# evaluation gives the same summary, bit for bit, as one run.

#: The format tag of a per-image results file (``dyvedeep eval --per-image``).
PER_IMAGE_FORMAT = "dyvedeep-eval-images/1"
#: Classes kept per image: enough for top-1 and top-5.
TOP_CLASSES = 5


def image_ranges(total: int, size: int) -> list[tuple[int, int]]:
    """The shards of ``total`` images: [start, stop) ranges of ``size`` images (the last one
    shorter), in order; one empty range for an empty split."""
    if size < 1:
        raise DyveError(f"the shard size must be >= 1, not {size}")
    return [(a, min(a + size, total)) for a in range(0, total, size)] or [(0, 0)]


def parse_image_range(text: str, total: int) -> tuple[int, int]:
    """``START:STOP`` (STOP may be left out: to the end) checked against ``total`` images."""
    head, sep, tail = text.partition(":")
    try:
        start = int(head) if head else 0
        stop = int(tail) if tail else total
    except ValueError:
        raise DyveError(f"--images {text}: expected START:STOP (image indices)") from None
    if not sep or not 0 <= start <= stop <= total:
        raise DyveError(f"--images {text}: not a range START:STOP within the {total} images of the data")
    return start, stop


def run_range(engine: Engine | GatedEngine, dataset, start: int, stop: int, label: str, batch_size: int = 64) -> np.ndarray:
    """Outputs of ``engine`` on images ``start:stop`` of ``dataset``; the whole dataset goes
    through its batches (which fill the preprocessed cache), a part is read image range by range.
    Outputs that are not finite (weights whose products overflow) are refused: a top-1 of NaN
    scores is no result."""
    if (start, stop) == (0, len(dataset)):
        outputs = run_engine(engine, dataset, label, batch_size)
    else:
        parts = []
        progress = Progress(label, stop - start)
        for a in range(start, stop, batch_size):
            parts.append(engine.run(dataset.images(a, min(a + batch_size, stop))))
            progress.update(min(a + batch_size, stop) - start)
        outputs = np.concatenate(parts) if parts else np.zeros((0,) + tuple(engine.plan.output_shape), np.float32)
    bad = np.flatnonzero(~np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1))
    if len(bad):
        raise DyveError(f"{engine.plan.path}: the model's output holds NaN or Inf on {len(bad)} image(s), "
                        f"the first image {start + int(bad[0])} ({label})")
    return outputs


def knob_key(knobs: KnobConfig | None) -> str | None:
    """The knob settings as canonical JSON text (how per-image results name their knobs)."""
    import json

    return json.dumps(knobs.to_dict(), sort_keys=True) if knobs is not None else None


def _classes(outputs: np.ndarray) -> dict[str, list]:
    """Per image: the index of the highest score and the TOP_CLASSES best (ties by index)."""
    flat = outputs.reshape(len(outputs), -1)
    order = np.argsort(-flat, axis=1, kind="stable")[:, :TOP_CLASSES]
    return {"argmax": flat.argmax(1).tolist(), "top": order.tolist()}


def eval_images(plan: Plan, dataset, knobs: KnobConfig | None, threads: int = 1,
                start: int = 0, stop: int | None = None) -> dict[str, Any]:
    """Per-image results and op counts, dense and with ``knobs``, of images ``start:stop``."""
    total = len(dataset)
    stop = total if stop is None else stop
    dense = Engine(plan, threads=threads)
    # the knobs' engine is made first: a knob file it refuses (a gates sidecar changed) fails before any run
    dyve = engine_for(plan, knobs, threads) if knobs is not None and (knobs.layers or knobs.gates is not None) else None
    out_dense = run_range(dense, dataset, start, stop, "eval dense")
    if dyve is not None:
        out_dyve = run_range(dyve, dataset, start, stop, "eval dyvedeep")
    else:
        dyve, out_dyve = dense, out_dense
    return {
        "format": PER_IMAGE_FORMAT,
        "model": str(plan.path),
        "data": getattr(dataset, "name", "") + (":" + dataset.split if getattr(dataset, "split", "") else ""),
        "knobs": knob_key(knobs),
        "total": total,
        "range": [start, stop],
        "label": np.asarray(dataset.labels[start:stop], dtype=np.int64).tolist(),
        "dense": _classes(out_dense),
        "dyvedeep": _classes(out_dyve),
        "counts": {"layers": dense.counter.layer_names, "fields": list(COUNTER_FIELDS),
                   "dense": dense.counter.table.tolist(), "dyvedeep": dyve.counter.table.tolist()},
    }


def read_per_image(path: Path) -> dict[str, Any]:
    """A per-image results file; one clear error for a missing, partial or foreign file."""
    import json

    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DyveError(f"{path}: no such per-image results file") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DyveError(f"{path}: not a complete per-image results file ({str(err).splitlines()[0]})") from None
    if not isinstance(record, dict) or record.get("format") != PER_IMAGE_FORMAT:
        raise DyveError(f"{path}: not a per-image results file of `dyvedeep eval --per-image` ({PER_IMAGE_FORMAT})")
    return record


def merge_images(parts: list[dict[str, Any]], names: list[str] | None = None) -> dict[str, Any]:
    """The per-image results of the whole split from those of its shards (any order): the
    shards must be of one model, data and knob file and cover every image exactly once."""
    if not parts:
        raise DyveError("no per-image results to merge")
    names = names or [f"part {i}" for i in range(len(parts))]
    first = parts[0]
    same = ("model", "data", "knobs", "total")
    for part, name in zip(parts, names):
        for key in same:
            if part[key] != first[key]:
                raise DyveError(f"{name}: {key} {part[key]!r} differs from {names[0]}'s {first[key]!r}")
        if part["counts"]["layers"] != first["counts"]["layers"] or part["counts"]["fields"] != first["counts"]["fields"]:
            raise DyveError(f"{name}: its op counts have other layers or fields than {names[0]}'s")
    order = sorted(range(len(parts)), key=lambda i: parts[i]["range"][0])
    expected = 0
    for i in order:
        start, stop = parts[i]["range"]
        if start != expected:
            what = "overlaps the shard before it" if start < expected else f"leaves images {expected}:{start} out"
            raise DyveError(f"{names[i]}: images {start}:{stop} {what}")
        if len(parts[i]["label"]) != stop - start:
            raise DyveError(f"{names[i]}: {len(parts[i]['label'])} results for images {start}:{stop}")
        expected = stop
    if expected != first["total"]:
        raise DyveError(f"the shards cover images 0:{expected} of {first['total']}")
    merged = {key: first[key] for key in ("format", *same)}
    merged["range"] = [0, expected]
    merged["label"] = [y for i in order for y in parts[i]["label"]]
    for engine in ("dense", "dyvedeep"):
        merged[engine] = {key: [v for i in order for v in parts[i][engine][key]] for key in ("argmax", "top")}
    tables = {e: np.sum([np.asarray(parts[i]["counts"][e], dtype=np.int64) for i in order], axis=0)
              for e in ("dense", "dyvedeep")}
    merged["counts"] = {**{k: first["counts"][k] for k in ("layers", "fields")},
                        **{e: t.tolist() for e, t in tables.items()}}
    return merged


def _counter(counts: dict[str, Any], engine: str) -> OpCounter:
    """An OpCounter holding the totals of ``counts[engine]``."""
    if counts["fields"] != list(COUNTER_FIELDS):
        raise DyveError(f"op counts of fields {counts['fields']} (this dyvedeep counts {list(COUNTER_FIELDS)})")
    counter = OpCounter(counts["layers"])
    for index, row in enumerate(counts[engine]):
        counter.add(index, dict(zip(COUNTER_FIELDS, (int(v) for v in row))))
    return counter


def summarize(plan: Plan, knobs: KnobConfig | None, images: dict[str, Any]) -> dict[str, Any]:
    """Accuracy and op counts of per-image results (:func:`eval_images`, :func:`merge_images`)."""
    labels = np.asarray(images["label"], dtype=np.int64)
    n = len(labels)
    top_d = np.asarray(images["dense"]["top"], dtype=np.int64).reshape(n, -1)
    top_k = np.asarray(images["dyvedeep"]["top"], dtype=np.int64).reshape(n, -1)
    ok_dense, ok_dyve = top_d[:, 0] == labels, top_k[:, 0] == labels
    top5_dense, top5_dyve = (top_d == labels[:, None]).any(1), (top_k == labels[:, None]).any(1)
    agree = np.asarray(images["dense"]["argmax"]) == np.asarray(images["dyvedeep"]["argmax"])
    low, high = paired_bootstrap(ok_dense, ok_dyve)
    dense, dyve = _counter(images["counts"], "dense"), _counter(images["counts"], "dyvedeep")
    nn = max(n, 1)
    ops_dense = dense.total("ops") / nn
    ops_dyve = dyve.total("ops") / nn
    nonzero = plan.nonzero_ops if NONZERO_KEY in plan.metadata else None
    return {
        "model": str(plan.path),
        "data": images["data"],
        "n": n,
        "top1_dense": float(ok_dense.mean() * 100) if n else 0.0,
        "top5_dense": float(top5_dense.mean() * 100) if n else 0.0,
        "top1_dyvedeep": float(ok_dyve.mean() * 100) if n else 0.0,
        "top5_dyvedeep": float(top5_dyve.mean() * 100) if n else 0.0,
        "top1_loss_pt": float((ok_dense.mean() - ok_dyve.mean()) * 100) if n else 0.0,
        "loss_ci_low": low,
        "loss_ci_high": high,
        "top1_agreement": float(agree.mean() * 100) if n else 100.0,
        "ops_dense": ops_dense,
        "ops_dyvedeep": ops_dyve,
        "macs_dense": dense.total("macs") / nn,
        "macs_dyvedeep": dyve.total("macs") / nn,
        # what the kernels ran (docs/ops.md, executed MACs): knob-free reruns and work inside
        # computed tiles included
        "executed_macs_dense": dense.total("executed_macs") / nn,
        "executed_macs_dyvedeep": dyve.total("executed_macs") / nn,
        "ops_reduction": ops_dense / ops_dyve if ops_dyve else 1.0,
        "nonzero_ops_dense": nonzero,
        # with the knobs, the ops on non-zero weights (a pruned net's): each 0 weight's MAC left out
        "nonzero_ops_dyvedeep": (ops_dyve - 2 * (dyve.total("macs") - dyve.total("nonzero_macs")) / nn
                                 if nonzero is not None else None),
        "knob_ops": {k: {"saved": dyve.total(f"saved_{k}") / nn,
                         "overhead": dyve.total(f"overhead_{k}") / nn} for k in KNOB_NAMES},
        "layers": layer_breakdown(plan, knobs if knobs is not None and knobs.layers else None, dyve, nn, dense),
        # decision gates (docs/gates.md): their own ops per image, and per gate its exit rate
        "gate_ops": dyve.total("gate_ops") / nn,
        "gates": exit_rates(knobs, dyve.layer_names, [dyve.get(l, "exits") for l in dyve.layer_names], n)
                 if knobs is not None else [],
        "platform": platform_info(),
    }


def evaluate(plan: Plan, dataset, knobs: KnobConfig | None, threads: int = 1) -> dict[str, Any]:
    """Accuracy and op counts, dense and with ``knobs``, on every image of ``dataset``."""
    return summarize(plan, knobs, eval_images(plan, dataset, knobs, threads))


def print_summary(result: dict[str, Any]) -> None:
    print(f"n: {result['n']}")
    print(f"top-1: {result['top1_dense']:.2f} % dense, {result['top1_dyvedeep']:.2f} % DyVEDeep "
          f"(loss {result['top1_loss_pt']:+.2f} pt, 95 % CI [{result['loss_ci_low']:+.2f}, {result['loss_ci_high']:+.2f}])")
    print(f"top-5: {result['top5_dense']:.2f} % dense, {result['top5_dyvedeep']:.2f} % DyVEDeep")
    print(f"MACs per image: {result['macs_dense']:.4g} dense, {result['macs_dyvedeep']:.4g} DyVEDeep")
    print(f"MACs executed per image: {result['executed_macs_dense']:.4g} dense, "
          f"{result['executed_macs_dyvedeep']:.4g} DyVEDeep")
    print(f"scalar ops per image: {result['ops_dense']:.4g} dense, {result['ops_dyvedeep']:.4g} DyVEDeep "
          f"({result['ops_reduction']:.2f}x fewer)")
    if result["nonzero_ops_dense"] is not None:
        print(f"scalar ops per image on non-zero weights: {result['nonzero_ops_dense']:.4g} dense, "
              f"{result['nonzero_ops_dyvedeep']:.4g} DyVEDeep")
    for gate in result.get("gates", []):
        print(f"gate after {gate['layer']} ({gate['confidence']} >= {gate['threshold']:.4g}): "
              f"{gate['exit_rate']:.1f} % of the images exit")


def cmd_eval(args: argparse.Namespace) -> int:
    plan = load_plan(args.model)
    knobs = load_knobs(args.knobs, plan) if args.knobs else None
    dataset = open_dataset(plan, args.data, args.limit, args.mirror)
    start, stop = parse_image_range(args.images, len(dataset)) if args.images else (0, len(dataset))
    images = eval_images(plan, dataset, knobs, args.threads, start, stop)
    result = summarize(plan, knobs, images)
    if (start, stop) != (0, len(dataset)):
        print(f"images {start}:{stop} of {len(dataset)}")
    print_summary(result)
    if args.per_image:
        write_json_atomic(args.per_image, images)
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def cmd_eval_merge(args: argparse.Namespace) -> int:
    plan = load_plan(args.model)
    knobs = load_knobs(args.knobs, plan) if args.knobs else None
    parts = [read_per_image(p) for p in args.parts]
    images = merge_images(parts, [str(p) for p in args.parts])
    if images["model"] != str(plan.path):
        raise DyveError(f"{args.parts[0]}: results of {images['model']}, not of {plan.path}")
    if images["knobs"] != knob_key(knobs):
        raise DyveError(f"{args.parts[0]}: results with other knobs than {args.knobs or 'none'}")
    result = summarize(plan, knobs, images)
    print(f"merged {len(parts)} shard(s)")
    print_summary(result)
    if args.per_image:
        write_json_atomic(args.per_image, images)
    write_json_atomic(args.json, result)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``verify``, ``eval`` and ``eval-merge``."""
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
    p.add_argument("--images", default=None, metavar="START:STOP",
                   help="evaluate only images START:STOP of the data (after --limit): one shard")
    p.add_argument("--per-image", type=Path, default=None, metavar="OUT.json",
                   help="also write the per-image results and op counts (what eval-merge merges)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT.json")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("eval-merge", help="the summary of shards' per-image results (eval --per-image)")
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    p.add_argument("parts", type=Path, nargs="+", metavar="SHARD.json")
    p.add_argument("--knobs", type=Path, default=None, metavar="KNOBS.yaml")
    p.add_argument("--per-image", type=Path, default=None, metavar="OUT.json",
                   help="also write the merged per-image results")
    p.add_argument("--json", type=Path, required=True, metavar="OUT.json")
    p.set_defaults(func=cmd_eval_merge)
