"""Fixtures of the Slurm path (``make test-slurm``): a real one-node Slurm cluster on this machine
(tools/slurm_cluster.py: munge, MariaDB, slurmdbd, slurmctld, slurmd; Debian packages installed
when missing), started for the session and stopped afterwards if this session started it.

Needs root (the daemons and the jobs run as root), the Slurm executor plugin, and the Debian
packages; skips with the reason otherwise. ``pytest tests`` (``make test``) skips it: it runs
with ``pytest tests/slurm`` or DYVEDEEP_TEST_SLURM=1."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import pytest

from tests.conftest import path_requested, skip_unless_linux_root

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: What the session measured (printed at the end, kept in <cluster dir>/test-slurm.json).
MEASURED: dict[str, Any] = {}


def slurm_path_requested(config: pytest.Config) -> bool:
    """``pytest tests/slurm`` (``make test-slurm``) or DYVEDEEP_TEST_SLURM=1."""
    return path_requested(config, Path(__file__).resolve().parent, "DYVEDEEP_TEST_SLURM")


def load_cluster_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("slurm_cluster", PROJECT_ROOT / "tools" / "slurm_cluster.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def cluster_tool(request: pytest.FixtureRequest) -> ModuleType:
    if not slurm_path_requested(request.config):
        pytest.skip("the Slurm path runs with `make test-slurm` (pytest tests/slurm), not with `make test`")
    skip_unless_linux_root("the test Slurm cluster", "its daemons and jobs run as root")
    pytest.importorskip("snakemake_executor_plugin_slurm",
                        reason="the Slurm executor plugin is not installed (pip install -e '.[pipeline]')")
    return load_cluster_tool()


@pytest.fixture(scope="session")
def slurm_cluster(cluster_tool: ModuleType) -> Iterator[dict[str, Any]]:
    """The running cluster's description (slurm_conf, partition, account, cpus, ...)."""
    paths = cluster_tool.Paths(cluster_tool.DEFAULT_DIR.resolve())
    try:
        cluster_tool.ensure_packages()
    except cluster_tool.ClusterError as err:
        pytest.skip(f"the Slurm packages cannot be installed here: {err}")
    was_running = set(cluster_tool.read_pids(paths)) == set(cluster_tool.DAEMONS)
    try:
        desc = cluster_tool.start(paths)
    except cluster_tool.ClusterError as err:
        pytest.fail(f"test Slurm cluster: {err}")
    try:
        yield {**desc, "dir": str(paths.root)}
    finally:
        if not was_running:
            cluster_tool.stop(paths)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not MEASURED:
        return
    terminalreporter.write_sep("-", "reduced pipeline through Slurm and locally (this machine, 2 cores)")
    for key, value in MEASURED.items():
        if isinstance(value, list):
            terminalreporter.write_line(f"{key}:")
            for line in value:
                terminalreporter.write_line(f"  {line}")
        else:
            terminalreporter.write_line(f"{key}: {value}")
    out = Path(MEASURED.get("cluster_dir", "")) / "test-slurm.json"
    if out.parent.is_dir():
        out.write_text(json.dumps(MEASURED, indent=2) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def measured() -> dict[str, Any]:
    """Where tests put what they measured (shown at the end of the session)."""
    return MEASURED
