"""Helpers of the Pi-path tests (imported by conftest.py and the tests): the emulator module, the
board description, the small synthetic model, and the times measured on the emulated board."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from dyvedeep import remote

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TIMINGS: dict[str, Any] = {}  # shown in the terminal summary and written to .pi/test-pi-times.json

# The small model: a CIFAR-sized conv net with every op kind the knobs touch.
N_IMAGES = 1000
N_CLASSES = 10
SEED = 20170404


def load_emulator() -> ModuleType:
    """tools/pi_emulator.py as a module."""
    spec = importlib.util.spec_from_file_location("pi_emulator", PROJECT_ROOT / "tools" / "pi_emulator.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["pi_emulator"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def board_from_description(desc: Any) -> remote.Board:
    """A remote.Board for the emulator's board description."""
    return remote.Board(host=desc.host, port=desc.port, user=desc.user, key=desc.key,
                        known_hosts=desc.known_hosts, python=desc.python, workdir=desc.workdir,
                        name=desc.name, emulated=True)


def require_local_commands() -> None:
    """Skip until the engine's eval/bench commands exist."""
    for module in ("evaluate", "bench"):
        if not (PROJECT_ROOT / "dyvedeep" / f"{module}.py").exists():
            pytest.skip(f"dyvedeep/{module}.py (dyvedeep {module.replace('evaluate', 'eval')}) not written yet")


def make_model(path: Path, rng: np.random.Generator) -> None:
    """A small CIFAR-sized conv net (conv-relu-pool x2, LRN-free) following the ONNX contract."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from dyvedeep.metadata_keys import LABELS_KEY, PREPROCESS_KEY, SOURCE_KEY
    from dyvedeep.preprocess import Preprocess

    def weights(name: str, shape: tuple[int, ...], fan_in: int) -> list[onnx.TensorProto]:
        w = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (rng.standard_normal(shape[0]) * 0.05).astype(np.float32)
        return [numpy_helper.from_array(w, f"{name}_W"), numpy_helper.from_array(b, f"{name}_b")]

    inits = weights("conv1", (16, 3, 5, 5), 75) + weights("conv2", (32, 16, 3, 3), 144) \
        + weights("ip1", (N_CLASSES, 32 * 8 * 8), 2048)
    nodes = [
        helper.make_node("Conv", ["data", "conv1_W", "conv1_b"], ["conv1"], name="conv1",
                         kernel_shape=[5, 5], pads=[2, 2, 2, 2], strides=[1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("MaxPool", ["relu1"], ["pool1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool1", "conv2_W", "conv2_b"], ["conv2"], name="conv2",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("MaxPool", ["relu2"], ["pool2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool2"], ["flat"], name="flat", axis=1),
        helper.make_node("Gemm", ["flat", "ip1_W", "ip1_b"], ["ip1"], name="ip1", transB=1),
        helper.make_node("Softmax", ["ip1"], ["prob"], name="prob", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_pi",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", N_CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in ((PREPROCESS_KEY, Preprocess(channel_order="RGB").to_json()), (LABELS_KEY, "cifar10"),
                       (SOURCE_KEY, json.dumps({"format": "synthetic", "files": []}))):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def label_by_reference(model: Path, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels the dense model mostly gets right (its own predictions, 10 % replaced at random)."""
    try:
        import onnxruntime
    except ImportError:
        return rng.integers(0, N_CLASSES, len(x)).astype(np.int64)
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    pred = session.run(None, {"data": x})[0].argmax(axis=1).astype(np.int64)
    noise = rng.random(len(x)) < 0.1
    pred[noise] = rng.integers(0, N_CLASSES, int(noise.sum()))
    return pred


def write_small_model(root: Path) -> dict[str, Path]:
    """Write tiny_pi.onnx, tiny_pi.yaml (all three knobs on the conv layers) and test.npz to ``root``."""
    rng = np.random.default_rng(SEED)
    model = root / "tiny_pi.onnx"
    make_model(model, rng)
    # Smooth, image-like inputs so that SDSS and SFMA have something to find.
    base = rng.standard_normal((N_IMAGES, 3, 8, 8)).astype(np.float32)
    x = np.repeat(np.repeat(base, 4, axis=2), 4, axis=3)
    x += 0.1 * rng.standard_normal(x.shape).astype(np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = label_by_reference(model, x, rng)
    data = root / "test.npz"
    np.savez(data, x=x, y=y, ids=np.asarray([f"img{i:05d}" for i in range(N_IMAGES)]),
             name=np.asarray("synthetic"), split=np.asarray("test"), label_set=np.asarray("cifar10"),
             preprocess=np.asarray(""))
    knobs = root / "tiny_pi.yaml"
    knobs.write_text(
        "model: tiny_pi.onnx\n"
        "layers:\n"
        "  conv1:\n"
        "    spet: {enabled: true, threshold: 0.5, fraction: 0.5}\n"
        "    sdss: {enabled: true, threshold: 0.2, stride: 2, fill: bilinear}\n"
        "  conv2:\n"
        "    spet: {enabled: true, threshold: 0.5, fraction: 0.5}\n"
        "    sdss: {enabled: true, threshold: 0.2, stride: 2, fill: bilinear}\n"
        "    sfma: {enabled: true, threshold: 0.05}\n"
    )
    return {"model": model, "knobs": knobs, "data": data, "dir": root}
