"""The three knobs: hand-worked cases with exact op counts (nothing skipped, everything skipped),
bit-exactness when nothing fires, an independent numpy reference of the rules, and knob files."""
from __future__ import annotations

import math

import numpy as np
import pytest

from onnx import helper

from dyvedeep import _kernels as K
from dyvedeep.engine import BILINEAR_FILL_OPS, SFMA_TEST_OPS, Engine, EngineTuning, sdss_grid
from dyvedeep.engine.memory import aligned_zeros
from dyvedeep.engine.spet import spet_bound, spet_test_margins
from dyvedeep.errors import DyveError
from dyvedeep.knobs import KnobConfig, KnobSetting, load_knobs
from dyvedeep.plan import build_plan
from tests.onnx_builders import conv_model, fc_model, save_model

RNG = np.random.default_rng(7)


def knobs(**per_layer) -> KnobConfig:
    """knobs(conv={'spet': 0.0, 'sdss': (0.5, {'fill': 'zero'})})"""
    config = KnobConfig()
    for layer, settings in per_layer.items():
        for knob, value in settings.items():
            threshold, options = value if isinstance(value, tuple) else (value, {})
            config.set(layer, knob, threshold, **options)
    return config


# ----------------------------------------------------------------------------- SPET


def test_spet_fc_hand_worked(tmp_path):
    # inputs ordered by sum_o |w|: column 0 (|w| sum 4), then 1 (2), then 2, 3 (1 each); lead = 2.
    w = np.array([[-2.0, -1.0, 0.5, 0.5],
                  [2.0, 1.0, 0.5, 0.5],
                  [-2.0, 0.0, 0.0, 0.0]], np.float32)
    path = fc_model(tmp_path / "f.onnx", w, np.zeros(3))
    plan = build_plan(path)
    x = np.ones((1, 4, 1, 1), np.float32)
    engine = Engine(plan, knobs(fc={"spet": 0.5}))
    out = engine.run(x)
    # partials: -3 (terminated: < -0.5), +3, -2 (terminated); neuron 1 finishes: 3 + 1 = 4
    assert out.tolist() == [[0.0, 4.0, 0.0]]
    c = engine.counter
    assert c.get("fc", "terminated") == 2
    macs = 3 * 2 + 1 * 2
    assert c.get("fc", "macs") == macs
    assert c.get("fc", "ops") == 2 * macs + 3 + 3 + 1  # bias adds, SPET compares, ReLU of the finished one
    dense_ops = plan.layer("fc").dense_ops
    assert dense_ops == 2 * 12 + 3 + 3
    assert dense_ops - c.get("fc", "saved_spet") + c.get("fc", "overhead_spet") == c.get("fc", "ops")


def test_spet_extremes(tmp_path):
    w = -np.abs(RNG.normal(0, 1, (8, 3, 3, 3))).astype(np.float32)
    path = conv_model(tmp_path / "c.onnx", w, np.zeros(8), (3, 6, 6), pads=[1, 1, 1, 1])
    plan = build_plan(path)
    x = np.abs(RNG.normal(0, 1, (1, 3, 6, 6))).astype(np.float32) + 0.1
    dense = Engine(plan).run(x)
    # never fires: bit for bit the dense result
    never = Engine(plan, knobs(conv={"spet": math.inf}))
    assert np.array_equal(never.run(x), dense)
    assert never.counter.get("conv", "terminated") == 0
    # everything fires (all weights negative, input positive): output 0, only the lead computed
    every = Engine(plan, knobs(conv={"spet": 0.0}))
    out = every.run(x)
    assert not out.any() and not dense.any()
    neurons = 8 * 36
    lead = math.ceil(0.5 * 3) * 9
    assert every.counter.get("conv", "terminated") == neurons
    assert every.counter.get("conv", "macs") == neurons * lead
    assert every.counter.get("conv", "ops") == 2 * neurons * lead + neurons + neurons  # bias, compare


# ----------------------------------------------------------------------------- SPET, test: bound


def bound(threshold: float) -> tuple[float, dict[str, str]]:
    return threshold, {"test": "bound"}


def signed_bound_ops(elements: int, outputs: int) -> int:
    """docs/ops.md, SPET bound, fully connected, input of unknown sign: max and min (2 (n - 1)),
    both clamped to 0 (2), per output 2 multiplies and 2 adds."""
    return 2 * (elements - 1) + 2 + 4 * outputs


def signed_channel_bound_ops(channels: int, elements: int, outputs: int, rest: int) -> int:
    """docs/ops.md, SPET bound, conv, input of unknown sign: per map its max and min, the largest
    max and smallest min, each map's two clamped to 0, the range (1); per output the rest's two
    dot products (2 per MAC each) and the rounding allowance (3)."""
    extremes = channels * (elements - 1) + channels - 1
    return 2 * extremes + 2 * channels + 1 + outputs * (2 * 2 * rest + 3)


def test_spet_bound_fc_hand_worked(tmp_path):
    # column |w| sums 7, 2.5, 2, 2.5: order 0, 1, 3, 2 (stable); lead = 2 (columns 0 and 1)
    w = np.array([[-2.0, -1.0, 0.5, 0.5],
                  [2.0, 1.0, 0.5, 0.5],
                  [-2.0, 0.0, 0.25, 1.0],
                  [-1.0, -0.5, 0.75, 0.5]], np.float32)
    path = fc_model(tmp_path / "f.onnx", w, np.zeros(4))
    plan = build_plan(path)
    assert not plan.layer("fc").input_nonneg
    x = np.array([1.0, 1.0, 0.0, 2.0], np.float32).reshape(1, 4, 1, 1)
    engine = Engine(plan, knobs(fc={"spet": bound(1.0)}))
    out = engine.run(x)
    # partials -3, 3, -2, -1.5; the rest (columns 3, 2) adds at most 2 x (its positive weights):
    # 2, 2, 2.5, 2.5. Only neuron 0 is sure to end <= 0 (full sums -2, 4, 0, -0.5): the margin
    # rule at 0.5 would stop 0, 2 and 3, the bound stops 0 alone, and every output is the dense one.
    assert out.tolist() == [[0.0, 4.0, 0.0, 0.0]]
    assert np.array_equal(out, Engine(plan).run(x))
    c = engine.counter
    assert c.get("fc", "terminated") == 1
    macs = 4 * 2 + 3 * 2
    assert c.get("fc", "macs") == macs
    overhead = 4 + signed_bound_ops(4, 4)  # compares, the bound's margins
    assert c.get("fc", "overhead_spet") == overhead
    assert c.get("fc", "ops") == 2 * macs + 4 + 3 + overhead  # bias adds, ReLU of the finished
    assert c.get("fc", "saved_spet") == 2 * 1 * 2 + 1
    assert plan.layer("fc").dense_ops - c.get("fc", "saved_spet") + overhead == c.get("fc", "ops")
    never = Engine(plan, knobs(fc={"spet": bound(math.inf)}))
    assert np.array_equal(never.run(x), Engine(plan).run(x)) and never.counter.get("fc", "terminated") == 0


def test_spet_exact_bound_on_a_grouped_conv(tmp_path):
    """Two groups, each with its own order, ranges and bound: a stopped neuron is 0 in the dense
    result (the first group's input is 5 times larger)."""
    rng = np.random.default_rng(1)
    stops = 0
    for _ in range(10):
        w = rng.normal(-0.4, 1, (8, 3, 3, 3)).astype(np.float32)
        b = rng.normal(-0.5, 1, 8).astype(np.float32)
        plan = build_plan(relu_conv_model(tmp_path / "c.onnx", w, b, (6, 9, 9), pads=[1] * 4, group=2))
        x = rng.normal(0, 1, (1, 6, 9, 9)).astype(np.float32)
        x[0, :3] *= 5
        dense = Engine(plan).run(x)
        engine = Engine(plan, knobs(conv={"spet": bound(1.0)}))
        out = engine.run(x)
        stopped = engine.counter.get("conv", "terminated")
        stops += stopped
        np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5 * float(np.abs(dense).max()))
        assert (out[dense == 0] == 0).all() and ((out == 0) & (dense == 0)).sum() >= stopped
    assert stops > 0


def test_spet_exact_bound_on_random_fully_connected_layers(tmp_path):
    """Scale 1 on random fully-connected layers with non-negative inputs: a stopped neuron is 0
    in the dense result; with nothing stopped the output is the dense one bit for bit."""
    rng = np.random.default_rng(15)
    stops = 0
    for i in range(40):
        o, k = int(rng.integers(1, 24)), int(rng.integers(2, 80))
        w = rng.normal(-rng.uniform(0, 0.5), 1, (o, k)).astype(np.float32)
        b = rng.normal(-1, 1, o).astype(np.float32)
        plan = build_plan(fc_model(tmp_path / f"f{i}.onnx", w, b))
        x = np.maximum(rng.normal(0, 1, (1, k, 1, 1)), 0).astype(np.float32)
        dense = Engine(plan).run(x)
        engine = Engine(plan, knobs(fc={"spet": bound(1.0)}))
        out = engine.run(x)
        stopped = engine.counter.get("fc", "terminated")
        stops += stopped
        if stopped == 0:
            assert np.array_equal(out, dense)
        else:
            np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5 * float(np.abs(dense).max() or 1))
            # every stopped neuron is a 0 the dense run has too (the others finish, to rounding)
            assert (out[dense == 0] == 0).all() and ((out == 0) & (dense == 0)).sum() >= stopped
    assert stops > 20


def test_spet_bound_conv_hand_worked(tmp_path):
    # 1x1 conv, 2 input channels (|w| sums 4 and 1.5: channel 0 leads), a 1 x 3 map
    w = np.array([[-2.0, 1.0], [-2.0, 0.5]], np.float32).reshape(2, 2, 1, 1)
    path = conv_model(tmp_path / "c.onnx", w, np.zeros(2), (2, 1, 3))
    plan = build_plan(path)
    x = np.array([[1.0, 1.0, 4.0], [1.0, 3.0, 0.0]], np.float32).reshape(1, 2, 1, 3)
    engine = Engine(plan, knobs(conv={"spet": bound(1.0)}))
    out = engine.run(x)
    # partials -2, -2, -8 for both outputs; the rest (channel 1, its largest value 3: each map has
    # its own range) adds at most 1 x 3 (output 0) or 0.5 x 3 (output 1): output 0 stops at the
    # last position, output 1 everywhere (full sums -1.5, -0.5, -8; with the range of the whole
    # input, 4, it would not stop at the first two)
    assert out.reshape(2, 3).tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert np.array_equal(out, Engine(plan).run(x))
    c = engine.counter
    neurons, terminated = 6, 4
    assert c.get("conv", "terminated") == terminated
    macs = neurons * 1 + (neurons - terminated) * 1
    assert c.get("conv", "macs") == macs
    overhead = neurons + signed_channel_bound_ops(2, 3, 2, 1)
    assert c.get("conv", "overhead_spet") == overhead
    assert c.get("conv", "ops") == 2 * macs + neurons + (neurons - terminated) + overhead
    assert c.get("conv", "saved_spet") == 2 * terminated * 1 + terminated
    assert c.get("conv", "fallbacks") == 0


def test_spet_bound_extremes(tmp_path):
    w = -np.abs(RNG.normal(0, 1, (8, 3, 3, 3))).astype(np.float32)
    path = conv_model(tmp_path / "c.onnx", w, np.zeros(8), (3, 6, 6), pads=[1, 1, 1, 1])
    plan = build_plan(path)
    x = np.abs(RNG.normal(0, 1, (1, 3, 6, 6))).astype(np.float32) + 0.1
    dense = Engine(plan).run(x)
    neurons, kdim, lead = 8 * 36, 27, math.ceil(0.5 * 3) * 9
    # everything stops (all weights negative, input positive: the rest adds at most 0)
    every = Engine(plan, knobs(conv={"spet": bound(1.0)}))
    out = every.run(x)
    assert not out.any() and not dense.any()
    assert every.counter.get("conv", "terminated") == neurons
    assert every.counter.get("conv", "macs") == neurons * lead
    overhead = neurons + signed_channel_bound_ops(3, 36, 8, 3 - 2)
    assert every.counter.get("conv", "ops") == 2 * neurons * lead + neurons + overhead  # bias, overhead
    # nothing stops (positive weights): the dense result bit for bit, all MACs, the overhead on top
    for t in (1.0, 0.0, math.inf):  # at 0 the test is the partial sum < 0, which never holds here
        none = Engine(plan, knobs(conv={"spet": bound(t)}))
        positive = Engine(build_plan(conv_model(tmp_path / "p.onnx", -w, np.zeros(8), (3, 6, 6),
                                                pads=[1, 1, 1, 1])), knobs(conv={"spet": bound(t)}))
        assert np.array_equal(positive.run(x), Engine(positive.plan).run(x))
        c = positive.counter
        assert c.get("conv", "terminated") == 0 and c.get("conv", "fallbacks") == 1
        assert c.get("conv", "macs") == neurons * kdim
        assert c.get("conv", "ops") == 2 * neurons * kdim + 2 * neurons + overhead
        # .inf never fires even where everything would stop
        if math.isinf(t):
            assert np.array_equal(none.run(x), dense) and none.counter.get("conv", "terminated") == 0


def relu_conv_model(path, w, b, in_shape, **conv_attrs):
    """data -> Relu -> Conv -> Relu: the conv's input is known non-negative."""
    nodes = [helper.make_node("Relu", ["data"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "W", "b"], ["c"], name="conv", **conv_attrs),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    return save_model(path, nodes, {"W": w, "b": b}, in_shape, "r")


def test_spet_bound_counts_the_maxima_alone_after_a_relu(tmp_path):
    w = -np.abs(RNG.normal(0, 1, (4, 2, 3, 3))).astype(np.float32)
    plan = build_plan(relu_conv_model(tmp_path / "c.onnx", w, np.zeros(4), (2, 5, 5)))
    assert plan.layer("conv").input_nonneg
    engine = Engine(plan, knobs(conv={"spet": bound(1.0)}))
    engine.run(np.abs(RNG.normal(0, 1, (1, 2, 5, 5))).astype(np.float32) + 0.1)
    neurons = 4 * 9
    assert engine.counter.get("conv", "terminated") == neurons
    # each map's largest value (24 compares each), the largest of those (1); per output the rest
    # channel's MAC (2) and the rounding allowance (3); 1 compare per neuron
    assert engine.counter.get("conv", "overhead_spet") == (2 * 24 + 1) + 4 * (2 + 3) + neurons


def kernel_outputs(x, w, bias, lead_ch, margins, relu=False):
    """K.knob_conv on an unpadded stride-1 conv (natural channel order), SPET on with ``margins``:
    the outputs (O x positions) and the number stopped."""
    cin, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho, wo = h - kh + 1, wd - kw + 1
    taps = (np.arange(kh)[:, None] * wd + np.arange(kw)[None, :]).reshape(-1)
    tap_off = (np.arange(cin)[:, None] * h * wd + taps[None, :]).reshape(-1).astype(np.int64)
    k = cin * kh * kw
    out = np.full((o, ho * wo), np.nan, np.float32)
    stopped, _ = K.knob_conv(src=np.ascontiguousarray(x.reshape(-1)), tap_off=tap_off,
                             positions=np.arange(ho * wo, dtype=np.int32), wo=wo, sh=1, sw=1, row_width=wd,
                             W=np.ascontiguousarray(w.reshape(o, k)), lead=lead_ch * kh * kw, spet=True,
                             margins=margins, relu=relu, bias=bias, cst=None, mask=None, out=out,
                             panels=aligned_zeros((1, k * 32)), threads=1)
    return out, stopped


def test_spet_exact_bound_never_changes_an_output():
    """On random layers with non-negative inputs, the bound at scale 1 only stops neurons whose
    full sum is <= 0 (in float64 and in the kernel's own floats): every output equals, bit for
    bit, the same kernel's with nothing stopped (a stop never touches another output's floats),
    ReLU or not. Below 1 it stops at least the same neurons."""
    rng = np.random.default_rng(2026)
    stops = seeds_with_stops = 0
    for _ in range(150):
        cin, o, h = int(rng.integers(1, 7)), int(rng.integers(1, 20)), int(rng.integers(3, 12))
        k = int(rng.choice([1, 2, 3]))
        x = np.maximum(rng.normal(0, 1, (cin, h, h)), 0).astype(np.float32)
        if rng.random() < 0.3:
            x *= np.float32(rng.uniform(0.1, 30))
        w = (rng.normal(-rng.uniform(0, 1), 1, (o, cin, k, k))).astype(np.float32)
        b = rng.normal(-rng.uniform(0, 2), 1, o).astype(np.float32)
        lead_ch = int(rng.integers(1, cin + 1))
        setting = KnobSetting(True, 1.0, {"test": "bound"})
        count = {"overhead_spet": 0}
        margins = {t: spet_test_margins(KnobSetting(True, t, {"test": "bound"}),
                                        spet_bound(w.reshape(o, -1), b, k * k, t), o, lead_ch, x,
                                        np.arange(cin), True, count)
                   for t in (1.0, 0.5, math.inf)}
        assert setting.option("spet", "test") == "bound"
        for relu in (False, True):
            never, none_stopped = kernel_outputs(x, w, b, lead_ch, margins[math.inf], relu)
            exact, stopped = kernel_outputs(x, w, b, lead_ch, margins[1.0], relu)
            half, stopped_half = kernel_outputs(x, w, b, lead_ch, margins[0.5], relu)
            assert none_stopped == 0
            if relu:
                assert np.array_equal(exact, never)
            else:  # the stopped outputs are the zeros where `never` has its sum
                was_stopped = (exact == 0) & (never != 0)
                assert np.array_equal(exact[~was_stopped], never[~was_stopped])
                assert (never[was_stopped] <= 0).all()
                assert was_stopped.sum() <= stopped
            # monotone: whatever scale 1 stops, 0.5 stops
            assert stopped_half >= stopped
            assert not (half[exact == 0] != 0).any() if relu else True
        # the full sums in float64: every neuron stopped at scale 1 ends <= 0
        ref = np.einsum("chwij,ocij->ohw", np.lib.stride_tricks.sliding_window_view(
            x.astype(np.float64), (k, k), axis=(1, 2)), w.astype(np.float64)) + b[:, None, None]
        exact, stopped = kernel_outputs(x, w, b, lead_ch, margins[1.0], relu=False)
        never, _ = kernel_outputs(x, w, b, lead_ch, margins[math.inf], relu=False)
        assert (ref.reshape(o, -1)[(exact == 0) & (never != 0)] <= 0).all()
        stops += stopped
        seeds_with_stops += stopped > 0
    assert seeds_with_stops >= 30 and stops > 1000  # the property was exercised


@pytest.mark.parametrize("seed", range(12))
def test_spet_exact_bound_in_the_engine(tmp_path, seed):
    """The engine (padding, strides, SDSS and SFMA beside it): at scale 1 a stopped neuron was
    0 without SPET; when nothing fires the output is the dense one bit for bit (a finished
    neuron sums its lead and rest apart, so with SFMA firing it matches to rounding); scale
    0.5 stops at least as many; .inf never fires."""
    rng = np.random.default_rng(seed)
    cin, o, h = int(rng.integers(2, 6)), int(rng.integers(2, 12)), int(rng.integers(5, 12))
    w = rng.normal(-0.4, 1, (o, cin, 3, 3)).astype(np.float32)
    b = rng.normal(-0.5, 1, o).astype(np.float32)
    stride, pad = int(rng.integers(1, 3)), int(rng.integers(0, 2))
    plan = build_plan(relu_conv_model(tmp_path / "c.onnx", w, b, (cin, h, h), strides=[stride, stride],
                                      pads=[pad] * 4))
    x = rng.normal(0, 1, (1, cin, h, h)).astype(np.float32)
    dense = Engine(plan).run(x)
    extra = {}
    if seed % 3 == 1:
        extra = {"sdss": 0.0}  # on, never firing: positions go through the grid first
    elif seed % 3 == 2:
        x[0, 0] = 0.5  # a uniform map that SFMA drops (the bound covers the order past the lead)
        dense = Engine(plan).run(x)
        extra = {"sfma": 1e-3}
    results = {}
    for t in (1.0, 0.5, math.inf):
        engine = Engine(plan, knobs(conv={"spet": bound(t), **extra}))
        results[t] = (engine.run(x), engine.counter.get("conv", "terminated"))
    out, stopped = results[1.0]
    two = Engine(plan, knobs(conv={"spet": bound(1.0), **extra}), threads=2, tuning=EngineTuning(parallel_min_work=0))
    assert np.array_equal(two.run(x), out) and two.counter.get("conv", "terminated") == stopped
    base = Engine(plan, knobs(conv=extra)).run(x) if extra else dense
    if stopped == 0 and "sfma" not in extra:  # nothing fired: the knob-free result
        assert np.array_equal(out, base)
    else:
        np.testing.assert_allclose(out, base, rtol=1e-5, atol=1e-5 * float(np.abs(base).max() or 1))
        assert ((out == 0) | (base != 0)).all() and (out[base == 0] == 0).all()
    assert results[0.5][1] >= stopped and results[0.5][1] > 0  # (the seeds all stop some at 0.5)
    never, never_stopped = results[math.inf]
    assert never_stopped == 0
    if "sfma" in extra:
        np.testing.assert_allclose(never, base, rtol=1e-5, atol=1e-5 * float(np.abs(base).max() or 1))
    else:
        assert np.array_equal(never, base)


# ----------------------------------------------------------------------------- SDSS


def test_sdss_hand_worked(tmp_path):
    # identity 1x1 conv on a 5x5 map: grid rows/cols {0, 2, 4}: 9 grid points, 4 cells, 16 off-grid.
    path = conv_model(tmp_path / "c.onnx", np.ones((1, 1, 1, 1)), np.zeros(1), (1, 5, 5))
    plan = build_plan(path)
    x = np.zeros((1, 1, 5, 5), np.float32)
    x[0, 0, 1, 1] = 5.0  # off-grid, inside cell (0, 0) whose corners are all 0
    x[0, 0, 4, 4] = 1.0  # a grid corner of cell (1, 1): that cell is significant at t = 0.5
    engine = Engine(plan, knobs(conv={"sdss": 0.5}))
    out = engine.run(x)[0, 0]
    expected = np.zeros((5, 5), np.float32)
    expected[4, 4] = 1.0
    # cell (1, 1) (rows 2..4, cols 2..4) is computed exactly: its off-grid points are 0 in x,
    # and the 5.0 at (1, 1) is lost to the interpolation of cell (0, 0)
    assert np.array_equal(out, expected)
    c = engine.counter
    # an off-grid point belongs to the cell whose top-left corner precedes it (the last grid row and
    # column close the cells above/left of them): cells (0,0), (0,1), (1,0), (1,1) hold 3, 4, 4, 5 points
    filled = 3 + 4 + 4
    assert c.get("conv", "filled") == filled
    computed = 9 + 5  # the grid, and the significant cell's off-grid points
    assert c.get("conv", "macs") == computed
    overhead = 9 + 3 * 4 + filled * BILINEAR_FILL_OPS
    assert c.get("conv", "overhead_sdss") == overhead
    assert c.get("conv", "ops") == computed * (2 + 1 + 1) + overhead


def test_sdss_grid_geometry():
    grid = sdss_grid(6, 5, 2)
    assert grid.gy.tolist() == [0, 2, 4, 5] and grid.gx.tolist() == [0, 2, 4]
    assert len(grid.grid_positions) + len(grid.off_positions) == 30
    # every off-grid point lies inside its cell
    assert (grid.gy[grid.cell_y] <= grid.off_y).all() and (grid.off_y <= grid.gy[grid.cell_y + 1]).all()
    assert (grid.gx[grid.cell_x] <= grid.off_x).all() and (grid.off_x <= grid.gx[grid.cell_x + 1]).all()


def test_sdss_extremes(tmp_path):
    w = RNG.normal(0, .3, (4, 2, 3, 3)).astype(np.float32)
    path = conv_model(tmp_path / "c.onnx", w, np.zeros(4), (2, 9, 9), pads=[1, 1, 1, 1])
    plan = build_plan(path)
    x = RNG.normal(0, 1, (1, 2, 9, 9)).astype(np.float32)
    dense = Engine(plan).run(x)
    none = Engine(plan, knobs(conv={"sdss": 0.0}))
    assert np.array_equal(none.run(x), dense)
    assert none.counter.get("conv", "filled") == 0
    every = Engine(plan, knobs(conv={"sdss": (1e9, {"fill": "zero"})}))
    out = every.run(x)
    grid = sdss_grid(9, 9, 2)
    assert every.counter.get("conv", "filled") == 4 * len(grid.off_positions)
    assert every.counter.get("conv", "macs") == 4 * len(grid.grid_positions) * 18
    flat = out.reshape(4, -1)
    assert np.array_equal(flat[:, grid.grid_positions], dense.reshape(4, -1)[:, grid.grid_positions])
    assert not flat[:, grid.off_positions].any()


# ----------------------------------------------------------------------------- SFMA


def test_sfma_constant_map_is_exact_at_the_border(tmp_path):
    """A constant input map replaced by mean x kernel sums, border corrected, gives the dense result."""
    w = RNG.normal(0, .3, (3, 2, 3, 3)).astype(np.float32)
    path = conv_model(tmp_path / "c.onnx", w, RNG.normal(0, .1, 3), (2, 6, 6), relu=False, pads=[1, 1, 1, 1])
    plan = build_plan(path)
    x = np.empty((1, 2, 6, 6), np.float32)
    x[0, 0] = RNG.normal(0, 1, (6, 6))
    x[0, 1] = 0.75
    dense = Engine(plan).run(x)
    engine = Engine(plan, knobs(conv={"sfma": 1e-3}))
    out = engine.run(x)
    c = engine.counter
    assert c.get("conv", "dropped_maps") == 1
    np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5)
    hw = npos = 36
    stats = 2 * hw * (3 + 2) + 2 * SFMA_TEST_OPS + 2 + 1  # sums, |x| (signed input), tests, layer mean
    # plus the mean-weighted kernel (2 per tap), the border-class sums and one add per output neuron
    assert c.get("conv", "overhead_sfma") > stats + 2 * 3 * 1 * 9 + 3 * npos
    assert c.get("conv", "macs") == 3 * npos * 9  # one of two maps left
    assert c.get("conv", "saved_sfma") == 2 * 3 * npos * 9


def test_sfma_ops_hand_worked_without_padding(tmp_path):
    # no padding: one border class holding all 4 taps
    w = np.ones((1, 2, 2, 2), np.float32)
    path = conv_model(tmp_path / "c.onnx", w, np.zeros(1), (2, 3, 3), relu=False)
    x = np.zeros((1, 2, 3, 3), np.float32)
    x[0, 0] = np.arange(9).reshape(3, 3)
    x[0, 1] = 2.0
    engine = Engine(build_plan(path), knobs(conv={"sfma": 0.01}))
    out = engine.run(x)
    dense = Engine(build_plan(path)).run(x)
    assert np.array_equal(out, dense)
    hw, cin, cout, kk, npos = 9, 2, 1, 4, 4
    stats = cin * hw * 5 + cin * SFMA_TEST_OPS + (cin + 1)
    constant = 2 * cout * 1 * kk + cout * kk + cout * npos
    assert engine.counter.get("conv", "overhead_sfma") == stats + constant
    assert engine.counter.get("conv", "macs") == cout * npos * kk
    assert engine.counter.get("conv", "ops") == 2 * 16 + 4 + stats + constant  # MACs, bias, SFMA


def test_sfma_extremes(tmp_path):
    w = RNG.normal(0, .3, (4, 3, 3, 3)).astype(np.float32)
    path = conv_model(tmp_path / "c.onnx", w, np.zeros(4), (3, 7, 7), pads=[1, 1, 1, 1])
    plan = build_plan(path)
    x = RNG.normal(0, 1, (1, 3, 7, 7)).astype(np.float32)
    dense = Engine(plan).run(x)
    assert np.array_equal(Engine(plan, knobs(conv={"sfma": 0.0})).run(x), dense)
    every = Engine(plan, knobs(conv={"sfma": 1e9}))
    out = every.run(x)
    assert every.counter.get("conv", "dropped_maps") == 3 and every.counter.get("conv", "macs") == 0
    # every map is its mean: the output is the conv of the per-channel mean maps
    mean_x = np.broadcast_to(x.mean(axis=(2, 3), keepdims=True), x.shape).astype(np.float32).copy()
    np.testing.assert_allclose(out, Engine(plan).run(mean_x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- all three vs a numpy reference


def _conv_ref(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """Plain float64 convolution, stride 1, symmetric zero padding."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], axis=(1, 2))  # C, Ho, Wo, kh, kw
    return np.einsum("chwij,ocij->ohw", win, w.astype(np.float64))


def reference_knobs(x, w, b, pad, sfma_t, sdss_t, spet_t, fraction=0.5):
    """The specification's rules written directly: SFMA, then SPET per neuron, then SDSS fill."""
    means = x.astype(np.float64).mean(axis=(1, 2))
    std = x.astype(np.float64).std(axis=(1, 2))
    spread = std / np.abs(x.astype(np.float64)).mean()
    dropped = spread < sfma_t
    const_x = np.where(dropped[:, None, None], means[:, None, None], 0) * np.ones_like(x, dtype=np.float64)
    kept_x = np.where(dropped[:, None, None], 0, x)
    full = _conv_ref(kept_x, w, pad) + _conv_ref(const_x, w, pad) + b[:, None, None]
    order = np.argsort(-np.abs(w).sum(axis=(0, 2, 3)), kind="stable")
    kept = [c for c in order if not dropped[c]]
    lead = kept[: max(1, math.ceil(fraction * len(kept)))]
    lead_x = np.zeros_like(x, dtype=np.float64)
    lead_x[lead] = x[lead]
    partial = _conv_ref(lead_x, w, pad) + _conv_ref(const_x, w, pad) + b[:, None, None]
    out = np.where(partial < -spet_t, 0.0, np.maximum(full, 0.0))
    grid = sdss_grid(out.shape[1], out.shape[2], 2)
    gy, gx = grid.gy, grid.gx
    for o in range(out.shape[0]):
        for y, xx, cy, cx in zip(grid.off_y, grid.off_x, grid.cell_y, grid.cell_x):
            y0, y1, x0, x1 = gy[cy], gy[cy + 1], gx[cx], gx[cx + 1]
            corners = [out[o, y0, x0], out[o, y0, x1], out[o, y1, x0], out[o, y1, x1]]
            if all(v < sdss_t for v in corners):
                fy, fx = (y - y0) / (y1 - y0), (xx - x0) / (x1 - x0)
                top = corners[0] + fx * (corners[1] - corners[0])
                bottom = corners[2] + fx * (corners[3] - corners[2])
                out[o, y, xx] = top + fy * (bottom - top)
    return out, partial


@pytest.mark.parametrize("cin, cout, h, threads, seed", [
    (6, 5, 11, 1, None),
    # several 32-position panels, output channels not a multiple of 8, scattered SDSS positions
    # unfolded by gathers, and the panels shared out between two threads
    (7, 11, 19, 2, 7),
])
def test_all_three_knobs_match_the_reference(tmp_path, cin, cout, h, threads, seed):
    rng = RNG if seed is None else np.random.default_rng(seed)
    w = rng.normal(0, .25, (cout, cin, 3, 3)).astype(np.float32)
    b = rng.normal(0, .1, cout).astype(np.float32)
    path = conv_model(tmp_path / "c.onnx", w, b, (cin, h, h), pads=[1, 1, 1, 1])
    plan = build_plan(path)
    x = rng.normal(0, 1, (1, cin, h, h)).astype(np.float32)
    x[0, 2] = 0.3 + rng.normal(0, 0.01, (h, h))  # near-uniform map: SFMA drops it
    x[0, 4] = 0.0  # dead map
    sfma_t, sdss_t, spet_t = 0.05, 0.4, 0.3
    engine = Engine(plan, knobs(conv={"sfma": sfma_t, "sdss": sdss_t, "spet": spet_t}), threads=threads,
                    tuning=EngineTuning(parallel_min_work=0))
    out = engine.run(x)[0]
    ref, partial = reference_knobs(x[0], w, b, 1, sfma_t, sdss_t, spet_t)
    assert np.abs(np.abs(partial) - spet_t).min() > 1e-4, "a partial sum sits on the threshold; pick another seed"
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    c = engine.counter
    assert c.get("conv", "dropped_maps") == 2
    assert c.get("conv", "terminated") > 0 and c.get("conv", "filled") > 0
    assert c.get("conv", "ops") < plan.layer("conv").dense_ops


class RecordedChoice:
    """A K.ThreadChoice that also keeps which way each run of ``engine`` took, and the threads
    its last layer's kernels were given."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.choice, self.ways = engine, K.ThreadChoice(), []

    def one_thread_next(self) -> bool:
        return self.choice.one_thread_next()

    def record(self, one_thread: bool, seconds: float) -> None:
        self.ways.append((one_thread, self.engine.kernel_threads))
        self.choice.record(one_thread, seconds)


def test_knob_path_on_two_threads_takes_one_or_both_with_the_same_floats(tmp_path):
    """On a busy machine each knob layer's parallel region waits for a descheduled thread, so a
    whole image's Python path takes one thread or both by their recent times: either way gives
    the one-thread engine's floats and counts."""
    rng = np.random.default_rng(11)
    w = rng.normal(0, .25, (11, 7, 3, 3)).astype(np.float32)
    path = conv_model(tmp_path / "c.onnx", w, rng.normal(0, .1, 11).astype(np.float32), (7, 19, 19), pads=[1, 1, 1, 1])
    plan = build_plan(path)
    config = knobs(conv={"sfma": 0.05, "sdss": 0.4, "spet": 0.3})
    tuning = EngineTuning(parallel_min_work=0)
    one, two = Engine(plan, config, threads=1, tuning=tuning), Engine(plan, config, threads=2, tuning=tuning)
    assert two.has_python_path and not one.has_python_path
    two.python_path_choice = RecordedChoice(two)
    for _ in range(12):
        x = rng.normal(0, 1, (1, 7, 19, 19)).astype(np.float32)
        assert np.array_equal(one.run(x), two.run(x))
    assert set(two.python_path_choice.ways) == {(True, 1), (False, 2)}
    assert one.counter.get("conv", "ops") == two.counter.get("conv", "ops") > 0


def test_nothing_fires_is_bit_exact_on_a_deep_net(tmp_path):
    w = RNG.normal(0, .3, (8, 3, 3, 3)).astype(np.float32)
    path = conv_model(tmp_path / "c.onnx", w, np.zeros(8), (3, 12, 12), pads=[1, 1, 1, 1], group=1)
    plan = build_plan(path)
    x = RNG.normal(0, 1, (3, 3, 12, 12)).astype(np.float32)
    off = knobs(conv={"sfma": 0.0, "sdss": 0.0, "spet": math.inf})
    assert np.array_equal(Engine(plan, off).run(x), Engine(plan).run(x))


# ----------------------------------------------------------------------------- knob files


@pytest.fixture()
def small_plan(tmp_path):
    w = RNG.normal(0, .3, (4, 3, 3, 3)).astype(np.float32)
    return build_plan(conv_model(tmp_path / "c.onnx", w, np.zeros(4), (3, 8, 8), pads=[1, 1, 1, 1]))


@pytest.mark.parametrize("text, message", [
    ("layers: {convX: {spet: {threshold: 1}}}", "unknown layer 'convX'"),
    ("layers: {conv: {warp: {threshold: 1}}}", "unknown knob 'warp'"),
    ("layers: {conv: {spet: {threshold: high}}}", "threshold must be a number"),
    ("layers: {conv: {spet: {threshold: -1}}}", "threshold must be >= 0"),
    ("layers: {conv: {spet: {}}}", "missing threshold"),
    ("layers: {conv: {sdss: {threshold: 1, fill: cubic}}}", "fill must be one of"),
    ("layers: {conv: {spet: {threshold: 1, fraction: 2}}}", "fraction must be"),
    ("layers: {conv: {spet: {threshold: 1, test: exact}}}", "option test must be one of margin, bound"),
    ("layers: {conv: {spet: {threshold: -0.5, test: bound}}}", "threshold must be >= 0"),
    ("layers: [1, 2]", "'layers' must map"),
    ("layers: {conv: {spet: {threshold: 1}}", "not valid YAML"),
])
def test_bad_knob_files_fail_with_one_line(tmp_path, small_plan, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DyveError) as err:
        load_knobs(path, small_plan)
    assert message in str(err.value) and "bad.yaml" in str(err.value) and "\n" not in str(err.value)


def test_spet_bound_knob_file(tmp_path, small_plan):
    path = tmp_path / "k.yaml"
    path.write_text("layers: {conv: {spet: {threshold: 1.0, test: bound}}}")
    setting = load_knobs(path, small_plan).get("conv", "spet")
    assert setting.option("spet", "test") == "bound" and setting.threshold == 1.0
    assert KnobSetting(True, 0.5).option("spet", "test") == "margin"  # the default: the specification's rule


def test_knob_file_round_trip(tmp_path, small_plan):
    config = knobs(conv={"spet": 0.25, "sdss": (0.5, {"fill": "zero"}), "sfma": math.inf})
    config.save(tmp_path / "k.yaml")
    loaded = load_knobs(tmp_path / "k.yaml", small_plan)
    assert loaded.get("conv", "spet").threshold == 0.25
    assert loaded.get("conv", "sdss").option("sdss", "fill") == "zero"
    assert loaded.get("conv", "sdss").option("sdss", "stride") == 2
    assert math.isinf(loaded.get("conv", "sfma").threshold)
