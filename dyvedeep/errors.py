"""The one error type users see: a single line naming the file or host and the problem."""
from __future__ import annotations

import re

# Control characters (NUL included) copied from input would corrupt the one-line message.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class DyveError(Exception):
    """A user-facing failure. ``str(err)`` is one line that names the file or host at fault.

    The command-line entry point prints it as ``dyvedeep: error: <message>`` and exits non-zero.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(" ".join(_CONTROL.sub("", str(message)).split()))
        self.exit_code = exit_code
