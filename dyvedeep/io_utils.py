"""Atomic output: write to a temporary name beside the target, then rename, so that a failed or
interrupted command never leaves a half-written file under the final name. The temporary name
carries the writer's process id, so that the next write to the same target removes what a killed
writer left behind."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import DyveError


def _temporary_prefix(target: Path, pid: int | str) -> str:
    return f".{target.name}.{pid}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove temporary files of ``target`` whose writer process is gone; return them."""
    removed = []
    pattern = glob.escape(str(target.parent / f".{target.name}.")) + "*.tmp"
    for name in glob.glob(pattern):
        pid_text = name[len(str(target.parent / f".{target.name}.")):].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _alive(int(pid_text)):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
            removed.append(Path(name))
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    On any exception the temporary file is removed and ``target`` is left untouched. A target
    that is a directory, or whose directory cannot be made or written, is a DyveError naming it.
    """
    target = Path(target)
    if target.is_dir():
        raise DyveError(f"{target}: is a directory, not a file that can be written")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(target, os.getpid()), suffix=".tmp",
                                        dir=target.parent)
    except OSError as err:
        raise DyveError(f"{target}: cannot write there ({err.strerror or err})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private
        try:
            os.replace(tmp, target)
        except OSError as err:
            raise DyveError(f"{target}: cannot write there ({err.strerror or err})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``target`` atomically (UTF-8)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``target`` atomically."""
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_bytes_limited(path: str | os.PathLike[str], max_bytes: int, what: str) -> bytes:
    """The bytes of a small input file, refused in one line naming the file when it cannot be
    read or is larger than ``max_bytes``. Only ``max_bytes + 1`` bytes are read, so a huge file
    costs nothing."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as err:
        raise DyveError(f"{path}: cannot read {what} ({err.strerror})") from None
    if len(raw) > max_bytes:
        raise DyveError(f"{path}: larger than {max_bytes} bytes; not {what}")
    return raw


def read_text_limited(path: str | os.PathLike[str], max_bytes: int, what: str) -> str:
    """The UTF-8 text of a small input file (a knob file, a board description), refused in one
    line naming the file when it cannot be read, is larger than ``max_bytes`` or is not UTF-8
    (read_bytes_limited)."""
    raw = read_bytes_limited(path, max_bytes, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DyveError(f"{path}: not UTF-8 text (byte {err.start})") from None
