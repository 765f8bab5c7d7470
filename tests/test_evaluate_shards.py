"""Sharded evaluation: image ranges evaluated apart (``dyvedeep eval --images A:B --per-image``)
and merged (``dyvedeep eval-merge``) give the same per-image results and the same summary
(top-1, op counts, bootstrap interval), bit for bit, as one run over the whole split; on the
real cifar10_quick and squeezenet_v1.1 with knobs that fire. Merging refuses shards that leave
images out, overlap, or are cut short, with one line naming the file."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dyvedeep.cli import main
from dyvedeep.convert import convert, preset_preprocess
from dyvedeep.datasets import load_dataset
from dyvedeep.errors import DyveError
from dyvedeep.evaluate import (eval_images, image_ranges, merge_images, parse_image_range,
                               read_per_image, summarize)
from dyvedeep.knobs import KnobConfig, applicable_knobs
from dyvedeep.plan import build_plan
from tests.conftest import mirror_path

SQ11 = "https://github.com/pixelzee3/copy-paste/raw/3fbd553686edc155777b352fdac77cc0065576ed"
# Thresholds that fire often (docs/knobs.md): the DyVEDeep results differ from the dense ones.
FIRING = {"spet": 0.0, "sdss": 0.2, "sfma": 0.05}


def firing_knobs(plan) -> KnobConfig:
    config = KnobConfig()
    for layer in plan.layers:
        for knob in applicable_knobs(layer):
            config.set(layer.name, knob, FIRING[knob])
    return config


@pytest.fixture(scope="module")
def quick(cifar10_quick_onnx: Path) -> Path:
    return cifar10_quick_onnx


@pytest.fixture(scope="module")
def squeezenet(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sq11") / "squeezenet_v1.1.onnx"
    preprocess, labels = preset_preprocess("imagenet-caffe", None)
    convert(mirror_path(mirror, f"{SQ11}/squeezenet1.1.xml"), mirror_path(mirror, f"{SQ11}/squeezenet1.1.bin"),
            out, preprocess, labels)
    return out


def sharded_equals_unsharded(model: Path, mirror: Path, spec: str, limit: int, size: int) -> dict:
    """Evaluate ``limit`` images at once and in shards of ``size`` (merged in a shuffled order);
    assert both are the same; the summary."""
    plan = build_plan(model)
    knobs = firing_knobs(plan)
    dataset = load_dataset(spec, plan.preprocess, mirror=mirror, limit=limit)
    whole = eval_images(plan, dataset, knobs, threads=2)
    parts = [eval_images(plan, dataset, knobs, 1, a, b) for a, b in image_ranges(len(dataset), size)]
    assert len(parts) > 2
    random.Random(0).shuffle(parts)
    merged = merge_images(parts)
    assert merged == whole
    one, sharded = summarize(plan, knobs, whole), summarize(plan, knobs, merged)
    assert sharded == one
    assert one["n"] == limit
    assert one["ops_reduction"] > 1.0  # the knobs fired: the counts are not the dense ones
    assert one["loss_ci_low"] <= one["top1_loss_pt"] <= one["loss_ci_high"]
    return one


@pytest.mark.mirror
def test_sharded_equals_unsharded_cifar10_quick(quick: Path, mirror: Path) -> None:
    sharded_equals_unsharded(quick, mirror, "cifar10:test", limit=100, size=30)


@pytest.mark.mirror
def test_sharded_equals_unsharded_squeezenet_v11(squeezenet: Path, mirror: Path) -> None:
    sharded_equals_unsharded(squeezenet, mirror, "imagenet-sample:test", limit=24, size=10)


@pytest.mark.mirror
def test_cli_shards_and_merge_equal_one_eval(quick: Path, mirror: Path, tmp_path: Path, capsys) -> None:
    plan = build_plan(quick)
    knobs = tmp_path / "knobs.yaml"
    firing_knobs(plan).save(knobs)
    common = [str(quick), "--data", "cifar10:test", "--limit", "50", "--mirror", str(mirror), "--knobs", str(knobs)]
    assert main(["eval", *common, "--json", str(tmp_path / "one.json")]) == 0
    shards = []
    for a, b in image_ranges(50, 20):
        shards.append(tmp_path / f"{a}-{b}.json")
        assert main(["eval", *common, "--images", f"{a}:{b}", "--per-image", str(shards[-1])]) == 0
    out = tmp_path / "merged.json"
    assert main(["eval-merge", str(quick), *map(str, reversed(shards)), "--knobs", str(knobs), "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads((tmp_path / "one.json").read_text())
    # Shards of other knobs do not merge into this knob file's results.
    assert main(["eval-merge", str(quick), *map(str, shards), "--json", str(tmp_path / "x.json")]) == 2
    assert "other knobs" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def record(start: int, stop: int, total: int = 10) -> dict:
    """A per-image record of images start:stop (two layers, the counter fields of the engine)."""
    from dyvedeep.engine import COUNTER_FIELDS

    n = stop - start
    return {"format": "dyvedeep-eval-images/1", "model": "m.onnx", "data": "cifar10:test", "knobs": None,
            "total": total, "range": [start, stop], "label": list(range(start, stop)),
            "dense": {"argmax": [0] * n, "top": [[0, 1]] * n},
            "dyvedeep": {"argmax": [0] * n, "top": [[0, 1]] * n},
            "counts": {"layers": ["a", "b"], "fields": list(COUNTER_FIELDS),
                       "dense": [[start] * len(COUNTER_FIELDS), [1] * len(COUNTER_FIELDS)],
                       "dyvedeep": [[stop] * len(COUNTER_FIELDS), [2] * len(COUNTER_FIELDS)]}}


def test_merge_adds_counts_and_orders_images() -> None:
    merged = merge_images([record(6, 10), record(0, 3), record(3, 6)])
    assert merged["range"] == [0, 10] and merged["label"] == list(range(10))
    assert merged["counts"]["dense"][0][0] == 0 + 3 + 6 and merged["counts"]["dyvedeep"][1][0] == 6


@pytest.mark.parametrize("parts, message", [
    ([(0, 3), (4, 10)], "leaves images 3:4 out"),
    ([(0, 5), (4, 10)], "overlaps"),
    ([(0, 3), (3, 8)], "cover images 0:8 of 10"),
])
def test_merge_refuses_gaps_and_overlaps(parts, message) -> None:
    with pytest.raises(DyveError, match=message):
        merge_images([record(a, b) for a, b in parts], [f"s{a}" for a, _ in parts])


def test_a_cut_short_shard_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "shard.json"
    text = json.dumps(record(0, 10))
    path.write_text(text[: len(text) // 2])  # as a file still being written would look
    with pytest.raises(DyveError) as err:
        read_per_image(path)
    assert str(path) in str(err.value) and "not a complete" in str(err.value)
    assert "\n" not in str(err.value)
    path.write_text(json.dumps({"n": 3}))
    with pytest.raises(DyveError, match="not a per-image results file"):
        read_per_image(path)


def test_image_ranges_and_range_option() -> None:
    assert image_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert image_ranges(8, 4) == [(0, 4), (4, 8)]
    assert image_ranges(0, 4) == [(0, 0)]
    assert parse_image_range("3:7", 10) == (3, 7) and parse_image_range("5:", 10) == (5, 10)
    for bad in ("7:3", "0:11", "x:2", "4"):
        with pytest.raises(DyveError, match="--images"):
            parse_image_range(bad, 10)
