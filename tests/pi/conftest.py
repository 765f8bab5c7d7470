"""Fixtures of the Pi path (``make test-pi``): the emulated aarch64 board of tools/pi_emulator.py
(built and cached on first use, started for the session, stopped afterwards if this session
started it), the engine set up on it, and a small synthetic model with knobs and test data.

Needs root (binfmt_misc, chroot, mounts) and Debian's qemu-user-static/debootstrap (installed by
the emulator script); skips with the reason otherwise. ``PI_FRESH=1`` starts from a clean copy
of the cached root filesystem, so the engine is built on the board from scratch. Times measured
here are "emulated aarch64", never Raspberry Pi times."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import pytest

from dyvedeep import remote

from tests.conftest import path_requested, skip_unless_linux_root
from pi_support import PROJECT_ROOT, TIMINGS, board_from_description, load_emulator, write_small_model


def pi_path_requested(config: pytest.Config) -> bool:
    """``pytest tests/pi`` (``make test-pi``) or DYVEDEEP_TEST_PI=1."""
    return path_requested(config, Path(__file__).resolve().parent, "DYVEDEEP_TEST_PI")


@pytest.fixture(scope="session")
def emulator(request: pytest.FixtureRequest) -> ModuleType:
    """The emulator module (skips where it cannot run, or where the Pi path was not asked for)."""
    if not pi_path_requested(request.config):
        pytest.skip("the Pi path runs with `make test-pi` (pytest tests/pi), not with `make test`")
    skip_unless_linux_root("the emulated Pi", "binfmt_misc, chroot, mounts")
    return load_emulator()


@pytest.fixture(scope="session")
def emulator_paths(emulator: ModuleType) -> Any:
    """Where the emulator keeps its files (PI_EMULATOR_DIR or .pi/)."""
    return emulator.Paths(Path(os.environ.get("PI_EMULATOR_DIR", PROJECT_ROOT / ".pi")).resolve())


@pytest.fixture(scope="session")
def pi_board(emulator: ModuleType, emulator_paths: Any) -> Iterator[remote.Board]:
    """The running emulated board (built and cached on first use)."""
    paths = emulator_paths
    was_running = emulator.read_pid(paths) is not None
    try:
        if not paths.tarball.exists():
            started = time.monotonic()
            emulator.build(paths)
            TIMINGS["emulator_cold_build_s"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        desc = emulator.start(paths, fresh=os.environ.get("PI_FRESH") == "1")
        TIMINGS["emulator_start_s"] = round(time.monotonic() - started, 1)
    except emulator.EmulatorError as err:
        pytest.fail(f"emulated Pi: {err}")
    board = board_from_description(desc)
    try:
        yield board
    finally:
        remote.close(board)
        if not was_running:
            emulator.stop(paths)


@pytest.fixture(scope="session")
def pi_engine(pi_board: remote.Board) -> remote.SetupResult:
    """The engine set up on the board (built there on first use of this engine version)."""
    result = remote.setup(pi_board)
    key = "remote_engine_build_s" if result.built else "remote_engine_check_s"
    TIMINGS[key] = round(result.seconds, 1)
    TIMINGS["board_onnxruntime"] = result.info.get("onnxruntime")
    return result


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """model.onnx, knobs.yaml (all three knobs on the conv layers) and test.npz."""
    return write_small_model(tmp_path_factory.mktemp("pi_model"))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Show (and keep) the measured times, labelled as emulated."""
    if not TIMINGS:
        return
    terminalreporter.write_sep("-", "emulated aarch64 board (times are not Raspberry Pi times)")
    for key, value in TIMINGS.items():
        terminalreporter.write_line(f"{key}: {value}")
    out = Path(os.environ.get("PI_EMULATOR_DIR", PROJECT_ROOT / ".pi")) / "test-pi-times.json"
    if out.parent.is_dir():
        out.write_text(json.dumps({"label": "emulated aarch64", **TIMINGS}, indent=2) + "\n")
