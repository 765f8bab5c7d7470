"""Decision gates (docs/gates.md): a gate that always exits gives its own prediction and the ops of
the layers before it plus its own; one that never exits leaves the engine's output bit for bit;
the sidecar's checksum; the knob file round trip; training on real cifar10_quick; composition
with SPET."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from dyvedeep.datasets import load_dataset
from dyvedeep.engine import Engine
from dyvedeep.engine.core import CompiledRun
from dyvedeep.engine.counting import COUNTER_FIELDS
from dyvedeep.errors import DyveError
from dyvedeep.gate_calibrate import ThresholdSearch, Traces, default_gate_layers, fit_gates
from dyvedeep.gates import GatedEngine, gate_costs, load_gates, save_gate_weights, sidecar_path
from dyvedeep.knobs import GateSetting, GateSettings, KnobConfig, load_knobs
from dyvedeep.plan import Op, build_plan
from tests.test_cli import run, small_data, small_model  # noqa: F401  (fixtures)

RNG = np.random.default_rng(17)


def gated_config(tmp_path, plan, gates: dict[str, tuple[float, str]], seed: int = 3) -> KnobConfig:
    """A knob file's config with random-weight gates (layer -> (threshold, confidence)), its sidecar written."""
    rng = np.random.default_rng(seed)
    classes = int(np.prod(plan.output_shape))
    weights = {l: (rng.normal(0, 1, (classes, plan.layer(l).out_shape[0])), rng.normal(0, .1, classes)) for l in gates}
    knob_file = tmp_path / "k.yaml"
    digest = save_gate_weights(sidecar_path(knob_file), weights)
    return KnobConfig(gates=GateSettings(sidecar_path(knob_file).name, digest,
                                         [GateSetting(l, t, c) for l, (t, c) in gates.items()], knob_file))


def test_a_gate_that_always_exits_gives_its_prediction_and_the_ops_before_it(tmp_path, small_model):  # noqa: F811
    plan = build_plan(small_model)
    config = gated_config(tmp_path, plan, {"conv1": (0.0, "softmax")})
    x = RNG.normal(0, 1, (5, 3, 12, 12)).astype(np.float32)
    engine = GatedEngine(plan, config)
    out = engine.run(x)
    gate = load_gates(config, plan)[0]
    dense = Engine(plan)
    for n in range(len(x)):
        fmap = dense.run_image(x[n], stop=1)[plan.layers[0].output]  # conv1 (ReLU folded): 8 x 12 x 12
        logits = gate.weight @ fmap.reshape(8, -1).mean(axis=1, dtype=np.float64) + gate.bias
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(out[n], expected, rtol=1e-6)
        assert out[n].argmax() == expected.argmax()
    # hand-worked, per image: conv1 8 x 12 x 12 outputs of 27 MACs: 2 per MAC + bias + ReLU;
    # the gate: GAP 8 x 144 adds/divide, fc 3 x 8 MACs (2 each) + 3 bias, softmax (3 - 1) + 4 x 3,
    # the largest probability 2 compares, the threshold 1 compare
    conv1 = 2 * 1152 * 27 + 1152 + 1152
    gate_ops = 1152 + (2 * 24 + 3) + (2 + 12) + 2 + 1
    assert plan.layers[0].dense_ops == conv1
    assert gate_costs(8, 12, 12, 3, "softmax")["ops"] == gate_ops
    assert engine.counter.total("ops") == len(x) * (conv1 + gate_ops)
    assert engine.counter.total("gate_ops") == len(x) * gate_ops
    assert engine.counter.get("conv1", "exits") == len(x)
    assert engine.counter.get("conv2", "images") == 0  # nothing after the gate ran
    # margin: the second largest probability (3 - 2 compares) and a subtraction on top
    assert gate_costs(8, 12, 12, 3, "margin")["ops"] == gate_ops + 1 + 1


@pytest.mark.mirror
def test_gates_that_never_exit_are_bit_exact_and_add_only_their_ops(cifar10_quick_onnx, mirror, tmp_path):
    plan = build_plan(cifar10_quick_onnx)
    x = load_dataset("cifar10:test", plan.preprocess, mirror=mirror, limit=6).images(0, 6)
    assert default_gate_layers(plan) == ["pool1", "pool2", "pool3"]
    config = gated_config(tmp_path, plan, {"pool1": (1.5, "softmax"), "pool3": (math.inf, "margin")})
    dense, gated = Engine(plan), GatedEngine(plan, config)
    assert np.array_equal(gated.run(x), dense.run(x))
    per_image = gate_costs(32, 16, 16, 10, "softmax")["ops"] + gate_costs(64, 4, 4, 10, "margin")["ops"]
    assert gated.counter.total("ops") == dense.counter.total("ops") + len(x) * per_image
    assert gated.counter.total("exits") == 0
    assert np.array_equal(GatedEngine(plan, config, threads=2).run(x), Engine(plan, threads=2).run(x))


@pytest.mark.mirror
@pytest.mark.parametrize("threads", [1, 2])
def test_never_exiting_gates_run_the_compiled_path_bit_for_bit(cifar10_quick_onnx, mirror, tmp_path, threads):
    """The gated engine's segments run as compiled runs split at the gates (Engine.run_range):
    the outputs and every layer's counts are the plain engine's, compiled or layer by layer."""
    plan = build_plan(cifar10_quick_onnx)
    x = load_dataset("cifar10:test", plan.preprocess, mirror=mirror, limit=5).images(0, 5)
    config = gated_config(tmp_path, plan, {"pool1": (1.5, "softmax"), "pool2": (1.5, "margin"),
                                           "pool3": (math.inf, "softmax")})
    gated = GatedEngine(plan, config, threads=threads)
    ends = [plan.layers.index(plan.layer(name)) for name in ("pool1", "pool2", "pool3")]
    runs = [part for part in gated.engine.compiled_runs if isinstance(part, CompiledRun)]
    assert {run.layers[-1] for run in runs} >= set(ends)  # a compiled run ends at each gate
    assert all(plan.layers[i].op != Op.CONV for i in gated.engine.compiled_runs if isinstance(i, int))
    compiled, layerwise = Engine(plan, threads=threads), Engine(plan, threads=threads, compiled=False)
    out = gated.run(x)
    assert np.array_equal(out, compiled.run(x)) and np.array_equal(out, layerwise.run(x))
    own = [COUNTER_FIELDS.index(f) for f in ("gate_ops", "exits")]
    rest = [j for j in range(len(COUNTER_FIELDS)) if j not in own]
    gate_ops, gate_macs = np.zeros(len(plan.layers), np.int64), np.zeros(len(plan.layers), np.int64)
    for i, (c, h, w), conf in zip(ends, [(32, 16, 16), (32, 8, 8), (64, 4, 4)], ["softmax", "margin", "softmax"]):
        costs = gate_costs(c, h, w, 10, conf)
        gate_ops[i], gate_macs[i] = len(x) * costs["ops"], len(x) * costs["macs"]
    expected = compiled.counter.table.copy()
    expected[:, COUNTER_FIELDS.index("ops")] += gate_ops
    expected[:, COUNTER_FIELDS.index("macs")] += gate_macs
    expected[:, COUNTER_FIELDS.index("executed_macs")] += gate_macs  # a gate's kernel runs its MACs exactly
    expected[:, COUNTER_FIELDS.index("nonzero_macs")] += gate_macs  # and has no zero weights
    assert np.array_equal(gated.counter.table[:, rest], expected[:, rest])
    assert np.array_equal(gated.counter.table[:, COUNTER_FIELDS.index("gate_ops")], gate_ops)
    assert gated.counter.total("exits") == 0
    assert np.array_equal(compiled.counter.table, layerwise.counter.table)
    with pytest.raises(DyveError, match="run_range"):
        gated.engine.run_range(x[0], 0, 1)  # a range ending after conv1, where no gate is


@pytest.mark.mirror
def test_gates_compose_with_spet(cifar10_quick_onnx, mirror, tmp_path):
    """Gates decide first; SPET acts in the layers that run, as without gates."""
    plan = build_plan(cifar10_quick_onnx)
    x = load_dataset("cifar10:test", plan.preprocess, mirror=mirror, limit=4).images(0, 4)
    config = gated_config(tmp_path, plan, {"pool2": (2.0, "softmax")})
    for layer in ("conv1", "conv3"):
        config.set(layer, "spet", 0.0)
    plain = KnobConfig({l: dict(k) for l, k in config.layers.items()})
    knobbed, gated = Engine(plan, plain), GatedEngine(plan, config)
    assert np.array_equal(gated.run(x), knobbed.run(x))
    assert gated.counter.total("terminated") == knobbed.counter.total("terminated") > 0
    assert gated.counter.total("ops") == knobbed.counter.total("ops") + len(x) * gate_costs(32, 8, 8, 10, "softmax")["ops"]
    # always exiting after pool2: conv3's SPET never runs; the ops are those of the layers to pool2
    config.gates.after[0].threshold = 0.0
    gated = GatedEngine(plan, config)
    gated.run(x)
    before = Engine(plan, plain)
    for image in x:
        before.run_image(image, stop=plan.layers.index(plan.layer("pool2")) + 1)
    assert gated.counter.get("conv3", "images") == 0
    assert gated.counter.total("ops") == before.counter.total("ops") + len(x) * gate_costs(32, 8, 8, 10, "softmax")["ops"]


def test_a_changed_sidecar_is_one_line(tmp_path, capsys, small_model):  # noqa: F811
    plan = build_plan(small_model)
    config = gated_config(tmp_path, plan, {"conv2": (0.9, "softmax")})
    config.save(tmp_path / "k.yaml")
    save_gate_weights(sidecar_path(tmp_path / "k.yaml"), {"conv2": (np.ones((3, 8)), np.zeros(3))})
    with pytest.raises(DyveError) as err:
        GatedEngine(plan, load_knobs(tmp_path / "k.yaml", plan))
    assert "sha256" in str(err.value) and str(sidecar_path(tmp_path / "k.yaml")) in str(err.value)
    data = tmp_path / "d.npz"
    np.savez(data, x=RNG.normal(0, 1, (4, 3, 12, 12)).astype(np.float32), y=np.zeros(4, np.int64),
             ids=np.array([f"i{i}" for i in range(4)]), name=np.array("small"), split=np.array("test"))
    code, out, err_text = run(capsys, "eval", small_model, "--data", f"npz:{data}", "--knobs", tmp_path / "k.yaml")
    assert code == 2 and len(err_text.strip().splitlines()) == 1 and "sha256" in err_text


def test_bench_times_a_gated_knob_file(tmp_path, capsys, small_model, small_data):  # noqa: F811
    plan = build_plan(small_model)
    gated_config(tmp_path, plan, {"conv1": (0.5, "softmax")}).save(tmp_path / "k.yaml")
    code, _, err = run(capsys, "bench", small_model, "--data", f"npz:{small_data['test']}", "--knobs", tmp_path / "k.yaml",
                       "--images", 3, "--warmup", 1, "--rounds", 1, "--no-onnxruntime", "--no-caffe",
                       "--json", tmp_path / "b.json")
    assert code == 0, err
    assert json.loads((tmp_path / "b.json").read_text())["latency_dyvedeep_ms"] > 0


@pytest.mark.mirror
@pytest.mark.parametrize("risk", ["changed-ucb", "criterion"])
def test_gates_cli_takes_either_risk(cifar10_quick_onnx, mirror, tmp_path, capsys, risk):
    """``--risk changed-ucb`` (default) and ``criterion`` (the rule before): at a budget of 0 the
    gates kept change none of the selection images' top-1."""
    code, out, err = run(capsys, "gates", cifar10_quick_onnx, "--data", "cifar10:calib", "--limit", 300, "--mirror",
                         mirror, "--risk", risk, "--budget", 0, "-o", tmp_path / "k.yaml")
    assert code == 0, err
    assert "risk 0.00 pt" in out
    plan = build_plan(cifar10_quick_onnx)
    x = load_dataset("cifar10:calib", plan.preprocess, mirror=mirror, limit=300).images(150, 300)  # the selection half
    config = load_knobs(tmp_path / "k.yaml", plan)
    gated = GatedEngine(plan, config) if config.gates is not None else Engine(plan)
    assert np.array_equal(gated.run(x).argmax(axis=1), Engine(plan).run(x).argmax(axis=1))
    if risk == "changed-ucb":  # calibrate's criterion options act only with --risk criterion: not ignored silently
        code, _, err = run(capsys, "gates", cifar10_quick_onnx, "--data", "cifar10:calib", "--limit", 300, "--mirror",
                           mirror, "--changed-weight", 1, "-o", tmp_path / "k2.yaml")
        assert code == 2 and "--risk criterion" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "k2.yaml").exists()


def test_knob_file_round_trip_and_refusals(tmp_path, small_model):  # noqa: F811
    plan = build_plan(small_model)
    config = gated_config(tmp_path, plan, {"conv1": (0.75, "margin"), "conv2": (math.inf, "softmax")})
    config.set("conv2", "spet", 0.25)
    config.save(tmp_path / "k.yaml")
    loaded = load_knobs(tmp_path / "k.yaml", plan)
    assert loaded.to_dict() == config.to_dict()
    assert [(g.layer, g.threshold) for g in load_gates(loaded, plan)] == [("conv1", 0.75), ("conv2", math.inf)]
    with pytest.raises(DyveError, match="GatedEngine"):
        Engine(plan, loaded)
    good = yaml.safe_load((tmp_path / "k.yaml").read_text())
    for mutate, words in [(lambda g: g["after"][0].update(layer="nope"), "unknown layer"),
                          (lambda g: g["after"][0].update(layer="fc"), "feature map"),
                          (lambda g: g["after"][0].update(confidence="entropy"), "confidence"),
                          (lambda g: g["after"][0].update(threshold=-1), "threshold"),
                          (lambda g: g.update(weights="../x.npz"), "file name"),
                          (lambda g: g.update(sha256="abc"), "sha256"),
                          (lambda g: g.pop("after"), "missing after")]:
        data = json.loads(json.dumps(good))
        mutate(data["gates"])
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
        with pytest.raises(DyveError, match=words) as err:
            load_knobs(tmp_path / "bad.yaml", plan)
        assert "\n" not in str(err.value) and "bad.yaml" in str(err.value)


@pytest.mark.mirror
def test_gates_trained_on_cifar10_quick_do_what_the_search_predicted(cifar10_quick_onnx, mirror, tmp_path, capsys):
    plan = build_plan(cifar10_quick_onnx)
    data = load_dataset("cifar10:calib", plan.preprocess, mirror=mirror, limit=400)
    images, labels = data.images(0, len(data)), np.asarray(data.labels)
    fitted = fit_gates(plan, images, labels, default_gate_layers(plan), KnobConfig(), budget=2.0)
    assert fitted.kept(), "no gate was kept at a 2 pt budget"
    assert fitted.choice.risk <= 2.0 and fitted.choice.ops < fitted.ops_without_gates
    config = fitted.config(KnobConfig(), tmp_path / "k.yaml")
    config.save(tmp_path / "k.yaml")
    engine = GatedEngine(plan, load_knobs(tmp_path / "k.yaml", plan))
    out = engine.run(images[fitted.selection])
    n = len(out)
    assert engine.counter.total("ops") / n == pytest.approx(fitted.choice.ops, rel=1e-12)
    assert (out.argmax(axis=1) == labels[fitted.selection]).mean() * 100 == pytest.approx(fitted.choice.top1)
    # the CLI on the test images: per-gate exit rates in the JSON
    code, _, err = run(capsys, "eval", cifar10_quick_onnx, "--data", "cifar10:test", "--limit", "50",
                       "--knobs", tmp_path / "k.yaml", "--json", tmp_path / "e.json", "--mirror", mirror)
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert [g["layer"] for g in result["gates"]] == [g.layer for g in fitted.kept()]
    assert result["gate_ops"] > 0 and all(0 <= g["exit_rate"] <= 100 for g in result["gates"])


def test_the_default_risk_is_the_changed_share_plus_two_standard_errors_labels_unused():
    """--risk changed-ucb: the share of selection images whose top-1 differs from the dense
    network's plus z binomial standard errors; the labels change nothing."""
    rng = np.random.default_rng(4)
    n, classes = 400, 10
    dense_pred = rng.integers(0, classes, n)
    conf = rng.random((n, 1))
    # the gate agrees with the network on its confident images, less often below
    gate_pred = np.where(rng.random(n) < conf[:, 0], dense_pred, (dense_pred + 1) % classes)[:, None]
    traces = Traces([np.zeros((n, 4))], np.full((n, 1), 100.0), np.full(n, 1000.0), dense_pred)
    labels = rng.integers(0, classes, n)

    def search(labels, z=2.0):
        return ThresholdSearch(conf, gate_pred, traces, [10], dense_pred, labels, "disagree", z, 0.5)

    threshold = float(np.quantile(conf, 0.6))
    exits = conf[:, 0] >= threshold
    p = float((exits & (gate_pred[:, 0] != dense_pred)).mean())
    ops, risk, _ = search(labels).outcome([threshold])
    assert risk == pytest.approx(100 * (p + 2 * math.sqrt(p * (1 - p) / n)))
    assert ops == pytest.approx(((1000 + 10) * (~exits).sum() + (100 + 10) * exits.sum()) / n)
    assert search(labels, z=1.0).outcome([threshold])[1] < risk
    choice = search(labels).run(budget=2.0)
    assert choice.risk <= 2.0 and np.isfinite(choice.thresholds[0])
    assert search(rng.permutation(labels)).run(budget=2.0).thresholds == choice.thresholds
    # the rule before: calibrate's disagree criterion, half the changed share
    before = ThresholdSearch(conf, gate_pred, traces, [10], dense_pred, labels, "disagree", 1.0, 0.5, risk="criterion")
    assert before.outcome([threshold])[1] == pytest.approx(100 * 0.5 * p)


def test_default_placement_after_each_resnet_stage_but_the_last(tmp_path):
    """Two stages of residual blocks (8 x 8, then 4 x 4): a gate after the first stage's last
    block only. A plain net with a WITHIN_CHANNEL-LRN-like subgraph (a stride-1 average pooling,
    a quotient of two tensors) after its pooling: a gate after the pooling only."""
    from onnx import helper

    from tests.onnx_builders import save_model

    def block(x, name, stride=1):
        down = [helper.make_node("Conv", [x, f"{name}_Wd", f"{name}_bd"], [f"{name}_d"], name=f"{name}_down",
                                 strides=[stride, stride])] if stride > 1 else []
        return down + [
            helper.make_node("Conv", [x, f"{name}_W", f"{name}_b"], [f"{name}_c"], name=f"{name}_conv",
                             pads=[1, 1, 1, 1], strides=[stride, stride]),
            helper.make_node("Add", [f"{name}_d" if stride > 1 else x, f"{name}_c"], [f"{name}_a"], name=f"{name}_add"),
            helper.make_node("Relu", [f"{name}_a"], [f"{name}_r"], name=f"{name}_relu")]

    def head(x, channels):
        return [helper.make_node("GlobalAveragePool", [x], ["g"], name="gap"),
                helper.make_node("Flatten", ["g"], ["f"], name="flat", axis=1),
                helper.make_node("Gemm", ["f", "Wf", "bf"], ["fc"], name="fc", transB=1),
                helper.make_node("Softmax", ["fc"], ["prob"], name="prob", axis=1)]

    rng = np.random.default_rng(5)
    inits = {"Wf": rng.normal(0, .3, (3, 8)), "bf": np.zeros(3)}
    for name, cin, cout, stride in (("b1", 4, 4, 1), ("b2", 4, 4, 1), ("b3", 4, 8, 2)):
        inits[f"{name}_W"], inits[f"{name}_b"] = rng.normal(0, .3, (cout, cin, 3, 3)), np.zeros(cout)
        if stride > 1:
            inits[f"{name}_Wd"], inits[f"{name}_bd"] = rng.normal(0, .3, (cout, cin, 1, 1)), np.zeros(cout)
    nodes = [*block("data", "b1"), *block("b1_r", "b2"), *block("b2_r", "b3", 2), *head("b3_r", 8)]
    plan = build_plan(save_model(tmp_path / "res.onnx", nodes, inits, (4, 8, 8), "prob"))
    assert default_gate_layers(plan) == ["b2_relu"]

    inits = {"Wf": inits["Wf"], "bf": inits["bf"], "W1": rng.normal(0, .3, (8, 4, 3, 3)), "b1": np.zeros(8),
             "W2": rng.normal(0, .3, (8, 8, 3, 3)), "b2": np.zeros(8), "one": np.ones(1)}
    nodes = [helper.make_node("Conv", ["data", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Mul", ["p1", "p1"], ["sq"], name="square"),
             helper.make_node("AveragePool", ["sq"], ["avg"], name="window", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["avg", "one"], ["shift"], name="shift"),
             helper.make_node("Div", ["p1", "shift"], ["norm"], name="norm"),
             helper.make_node("Conv", ["norm", "W2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             *head("c2", 8)]
    plan = build_plan(save_model(tmp_path / "plain.onnx", nodes, inits, (4, 8, 8), "prob"))
    assert default_gate_layers(plan) == ["pool1"]
