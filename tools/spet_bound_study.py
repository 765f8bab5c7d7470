"""What SPET's ``test: bound`` (beyond the reconstruction, docs/knobs.md) stops on a real model.

    python tools/spet_bound_study.py MODEL.onnx --data cifar10:calib [--images 200] \
        [--scales 1,0.5] [--fractions 0.5]

Runs the images densely, then with ``spet: {test: bound, threshold: S, fraction: F}`` on every
layer SPET applies to, all at once, for each F and S. Prints per layer: the share of its
neurons that end at 0 (ReLU; the most any exact test can stop), the share the bound stopped,
its ops with the knob over its dense ops (overhead included); and for the network: dense ops
over ops, top-1 on the labels, and the share of images whose top-1 differs from the dense run.
Findings: docs/notes/2026-12-03-spet-bound.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dyvedeep.cli_support import open_dataset
from dyvedeep.engine import Engine, set_blas_threads
from dyvedeep.knobs import KnobConfig, applicable_knobs
from dyvedeep.plan import build_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", default="cifar10:calib")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--scales", default="1,0.5")
    parser.add_argument("--fractions", default="0.5")
    parser.add_argument("--mirror", type=Path, default=None)
    args = parser.parse_args()
    set_blas_threads(1)
    plan = build_plan(args.model)
    dataset = open_dataset(plan, args.data, args.images, args.mirror)
    x, labels = dataset.images(0, args.images), dataset.labels[:args.images]
    layers = [layer for layer in plan.layers if "spet" in applicable_knobs(layer)]
    dense = Engine(plan)
    zeros = dict.fromkeys((layer.name for layer in layers), 0)
    dense_out = np.empty((len(x),) + tuple(plan.output_shape), np.float32)
    index = {layer.name: i for i, layer in enumerate(plan.layers)}
    for n in range(len(x)):
        dense_out[n] = dense.forward(x[n])[plan.output_name]
        for layer in layers:  # a layer's output buffer may be reused later in the run: stop there
            zeros[layer.name] += int((dense.forward(x[n], stop=index[layer.name] + 1)[layer.output] == 0).sum())
    dense_pred = dense_out.reshape(len(x), -1).argmax(axis=1)
    dense_ops = sum(layer.dense_ops for layer in plan.layers)
    print(f"{plan.path.name}: {len(x)} images of {args.data}; dense top-1 {np.mean(dense_pred == labels):.3f}")
    for fraction in (float(f) for f in args.fractions.split(",")):
        for scale in (float(s) for s in args.scales.split(",")):
            config = KnobConfig()
            for layer in layers:
                config.set(layer.name, "spet", scale, fraction=fraction, test="bound")
            engine = Engine(plan, config)
            pred = engine.run(x).reshape(len(x), -1).argmax(axis=1)
            c = engine.counter
            print(f"\nfraction {fraction}, scale {scale}: network {dense_ops / (c.total('ops') / len(x)):.4f}x, "
                  f"top-1 {np.mean(pred == labels):.3f}, changed {np.mean(pred != dense_pred):.3%}")
            print("| layer | ends at 0 | stopped | layer ops / dense |")
            print("|---|---|---|---|")
            for layer in layers:
                neurons = int(np.prod(layer.out_shape)) * len(x)
                ratio = c.get(layer.name, "ops") / len(x) / layer.dense_ops
                print(f"| {layer.name} | {zeros[layer.name] / neurons:.1%} | "
                      f"{c.get(layer.name, 'terminated') / neurons:.2%} | {ratio:.4f} |")


if __name__ == "__main__":
    main()
