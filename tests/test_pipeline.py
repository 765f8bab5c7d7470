"""End-to-end test of the Snakemake pipeline on the CI configuration (.test/config/config.yaml).

The real `snakemake` runs the real workflow (Snakefile of the project) in a temporary working
directory on cifar10_quick alone, with small limits, from the offline mirror, on the host and
on a board that cannot be reached; it checks the tables (the board's row is "missing", the
host's rows are there), the comparison table of decision gates and static pruning beside the
knobs, the executed and counted MACs, the plots, the report, that a second run does nothing,
that a checksum mismatch in the mirror stops that benchmark (one line naming the file) while
the pipeline still finishes, that a run killed mid-calibration resumes, and that the report
renders in a headless Chromium. Skips, with the reason, without the mirror, without Snakemake,
or (the browser test) without Chromium.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT, find_mirror, mirror_path

pytestmark = [pytest.mark.slow, pytest.mark.mirror]

SUMMARY_COLUMNS = [
    "benchmark", "platform", "emulated", "threads", "n_test",
    "top1_dense", "top1_dyvedeep", "top1_loss_pt", "loss_ci_low", "loss_ci_high",
    "ops_dense", "ops_dyvedeep", "ops_reduction",
    "latency_dense_ms", "latency_dyvedeep_ms", "latency_onnxruntime_ms", "latency_caffe_ms",
    "speedup", "speedup_vs_onnxruntime", "speedup_vs_caffe",
]
LAYER_COLUMNS = ["benchmark", "layer", "knob", "ops_dense", "ops_dyvedeep"]
PLOTS = ["op_reduction.png", "layer_ops.png", "tradeoff.png", "latency.png", "paper_vs_ours.png", "comparison.png"]

QUICK = "https://github.com/Simshang/pycaffe/raw/c59f61709b0c981f63eec8681327994e73e8f411/"
QUICK_FILES = ["cifar10_quick.prototxt", "cifar10_quick_iter_5000.caffemodel", "mean.binaryproto"]
CIFAR_PNG = "https://github.com/PeterJensen/cnn/raw/7246f8d20604aeff3d31080f28cb124a6171e6bd/demo/cifar10/"
CIFAR_LABELS = "https://github.com/PeterJensen/cnn/raw/8f2fb298ae528a1fe410e580e4ad9f5b6813bb2a/demo/cifar10/cifar10_labels.js"
CI_CONFIG = PROJECT_ROOT / ".test" / "config" / "config.yaml"
N_TEST = yaml.safe_load(CI_CONFIG.read_text(encoding="utf-8"))["limit_test"]
CI_TIMEOUT_S = 600


def needed_urls() -> list[str]:
    pngs = [CIFAR_PNG + f"cifar10_batch_{i}.png" for i in (0, 1, 2, 3, 50)]
    return [QUICK + f for f in QUICK_FILES] + pngs + [CIFAR_LABELS]


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The comparison families on cifar10_quick (compare.smk): the gates need every class among their
# training images (the first half of their calibration images; the CI run's 40 hold 8 classes).
COMPARE = {"gates": {"benchmarks": ["cifar10_quick"], "limit": 200},
           "prune": {"benchmarks": ["cifar10_quick"], "methods": ["unstructured", "fan-in"]}}
PRUNED = [m for m in COMPARE["prune"]["methods"] if COMPARE["prune"]["benchmarks"]]
COMPARE_SETTINGS = (["dense"] + [f"pruned_{m}" for m in PRUNED] + ["knobs", "gates", "gates_knobs"]
                    + [f"pruned_{m}_knobs" for m in PRUNED])


def run_config(mirror: Path, workdir: Path) -> str:
    """What only this run knows, as YAML/JSON text on top of the CI configuration
    (.test/config/config.yaml): the mirror, and the unreachable board's port (nothing listens
    on it) and key; and the comparison families, set here so that the test knows its rows."""
    key = workdir / "unreachable_key"
    key.write_text("not a key\n", encoding="utf-8")
    return json.dumps({
        "mirror": str(mirror),
        "platforms": {"board": {"port": closed_port(), "key": str(key)}},
        "compare": COMPARE,
    }, indent=2)


@pytest.fixture(scope="module")
def real_mirror() -> Path:
    pytest.importorskip("snakemake", reason="Snakemake is not installed (pip install -e '.[pipeline]')")
    found = find_mirror()
    if found is None:
        pytest.skip("no mirror of real models/data (set DYVEDEEP_MIRROR or put ../shared/mirror beside the project)")
    absent = [u for u in needed_urls() if not mirror_path(found, u).is_file()]
    if absent:
        pytest.skip(f"the mirror {found} lacks {len(absent)} files of cifar10_quick, e.g. {absent[0]}")
    return found


def make_workdir(path: Path, mirror: Path) -> Path:
    """A working directory with the project's config/ and this run's values (ci.yaml)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PROJECT_ROOT / "config", path / "config")
    (path / "ci.yaml").write_text(run_config(mirror, path), encoding="utf-8")
    return path


def snakemake_command(workdir: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run the project's workflow in ``workdir`` with the CI
    configuration and this run's values."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.pop("DYVEDEEP_MIRROR", None)  # the config's mirror decides
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(PROJECT_ROOT / "Snakefile"),
           "--directory", str(workdir), "--cores", "2", *args,
           "--configfile", str(CI_CONFIG), str(workdir / "ci.yaml")]
    return cmd, env


def snakemake(workdir: Path, *args: str, timeout: float = CI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run the project's workflow in ``workdir`` (snakemake_command); output captured."""
    cmd, env = snakemake_command(workdir, *args)
    proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return proc


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def pipeline(real_mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reduced pipeline, run once for the tests of this module; its working directory."""
    workdir = make_workdir(tmp_path_factory.mktemp("pipeline"), real_mirror)
    proc = snakemake(workdir)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return workdir


def test_summary_table(pipeline: Path) -> None:
    columns, rows = read_csv(pipeline / "results" / "tables" / "summary.csv")
    assert columns == SUMMARY_COLUMNS
    threads = sorted({1, os.cpu_count() or 1})
    assert [(r["benchmark"], r["platform"], int(r["threads"])) for r in rows] == [
        ("cifar10_quick", "x86", t) for t in threads] + [("cifar10_quick", "board", 1)]
    board = rows.pop()  # unreachable: a row without numbers, listed as missing
    assert board["emulated"] == "True"
    assert all(board[c] == "" for c in SUMMARY_COLUMNS[4:])
    for r in rows:
        assert r["emulated"] == "False"
        assert int(r["n_test"]) == N_TEST
        for key in ("top1_dense", "top1_dyvedeep"):
            assert 0.0 <= float(r[key]) <= 100.0
        assert float(r["top1_loss_pt"]) == pytest.approx(float(r["top1_dense"]) - float(r["top1_dyvedeep"]), abs=1e-6)
        assert float(r["loss_ci_low"]) <= float(r["top1_loss_pt"]) <= float(r["loss_ci_high"])
        assert float(r["ops_dense"]) > 0 and float(r["ops_dyvedeep"]) > 0
        assert float(r["ops_reduction"]) == pytest.approx(float(r["ops_dense"]) / float(r["ops_dyvedeep"]), rel=1e-6)
        assert float(r["latency_dense_ms"]) > 0 and float(r["latency_dyvedeep_ms"]) > 0
        assert float(r["speedup"]) > 0
        assert float(r["latency_caffe_ms"]) > 0
        caffe_over_dyvedeep = float(r["latency_caffe_ms"]) / float(r["latency_dyvedeep_ms"])
        assert float(r["speedup_vs_caffe"]) == pytest.approx(caffe_over_dyvedeep)
    _, missing = read_csv(pipeline / "results" / "tables" / "missing.csv")
    assert [(m["benchmark"], m["platform"]) for m in missing] == [("cifar10_quick", "board")]
    assert "127.0.0.1" in missing[0]["reason"] or "connect" in missing[0]["reason"].lower(), missing
    html = (pipeline / "results" / "tables" / "summary.html").read_text(encoding="utf-8")
    assert "Unreachable board (emulated aarch64)" in html
    assert "Caffe-style baseline: im2col + sgemm, 1 thread" in html


def test_layers_table(pipeline: Path) -> None:
    columns, rows = read_csv(pipeline / "results" / "tables" / "layers.csv")
    assert columns == LAYER_COLUMNS
    assert rows and {r["benchmark"] for r in rows} == {"cifar10_quick"}
    layers = {r["layer"] for r in rows}
    assert {"conv1", "conv2", "conv3"} <= layers  # Caffe layer names of cifar10_quick
    _, summary = read_csv(pipeline / "results" / "tables" / "summary.csv")
    totals = [r for r in rows if r["knob"] == "all"]  # one row per layer; per knob the others
    assert sum(float(r["ops_dense"]) for r in totals) == pytest.approx(float(summary[0]["ops_dense"]), rel=1e-6)
    assert sum(float(r["ops_dyvedeep"]) for r in totals) == pytest.approx(float(summary[0]["ops_dyvedeep"]), rel=1e-6)


def test_executed_macs_table(pipeline: Path) -> None:
    """Counted and executed MACs: the network's as `dyvedeep eval` gave them, the conv layers'
    beside them, the kernels never running fewer than the op model counts."""
    _, rows = read_csv(pipeline / "results" / "tables" / "executed_macs.csv")
    evaluation = json.loads((pipeline / "results" / "eval" / "cifar10_quick.json").read_text())
    network = rows[0]
    assert (network["benchmark"], network["scope"]) == ("cifar10_quick", "network")
    assert float(network["macs_counted"]) == pytest.approx(evaluation["macs_dyvedeep"])
    assert float(network["macs_executed"]) == pytest.approx(evaluation["executed_macs_dyvedeep"])
    assert {"conv1", "conv2", "conv3"} <= {r["layer"] for r in rows[1:]}
    for r in rows:
        assert float(r["macs_executed"]) >= float(r["macs_counted"]) and float(r["macs_dense"]) > 0
    assert "executed_macs.html" in (pipeline / "results" / "report.html").read_text(encoding="utf-8", errors="replace")


def test_comparison_table(pipeline: Path) -> None:
    """Dense, static, dynamic and gated side by side: every setting's row, the knobs' row as in
    the summary, the gates' exit rates as in their own table, the pruned nets counted by their
    non-zero ops."""
    tables = pipeline / "results" / "tables"
    _, rows = read_csv(tables / "comparison.csv")
    assert [(r["benchmark"], r["setting"]) for r in rows] == [("cifar10_quick", s) for s in COMPARE_SETTINGS]
    by = {r["setting"]: r for r in rows}
    _, summary = read_csv(tables / "summary.csv")
    assert float(by["knobs"]["ops_reduction"]) == pytest.approx(float(summary[0]["ops_reduction"]))
    assert float(by["knobs"]["top1_loss_pt"]) == pytest.approx(float(summary[0]["top1_loss_pt"]))
    for r in rows:
        assert int(r["n_test"]) == N_TEST
        assert float(r["loss_ci_low"]) <= float(r["top1_loss_pt"]) <= float(r["loss_ci_high"])
        assert float(r["ops"]) > 0
    dense_ops = float(by["dense"]["ops"])
    for method in PRUNED:
        static = by[f"pruned_{method}"]
        assert static["ops_counted"] == "non-zero MACs" and float(static["ops"]) <= dense_ops
        assert float(static["ops_reduction"]) == pytest.approx(dense_ops / float(static["ops"]))
        knobs = by[f"pruned_{method}_knobs"]  # the engine's non-zero count with the knobs
        assert knobs["ops_estimated"] == "False" and knobs["ops_counted"] == "non-zero MACs"
    _, exits = read_csv(tables / "comparison_exits.csv")
    for setting in ("gates", "gates_knobs"):
        mine = [e for e in exits if e["setting"] == setting]
        expected = ", ".join(f"{e['layer']} {float(e['exit_rate']):.1f} %" for e in mine) or "no gate kept"
        assert by[setting]["exit_rates"] == expected
        assert float(by[setting]["gate_ops"]) >= 0
    fragment = (tables / "comparison.fragment.html").read_text(encoding="utf-8")
    assert "<table" in fragment and "dynamic: the three knobs" in fragment


def test_html_plots_and_report(pipeline: Path) -> None:
    tables = pipeline / "results" / "tables"
    for name in ("summary.html", "layers.html", "paper_comparison.html", "comparison.html"):
        assert "<table" in (tables / name).read_text(encoding="utf-8")
    for name in PLOTS:
        data = (pipeline / "results" / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    report = (pipeline / "results" / "report.html").read_text(encoding="utf-8", errors="replace")
    assert len(report) > 100_000 and "<html" in report.lower()
    for name in ("summary.html", "op_reduction.png", "comparison.html", "comparison.png", "config_used.yaml"):
        assert name in report, f"{name} not embedded in the report"


def test_second_run_does_nothing(pipeline: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in (pipeline / "results").rglob("*") if p.is_file()}
    proc = snakemake(pipeline)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Nothing to be done" in proc.stdout, proc.stdout[-4000:]
    after = {p: p.stat().st_mtime_ns for p in (pipeline / "results").rglob("*") if p.is_file()}
    assert after == before


def test_checksum_mismatch_stops_that_benchmark(real_mirror: Path, tmp_path: Path) -> None:
    # A mirror with the real data and a corrupted copy of the cifar10_quick weights.
    mirror = tmp_path / "mirror"
    for url in needed_urls():
        target = mirror_path(mirror, url)
        target.parent.mkdir(parents=True, exist_ok=True)
        source = mirror_path(real_mirror, url)
        if url.endswith("cifar10_quick_iter_5000.caffemodel"):
            data = bytearray(source.read_bytes())
            data[len(data) // 2] ^= 0xFF
            target.write_bytes(bytes(data))
        else:
            target.symlink_to(source)
    workdir = make_workdir(tmp_path / "work", mirror)
    proc = snakemake(workdir)
    assert proc.returncode == 0, proc.stdout[-6000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("dyvedeep: benchmark cifar10_quick missing:")]
    assert len(lines) == 1, proc.stdout[-6000:]
    assert "cifar10_quick_iter_5000.caffemodel" in lines[0]
    status = json.loads((workdir / "resources" / "cifar10_quick" / "status.json").read_text())
    assert status["status"] == "missing" and "cifar10_quick_iter_5000.caffemodel" in status["reason"]
    assert not (workdir / "results" / "models" / "cifar10_quick.onnx").exists()
    columns, rows = read_csv(workdir / "results" / "tables" / "summary.csv")
    assert columns == SUMMARY_COLUMNS
    assert rows and all(r["benchmark"] == "cifar10_quick" and r["top1_dense"] == "" for r in rows)
    _, missing = read_csv(workdir / "results" / "tables" / "missing.csv")
    assert [(m["benchmark"], m["stage"]) for m in missing] == [("cifar10_quick", "fetch")]
    assert not (workdir / "results" / "remote" / "board" / "eval").exists()
    assert "cifar10_quick_iter_5000.caffemodel" in missing[0]["reason"]
    assert (workdir / "results" / "report.html").is_file()


def interrupt_calibration(workdir: Path) -> tuple[int, str]:
    """Run the CI workflow to cifar10_quick's evaluation in ``workdir`` and interrupt Snakemake
    (SIGINT to its process group, as Ctrl-C does) once the calibration's dense run is done;
    returns Snakemake's exit code and the calibration's log once the calibration has ended."""
    log = workdir / "logs" / "calibrate" / "cifar10_quick.log"
    cmd, env = snakemake_command(workdir, "results/eval/cifar10_quick.json")
    # Ctrl-C's SIGINT as a terminal delivers it: to a process whose SIGINT is at its default,
    # whatever this test process inherited (an ignored SIGINT would be inherited in turn)
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + CI_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            # under way: its dense run done (the knob trials follow; 8 s or more on 2 cores)
            if log.is_file() and "calibrate: dense top-1" in log.read_text(encoding="utf-8", errors="replace"):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before the calibration was under way"
        assert log.is_file(), "no calibration started"
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Snakemake does not wait for its jobs to end: the calibration's own last word (the
    # interrupt's line, or the knob file's) before its output is looked at, so that a
    # calibration that went on after the interrupt would show here and not after the check
    deadline = time.monotonic() + 60
    text = log.read_text(encoding="utf-8")
    while time.monotonic() < deadline and "dyvedeep: interrupted" not in text and "knobs written to" not in text:
        time.sleep(0.2)
        text = log.read_text(encoding="utf-8")
    return proc.returncode, text


def test_killed_calibration_resumes(real_mirror: Path, tmp_path: Path) -> None:
    """Snakemake interrupted (SIGINT, as Ctrl-C) in the middle of a calibration: it stops the
    calibration, no half-written knob file is left, and the next run redoes that calibration,
    keeps what was finished (the converted model is not rebuilt) and completes. (After a
    SIGKILL Snakemake's lock stays behind: `snakemake --unlock`, then the same.) A calibration
    that had ended before the interrupt arrived (this process held off the CPU for the seconds
    it takes; CI once saw a knob file) is no test of it: tried again, in a new directory."""
    for attempt in range(3):
        workdir = make_workdir(tmp_path / f"work{attempt}", real_mirror)
        overlay = json.loads((workdir / "ci.yaml").read_text(encoding="utf-8"))
        overlay.update(limit_calib=1000, calibrate={"passes": 2}, platforms_enabled=["x86"])
        (workdir / "ci.yaml").write_text(json.dumps(overlay), encoding="utf-8")
        returncode, text = interrupt_calibration(workdir)
        if "knobs written to" not in text:
            break
    knobs = workdir / "results" / "knobs" / "cifar10_quick.yaml"
    model = workdir / "results" / "models" / "cifar10_quick.onnx"
    tail = "\n".join(text.splitlines()[-8:])
    assert "knobs written to" not in text, f"every calibration ended before the interrupt; the last log ends:\n{tail}"
    assert returncode != 0
    assert "dyvedeep: interrupted" in text, f"the calibration did not report the interrupt; its log ends:\n{tail}"
    assert not knobs.exists(), f"a knob file was left by the killed calibration; its log ends:\n{tail}"
    model_written = model.stat().st_mtime_ns
    rerun = snakemake(workdir, "results/eval/cifar10_quick.json")
    assert rerun.returncode == 0, rerun.stdout[-6000:]
    assert "rule calibrate:" in rerun.stdout and "rule convert" not in rerun.stdout, rerun.stdout[-6000:]
    assert model.stat().st_mtime_ns == model_written
    assert "layers" in knobs.read_text(encoding="utf-8")
    assert json.loads((workdir / "results" / "eval" / "cifar10_quick.json").read_text())["n"] == N_TEST


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_chromium(pipeline: Path, tmp_path: Path) -> None:
    browser = find_chromium()
    if browser is None:
        pytest.skip("no headless browser (install the Debian package chromium)")
    report = pipeline / "results" / "report.html"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=10000", "--dump-dom", report.resolve().as_uri()]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # What the page shows (the report's data also sits in its scripts: leave those out).
    dom = re.sub(r"<script\b.*?</script>", "", proc.stdout, flags=re.S | re.I)
    # The report opens on the workflow description, which shows the summary table and plots.
    assert "<table" in dom and "top1_dyvedeep" in dom and "cifar10_quick" in dom, dom[:3000]
    assert dom.count("data:image/png;base64,") >= len(PLOTS)
    assert "The paper's results beside ours" in dom
