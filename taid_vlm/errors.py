"""One voice for errors the user can fix: ``error: <what> (<where>)`` on stderr, exit status 2.

    from taid_vlm.errors import UserError, run_cli

    def main(argv=None) -> int:
        ...
        raise UserError("no shard matches", "--train data/*.tar")

    if __name__ == "__main__":
        sys.exit(run_cli(main))

``run_cli`` removes ``--debug`` from the arguments (anywhere on the line) and then calls ``main``. A
``UserError`` (or a missing / unreadable file, or any exception type passed as ``user_errors``) prints
one line and returns 2; with ``--debug`` the traceback is printed too. Anything else is a bug and
propagates with its traceback. Ctrl-C prints ``interrupted`` and returns 130. argparse's own usage
errors keep argparse's format (``prog: error: ...``, exit 2).
"""

from __future__ import annotations

import sys
import traceback
from typing import Callable, List, Optional, Sequence, Tuple, Type

DEBUG_FLAG = "--debug"
USER_ERROR_STATUS = 2

# OS errors that name a path the user gave (a typo, a missing folder, no permission): not bugs.
_PATH_ERRORS: Tuple[Type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError,
                                                  NotADirectoryError, FileExistsError)


class UserError(Exception):
    """A mistake the user can fix. ``what`` says what is wrong, ``where`` names the culprit (a file, a
    flag, a config key, a sample key); printed as ``error: <what> (<where>)``."""

    def __init__(self, what: str, where: Optional[str] = None):
        super().__init__(what if where is None else f"{what} ({where})")
        self.what, self.where = what, where


def error_line(exc: BaseException) -> str:
    """The one line printed for a user error."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.filename is not None:
        return f"error: {exc.strerror or type(exc).__name__} ({exc.filename})"
    what, where = getattr(exc, "what", None), getattr(exc, "where", None)
    if what is not None:  # a UserError (ConfigError too: its str() keeps the key first for library callers)
        return f"error: {what} ({where})" if where else f"error: {what}"
    return f"error: {exc}"


def run_cli(main: Callable[[List[str]], Optional[int]], argv: Optional[Sequence[str]] = None,
            user_errors: Tuple[Type[BaseException], ...] = ()) -> int:
    """``main(argv)`` with user errors as one line and status 2; see the module docstring."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    try:
        return int(main(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, *_PATH_ERRORS, *user_errors) as e:
        if debug:
            traceback.print_exc()
        print(error_line(e), file=sys.stderr)
        return USER_ERROR_STATUS
