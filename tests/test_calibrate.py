"""Calibration's acceptance criteria and its held-out check, on the small model of test_cli."""
from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from dyvedeep.calibrate import (EARLY_Z, SPET_BOUND_SCALES, STAT_IMAGES, Calibrator, group_levels, knob_statistics,
                                 level_thresholds, risk_pt, search_key)
from dyvedeep.engine import Engine, sdss_grid
from dyvedeep.errors import DyveError
from dyvedeep.knobs import DEFAULT_OPTIONS, KnobConfig
from dyvedeep.plan import build_plan
from tests.onnx_builders import conv_model, save_model
from tests.test_cli import run, small_data, small_model  # noqa: F401  (fixtures)
from tests.test_knobs import reference_knobs


def test_risk_criteria():
    dense_ok = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    dense_pred = np.arange(8)
    ok = np.array([0, 0, 1, 1, 1, 0, 0, 0], bool)  # 2 lost, 1 gained
    pred = np.array([9, 9, 2, 3, 8, 9, 6, 7])  # 4 changed (one wrong -> another wrong)
    loss, lost, gained, changed = risk_pt("loss", 0, dense_ok, dense_pred, ok, pred)
    assert (lost, gained, changed) == (2, 1, 4) and loss == pytest.approx(12.5)
    assert risk_pt("disagree", 0, dense_ok, dense_pred, ok, pred)[0] == pytest.approx(50.0)
    ucb = risk_pt("ucb", 2.0, dense_ok, dense_pred, ok, pred)[0]
    mean = 1 / 8
    assert ucb == pytest.approx(100 * (mean + 2 * math.sqrt((3 / 8 - mean ** 2) / 8)))
    # the bound prices in the noise: same net loss, more changed images -> higher risk
    ok2 = np.array([0, 0, 0, 1, 1, 1, 0, 0], bool)  # 3 lost, 2 gained
    assert risk_pt("ucb", 2.0, dense_ok, dense_pred, ok2, pred)[0] > ucb
    assert risk_pt("ucb", 0.0, dense_ok, dense_pred, ok2, pred)[0] == pytest.approx(loss)


@pytest.mark.parametrize("options", [
    {},  # the knobs' defaults (knobs.DEFAULT_OPTIONS), the layer having no knob on
    {"spet": {"fraction": 0.25}, "sdss": {"stride": 3}, "sfma": {"statistic": "std"}},
])
def test_knob_statistics_are_what_the_thresholds_are_compared_with(tmp_path, options):
    """The candidate grids' statistics against the rules written directly: SFMA's spread of each
    input map, SDSS's largest grid corner of each cell, SPET's margin of each negative partial."""
    rng = np.random.default_rng(11)
    w = rng.normal(0, .25, (5, 6, 3, 3)).astype(np.float32)
    b = rng.normal(0, .1, 5).astype(np.float32)
    plan = build_plan(conv_model(tmp_path / "c.onnx", w, b, (6, 11, 11), pads=[1, 1, 1, 1]))
    layer = plan.layer("conv")
    x = rng.normal(0, 1, (6, 11, 11)).astype(np.float32)
    config = KnobConfig()
    for knob, opts in options.items():
        config.set("conv", knob, {"spet": math.inf, "sdss": 0.0, "sfma": 0.0}[knob], **opts)
    engine = Engine(plan, config)

    def option(knob, name):
        return options.get(knob, {}).get(name, DEFAULT_OPTIONS[knob][name])

    x64 = x.astype(np.float64)
    spread = x64.std(axis=(1, 2))
    if option("sfma", "statistic") == "relative_std":
        spread = spread / np.abs(x64).mean()
    np.testing.assert_allclose(knob_statistics(engine, layer, x, "sfma"), spread, rtol=1e-5)

    _, partial = reference_knobs(x, w, b, 1, 0.0, 0.0, 0.0, fraction=option("spet", "fraction"))
    margins = -partial[partial < 0]
    np.testing.assert_allclose(np.sort(knob_statistics(engine, layer, x, "spet")), np.sort(margins),
                               rtol=1e-4, atol=1e-5)

    out = Engine(plan).run(x[None])[0]
    grid = sdss_grid(11, 11, option("sdss", "stride"))
    corners = [max(out[o, grid.gy[i + a], grid.gx[j + c]] for a in (0, 1) for c in (0, 1))
               for o in range(5) for i in range(len(grid.gy) - 1) for j in range(len(grid.gx) - 1)]
    assert np.array_equal(knob_statistics(engine, layer, x, "sdss"), np.array(corners, np.float32))


def _calibrator(model, n=40, **kw):
    plan = build_plan(model)
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (n, 3, 12, 12)).astype(np.float32)
    y = Engine(plan).run(x).argmax(axis=1)
    return Calibrator(plan, x, y, budget=0.5, margin=0.0, min_share=0.0, threads=1, **kw)


def test_holdout_split_is_disjoint_and_deterministic(small_model):  # noqa: F811
    a, b = _calibrator(small_model, criterion="ucb", z=1.0, holdout=0.25), _calibrator(small_model, holdout=0.25)
    assert len(a.images) == 30 and len(a.hold_images) == 10
    assert np.array_equal(a.hold_images, b.hold_images)
    both = np.concatenate([a.images, a.hold_images]).reshape(40, -1)
    assert len(np.unique(both, axis=0)) == 40
    with pytest.raises(DyveError):
        _calibrator(small_model, holdout=1.0)
    with pytest.raises(DyveError):
        _calibrator(small_model, criterion="nope")


def test_holdout_backs_off_a_setting_that_fails_on_the_held_out_images(small_model):  # noqa: F811
    cal = _calibrator(small_model, holdout=0.5)
    mild, wild = KnobConfig(), KnobConfig()
    mild.set("conv2", "spet", 1e9, fraction=0.5)  # never fires: the dense result
    wild.set("conv1", "sfma", 1e9)  # every map replaced by its mean: predictions change
    wild.set("conv2", "sfma", 1e9)
    cal.history = [KnobConfig(), mild]
    cal.config = wild
    cal.check_holdout(limit=0.0)
    assert cal.backed_off == 1
    assert cal.config.get("conv1", "sfma") is None and cal.config.get("conv2", "spet") is not None
    # a setting that passes is kept
    cal.history, cal.config = [KnobConfig()], mild.copy()
    cal.check_holdout(limit=0.0)
    assert cal.config.get("conv2", "spet") is not None


def test_calibrate_cli_with_ucb_and_holdout(tmp_path, capsys, small_model, small_data):  # noqa: F811
    knobs, trace = tmp_path / "knobs.yaml", tmp_path / "trace.csv"
    code, out, err = run(capsys, "calibrate", small_model, "--data", f"npz:{small_data['calib']}",
                         "--budget", "5", "--margin", "0", "--criterion", "ucb", "--z", "1",
                         "--holdout", "0.5", "-o", knobs, "--trace", trace)
    assert code == 0, err
    assert "held-out" in err and "criterion ucb" in err
    header = trace.read_text().splitlines()[0].split(",")
    assert header[:9] == ["step", "pass", "layer", "knob", "threshold", "options", "calib_top1", "calib_loss_pt", "ops"]
    assert header[-1] == "accepted" and "risk_pt" in header
    assert run(capsys, "eval", small_model, "--data", f"npz:{small_data['test']}", "--knobs", knobs)[0] == 0


def test_lost_criterion_ignores_gains():
    dense_ok = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    dense_pred = np.arange(8)
    pred = np.array([9, 9, 2, 3, 8, 9, 6, 7])
    ok = np.array([0, 0, 1, 1, 1, 0, 0, 0], bool)  # 2 lost, 1 gained
    assert risk_pt("lost", 0, dense_ok, dense_pred, ok, pred)[0] == pytest.approx(25.0)
    assert risk_pt("lost", 1, dense_ok, dense_pred, ok, pred)[0] == pytest.approx(100 * (0.25 + math.sqrt(0.25 * 0.75 / 8)))


def test_early_rejection_stops_a_clearly_bad_candidate_after_a_quarter(small_model):  # noqa: F811
    cal = _calibrator(small_model, n=400)
    cal.run(passes=0)  # the dense run only
    wild = KnobConfig()
    wild.set("conv1", "sfma", 1e9)
    wild.set("conv2", "sfma", 1e9)
    cache = cal.cache_inputs(0, KnobConfig())
    stopped = cal.trial(0, cache, wild, 0.0, allowance=0.5)
    assert stopped.partial and len(stopped.correct) == 100
    assert cal.risk(stopped)[0] > 0.5
    full = cal.trial(0, cache, wild, 0.0)  # no allowance: every image
    assert not full.partial and len(full.correct) == 400
    mild = cal.trial(0, cache, KnobConfig(), 0.0, allowance=0.5)  # dense: never stopped
    assert not mild.partial and cal.risk(mild)[0] == 0


def test_disagree_criterion_weights_the_changed_images():
    dense_ok = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    dense_pred = np.arange(8)
    pred = np.array([9, 9, 2, 3, 8, 9, 6, 7])  # 4 of 8 changed
    ok = np.array([0, 0, 1, 1, 1, 0, 0, 0], bool)
    assert risk_pt("disagree", 0, dense_ok, dense_pred, ok, pred, changed_weight=0.5)[0] == pytest.approx(25.0)
    # labels play no part: the same changes with other outcomes give the same risk
    assert risk_pt("disagree", 0, ~dense_ok, dense_pred, ok, pred, changed_weight=0.5)[0] == pytest.approx(25.0)


def test_a_candidate_changing_most_images_while_barely_firing_stops_calibration(small_model):  # noqa: F811
    cal = _calibrator(small_model, n=40)
    cal.run(passes=0)  # the dense run only
    index = cal.index_of["conv2"]
    cache = cal.cache_inputs(index, KnobConfig())
    # cached activations that do not reproduce the network (as the in-place Concat bug once gave):
    # each image resumes from the activations of an image of another class
    pred = cal.dense.pred
    broken = [cache[int(np.flatnonzero(pred != pred[i])[0])] for i in range(len(cache))]
    with pytest.raises(DyveError, match="do not reproduce the network"):
        cal.search("conv2", "sfma", [1e-30], {}, broken, index, 0.0, 0.5, 1)
    # the same candidate on the true cache is scored (and rejected: it saves nothing), no error
    prefix = cal.prefix_ops(index, KnobConfig())
    assert cal.search("conv2", "sfma", [1e-30], {}, cache, index, prefix, 0.5, 1) is None
    assert cal.trace[-1]["disagree"] == 0


def test_spet_bound_is_searched_only_when_asked(small_model):  # noqa: F811
    """--spet-tests margin (the default) never tries the bound; margin,bound searches its scales
    beside the margin rule with the same criterion, and a bound setting it keeps is written with
    its option."""
    default = _calibrator(small_model, knobs_allowed=("spet",))
    default.run(passes=1)
    assert default.trace and all("test=" not in row["options"] for row in default.trace)
    both = _calibrator(small_model, knobs_allowed=("spet",), spet_tests=("margin", "bound"))
    both.run(passes=1)
    tried = [row for row in both.trace if "test=bound" in row["options"]]
    assert tried and {row["threshold"] for row in tried} <= set(SPET_BOUND_SCALES)
    for lname, knobs in both.config.layers.items():
        setting = knobs.get("spet")
        if setting is not None and setting.option("spet", "test") == "bound":
            assert setting.threshold in SPET_BOUND_SCALES
            assert "test=bound" in " ".join(row["options"] for row in tried if row["layer"] == lname
                                            and row["accepted"])


@pytest.fixture()
def repeated_model(tmp_path):
    """conv1 (3 -> 8) then conv2 and conv3 of one shape (8 -> 8, ReLU), global average, fc, softmax."""
    nodes = [helper.make_node("Conv", ["data", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "W2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "W3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat", axis=1),
             helper.make_node("Gemm", ["f", "W4", "b4"], ["fc"], name="fc", transB=1),
             helper.make_node("Softmax", ["fc"], ["prob"], name="prob", axis=1)]
    rng = np.random.default_rng(5)
    inits = {"W1": rng.normal(0, .4, (8, 3, 3, 3)), "b1": rng.normal(0, .1, 8),
             "W2": rng.normal(0, .2, (8, 8, 3, 3)), "b2": rng.normal(0, .1, 8),
             "W3": rng.normal(0, .2, (8, 8, 3, 3)), "b3": rng.normal(0, .1, 8),
             "W4": rng.normal(0, .5, (3, 8)), "b4": np.zeros(3)}
    return save_model(tmp_path / "repeated.onnx", nodes, inits, (3, 12, 12), "prob")


def test_shape_groups_share_one_quantile_level_of_their_own_statistics(repeated_model):
    cal = _calibrator(repeated_model, n=80, group="shape", knobs_allowed=("sdss",))
    assert [names for names, _ in cal.layer_groups()] == [("conv2", "conv3"), ("conv1",)]
    assert [names for names, _ in _calibrator(repeated_model, n=80).layer_groups()] == [
        ("conv2",), ("conv3",), ("conv1",)]
    cal.budget = 100.0  # every level is within the budget: the most aggressive one is kept
    cal.run(passes=1)
    # each layer's threshold is level 0 of its own statistic, on its own inputs
    dense = Engine(cal.plan)
    for name in ("conv2", "conv3"):
        layer = next(l for l in cal.plan.layers if l.name == name)
        values = [knob_statistics(dense, layer, dense.run_image(img, stop=cal.index_of[name])[layer.inputs[0]], "sdss")
                  for img in cal.images[:STAT_IMAGES]]
        assert cal.config.get(name, "sdss").threshold == level_thresholds("sdss", np.concatenate(values))[0]
    assert cal.config.get("conv2", "sdss").threshold != cal.config.get("conv3", "sdss").threshold
    assert any(row["layer"] == "conv2..conv3 (2 layers)" and "level=0.9" in row["options"] for row in cal.trace)
    with pytest.raises(DyveError, match="--group"):
        _calibrator(repeated_model, group="block")


def _beyond_limit_rows(cal):
    """Per (layer, knob, options without the level) of pass 1: the thresholds (or levels) whose
    risk exceeded the whole limit even 2 standard errors under (criterion disagree)."""
    out: dict[tuple, list[str]] = {}
    for row in cal.trace:
        share = row["disagree"] / row["images"]
        floor = 100 * cal.changed_weight * (share - EARLY_Z * math.sqrt(share * (1 - share) / row["images"]))
        if row["pass"] == 1 and not row["accepted"] and floor > cal.budget - cal.margin:
            options = " ".join(o for o in row["options"].split() if not o.startswith("level="))
            level = [o for o in row["options"].split() if o.startswith("level=")]
            out.setdefault((row["layer"], row["knob"], options), []).append(level[0] if level else row["threshold"])
    return out


def test_a_later_pass_skips_what_exceeded_the_whole_limit(small_model, repeated_model):  # noqa: F811
    """Pass 2 does not try again a threshold whose risk exceeded budget - margin in pass 1 even
    at its lower confidence bound, nor any more aggressive one (per layer: SPET lower margins, SDSS / SFMA higher thresholds)."""
    cal = _calibrator(small_model, n=80)
    cal.run(passes=2)
    hopeless = _beyond_limit_rows(cal)
    assert hopeless  # the test means something: pass 1 rejected some candidates beyond the limit
    for row in cal.trace:
        key = (row["layer"], row["knob"], row["options"])
        if row["pass"] == 2 and key in hopeless:
            t = row["threshold"]
            for h in hopeless[key]:
                assert (t > h) if row["knob"] == "spet" else (t < h), (row, h)
    # shape groups: a level beyond the limit in an earlier pass bounds the levels tried
    cal = _calibrator(repeated_model, n=80, group="shape", knobs_allowed=("sdss",))
    cal.budget = 100.0  # every level would be accepted
    cal.hopeless[search_key(("conv2", "conv3"), "sdss", {})] = 2
    cal.run(passes=1)
    levels = group_levels("sdss", {})
    tried = [float(row["options"].split("level=")[1]) for row in cal.trace if row["layer"].startswith("conv2..")]
    assert tried and all(levels.index(level) > 2 for level in tried)
    assert cal.config.get("conv2", "sdss") is not None  # level 3, the most aggressive one left, is kept
