"""Caffe -> ONNX: tiny nets against a numpy reference of Caffe, the real architectures with
random weights (AlexNet, VGG-16 in V1 format, OverFeat fast), and the real cifar10 models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from tests.conftest import find_mirror, mirror_path
from dyvedeep import caffe_pb2
from dyvedeep.convert import convert, preset_preprocess, read_mean_binaryproto
from dyvedeep.convert.caffe import convert_caffe, read_caffemodel
from dyvedeep.errors import DyveError
from dyvedeep.metadata_keys import LABELS_KEY, PREPROCESS_KEY, SOURCE_KEY
from dyvedeep.preprocess import Preprocess
from tests.factories.caffe import (
    alexnet,
    blob_shapes,
    overfeat_fast,
    param_shapes,
    random_input,
    tiny_model,
    vgg16,
    write_caffe_model,
)
from tests.factories.mirror_data import cifar10_test_images
from tests.factories.prototxts import OVERFEAT_FAST_SHAPES, TINY_NETS
from tests.factories.reference import caffe_forward

CIFAR_QUICK = "https://github.com/Simshang/pycaffe/raw/c59f61709b0c981f63eec8681327994e73e8f411/"
CIFAR_FULL = "https://github.com/yuvval/nn_ex1/raw/32f4934aca65c4772eb2a43cb119905e981adba3/examples/cifar10/"


def convert_file(tmp_path: Path, prototxt: Path, weights: Path, **kwargs) -> onnx.ModelProto:
    """Convert through the public API and load the written model."""
    out = tmp_path / "model.onnx"
    convert(prototxt, weights, out, **kwargs)
    return onnx.load(out)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def node_outputs(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run ``model`` on ``x`` and return the output of every node, by node name."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    names = {node.name: node.output[0] for node in probe.graph.node}
    for tensor in dict.fromkeys(names.values()):
        probe.graph.output.append(onnx.ValueInfoProto(name=tensor))
    values = dict(zip([o.name for o in probe.graph.output], session(probe).run(None, {"data": x})))
    return {node: values[tensor] for node, tensor in names.items()}


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str, rtol: float = 1e-4) -> None:
    assert actual.shape == expected.shape, what
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


# --------------------------------------------------------------------------- tiny nets


@pytest.mark.parametrize("v1_weights", [False, True], ids=["new-caffemodel", "v1-caffemodel"])
@pytest.mark.parametrize("name", sorted(TINY_NETS))
def test_tiny_net_matches_caffe_reference_layer_by_layer(tmp_path, name, v1_weights):
    files = tiny_model(tmp_path, name, v1_weights=v1_weights)
    model = convert_file(tmp_path, files.prototxt, files.caffemodel)
    x = random_input(files.net, batch=2)
    reference = caffe_forward(files.net, files.weights, x)
    outputs = node_outputs(model, x)
    compared = [layer for layer in reference if layer in outputs]
    aliases = {l.name for l in files.net.layer if l.type in ("Dropout", "Split")} | {
        l.name for l in files.net.layers if l.type in (caffe_pb2.V1LayerParameter.DROPOUT, caffe_pb2.V1LayerParameter.SPLIT)}
    assert set(compared) == set(reference) - aliases, "every computing layer has a node of its name"
    for layer in compared:
        assert_close(outputs[layer], reference[layer], f"{name}: layer {layer}")
    (final,) = session(model).run(None, {"data": x})
    assert_close(final, list(reference.values())[-1], f"{name}: output")


def test_model_contract_input_output_opset_metadata(tmp_path):
    files = tiny_model(tmp_path, "concat_eltwise_split")
    model = convert_file(tmp_path, files.prototxt, files.caffemodel)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "data" and dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [3, 8, 8]
    (graph_output,) = model.graph.output
    assert graph_output.name == "prob"
    initializers = {i.name for i in model.graph.initializer}
    assert {"conv_a_W", "conv_a_b", "conv_b_W", "conv_c_W", "ip_W", "ip_b"} <= initializers
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert gemm.name == "ip" and onnx.helper.get_attribute_value(gemm.attribute[0]) == 1  # transB
    assert model.graph.node[[n.name for n in model.graph.node].index("ip") - 1].op_type == "Flatten"
    meta = metadata(model)
    assert json.loads(meta[SOURCE_KEY]) == {
        "format": "caffe", "files": ["concat_eltwise_split.prototxt", "concat_eltwise_split.caffemodel"]}
    assert Preprocess.from_json(meta[PREPROCESS_KEY]) == Preprocess()
    assert LABELS_KEY not in meta  # 6 classes: no known label set


def test_batch_dimension_is_free(tmp_path):
    files = tiny_model(tmp_path, "global_pool")
    model = convert_file(tmp_path, files.prototxt, files.caffemodel)
    x = random_input(files.net, batch=5)
    (y,) = session(model).run(None, {"data": x})
    assert y.shape == (5, 4)
    assert_close(y, caffe_forward(files.net, files.weights, x)["prob"], "batch of 5")


def test_in_place_layers_become_ssa(tmp_path):
    files = tiny_model(tmp_path, "conv_group_dilation")
    model = convert_file(tmp_path, files.prototxt, files.caffemodel)
    outputs = [o for n in model.graph.node for o in n.output]
    assert len(outputs) == len(set(outputs)), "every tensor is written once"
    by_name = {n.name: n for n in model.graph.node}
    assert by_name["conv1"].output[0] == "conv1"
    assert by_name["relu1"].input[0] == "conv1" and by_name["relu1"].output[0] == "conv1/relu1"
    assert by_name["conv2"].input[0] == "conv1/relu1"
    assert len(by_name["conv2"].input) == 2, "bias_term: false gives a Conv without bias"


def test_new_and_v1_caffemodels_give_the_same_weights(tmp_path):
    new = tiny_model(tmp_path / "new", "v1_legacy", v1_weights=False)
    old = tiny_model(tmp_path / "old", "v1_legacy", v1_weights=True)
    assert new.caffemodel.read_bytes() != old.caffemodel.read_bytes()
    a = {i.name: onnx.numpy_helper.to_array(i) for i in convert_caffe(new.prototxt, new.caffemodel).model.graph.initializer}
    b = {i.name: onnx.numpy_helper.to_array(i) for i in convert_caffe(old.prototxt, old.caffemodel).model.graph.initializer}
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    blobs = read_caffemodel(old.caffemodel)
    assert blobs["ip1"][0].shape == (1, 1, 5, 128) and blobs["ip1"][1].shape == (1, 1, 1, 5)


def test_leaky_relu_and_product_eltwise_are_refused(tmp_path):
    base = tiny_model(tmp_path, "concat_eltwise_split")
    for field, text in [("relu", 'relu_param { negative_slope: 0.1 }'), ("eltwise", "eltwise_param { operation: PROD }")]:
        prototxt = tmp_path / f"{field}.prototxt"
        source = TINY_NETS["concat_eltwise_split"]
        if field == "relu":
            source = source.replace('top: "conv_c" }', f'top: "conv_c" {text} }}')
        else:
            source = source.replace('top: "sum2" }', f'top: "sum2" {text} }}')
        prototxt.write_text(source)
        with pytest.raises(DyveError, match=str(prototxt)):
            convert_caffe(prototxt, base.caffemodel)


# --------------------------------------------------------------------------- real architectures


@pytest.mark.slow
def test_alexnet_random_weights_match_reference(tmp_path):
    files = alexnet(tmp_path, find_mirror())
    model = convert_file(tmp_path, files.prototxt, files.caffemodel)
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    assert shapes["conv2_W"] == (256, 48, 5, 5) and shapes["fc6_W"] == (4096, 9216)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 60_965_224
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("LRN") == 2 and ops.count("Conv") == 5 and ops.count("Gemm") == 3
    x = random_input(files.net)
    (y,) = session(model).run(None, {"data": x})
    assert y.shape == (1, 1000) and metadata(model)[LABELS_KEY] == "imagenet"
    assert_close(y, caffe_forward(files.net, files.weights, x)["prob"], "alexnet", rtol=1e-3)


@pytest.mark.slow
def test_vgg16_v1_prototxt_and_v1_caffemodel(tmp_path):
    files = vgg16(tmp_path)
    assert not files.net.layer and len(files.net.layers) == 39
    out = tmp_path / "vgg16.onnx"
    convert(files.prototxt, files.caffemodel, out, preprocess=preset_preprocess("imagenet-caffe-224")[0])
    files.caffemodel.unlink()
    model = onnx.load(out, load_external_data=False)
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    assert shapes["conv1_1_W"] == (64, 3, 3, 3) and shapes["fc6_W"] == (4096, 25088) and shapes["fc8_b"] == (1000,)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 138_357_544
    assert [n.op_type for n in model.graph.node].count("MaxPool") == 5
    del model
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"data": random_input(files.net)})
    assert y.shape == (1, 1000) and np.isfinite(y).all() and abs(float(y.sum()) - 1) < 1e-4


@pytest.mark.slow
def test_overfeat_fast_shapes(tmp_path):
    files = overfeat_fast(tmp_path)
    assert {k: v[1:] for k, v in blob_shapes(files.net).items() if k in OVERFEAT_FAST_SHAPES} == OVERFEAT_FAST_SHAPES
    out = tmp_path / "overfeat.onnx"
    convert(files.prototxt, files.caffemodel, out)
    files.caffemodel.unlink()
    model = onnx.load(out)
    assert sum(int(np.prod(i.dims)) for i in model.graph.initializer) == 145_920_872
    expected = param_shapes(files.net)
    for init in model.graph.initializer:
        layer, kind = init.name.rsplit("_", 1)
        assert tuple(init.dims) == expected[layer][0 if kind == "W" else 1]
    del model
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"data": random_input(files.net)})
    assert y.shape == (1, 1000) and np.isfinite(y).all()


# --------------------------------------------------------------------------- real models


def caffemodel_arrays(path: Path) -> dict[str, list[np.ndarray]]:
    """Blobs of a new-format caffemodel, read directly with protobuf (independent of the converter)."""
    net = caffe_pb2.NetParameter()
    net.ParseFromString(path.read_bytes())
    return {l.name: [np.asarray(b.data, np.float32).reshape(b.shape.dim) for b in l.blobs] for l in net.layer if l.blobs}


@pytest.mark.mirror
@pytest.mark.parametrize("prefix, prototxt, caffemodel, expected_top1", [
    (CIFAR_QUICK, "cifar10_quick.prototxt", "cifar10_quick_iter_5000.caffemodel", 0.768),
    (CIFAR_FULL, "cifar10_full.prototxt", "cifar10_full_iter_70000.caffemodel", 0.826),
], ids=["cifar10_quick", "cifar10_full"])
def test_real_cifar10_models(mirror, tmp_path, prefix, prototxt, caffemodel, expected_top1):
    prototxt_path, caffemodel_path = mirror_path(mirror, prefix + prototxt), mirror_path(mirror, prefix + caffemodel)
    mean_path = mirror_path(mirror, CIFAR_QUICK + "mean.binaryproto")
    model = convert_file(tmp_path, prototxt_path, caffemodel_path,
                         preprocess=preset_preprocess("cifar10-caffe", mean_path)[0])
    meta = metadata(model)
    assert meta[LABELS_KEY] == "cifar10"
    preprocess = Preprocess.from_json(meta[PREPROCESS_KEY])
    assert preprocess.channel_order == "RGB" and preprocess.mean_shape == [3, 32, 32]
    images, labels = cifar10_test_images(mirror)
    x = np.stack([preprocess.apply(image) for image in images])
    (probabilities,) = session(model).run(None, {"data": x})
    top1 = float((probabilities.argmax(axis=1) == labels).mean())
    assert abs(top1 - expected_top1) <= 0.002, f"top-1 {top1:.3f}"
    net = text_format.Parse(prototxt_path.read_text(), caffe_pb2.NetParameter())
    reference = caffe_forward(net, caffemodel_arrays(caffemodel_path), x[:16])
    assert_close(probabilities[:16], reference["prob"], "real weights vs reference", rtol=1e-4)


@pytest.mark.mirror
def test_read_mean_binaryproto(mirror):
    mean = read_mean_binaryproto(mirror_path(mirror, CIFAR_QUICK + "mean.binaryproto"))
    assert mean.shape == (3, 32, 32) and mean.dtype == np.float32
    assert 100 < float(mean.mean()) < 150


def test_unknown_layer_type_names_prototxt_layer_and_type(tmp_path):
    files = tiny_model(tmp_path, "lrn")
    prototxt = tmp_path / "odd.prototxt"
    prototxt.write_text(TINY_NETS["lrn"].replace('type: "LRN" bottom: "within"', 'type: "Frobnicate" bottom: "within"'))
    with pytest.raises(DyveError) as err:
        convert_caffe(prototxt, files.caffemodel)
    assert str(prototxt) in str(err.value) and "across_defaults" in str(err.value) and "Frobnicate" in str(err.value)


def test_shape_mismatch_names_weights_layer_and_shapes(tmp_path):
    files = write_caffe_model(tmp_path, "small", TINY_NETS["lrn"])
    prototxt = tmp_path / "wider.prototxt"
    prototxt.write_text(TINY_NETS["lrn"].replace("num_output: 8", "num_output: 9"))
    with pytest.raises(DyveError) as err:
        convert_caffe(prototxt, files.caffemodel)
    message = str(err.value)
    assert str(files.caffemodel) in message and "conv1" in message
    assert "[9, 7, 1, 1]" in message and "[8, 7, 1, 1]" in message
