"""Caffe BatchNorm and Scale layers folded into the convolution before them, test nets (Data
layer, Accuracy, SoftmaxWithLoss) and their transform_param as the model's preprocessing, and
bad BatchNorm / Scale / Data layers refused in one line."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dyvedeep.cli import main
from dyvedeep.convert import convert
from dyvedeep.engine import Engine
from dyvedeep.errors import DyveError
from dyvedeep.metadata_keys import PREPROCESS_KEY
from dyvedeep.plan import build_plan
from dyvedeep.preprocess import Preprocess
from tests.caffe_norm_nets import (
    BN_NET_LAYERS, INPUT_LAYER, bn_net_forward, bn_net_weights, data_layer, write_mean_file, write_net,
)

RNG = np.random.default_rng(3)


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"data": x})[0]


def preprocess_of(path: Path) -> Preprocess:
    return Preprocess.from_json({p.key: p.value for p in onnx.load(path).metadata_props}[PREPROCESS_KEY])


def one_line_failure(capsys, argv: list[str], out: Path) -> str:
    """The CLI's single error line (exit != 0, no output written)."""
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(lines) == 1, lines
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("scale_factor", [0.5, 999.982, 0.0])
def test_batchnorm_and_scale_fold_into_conv_and_ip(tmp_path, scale_factor):
    weights = bn_net_weights(scale_factor=scale_factor)
    prototxt, caffemodel = write_net(tmp_path, "bn", INPUT_LAYER + BN_NET_LAYERS, weights)
    out = tmp_path / "bn.onnx"
    convert(prototxt, caffemodel, out)
    model = onnx.load(out)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops == {"Conv": 2, "Relu": 1, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1, "Softmax": 1}
    assert model.graph.output[0].name == "loss"  # SoftmaxWithLoss became the Softmax, Accuracy dropped
    x = RNG.normal(0, 1, (4, 3, 7, 7)).astype(np.float32)
    logits, probabilities = bn_net_forward(x, weights)
    got = run_ort(out, x)
    np.testing.assert_allclose(got, probabilities, rtol=1e-5, atol=1e-6)
    # the logits too: a saturated softmax hides errors in them
    (gemm,) = [n for n in model.graph.node if n.op_type == "Gemm"]
    model.graph.output.append(onnx.ValueInfoProto(name=gemm.output[0]))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got_logits = session.run([gemm.output[0]], {"data": x})[0]
    np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    engine = Engine(build_plan(out))
    np.testing.assert_allclose(engine.run(x), got, rtol=1e-5, atol=1e-6)


def test_batchnorm_not_in_place_after_conv_is_refused(tmp_path, capsys):
    weights = bn_net_weights()
    text = INPUT_LAYER + BN_NET_LAYERS.replace(
        'name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2"',
        'name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2_bn"').replace(
        'name: "scale2" type: "Scale" bottom: "conv2"', 'name: "scale2" type: "Scale" bottom: "conv2_bn"')
    prototxt, caffemodel = write_net(tmp_path, "bn", text, weights)
    out = tmp_path / "bn.onnx"
    line = one_line_failure(capsys, ["convert", str(prototxt), str(caffemodel), "-o", str(out)], out)
    assert str(prototxt) in line and "'bn2'" in line and "per-channel" in line


def test_scale_after_relu_is_refused(tmp_path):
    weights = bn_net_weights()
    text = INPUT_LAYER + BN_NET_LAYERS.replace(
        'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n', "").replace(
        'layer { name: "scale1"', 'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n'
                                  'layer { name: "scale1"')
    prototxt, caffemodel = write_net(tmp_path, "bn", text, weights)
    with pytest.raises(DyveError, match="'scale1' .*cannot be folded"):
        convert(prototxt, caffemodel, tmp_path / "bn.onnx")


@pytest.mark.parametrize("layer,blobs", [("bn1", 2), ("bn1", 4), ("scale1", 1), ("scale2", 2)])
def test_wrong_blob_count_is_one_line(tmp_path, capsys, layer, blobs):
    weights = bn_net_weights()
    have = weights[layer]
    weights[layer] = (have + [np.ones_like(have[0])] * 2)[:blobs]
    prototxt, caffemodel = write_net(tmp_path, "bn", INPUT_LAYER + BN_NET_LAYERS, weights)
    out = tmp_path / "bn.onnx"
    line = one_line_failure(capsys, ["convert", str(prototxt), str(caffemodel), "-o", str(out)], out)
    assert str(caffemodel) in line and f"'{layer}'" in line and f"has {blobs} blobs" in line


def test_wrong_channel_count_and_batch_statistics_are_refused(tmp_path):
    weights = bn_net_weights()
    weights["bn1"][0] = weights["bn1"][0][:3]
    prototxt, caffemodel = write_net(tmp_path, "bn", INPUT_LAYER + BN_NET_LAYERS, weights)
    with pytest.raises(DyveError, match="'bn1' blob 0: expected shape \\[4\\]"):
        convert(prototxt, caffemodel, tmp_path / "bn.onnx")
    text = INPUT_LAYER + BN_NET_LAYERS.replace("use_global_stats: true", "use_global_stats: false")
    prototxt, caffemodel = write_net(tmp_path, "stats", text, bn_net_weights())
    with pytest.raises(DyveError, match="'bn1' .*use_global_stats is false"):
        convert(prototxt, caffemodel, tmp_path / "stats.onnx")


def caffe_transform(rgb: np.ndarray, mean: np.ndarray, scale: float, crop: int | None) -> np.ndarray:
    """Caffe's DataTransformer on one image as its LMDB holds it (BGR, C x H x W): centre crop at
    test time, (x - mean) * scale."""
    bgr = rgb.transpose(2, 0, 1)[::-1].astype(np.float32)
    if crop:
        top, left = (bgr.shape[1] - crop) // 2, (bgr.shape[2] - crop) // 2
        bgr = bgr[:, top:top + crop, left:left + crop]
        if mean.shape[1] > 1:  # a mean image is cropped with the image
            mean = mean[:, top:top + crop, left:left + crop]
    return (bgr - mean) * np.float32(scale)


def test_data_mean_values_scale_and_crop_become_the_preprocessing(tmp_path):
    text = data_layer("scale: 0.00390625 crop_size: 7 mean_value: 104 mean_value: 117 mean_value: 123.5")
    prototxt, caffemodel = write_net(tmp_path, "data", text + BN_NET_LAYERS, bn_net_weights())
    out = tmp_path / "data.onnx"
    convert(prototxt, caffemodel, out)
    dims = [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [3, 7, 7]
    pre = preprocess_of(out)
    assert (pre.channel_order, pre.crop, pre.mean_values, pre.scale) == ("BGR", [7, 7], [104, 117, 123.5], 0.00390625)
    image = RNG.integers(0, 256, (9, 10, 3), dtype=np.uint8)
    expected = caffe_transform(image, np.array([104, 117, 123.5], np.float32)[:, None, None], 0.00390625, 7)
    np.testing.assert_allclose(pre.apply(image), expected, rtol=1e-6, atol=1e-6)


def test_data_mean_file_beside_the_prototxt_gives_the_size(tmp_path):
    mean = RNG.uniform(0, 255, (3, 7, 7)).astype(np.float32)
    write_mean_file(tmp_path / "mean.binaryproto", mean)
    text = data_layer('scale: 0.5 mean_file: "/home/someone/caffe/mean.binaryproto"')
    prototxt, caffemodel = write_net(tmp_path, "data", text + BN_NET_LAYERS, bn_net_weights())
    out = tmp_path / "data.onnx"
    convert(prototxt, caffemodel, out)
    pre = preprocess_of(out)
    assert pre.mean_shape == [3, 7, 7] and pre.mean_values is None and pre.crop is None
    image = RNG.integers(0, 256, (7, 7, 3), dtype=np.uint8)
    np.testing.assert_allclose(pre.apply(image), caffe_transform(image, mean, 0.5, None), rtol=1e-6, atol=1e-5)


def test_data_without_size_takes_it_from_the_options_which_override_its_fields(tmp_path, capsys):
    text = data_layer("scale: 0.25 mean_value: 1 mean_value: 2 mean_value: 3")
    prototxt, caffemodel = write_net(tmp_path, "data", text + BN_NET_LAYERS, bn_net_weights())
    out = tmp_path / "data.onnx"
    line = one_line_failure(capsys, ["convert", str(prototxt), str(caffemodel), "-o", str(out)], out)
    assert "'Data1'" in line and "--crop" in line
    assert main(["convert", str(prototxt), str(caffemodel), "-o", str(out),
                 "--crop", "7,7", "--channel-order", "RGB"]) == 0
    pre = preprocess_of(out)
    assert (pre.channel_order, pre.crop, pre.mean_values, pre.scale) == ("RGB", [7, 7], [1, 2, 3], 0.25)
    assert json.loads(pre.to_json())["mean_image"] is None


def test_data_with_both_means_is_refused(tmp_path):
    text = data_layer('crop_size: 7 mean_file: "m.binaryproto" mean_value: 1')
    prototxt, caffemodel = write_net(tmp_path, "data", text + BN_NET_LAYERS, bn_net_weights())
    with pytest.raises(DyveError, match="'Data1' .*both mean_file and mean_value"):
        convert(prototxt, caffemodel, tmp_path / "data.onnx")


def test_negative_variance_and_absurd_crop_are_refused(tmp_path):
    weights = bn_net_weights()
    weights["bn2"][1][2] = -1.0
    prototxt, caffemodel = write_net(tmp_path, "bn", INPUT_LAYER + BN_NET_LAYERS, weights)
    with pytest.raises(DyveError, match="'bn2' .*variance \\+ eps is not positive"):
        convert(prototxt, caffemodel, tmp_path / "bn.onnx")
    text = data_layer("crop_size: 100000 mean_value: 1")
    prototxt, caffemodel = write_net(tmp_path, "data", text + BN_NET_LAYERS, bn_net_weights())
    with pytest.raises(DyveError, match="'Data1' .*transform_param: crop holds 100000"):
        convert(prototxt, caffemodel, tmp_path / "data.onnx")
