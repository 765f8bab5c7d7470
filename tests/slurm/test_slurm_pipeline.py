"""The Slurm profile against a real Slurm: the reduced pipeline (cifar10_quick and
squeezenet_v1.1, small limits, sharded evaluation) run with `--profile profiles/slurm` on the
one-node cluster of tools/slurm_cluster.py. Checks that the jobs went through Slurm (`sacct`
lists them, per rule, with the partition, the account and the CPUs asked for; the timing job
on a whole node), that the results equal a local run of the same configuration (evaluations
and knob files), and that a job failing on the node surfaces as one line naming the rule and
the Slurm job id, with nothing half-written."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ["cifar10_quick", "squeezenet_v1.1"]
LIMIT_TEST = 12
SHARD = 6
TIMEOUT_S = 900


def find_mirror() -> Path | None:
    env = os.environ.get("DYVEDEEP_MIRROR")
    candidate = Path(env) if env else PROJECT_ROOT.parent / "shared" / "mirror"
    return candidate if candidate.is_dir() else None


def reduced_config(mirror: Path) -> dict[str, Any]:
    return {
        "suite": "slurm",
        "suites": {"slurm": {"benchmarks": BENCHMARKS}},
        "mirror": str(mirror),
        "limit_calib": 10,
        "limit_test": LIMIT_TEST,
        "eval_shard_size": SHARD,
        "bench": {"images": 2, "warmup": 0},
        "calibrate": {"passes": 1, "knobs": ["spet"]},
        "platforms": {"x86": {"kind": "local", "threads": [1]}},
        "platforms_enabled": ["x86"],
    }


def targets() -> list[str]:
    return [f"results/eval/{b}.json" for b in BENCHMARKS] + [f"results/bench/x86/{b}/t1.json" for b in BENCHMARKS]


def workdir(path: Path, mirror: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PROJECT_ROOT / "config", path / "config", dirs_exist_ok=True)
    (path / "reduced.yaml").write_text(json.dumps(reduced_config(mirror), indent=2), encoding="utf-8")
    return path


def snakemake(work: Path, cluster: dict[str, Any] | None, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """The project's workflow in ``work`` (through Slurm when ``cluster`` is given); output, seconds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env["PATH"]])
    env.pop("DYVEDEEP_MIRROR", None)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(PROJECT_ROOT / "Snakefile"), "--directory", str(work)]
    if cluster:
        env["SLURM_CONF"] = cluster["slurm_conf"]
        cmd += ["--profile", str(PROJECT_ROOT / "profiles" / "slurm"),
                "--profile", str(PROJECT_ROOT / "tests" / "slurm" / "profile")]
    else:
        cmd += ["--cores", "2"]
    cmd += [*args, "--configfile", str(work / "reduced.yaml")]
    began = time.monotonic()
    proc = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=TIMEOUT_S)
    return proc, time.monotonic() - began


def sacct(cluster: dict[str, Any], *args: str) -> list[dict[str, str]]:
    fields = ["JobID", "JobName", "Comment", "State", "ExitCode", "Partition", "Account", "AllocCPUS", "Elapsed"]
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", "now-1days", "-o", ",".join(fields), *args],
                         env=dict(os.environ, SLURM_CONF=cluster["slurm_conf"]), capture_output=True, text=True,
                         check=True).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


def run_id(output: str) -> str:
    match = re.search(r"SLURM run ID: (\S+)", output)
    assert match, output[-3000:]
    return match.group(1)


def rule_of(comment: str) -> str:
    return comment.removeprefix("rule_").split("_wildcards_")[0]


@pytest.fixture(scope="module")
def runs(slurm_cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, measured: dict) -> dict[str, Any]:
    """The reduced pipeline through Slurm and locally, once for this module."""
    mirror = find_mirror()
    if mirror is None:
        pytest.skip("no mirror of real models/data (set DYVEDEEP_MIRROR or put ../shared/mirror beside the project)")
    slurm_dir = workdir(tmp_path_factory.mktemp("slurm"), mirror)
    proc, slurm_s = snakemake(slurm_dir, slurm_cluster, *targets())
    assert proc.returncode == 0, proc.stdout[-6000:]
    local_dir = workdir(tmp_path_factory.mktemp("local"), mirror)
    local, local_s = snakemake(local_dir, None, *targets())
    assert local.returncode == 0, local.stdout[-6000:]
    uuid = run_id(proc.stdout)
    jobs = sacct(slurm_cluster, "--name", uuid)
    measured.update(cluster_dir=slurm_cluster["dir"],
                    reduced_pipeline_slurm_s=round(slurm_s, 1), reduced_pipeline_local_s=round(local_s, 1),
                    slurm_jobs=len(jobs),
                    sacct=[" | ".join(j[k] for k in ("JobID", "Comment", "State", "Partition", "Account",
                                                      "AllocCPUS", "Elapsed")) for j in jobs])
    return {"slurm": slurm_dir, "local": local_dir, "output": proc.stdout, "jobs": jobs, "uuid": uuid}


def test_jobs_went_through_slurm(runs: dict[str, Any], slurm_cluster: dict[str, Any]) -> None:
    jobs = runs["jobs"]
    by_rule: dict[str, list[dict[str, str]]] = {}
    for job in jobs:
        by_rule.setdefault(rule_of(job["Comment"]), []).append(job)
    assert {"fetch_data", "fetch", "convert", "calibrate", "evaluate_shard",
            "evaluate", "bench"} <= set(by_rule), sorted(by_rule)
    assert all(j["State"] == "COMPLETED" and j["ExitCode"] == "0:0" for j in jobs), jobs
    # The profile's defaults: the cluster's default partition and the user's default account.
    assert {j["Partition"] for j in jobs} == {slurm_cluster["partition"]}
    assert {j["Account"] for j in jobs} == {slurm_cluster["account"]}
    # Calibration: one job per benchmark with the rule's threads as its CPUs.
    assert len(by_rule["calibrate"]) == len(BENCHMARKS)
    assert {j["AllocCPUS"] for j in by_rule["calibrate"]} == {str(min(2, os.cpu_count() or 1))}
    # Evaluation: one job per shard of each benchmark's test split, then one merge each.
    shards = -(-LIMIT_TEST // SHARD)
    assert len(by_rule["evaluate_shard"]) == shards * len(BENCHMARKS)
    assert len(by_rule["evaluate"]) == len(BENCHMARKS)
    # A timing job asks for 1 thread, and gets the whole node (--exclusive).
    assert {j["AllocCPUS"] for j in by_rule["bench"]} == {str(slurm_cluster["cpus"])}
    for bench in BENCHMARKS:
        assert sorted(p.name for p in (runs["slurm"] / "results" / "eval" / bench / "images").iterdir()) == \
            sorted(f"{a}-{min(a + SHARD, LIMIT_TEST)}.json" for a in range(0, LIMIT_TEST, SHARD))


def test_results_equal_a_local_run(runs: dict[str, Any]) -> None:
    for bench in BENCHMARKS:
        knobs = f"results/knobs/{bench}.yaml"
        assert (runs["slurm"] / knobs).read_bytes() == (runs["local"] / knobs).read_bytes(), bench
        ours = json.loads((runs["slurm"] / "results" / "eval" / f"{bench}.json").read_text())
        local = json.loads((runs["local"] / "results" / "eval" / f"{bench}.json").read_text())
        assert ours == local, bench  # top-1, ops, interval, layers: sharded on Slurm = one local job
        assert ours["n"] == LIMIT_TEST and ours["ops_dense"] > 0
        for t in ("t1",):
            bench_json = json.loads((runs["slurm"] / "results" / "bench" / "x86" / bench / f"{t}.json").read_text())
            assert bench_json  # timings differ between runs; that the job ran and wrote is what counts


def test_a_failing_job_is_one_line_with_its_slurm_id(runs: dict[str, Any], slurm_cluster: dict[str, Any]) -> None:
    work = runs["slurm"]
    knobs = work / "results" / "knobs" / "cifar10_quick.yaml"
    knobs.write_bytes(b"layers: [\x01 not a knob file\n")  # the shards' input, unreadable as knobs
    proc, _ = snakemake(work, slurm_cluster, "results/eval/cifar10_quick.json")
    assert proc.returncode != 0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("dyvedeep: rule evaluate_shard ")]
    assert lines, proc.stdout[-6000:]
    failed = {j["JobID"]: j for j in sacct(slurm_cluster, "--name", run_id(proc.stdout))}
    for line in lines:
        match = re.fullmatch(r"dyvedeep: rule evaluate_shard \((\S+)\) failed in Slurm job (\d+): (.*)", line)
        assert match, line
        output, job_id, reason = match.groups()
        assert "cifar10_quick.yaml" in reason and "not valid YAML" in reason, line
        assert failed[job_id]["State"] == "FAILED" and rule_of(failed[job_id]["Comment"]) == "evaluate_shard"
        assert not (work / output).exists()  # the failed shard left no output
    # Nothing half-written: no temporary files, and every result there is complete JSON.
    assert not [p for p in (work / "results").rglob("*.tmp")]
    for path in (work / "results" / "eval").rglob("*.json"):
        json.loads(path.read_text(encoding="utf-8"))
