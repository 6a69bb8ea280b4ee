"""User-facing errors: one or two lines that name the file or key and the fix, and a non-zero exit.

Every command runs its ``main`` through :func:`run_command`. A :class:`UserError` (bad config,
unusable input) is printed as ``error: ...`` without a traceback and exits with status 2, the
status argparse uses for a bad command line; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

USAGE_ERROR = 2


class UserError(Exception):
    """Something the user can fix (a key, a file, a value); the message says what and how."""


def run_command(main: Callable[[], int | None]) -> None:
    """Run a command's ``main`` and exit with its status; a UserError is one line on stderr, exit 2."""
    try:
        status = main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(USAGE_ERROR)
    sys.exit(status or 0)
