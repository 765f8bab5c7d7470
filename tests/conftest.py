"""Shared test fixtures: the offline mirror (real models and data) and scratch directories.

Tests that need real files take the ``mirror`` fixture and skip, with the reason, where no mirror
is configured (``DYVEDEEP_MIRROR`` or ``../shared/mirror`` beside the project)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


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


def mirror_path(mirror: Path, url: str) -> Path:
    """Where ``url`` lies in the mirror (the URL without its scheme)."""
    return mirror / url.split("://", 1)[1]
