"""The one error type users see: a single line naming the file or host and the problem."""
from __future__ import annotations


class DyveError(Exception):
    """A user-facing failure. ``str(err)`` is one line that names the file or host at fault.

    The command-line entry point prints it as ``dyvedeep: error: <message>`` and exits non-zero.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(" ".join(str(message).split()))
        self.exit_code = exit_code
