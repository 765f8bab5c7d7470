"""Acceptance on real models (from the mirror) and on the paper's other architectures with random
weights: the dense engine matches onnxruntime image by image, top-1 matches the published
figures of docs/data.md, and never-firing knobs leave every output bit for bit unchanged."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from dyvedeep.calibrate import live_tensors
from dyvedeep.convert import convert, preset_preprocess
from dyvedeep.datasets import load_dataset
from dyvedeep.engine import Engine
from dyvedeep.evaluate import evaluate, verify
from dyvedeep.knobs import KnobConfig, applicable_knobs
from dyvedeep.plan import build_plan
from tests.conftest import mirror_path
from tests.factories.caffe import alexnet, overfeat_fast, vgg16

GH = "https://github.com"
QUICK = f"{GH}/Simshang/pycaffe/raw/c59f61709b0c981f63eec8681327994e73e8f411"
FULL = f"{GH}/yuvval/nn_ex1/raw/32f4934aca65c4772eb2a43cb119905e981adba3/examples/cifar10"
SQDC = f"{GH}/songhan/SqueezeNet-Deep-Compression/raw/fb13faa2cf121ced9999f8a9d538ec6c56084733"
SQ11 = f"{GH}/pixelzee3/copy-paste/raw/3fbd553686edc155777b352fdac77cc0065576ed"

# id: (source URL, weights URL, preset, needs the cifar mean, dataset, top-1 % on the whole set in data.md)
REAL_MODELS = {
    "cifar10_quick": (f"{QUICK}/cifar10_quick.prototxt", f"{QUICK}/cifar10_quick_iter_5000.caffemodel",
                      "cifar10-caffe", True, "cifar10", 76.8),
    "cifar10_full": (f"{FULL}/cifar10_full.prototxt", f"{FULL}/cifar10_full_iter_70000.caffemodel",
                     "cifar10-caffe", True, "cifar10", 82.6),
    "squeezenet_dc": (f"{SQDC}/SqueezeNet_deploy.prototxt", f"{SQDC}/compressed_SqueezeNet.net",
                      "imagenet-caffe", False, "imagenet-sample", 65.5),
    "squeezenet_v1.1": (f"{SQ11}/squeezenet1.1.xml", f"{SQ11}/squeezenet1.1.bin",
                        "imagenet-caffe", False, "imagenet-sample", 67.3),
}


@pytest.fixture(scope="session")
def real_models(mirror, tmp_path_factory) -> dict[str, Path]:
    """The four offline benchmarks converted to ONNX once per test session."""
    out_dir = tmp_path_factory.mktemp("real")
    paths = {}
    for name, (source, weights, preset, needs_mean, _, _) in REAL_MODELS.items():
        mean = mirror_path(mirror, f"{QUICK}/mean.binaryproto") if needs_mean else None
        preprocess, labels = preset_preprocess(preset, mean)
        paths[name] = out_dir / f"{name}.onnx"
        convert(mirror_path(mirror, source), mirror_path(mirror, weights), paths[name], preprocess, labels)
    return paths


def never_firing_knobs(plan) -> KnobConfig:
    """Every applicable knob of every layer on, with a threshold that can never fire."""
    config = KnobConfig()
    never = {"spet": math.inf, "sdss": 0.0, "sfma": 0.0}
    for layer in plan.layers:
        for knob in applicable_knobs(layer):
            config.set(layer.name, knob, never[knob])
    return config


@pytest.mark.mirror
@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_verify_on_the_full_test_split(real_models, mirror, name):
    plan = build_plan(real_models[name])
    data = REAL_MODELS[name][4]
    dataset = load_dataset(f"{data}:test", plan.preprocess, mirror=mirror)
    result = verify(plan, (x for x, _ in dataset.batches(50)), total=len(dataset))
    assert result.n == len(dataset) and result.n in (1000, 500)
    assert not result.failures, f"images past 1e-4 x max|onnxruntime|: {result.failures[:5]} (max rel {result.max_rel})"
    for image, margin in result.top1_disagreements:  # only near-ties may disagree
        assert margin <= 1e-4, (image, margin)


@pytest.mark.mirror
@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_top1_matches_the_published_figure(real_models, mirror, name):
    plan = build_plan(real_models[name])
    data, published = REAL_MODELS[name][4], REAL_MODELS[name][5]
    splits = ["test"] if data == "cifar10" else ["calib", "test"]  # the sample figure covers all 1000
    correct = n = 0
    for split in splits:
        result = evaluate(plan, load_dataset(f"{data}:{split}", plan.preprocess, mirror=mirror), None)
        correct += result["top1_dense"] * result["n"] / 100
        n += result["n"]
    assert n == 1000
    assert abs(100 * correct / n - published) <= 0.5, 100 * correct / n


@pytest.mark.mirror
@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_never_firing_knobs_are_bit_exact(real_models, mirror, name):
    plan = build_plan(real_models[name])
    data = REAL_MODELS[name][4]
    x = load_dataset(f"{data}:test", plan.preprocess, mirror=mirror, limit=4).images(0, 4)
    dense = Engine(plan).run(x)
    engine = Engine(plan, never_firing_knobs(plan))
    assert np.array_equal(engine.run(x), dense)
    assert engine.counter.total("fallbacks") > 0  # the knob paths really ran


def random_knobs(plan, rng: np.random.Generator) -> KnobConfig:
    """Each applicable knob of each layer on with probability 1/2, at a random threshold in a
    range where it fires on some neurons, cells or maps and not on others."""
    config = KnobConfig()
    scale = {"spet": 2.0, "sdss": 2.0, "sfma": 0.6}
    for layer in plan.layers:
        for knob in applicable_knobs(layer):
            if rng.random() < 0.5:
                config.set(layer.name, knob, float(rng.uniform(0.0, scale[knob])))
    return config


@pytest.mark.mirror
@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_resumed_run_equals_the_full_run(real_models, mirror, name):
    """Calibration scores a candidate by resuming from cached activations: for every knob layer,
    under random knob settings, that resumed run gives the full run's output bit for bit."""
    plan = build_plan(real_models[name])
    data = REAL_MODELS[name][4]
    other, image = load_dataset(f"{data}:test", plan.preprocess, mirror=mirror, limit=2).images(0, 2)
    rng = np.random.default_rng(sum(map(ord, name)))
    knob_layers = [i for i, layer in enumerate(plan.layers) if applicable_knobs(layer)]
    fired = 0
    for index in knob_layers:
        config = random_knobs(plan, rng)
        engine = Engine(plan, config)
        full = engine.run_image(image)[plan.output_name]
        cache = engine.run_image(image, stop=index)
        resuming = Engine(plan, config)
        resuming.run_image(other)  # its buffers hold another image's tensors, as in calibration
        resumed = resuming.run_image(None, start=index, tensors={t: cache[t] for t in live_tensors(plan, index)})
        assert np.array_equal(resumed[plan.output_name], full), plan.layers[index].name
        # the same through the compiled runs (calibration's trials), with the same op counts
        segmented = Engine(plan, config, segment_ends=(index - 1,) if index else ())
        segmented.run_image(other)
        tensors = {t: cache[t] for t in live_tensors(plan, index)}
        before = segmented.counter.total("ops"), resuming.counter.total("ops")
        assert np.array_equal(segmented.run_from(index, tensors)[plan.output_name], full), plan.layers[index].name
        assert np.array_equal(resuming.run_image(None, start=index, tensors=tensors)[plan.output_name], full)
        assert segmented.counter.total("ops") - before[0] == resuming.counter.total("ops") - before[1]
        fired += sum(engine.counter.total(k) for k in ("dropped_maps", "filled", "terminated"))
    assert fired > 0  # the knobs really skipped work


# ----------------------------------------------------------------------------- paper architectures


@pytest.fixture(scope="session")
def paper_models(tmp_path_factory) -> dict[str, Path]:
    """AlexNet, VGG-16 (V1 format) and OverFeat fast with random weights, converted once."""
    out_dir = tmp_path_factory.mktemp("paper")
    paths = {}
    for name, make in (("alexnet", alexnet), ("vgg16", vgg16), ("overfeat", overfeat_fast)):
        files = make(out_dir / name)
        paths[name] = out_dir / f"{name}.onnx"
        convert(files.prototxt, files.caffemodel, paths[name])
        files.caffemodel.unlink()  # 0.5 GB each: keep only the ONNX
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alexnet", "vgg16", "overfeat"])
def test_paper_architectures_verify_and_stay_exact(paper_models, name):
    plan = build_plan(paper_models[name])
    x = np.random.default_rng(5).normal(0, 30, (1, *plan.input_shape)).astype(np.float32)
    result = verify(plan, [x])
    assert result.ok, (result.max_rel, result.failures, result.top1_disagreements)
    dense = Engine(plan).run(x)
    assert np.array_equal(Engine(plan, never_firing_knobs(plan)).run(x), dense)
