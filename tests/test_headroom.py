"""``dyvedeep headroom``: hand-worked ceilings on tiny models (ReLU zeros, max-pool losers with
overlapping windows and through a Concat, the knobs' oracles, nothing and everything zeroed), the
command end to end, and the invariants on a real model (cifar10_quick, from the mirror)."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from onnx import helper

from dyvedeep.cli import main
from dyvedeep.engine import Engine
from dyvedeep.headroom import CEILINGS, activations, image_savings, measure
from dyvedeep.knobs import KnobConfig
from dyvedeep.plan import build_plan
from tests.onnx_builders import conv_model, save_model

RNG = np.random.default_rng(5)


def center_kernels(*values: float, cin: int = 1, channel: int = 0) -> np.ndarray:
    """3x3 kernels (one per output channel) that are zero but for the centre tap of one input channel."""
    w = np.zeros((len(values), cin, 3, 3), np.float32)
    w[:, channel, 1, 1] = values
    return w


def savings(path, image: np.ndarray) -> dict[str, dict[str, int]]:
    plan = build_plan(path)
    return image_savings(plan, activations(Engine(plan), image.astype(np.float32)))


X3 = np.array([[1, -2, 3], [-4, 5, -6], [7, -8, 9]], np.float32)


def test_relu_zeros_and_knob_oracles_hand_worked(tmp_path):
    # conv 3x3, pad 1 on a 1 x 3 x 3 input; outputs: x, -x and (bias -1) -1 everywhere.
    # Per output: 9 MACs (padding taps count) = 18 ops + bias + ReLU = 20.
    path = conv_model(tmp_path / "c.onnx", center_kernels(1, -1, 0), np.array([0, 0, -1]), (1, 3, 3),
                      pads=[1, 1, 1, 1])
    plan = build_plan(path)
    assert plan.layer("conv").dense_ops == 27 * 20
    s = savings(path, X3[None])["conv"]
    zeros = 4 + 5 + 9  # negatives of x, of -x, and the whole third map
    assert s["zeros"] == zeros * 20
    assert s["pool"] == s["zeros"]  # no max-pooling
    # SPET (fraction 0.5 of 1 channel: the whole 9-tap partial sum) saves only the ReLU
    assert s["spet"] == zeros * (20 - 2 * 9 - 1)
    # SDSS stride 2 on 3 x 3: grid rows/cols 0 and 2, one cell with 5 off-grid positions;
    # only the third map is all zero
    assert s["sdss"] == 5 * 20
    assert s["sfma"] == 0  # the input map is not uniform
    assert s["knobs"] == 5 * 20 + (zeros - 5) * 1


def test_sfma_and_the_three_together_hand_worked(tmp_path):
    # two input maps, the second uniform (2.0); one output = the first map's centre tap
    x = np.stack([np.full((3, 3), -1.0), np.full((3, 3), 2.0)]).astype(np.float32)
    x[0, 1, 1] = 1.0
    path = conv_model(tmp_path / "c.onnx", center_kernels(1, cin=2), np.zeros(1), (2, 3, 3), pads=[1, 1, 1, 1])
    unit = 2 * 18 + 2  # 18 MACs per output
    s = savings(path, x)["conv"]
    assert s["zeros"] == 8 * unit
    assert s["sfma"] == 2 * 9 * 9  # the uniform map feeds 9 outputs x 9 taps
    assert s["sdss"] == 0  # the cell's centre (off-grid) is 1
    assert s["spet"] == 8 * (unit - 2 * 9 - 1)  # lead: 1 of 2 channels
    # together: SFMA leaves 9 MACs per neuron, whose lead is the remaining channel
    assert s["knobs"] == 2 * 9 * 9 + 8 * ((unit - 18) - 2 * 9 - 1)


def test_nothing_zeroed_saves_nothing(tmp_path):
    path = conv_model(tmp_path / "c.onnx", np.abs(RNG.normal(0, 1, (4, 2, 3, 3))), np.full(4, 0.1), (2, 5, 5),
                      pads=[1, 1, 1, 1])
    plan = build_plan(path)
    result = measure(plan, [np.abs(RNG.normal(1, 1, (2, 5, 5))).astype(np.float32) for _ in range(3)])
    assert result.n == 3
    assert all(v == 0 for v in result.saved["conv"].values())
    assert all(r == 1.0 for r in result.network().values())


def test_everything_zeroed_saves_everything(tmp_path):
    path = conv_model(tmp_path / "c.onnx", np.abs(RNG.normal(0, 1, (4, 2, 3, 3))), np.full(4, -0.1), (2, 5, 5),
                      pads=[1, 1, 1, 1])
    plan = build_plan(path)
    result = measure(plan, [-np.abs(RNG.normal(1, 1, (2, 5, 5))).astype(np.float32) for _ in range(2)])
    dense = plan.layer("conv").dense_ops
    assert result.saved["conv"]["zeros"] == 2 * dense
    assert result.saved["conv"]["pool"] == 2 * dense
    assert result.network()["zeros"] == math.inf


@pytest.mark.parametrize("knobs", [("spet",), ("sdss",), ("sfma",), ("sfma", "sdss", "spet")])
def test_oracles_count_what_the_engine_saves_when_its_knobs_fire_there(tmp_path, knobs):
    # every output negative and one input map uniform: SPET (t = 0) stops every neuron, SDSS
    # (t = 1e-30) fills every cell, SFMA (t = 1e-6) drops exactly the uniform map - the oracles' choices
    path = conv_model(tmp_path / "c.onnx", np.abs(RNG.normal(0, 1, (4, 2, 3, 3))), np.full(4, -0.1), (2, 5, 5),
                      pads=[1, 1, 1, 1])
    plan = build_plan(path)
    x = -np.abs(RNG.normal(1, 1, (2, 5, 5))).astype(np.float32)
    x[1] = -0.5
    config = KnobConfig()
    for knob in knobs:
        config.set("conv", knob, {"spet": 0.0, "sdss": 1e-30, "sfma": 1e-6}[knob])
    engine = Engine(plan, config)
    engine.run(x[None])
    saved = sum(engine.counter.get("conv", f"saved_{k}") for k in knobs)
    assert saved > 0
    assert savings(path, x)["conv"][knobs[0] if len(knobs) == 1 else "knobs"] == saved


def pool_model(tmp_path, weight, in_shape, **pool):
    nodes = [helper.make_node("Conv", ["data", "W", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", **pool)]
    return save_model(tmp_path / "p.onnx", nodes, {"W": weight, "b": np.zeros(len(weight))}, in_shape, "p")


def test_pool_losers_with_overlapping_windows(tmp_path):
    # 2x2 windows, stride 1 (overlapping) on relu(x):
    #   [[1, 5, 2],     windows: max 5 at (0,1) twice; 6 at (2,1); 7 at (2,2)
    #    [3, 4, .5],    (2,1) wins one window and loses the other: kept
    #    [-1, 6, 7]]
    x = np.array([[1, 5, 2], [3, 4, .5], [-1, 6, 7]], np.float32)
    path = pool_model(tmp_path, center_kernels(1), (1, 3, 3), kernel_shape=[2, 2], strides=[1, 1])
    s = savings(path, x[None])["conv"]
    assert s["zeros"] == 1 * 20
    assert s["pool"] == (1 + 5) * 20  # the zero, and 1, 2, 3, 4, 0.5 that win no window


def test_pool_losers_through_the_relu_rewrite_and_padding(tmp_path):
    # Conv -> MaxPool -> Relu (the plan fuses the ReLU into the conv); 3x3 windows, stride 2, pad 1
    nodes = [helper.make_node("Conv", ["data", "W", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["p"], ["r"], name="relu")]
    path = save_model(tmp_path / "p.onnx", nodes, {"W": center_kernels(1), "b": np.zeros(1)}, (1, 3, 3), "r")
    # windows (rows/cols clipped to the input): [0..1]x[0..1], [0..1]x[1..2], [1..2]x[0..1], [1..2]x[1..2]
    # maxima of relu(X3) = [[1, 0, 3], [0, 5, 0], [7, 0, 9]]: 5 (1,1) twice, 7 (2,0), 9 (2,2)
    s = savings(path, X3[None])["conv"]
    assert s["zeros"] == 4 * 20
    assert s["pool"] == (4 + 2) * 20  # 1 and 3 are positive and win no window


def brute_winners(x: np.ndarray, k: int, s: int) -> np.ndarray:
    c, h, w = x.shape
    mask = np.zeros(x.shape, bool)
    for ch in range(c):
        for oy in range(0, h - k + 1, s):
            for ox in range(0, w - k + 1, s):
                win = x[ch, oy:oy + k, ox:ox + k]
                dy, dx = np.unravel_index(np.argmax(win), win.shape)
                mask[ch, oy + dy, ox + dx] = True
    return mask


def test_pool_losers_through_a_concat(tmp_path):
    # two convs (3 and 2 maps) -> Concat -> MaxPool 2x2 stride 2: each conv's losers by its channels
    nodes = [helper.make_node("Conv", ["data", "Wa", "ba"], ["a"], name="a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"], name="relua"),
             helper.make_node("Conv", ["data", "Wb", "bb"], ["b"], name="b", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["rb"], name="relub"),
             helper.make_node("Concat", ["ra", "rb"], ["cat"], name="cat", axis=1),
             helper.make_node("MaxPool", ["cat"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]
    inits = {"Wa": RNG.normal(0, 1, (3, 2, 3, 3)), "ba": RNG.normal(0, .1, 3),
             "Wb": RNG.normal(0, 1, (2, 2, 3, 3)), "bb": RNG.normal(0, .1, 2)}
    path = save_model(tmp_path / "cat.onnx", nodes, inits, (2, 6, 6), "p")
    plan = build_plan(path)
    x = RNG.normal(0, 1, (2, 6, 6)).astype(np.float32)
    values = activations(Engine(plan), x)
    s = image_savings(plan, values)
    winners = brute_winners(values["cat"], 2, 2)
    for name, channels in (("a", slice(0, 3)), ("b", slice(3, 5))):
        y = values[plan.layer(name).output]
        unit = plan.layer(name).dense_ops // y.size
        assert s[name]["zeros"] == int((y == 0).sum()) * unit
        assert s[name]["pool"] == int(((y == 0) | ~winners[channels]).sum()) * unit
        assert s[name]["pool"] > s[name]["zeros"]


def test_command_writes_json_and_csv(tmp_path, capsys):
    path = pool_model(tmp_path, RNG.normal(0, 1, (4, 2, 3, 3)), (2, 6, 6), kernel_shape=[2, 2], strides=[2, 2])
    x = RNG.normal(0, 1, (5, 2, 6, 6)).astype(np.float32)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=np.zeros(5, np.int64), ids=np.array([f"i{i}" for i in range(5)]),
             name=np.array("d"), split=np.array("calib"))
    code = main(["headroom", str(path), "--data", f"npz:{data}", "--json", str(tmp_path / "h.json"),
                 "--csv", str(tmp_path / "h.csv")])
    out = capsys.readouterr().out
    assert code == 0 and "network" in out
    doc = json.loads((tmp_path / "h.json").read_text())
    plan = build_plan(path)
    assert doc["n"] == 5 and doc["ops_dense"] == plan.dense_ops
    assert set(doc["reduction"]) == set(CEILINGS)
    with open(tmp_path / "h.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    net = {r["ceiling"]: r for r in rows if r["scope"] == "network"}
    layer_saved = sum(float(r["ops_saved"]) for r in rows if r["scope"] == "layer" and r["ceiling"] == "pool")
    assert float(net["pool"]["ops_saved"]) == pytest.approx(layer_saved)
    assert float(net["pool"]["reduction"]) == pytest.approx(doc["reduction"]["pool"])
    # the mean per image is the total over the images, each counted on its own
    engine = Engine(plan)
    total = sum(image_savings(plan, activations(engine, img))["conv"]["pool"] for img in x)
    assert float(net["pool"]["ops_saved"]) == pytest.approx(total / 5)


def test_bad_data_is_one_line(tmp_path, capsys):
    path = conv_model(tmp_path / "c.onnx", center_kernels(1), np.zeros(1), (1, 3, 3), pads=[1, 1, 1, 1])
    code = main(["headroom", str(path), "--data", f"npz:{tmp_path / 'absent.npz'}"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "absent.npz" in err


@pytest.mark.mirror
def test_invariants_on_cifar10_quick(mirror, tmp_path):
    from dyvedeep.convert import convert, preset_preprocess
    from dyvedeep.datasets import load_dataset
    from tests.conftest import mirror_path

    quick = "https://github.com/Simshang/pycaffe/raw/c59f61709b0c981f63eec8681327994e73e8f411"
    preprocess, labels = preset_preprocess("cifar10-caffe", mirror_path(mirror, f"{quick}/mean.binaryproto"))
    path = tmp_path / "q.onnx"
    convert(mirror_path(mirror, f"{quick}/cifar10_quick.prototxt"),
            mirror_path(mirror, f"{quick}/cifar10_quick_iter_5000.caffemodel"), path, preprocess, labels)
    plan = build_plan(path)
    images = load_dataset("cifar10:calib", plan.preprocess, mirror=mirror, limit=6).images(0, 6)
    engine = Engine(plan)
    # the layer-by-layer run is the dense path's, bit for bit
    assert np.array_equal(activations(engine, images[0])[plan.output_name], engine.run(images[:1])[0])
    result = measure(plan, list(images))
    for layer in plan.compute_layers():
        s = result.saved[layer.name]
        assert s["pool"] >= s["zeros"] >= max(s["spet"], s["sdss"])
        assert s["knobs"] >= max(s["spet"], s["sdss"], s["sfma"])
    assert result.saved["conv1"]["pool"] > result.saved["conv1"]["zeros"]  # conv1 feeds a max-pooling
    net = result.network()
    assert all(r >= 1.0 for r in net.values())
    assert net["pool"] >= net["zeros"] > net["spet"] > 1.0
