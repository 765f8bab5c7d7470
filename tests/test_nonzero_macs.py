"""MACs on non-zero weights under the knobs (a pruned net's op count, docs/pruning.md): per
neuron, the non-zero weights of SPET's lead for every neuron computed and those of its rest for
each neuron that goes on, on hand-worked cases (nothing stopped, everything stopped, one
position between), conv and fully connected, and `dyvedeep eval`'s non-zero ops."""
from __future__ import annotations

import numpy as np
import pytest

from dyvedeep.datasets import Dataset
from dyvedeep.engine import Engine
from dyvedeep.evaluate import eval_images, summarize
from dyvedeep.knobs import KnobConfig
from dyvedeep.metadata_keys import NONZERO_KEY
from dyvedeep.plan import build_plan
from tests.onnx_builders import conv_model, fc_model

# Two outputs over four inputs, zeros in both parts. Input |w| sums 2, 0.8, 0.5, 0 give SPET's
# order 0, 1, 2, 3; its lead (fraction 0.5) is inputs 0 and 1. Non-zero weights: output 0 has
# 1 in its lead (input 0) and 1 in its rest (input 2); output 1 has 2 and 0.
W = np.array([[-1.0, 0.0, -0.5, 0.0],
              [-1.0, -0.8, 0.0, 0.0]], np.float32)
BIAS = np.full(2, -0.5, np.float32)
NZ_LEAD, NZ_REST = np.array([1, 2]), np.array([1, 0])
SIDE = 3
N = SIDE * SIDE  # positions of the 1 x 1 conv


def spet(layer: str, threshold: float) -> KnobConfig:
    config = KnobConfig()
    config.set(layer, "spet", threshold, fraction=0.5)
    return config


def conv_input(go_on_at: int | None) -> np.ndarray:
    """Inputs 0 and 1 are 0, so every partial is the bias, -0.5 (stopped at threshold 0), except
    at ``go_on_at``, where input 0 is -1 and both partials are +0.5 (both go on)."""
    x = np.zeros((1, 4, SIDE, SIDE), np.float32)
    x[0, 2:] = 1.0
    if go_on_at is not None:
        x[0, 0].reshape(-1)[go_on_at] = -1.0
    return x


@pytest.mark.parametrize("threads", [1, 2])
def test_conv_non_zero_macs_nothing_all_and_one_position_going_on(tmp_path, threads):
    plan = build_plan(conv_model(tmp_path / "c.onnx", W.reshape(2, 4, 1, 1), BIAS, (4, SIDE, SIDE)))
    layer = plan.layers[0]
    assert (layer.dense_macs, layer.nonzero_macs) == (N * 8, N * 4)
    cases = [  # (threshold, input, stopped, non-zero MACs, MACs)
        (np.inf, conv_input(None), 0, N * 4, N * 8),  # nothing stops: the dense non-zero count
        (0.0, conv_input(None), 2 * N, N * (1 + 2), N * 2 * 2),  # every neuron stops after its lead
        (0.0, conv_input(4), 2 * N - 2, N * (1 + 2) + 1 + 0, N * 2 * 2 + 2 * 2),  # both go on at 4
    ]
    for threshold, x, stopped, nonzero, macs in cases:
        engine = Engine(plan, spet("conv", threshold), threads=threads)
        engine.run(x)
        c = engine.counter
        assert c.get("conv", "terminated") == stopped
        assert (c.get("conv", "nonzero_macs"), c.get("conv", "macs")) == (nonzero, macs), threshold
    # an unpruned layer: the non-zero MACs are the MACs
    full = build_plan(conv_model(tmp_path / "f.onnx", np.full((2, 4, 1, 1), -1.0, np.float32), BIAS,
                                 (4, SIDE, SIDE)))
    engine = Engine(full, spet("conv", 0.0))
    engine.run(conv_input(4))
    assert engine.counter.get("conv", "nonzero_macs") == engine.counter.get("conv", "macs") < N * 8


def test_fc_non_zero_macs_all_and_one_output_going_on(tmp_path):
    plan = build_plan(fc_model(tmp_path / "fc.onnx", W, BIAS))
    x = np.zeros((1, 4, 1, 1), np.float32)
    x[0, 2:] = 1.0
    engine = Engine(plan, spet("fc", 0.0))
    engine.run(x)
    assert engine.counter.get("fc", "terminated") == 2
    assert engine.counter.get("fc", "nonzero_macs") == NZ_LEAD.sum() == 3
    x[0, 0] = -1.0  # both partials +0.5: both go on
    engine = Engine(plan, spet("fc", 0.0))
    engine.run(x)
    assert engine.counter.get("fc", "terminated") == 0
    assert engine.counter.get("fc", "nonzero_macs") == (NZ_LEAD + NZ_REST).sum() == 4


def test_eval_gives_the_non_zero_ops_with_the_knobs(tmp_path):
    """`dyvedeep eval` on a model with the non-zero metadata (a pruned net): non-zero ops with the
    knobs = their ops less 2 per MAC on a zero weight."""
    path = conv_model(tmp_path / "c.onnx", W.reshape(2, 4, 1, 1), BIAS, (4, SIDE, SIDE))
    plan = build_plan(path)
    plan.metadata[NONZERO_KEY] = "{}"  # as `dyvedeep prune` marks its nets
    x = np.concatenate([conv_input(None), conv_input(4)])
    data = Dataset("t", "test", np.zeros(2, np.int64), ["a", "b"], label_set="", preprocess=None, array=x)
    result = summarize(plan, spet("conv", 0.0), eval_images(plan, data, spet("conv", 0.0)))
    macs, nonzero = (N * 4 + N * 4 + 4) / 2, (N * 3 + N * 3 + 1) / 2
    assert result["macs_dyvedeep"] == macs
    assert result["nonzero_ops_dyvedeep"] == pytest.approx(result["ops_dyvedeep"] - 2 * (macs - nonzero))
    assert result["nonzero_ops_dense"] == plan.nonzero_ops
