"""The dense engine against onnxruntime, op by op, and its exact dense op counts on hand-worked cases."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from dyvedeep import _kernels as K
from dyvedeep.engine import DEFAULT_TUNING, RUNNERS, CompiledRun, Engine, EngineTuning
from dyvedeep.errors import DyveError
from dyvedeep.plan import ONNX_RULES, OP_RULES, Op, build_plan
from tests.onnx_builders import conv_model, fc_model, save_model

RNG = np.random.default_rng(1234)
#: Several threads for every layer, however small.
ALL_THREADS = EngineTuning(parallel_min_work=0)
#: ... with 1x1 layers on their own routes (direct, panel, unfold) on every build (the AVX2
#: build's defaults put some on the channel-vector route: test_channel_vector_route_bit_exactly,
#: test_pointwise_channel_vector_route_of_direct_layers)
UNFOLD_ROUTES = EngineTuning(parallel_min_work=0, ocvec_pointwise=False, ocvec_pointwise_direct=False)


def ort_run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]


def assert_matches_ort(path, x, rel=1e-5, tuning=DEFAULT_TUNING):
    ours = Engine(build_plan(path), tuning=tuning).run(x)
    ref = ort_run(path, x).reshape(ours.shape)
    assert np.abs(ours - ref).max() <= rel * max(np.abs(ref).max(), 1e-6), np.abs(ours - ref).max()
    return ours


@pytest.mark.parametrize("attrs, in_shape, wshape, route", [
    (dict(pads=[1, 1, 1, 1]), (3, 9, 9), (4, 3, 3, 3), None),
    (dict(strides=[2, 2], pads=[0, 1, 2, 0]), (2, 11, 10), (5, 2, 3, 3), None),
    (dict(group=2, pads=[2, 2, 2, 2]), (4, 8, 8), (6, 2, 5, 5), None),
    (dict(dilations=[2, 2], pads=[2, 2, 2, 2]), (3, 9, 9), (4, 3, 3, 3), None),
    (dict(strides=[4, 4]), (3, 23, 23), (8, 3, 11, 11), None),
    (dict(), (7, 6, 6), (5, 7, 1, 1), None),
    # the engine's own GEMM: inner dimension over one 192-row block, rows not a multiple of 8,
    # a partial last 32-position panel (14 wide: 14 of 16 lanes are too few for the direct route)
    (dict(pads=[1, 1, 1, 1]), (24, 15, 14), (13, 24, 3, 3), "panel"),
    # more output channels than positions: unfolded once, weights swept row block by row block
    (dict(), (16, 5, 5), (70, 16, 1, 1), "unfold"),
    # a 1x1 convolution reads its input map in place, vectors running across the rows
    (dict(), (40, 17, 19), (20, 40, 1, 1), "direct"),
    # strides 1 x 2 with padding: strided runs of the panel route's unfolding
    (dict(strides=[1, 2], pads=[1, 1, 1, 1]), (3, 41, 37), (40, 3, 3, 3), "panel"),
    # the phase route (stride s both ways: s x s phase planes read with stride 1): stride 2 with
    # padding; stride 4 with an 11 x 11 kernel and uneven pads (AlexNet's first layer); groups
    (dict(strides=[2, 2], pads=[1, 1, 1, 1]), (3, 41, 37), (40, 3, 3, 3), "phase"),
    (dict(strides=[4, 4], pads=[2, 3, 1, 0]), (3, 71, 70), (8, 3, 11, 11), "phase"),
    (dict(group=2, strides=[2, 2], pads=[1, 1, 1, 1]), (4, 33, 33), (6, 2, 3, 3), "phase"),
    # the direct route: 16-wide rows, an odd number of vectors (a last one-vector tile), an inner
    # dimension over one 192-row block; 31-wide rows (a partial second vector per row); vectors
    # across the rows of a padded map (27 wide, 29 apart: lanes dropped, stores compressed)
    (dict(pads=[1, 1, 1, 1]), (24, 15, 16), (13, 24, 3, 3), "direct"),
    (dict(pads=[2, 2, 2, 2]), (3, 31, 31), (9, 3, 5, 5), "direct"),
    (dict(pads=[1, 1, 1, 1]), (10, 27, 27), (17, 10, 3, 3), "direct"),
])
def test_conv_matches_onnxruntime(tmp_path, attrs, in_shape, wshape, route):
    """Each conv case against onnxruntime; where a case is there for a route, it takes it (the
    AVX2 build's 1x1 layers of the unfolding routes take the channel-vector route by default)."""
    w = RNG.normal(0, 0.3, wshape)
    b = RNG.normal(0, 0.1, wshape[0])
    path = conv_model(tmp_path / "c.onnx", w, b, in_shape, relu=False, **attrs)
    x = RNG.normal(0, 1, (2, *in_shape)).astype(np.float32)
    assert_matches_ort(path, x)
    if route is not None:
        assert [st.route.name for st in Engine(build_plan(path), tuning=UNFOLD_ROUTES).layer_plans.values()] == [route]
        assert_matches_ort(path, x, tuning=UNFOLD_ROUTES)


@pytest.mark.parametrize("cin, cout, hw, kernel", [
    (64, 128, (9, 11), 5),  # two 64-channel blocks; 1600 taps in 17 blocks; 99 positions: groups of 48, 48, 3
    (5, 64, (7, 6), 3),  # 45 taps: one block; 42 positions: one group, seven tiles of 6
    (96, 200, (5, 9), 1),  # 1x1 (ocvec_pointwise; unfold route: more outputs than positions): 8 in the last block
    (24, 32, (10, 10), 3),  # 32 channels (ocvec_channel_multiple 16, the AVX2 build's default): half a block
])
def test_channel_vector_route_bit_exactly(tmp_path, cin, cout, hw, kernel):
    """The channel-vector route (vectors over 64 output channels, K.conv_ocvec; on the AVX-512
    and AVX2 builds their tiles, on NEON the one-output-at-a-time loop) gives the floats of the other
    routes, on one to three threads (a two-thread program's one-thread runs included), and
    matches onnxruntime."""
    pad = kernel // 2
    w = RNG.normal(0, 0.1, (cout, cin, kernel, kernel))
    b = RNG.normal(0, 0.1, cout)
    path = conv_model(tmp_path / "o.onnx", w, b, (cin, *hw), relu=True, pads=[pad] * 4)
    plan = build_plan(path)
    x = RNG.normal(0, 1, (6, cin, *hw)).astype(np.float32)
    forced = EngineTuning(parallel_min_work=0, ocvec_route=True, ocvec_pointwise=True, ocvec_channel_multiple=16,
                          direct_min_lane_use_threads=0.9)
    never = dataclasses.replace(forced, ocvec_route=False)
    ref = ort_run(path, x).reshape(x.shape[0], cout, *hw)
    for threads in (1, 2, 3):
        engine = Engine(plan, threads=threads, tuning=forced)
        assert [cp.route.name for cp in engine.layer_plans.values()] == ["ocvec"]
        out = engine.run(x)
        assert np.array_equal(out, Engine(plan, threads=threads, tuning=never).run(x))
        assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    assert EngineTuning().ocvec_route == (K.ISA in ("avx512", "avx2"))
    assert EngineTuning().ocvec_pointwise == (K.ISA == "avx2")
    assert EngineTuning().ocvec_channel_multiple == (16 if K.ISA == "avx2" else 64)


def test_pointwise_channel_vector_route_of_direct_layers(tmp_path):
    """A 1x1 layer of the direct route with 48 output channels (three of a block's four 16-channel
    vectors) takes the channel-vector route with ocvec_pointwise_direct (the AVX2 build's
    default), on one thread and on several (their units of positions claimed): the same floats
    as the direct route, and onnxruntime's."""
    w = RNG.normal(0, 0.3, (48, 24, 1, 1))
    b = RNG.normal(0, 0.1, 48)
    path = conv_model(tmp_path / "p.onnx", w, b, (24, 9, 13), relu=True)
    plan = build_plan(path)
    x = RNG.normal(0, 1, (3, 24, 9, 13)).astype(np.float32)
    tuning = EngineTuning(parallel_min_work=0, ocvec_route=True, ocvec_pointwise_direct=True)
    direct = Engine(plan, threads=1, tuning=UNFOLD_ROUTES)
    assert [cp.route.name for cp in direct.layer_plans.values()] == ["direct"]
    out = direct.run(x)
    for threads in (1, 2, 3):
        engine = Engine(plan, threads=threads, tuning=tuning)
        assert [cp.route.name for cp in engine.layer_plans.values()] == ["ocvec"]
        assert np.array_equal(out, engine.run(x))
    assert_matches_ort(path, x, tuning=tuning)
    assert EngineTuning().ocvec_pointwise_direct == (K.ISA == "avx2")


@pytest.mark.parametrize("ho, wo, sh, row_width, across", [
    (5, 31, 1, 35, False), (4, 16, 2, 40, False), (3, 7, 1, 7, True), (6, 20, 1, 20, True),
    (5, 27, 1, 29, True), (7, 6, 1, 10, True), (3, 14, 1, 30, True),
])
def test_direct_vectors_cover_each_position_once(ho, wo, sh, row_width, across):
    """The direct route's vectors: every output position exactly once, in order, each lane on
    the source offset of its position (lanes past an output row masked off), at most 16 lanes."""
    vec = K.direct_vectors(ho, wo, sh, row_width, across)
    assert vec[:, 2].max() <= 16 and vec[:, 2].min() >= 1
    stored = []
    for s, o, n, mask in vec:
        lanes = [lane for lane in range(16) if mask >> lane & 1]
        assert lanes and max(lanes) < n
        assert across or lanes == list(range(n))
        for i, lane in enumerate(lanes):
            oy, ox = divmod(int(o) + i, wo)
            assert s + lane == oy * sh * row_width + ox  # the lane reads its position's source
            stored.append(int(o) + i)
    assert stored == list(range(ho * wo))


@pytest.mark.parametrize("op, attrs", [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1, count_include_pad=1)),
    ("GlobalAveragePool", {}),
    ("GlobalMaxPool", {}),
    ("LRN", dict(size=5, alpha=1e-3, beta=0.75, bias=2.0)),
    ("LRN", dict(size=3, alpha=1e-2, beta=0.5, bias=1.0)),
    ("Relu", {}),
    ("Softmax", dict(axis=1)),
])
def test_layer_matches_onnxruntime(tmp_path, op, attrs):
    shape = (6, 13, 13)
    node = helper.make_node(op, ["data"], ["out"], name="layer", **attrs)
    if op == "Softmax":
        shape = (10, 1, 1)
        nodes = [helper.make_node("Flatten", ["data"], ["f"], name="f", axis=1),
                 helper.make_node("Softmax", ["f"], ["out"], name="layer", axis=1)]
    else:
        nodes = [node]
    path = save_model(tmp_path / "l.onnx", nodes, {}, shape, "out")
    assert_matches_ort(path, RNG.normal(0, 2, (3, *shape)).astype(np.float32))


def test_concat_add_and_within_channel_lrn_subgraph(tmp_path):
    """Concat, Add, and the WITHIN_CHANNEL LRN subgraph the converters write."""
    nodes = [
        helper.make_node("Conv", ["data", "W1", "b1"], ["a"], name="a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["data", "W2", "b2"], ["b"], name="b"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        helper.make_node("Add", ["cat", "cat"], ["sum"], name="sum"),
        helper.make_node("Mul", ["sum", "sum"], ["sq"], name="sq"),
        helper.make_node("AveragePool", ["sq"], ["avg"], name="avg", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=1),
        helper.make_node("Mul", ["avg", "alpha"], ["scaled"], name="scaled"),
        helper.make_node("Add", ["scaled", "one"], ["shift"], name="shift"),
        helper.make_node("Pow", ["shift", "beta"], ["den"], name="den"),
        helper.make_node("Div", ["sum", "den"], ["out"], name="norm"),
    ]
    inits = {"W1": RNG.normal(0, .3, (3, 2, 3, 3)), "b1": RNG.normal(0, .1, 3),
             "W2": RNG.normal(0, .3, (2, 2, 1, 1)), "b2": RNG.normal(0, .1, 2),
             "alpha": np.array(5e-2), "one": np.array(1.0), "beta": np.array(0.75)}
    path = save_model(tmp_path / "g.onnx", nodes, inits, (2, 7, 7), "out")
    assert_matches_ort(path, RNG.normal(0, 1, (2, 2, 7, 7)).astype(np.float32))


def test_fc_and_batch_equals_single_images(tmp_path):
    w = RNG.normal(0, 0.2, (7, 12))
    path = fc_model(tmp_path / "f.onnx", w, RNG.normal(0, .1, 7))
    x = RNG.normal(0, 1, (5, 12, 1, 1)).astype(np.float32)
    batch = assert_matches_ort(path, x)
    engine = Engine(build_plan(path))
    singles = np.concatenate([engine.run(x[i:i + 1]) for i in range(5)])
    assert np.array_equal(batch, singles)


def test_threads_give_the_same_result(tmp_path):
    w = RNG.normal(0, 0.2, (16, 8, 3, 3))
    path = conv_model(tmp_path / "c.onnx", w, np.zeros(16), (8, 20, 20), pads=[1, 1, 1, 1])
    x = RNG.normal(0, 1, (2, 8, 20, 20)).astype(np.float32)
    plan = build_plan(path)
    assert np.array_equal(Engine(plan, threads=1).run(x), Engine(plan, threads=2).run(x))


def test_threads_split_panels_bit_exactly(tmp_path):
    """Several threads share out the 32-position panels of every conv route; the result does
    not depend on the number of threads."""
    nodes = [
        helper.make_node("Conv", ["data", "W1", "b1"], ["a"], name="a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="ra"),
        helper.make_node("Conv", ["ra", "W2", "b2"], ["b"], name="b"),
        helper.make_node("Conv", ["b", "W3", "b3"], ["out"], name="c", strides=[2, 2]),
    ]
    inits = {"W1": RNG.normal(0, .3, (24, 5, 3, 3)), "b1": RNG.normal(0, .1, 24),
             "W2": RNG.normal(0, .3, (9, 24, 1, 1)), "b2": RNG.normal(0, .1, 9),
             "W3": RNG.normal(0, .3, (50, 9, 3, 3)), "b3": RNG.normal(0, .1, 50)}
    path = save_model(tmp_path / "t.onnx", nodes, inits, (5, 23, 21), "out")
    x = RNG.normal(0, 1, (2, 5, 23, 21)).astype(np.float32)
    plan = build_plan(path)
    one = assert_matches_ort(path, x)
    assert np.array_equal(one, Engine(plan, threads=2, tuning=ALL_THREADS).run(x))


def assert_routes_and_threads_bit_exact(path, routes, routes_threads=None, tuning=ALL_THREADS):
    """The model's conv layers take ``routes`` on one thread and ``routes_threads`` (default: the
    same) on several; it matches onnxruntime, and 2 and 3 threads give the same floats as one."""
    plan = build_plan(path)
    assert [st.route.name for st in Engine(plan, tuning=tuning).layer_plans.values()] == routes
    x = RNG.normal(0, 1, (2, *plan.input_shape)).astype(np.float32)
    one = assert_matches_ort(path, x)
    for threads in (2, 3):
        engine = Engine(plan, threads=threads, tuning=tuning)
        assert [st.route.name for st in engine.layer_plans.values()] == (routes_threads or routes)
        assert np.array_equal(one, engine.run(x))


def test_threads_split_rows_planes_and_pools_bit_exactly(tmp_path):
    """The other ways threads share out work: the phase planes of a strided conv, the pooled
    planes, the 8-row blocks of a product with more rows than columns and the channels of a
    global average; the result does not depend on the number of threads."""
    nodes = [
        helper.make_node("Conv", ["data", "W1", "b1"], ["a"], name="a", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="ra"),
        helper.make_node("MaxPool", ["ra"], ["p"], name="p", kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("AveragePool", ["p"], ["q"], name="q", kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Conv", ["q", "W2", "b2"], ["c"], name="c"),
        helper.make_node("GlobalAveragePool", ["c"], ["out"], name="g"),
    ]
    inits = {"W1": RNG.normal(0, .3, (40, 3, 3, 3)), "b1": RNG.normal(0, .1, 40),
             "W2": RNG.normal(0, .3, (70, 40, 1, 1)), "b2": RNG.normal(0, .1, 70)}
    path = save_model(tmp_path / "t.onnx", nodes, inits, (3, 41, 37), "out")
    assert_routes_and_threads_bit_exact(path, ["phase", "unfold"], tuning=UNFOLD_ROUTES)


def test_threads_split_weight_rows_of_few_tiles_bit_exactly(tmp_path):
    """With fewer tiles than 4 per thread, the threads share out the 8-row blocks of weights of
    the direct and panel routes instead (a 14 x 14 map: 7 panels, 5 direct tiles); the same
    floats as their tiles shared out (EngineTuning.direct_rows_below_tiles 1)."""
    nodes = [helper.make_node("Conv", ["data", "W1", "b1"], ["a"], name="a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "W2", "b2"], ["out"], name="b")]
    inits = {"W1": RNG.normal(0, .3, (44, 6, 3, 3)), "b1": RNG.normal(0, .1, 44),
             "W2": RNG.normal(0, .3, (37, 44, 1, 1)), "b2": RNG.normal(0, .1, 37)}
    path = save_model(tmp_path / "r.onnx", nodes, inits, (6, 14, 14), "out")
    # 14 of 16 lanes: the panel route on several threads too when they ask for full vectors
    panel_on_threads = dataclasses.replace(ALL_THREADS, direct_min_lane_use_threads=ALL_THREADS.direct_min_lane_use)
    assert_routes_and_threads_bit_exact(path, ["panel", "direct"], tuning=panel_on_threads)
    assert_routes_and_threads_bit_exact(path, ["panel", "direct"], tuning=dataclasses.replace(
        panel_on_threads, direct_rows_below_tiles=1, direct_rows_below_tiles_kxk=1))


def test_several_threads_take_the_direct_route_with_fuller_vectors(tmp_path):
    """Vectors across the rows of an 8 x 8 map (padded to 10 wide) fill 8 of 10 lanes: one
    thread takes the panel route (direct_min_lane_use), several the direct route
    (direct_min_lane_use_threads, where the panel route's threads would each unfold the same
    panels; the AVX-512 build's default): the same floats either way."""
    nodes = [helper.make_node("Conv", ["data", "W1", "b1"], ["a"], name="a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["out"], name="r")]
    inits = {"W1": RNG.normal(0, .1, (64, 64, 3, 3)), "b1": RNG.normal(0, .1, 64)}
    path = save_model(tmp_path / "e.onnx", nodes, inits, (64, 8, 8), "out")
    direct_on_threads = dataclasses.replace(ALL_THREADS, direct_min_lane_use_threads=0.75, ocvec_route=False)
    assert_routes_and_threads_bit_exact(path, ["panel"], ["direct"], tuning=direct_on_threads)
    assert (EngineTuning().direct_min_lane_use_threads == 0.75) == (K.ISA == "avx512")


@pytest.mark.parametrize("shape, pads, stride", [
    ((2, 9, 8), (1, 2), 2), ((1, 23, 23), (0, 0), 4), ((3, 7, 12), (3, 1), 3), ((1, 5, 5), (0, 4), 2),
])
def test_phase_planes_are_the_strided_padded_input(shape, pads, stride):
    """K.phase_planes against numpy: plane (c, py, px) is rows py, py + s, ... and columns px,
    px + s, ... of the zero-padded channel c, zeros past it."""
    x = RNG.normal(0, 1, shape).astype(np.float32)
    pt, pl = pads
    hq, wq = (shape[1] + pt + 4) // stride, (shape[2] + pl + 3) // stride
    padded = np.zeros((shape[0], hq * stride + stride, wq * stride + stride), np.float32)
    padded[:, pt:pt + shape[1], pl:pl + shape[2]] = x
    dst = np.full((shape[0] * stride * stride, hq, wq), np.nan, np.float32)
    K.phase_planes(x, 0, shape[0], pt, pl, stride, dst)
    for c in range(shape[0]):
        for py in range(stride):
            for px in range(stride):
                expected = padded[c, py::stride, px::stride][:hq, :wq]
                assert np.array_equal(dst[(c * stride + py) * stride + px], expected)


def conv_relu_maxpool(path, conv_attrs, pool_attrs, cout):
    """A 3x3 conv (4 -> ``cout`` channels) on 39 x 37 maps, its ReLU and a max-pooling, saved to
    ``path``; with two random images for it."""
    nodes = [helper.make_node("Conv", ["data", "W", "b"], ["a"], name="a", **conv_attrs),
             helper.make_node("Relu", ["a"], ["r"], name="r"),
             helper.make_node("MaxPool", ["r"], ["out"], name="p", **pool_attrs)]
    inits = {"W": RNG.normal(0, .3, (cout, 4, 3, 3)), "b": RNG.normal(0, .1, cout)}
    return save_model(path, nodes, inits, (4, 39, 37), "out"), RNG.normal(0, 1, (2, 4, 39, 37)).astype(np.float32)


@pytest.mark.parametrize("conv_attrs, pool_attrs, route", [
    (dict(pads=[1, 1, 1, 1]), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), "direct"),
    (dict(), dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), "direct"),
    (dict(strides=[2, 2], pads=[0, 1, 1, 0]), dict(kernel_shape=[2, 2], strides=[2, 2]), "phase"),
    (dict(strides=[2, 2]), dict(kernel_shape=[3, 3], strides=[1, 1], pads=[0, 0, 2, 2]), "phase"),
])
@pytest.mark.parametrize("threads, rows_first", [(1, True), (2, True), (3, True), (2, False)])
def test_conv_and_maxpool_run_band_by_band_bit_exactly(tmp_path, conv_attrs, pool_attrs, route, threads, rows_first):
    """A conv whose only reader is a max-pooling runs with it band by band in Engine.run (small
    bands here: several, each sharing rows with the next): the same floats as layer by layer,
    both layers counted, and forward without bands still gives the conv's own output. Threads
    share out the conv's 8-row blocks of weights (rows_first, three blocks here) or its tiles."""
    tuning = EngineTuning(parallel_min_work=0, conv_pool_bands=True, conv_pool_min_bytes=0,
                          conv_pool_rows_first=rows_first,
                          conv_pool_band_bytes=4 * 20 * 18 * 5)  # 5 rows of 18, 2 of 37
    path, x = conv_relu_maxpool(tmp_path / "f.onnx", conv_attrs, pool_attrs, cout=20)
    plan = build_plan(path)
    engine = Engine(plan, threads=threads, tuning=tuning)
    assert [st.route.name for st in engine.layer_plans.values()] == [route]
    assert len(engine.conv_pool_bands[0].bands) > 2 and engine.conv_pool_bands[0].conv_rows_first == rows_first
    banded = engine.run(x)
    ref = ort_run(path, x).reshape(banded.shape)
    assert np.abs(banded - ref).max() <= 1e-5 * np.abs(ref).max()
    layer_by_layer = np.stack([engine.forward(img)[plan.output_name].copy() for img in x])
    assert np.array_equal(banded, layer_by_layer)
    assert list(engine.counter.plain_runs[:2]) == [4, 4]
    assert plan.layers[0].output in engine.forward(x[0])
    assert plan.layers[0].output not in engine.forward(x[0], banded=True)


@pytest.mark.parametrize("conv_attrs, pool_attrs", [
    (dict(strides=[2, 2]), dict(kernel_shape=[3, 3], strides=[2, 2])),  # SqueezeNet v1.1's conv1 + pool1
    (dict(strides=[2, 2], pads=[0, 1, 1, 0]), dict(kernel_shape=[2, 2], strides=[2, 2])),
    (dict(strides=[3, 2], pads=[1, 1, 1, 1]), dict(kernel_shape=[3, 3], strides=[1, 1], pads=[0, 0, 2, 2])),
])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_strided_conv_on_the_channel_vector_route(tmp_path, conv_attrs, pool_attrs, threads):
    """A strided conv takes the channel-vector route (ocvec_strided_threads; 32 output
    channels, a multiple of ocvec_channel_multiple) and, feeding a max-pooling, runs with it
    band by band (conv_pool_bands), each thread pooling the rows it computed: the same floats as its
    own route (phase or panel) and as layer by layer, onnxruntime's, both layers counted once
    per image; unbanded (the output too small for bands) the same floats again."""
    tuning = EngineTuning(parallel_min_work=0, conv_pool_min_bytes=0, ocvec_channel_multiple=16,
                          ocvec_strided_threads=3, conv_pool_bands=True, conv_pool_band_bytes=4 * 32 * 18 * 5)
    path, x = conv_relu_maxpool(tmp_path / "s.onnx", conv_attrs, pool_attrs, cout=32)
    plan = build_plan(path)
    engine = Engine(plan, threads=threads, tuning=tuning)
    assert [st.route.name for st in engine.layer_plans.values()] == ["ocvec"]
    assert len(engine.conv_pool_bands[0].bands) > 2
    banded = engine.run(x)
    own_route = Engine(plan, threads=threads, tuning=dataclasses.replace(tuning, ocvec_strided_threads=0))
    assert [st.route.name for st in own_route.layer_plans.values()] in (["phase"], ["panel"])
    assert np.array_equal(banded, own_route.run(x))
    assert np.array_equal(banded, np.stack([engine.forward(img)[plan.output_name].copy() for img in x]))
    ref = ort_run(path, x).reshape(banded.shape)
    assert np.abs(banded - ref).max() <= 1e-5 * np.abs(ref).max()
    assert list(engine.counter.plain_runs[:2]) == [4, 4]
    unbanded = Engine(plan, threads=threads, tuning=dataclasses.replace(tuning, conv_pool_min_bytes=1 << 40))
    assert not unbanded.conv_pool_bands and [st.route.name for st in unbanded.layer_plans.values()] == ["ocvec"]
    assert np.array_equal(banded, unbanded.run(x))
    assert EngineTuning().ocvec_strided_threads == {"avx2": 2, "avx512": 1}.get(K.ISA, 0)
    assert EngineTuning().conv_pool_bands == (K.ISA != "avx2")  # decided per instruction set


@pytest.mark.parametrize("threads", [1, 2])
def test_lrn_written_as_elementwise_ops_runs_compiled(tmp_path, threads):
    """An LRN written as ONNX elementwise ops (cifar10_full's: square, average pooling, scale,
    shift, pow 0.75, divide) joins the compiled run after the conv: the same floats as the
    Python path (forward, layer by layer) and onnxruntime's, every layer counted once per
    image."""
    nodes = [helper.make_node("Conv", ["data", "W", "b"], ["c"], name="c", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="r"),
             helper.make_node("Mul", ["r", "r"], ["sq"], name="sq"),
             helper.make_node("AveragePool", ["sq"], ["avg"], name="avg", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["avg", "alpha"], ["sc"], name="sc"),
             helper.make_node("Add", ["sc", "one"], ["sh"], name="sh"),
             helper.make_node("Pow", ["sh", "beta"], ["pw"], name="pw"),
             helper.make_node("Div", ["r", "pw"], ["n"], name="n"),
             helper.make_node("Sub", ["two", "n"], ["out"], name="out")]
    inits = {"W": RNG.normal(0, .3, (16, 3, 3, 3)), "b": RNG.normal(0, .1, 16), "alpha": [5e-5], "one": [1.0],
             "beta": [0.75], "two": [2.0]}
    path = save_model(tmp_path / "lrn.onnx", nodes, inits, (3, 12, 10), "out")
    plan = build_plan(path)
    x = RNG.normal(0, 3, (3, 3, 12, 10)).astype(np.float32)
    engine = Engine(plan, threads=threads, tuning=EngineTuning(parallel_min_work=0))
    parts = engine.compiled_runs
    assert len(parts) == 1 and parts[0].layers == list(range(len(plan.layers)))
    assert "eltwise" in parts[0].program.step_kinds()
    out = engine.run(x)
    assert np.array_equal(out, np.stack([engine.forward(img)[plan.output_name].copy() for img in x]))
    ref = ort_run(path, x).reshape(out.shape)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    assert list(engine.counter.plain_runs) == [6] * len(plan.layers)


def mixed_network(tmp_path):
    """A network with every kind of layer a compiled run takes (conv routes direct, phase,
    panel and unfold, a grouped conv, a conv + max-pooling run band by band, average and
    global pooling, a Concat written in place, a Flatten) and layers it leaves to Python (LRN,
    fully connected, softmax) between them."""
    nodes = [
        helper.make_node("Conv", ["data", "W1", "b1"], ["a"], name="a", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="ra"),
        helper.make_node("MaxPool", ["ra"], ["p"], name="p", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        helper.make_node("LRN", ["p"], ["n"], name="n", size=3, alpha=1e-3, beta=.75, bias=1.0),
        helper.make_node("Conv", ["n", "Ws", "bs"], ["s"], name="s", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["rs"], name="rs"),
        helper.make_node("Conv", ["rs", "We1", "be1"], ["e1"], name="e1", group=2),
        helper.make_node("Conv", ["rs", "We3", "be3"], ["e3"], name="e3", pads=[1, 1, 1, 1], strides=[1, 2]),
        helper.make_node("MaxPool", ["e1"], ["e1p"], name="e1p", kernel_shape=[1, 2], strides=[1, 2]),
        helper.make_node("Concat", ["e1p", "e3"], ["cat"], name="cat", axis=1),
        helper.make_node("AveragePool", ["cat"], ["q"], name="q", kernel_shape=[2, 2], strides=[2, 2],
                         ceil_mode=1),
        helper.make_node("Conv", ["q", "W10", "b10"], ["c10"], name="c10"),
        helper.make_node("GlobalAveragePool", ["c10"], ["g"], name="g"),
        helper.make_node("Flatten", ["g"], ["f"], name="f"),
        helper.make_node("Gemm", ["f", "Wf", "bf"], ["fc"], name="fc", transB=1),
        helper.make_node("Softmax", ["fc"], ["out"], name="out"),
    ]
    inits = {"W1": RNG.normal(0, .3, (8, 3, 3, 3)), "b1": RNG.normal(0, .1, 8),
             "Ws": RNG.normal(0, .3, (6, 8, 3, 3)), "bs": RNG.normal(0, .1, 6),
             "We1": RNG.normal(0, .3, (10, 3, 1, 1)), "be1": RNG.normal(0, .1, 10),
             "We3": RNG.normal(0, .3, (7, 6, 3, 3)), "be3": RNG.normal(0, .1, 7),
             "W10": RNG.normal(0, .3, (40, 17, 1, 1)), "b10": RNG.normal(0, .1, 40),
             "Wf": RNG.normal(0, .3, (5, 40)), "bf": RNG.normal(0, .1, 5)}
    return save_model(tmp_path / "mixed.onnx", nodes, inits, (3, 48, 32), "out")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_compiled_runs_equal_python_dispatch(tmp_path, threads):
    """Engine.run through compiled runs (one parallel region per run of dense layers) gives the
    floats and op counts of the kernels called one by one from Python, on every image of a
    batch (the steps read each image, not the one they were built with)."""
    tuning = EngineTuning(conv_pool_bands=True, conv_pool_min_bytes=0,
                          conv_pool_band_bytes=4 * 8 * 16 * 5,  # 5 of 24 rows
                          ocvec_pointwise=False)
    path = mixed_network(tmp_path)
    plan = build_plan(path)
    x = RNG.normal(0, 1, (3, *plan.input_shape)).astype(np.float32)
    compiled = Engine(plan, threads=threads, tuning=tuning)
    python = Engine(plan, threads=threads, compiled=False, tuning=tuning)
    routes = {name: getattr(lp, "route", None) and lp.route.name for name, lp in compiled.layer_plans.items()}
    assert set(routes.values()) == {"direct", "phase", "panel", "unfold", None}, routes
    assert list(compiled.conv_pool_bands) == [0] and len(compiled.conv_pool_bands[0].bands) > 2
    ops = [layer.op for layer in plan.layers]
    parts = [part if isinstance(part, int) else CompiledRun for part in compiled.compiled_runs]
    assert parts == [CompiledRun, ops.index("lrn"), CompiledRun, ops.index("softmax")]  # the FC compiled
    out = compiled.run(x)
    assert np.array_equal(out, python.run(x))
    assert np.array_equal(compiled.counter.table, python.counter.table)
    assert not np.array_equal(out[0], out[1])
    ref = ort_run(path, x).reshape(out.shape)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    a, b = compiled.forward(x[2], banded=True), python.forward(x[2], banded=True)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("threads", [1, 2])
def test_profiled_programs_time_every_step_of_each_layer(tmp_path, threads):
    """A compiled run's step ranges cover its program in order, one range per layer with steps (a
    banded conv and its pooling: one); with ``profiling`` on, a run keeps one time per step (kinds
    named), each >= 0, summing to at most the run's wall time, and the floats do not change;
    an append forgets the times, and a program not profiled has none."""
    tuning = EngineTuning(conv_pool_bands=True, conv_pool_min_bytes=0, conv_pool_band_bytes=4 * 8 * 16 * 5)
    plan = build_plan(mixed_network(tmp_path))
    x = RNG.normal(0, 1, (1, *plan.input_shape)).astype(np.float32)
    engine = Engine(plan, threads=threads, tuning=tuning)
    expected = engine.run(x)
    runs = [part for part in engine.compiled_runs if isinstance(part, CompiledRun)]
    for part in runs:
        ends = [0] + [end for _, _, end in part.step_ranges]
        assert [first for _, first, _ in part.step_ranges] == ends[:-1] and ends[-1] == len(part.program)
        layers = [i for i, _, _ in part.step_ranges]  # the layers with steps (not views, Concats)
        assert layers == sorted(set(layers)) and set(layers) <= set(part.layers) - {i + 1 for i in part.banded}
        assert set(part.banded) <= set(layers)
        assert part.program.step_seconds() is None
        part.program.profiling = True
    start = time.perf_counter()
    out = engine.run(x)
    wall = time.perf_counter() - start
    assert np.array_equal(out, expected)
    for part in runs:
        seconds = part.program.step_seconds()
        assert len(seconds) == len(part.program) == len(part.program.step_kinds())
        assert min(seconds) >= 0 and sum(seconds) <= wall
        assert set(part.program.step_kinds()) <= set(K.STEP_KINDS.values())
    banded = next(part for part in runs if part.banded)
    first, end = banded.step_ranges[0][1:]
    assert {"direct", "maxpool"} <= set(banded.program.step_kinds()[first:end])
    K.maxpool(np.zeros((1, 4, 4), np.float32), np.zeros((1, 2, 2), np.float32), 2, 2, 2, 2, 0, 0,
              program=banded.program)
    assert banded.program.step_seconds() is None


def test_compiled_runs_leave_knob_layers_to_python(tmp_path):
    """With knobs on some layers, those layers run on the Python path between compiled runs
    of the others: the same floats and counts as with no compiled run."""
    from dyvedeep.knobs import KnobConfig
    path = mixed_network(tmp_path)
    plan = build_plan(path)
    knobs = KnobConfig()
    knobs.set("e3", "spet", 0.0)
    knobs.set("c10", "sfma", 0.05)
    x = RNG.normal(0, 1, (2, *plan.input_shape)).astype(np.float32)
    compiled, python = Engine(plan, knobs, threads=2), Engine(plan, knobs, threads=2, compiled=False)
    index = {layer.name: i for i, layer in enumerate(plan.layers)}
    assert index["e3"] in compiled.compiled_runs and index["c10"] in compiled.compiled_runs
    assert np.array_equal(compiled.run(x), python.run(x))
    assert np.array_equal(compiled.counter.table, python.counter.table)
    assert compiled.counter.get("e3", "terminated") > 0


def test_program_reads_the_image_it_is_given():
    """A step built on the program's image placeholder reads the image passed to run(), which
    must have the placeholder's size; the step only runs then."""
    image = np.zeros((2, 3, 4), np.float32)
    program = K.Program(image)
    out = np.zeros((2, 1, 2), np.float32)
    K.maxpool(image, out, 3, 2, 3, 2, 0, 0, 1, program)
    assert not out.any()
    assert len(program) == 1
    with pytest.raises(ValueError, match="24 floats"):
        program.run(np.zeros((2, 3, 5), np.float32))
    program.run(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    assert out.reshape(-1).tolist() == [9, 11, 21, 23]


def test_buffers_are_reused_and_concat_inputs_written_in_place(tmp_path):
    """A fire module: the expand convs write straight into their slices of the Concat, a dead
    tensor's buffer is reused, and the output still matches onnxruntime."""
    nodes = [
        helper.make_node("Conv", ["data", "Ws", "bs"], ["s"], name="squeeze"),
        helper.make_node("Relu", ["s"], ["rs"], name="rs"),
        helper.make_node("Conv", ["rs", "We1", "be1"], ["e1"], name="e1"),
        helper.make_node("Conv", ["rs", "We3", "be3"], ["e3"], name="e3", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["e1", "e3"], ["cat"], name="cat", axis=1),
        helper.make_node("Relu", ["cat"], ["rc"], name="rc"),
        helper.make_node("Conv", ["rc", "Wo", "bo"], ["o"], name="o"),
        helper.make_node("Relu", ["o"], ["ro"], name="ro"),
        helper.make_node("GlobalAveragePool", ["ro"], ["out"], name="gap"),
    ]
    inits = {"Ws": RNG.normal(0, .3, (4, 6, 1, 1)), "bs": RNG.normal(0, .1, 4),
             "We1": RNG.normal(0, .3, (5, 4, 1, 1)), "be1": RNG.normal(0, .1, 5),
             "We3": RNG.normal(0, .3, (7, 4, 3, 3)), "be3": RNG.normal(0, .1, 7),
             "Wo": RNG.normal(0, .3, (6, 12, 1, 1)), "bo": RNG.normal(0, .1, 6)}
    path = save_model(tmp_path / "fire.onnx", nodes, inits, (6, 9, 9), "out")
    plan = build_plan(path)
    engine = Engine(plan)
    assert engine.in_place == {"e1", "e3"}
    cat = engine.buffers["cat"]
    assert np.shares_memory(engine.buffers["e1"], cat) and np.shares_memory(engine.buffers["e3"], cat)
    owners = {id(b.base if b.base is not None else b) for b in engine.buffers.values()}
    assert len(owners) < len([t for t in engine.buffers if t not in engine.in_place])  # some buffer is reused
    x = RNG.normal(0, 1, (3, 6, 9, 9)).astype(np.float32)
    assert_matches_ort(path, x)
    # run_image hands out copies of the live tensors only, unaffected by later runs
    first = engine.run_image(x[0], stop=2)
    assert set(first) == {"rs", "e1"}
    kept = {k: v.copy() for k, v in first.items()}
    engine.run_image(x[1])
    assert all(np.array_equal(first[k], kept[k]) for k in kept)


def test_conv_maxpool_relu_is_rewritten_exactly(tmp_path):
    """cifar10_quick's conv -> max pool -> ReLU becomes conv+ReLU -> max pool, bit for bit."""
    nodes = [helper.make_node("Conv", ["data", "W", "b"], ["c"], name="conv", pads=[2, 2, 2, 2]),
             helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
             helper.make_node("Relu", ["p"], ["r"], name="relu")]
    path = save_model(tmp_path / "m.onnx", nodes, {"W": RNG.normal(0, .3, (4, 3, 5, 5)), "b": np.zeros(4)},
                      (3, 12, 12), "r")
    plan = build_plan(path)
    assert [layer.op for layer in plan.layers] == ["conv", "maxpool"]
    assert plan.layers[0].relu
    assert_matches_ort(path, RNG.normal(0, 1, (2, 3, 12, 12)).astype(np.float32))


# ----------------------------------------------------------------------------- op counts


def test_conv_op_count_hand_worked(tmp_path):
    # 1 input map 3x3, one 2x2 filter, no padding: output 2x2, 4 MACs per output.
    path = conv_model(tmp_path / "c.onnx", np.ones((1, 1, 2, 2)), np.zeros(1), (1, 3, 3))
    layer = build_plan(path).layers[0]
    assert layer.dense_macs == 16
    assert layer.dense_ops == 2 * 16 + 4 + 4  # MACs, bias adds, ReLU compares


def test_fc_op_count_hand_worked(tmp_path):
    path = fc_model(tmp_path / "f.onnx", np.ones((2, 3)), np.zeros(2))
    plan = build_plan(path)
    fc = plan.layer("fc")
    assert (fc.dense_macs, fc.dense_ops) == (6, 12 + 2 + 2)


def test_pool_op_counts_hand_worked(tmp_path):
    # 3x3 input, 2x2 window, stride 2, ceil: windows hold 4, 2, 2, 1 inputs.
    for op, expected in (("MaxPool", 3 + 1 + 1 + 0), ("AveragePool", 4 + 2 + 2 + 1)):
        node = helper.make_node(op, ["data"], ["o"], name="p", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
        plan = build_plan(save_model(tmp_path / f"{op}.onnx", [node], {}, (1, 3, 3), "o"))
        assert plan.layers[0].out_shape == (1, 2, 2)
        assert plan.layers[0].dense_ops == expected


def test_lrn_and_softmax_op_counts_hand_worked(tmp_path):
    node = helper.make_node("LRN", ["data"], ["o"], name="n", size=3)
    plan = build_plan(save_model(tmp_path / "n.onnx", [node], {}, (3, 1, 1), "o"))
    # window taps per channel: 2, 3, 2 -> 2 ops each, plus 4 per element
    assert plan.layers[0].dense_ops == 2 * 7 + 4 * 3
    nodes = [helper.make_node("Flatten", ["data"], ["f"], name="f", axis=1),
             helper.make_node("Softmax", ["f"], ["o"], name="s", axis=1)]
    plan = build_plan(save_model(tmp_path / "s.onnx", nodes, {}, (10, 1, 1), "o"))
    assert plan.layer("s").dense_ops == 9 + 40


def test_engine_counts_dense_ops_per_image(tmp_path):
    path = conv_model(tmp_path / "c.onnx", np.ones((1, 1, 2, 2)), np.zeros(1), (1, 3, 3))
    engine = Engine(build_plan(path))
    engine.run(np.zeros((3, 1, 3, 3), np.float32))
    assert engine.counter.total("ops") == 3 * 40
    assert engine.counter.total("macs") == 3 * 16


# ----------------------------------------------------------------------------- bad input


def test_unsupported_op_is_one_clear_line(tmp_path):
    node = helper.make_node("Tanh", ["data"], ["o"], name="squash")
    path = save_model(tmp_path / "t.onnx", [node], {}, (1, 2, 2), "o")
    with pytest.raises(DyveError) as err:
        build_plan(path)
    msg = str(err.value)
    assert "t.onnx" in msg and "Tanh" in msg and "\n" not in msg


def test_corrupt_onnx_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(DyveError) as err:
        build_plan(bad)
    assert "bad.onnx" in str(err.value)


def test_input_shape_mismatch(tmp_path):
    path = conv_model(tmp_path / "c.onnx", np.ones((1, 1, 2, 2)), np.zeros(1), (1, 3, 3))
    with pytest.raises(DyveError, match="input shape"):
        Engine(build_plan(path)).run(np.zeros((1, 1, 4, 4), np.float32))


@pytest.mark.parametrize("relu, expected", [(True, True), (False, False)])
def test_nonneg_inputs_pass_through_lrn(tmp_path, relu, expected):
    """LRN keeps the sign of its input (its divisor is positive), so a conv after ReLU + LRN
    knows its input is >= 0 (SFMA's statistics then skip |x|); without the ReLU it does not."""
    nodes = [helper.make_node("Conv", ["data", "W1", "b1"], ["a"], name="a")]
    last = "a"
    if relu:
        nodes.append(helper.make_node("Relu", ["a"], ["ra"], name="ra"))
        last = "ra"
    nodes += [helper.make_node("LRN", [last], ["n"], name="n", size=3, alpha=1e-2, beta=0.75, bias=1.0),
              helper.make_node("Conv", ["n", "W2", "b2"], ["out"], name="b")]
    inits = {"W1": RNG.normal(0, .3, (4, 3, 3, 3)), "b1": RNG.normal(0, .1, 4),
             "W2": RNG.normal(0, .3, (2, 4, 3, 3)), "b2": RNG.normal(0, .1, 2)}
    plan = build_plan(save_model(tmp_path / "n.onnx", nodes, inits, (3, 9, 9), "out"))
    assert [layer.input_nonneg for layer in plan.layers if layer.name == "b"] == [expected]


def test_every_op_has_one_rule_and_one_runner():
    """Each engine op is parsed, counted and signed by one plan rule and run by one engine
    runner; every ONNX op the plan accepts maps to an op the engine runs."""
    assert set(OP_RULES) == set(Op) == set(RUNNERS)
    assert all(rule.op in RUNNERS and name in rule.onnx_types for name, rule in ONNX_RULES.items())
    assert Op.CONV == "conv" and f"{Op.CONV}" == "conv"  # ops read and print as their names


@pytest.mark.parametrize("threads", [1, 2])
def test_residual_adds_and_relus_join_the_compiled_runs(tmp_path, threads):
    """A ReLU, an Add of two tensors of its shape (a residual block's) and an Add of a scalar
    constant run inside the compiled runs; an Add that reads the image stays on the Python path.
    Either way the same floats and counts as the kernels called one by one from Python."""
    def block(x, name):
        return [helper.make_node("Conv", [x, f"{name}_W", f"{name}_b"], [f"{name}_c"], name=f"{name}_conv",
                                 pads=[1, 1, 1, 1]),
                helper.make_node("Add", [x, f"{name}_c"], [f"{name}_a"], name=f"{name}_add"),
                helper.make_node("Relu", [f"{name}_a"], [f"{name}_r"], name=f"{name}_relu")]
    nodes = [*block("data", "b1"), *block("b1_r", "b2"),
             helper.make_node("Add", ["b2_r", "shift"], ["s"], name="shift"),
             helper.make_node("Relu", ["s"], ["out"], name="relu_out")]
    inits = {"shift": np.array(-0.5)}
    for name in ("b1", "b2"):
        inits[f"{name}_W"], inits[f"{name}_b"] = RNG.normal(0, .3, (4, 4, 3, 3)), RNG.normal(0, .1, 4)
    path = save_model(tmp_path / "res.onnx", nodes, inits, (4, 9, 9), "out")
    plan = build_plan(path)
    x = RNG.normal(0, 1, (3, *plan.input_shape)).astype(np.float32)
    compiled = Engine(plan, threads=threads)
    python = Engine(plan, threads=threads, compiled=False)
    index = {layer.name: i for i, layer in enumerate(plan.layers)}
    python_path = [part for part in compiled.compiled_runs if isinstance(part, int)]
    in_runs = [i for part in compiled.compiled_runs if not isinstance(part, int) for i in part.layers]
    assert python_path == [index["b1_add"]]  # reads the image
    assert {index["b1_relu"], index["b2_add"], index["b2_relu"], index["shift"], index["relu_out"]} <= set(in_runs)
    out = compiled.run(x)
    assert np.array_equal(out, python.run(x))
    assert np.array_equal(compiled.counter.table, python.counter.table)
    ref = ort_run(path, x).reshape(out.shape)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_add_relu_kernel_gives_numpy_bits():
    """K.add_relu: the sum as numpy adds (float32), the ReLU as relu_inplace (-0.0 and NaN kept),
    in blocks shared out by threads, also for lengths that are not a multiple of a block."""
    for n in (1, 63, 64, 1000):
        a = RNG.normal(0, 1, n).astype(np.float32)
        b = RNG.normal(0, 1, n).astype(np.float32)
        a[:: 7] = -0.0
        a[3 % n] = np.nan
        for threads in (1, 2, 3):
            out = np.empty_like(a)
            K.add_relu(x=a, b=b, out=out, relu=False, threads=threads)
            assert np.array_equal(out, a + b, equal_nan=True)
            K.add_relu(x=a, b=b, out=out, relu=True, threads=threads)
            want = a + b
            K.relu_inplace(x=want)
            assert np.array_equal(out.view(np.int32), want.view(np.int32))
            K.add_relu(x=a, b=None, out=out, relu=True, threads=threads)
            want = a.copy()
            K.relu_inplace(x=want)
            assert np.array_equal(out.view(np.int32), want.view(np.int32))
