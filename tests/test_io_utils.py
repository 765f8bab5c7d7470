"""Atomic writes (dyvedeep.io_utils): what an interrupted writer leaves is cleaned by the next
write to the same target, and a target that cannot be written is one line naming it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dyvedeep.errors import DyveError
from dyvedeep.io_utils import write_text_atomic

PROJECT_ROOT = Path(__file__).resolve().parents[1]

KILLED_WRITER = """
import os, signal, sys
from dyvedeep.io_utils import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_mid_write_leaves_a_temporary_that_the_next_write_removes(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=PROJECT_ROOT)
    assert proc.returncode == -9
    left = list(tmp_path.glob(".out.json.*.tmp"))
    assert len(left) == 1 and not target.exists()  # the target never half-written
    write_text_atomic(target, "whole\n")
    assert target.read_text() == "whole\n"
    assert not list(tmp_path.glob(".out.json.*")), "the dead writer's temporary file is still there"


def test_a_live_writers_temporary_is_left_alone(tmp_path: Path) -> None:
    """Only temporaries whose writer is gone go: this process's own, or a running one's, stay."""
    target = tmp_path / "out.json"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as sleeper:
        try:
            live = tmp_path / f".out.json.{sleeper.pid}.abcd.tmp"
            live.write_text("writing")
            write_text_atomic(target, "x")
            assert live.exists()
        finally:
            sleeper.kill()


@pytest.mark.parametrize("where", ["directory", "under_a_file"])
def test_unwritable_target_is_one_line_naming_it(where: str, tmp_path: Path) -> None:
    if where == "directory":
        target = tmp_path / "out.json"
        target.mkdir()
    else:
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "out.json"
    with pytest.raises(DyveError) as info:
        write_text_atomic(target, "x")
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    assert not list(tmp_path.glob(".out.json.*"))
