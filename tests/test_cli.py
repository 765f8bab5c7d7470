"""The verify / eval / bench / calibrate commands end to end on small models and data made here:
their outputs, and one clear line with a non-zero exit on bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from onnx import helper

from dyvedeep.cli import main
from tests.onnx_builders import save_model

RNG = np.random.default_rng(11)


@pytest.fixture()
def small_model(tmp_path):
    """conv(ReLU) -> conv(ReLU) -> global average -> fc -> softmax over 3 classes, on 3 x 12 x 12."""
    nodes = [
        helper.make_node("Conv", ["data", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", "W3", "b3"], ["fc"], name="fc", transB=1),
        helper.make_node("Softmax", ["fc"], ["prob"], name="prob", axis=1),
    ]
    inits = {"W1": RNG.normal(0, .4, (8, 3, 3, 3)), "b1": RNG.normal(0, .1, 8),
             "W2": RNG.normal(0, .2, (8, 8, 3, 3)), "b2": RNG.normal(0, .1, 8),
             "W3": RNG.normal(0, .5, (3, 8)), "b3": np.zeros(3)}
    return save_model(tmp_path / "small.onnx", nodes, inits, (3, 12, 12), "prob")


@pytest.fixture()
def small_data(tmp_path, small_model):
    """npz calibration and test files labelled by the dense model itself (so top-1 is 100 %)."""
    from dyvedeep.engine import Engine
    from dyvedeep.plan import build_plan

    engine = Engine(build_plan(small_model))
    paths = {}
    for split, n in (("calib", 40), ("test", 30)):
        x = RNG.normal(0, 1, (n, 3, 12, 12)).astype(np.float32)
        y = engine.run(x).argmax(axis=1).astype(np.int64)
        paths[split] = tmp_path / f"{split}.npz"
        np.savez(paths[split], x=x, y=y, ids=np.array([f"{split}{i}" for i in range(n)]),
                 name=np.array("small"), split=np.array(split))
    return paths


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_json_has_the_contract_fields(tmp_path, capsys, small_model, small_data):
    knobs = tmp_path / "k.yaml"
    knobs.write_text(yaml.safe_dump({"layers": {"conv2": {"sdss": {"threshold": 0.05}, "spet": {"threshold": 0.0}}}}))
    out_json = tmp_path / "eval.json"
    code, out, _ = run(capsys, "eval", small_model, "--data", f"npz:{small_data['test']}", "--knobs", knobs,
                       "--json", out_json)
    assert code == 0, out
    result = json.loads(out_json.read_text())
    for key in ("n", "top1_dense", "top5_dense", "top1_dyvedeep", "top1_loss_pt", "loss_ci_low", "loss_ci_high",
                "ops_dense", "ops_dyvedeep", "macs_dense", "macs_dyvedeep", "ops_reduction", "layers", "platform"):
        assert key in result
    assert result["n"] == 30 and result["top1_dense"] == 100.0
    assert result["ops_dyvedeep"] < result["ops_dense"]
    assert result["loss_ci_low"] <= result["top1_loss_pt"] <= result["loss_ci_high"]
    knobs_seen = {(row["layer"], row["knob"]) for row in result["layers"]}
    assert ("conv2", "sdss") in knobs_seen and ("conv2", "spet") in knobs_seen and ("conv1", "all") in knobs_seen


def test_verify_passes_on_a_small_model(capsys, small_model, small_data):
    code, out, _ = run(capsys, "verify", small_model, "--data", f"npz:{small_data['test']}")
    assert code == 0 and "OK" in out and "top-1 agreement: 30/30" in out


def test_calibrate_stays_within_budget_and_writes_a_loadable_file(tmp_path, capsys, small_model, small_data):
    knobs, trace = tmp_path / "knobs.yaml", tmp_path / "trace.csv"
    code, out, err = run(capsys, "calibrate", small_model, "--data", f"npz:{small_data['calib']}",
                         "--budget", "5", "--margin", "0", "-o", knobs, "--trace", trace)
    assert code == 0, err
    assert "calibrate:" in err  # progress is shown
    lines = trace.read_text().splitlines()
    assert lines[0].startswith("step,pass,layer,knob,threshold")
    rows = [line.split(",") for line in lines[1:]]
    accepted_losses = [float(r[7]) for r in rows[1:] if r[-1] == "1"]
    assert all(loss <= 5 + 1e-9 for loss in accepted_losses)
    code, out, _ = run(capsys, "eval", small_model, "--data", f"npz:{small_data['calib']}", "--knobs", knobs)
    assert code == 0


def test_calibrate_refuses_the_test_split(tmp_path, capsys, small_model):
    code, _, err = run(capsys, "calibrate", small_model, "--data", "cifar10:test", "-o", tmp_path / "k.yaml")
    assert code != 0 and "test split" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "k.yaml").exists()


def test_bad_knob_file_through_the_cli(tmp_path, capsys, small_model, small_data):
    knobs = tmp_path / "bad.yaml"
    knobs.write_text("layers: {conv9: {spet: {threshold: 1}}}\n")
    out_json = tmp_path / "eval.json"
    code, _, err = run(capsys, "eval", small_model, "--data", f"npz:{small_data['test']}", "--knobs", knobs,
                       "--json", out_json)
    assert code != 0 and "bad.yaml" in err and "conv9" in err and len(err.strip().splitlines()) == 1
    assert not out_json.exists()


def test_unsupported_op_through_the_cli(tmp_path, capsys):
    path = save_model(tmp_path / "tanh.onnx", [helper.make_node("Tanh", ["data"], ["o"], name="t")], {}, (3, 4, 4), "o")
    code, _, err = run(capsys, "eval", path, "--data", "cifar10:test")
    assert code != 0 and "tanh.onnx" in err and "Tanh" in err and len(err.strip().splitlines()) == 1


def test_bench_reports_three_engines_in_one_run(tmp_path, capsys, small_model, small_data):
    knobs = tmp_path / "k.yaml"
    knobs.write_text(yaml.safe_dump({"layers": {"conv2": {"spet": {"threshold": 0.0}}}}))
    out_json = tmp_path / "bench.json"
    code, out, _ = run(capsys, "bench", small_model, "--data", f"npz:{small_data['test']}", "--knobs", knobs,
                       "--images", 5, "--warmup", 1, "--rounds", 1, "--json", out_json)
    assert code == 0
    result = json.loads(out_json.read_text())
    assert result["n_images"] == 5 and result["threads"] == 1
    for key in ("latency_dense_ms", "latency_dyvedeep_ms", "latency_onnxruntime_ms"):
        assert result[key] > 0
    assert result["speedup"] == pytest.approx(result["latency_dense_ms"] / result["latency_dyvedeep_ms"])
