"""Executed MACs (docs/ops.md, "Executed MACs"): the multiply-adds the kernels ran, beside those
the op model counts, on hand-worked cases: the knob conv kernel's tiles (SPET: nothing, all,
one entry going on; SDSS: masked entries inside computed tiles; SFMA), the knob-free reruns of
a layer where no knob fired, fully connected, a conv run band by band with its max-pooling, and
the figures `dyvedeep eval --json` gives."""
from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from dyvedeep import _kernels as K
from dyvedeep.datasets import Dataset
from dyvedeep.engine import Engine, EngineTuning
from dyvedeep.engine.memory import aligned_zeros
from dyvedeep.evaluate import eval_images, summarize
from dyvedeep.knobs import KnobConfig
from dyvedeep.plan import build_plan
from tests.onnx_builders import conv_model, fc_model, save_model

ALL_THREADS = EngineTuning(parallel_min_work=0)


def knobs(**per_layer) -> KnobConfig:
    """knobs(conv={'spet': 0.0}): one threshold per knob, default options."""
    config = KnobConfig()
    for layer, settings in per_layer.items():
        for knob, threshold in settings.items():
            config.set(layer, knob, threshold)
    return config


def counts(engine: Engine, layer: str = "conv") -> tuple[int, int, int]:
    """(counted MACs, executed MACs, stopped neurons) of ``layer``."""
    c = engine.counter
    return c.get(layer, "macs"), c.get(layer, "executed_macs"), c.get(layer, "terminated")


# ----------------------------------------------------------------------------- SPET in the tiles
# A 1x1 conv, 4 input channels, 10 output channels (one block of 8 rows, one of 2), a 6 x 6 map
# (tiles of 32 and 4 positions). Channel |w| sums 10, 8, 5, 4: SPET's order is 0, 1, 2, 3 and
# its lead (fraction 0.5) channels 0 and 1: lead = 2 MACs, the rest 2, K = 4. Bias -0.5, input
# channel 1 zero: output o's partial is -0.5 + w[o, 0] x[0]. Channel 0 of the input is 0 but at
# position 33 (row 5, column 3; in the second tile), where it is 1.
O, CIN, SIDE = 10, 4, 6
N = SIDE * SIDE
LEAD, KDIM = 2, 4


def spet_layer(tmp_path, output2_sign: float):
    w = np.empty((O, CIN, 1, 1), np.float32)
    w[:, 0], w[:, 1], w[:, 2], w[:, 3] = -1.0, -0.8, -0.5, -0.4
    w[2, 0] = output2_sign  # +1: output 2's partial at position 33 is +0.5 (it goes on)
    plan = build_plan(conv_model(tmp_path / "c.onnx", w, np.full(O, -0.5), (CIN, SIDE, SIDE)))
    x = np.zeros((1, CIN, SIDE, SIDE), np.float32)
    x[0, 0, 5, 3] = 1.0
    x[0, 2:] = 1.0
    return plan, x


@pytest.mark.parametrize("threads", [1, 2])
def test_spet_one_entry_going_on_runs_its_whole_tile_block(tmp_path, threads):
    """(c) Every neuron stops after its lead but output 2 at position 33: the second tile (4
    positions) runs the rest for its first block of 8 rows, all of them: 8 x 4 entries x 2 rest
    MACs where the op model counts 1 x 2."""
    plan, x = spet_layer(tmp_path, +1.0)
    engine = Engine(plan, knobs(conv={"spet": 0.0}), threads=threads, tuning=ALL_THREADS)
    engine.run(x)
    counted, executed, stopped = counts(engine)
    assert stopped == O * N - 1
    assert counted == O * N * LEAD + 1 * (KDIM - LEAD) == 722
    assert executed == O * N * LEAD + 8 * 4 * (KDIM - LEAD) == 784
    assert executed - counted == (8 * 4 - 1) * (KDIM - LEAD) == 62
    assert engine.counter.get("conv", "fallbacks") == 0


def test_spet_everything_stopped_runs_only_the_leads(tmp_path):
    """(b) Every neuron stops: each tile runs its lead alone, for the real rows and positions
    only (not the 6 repeated rows of the 2-row block, nor the lanes past 4 in the second tile)."""
    plan, x = spet_layer(tmp_path, -1.0)
    engine = Engine(plan, knobs(conv={"spet": 0.0}))
    engine.run(x)
    counted, executed, stopped = counts(engine)
    assert stopped == O * N
    assert executed == counted == O * N * LEAD == 720


def test_spet_nothing_stopped_executes_the_dense_macs_then_reruns_them(tmp_path):
    """(a) Nothing stops: the knob kernel runs the dense MACs, as counted; as no knob fired the
    layer is run again on its knob-free path (the knob-free floats), which runs them once more."""
    plan, x = spet_layer(tmp_path, +1.0)
    dense = O * N * KDIM
    assert plan.layer("conv").dense_macs == dense == 1440
    engine = Engine(plan, knobs(conv={"spet": math.inf}))
    engine.run(x)
    counted, executed, stopped = counts(engine)
    assert stopped == 0 and engine.counter.get("conv", "fallbacks") == 1
    assert counted == dense and executed == 2 * dense
    # the knob kernel alone: executed == counted == dense
    w = np.ascontiguousarray(plan.layer("conv").weight.reshape(O, CIN))
    src = np.ascontiguousarray(x.reshape(-1))
    out = np.empty((O, N), np.float32)
    for spet, margins in ((True, np.full(O, np.inf, np.float32)), (False, np.zeros(O, np.float32))):
        ran = np.zeros(1, np.int64)
        stopped, active = K.knob_conv(src=src, tap_off=np.arange(CIN, dtype=np.int64) * N,
                                      positions=np.arange(N, dtype=np.int32), wo=SIDE, sh=1, sw=1, row_width=SIDE,
                                      W=w, lead=LEAD, spet=spet, margins=margins, relu=True,
                                      bias=plan.layer("conv").bias, cst=None, mask=None, out=out,
                                      panels=aligned_zeros((1, KDIM * 32)), threads=1, executed=ran)
        assert (stopped, active, int(ran[0])) == (0, O * N, dense)


def test_spet_tiles_on_random_layers_follow_the_rule():
    """On random unpadded convs (rows not a multiple of 8, positions not of 32) with margins that
    stop some entries: the kernel's count is, per tile of 32 positions and block of 8 output
    channels, rows x positions x (lead + (K - lead) when an entry of the block goes on), an
    entry going on being one not 0 (no ReLU: a finished sum is almost surely not 0); one
    thread or two."""
    rng = np.random.default_rng(15)
    for _ in range(40):
        cin, o, h, k = int(rng.integers(1, 5)), int(rng.integers(1, 21)), int(rng.integers(3, 14)), 3
        ho = h - k + 1
        n = ho * ho
        x = rng.normal(0, 1, (cin, h, h)).astype(np.float32)
        w = rng.normal(0, 1, (o, cin * k * k)).astype(np.float32)
        lead = int(rng.integers(1, cin + 1)) * k * k
        margins = rng.uniform(-1, 6, o).astype(np.float32)  # some outputs stop nowhere, some often
        if rng.random() < 0.5:  # every entry stops (partial < 1e3) but, in some layers, one output's here and there
            margins[:] = -1e3
            margins[rng.integers(o)] = rng.choice([-1e3, 0.0, 2.0])
        taps = (np.arange(k)[:, None] * h + np.arange(k)[None, :]).reshape(-1)
        tap_off = (np.arange(cin)[:, None] * h * h + taps[None, :]).reshape(-1).astype(np.int64)
        runs = []
        for threads in (1, 2):
            out = np.full((o, n), np.nan, np.float32)
            ran = np.zeros(1, np.int64)
            K.knob_conv(src=np.ascontiguousarray(x.reshape(-1)), tap_off=tap_off,
                        positions=np.arange(n, dtype=np.int32), wo=ho, sh=1, sw=1, row_width=h, W=w, lead=lead,
                        spet=True, margins=margins, relu=False, bias=np.zeros(o, np.float32), cst=None, mask=None,
                        out=out, panels=aligned_zeros((2, w.shape[1] * 32)), threads=threads, executed=ran)
            runs.append(int(ran[0]))
        expected = 0
        for j0 in range(0, n, 32):
            jn = min(32, n - j0)
            for g in range(0, o, 8):
                rows = min(8, o - g)
                goes_on = bool((out[g:g + rows, j0:j0 + jn] != 0).any())
                expected += rows * jn * (lead + (w.shape[1] - lead) * goes_on)
        assert runs == [expected, expected]


# ----------------------------------------------------------------------------- SDSS


def test_sdss_masked_entries_inside_computed_tiles(tmp_path):
    """Two 1x1 maps of one input on a 5 x 5 map: map 0 = relu(x), map 1 = relu(-x); grid rows and
    columns {0, 2, 4}, cells (0,0), (0,1), (1,0), (1,1) of 3, 4, 4, 5 off-grid positions. x is
    1 at (4, 4) (a corner of cell (1,1) alone) and -1 at (0, 0) (of cell (0,0) alone): map 0
    computes cell (1,1), map 1 cell (0,0), and fills the others. After the grid (2 x 9), the one
    tile of the 8 positions either map needs runs both maps on all 8: 16 MACs where 8 are
    counted (the 3 + 5 entries the other map fills are run as well)."""
    w = np.array([1.0, -1.0], np.float32).reshape(2, 1, 1, 1)
    plan = build_plan(conv_model(tmp_path / "c.onnx", w, np.zeros(2), (1, 5, 5)))
    x = np.zeros((1, 1, 5, 5), np.float32)
    x[0, 0, 4, 4], x[0, 0, 0, 0] = 1.0, -1.0
    engine = Engine(plan, knobs(conv={"sdss": 0.5}))
    out = engine.run(x)
    assert np.array_equal(out, Engine(plan).run(x))  # every filled cell is 0 at its corners and inside
    c = engine.counter
    assert c.get("conv", "filled") == (4 + 4 + 3) + (4 + 4 + 5)
    assert c.get("conv", "macs") == 2 * 9 + 5 + 3 == 26
    assert c.get("conv", "executed_macs") == 2 * 9 + 2 * 8 == 34
    assert c.get("conv", "fallbacks") == 0


def test_sfma_kernel_runs_the_kept_channels_alone(tmp_path):
    """SFMA drops map 1 of 2 (constant 2.0): the kernel runs the kept channel's 4 taps per output,
    as counted; nothing else fired is no reason for a rerun (a map was dropped)."""
    w = np.ones((1, 2, 2, 2), np.float32)
    plan = build_plan(conv_model(tmp_path / "c.onnx", w, np.zeros(1), (2, 3, 3), relu=False))
    x = np.zeros((1, 2, 3, 3), np.float32)
    x[0, 0] = np.arange(9).reshape(3, 3)
    x[0, 1] = 2.0
    engine = Engine(plan, knobs(conv={"sfma": 0.01}))
    engine.run(x)
    c = engine.counter
    assert c.get("conv", "dropped_maps") == 1 and c.get("conv", "fallbacks") == 0
    assert c.get("conv", "macs") == c.get("conv", "executed_macs") == 1 * 4 * 4


# ----------------------------------------------------------------------------- fully connected


def test_fc_spet_runs_what_it_counts_and_reruns_when_nothing_stops(tmp_path):
    # test_knobs.py's hand-worked layer: 2 of 3 neurons stop after their lead of 2 inputs
    w = np.array([[-2.0, -1.0, 0.5, 0.5], [2.0, 1.0, 0.5, 0.5], [-2.0, 0.0, 0.0, 0.0]], np.float32)
    plan = build_plan(fc_model(tmp_path / "f.onnx", w, np.zeros(3)))
    x = np.ones((1, 4, 1, 1), np.float32)
    some = Engine(plan, knobs(fc={"spet": 0.5}))
    some.run(x)
    assert counts(some, "fc") == (3 * 2 + 1 * 2, 3 * 2 + 1 * 2, 2)
    none = Engine(plan, knobs(fc={"spet": math.inf}))
    none.run(x)
    assert counts(none, "fc") == (12, 12 + 12, 0)  # all MACs, then the knob-free rerun's
    plain = Engine(plan)
    plain.run(x)
    assert counts(plain, "fc") == (12, 12, 0)


# ----------------------------------------------------------------------------- bands


def test_conv_run_band_by_band_executes_the_shared_rows_twice(tmp_path):
    """test_engine.py's first band case: a 39 x 37 conv output (6 channels, 4 x 3 x 3 inputs)
    pooled 3x3 / 2 with padding 1, in bands of one pooled row: conv rows 0-1, then 2p-1..2p+1
    for p = 1..18, then 37-38: 2 + 18 x 3 + 2 = 58 rows run for 39. Layer by layer (forward,
    no bands) the dense MACs."""
    tuning = EngineTuning(parallel_min_work=0, conv_pool_bands=True, conv_pool_min_bytes=0,
                          conv_pool_band_bytes=4 * 6 * 18 * 5)
    nodes = [helper.make_node("Conv", ["data", "W", "b"], ["a"], name="a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="r"),
             helper.make_node("MaxPool", ["r"], ["out"], name="p", kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1])]
    rng = np.random.default_rng(3)
    inits = {"W": rng.normal(0, .3, (6, 4, 3, 3)), "b": rng.normal(0, .1, 6)}
    plan = build_plan(save_model(tmp_path / "f.onnx", nodes, inits, (4, 39, 37), "out"))
    x = rng.normal(0, 1, (2, 4, 39, 37)).astype(np.float32)
    per_row = 37 * 6 * 4 * 9
    for compiled in (True, False):
        engine = Engine(plan, tuning=tuning, compiled=compiled)
        assert sum(b.rows for b in engine.conv_pool_bands[0].bands) == 58
        engine.run(x)  # band by band
        c = engine.counter
        assert c.get("a", "macs") == 2 * 39 * per_row == 2 * plan.layer("a").dense_macs
        assert c.get("a", "executed_macs") == 2 * 58 * per_row
    layerwise = Engine(plan, tuning=tuning)
    layerwise.forward(x[0])
    assert layerwise.counter.get("a", "executed_macs") == 39 * per_row


# ----------------------------------------------------------------------------- eval --json


def test_eval_gives_counted_and_executed_macs_per_layer_and_network(tmp_path):
    plan, x = spet_layer(tmp_path, +1.0)
    data = Dataset("t", "test", np.zeros(3, np.int64), ["a", "b", "c"], label_set="", preprocess=None,
                   array=np.repeat(x, 3, axis=0))
    config = knobs(conv={"spet": 0.0})
    result = summarize(plan, config, eval_images(plan, data, config))
    assert (result["macs_dense"], result["executed_macs_dense"]) == (1440, 1440)
    assert (result["macs_dyvedeep"], result["executed_macs_dyvedeep"]) == (722, 784)
    row = next(r for r in result["layers"] if r["layer"] == "conv" and r["knob"] == "all")
    assert (row["macs_dense"], row["macs_dyvedeep"], row["executed_macs_dyvedeep"]) == (1440, 722, 784)
    assert row["executed_macs_dense"] == 1440 and row["fallback_macs_dyvedeep"] == 0
    never = knobs(conv={"spet": math.inf})
    result = summarize(plan, never, eval_images(plan, data, never))
    row = next(r for r in result["layers"] if r["layer"] == "conv" and r["knob"] == "all")
    assert (row["macs_dyvedeep"], row["executed_macs_dyvedeep"], row["fallback_macs_dyvedeep"]) == (1440, 2880, 1440)
