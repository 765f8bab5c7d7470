"""The kernels' contracts (dyvedeep._kernels), whatever instruction set they were built for: the
GEMM, the direct and panel convolution routes and pooling against numpy references, threads
and programs giving the same floats as one thread run at once. `make test-avx2` runs this file
on the AVX2 build as well (DYVEDEEP_EXPECT_ISA names the build under test)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from dyvedeep import _kernels as K
from dyvedeep.engine.conv_plan import ocvec_weight_blocks
from dyvedeep.engine.memory import aligned_zeros

RNG = np.random.default_rng(7)


def test_the_build_is_the_one_asked_for():
    assert K.ISA in ("avx512", "avx2", "neon", "generic")
    expected = os.environ.get("DYVEDEEP_EXPECT_ISA")
    if expected:
        assert K.ISA == expected, (K.ISA, K.__file__)


def conv_reference(x, w, kh, kw, sh, sw, bias, relu):
    """out[o, y * wo + x] in float64 (valid convolution of x: C x H x W, w: O x C*kh*kw)."""
    c, h, wd = x.shape
    ho, wo = (h - kh) // sh + 1, (wd - kw) // sw + 1
    cols = np.empty((c, kh, kw, ho, wo))
    for ky in range(kh):
        for kx in range(kw):
            cols[:, ky, kx] = x[:, ky:ky + sh * (ho - 1) + 1:sh, kx:kx + sw * (wo - 1) + 1:sw]
    out = w.astype(np.float64) @ cols.reshape(c * kh * kw, ho * wo) + bias[:, None]
    return np.maximum(out, 0) if relu else out


def close(ours, ref):
    scale = np.abs(ref).max() + 1e-30
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6 * scale * max(1, np.sqrt(ref.size) / 64))


def tap_offsets(c, kh, kw, h, w):
    return (np.arange(c)[:, None, None] * h * w + np.arange(kh)[:, None] * w + np.arange(kw)).reshape(-1).astype(np.int64)


def test_claimed_units_give_the_same_floats_on_any_number_of_threads():
    """Channel-vector steps, whose threads claim units of positions and take each other's
    (dv_claim): a program of 300 of them (more shares than a run keeps on its stack on two and
    three threads) gives one thread's floats on 2, 3 and 5 threads (more threads than some steps
    have units), and each step numpy's convolution."""
    C, H, W, kh, O, steps = 8, 9, 9, 3, 80, 300
    x = RNG.standard_normal((C, H, W)).astype(np.float32)
    w = RNG.standard_normal((O, C * kh * kh)).astype(np.float32)
    bias = RNG.standard_normal(O).astype(np.float32)
    ho, wo = H - kh + 1, W - kh + 1
    tap = tap_offsets(C, kh, kh, H, W)
    oy, ox = np.divmod(np.arange(ho * wo), wo)
    blocks = ocvec_weight_blocks(w)
    outs = {}
    for threads in (1, 2, 3, 5):
        program = K.Program()
        partial = aligned_zeros((threads, K.ocvec_partial_floats()))
        outs[threads] = [np.full((O, ho * wo), np.nan, np.float32) for _ in range(steps)]
        for i, out in enumerate(outs[threads]):
            positions = (oy * W + ox)[: ho * wo - i % 40].astype(np.int32)  # 41..81 positions
            K.conv_ocvec(x, 0, 0, 0, H, W, False, np.zeros(1, np.float32), tap, positions, blocks, bias, True, out,
                         partial, threads, program)
        program.run()
    ref = conv_reference(x, w, kh, kh, 1, 1, bias, True).reshape(O, -1)
    for i, out in enumerate(outs[1]):
        n = ho * wo - i % 40
        close(out[:, :n], ref[:, :n])
        assert np.isnan(out[:, n:]).all()
    for threads in (2, 3, 5):
        for out, one in zip(outs[threads], outs[1]):
            assert np.array_equal(out, one, equal_nan=True)


# shapes: partial 16- and 32-column tiles, 8-row blocks with a remainder, K past one block (192)
@pytest.mark.parametrize("O,depth,N", [(1, 1, 1), (7, 5, 13), (8, 3, 16), (13, 27, 33), (20, 200, 47), (70, 9, 5)])
@pytest.mark.parametrize("relu", [False, True])
def test_gemm_matches_numpy(O, depth, N, relu):
    w = RNG.standard_normal((O, depth)).astype(np.float32)
    b = RNG.standard_normal((depth, N)).astype(np.float32)
    bias = RNG.standard_normal(O).astype(np.float32)
    cols = np.zeros(((N + 31) // 32, depth, 32), np.float32)
    for j in range(N):
        cols[j // 32, :, j % 32] = b[:, j]
    out = np.empty((O, N), np.float32)
    K.conv_gemm(w, cols, N, out, bias, relu)
    ref = w.astype(np.float64) @ b + bias[:, None]
    close(out, np.maximum(ref, 0) if relu else ref)
    # without bias the product is added to what out holds
    before = RNG.standard_normal((O, N)).astype(np.float32)
    out2 = before.copy()
    K.conv_gemm(w, cols, N, out2)
    close(out2, before + w.astype(np.float64) @ b)


@pytest.mark.parametrize("C,H,W,kh,O", [(3, 9, 13, 3, 10), (2, 20, 37, 3, 17), (16, 6, 6, 1, 9), (4, 18, 18, 5, 8)])
@pytest.mark.parametrize("across", [False, True])
def test_direct_route_matches_numpy(C, H, W, kh, O, across):
    x = RNG.standard_normal((C, H, W)).astype(np.float32)
    w = RNG.standard_normal((O, C * kh * kh)).astype(np.float32)
    bias = RNG.standard_normal(O).astype(np.float32)
    ho, wo = H - kh + 1, W - kh + 1
    vectors = K.direct_vectors(ho, wo, 1, W, across)
    out = np.full((O, ho * wo), np.nan, np.float32)
    K.conv_direct(x, 0, 0, 0, H, W, False, np.zeros(1, np.float32), tap_offsets(C, kh, kh, H, W), vectors, w,
                  bias, True, out)
    close(out, conv_reference(x, w, kh, kh, 1, 1, bias, True))


@pytest.mark.parametrize("C,H,W,kh,s,O", [(3, 11, 11, 3, 1, 10), (2, 15, 40, 3, 2, 17), (5, 9, 9, 3, 2, 24)])
def test_panel_route_matches_numpy(C, H, W, kh, s, O):
    x = RNG.standard_normal((C, H, W)).astype(np.float32)
    w = RNG.standard_normal((O, C * kh * kh)).astype(np.float32)
    bias = RNG.standard_normal(O).astype(np.float32)
    ho, wo = (H - kh) // s + 1, (W - kh) // s + 1
    runs, panel_first = K.im2col_run_table(ho, wo, s, s, W)
    out = np.full((O, ho * wo), np.nan, np.float32)
    panels = np.zeros((1, C * kh * kh * 32), np.float32)
    K.conv_panel(x, 0, 0, 0, H, W, False, np.zeros(1, np.float32), tap_offsets(C, kh, kh, H, W), s, runs,
                 panel_first, w, bias, False, out, panels)
    close(out, conv_reference(x, w, kh, kh, s, s, bias, False))


@pytest.mark.parametrize("O, Kd", [(5, 40), (64, 1024), (10, 64), (7, 3), (3, 37), (4, 0)])
def test_fully_connected_product_matches_numpy_on_any_number_of_threads(O, Kd):
    """gemv_bias (a fully-connected layer on one image): W x + bias as numpy's in double, the
    same floats on 1, 2 or 3 threads and as a step of a program, ReLU as the max with 0."""
    W = RNG.standard_normal((O, Kd)).astype(np.float32)
    x = RNG.standard_normal(Kd).astype(np.float32)
    bias = RNG.standard_normal(O).astype(np.float32)
    outs = []
    for threads in (1, 2, 3):
        out = np.full(O, np.nan, np.float32)
        K.gemv_bias(W, x, bias, out, threads=threads)
        outs.append(out)
    close(outs[0], W.astype(np.float64) @ x + bias)
    assert all(np.array_equal(outs[0], out) for out in outs[1:])
    program, out = K.Program(), np.full(O, np.nan, np.float32)
    K.gemv_bias(W, x, bias, out, relu=True, threads=2, program=program)
    assert np.isnan(out).all() and program.step_kinds() == ["gemv"]
    program.run()
    assert np.array_equal(out, np.maximum(outs[0], 0))
    with pytest.raises(ValueError, match="gemv_bias"):
        K.gemv_bias(W, x, bias[:-1], out)


def test_reference_loop_runs_every_unit_once_on_any_number_of_threads():
    """The yardstick of bench --load: every unit gives the same float, so the sum tells a unit
    skipped or run twice by the threads' sharing."""
    one_unit = K.yardstick(1, 1, 500)
    assert 0 < one_unit < 8
    for threads in (1, 2, 3, 5):
        assert K.yardstick(threads, 37, 500) == 37 * one_unit
    assert K.yardstick(2, 0, 500) == 0
    assert K.yardstick(2, 4, 0) == 4 * K.yardstick(1, 1, 0) != 4 * one_unit
    with pytest.raises(ValueError, match="yardstick"):
        K.yardstick(0, 4, 10)


def test_threads_and_programs_give_the_same_floats():
    C, H, W, kh, O = 8, 14, 14, 3, 40
    x = RNG.standard_normal((C, H, W)).astype(np.float32)
    w = RNG.standard_normal((O, C * kh * kh)).astype(np.float32)
    bias = RNG.standard_normal(O).astype(np.float32)
    ho, wo = H - kh + 1, W - kh + 1
    tap = tap_offsets(C, kh, kh, H, W)
    vectors = K.direct_vectors(ho, wo, 1, W, True)
    runs, panel_first = K.im2col_run_table(ho, wo, 1, 1, W)
    outs = []
    for threads in (1, 2):
        for use_program in (False, True):
            program = K.Program() if use_program else None
            direct = np.empty((O, ho * wo), np.float32)
            panel = np.empty((O, ho * wo), np.float32)
            panels = np.zeros((threads, C * kh * kh * 32), np.float32)
            K.conv_direct(x, 0, 0, 0, H, W, False, np.zeros(1, np.float32), tap, vectors, w, bias, True, direct,
                          threads, 0, program)
            K.conv_panel(x, 0, 0, 0, H, W, False, np.zeros(1, np.float32), tap, 1, runs, panel_first, w, bias, True,
                         panel, panels, threads, program)
            if program is not None:
                program.run()
            outs.append((direct, panel))
    for direct, panel in outs:
        assert np.array_equal(direct, outs[0][0]) and np.array_equal(panel, outs[0][1])
    # a program run again and again (one thread or both, as its timings choose) keeps its floats
    for _ in range(2 * K.PROBE_EVERY):
        direct[:] = np.nan
        program.run()
        assert np.array_equal(direct, outs[0][0])
    # the two routes sum the same products in the same order
    assert np.array_equal(outs[0][0], outs[0][1])


def run_choice(choice, steady, cold, runs, change=None):
    """Ways a ThreadChoice takes over ``runs`` runs (True: one thread) when way w takes
    steady[w] seconds, or cold[w] on a run right after a run the other way; ``change(run,
    steady)`` may change the steady times before a run."""
    ways, last = [], None
    for run in range(runs):
        if change is not None:
            change(run, steady)
        one = choice.one_thread_next()
        choice.record(one, cold[one] if last is not None and one != last else steady[one])
        ways.append(one)
        last = one
    return ways


def stretches(ways, start=0, stop=None):
    """(way, first run, runs) of each stretch of runs the same way in ways[start:stop]."""
    out = []
    for run in range(start, len(ways) if stop is None else stop):
        if out and out[-1][0] == ways[run]:
            out[-1][2] += 1
        else:
            out.append([ways[run], run, 1])
    return [tuple(s) for s in out]


def probes(ways, settled, start, stop=None):
    """First runs of the probes (stretches the other way) in ways[start:stop], asserting that
    each is two runs (the first not judged): the choice stays on ``settled`` but for them."""
    parts = stretches(ways, start, stop)
    if parts[0][0] != settled:  # a probe under way at start
        assert parts[0][2] <= 2, parts
        parts = parts[1:]
    other = [(first, runs) for way, first, runs in parts if way != settled]
    assert all(runs == 2 for first, runs in other[:-1]), parts  # the last may be cut by stop
    return [first for first, _ in other]


def test_thread_choice_follows_the_faster_way():
    """A program's choice of one thread or all: all first, then one (two runs each, the first
    not judged); all threads turning faster is found by the next probe (PROBE_FIRST runs after
    settling), probes then come at doubling intervals up to PROBE_EVERY; all threads turning
    slow (a busy machine) moves it to one thread within a few runs."""
    slow_from = None

    def change(run, steady):
        if run == 2:
            steady[False] = 0.005
        if run == slow_from:
            steady[False], steady[True] = 0.030, 0.015

    calm = run_choice(K.ThreadChoice(), {True: 0.010, False: 0.020}, {True: 0.010, False: 0.020}, 6 * K.PROBE_EVERY,
                      change)
    slow_from = probes(calm, False, 4 * K.PROBE_EVERY)[0] + 3  # on all threads, between probes
    steady = {True: 0.010, False: 0.020}
    ways = run_choice(K.ThreadChoice(), steady, steady, slow_from + 3 * K.PROBE_EVERY, change)
    assert ways[:4] == [False, False, True, True]
    # on one thread from run 4 (all threads measured slower), until its first probe
    assert stretches(ways, 4)[0] == (True, 4, K.PROBE_FIRST)
    back = 4 + K.PROBE_FIRST + 2  # the probe found all threads faster: taken from here on
    starts = probes(ways, False, back, slow_from)
    gaps = [b - a for a, b in zip([back - 2 + 2] + starts, starts)]
    expect = [min(K.PROBE_FIRST << i, K.PROBE_EVERY) for i in range(len(gaps))]
    expect[0] = K.PROBE_FIRST
    assert gaps == expect, (starts, ways[:slow_from])
    # all threads slower from slow_from: one thread after three slow runs (the fastest of the
    # last three is then slow), all threads only in probes once settled
    settle = slow_from + 3
    assert all(w is False for w in ways[slow_from:settle]) and ways[settle] is True
    assert len(probes(ways, True, len(ways) - 2 * K.PROBE_EVERY)) >= 1


def test_thread_choice_rides_out_a_burst():
    """All threads are faster, but runs with them are slowed six-fold for a while (another
    engine's thread pool spinning on after its own runs). Two slow runs in a row leave the
    choice on all threads but for its probes (a median of three would move it to one thread
    until probes outvoted the slow runs); five move it to one thread, and the first probe,
    PROBE_FIRST runs later, brings it back."""
    steady = {True: 0.010, False: 0.005}
    calm = run_choice(K.ThreadChoice(), dict(steady), dict(steady), 6 * K.PROBE_EVERY)
    burst_from = probes(calm, False, 4 + K.PROBE_FIRST + 2)[-2] + 3  # on all threads, between probes
    for burst_runs in (2, 5):
        steady = {True: 0.010, False: 0.005}

        def burst(run, steady):
            steady[False] = 0.030 if burst_from <= run < burst_from + burst_runs else 0.005

        ways = run_choice(K.ThreadChoice(), steady, steady, 6 * K.PROBE_EVERY, burst)
        assert ways[:burst_from] == calm[:burst_from]
        if burst_runs == 2:
            probes(ways, False, burst_from)
        else:
            # three slow runs, then one thread until the first probe
            assert stretches(ways, burst_from)[:2] == [(False, burst_from, 3), (True, burst_from + 3, K.PROBE_FIRST)]
            probes(ways, False, burst_from + 3 + K.PROBE_FIRST)


def test_thread_choice_does_not_judge_a_cold_switch():
    """All threads are faster once warm (0.64 ms against 0.75 ms), but the first run with all
    threads after runs on one is slow (0.95 ms: idle threads waking, their caches cold), as is
    the very first run: the choice still settles on all threads, and keeps them but for its
    probes."""
    steady, cold = {True: 0.75e-3, False: 0.64e-3}, {True: 0.80e-3, False: 0.95e-3}

    def first_run_cold(run, steady):
        steady[False] = 1.0e-3 if run == 0 else 0.64e-3

    ways = run_choice(K.ThreadChoice(), steady, cold, 4 * K.PROBE_EVERY, first_run_cold)
    assert len(probes(ways, False, 4 + K.PROBE_FIRST + 2)) >= 3


def pool_reference(x, kh, kw, sh, sw, pt, pl, ho, wo, op):
    c, h, w = x.shape
    out = np.empty((c, ho, wo))
    for oy in range(ho):
        for ox in range(wo):
            y0, x0 = oy * sh - pt, ox * sw - pl
            win = x[:, max(y0, 0):min(y0 + kh, h), max(x0, 0):min(x0 + kw, w)]
            out[:, oy, ox] = win.max(axis=(1, 2)) if op == "max" else win.mean(axis=(1, 2))
    return out


def test_max_and_average_pooling_match_numpy_on_random_shapes():
    """Max and average pooling on random shapes: windows of 1-4 columns, strides 1-3, ceil-mode outputs (the
    last windows past the input's right and bottom edges), odd widths, left and top padding,
    rows of several vectors; into planes that lie apart (a band of a larger output)."""
    rng = np.random.default_rng(19)
    for _ in range(60):
        kh, kw = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        sh, sw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        pt, pl = int(rng.integers(0, kh)), int(rng.integers(0, kw))
        H, W = int(rng.integers(kh, 40)), int(rng.integers(kw, 120))
        ceil = bool(rng.integers(0, 2))
        ho = -(-(H + pt - kh) // sh) + 1 if ceil else (H + pt - kh) // sh + 1
        wo = -(-(W + pl - kw) // sw) + 1 if ceil else (W + pl - kw) // sw + 1
        # ONNX's ceil rule: the last window starts inside the input or its left/top padding
        ho -= (ho - 1) * sh >= H + pt
        wo -= (wo - 1) * sw >= W + pl
        x = rng.standard_normal((3, H, W)).astype(np.float32)
        whole = np.full((3, ho + 2, wo), np.nan, np.float32)
        K.maxpool(x, whole[:, 1:1 + ho], kh, kw, sh, sw, pt, pl)
        expected = pool_reference(x, kh, kw, sh, sw, pt, pl, ho, wo, "max").astype(np.float32)
        assert np.array_equal(whole[:, 1:1 + ho], expected), (kh, kw, sh, sw, pt, pl, H, W)
        assert np.isnan(whole[:, 0]).all() and np.isnan(whole[:, -1]).all()
        means = np.empty((3, ho, wo), np.float32)
        K.avgpool(x, means, kh, kw, sh, sw, pt, pl, kh - 1, kw - 1, False)
        close(means, pool_reference(x, kh, kw, sh, sw, pt, pl, ho, wo, "mean"))


@pytest.mark.parametrize("H,W,k,s,p", [(13, 13, 3, 2, 0), (32, 32, 3, 2, 1), (7, 40, 2, 2, 0), (9, 9, 3, 1, 1)])
def test_pooling_matches_numpy(H, W, k, s, p):
    x = RNG.standard_normal((5, H, W)).astype(np.float32)
    ho, wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    out = np.empty((5, ho, wo), np.float32)
    K.maxpool(x, out, k, k, s, s, p, p)
    assert np.array_equal(out, pool_reference(x, k, k, s, s, p, p, ho, wo, "max").astype(np.float32))
    out = np.empty((5, ho, wo), np.float32)
    K.avgpool(x, out, k, k, s, s, p, p, p, p, False)
    close(out, pool_reference(x, k, k, s, s, p, p, ho, wo, "mean"))
    means = np.empty(5, np.float32)
    K.global_avgpool(x.reshape(5, -1), means)
    close(means, x.reshape(5, -1).astype(np.float64).mean(axis=1))


@pytest.mark.parametrize("O, H, W, stride", [(3, 9, 9, 2), (5, 13, 8, 3), (2, 6, 5, 2), (4, 17, 12, 4), (1, 2, 7, 2)])
def test_sdss_cells_union_and_fill_match_numpy(O, H, W, stride):
    from dyvedeep.engine.sdss import sdss_grid
    grid = sdss_grid(H, W, stride)
    maps = RNG.normal(0, 1, (O, H, W)).astype(np.float32)
    threshold = 0.3
    # a cell is insignificant when its four grid corners are below the threshold
    below = maps[:, grid.gy][:, :, grid.gx] < threshold
    expected = below[:, :-1, :-1] & below[:, :-1, 1:] & below[:, 1:, :-1] & below[:, 1:, 1:]
    insig = np.empty(expected.shape, np.uint8)
    assert K.sdss_cells(out=maps, gy=grid.gy, gx=grid.gx, threshold=threshold, insignificant=insig) == expected.sum()
    assert np.array_equal(insig, expected)
    # an off-grid position is needed by the maps where its cell is significant
    significant = ~expected[:, grid.cell_y, grid.cell_x]  # maps x off-grid positions
    some = significant.any(axis=0)
    positions, needed, total = K.sdss_union(insignificant=insig, off_positions=grid.off_positions,
                                            cell_y=grid.cell_y, cell_x=grid.cell_x)
    assert np.array_equal(positions, grid.off_positions[some])
    assert np.array_equal(needed, significant[:, some]) and total == significant.sum()
    # the others are filled: bilinear from the cell's corners, or 0
    y0, y1 = grid.gy[grid.cell_y], grid.gy[grid.cell_y + 1]
    x0, x1 = grid.gx[grid.cell_x], grid.gx[grid.cell_x + 1]
    fy = ((grid.off_y - y0) / (y1 - y0))[None]
    fx = ((grid.off_x - x0) / (x1 - x0))[None]
    corner = lambda y, x: maps[:, y, x].astype(np.float64)  # noqa: E731
    top = corner(y0, x0) + fx * (corner(y0, x1) - corner(y0, x0))
    bottom = corner(y1, x0) + fx * (corner(y1, x1) - corner(y1, x0))
    for bilinear in (True, False):
        out = maps.copy()
        filled = K.sdss_fill(out=out, gy=grid.gy, gx=grid.gx, pos_y=grid.off_y, pos_x=grid.off_x,
                             cell_y=grid.cell_y, cell_x=grid.cell_x, insignificant=insig, bilinear=bilinear)
        assert filled == (~significant).sum()
        ref = maps.astype(np.float64).copy()
        value = top + fy * (bottom - top) if bilinear else np.zeros_like(top)
        flat = ref.reshape(O, -1)
        flat[:, grid.off_positions] = np.where(significant, flat[:, grid.off_positions], value)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind, ufunc", [("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                                         ("div", np.divide), ("pow", np.power)])
def test_eltwise_matches_numpy(kind, ufunc):
    """K.eltwise (dv_eltwise_op) of two tensors, a tensor and a scalar, a scalar and a tensor:
    numpy's float32 result bit for bit (one IEEE operation, powf), on any number of threads;
    x ** 0.75 and x ** -0.75 (an LRN's) by square roots, within 3 ulp of numpy's, and inf, NaN
    and 0 where powf gives them."""
    rng = np.random.default_rng(7)
    x = (rng.random(1003) * 4 + 0.01).astype(np.float32)
    y = (rng.random(1003) * 4 + 0.01).astype(np.float32)
    out = np.empty_like(x)
    s = np.float32(1.375)
    with np.errstate(all="ignore"):
        for b, scalar, first, want in ((y, 0.0, False, ufunc(x, y)), (None, s, False, ufunc(x, s)),
                                       (None, s, True, ufunc(s, x))):
            for threads in (1, 3):
                out[:] = np.nan
                K.eltwise(x=x, b=b, out=out, kind=kind, scalar=scalar, scalar_first=first, threads=threads)
                assert np.array_equal(out, want), (kind, b is None, first, threads)
        for beta in ((0.75, -0.75) if kind == "pow" else ()):
            special = np.array([0.0, -1.0, np.inf, np.nan, 1e-30, 3e38], np.float32)
            z = np.concatenate([x, special])
            r = np.empty_like(z)
            K.eltwise(x=z, b=None, out=r, kind="pow", scalar=np.float32(beta))
            want = np.power(z, np.float32(beta))
            np.testing.assert_array_max_ulp(r[:-6], want[:-6], maxulp=3)
            assert np.array_equal(r[-6:], want[-6:], equal_nan=True)
            r3 = np.empty_like(z)
            K.eltwise(x=z, b=None, out=r3, kind="pow", scalar=np.float32(beta), threads=3)
            assert np.array_equal(r, r3, equal_nan=True)
    with pytest.raises(ValueError, match="unknown op"):
        K.eltwise(x=x, b=y, out=out, kind="max")
    with pytest.raises(ValueError, match="shape mismatch"):
        K.eltwise(x=x, b=y[:5], out=out, kind="add")
