# Shared definitions: the benchmarks of the chosen suite, their files and data specs, the
# platforms, and the input functions that read the fetch checkpoint.
import json
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

from snakemake.exceptions import WorkflowError

from dyvedeep.datasets import parse_spec, spec_source
from dyvedeep.errors import DyveError

# The project's root (where the Snakefile is): files that ship with the workflow.
REPO = Path(workflow.basedir)
PAPER_RESULTS = str(REPO / "reports" / "paper_results.yaml")
CONDA_ENV = "../envs/dyvedeep.yaml"

# The harness's command, run by the Python that runs Snakemake (its directory goes first on the
# jobs' PATH), so that it works without an activated venv. A fixed string: the jobs' params do
# not change with the way Snakemake was started (python vs python3, venv/bin/snakemake).
envvars:
    "PATH",


_PATH = os.environ["PATH"]
os.environ.update(PATH=os.pathsep.join([os.path.dirname(sys.executable), _PATH]))
DYVEDEEP = "python3 -m dyvedeep"

# Remote jobs are tried twice (`retries: 1`); the last failure becomes a "missing" result.
REMOTE_RETRIES = 1


def _config_error(message):
    raise WorkflowError(f"config: {message}")


if config["suite"] not in config["suites"]:
    _config_error(
        f"suite {config['suite']!r} is not one of {', '.join(sorted(config['suites']))}"
    )
SUITE = config["suites"][config["suite"]]
BENCHMARKS = list(dict.fromkeys(SUITE["benchmarks"]))
for _b in BENCHMARKS:
    if _b not in config["benchmarks"]:
        _config_error(f"suite {config['suite']!r} lists {_b!r}, which `benchmarks` lacks")

# The mirror (looked up before the URL); relative to the working directory. A configured
# mirror that does not exist is simply not used (a user's fresh clone has none).
MIRROR = ""
if config["mirror"] and Path(config["mirror"]).expanduser().is_dir():
    MIRROR = str(Path(config["mirror"]).expanduser().resolve())

# Every job holds one unit of `cpu_lock`; a timing job holds all of them and so runs alone, as
# does a job on every core of this machine (job_cpu_lock).
# The total is declared in the workflow profile (profiles/default/config.yaml).
_lock = workflow.global_resources.get("cpu_lock")
CPU_LOCK_ALL = int(getattr(_lock, "value", _lock) or 1)


# --- platforms -------------------------------------------------------------------------------
def _thread_settings(name, platform):
    out = []
    for t in platform["threads"]:
        if t == "all":
            if platform["kind"] != "local":
                _config_error(
                    f"platform {name}: threads 'all' is only known for local platforms; "
                    "give the board's core count"
                )
            t = os.cpu_count() or 1
        if int(t) not in out:
            out.append(int(t))
    return out


PLATFORMS = {}
for _p in config["platforms_enabled"]:
    if _p not in config["platforms"]:
        _config_error(f"platforms_enabled names {_p!r}, which `platforms` lacks")
    _spec = dict(config["platforms"][_p])
    if _spec["kind"] == "ssh" and not (_spec["board"] or (_spec.get("host") and _spec.get("user"))):
        _config_error(f"platform {_p}: an ssh platform needs a board file, or host and user")
    _spec["threads"] = _thread_settings(_p, _spec)
    _spec["label"] = _spec["label"] or _p
    PLATFORMS[_p] = _spec
LOCAL_PLATFORMS = [p for p, s in PLATFORMS.items() if s["kind"] == "local"]
REMOTE_PLATFORMS = [p for p, s in PLATFORMS.items() if s["kind"] == "ssh"]


# --- benchmarks: files and data --------------------------------------------------------------
def _file_name(url):
    """The name a downloaded file keeps: the last path component (or, for a query-style URL
    such as fetch.php?media=x:name.tgz, the last component of the query)."""
    parts = urlparse(url)
    name = os.path.basename(parts.path)
    if parts.query:
        tail = re.split(r"[=:&/]", parts.query)[-1]
        if "." in tail:
            name = tail
    return name or "file"


def bench_files(bench):
    """[{role, url, checksum, path}] of a benchmark's model files, in role order."""
    files, seen = [], set()
    for role in ("source", "weights", "mean"):
        spec = config["benchmarks"][bench]["files"].get(role)
        if not spec:
            continue
        name = _file_name(spec["url"])
        if name in seen:
            name = f"{role}-{name}"
        seen.add(name)
        files.append(
            {
                "role": role,
                "url": spec["url"],
                "checksum": spec.get("checksum", ""),
                "path": f"resources/{bench}/files/{name}",
            }
        )
    return files


def bench_file(bench, role):
    """The local path of one role's file, or None."""
    for f in bench_files(bench):
        if f["role"] == role:
            return f["path"]
    return None


def data_spec(bench, split):
    """The `--data` spec of a benchmark's calib or test split."""
    b = config["benchmarks"][bench]
    spec = b["data"].get(split)
    if not spec:
        name = SUITE["datasets"].get(b["dataset"])
        if not name:
            _config_error(f"suite {config['suite']!r} maps no data to dataset {b['dataset']!r}")
        spec = f"{name}:{b['splits'][split]}"
    return spec.replace("{imagenet_val_dir}", config["imagenet_val_dir"])


def data_key(spec):
    """The data name of a spec (cifar10, imagenet-sample, imagenet-val, ...)."""
    try:
        return parse_spec(spec)[0]
    except DyveError as err:
        _config_error(str(err))


def data_source(spec):
    """The spec without its split (imagenet-val=DIR keeps its directory)."""
    try:
        return spec_source(spec)
    except DyveError as err:
        _config_error(str(err))


DATA_SOURCES = {}
for _b in BENCHMARKS:
    for _split in ("calib", "test"):
        _s = data_spec(_b, _split)
        DATA_SOURCES.setdefault(data_key(_s), data_source(_s))


def bench_data_keys(bench):
    return sorted({data_key(data_spec(bench, s)) for s in ("calib", "test")})


def convert_source(wildcards):
    """OverFeat has no separate architecture file: its weights archive stands for both."""
    return bench_file(wildcards.bench, "source") or bench_file(wildcards.bench, "weights")


def convert_mean(wildcards):
    mean = bench_file(wildcards.bench, "mean")
    return f"--mean {mean}" if mean else ""


def ssh_params(wildcards):
    """What `dyvedeep remote` needs to reach a board."""
    p = PLATFORMS[wildcards.platform]
    keys = ("board", "host", "port", "user", "key", "python", "workdir")
    options = {k: p[k] for k in keys if p.get(k) not in (None, "")}
    return {"name": wildcards.platform, "emulated": bool(p["emulated"]), "options": options}


def mirror_arg():
    return f"--mirror {MIRROR}" if MIRROR else ""


# Threads of the jobs that can use several (calibration, evaluation): on this machine, half the
# cores there are, so that two such jobs run side by side. Two one-thread calibrations at once
# finished in 0.86x the time of the two one after the other on two threads each (2 cores, AMD
# EPYC; a calibration splits its images over worker processes, and what every job does between
# trials - its dense runs, forks, Python - then overlaps with the other job):
# docs/notes/2026-12-05-make-all-time.md. On a cluster each job has its own cores and takes
# them all. Functions, not constants: which executor runs the jobs is known only once the DAG is
# built, after the Snakefile is read.
_CORES = max(1, min(workflow.cores, os.cpu_count() or 1))


def _jobs_share_this_machine():
    return workflow.local_exec and not workflow.remote_exec


def job_threads(wildcards):
    return max(1, _CORES // 2) if _jobs_share_this_machine() else _CORES


# Such a job holds its share of cpu_lock (its threads out of this machine's cores): two of them
# fill it, and no third job starts on the same cores (six calibrations of two threads at once on
# 2 cores took several times the sum of their times alone,
# docs/notes/2026-12-04-calibration-mix.md).
def job_cpu_lock(wildcards, threads):
    return max(1, CPU_LOCK_ALL * threads // _CORES) if _jobs_share_this_machine() else 1


# Which waiting job gets a free core first: the long searches (calibrations, then pruning and
# the pruned nets' calibrations, then the gates), so that no long job is left to run alone at the
# end beside an idle core. A `make all` on 2 cores without them started resnet56_caffe's
# calibration, its longest job (4 min), 12 min into a 19.5-min run, and one core idled for
# 2.5 min of it (docs/notes/2026-12-05-make-all-time.md).
JOB_PRIORITY = {"calibrate": 3, "prune": 2, "calibrate_pruned": 2, "gates": 1}


def bench_calibrate(bench):
    """The calibration settings of ``bench``: its own over the global section."""
    own = {k: v for k, v in config["benchmarks"][bench].get("calibrate", {}).items() if v is not None}
    return {**config["calibrate"], **own}


def calibrate_args(bench, passes=None):
    """`dyvedeep calibrate` options: the benchmark's calibration settings (``passes``, unless
    None, for its passes)."""
    c = bench_calibrate(bench)
    if passes is not None:
        c = {**c, "passes": passes}
    args = ["--knobs", ",".join(dict.fromkeys(c["knobs"]))]
    for key in ("margin", "passes", "min_share", "mix", "changed_weight", "group"):
        if c.get(key) is not None:
            args += [f"--{key.replace('_', '-')}", str(c[key])]
    return " ".join(args)


def limit_arg(split, bench=None):
    """--limit N: the global limit_{split}, else (calibration) the benchmark's own limit."""
    n = config[f"limit_{split}"]
    if not n and split == "calib" and bench is not None:
        n = bench_calibrate(bench).get("limit")
    return f"--limit {int(n)}" if n else ""


# --- the fetch checkpoint --------------------------------------------------------------------
def fetch_status():
    """{benchmark: {status, reason}} once every benchmark was fetched (checkpoint)."""
    path = checkpoints.fetch_summary.get().output[0]
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def ok_benchmarks():
    status = fetch_status()
    return [b for b in BENCHMARKS if status.get(b, {}).get("status") == "ok"]


def result_plan():
    """One entry per (benchmark, platform, threads) row of the summary, with the files that
    make it. Missing benchmarks have no files (their row says missing)."""
    status = fetch_status()
    plan = []
    for bench in BENCHMARKS:
        ok = status.get(bench, {}).get("status") == "ok"
        for name, plat in PLATFORMS.items():
            for t in plat["threads"]:
                row = {
                    "benchmark": bench,
                    "platform": name,
                    "threads": t,
                    "status": "ok" if ok else "missing",
                    "reason": "" if ok else status.get(bench, {}).get("reason", ""),
                    "eval": None,
                    "bench": None,
                }
                if ok and plat["kind"] == "local":
                    row["eval"] = f"results/eval/{bench}.json"
                    row["bench"] = f"results/bench/{name}/{bench}/t{t}.json"
                elif ok:
                    row["eval"] = f"results/remote/{name}/eval/{bench}.json"
                    row["bench"] = f"results/remote/{name}/bench/{bench}/t{t}.json"
                plan.append(row)
    return plan


def result_files(wildcards):
    files = ["results/status/fetch.json"]
    for row in result_plan():
        for key in ("eval", "bench"):
            if row[key] and row[key] not in files:
                files.append(row[key])
    return files


def trace_files(wildcards):
    return [f"results/calibration/{b}.trace.csv" for b in ok_benchmarks()]


def platform_table():
    """What the tables and plots need to know of the platforms."""
    return {
        name: {
            "kind": p["kind"],
            "label": p["label"],
            "emulated": bool(p["emulated"]),
            "threads": p["threads"],
        }
        for name, p in PLATFORMS.items()
    }


wildcard_constraints:
    bench=r"[A-Za-z0-9_.\-]+",
    platform=r"[A-Za-z0-9_\-]+",
    threads=r"\d+",
    data=r"[A-Za-z0-9_\-]+",
    setting=r"[A-Za-z0-9_\-]+",
    method=r"[A-Za-z0-9_\-]+",


# --- comparison families (issue 17): decision gates and static pruning -----------------------
# The comparison table's dense and knobs rows come from `evaluate`; gates and prune run where
# `compare` turns them on. Gate settings: alone, and on top of the calibrated knobs.
GATE_SETTINGS = ["gates", "gates_knobs"]
PRUNE_METHODS = list(dict.fromkeys(config["compare"]["prune"]["methods"]))
for _family in ("gates", "prune"):
    for _b in config["compare"][_family]["benchmarks"]:
        if _b not in config["benchmarks"]:
            _config_error(f"compare.{_family}.benchmarks lists {_b!r}, which `benchmarks` lacks")


def compare_benchmarks(family):
    """The benchmarks of this suite that the comparison ``family`` (gates, prune) runs on."""
    listed = config["compare"][family]["benchmarks"]
    return [b for b in BENCHMARKS if b in listed]


def compare_budget(family):
    """The budget (pt) of a comparison family: its own, else the global one."""
    budget = config["compare"][family]["budget"]
    return config["budget"] if budget is None else budget


def gates_budget(setting):
    """`dyvedeep gates --budget` of a gate setting. On top of the knobs it covers both: by
    default the knobs' budget plus the gates' (each family its own, as for a pruned net and
    the knobs calibrated on it)."""
    if setting != "gates_knobs":
        return compare_budget("gates")
    combined = config["compare"]["gates"]["budget_with_knobs"]
    return config["budget"] + compare_budget("gates") if combined is None else combined


def eval_images_file(bench):
    """The per-image results of `evaluate` (the dense reference of the pruned nets' losses)."""
    return f"results/eval/per-image/{bench}.json"


def gate_knobs_file(bench, setting):
    """The knob file of `dyvedeep gates` (its weights beside it: <stem>.gates.npz)."""
    return f"results/gates/{bench}/{setting}.yaml"


def pruned_model_file(bench, method):
    return f"results/prune/{bench}/{method}.onnx"


def pruned_summary_file(bench, method):
    """`dyvedeep prune --summary`: the densities chosen and the calibration figures."""
    return f"results/prune/{bench}/{method}.summary.yaml"


def pruned_knobs_file(bench, method):
    """The knobs calibrated on the pruned net, and the trace of that calibration."""
    return f"results/prune/{bench}/{method}.knobs.yaml"


def pruned_trace_file(bench, method):
    return f"results/prune/{bench}/{method}.trace.csv"


def compare_eval_file(bench, setting):
    """The `dyvedeep eval --json` of one comparison setting (gates, gates_knobs,
    pruned_<method>); a pruned net's also has its per-image results (:func:`compare_images_file`)."""
    return f"results/compare/{bench}/{setting}.json"


def compare_images_file(bench, setting):
    return f"results/compare/{bench}/per-image/{setting}.json"


def gates_risk_arg(bench, setting):
    """--risk of `dyvedeep gates`. On top of the knobs, by default the knobs' own criterion
    (`--risk criterion`) on the images they were calibrated on (the benchmark's changed weight
    and mix): their budget counts in it as in their calibration, which the default
    budget_with_knobs (the knobs' budget plus the gates') relies on; the command's default risk
    (changed share + 2 SE) puts the pipeline's knobs alone at ~1.5 pt on cifar10_quick. A
    benchmark may choose its own (`gates_risk_with_knobs`: the Caffe ResNets, whose knobs change
    almost nothing on the calibration images they know by heart)."""
    g = config["compare"]["gates"]
    own = config["benchmarks"][bench].get("gates_risk_with_knobs")
    risk = (own or g["risk_with_knobs"]) if setting == "gates_knobs" else g["risk"]
    if not risk:
        return ""
    args = [f"--risk {risk}"]
    if risk == "criterion":
        c = bench_calibrate(bench)
        args += [f"--{key.replace('_', '-')} {c[key]}" for key in ("changed_weight", "mix") if c.get(key) is not None]
    return " ".join(args)


def gates_limit_arg():
    """--limit N of `dyvedeep gates`: compare.gates.limit, else the global limit_calib (not the
    benchmark's own calibrate limit: a gate is cheap to train and needs the images)."""
    n = config["compare"]["gates"]["limit"]
    return f"--limit {int(n)}" if n else limit_arg("calib")


def prune_args(bench):
    """`dyvedeep prune` options: the family's budget, its passes / min_share or else the
    benchmark's calibration ones, and the benchmark's margin, mix, changed weight and group."""
    c, p = bench_calibrate(bench), config["compare"]["prune"]
    args = ["--budget", str(compare_budget("prune"))]
    for key in ("margin", "passes", "min_share"):
        value = p.get(key) if p.get(key) is not None else c.get(key)
        if value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    for key in ("mix", "changed_weight", "group"):
        if c.get(key) is not None:
            args += [f"--{key.replace('_', '-')}", str(c[key])]
    return " ".join(args)


def compare_plan():
    """Per benchmark that runs and has a comparison family on: the files of its comparison
    table (dense and knobs: `evaluate`; gates; each pruned net with the knobs on top)."""
    ok = set(ok_benchmarks())
    gates, prune = set(compare_benchmarks("gates")), set(compare_benchmarks("prune"))
    plan = []
    for bench in BENCHMARKS:
        if bench not in ok or bench not in gates | prune:
            continue
        entry = {"benchmark": bench, "eval": f"results/eval/{bench}.json", "images": None,
                 "gates": {}, "pruned": {}}
        if bench in gates:
            entry["gates"] = {s: compare_eval_file(bench, s) for s in GATE_SETTINGS}
        if bench in prune:
            entry["images"] = eval_images_file(bench)
            entry["pruned"] = {
                m: {"eval": compare_eval_file(bench, f"pruned_{m}"),
                    "images": compare_images_file(bench, f"pruned_{m}")}
                for m in PRUNE_METHODS
            }
        plan.append(entry)
    return plan


def compare_files(wildcards):
    files = []
    for entry in compare_plan():
        files += [entry["eval"]] + ([entry["images"]] if entry["images"] else [])
        files += list(entry["gates"].values())
        files += [f for p in entry["pruned"].values() for f in p.values()]
    return files
