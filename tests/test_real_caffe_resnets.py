"""The CIFAR-10 ResNets trained in Caffe (resnet20_caffe, resnet56_caffe; test nets with a Data
layer, BatchNorm + Scale after every convolution): converted from the mirror, the dense engine
against onnxruntime on the test images, top-1 against the figure their README reports, and the
channel order (not stated by the source) as the accuracy shows it."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from dyvedeep.convert import convert, preset_preprocess
from dyvedeep.datasets import load_dataset
from dyvedeep.evaluate import evaluate, verify
from dyvedeep.plan import build_plan
from tests.conftest import mirror_path

SOURCE = ("https://github.com/LiJianfei06/caffe-project-VggNet-ResNet-DenseNet/raw/"
          "d9ffe40177454004d615f40c7a7493b94e2fdb9c/")
# name -> (prototxt, caffemodel, top-1 README.txt reports on the full 10000-image test set)
CAFFE_RESNETS = {
    "resnet20_caffe": ("ljftest_cifar10_ResNet-20/test_ResNet_20.prototxt",
                       "ljftest_cifar10_ResNet-20/model_save/cifar10_ResNet_20_iter_53500.caffemodel", 92.23),
    "resnet56_caffe": ("ljftest_cifar10_ResNet-56/test_ResNet_56.prototxt",
                       "ljftest_cifar10_ResNet-56/model_save/cifar10_ResNet_56_iter_55000.caffemodel", 93.53),
}


def converted(mirror: Path, tmp: Path, name: str, channel_order: str) -> Path:
    """The net converted with its Data layer's transform; the prototxt leaves the size (32 x 32,
    CIFAR-10's) and the channel order open."""
    prototxt, caffemodel, _ = CAFFE_RESNETS[name]
    out = tmp / f"{name}_{channel_order}.onnx"
    preprocess, _ = preset_preprocess("cifar10-caffe-data")
    preprocess.channel_order = channel_order
    convert(mirror_path(mirror, SOURCE + prototxt), mirror_path(mirror, SOURCE + caffemodel), out, preprocess)
    return out


@pytest.fixture(scope="module")
def caffe_resnets(mirror, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("caffe_resnets")
    return {name: converted(mirror, tmp, name, "RGB") for name in CAFFE_RESNETS}


@pytest.mark.mirror
@pytest.mark.parametrize("name", list(CAFFE_RESNETS))
def test_converted_with_folded_batchnorm_and_the_data_transform(caffe_resnets, name):
    model = onnx.load(caffe_resnets[name])
    ops = {n.op_type for n in model.graph.node}
    assert ops == {"Conv", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm", "Softmax"}
    assert model.graph.node[-1].op_type == "Softmax"
    plan = build_plan(caffe_resnets[name])
    pre = plan.preprocess
    assert (pre.channel_order, pre.scale, pre.crop) == ("RGB", 0.00390625, [32, 32])
    assert pre.mean_values == pytest.approx([125.3, 122.9, 113.8])


@pytest.mark.mirror
@pytest.mark.parametrize("name", list(CAFFE_RESNETS))
def test_verify_and_top1_on_the_test_images(caffe_resnets, mirror, name):
    plan = build_plan(caffe_resnets[name])
    dataset = load_dataset("cifar10:test", plan.preprocess, mirror=mirror)
    result = verify(plan, (x for x, _ in dataset.batches(50)), total=len(dataset))
    assert result.n == 1000 and not result.failures, result.failures[:5]
    assert all(margin <= 1e-4 for _, margin in result.top1_disagreements)
    top1 = evaluate(plan, dataset, None)["top1_dense"]
    # 1000 of the 10000 test images: the README figure is on all of them
    assert abs(top1 - CAFFE_RESNETS[name][2]) <= 1.0, top1


@pytest.mark.mirror
def test_channel_order_is_rgb(caffe_resnets, mirror, tmp_path):
    """The LMDB's channel order is not stated: RGB (as the mean values' order suggests) is far
    more accurate than Caffe's usual BGR."""
    name = "resnet20_caffe"
    top1 = {}
    for order, path in (("RGB", caffe_resnets[name]), ("BGR", converted(mirror, tmp_path, name, "BGR"))):
        plan = build_plan(path)
        top1[order] = evaluate(plan, load_dataset("cifar10:test", plan.preprocess, mirror=mirror), None)["top1_dense"]
    assert top1["RGB"] > top1["BGR"] + 3.0, top1
