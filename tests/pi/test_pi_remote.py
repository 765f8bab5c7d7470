"""The Pi path end to end on the emulated aarch64 board: the engine is built on the board, a small
model is evaluated and benchmarked there through ``dyvedeep remote`` and compared with the local
x86 run (top-1 within 0.2 pt, mean ops within 0.1 %), and a board that goes away mid-run fails
with one line naming its host. Times here are "emulated aarch64", not Raspberry Pi times."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dyvedeep import remote

from pi_support import PROJECT_ROOT, TIMINGS, require_local_commands

TOP1_TOLERANCE_PT = 0.2
OPS_TOLERANCE_REL = 0.001


def dyvedeep_cmd(*args: str) -> list[str]:
    """The ``dyvedeep`` command of this checkout."""
    return [sys.executable, "-m", "dyvedeep", *args]


def run_env() -> dict[str, str]:
    """Environment for running this checkout's ``dyvedeep``."""
    return dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))


def board_options(board: remote.Board) -> list[str]:
    """The connection options of ``dyvedeep remote`` for ``board`` (as the workflow passes them)."""
    return ["--host", board.host, "--port", str(board.port), "--user", board.user, "--key", str(board.key),
            "--python", board.python, "--workdir", board.workdir, "--known-hosts", board.known_hosts,
            "--emulated", "--platform-name", board.platform_name]


def run_checked(cmd: list[str], what: str) -> float:
    """Run ``cmd`` from the project root; fail the test with its stderr tail; return seconds."""
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=run_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return time.monotonic() - started


def test_board_is_emulated_aarch64_with_cpu_model(pi_board: remote.Board) -> None:
    """The board answers as aarch64, under the host name raspberrypi, with QEMU_CPU set."""
    out = remote.ssh(pi_board, 'uname -m; hostname; echo "$QEMU_CPU"', what="probe").decode().split()
    assert out == ["aarch64", "raspberrypi", "cortex-a72"]


def test_engine_is_built_on_the_board(pi_board: remote.Board, pi_engine: remote.SetupResult) -> None:
    """Setup built the engine (Cython kernels compiled for aarch64); a second setup only checks."""
    assert pi_engine.machine == "aarch64" and pi_engine.version == remote.engine_version()
    venv = remote.venv_dir(pi_board, pi_engine.version)
    probe = (f"{venv}/bin/python -c 'import platform, dyvedeep, dyvedeep._kernels as k; "
             "print(platform.machine(), k.__file__.rsplit(\"/\", 1)[-1], k.ISA)'")
    machine, ext, isa = remote.ssh(pi_board, probe, what="importing the engine").decode().split()
    assert machine == "aarch64" and "aarch64" in ext and isa == "neon"  # the NEON tile shapes
    again = remote.setup(pi_board)
    assert not again.built and again.version == pi_engine.version
    TIMINGS["remote_setup_recheck_s"] = round(again.seconds, 2)
    assert again.seconds < 10


def test_remote_eval_matches_local(pi_board: remote.Board, pi_engine: remote.SetupResult,
                                   small_model: dict[str, Path], tmp_path: Path) -> None:
    """Accuracy and op counts on the emulated aarch64 board match the local x86 run."""
    require_local_commands()
    m = small_model
    local_json, board_json = tmp_path / "local.json", tmp_path / "board" / "eval.json"
    TIMINGS["local_eval_s"] = round(run_checked(
        dyvedeep_cmd("eval", str(m["model"]), "--data", f"npz:{m['data']}", "--knobs", str(m["knobs"]),
                     "--json", str(local_json)), "local eval"), 1)
    TIMINGS["remote_eval_s (emulated aarch64)"] = round(run_checked(
        dyvedeep_cmd("remote", "eval", *board_options(pi_board), str(m["model"]), "--knobs", str(m["knobs"]),
                     "--data-npz", str(m["data"]), "--json", str(board_json)), "remote eval"), 1)
    local, board = json.loads(local_json.read_text()), json.loads(board_json.read_text())
    assert board["platform"] == {"name": pi_board.platform_name, "machine": "aarch64", "emulated": True,
                                 "host": pi_board.host}
    assert board["n"] == local["n"]
    for key in ("top1_dense", "top1_dyvedeep"):
        assert abs(board[key] - local[key]) <= TOP1_TOLERANCE_PT, (key, board[key], local[key])
    for key in ("ops_dense", "ops_dyvedeep"):
        assert abs(board[key] - local[key]) <= OPS_TOLERANCE_REL * local[key], (key, board[key], local[key])
    assert local["ops_dyvedeep"] < local["ops_dense"]  # the knobs did something on this model
    TIMINGS["eval_compare"] = {k: [local[k], board[k]] for k in
                               ("top1_dense", "top1_dyvedeep", "ops_dense", "ops_dyvedeep")}


def test_remote_bench(pi_board: remote.Board, pi_engine: remote.SetupResult,
                      small_model: dict[str, Path], tmp_path: Path) -> None:
    """Latencies come back from the board, labelled as emulated aarch64."""
    require_local_commands()
    m = small_model
    out = tmp_path / "bench.json"
    run_checked(dyvedeep_cmd("remote", "bench", *board_options(pi_board), str(m["model"]), "--knobs",
                             str(m["knobs"]), "--threads", "1", "--data-npz", str(m["data"]),
                             "--json", str(out)), "remote bench")
    result = json.loads(out.read_text())
    assert result["platform"]["emulated"] is True and result["platform"]["machine"] == "aarch64"
    assert result["threads"] == 1
    assert result["latency_dense_ms"] > 0 and result["latency_dyvedeep_ms"] > 0
    TIMINGS["bench (emulated aarch64, ms)"] = {k: result.get(k) for k in
                                               ("latency_dense_ms", "latency_dyvedeep_ms",
                                                "latency_onnxruntime_ms")}


def board_engine_running(emulator: ModuleType, paths: Any) -> bool:
    """Whether a ``dyvedeep`` command of the engine runs on the board right now."""
    for pid in emulator.processes_in(paths.rootfs.resolve()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"/bin/dyvedeep") for part in cmdline):
            return True
    return False


def test_board_stopped_mid_run_fails_with_one_line(pi_board: remote.Board, pi_engine: remote.SetupResult,
                                                   small_model: dict[str, Path], tmp_path: Path,
                                                   emulator: ModuleType, emulator_paths: Any) -> None:
    """Stopping the board's sshd while it evaluates: exit non-zero, one error line naming host:port."""
    m = small_model
    out = tmp_path / "eval.json"
    proc = subprocess.Popen(
        dyvedeep_cmd("remote", "eval", *board_options(pi_board), str(m["model"]), "--knobs", str(m["knobs"]),
                     "--data-npz", str(m["data"]), "--json", str(out)),
        cwd=PROJECT_ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not board_engine_running(emulator, emulator_paths) and time.monotonic() < deadline:
            assert proc.poll() is None, f"finished before the board could be stopped: {proc.stderr.read()}"
            time.sleep(0.1)
        assert board_engine_running(emulator, emulator_paths), "the engine never started on the board"
        stopped = time.monotonic()
        emulator.stop(emulator_paths)
        _, stderr = proc.communicate(timeout=120)
        TIMINGS["failure_reported_after_stop_s"] = round(time.monotonic() - stopped, 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        emulator.start(emulator_paths, port=pi_board.port)  # later tests find the board again
    assert proc.returncode != 0
    errors = [ln for ln in stderr.splitlines() if "error" in ln.lower()]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"dyvedeep: error: cannot reach {pi_board.address} as {pi_board.user}:"), stderr[-2000:]
    assert errors == [last]
    assert not out.exists()
