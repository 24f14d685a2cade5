"""One voice for user errors: `error: <what> (<where>)` on stderr and exit code 2, no traceback.

A user error is something the user can fix (a config key, a path, a checkpoint that does not fit);
anything else is a bug and keeps its traceback. `--debug` shows the traceback of a user error too.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem the user can fix; `where` names the file, folder or config key it is about."""

    def __init__(self, what: str, where: Optional[str] = None):
        self.what, self.where = what, where
        super().__init__(f"{what} ({where})" if where else what)


def user_error_line(e: BaseException) -> str:
    what, where = getattr(e, "what", None), getattr(e, "where", None)
    if what is None:
        return f"error: {e}"
    return f"error: {what} ({where})" if where else f"error: {what}"


def run_cli(func: Callable[[], int], user_errors: tuple = (UserError,), debug: bool = False) -> int:
    """Call `func`; a user error becomes one line on stderr and exit code 2 (re-raised with `debug`)."""
    try:
        return func()
    except user_errors as e:
        if debug:
            raise
        print(user_error_line(e), file=sys.stderr)
        return USER_ERROR_EXIT
