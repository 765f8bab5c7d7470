"""Importing one's own ONNX (dyvedeep/convert/onnx_import.py) on hand-built graphs: initializers
listed as inputs, constant subgraphs, BatchNormalization and per-channel Mul / Add folded into
the conv, a standalone BatchNormalization, Sum, Transpose and broadcast constants, each against
onnxruntime and with its exact dense op count (docs/ops.md); an op the engine cannot run is one
line naming it, exit != 0, through the CLI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dyvedeep.cli import main
from dyvedeep.convert.onnx_import import import_model, per_channel
from dyvedeep.engine import Engine
from dyvedeep.errors import DyveError
from dyvedeep.evaluate import RELATIVE_TOLERANCE
from dyvedeep.plan import Op, build_plan
from tests.onnx_builders import save_model

RNG = np.random.default_rng(2026)
IN_SHAPE = (3, 8, 8)


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def assert_matches_ort(path: Path, x: np.ndarray, rel: float = RELATIVE_TOLERANCE) -> np.ndarray:
    ours = Engine(build_plan(path)).run(x)
    ref = ort_run(path, x).reshape(ours.shape)
    assert np.abs(ours - ref).max() <= rel * np.abs(ref).max(), np.abs(ours - ref).max()
    return ours


def images(n: int = 2, shape: tuple[int, ...] = IN_SHAPE) -> np.ndarray:
    return RNG.normal(0, 1, (n, *shape)).astype(np.float32)


def bn_params(c: int, prefix: str = "bn") -> dict[str, np.ndarray]:
    return {f"{prefix}_g": RNG.uniform(0.5, 1.5, c), f"{prefix}_b": RNG.normal(0, 0.3, c),
            f"{prefix}_m": RNG.normal(0, 0.3, c), f"{prefix}_v": RNG.uniform(0.2, 2.0, c)}


def bn_node(x: str, out: str, prefix: str = "bn", eps: float = 1e-3) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
                            [out], name=prefix, epsilon=eps)


def conv_inits(cout: int = 4, cin: int = 3) -> dict[str, np.ndarray]:
    return {"W": RNG.normal(0, 0.4, (cout, cin, 3, 3)), "b": RNG.normal(0, 0.1, cout)}


CONV = helper.make_node("Conv", ["data", "W", "b"], ["c"], name="conv", pads=[1, 1, 1, 1])


# ----------------------------------------------------------------------------- loading


def test_initializers_listed_as_inputs_are_constants(tmp_path):
    """An IR 3 file lists its weights among the graph inputs: the plan has one input, the conv."""
    inits = conv_inits()
    graph = helper.make_graph(
        [CONV, helper.make_node("Relu", ["c"], ["r"], name="relu")], "ir3",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, *IN_SHAPE])]
        + [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in inits.items()],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    path = tmp_path / "ir3.onnx"
    onnx.save(model, str(path))
    plan = build_plan(path)
    assert plan.input_name == "data" and [(layer.op, layer.relu) for layer in plan.layers] == [(Op.CONV, True)]
    assert_matches_ort(path, images(1))


def test_constant_subgraphs_are_folded(tmp_path):
    """Weights made by ConstantOfShape and a bias by Unsqueeze of a constant are folded."""
    nodes = [helper.make_node("ConstantOfShape", ["wshape"], ["W"], name="fill",
                              value=numpy_helper.from_array(np.array([0.05], np.float32))),
             helper.make_node("Unsqueeze", ["b0"], ["b"], name="unsq", axes=[0]),
             helper.make_node("Conv", ["data", "W", "bflat"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "b"], ["out"], name="shift")]
    graph = helper.make_graph(
        nodes, "cos", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", *IN_SHAPE])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([4, 3, 3, 3], np.int64), "wshape"),
         numpy_helper.from_array(RNG.normal(0, 1, (4, 1, 1)).astype(np.float32), "b0"),
         numpy_helper.from_array(np.zeros(4, np.float32), "bflat")])
    path = tmp_path / "cos.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7), str(path))
    plan = build_plan(path)
    assert [layer.op for layer in plan.layers] == [Op.CONV]  # the Add folded into the conv's bias
    assert np.all(plan.layers[0].weight == np.float32(0.05))
    assert_matches_ort(path, images())


def test_a_model_without_anything_to_import_is_unchanged(tmp_path):
    path = save_model(tmp_path / "plain.onnx", [CONV, helper.make_node("Mul", ["c", "s"], ["out"], name="scale")],
                      {**conv_inits(), "s": np.array(0.5)}, IN_SHAPE, "out")
    model = onnx.load(str(path))
    assert import_model(model, path) == model  # a scalar Mul is not per-channel: left to the eltwise op


# ----------------------------------------------------------------------------- folds into the conv


@pytest.mark.parametrize("relu, bias", [(True, True), (False, True), (True, False)])
def test_batchnorm_folds_into_the_conv_as_onnxruntime_computes_it(tmp_path, relu, bias):
    conv = CONV if bias else helper.make_node("Conv", ["data", "W", ""], ["c"], name="conv", pads=[1, 1, 1, 1])
    nodes = [conv, bn_node("c", "n")] + ([helper.make_node("Relu", ["n"], ["r"], name="relu")] if relu else [])
    inits = {**conv_inits(), **bn_params(4)}
    if not bias:
        inits["b"] = np.zeros(4)  # for the expected bias below; not an input of the conv
    path = save_model(tmp_path / "bn.onnx", nodes, inits if bias else {k: v for k, v in inits.items() if k != "b"},
                      IN_SHAPE, "r" if relu else "n")
    plan = build_plan(path)
    assert [(layer.op, layer.relu) for layer in plan.layers] == [(Op.CONV, relu)]
    scale = inits["bn_g"] / np.sqrt(inits["bn_v"] + np.float32(1e-3))
    np.testing.assert_allclose(plan.layers[0].weight, inits["W"] * scale[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(plan.layers[0].bias, (inits["b"] - inits["bn_m"]) * scale + inits["bn_b"],
                               rtol=1e-6, atol=1e-7)
    assert_matches_ort(path, images(), rel=1e-5)


def test_per_channel_mul_and_add_fold_into_the_conv(tmp_path):
    """Conv -> Mul (C, 1, 1) -> Add (1, C, 1, 1): one conv layer with the scaled weights and bias."""
    nodes = [CONV, helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
             helper.make_node("Add", ["t", "m"], ["a"], name="add"), helper.make_node("Relu", ["a"], ["r"], name="relu")]
    inits = {**conv_inits(), "s": RNG.uniform(0.5, 2, (4, 1, 1)), "t": RNG.normal(0, 0.5, (1, 4, 1, 1))}
    path = save_model(tmp_path / "ma.onnx", nodes, inits, IN_SHAPE, "r")
    plan = build_plan(path)
    assert [(layer.op, layer.relu) for layer in plan.layers] == [(Op.CONV, True)]
    np.testing.assert_allclose(plan.layers[0].bias, inits["b"] * inits["s"].reshape(-1) + inits["t"].reshape(-1),
                               rtol=1e-6)
    assert_matches_ort(path, images(), rel=1e-5)


def test_a_conv_read_twice_keeps_its_batchnorms(tmp_path):
    """Two BatchNormalizations read one conv (Inception v2): neither folds; each is a batchnorm
    layer with its ReLU, and a per-channel Mul after one folds into that batchnorm."""
    nodes = [CONV, bn_node("c", "n1", "bn1"), bn_node("c", "n2", "bn2"),
             helper.make_node("Mul", ["n1", "s"], ["m1"], name="mul"),
             helper.make_node("Relu", ["m1"], ["r1"], name="relu1"), helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
             helper.make_node("Concat", ["r1", "r2"], ["out"], name="cat", axis=1)]
    inits = {**conv_inits(), **bn_params(4, "bn1"), **bn_params(4, "bn2"), "s": RNG.uniform(0.5, 2, (4, 1, 1))}
    path = save_model(tmp_path / "two.onnx", nodes, inits, IN_SHAPE, "out")
    plan = build_plan(path)
    assert [(layer.op, layer.relu) for layer in plan.layers] == [
        (Op.CONV, False), (Op.BATCHNORM, True), (Op.BATCHNORM, True), (Op.CONCAT, False)]
    assert_matches_ort(path, images(), rel=1e-5)


# ----------------------------------------------------------------------------- the new ops


@pytest.mark.parametrize("relu", [True, False])
def test_standalone_batchnorm_and_its_op_count(tmp_path, relu):
    """BatchNormalization on the input (DenseNet's pre-activation): scale + shift per channel,
    2 ops per element, + 1 with its ReLU; Mul / Add by per-channel constants fold into it."""
    nodes = [bn_node("data", "n", eps=1e-5), helper.make_node("Mul", ["n", "s"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "t"], ["a"], name="add")]
    nodes += [helper.make_node("Relu", ["a"], ["r"], name="relu")] if relu else []
    inits = {**bn_params(3), "s": RNG.uniform(0.5, 2, (3, 1, 1)), "t": RNG.normal(0, 0.5, (3, 1, 1))}
    path = save_model(tmp_path / "bn.onnx", nodes, inits, IN_SHAPE, "r" if relu else "a")
    plan = build_plan(path)
    assert [(layer.op, layer.relu) for layer in plan.layers] == [(Op.BATCHNORM, relu)]
    assert plan.dense_ops == int(np.prod(IN_SHAPE)) * (3 if relu else 2)
    assert plan.layers[0].dense_macs == 0
    assert_matches_ort(path, images(), rel=1e-5)


def test_sum_is_an_n_ary_add(tmp_path):
    nodes = [helper.make_node("Relu", ["data"], ["r"], name="relu"),
             helper.make_node("Conv", ["data", "W", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Sum", ["data", "r", "c"], ["s"], name="sum")]
    path = save_model(tmp_path / "sum.onnx", nodes, conv_inits(3, 3), IN_SHAPE, "s")
    plan = build_plan(path)
    sum_layer = plan.layer("sum")
    assert sum_layer.op == Op.SUM and sum_layer.dense_ops == 2 * int(np.prod(IN_SHAPE))
    assert_matches_ort(path, images(), rel=1e-6)


def test_channel_shuffle_transpose(tmp_path):
    """ShuffleNet's channel shuffle: Reshape (g, C/g, H, W) -> Transpose -> Reshape; no ops."""
    shape = (6, 4, 5)
    nodes = [helper.make_node("Reshape", ["data", "s5"], ["a"], name="split"),
             helper.make_node("Transpose", ["a"], ["t"], name="shuffle", perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t", "s4"], ["out"], name="merge")]
    inits = {"s5": np.array([-1, 2, 3, 4, 5]), "s4": np.array([-1, 6, 4, 5])}
    path = tmp_path / "shuffle.onnx"
    graph = helper.make_graph(nodes, "shuffle", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", *shape])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v.astype(np.int64), k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    plan = build_plan(path)
    assert plan.layer("shuffle").op == Op.TRANSPOSE and plan.dense_ops == 0
    x = images(2, shape)
    ours = assert_matches_ort(path, x, rel=0)
    np.testing.assert_array_equal(ours, x[:, [0, 3, 1, 4, 2, 5]])  # output channel j*2+i is input i*3+j


def test_constants_broadcast_in_add_and_mul(tmp_path):
    """An Add / Mul by a non-scalar constant not after a conv stays an elementwise layer,
    broadcast per image: 1 op per element."""
    nodes = [helper.make_node("Relu", ["data"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "s"], ["m"], name="mul"),
             helper.make_node("Add", ["w", "m"], ["out"], name="add")]
    inits = {"s": RNG.uniform(0.5, 2, (3, 1, 1)), "w": RNG.normal(0, 1, (1, 1, 8))}
    path = save_model(tmp_path / "bc.onnx", nodes, inits, IN_SHAPE, "out")
    plan = build_plan(path)
    assert [layer.op for layer in plan.layers] == [Op.RELU, Op.ELTWISE, Op.ELTWISE]
    assert plan.dense_ops == 3 * int(np.prod(IN_SHAPE))
    assert_matches_ort(path, images(), rel=1e-6)


def test_per_channel_recognises_only_the_channel_axis():
    assert per_channel(np.ones((4, 1, 1)), 4, 4) is not None
    assert per_channel(np.ones((1, 4, 1, 1)), 4, 4) is not None
    assert per_channel(np.ones(4), 4, 4) is None  # broadcasts along W, not C
    assert per_channel(np.ones(1), 4, 4) is None
    assert per_channel(np.ones((4, 2, 1)), 4, 4) is None


def test_opset_9_softmax_over_flattened_axes(tmp_path):
    """Opset < 13 Softmax (default axis 1, over the axes from it on) runs when it means a
    softmax over channels; over a whole C x H x W map it is one line naming it."""
    for shape, ok in (((5, 1, 1), True), ((5, 2, 2), False)):
        graph = helper.make_graph([helper.make_node("Softmax", ["data"], ["out"], name="prob")], "sm",
                                  [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, *shape])],
                                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
        path = tmp_path / f"sm{shape[1]}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4), str(path))
        if ok:
            assert_matches_ort(path, images(1, shape), rel=1e-6)
        else:
            with pytest.raises(DyveError, match=r"sm2\.onnx.*Softmax prob"):
                build_plan(path)


# ----------------------------------------------------------------------------- bad input


def test_an_unsupported_op_is_one_line_through_the_cli(tmp_path, capsys):
    nodes = [CONV, helper.make_node("Erf", ["c"], ["out"], name="gelu_part")]
    path = save_model(tmp_path / "erf.onnx", nodes, conv_inits(), IN_SHAPE, "out")
    data = tmp_path / "x.npz"
    np.savez(data, x=images(), y=np.zeros(2, np.int64), ids=np.array(["a", "b"]), name=np.array("x"),
             split=np.array("test"))
    code = main(["verify", str(path), "--data", f"npz:{data}"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1, err
    assert "erf.onnx" in lines[0] and "Erf" in lines[0] and "gelu_part" in lines[0]
