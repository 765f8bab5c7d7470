"""Deep Compression .net -> ONNX: a tiny encoded net decodes exactly; truncated or over-long
files fail naming the file; the real SqueezeNet file decodes and classifies ImageNet images."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dyvedeep.convert import convert, preset_preprocess
from dyvedeep.convert.deep_compression import convert_deep_compression
from dyvedeep.errors import DyveError
from dyvedeep.metadata_keys import NONZERO_KEY, PREPROCESS_KEY
from dyvedeep.preprocess import Preprocess
from tests.conftest import mirror_path
from tests.factories.caffe import random_input, write_caffe_model
from tests.factories.deep_compression import encode_deep_compression
from tests.factories.mirror_data import imagenet_sample, load_resized_rgb
from tests.factories.prototxts import DEEP_COMPRESSION_TINY
from tests.factories.reference import caffe_forward

SQUEEZENET_DC = "https://github.com/songhan/SqueezeNet-Deep-Compression/raw/fb13faa2cf121ced9999f8a9d538ec6c56084733/"


@pytest.fixture
def tiny_dc(tmp_path):
    """The tiny net's prototxt, its .net file and the weights the file encodes."""
    files = write_caffe_model(tmp_path, "dc_tiny", DEEP_COMPRESSION_TINY)
    net_file = tmp_path / "dc_tiny.net"
    decoded = encode_deep_compression(net_file, files.net, files.weights, density=0.1)
    return files.prototxt, net_file, decoded, files.net


def test_tiny_net_file_decodes_exactly(tiny_dc):
    prototxt, net_file, decoded, net = tiny_dc
    header = np.frombuffer(net_file.read_bytes()[:16], "<u4")
    nonzero = {name: int(np.count_nonzero(w)) for name, (w, _) in decoded.items()}
    assert list(decoded) == ["conv1", "fire/conv3x3", "fc6", "ip7"], "relu_conv1 is not a weight layer"
    assert (header > np.asarray(list(nonzero.values()))).any(), "the file exercises zero gap fillers"
    converted = convert_deep_compression(prototxt, net_file)
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in converted.model.graph.initializer}
    for name, (weight, bias) in decoded.items():
        np.testing.assert_array_equal(arrays[f"{name}_W"], weight)
        np.testing.assert_array_equal(arrays[f"{name}_b"], bias)
    assert json.loads(converted.metadata[NONZERO_KEY]) == nonzero
    x = random_input(net, batch=2)
    (y,) = ort.InferenceSession(converted.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"data": x})
    np.testing.assert_allclose(y, caffe_forward(net, decoded, x)["prob"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("change", ["truncated", "extra byte", "header only"])
def test_file_of_wrong_length_fails_naming_it(tiny_dc, tmp_path, change):
    prototxt, net_file, _, _ = tiny_dc
    data = net_file.read_bytes()
    net_file.write_bytes({"truncated": data[:-3], "extra byte": data + b"\0", "header only": data[:16]}[change])
    out = tmp_path / "out.onnx"
    with pytest.raises(DyveError) as err:
        convert(prototxt, net_file, out)
    assert str(net_file) in str(err.value)
    assert not out.exists()


def test_prototxt_not_matching_the_file_fails(tiny_dc, tmp_path):
    prototxt, net_file, _, _ = tiny_dc
    smaller = tmp_path / "smaller.prototxt"
    smaller.write_text(DEEP_COMPRESSION_TINY.replace("num_output: 20", "num_output: 2").replace("num_output: 10", "num_output: 1"))
    with pytest.raises(DyveError, match="dc_tiny.net"):
        convert_deep_compression(smaller, net_file)


@pytest.mark.mirror
def test_real_squeezenet_dc(mirror, tmp_path):
    prototxt = mirror_path(mirror, SQUEEZENET_DC + "SqueezeNet_deploy.prototxt")
    net_file = mirror_path(mirror, SQUEEZENET_DC + "compressed_SqueezeNet.net")
    out = tmp_path / "squeezenet_dc.onnx"
    convert(prototxt, net_file, out, preprocess=preset_preprocess("imagenet-caffe")[0])
    model = onnx.load(out)
    meta = {p.key: p.value for p in model.metadata_props}
    nonzero = json.loads(meta[NONZERO_KEY])
    weights = {i.name[:-2]: int(np.prod(i.dims)) for i in model.graph.initializer if i.name.endswith("_W")}
    assert len(nonzero) == 26 and nonzero.keys() == weights.keys()
    assert sum(weights.values()) == 1_244_448
    density = sum(nonzero.values()) / sum(weights.values())
    assert 0.30 < density < 0.36, density  # SqueezeNet + Deep Compression keeps about a third
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim[1:]] == [1000, 1, 1]
    files, labels = imagenet_sample(mirror, every=8)
    preprocess = Preprocess.from_json(meta[PREPROCESS_KEY])
    x = np.stack([preprocess.apply(load_resized_rgb(f, tuple(preprocess.resize))) for f in files])
    (scores,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"data": x})
    top1 = float((scores.reshape(len(files), -1).argmax(axis=1) == labels).mean())
    assert top1 > 0.55, f"top-1 {top1:.3f} on {len(files)} sample images (about 0.655 expected)"
