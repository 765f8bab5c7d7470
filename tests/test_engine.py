"""The dense engine against onnxruntime, op by op, and its exact dense op counts on hand-worked cases."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from dyvedeep.engine import Engine
from dyvedeep.errors import DyveError
from dyvedeep.plan import build_plan
from tests.onnx_builders import conv_model, fc_model, save_model

RNG = np.random.default_rng(1234)


def ort_run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]


def assert_matches_ort(path, x, rel=1e-5):
    ours = Engine(build_plan(path)).run(x)
    ref = ort_run(path, x).reshape(ours.shape)
    assert np.abs(ours - ref).max() <= rel * max(np.abs(ref).max(), 1e-6), np.abs(ours - ref).max()
    return ours


@pytest.mark.parametrize("attrs, in_shape, wshape", [
    (dict(pads=[1, 1, 1, 1]), (3, 9, 9), (4, 3, 3, 3)),
    (dict(strides=[2, 2], pads=[0, 1, 2, 0]), (2, 11, 10), (5, 2, 3, 3)),
    (dict(group=2, pads=[2, 2, 2, 2]), (4, 8, 8), (6, 2, 5, 5)),
    (dict(dilations=[2, 2], pads=[2, 2, 2, 2]), (3, 9, 9), (4, 3, 3, 3)),
    (dict(strides=[4, 4]), (3, 23, 23), (8, 3, 11, 11)),
    (dict(), (7, 6, 6), (5, 7, 1, 1)),
])
def test_conv_matches_onnxruntime(tmp_path, attrs, in_shape, wshape):
    w = RNG.normal(0, 0.3, wshape)
    b = RNG.normal(0, 0.1, wshape[0])
    path = conv_model(tmp_path / "c.onnx", w, b, in_shape, relu=False, **attrs)
    assert_matches_ort(path, RNG.normal(0, 1, (2, *in_shape)).astype(np.float32))


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
