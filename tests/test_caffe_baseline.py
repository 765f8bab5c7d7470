"""The papers' baseline (Caffe's im2col + sgemm, one thread): im2col on hand-worked cases, the
baseline against onnxruntime on a small graph of every op it runs, and against the dense engine
and onnxruntime on the real cifar10_quick (from the mirror)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper
from threadpoolctl import threadpool_info

from dyvedeep.datasets import load_dataset
from dyvedeep.engine import CaffeBaseline, Engine, im2col, set_blas_threads
from dyvedeep.engine.caffe_baseline import skips_im2col
from dyvedeep.evaluate import RELATIVE_TOLERANCE
from dyvedeep.plan import build_plan
from tests.onnx_builders import save_model

RNG = np.random.default_rng(77)


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_im2col_hand_worked_pad_and_stride():
    """1 channel, 3x3 input 1..9, 2x2 kernel, pad 1, stride 2: a 2x2 output, each column one
    window of the zero-padded input, rows in (kernel row, kernel column) order."""
    x = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3)
    # padded:            windows (top-left at padded (0,0), (0,2), (2,0), (2,2)):
    # 0 0 0 0 0          [0 0]  [0 0]  [0 4]  [5 6]
    # 0 1 2 3 0          [0 1]  [2 3]  [0 7]  [8 9]
    # 0 4 5 6 0
    # 0 7 8 9 0
    # 0 0 0 0 0
    expected = np.array([[0, 0, 0, 5],   # tap (0, 0)
                         [0, 0, 4, 6],   # tap (0, 1)
                         [0, 2, 0, 8],   # tap (1, 0)
                         [1, 3, 7, 9]],  # tap (1, 1)
                        np.float32)
    assert np.array_equal(im2col(x, (2, 2), (2, 2), (1, 1, 1, 1)), expected)


def test_im2col_hand_worked_uneven_pads_dilation_and_reuse():
    """2 channels of 1x3, a 1x2 kernel with dilation 2, pads left 1 / right 0: output width
    (3 + 1 - 2 - 1) + 1 = 2; rows (channel, tap). A buffer filled before is reused as it is
    (the padding taps are never written), giving the same matrix for another input."""
    x = np.array([[[1, 2, 3]], [[4, 5, 6]]], np.float32)
    # channel 0 padded: 0 1 2 3; output 0 reads padded columns 0 and 2, output 1 columns 1 and 3
    expected = np.array([[0, 1],   # channel 0, tap 0
                         [2, 3],   # channel 0, tap 1
                         [0, 4],   # channel 1, tap 0
                         [5, 6]],  # channel 1, tap 1
                        np.float32)
    out = np.zeros((4, 2), np.float32)
    assert np.array_equal(im2col(x, (1, 2), (1, 1), (0, 1, 0, 0), (1, 2), out), expected)
    assert np.array_equal(im2col(2 * x, (1, 2), (1, 1), (0, 1, 0, 0), (1, 2), out), 2 * expected)


def every_op_model(path: Path) -> Path:
    """Convs with uneven pads and strides, groups with dilation, a 1x1 (no im2col in Caffe),
    LRN, pooling, Concat, a fully-connected layer, a scalar Mul and softmax."""
    nodes = [
        helper.make_node("Conv", ["data", "W1", "b1"], ["a"], name="a", pads=[1, 0, 2, 1], strides=[2, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="ra"),
        helper.make_node("Conv", ["ra", "W2", "b2"], ["b"], name="b", group=2, dilations=[2, 2], pads=[2, 2, 2, 2]),
        helper.make_node("LRN", ["b"], ["n"], name="n", size=3, alpha=1e-2, beta=0.75, bias=1.0),
        helper.make_node("MaxPool", ["n"], ["p"], name="p", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "W3", "b3"], ["c1"], name="c1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["p", "W4", "b4"], ["c2"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["r1", "c2"], ["cat"], name="cat", axis=1),
        helper.make_node("AveragePool", ["cat"], ["avg"], name="avg", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["avg"], ["f"], name="f", axis=1),
        helper.make_node("Gemm", ["f", "W5", "b5"], ["g"], name="fc", transB=1),
        helper.make_node("Mul", ["g", "half"], ["h"], name="h"),
        helper.make_node("Softmax", ["h"], ["out"], name="prob", axis=1),
    ]
    inits = {"W1": RNG.normal(0, .3, (8, 4, 3, 3)), "b1": RNG.normal(0, .1, 8),
             "W2": RNG.normal(0, .3, (6, 4, 3, 3)), "b2": RNG.normal(0, .1, 6),
             "W3": RNG.normal(0, .3, (5, 6, 1, 1)), "b3": RNG.normal(0, .1, 5),
             "W4": RNG.normal(0, .3, (3, 6, 3, 3)), "b4": RNG.normal(0, .1, 3),
             "W5": RNG.normal(0, .3, (10, 8 * 3 * 5)), "b5": RNG.normal(0, .1, 10), "half": np.array(0.5)}
    return save_model(path, nodes, inits, (4, 13, 12), "out")


def test_baseline_matches_onnxruntime_on_every_op(tmp_path):
    path = every_op_model(tmp_path / "m.onnx")
    plan = build_plan(path)
    assert [skips_im2col(layer) for layer in plan.layers if layer.op == "conv"] == [False, False, True, False]
    x = RNG.normal(0, 1, (3, *plan.input_shape)).astype(np.float32)
    ours = CaffeBaseline(plan).run(x)
    ref = ort_run(path, x).reshape(ours.shape)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()  # test_engine's tolerance


def test_baseline_runs_blas_on_one_thread(tmp_path):
    plan = build_plan(every_op_model(tmp_path / "m.onnx"))
    set_blas_threads(2)
    CaffeBaseline(plan).run(RNG.normal(0, 1, (1, *plan.input_shape)).astype(np.float32))
    assert {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"} == {1}


@pytest.fixture(scope="module")
def quick(cifar10_quick_onnx: Path) -> Path:
    return cifar10_quick_onnx


@pytest.mark.mirror
def test_baseline_equals_dense_engine_on_cifar10_quick(quick, mirror):
    plan = build_plan(quick)
    images = load_dataset("cifar10:test", plan.preprocess, mirror=mirror, limit=8).images(0, 8)
    ours = CaffeBaseline(plan).run(images)
    dense = Engine(plan).run(images)
    ref = ort_run(quick, images).reshape(ours.shape)
    assert np.array_equal(ours.argmax(axis=1), dense.argmax(axis=1))
    assert len(set(ours.argmax(axis=1))) > 1  # the images are told apart, not one class for all
    for other in (dense, ref):  # the project's tolerance on real models (dyvedeep verify)
        assert (np.abs(ours - other).max(axis=1) <= RELATIVE_TOLERANCE * np.abs(other).max(axis=1)).all()
