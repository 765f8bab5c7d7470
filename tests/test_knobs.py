"""The three knobs: hand-worked cases with exact op counts (nothing skipped, everything skipped),
bit-exactness when nothing fires, an independent numpy reference of the rules, and knob files."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dyvedeep.engine import BILINEAR_FILL_OPS, SFMA_TEST_OPS, Engine, EngineTuning, sdss_grid
from dyvedeep.errors import DyveError
from dyvedeep.knobs import KnobConfig, load_knobs
from dyvedeep.plan import build_plan
from tests.onnx_builders import conv_model, fc_model

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
    ("layers: [1, 2]", "'layers' must map"),
    ("layers: {conv: {spet: {threshold: 1}}", "not valid YAML"),
])
def test_bad_knob_files_fail_with_one_line(tmp_path, small_plan, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DyveError) as err:
        load_knobs(path, small_plan)
    assert message in str(err.value) and "bad.yaml" in str(err.value) and "\n" not in str(err.value)


def test_knob_file_round_trip(tmp_path, small_plan):
    config = knobs(conv={"spet": 0.25, "sdss": (0.5, {"fill": "zero"}), "sfma": math.inf})
    config.save(tmp_path / "k.yaml")
    loaded = load_knobs(tmp_path / "k.yaml", small_plan)
    assert loaded.get("conv", "spet").threshold == 0.25
    assert loaded.get("conv", "sdss").option("sdss", "fill") == "zero"
    assert loaded.get("conv", "sdss").option("sdss", "stride") == 2
    assert math.isinf(loaded.get("conv", "sfma").threshold)
