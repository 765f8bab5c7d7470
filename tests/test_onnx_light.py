"""The real architectures the ``onnx`` package ships for its backend tests
(``onnx/backend/test/data/light/``: AlexNet, VGG-19, ZFNet-512, SqueezeNet, Inception v1/v2,
ResNet-50, DenseNet-121, ShuffleNet) plan and run on the engine, as a researcher's own ONNX
would: each matches onnxruntime within verify's tolerance, and the output shipped with it.

The shipped weights are constant fills (ConstantOfShape), under which every class gets the same
score; so each model also runs with seeded random weights of the same shapes in place of the
fills, which makes every layer's output depend on its weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from dyvedeep.cli_support import onnxruntime_outputs, onnxruntime_session
from dyvedeep.engine import Engine
from dyvedeep.evaluate import RELATIVE_TOLERANCE
from dyvedeep.plan import Op, build_plan

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"

#: Model -> the rtol onnx's own backend test allows against the shipped output (atol 1e-7).
SHIPPED_RTOL = {"bvlc_alexnet": 1e-3, "densenet121": 2e-3, "inception_v1": 1e-3, "inception_v2": 1e-3,
                "resnet50": 1e-3, "shufflenet": 1e-3, "squeezenet": 1e-3, "vgg19": 1e-3, "zfnet512": 1e-3}

#: The engine ops each model needs beyond conv / fc / pooling (what the import made it run).
NEEDS = {"densenet121": {Op.BATCHNORM}, "inception_v2": {Op.BATCHNORM}, "resnet50": {Op.SUM},
         "shufflenet": {Op.SUM, Op.TRANSPOSE}}


def reference_input(shape: tuple[int, ...]) -> np.ndarray:
    """The input onnx's backend runner feeds the light models (generate_dummy_data, random=False)."""
    n = int(np.prod(shape))
    return (np.arange(n).reshape((1, *shape)) / n).astype(np.float32)


def engine_and_onnxruntime(path: Path, x: np.ndarray):
    plan = build_plan(path)
    ours = Engine(plan).run(x)
    session = onnxruntime_session(path, 1)
    ref = onnxruntime_outputs(session, session.get_inputs()[0].name, x, path).reshape(ours.shape)
    return plan, ours, ref


def assert_verify_tolerance(ours: np.ndarray, ref: np.ndarray) -> None:
    scale = float(np.abs(ref).max())
    assert scale > 0
    assert float(np.abs(ours - ref).max()) <= RELATIVE_TOLERANCE * scale
    assert int(ours.argmax()) == int(ref.argmax()) or np.ptp(np.sort(ref.reshape(-1))[-2:]) <= 1e-4 * scale


def random_weight(rng: np.random.Generator, op: str, index: int, shape: tuple[int, ...],
                  node: onnx.NodeProto) -> np.ndarray:
    """Seeded weights for the ``index``-th input of a node of type ``op``: He-scaled conv and
    fully-connected weights, BatchNormalization statistics with variances > 0, per-channel
    scales near 1 and shifts near 0."""
    size = int(np.prod(shape))
    if op == "Conv" and index == 1:
        return rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / max(size // shape[0], 1)))
    if op == "Gemm" and index == 1:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        fan_in = shape[1] if trans_b else shape[0]
        return rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    if (op == "BatchNormalization" and index in (1, 4)) or op == "Mul":
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return (rng.standard_normal(shape, np.float32) * np.float32(0.1)).reshape(shape) if size else np.zeros(shape, np.float32)


def with_random_weights(path: Path, out: Path, seed: int = 0) -> Path:
    """The model at ``path`` with each float ConstantOfShape replaced by a seeded random
    initializer (listed among the graph inputs too, as in the shipped IR 3 files), and ending
    in the logits (a final Softmax of random logits saturates: one-hot for every image)."""
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))
    rng = np.random.default_rng(seed)
    kept = []
    for node in graph.node:
        value = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"), np.zeros(1, np.float32))
        if node.op_type != "ConstantOfShape" or value.dtype != np.float32:
            kept.append(node)
            continue
        shape = tuple(int(d) for d in inits[node.input[0]])
        user, index = consumers[node.output[0]][0]
        while user.op_type == "Unsqueeze":  # a per-channel scale or shift, unsqueezed for broadcasting
            user, index = consumers[user.output[0]][0]
        array = random_weight(rng, user.op_type, index, shape, user)
        graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        graph.input.append(helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, shape))
    if kept[-1].op_type == "Softmax" and kept[-1].output[0] == graph.output[0].name:
        softmax = kept.pop()
        next(n for n in kept if softmax.input[0] in n.output).output[0] = softmax.output[0]
    del graph.node[:]
    graph.node.extend(kept)
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize("name", sorted(SHIPPED_RTOL))
def test_light_model_matches_onnxruntime_and_its_shipped_output(name: str, tmp_path: Path) -> None:
    path = LIGHT / f"light_{name}.onnx"
    plan, ours, ref = engine_and_onnxruntime(path, reference_input(_input_shape(path)))
    assert_verify_tolerance(ours, ref)
    shipped = numpy_helper.to_array(onnx.load_tensor(str(LIGHT / f"light_{name}_output_0.pb"))).reshape(ours.shape)
    np.testing.assert_allclose(ours, shipped, rtol=SHIPPED_RTOL[name], atol=1e-7)
    assert NEEDS.get(name, set()) <= {layer.op for layer in plan.layers}
    assert plan.dense_ops > 0 and all(layer.dense_ops >= 0 for layer in plan.layers)


@pytest.mark.parametrize("name", sorted(SHIPPED_RTOL))
def test_light_model_with_random_weights_matches_onnxruntime(name: str, tmp_path: Path) -> None:
    shipped = LIGHT / f"light_{name}.onnx"
    path = with_random_weights(shipped, tmp_path / f"{name}_random.onnx")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *_input_shape(shipped)), np.float32)
    _, ours, ref = engine_and_onnxruntime(path, x)  # two images: onnxruntime runs them one by one
    for n in range(len(x)):
        assert_verify_tolerance(ours[n], ref[n])
    assert not np.array_equal(ours[0], ours[1])  # the output depends on the input


def _input_shape(path: Path) -> tuple[int, ...]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    data = next(i for i in model.graph.input if i.name not in inits)
    return tuple(int(d.dim_value) for d in data.type.tensor_type.shape.dim)[1:]
