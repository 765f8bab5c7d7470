"""Per-layer timing of the knob-free conv routes: each conv layer on its chosen route against the
unfolding routes (panel, unfold) it would take without the direct route, measured in one run.

    python tools/route_bench.py MODEL.onnx [--threads 1] [--calls 150]

One random input (seeded) goes through the dense engine once to give every layer its input;
then, for each conv layer, the two engines' knob-free paths run alternately on that input (hot
caches) and the medians are printed with their ratio (above 1: the chosen route is faster),
and the largest difference of the outputs (0: the routes give the same floats).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np

from dyvedeep.engine import Engine, EngineTuning
from dyvedeep.plan import Op, build_plan


def alternate_medians(first: Callable[[], None], second: Callable[[], None], calls: int) -> tuple[float, float]:
    """Median times (us) of two calls run alternately (machine drift hits both alike)."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(calls + 5):
        for fn, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            if i >= 5:
                bucket.append((time.perf_counter() - start) * 1e6)
    return float(np.median(times[0])), float(np.median(times[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=150)
    args = parser.parse_args()
    plan = build_plan(args.model)
    chosen = Engine(plan, threads=args.threads)
    # no layer qualifies for the direct route
    never_direct = EngineTuning(direct_min_lane_use=float("inf"), direct_min_lane_use_threads=float("inf"))
    unfolding = Engine(plan, threads=args.threads, tuning=never_direct)
    x = np.random.default_rng(0).uniform(0, 100, plan.input_shape).astype(np.float32)
    values = {name: np.array(v) for name, v in chosen.forward(x).items()}
    values[plan.input_name] = x
    print(f"{'layer':20s} {'route':>7s} {'us':>9s} {'unfolded':>9s} {'us':>9s} {'ratio':>6s} {'max diff':>8s}")
    for index, layer in enumerate(plan.layers):
        if layer.op != Op.CONV:
            continue
        outs, calls = [], []
        for engine in (chosen, unfolding):
            out = np.empty(layer.out_shape, np.float32)
            outs.append(out)
            calls.append(lambda engine=engine, out=out, index=index, layer=layer:
                         engine.run_layer(layer, [values[layer.inputs[0]]], out, index))
        t_chosen, t_unfolding = alternate_medians(calls[0], calls[1], args.calls)
        print(f"{layer.name:20s} {chosen.layer_plans[layer.name].route.name:>7s} {t_chosen:9.1f} "
              f"{unfolding.layer_plans[layer.name].route.name:>9s} {t_unfolding:9.1f} {t_unfolding / t_chosen:6.2f} "
              f"{float(np.abs(outs[0] - outs[1]).max()):8.2g}")


if __name__ == "__main__":
    main()
