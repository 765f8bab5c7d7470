"""Shared test fixtures: the offline mirror (real models and data) and scratch directories.

Tests that need real files take the ``mirror`` fixture and skip, with the reason, where no mirror
is configured (``DYVEDEEP_MIRROR`` or ``../shared/mirror`` beside the project)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dyvedeep.fetch import mirror_path  # noqa: F401  (the one URL -> mirror path rule; tests import it from here)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Caffe's cifar10_quick (prototxt, weights, mean image), the smallest real benchmark.
CIFAR10_QUICK_URL = "https://github.com/Simshang/pycaffe/raw/c59f61709b0c981f63eec8681327994e73e8f411"


def find_mirror() -> Path | None:
    """The mirror directory tests use, or None where there is none."""
    env = os.environ.get("DYVEDEEP_MIRROR")
    if env:
        return Path(env) if Path(env).is_dir() else None
    candidate = PROJECT_ROOT.parent / "shared" / "mirror"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The offline mirror; skips the test where it is absent."""
    found = find_mirror()
    if found is None:
        pytest.skip("no mirror of real models/data (set DYVEDEEP_MIRROR or put ../shared/mirror beside the project)")
    return found


@pytest.fixture(scope="session")
def cifar10_quick_onnx(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cifar10_quick from the mirror, converted to ONNX once per test session."""
    from dyvedeep.convert import convert, preset_preprocess

    out = tmp_path_factory.mktemp("cifar10_quick") / "cifar10_quick.onnx"
    preprocess, labels = preset_preprocess("cifar10-caffe", mirror_path(mirror, f"{CIFAR10_QUICK_URL}/mean.binaryproto"))
    convert(mirror_path(mirror, f"{CIFAR10_QUICK_URL}/cifar10_quick.prototxt"),
            mirror_path(mirror, f"{CIFAR10_QUICK_URL}/cifar10_quick_iter_5000.caffemodel"), out, preprocess, labels)
    return out


def skip_unless_linux_root(what: str, why_root: str) -> None:
    """Skip the test, with the reason, unless this is Linux and we are root (the emulated Pi and
    the test Slurm cluster start system daemons)."""
    if os.name != "posix" or os.uname().sysname != "Linux":
        pytest.skip(f"{what} needs Linux")
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root ({why_root})")


def path_requested(config: pytest.Config, folder: Path, env: str) -> bool:
    """Whether this run asked for the tests of ``folder`` (``pytest tests/pi`` as ``make
    test-pi`` runs it, or the variable ``env`` set to 1); a plain ``pytest tests`` (``make
    test``) skips those paths: they take minutes and start system daemons."""
    if os.environ.get(env) == "1":
        return True
    for arg in config.args:
        target = Path(arg.split("::", 1)[0]).resolve()
        if target == folder or folder in target.parents:
            return True
    return False
