"""OpenVINO IR -> ONNX: a small IR written like the Model Optimizer's (FP16 and FP32) against
the numpy reference of its Caffe equivalent; broken IRs fail naming the file; the real
SqueezeNet v1.1 IR has the architecture of forresti's deploy.prototxt and classifies images."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dyvedeep.convert import convert, preset_preprocess
from dyvedeep.convert.openvino import convert_openvino
from dyvedeep.errors import DyveError
from dyvedeep.metadata_keys import PREPROCESS_KEY
from dyvedeep.preprocess import Preprocess
from tests.conftest import mirror_path
from tests.factories.caffe import param_shapes, parse_prototxt, random_input
from tests.factories.mirror_data import imagenet_sample, load_resized_rgb
from tests.factories.openvino import write_openvino_ir
from tests.factories.reference import caffe_forward

SQUEEZENET_IR = "https://github.com/pixelzee3/copy-paste/raw/3fbd553686edc155777b352fdac77cc0065576ed/squeezenet1.1"
FORRESTI_V11 = "https://github.com/forresti/SqueezeNet/raw/51147dc0681638c28aad593b9e923f3500117125/SqueezeNet_v1.1/deploy.prototxt"


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"data": x})[0]


@pytest.mark.parametrize("fp16", [True, False], ids=["fp16", "fp32"])
def test_tiny_ir_matches_caffe_reference(tmp_path, fp16):
    files = write_openvino_ir(tmp_path, fp16=fp16)
    model = convert_openvino(files.xml).model
    onnx.checker.check_model(model, full_check=True)
    nodes = [(n.name, n.op_type) for n in model.graph.node]
    assert nodes[:3] == [("conv1", "Conv"), ("relu_conv1", "Relu"), ("pool1", "MaxPool")]
    assert ("pool10", "GlobalAveragePool") in nodes and nodes[-1] == ("prob", "Softmax")
    assert "Add" not in {op for _, op in nodes}, "conv biases are folded into the Conv nodes"
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert all(a.dtype == np.float32 for a in arrays.values())
    for layer, (weight, bias) in files.weights.items():
        np.testing.assert_array_equal(arrays[f"{layer}_W"], weight)
        np.testing.assert_array_equal(arrays[f"{layer}_b"], bias)
    x = random_input(files.net, batch=3)
    y = run(model, x)
    assert y.shape == (3, 5, 1, 1), "ceil-rounded pool1 gives 4 x 4, as the IR declares"
    np.testing.assert_allclose(y, caffe_forward(files.net, files.weights, x)["prob"], rtol=1e-4, atol=1e-6)


def test_short_bin_fails_naming_it(tmp_path):
    files = write_openvino_ir(tmp_path)
    files.bin.write_bytes(files.bin.read_bytes()[:-10])
    out = tmp_path / "m.onnx"
    with pytest.raises(DyveError, match=str(files.bin)):
        convert(files.xml, None, out)
    assert not out.exists()


def test_unsupported_operation_names_xml_and_layer(tmp_path):
    files = write_openvino_ir(tmp_path)
    files.xml.write_text(files.xml.read_text().replace('type="ReLU"', 'type="Elu"', 1))
    with pytest.raises(DyveError) as err:
        convert_openvino(files.xml, files.bin)
    assert str(files.xml) in str(err.value) and "relu_conv1" in str(err.value) and "Elu" in str(err.value)


def test_inconsistent_declared_shape_fails(tmp_path):
    files = write_openvino_ir(tmp_path)
    text = files.xml.read_text()
    start = text.index('name="pool1"')
    pool_out = text.index("<output>", start)
    text = text[:pool_out] + text[pool_out:].replace("<dim>4</dim>", "<dim>3</dim>", 2)
    files.xml.write_text(text)
    with pytest.raises(DyveError, match="pool1"):
        convert_openvino(files.xml, files.bin)


@pytest.mark.mirror
def test_real_squeezenet_v1_1_ir(mirror, tmp_path):
    xml = mirror_path(mirror, SQUEEZENET_IR + ".xml")
    out = tmp_path / "squeezenet_v1_1.onnx"
    convert(xml, None, out, preprocess=preset_preprocess("imagenet-caffe")[0])
    model = onnx.load(out)
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    assert sum(int(np.prod(s)) for s in shapes.values()) == 1_235_496
    deploy = param_shapes(parse_prototxt(mirror_path(mirror, FORRESTI_V11).read_text()))
    expected = {f"{layer}_{kind}": shape for layer, (w, b) in deploy.items() for kind, shape in (("W", w), ("b", b))}
    assert shapes == expected, "weights named and shaped as the Caffe deploy.prototxt's layers"
    names = [n.name for n in model.graph.node]
    assert {"conv1", "fire2/squeeze1x1", "fire9/expand3x3", "conv10", "pool10", "prob"} <= set(names)
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim[1:]] == [1000, 1, 1]
    files, labels = imagenet_sample(mirror, every=8)
    preprocess = Preprocess.from_json({p.key: p.value for p in model.metadata_props}[PREPROCESS_KEY])
    x = np.stack([preprocess.apply(load_resized_rgb(f, tuple(preprocess.resize))) for f in files])
    scores = run(model, x).reshape(len(files), -1)
    top1 = float((scores.argmax(axis=1) == labels).mean())
    assert top1 > 0.55, f"top-1 {top1:.3f} on {len(files)} sample images (about 0.673 expected)"
