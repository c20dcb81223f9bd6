"""Mistakes in the input end in one line on stderr; the traceback only when asked.

Both command lines (``jackpot_jax.main`` and ``jackpot_jax.io.convert``) run their work
through :func:`report_user_errors`: an error of a kind in :data:`USER_ERRORS` (a bad
flag, config field, file or folder; the message names the value and the fix) prints
``error: <message>`` and exits with status 1. ``--traceback`` re-raises it instead.
Any other exception is a bug and keeps its full traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

TRACEBACK_HELP = 'Show the full traceback of errors in the input (flags, config, files).'
EXIT_ERROR = 1  # a mistake found while running
EXIT_USAGE = 2  # a command line that cannot be parsed (as argparse does)


class UserError(ValueError):
    """A mistake in what the user gave (a value, a file, a folder); its message says the fix."""


# Raised for bad input by this package and the libraries it calls: ValueError (config and
# conversion errors, UserError), OSError (missing, unreadable or unwritable files and
# folders), EOFError (truncated files), FloatingPointError (a diverged search, with the
# checkpoint to resume from). checkpoint.CheckpointError is a UserError.
USER_ERRORS = (ValueError, OSError, EOFError, FloatingPointError)


def one_line(error: BaseException) -> str:
    """``error: <message>``; the message alone, as its lines already say what and how."""
    message = str(error).strip() or type(error).__name__
    return f'error: {message}'


def exit_with(message: str, status: int = EXIT_ERROR) -> NoReturn:
    """Prints ``message`` on stderr and exits with ``status``."""
    print(message, file=sys.stderr, flush=True)
    sys.exit(status)


def report_user_errors(fn: Callable[..., Any], *args: Any, traceback: bool = False) -> int:
    """Runs ``fn(*args)``; returns the exit status: 0, or 1 after printing a user error's
    one line on stderr (with ``traceback``, the error is raised instead)."""
    try:
        fn(*args)
    except USER_ERRORS as error:
        if traceback:
            raise
        print(one_line(error), file=sys.stderr, flush=True)
        return EXIT_ERROR
    return 0
