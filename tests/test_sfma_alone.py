"""SFMA alone in a conv layer (engine/sfma_alone.py): the layer's own dense route over the kept
maps plus the dropped maps' constant, from Python or as steps of a compiled run; the two give
the same floats and counts, and the counts are the hand-worked ones."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from dyvedeep.engine import Engine, EngineTuning
from dyvedeep.engine.counting import SFMA_TEST_OPS
from dyvedeep.knobs import KnobConfig
from dyvedeep.plan import build_plan
from tests.onnx_builders import conv_model, save_model

RNG = np.random.default_rng(2024)


def routes_network(tmp_path):
    """Four convs, one per route: a (direct), b (stride 2: phase), c (small map: panel), d (more
    outputs than positions: unfold). Some of a's output channels are dead (bias -100)."""
    nodes = [
        helper.make_node("Conv", ["data", "Wa", "ba"], ["a"], name="a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="ra"),
        helper.make_node("Conv", ["ra", "Wb", "bb"], ["b"], name="b", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["b"], ["rb"], name="rb"),
        helper.make_node("Conv", ["rb", "Wc", "bc"], ["c"], name="c", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["rc"], name="rc"),
        helper.make_node("Conv", ["rc", "Wd", "bd"], ["out"], name="d"),
    ]
    ba = RNG.normal(0, .1, 8)
    ba[[2, 5]] = -100.0  # dead maps: dropped by b's SFMA, their mean 0 (no constant)
    inits = {"Wa": RNG.normal(0, .3, (8, 4, 3, 3)), "ba": ba,
             "Wb": RNG.normal(0, .3, (12, 8, 3, 3)), "bb": RNG.normal(0, .1, 12),
             "Wc": RNG.normal(0, .3, (40, 12, 3, 3)), "bc": RNG.normal(0, .1, 40),
             "Wd": RNG.normal(0, .3, (300, 40, 1, 1)), "bd": RNG.normal(0, .1, 300)}
    return save_model(tmp_path / "routes.onnx", nodes, inits, (4, 24, 24), "out")


def routes_input(n: int) -> np.ndarray:
    x = RNG.normal(0, 1, (n, 4, 24, 24)).astype(np.float32)
    x[:, 1] = 0.5  # a constant map: dropped by a's SFMA, its constant added
    x[:, 3] = 0.0
    return x


def sfma_knobs(thresholds: dict[str, float]) -> KnobConfig:
    config = KnobConfig()
    for layer, threshold in thresholds.items():
        config.set(layer, "sfma", threshold)
    return config


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("c_threshold", [0.5, 1e9])  # c: some maps dropped, or every one
def test_compiled_sfma_alone_equals_the_python_path(tmp_path, threads, c_threshold):
    plan = build_plan(routes_network(tmp_path))
    config = sfma_knobs({"a": 0.01, "b": 1e-30, "c": c_threshold, "d": 0.3})
    # c (12 of 14 lanes) on the panel route whatever the threads: each route once
    full_lanes = EngineTuning(direct_min_lane_use_threads=EngineTuning().direct_min_lane_use)
    compiled = Engine(plan, config, threads=threads, tuning=full_lanes)
    python = Engine(plan, config, threads=threads, compiled=False, tuning=full_lanes)
    routes = {name: cp.route.name for name, cp in compiled.layer_plans.items()}
    assert routes == {"a": "direct", "b": "phase", "c": "panel", "d": "unfold"}
    index = {layer.name: i for i, layer in enumerate(plan.layers)}
    on_python = [part for part in compiled.compiled_runs if isinstance(part, int)]
    assert on_python == [index["d"]]  # the unfold route stays on the Python path
    x = routes_input(3)
    out = compiled.run(x)
    assert np.array_equal(out, python.run(x))
    assert np.array_equal(compiled.counter.table, python.counter.table)
    c = compiled.counter
    assert c.get("a", "dropped_maps") == 3 * 2 and c.get("b", "dropped_maps") >= 3 * 2
    assert c.get("c", "dropped_maps") > 0
    if c_threshold > 1:
        assert c.get("c", "dropped_maps") == 3 * 12 and c.get("c", "macs") == 0
    for name in "abc":
        assert c.get(name, "fallbacks") == 0 and c.get(name, "executed_macs") == c.get(name, "macs")
    # the same image again: the compiled steps read each image, not the one they were built with
    assert np.array_equal(compiled.run(x[::-1]), out[::-1])


def test_sfma_alone_counts_hand_worked_in_a_compiled_run(tmp_path):
    # 2 maps of 3 x 3, 1 output, 2 x 2 kernel of ones, no padding: 4 positions of 4 taps per map
    w = np.ones((1, 2, 2, 2), np.float32)
    plan = build_plan(conv_model(tmp_path / "c.onnx", w, np.zeros(1), (2, 3, 3), relu=False))
    x = np.zeros((1, 2, 3, 3), np.float32)
    x[0, 0] = np.arange(9).reshape(3, 3)
    x[0, 1] = 2.0  # dropped: its constant 2 x 4 taps = 8 at every position
    engine = Engine(plan, sfma_knobs({"conv": 0.01}))
    assert not any(isinstance(part, int) for part in engine.compiled_runs)
    out = engine.run(x)
    assert out.reshape(-1).tolist() == [8 + 0 + 1 + 3 + 4, 8 + 1 + 2 + 4 + 5, 8 + 3 + 4 + 6 + 7, 8 + 4 + 5 + 7 + 8]
    c = engine.counter
    hw, cin, cout, kk, npos = 9, 2, 1, 4, 4
    stats = cin * hw * 5 + cin * SFMA_TEST_OPS + (cin + 1)  # sums (x may be < 0), tests, layer mean
    constant = 2 * cout * 1 * kk + cout * kk + cout * npos
    assert c.get("conv", "dropped_maps") == 1 and c.get("conv", "fallbacks") == 0
    assert c.get("conv", "macs") == c.get("conv", "executed_macs") == cout * npos * kk
    assert c.get("conv", "overhead_sfma") == stats + constant
    assert c.get("conv", "ops") == 2 * 16 + 4 + stats + constant
    assert c.get("conv", "saved_sfma") == 2 * cout * npos * kk


def test_sfma_alone_dropping_nothing_runs_the_dense_route_once(tmp_path):
    w = RNG.normal(0, .3, (5, 3, 3, 3)).astype(np.float32)
    plan = build_plan(conv_model(tmp_path / "c.onnx", w, RNG.normal(0, .1, 5), (3, 8, 8), pads=[1, 1, 1, 1]))
    x = RNG.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    dense = Engine(plan)
    engine = Engine(plan, sfma_knobs({"conv": 0.0}))
    assert np.array_equal(engine.run(x), dense.run(x))
    c = engine.counter
    assert c.get("conv", "dropped_maps") == 0 and c.get("conv", "fallbacks") == 0
    assert c.get("conv", "executed_macs") == c.get("conv", "macs") == dense.counter.get("conv", "macs")


@pytest.mark.parametrize("compiled", [True, False])
def test_sfma_alone_counts_the_kept_maps_nonzero_weights(tmp_path, compiled):
    """A pruned layer: the MACs on non-zero weights are those of the kept maps' columns."""
    w = RNG.normal(0, .3, (4, 3, 3, 3)).astype(np.float32)
    w[w < 0.1] = 0.0
    plan = build_plan(conv_model(tmp_path / "c.onnx", w, np.zeros(4), (3, 6, 6), pads=[1, 1, 1, 1]))
    assert plan.layer("conv").has_zero_weights
    x = RNG.normal(0, 1, (1, 3, 6, 6)).astype(np.float32)
    x[0, 2] = 1.5  # dropped
    engine = Engine(plan, sfma_knobs({"conv": 0.01}), compiled=compiled)
    engine.run(x)
    assert engine.counter.get("conv", "dropped_maps") == 1
    assert engine.counter.get("conv", "nonzero_macs") == 36 * int(np.count_nonzero(w[:, :2]))
