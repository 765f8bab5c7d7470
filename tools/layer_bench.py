"""Per-layer timing of the knob-free path against the knob path, measured in one run.

    python tools/layer_bench.py MODEL.onnx KNOBS.yaml [--data cifar10:test] [--images 30]

Runs every image through the dense engine once and caches each layer's input; then, for each
conv and fully-connected layer, times the dense layer and the knob layer on those cached inputs
(median per image, best of --rounds rounds each, one after the other) and prints both and their
ratio (dense / knobs: above 1, the knobs save time in that layer). Single thread.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from dyvedeep.engine import Engine, set_blas_threads
from dyvedeep.cli_support import open_dataset
from dyvedeep.knobs import load_knobs
from dyvedeep.plan import build_plan


def median_layer_ms(engine: Engine, index: int, inputs: list[list[np.ndarray]]) -> float:
    """Median time (ms) of layer ``index`` of ``engine`` over the cached ``inputs``."""
    layer = engine.plan.layers[index]
    out = engine.buffers.get(layer.output)
    times = []
    for x in inputs:
        start = time.perf_counter()
        engine.run_layer(layer, x, out, index)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("knobs")
    parser.add_argument("--data", default="cifar10:test")
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    plan = build_plan(args.model)
    images = open_dataset(plan, args.data, args.images, None).images(0, args.images)
    dense, knobs = Engine(plan), Engine(plan, load_knobs(args.knobs, plan))
    set_blas_threads(1)
    cached = [{k: v.copy() for k, v in dense.forward(x).items()} for x in images]
    print(f"{'layer':24s} {'dense ms':>9s} {'knobs ms':>9s} {'dense/knobs':>12s}")
    for index, layer in enumerate(plan.layers):
        if not layer.is_compute:
            continue
        inputs = [[c[t] for t in layer.inputs] for c in cached]
        best_dense = min(median_layer_ms(dense, index, inputs) for _ in range(args.rounds))
        best_knobs = min(median_layer_ms(knobs, index, inputs) for _ in range(args.rounds))
        print(f"{layer.name:24s} {best_dense:9.3f} {best_knobs:9.3f} {best_dense / best_knobs:11.2f}x")


if __name__ == "__main__":
    main()
