"""Where a compiled run's time goes: per layer, its steps' time on one thread and on several,
measured in one run (the engines alternate in blocks of images).

    python tools/step_profile.py MODEL.onnx [--threads 2] [--images 30] [--data SPEC]

Every compiled program of both dense engines keeps its steps' clock readings
(``Program.profiling``); per layer (a conv and its max-pooling count as one where either engine
runs them band by band), the median over images of its steps' seconds is printed for one
thread and for ``--threads``, with their ratio (the speed-up of the layer), the step kinds, and
the totals. A step's time runs
from the end of the step before to the end of the barrier after it: the slowest thread and the
wait for it. Runs in which a program of the several-thread engine took one thread (its
ThreadChoice: a busy machine, or a probe) are left out and counted. Layers on the Python path
(not in a program) are not listed. Say which host (its vector instruction set) beside any figure
taken from it.
"""
from __future__ import annotations

import argparse

import numpy as np

from dyvedeep.bench import data_spec
from dyvedeep.cli_support import open_dataset
from dyvedeep.engine import CompiledRun, Engine, set_blas_threads
from dyvedeep.plan import build_plan

#: Images per block of one engine, and the untimed images that start each block.
BLOCK, WARMUP = 10, 3


def layer_rows(engine: Engine) -> list[tuple[int, list[str], CompiledRun, int, int]]:
    """(layer index, step kinds, its run, first step, end step) of every compiled layer (a
    banded conv + pool pair: one row, under the conv's index)."""
    rows = []
    for part in engine.compiled_runs or ():
        if not isinstance(part, CompiledRun):
            continue
        kinds = part.program.step_kinds()
        for index, first, end in part.step_ranges:
            rows.append((index, sorted(set(kinds[first:end])), part, first, end))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--data", default=None, help="images (default: the model's test split)")
    args = parser.parse_args()
    if args.threads < 2:
        parser.error("--threads: at least 2 (one thread is the first column)")
    plan = build_plan(args.model)
    images = open_dataset(plan, data_spec(args.model, plan, args.data), args.images, None).images(0, args.images)
    engines = {1: Engine(plan, threads=1), args.threads: Engine(plan, threads=args.threads)}
    seconds: dict[int, dict[int, list[np.ndarray]]] = {t: {} for t in engines}
    for engine in engines.values():
        for part in engine.compiled_runs or ():
            if isinstance(part, CompiledRun):
                part.program.profiling = True
    set_blas_threads(args.threads)
    skipped = 0
    for block in range(0, args.images, BLOCK):
        for threads, engine in engines.items():
            # each block starts with WARMUP untimed images: the other engine's block left the
            # caches to it, and this engine's idle threads asleep
            for i in range(block - WARMUP, min(block + BLOCK, args.images)):
                engine.run(images[i % len(images)][None])
                if i < block:
                    continue
                for part in engine.compiled_runs or ():
                    if not isinstance(part, CompiledRun) or not len(part.program):
                        continue
                    if threads > 1 and part.program.last_one_thread:
                        skipped += 1
                        continue
                    seconds[threads].setdefault(id(part), []).append(np.array(part.program.step_seconds()))
    medians = {t: {key: np.median(np.stack(v), axis=0) * 1e6 for key, v in seconds[t].items()} for t in engines}
    # per engine, layer index -> (step kinds, us); None where every run of it was left out. A conv
    # and its pooling banded in either engine are one row in both.
    banded = set().union(*(part.banded for e in engines.values() for part in e.compiled_runs or ()
                           if isinstance(part, CompiledRun)))
    layers: dict[int, dict[int, tuple[set[str], float | None]]] = {}
    for t, engine in engines.items():
        layers[t] = {}
        for index, kinds, part, first, end in layer_rows(engine):
            us = float(medians[t][id(part)][first:end].sum()) if id(part) in medians[t] else None
            key = index - 1 if index - 1 in banded else index
            before_kinds, before_us = layers[t].get(key, (set(), 0.0))
            layers[t][key] = (before_kinds | set(kinds), None if us is None or before_us is None else before_us + us)
    print(f"{'layer':40s} {'steps':22s} {'1 thread us':>12s} {f'{args.threads} threads us':>13s} {'ratio':>6s}")
    totals = {t: 0.0 for t in engines}
    for index in sorted(layers[1]):
        name = plan.layers[index].name + (" (+ pool)" if index in banded else "")
        kinds = sorted(layers[1][index][0] | layers[args.threads].get(index, (set(), None))[0])
        us = {t: layers[t].get(index, (None, None))[1] for t in engines}
        if any(v is None for v in us.values()):
            print(f"{name:40s} {','.join(kinds):22s} {'-':>12s} {'-':>13s}")  # every run of it left out
            continue
        for t in us:
            totals[t] += us[t]
        print(f"{name:40s} {','.join(kinds):22s} {us[1]:12.1f} {us[args.threads]:13.1f} "
              f"{us[1] / us[args.threads]:5.2f}x")
    if totals[args.threads]:
        print(f"{'total (compiled runs)':63s} {totals[1]:12.1f} {totals[args.threads]:13.1f} "
              f"{totals[1] / totals[args.threads]:5.2f}x")
    if skipped:
        print(f"left out: {skipped} program runs of the {args.threads}-thread engine that took one thread")


if __name__ == "__main__":
    main()
