"""A checkpoint write that fails (a full disk, a quota, permissions) is one error, not a
log of tracebacks: while a write is in progress orbax's error logs are held back, and
what the failed write left on disk is removed."""

from __future__ import annotations

import glob
import logging as std_logging
import os
import re
import shutil
import sys
import time
from typing import Any

import jax

# What orbax names the folder of a save in progress (renamed when complete).
ORBAX_TMP = '.orbax-checkpoint-tmp'
# Errors of orbax/tensorstore that come from the file system, not from the data.
_WRITE_FAILURE = re.compile(
    r'os_error_code|Failed writing|Error writing|No space left|quota|Read-only file system',
    re.IGNORECASE,
)
_quiet_depth = 0  # writes in progress (nested or asynchronous)
_held_logs: list[std_logging.LogRecord] = []
_previous_unraisablehook = None


def _hold_orbax_errors(record: std_logging.LogRecord) -> bool:
    """Holds orbax's error logs back while a checkpoint is written: a failed write logs
    the same error, with a background thread's traceback, once per thread it touched."""
    if record.levelno >= std_logging.ERROR and 'orbax' in record.pathname:
        _held_logs.append(record)
        return False
    return True


def _drop_closed_loop_errors(unraisable: Any) -> None:
    """Drops tensorstore's 'Event loop is closed' reports: writes that end after orbax
    gave up on a failed save, which the caller reports once."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
        return
    (_previous_unraisablehook or sys.__unraisablehook__)(unraisable)


def quiet_start() -> None:
    """From here until the matching :func:`_quiet_end`, a failed write is one error."""
    global _quiet_depth, _previous_unraisablehook
    if _quiet_depth == 0:
        std_logging.getLogger('absl').addFilter(_hold_orbax_errors)
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _drop_closed_loop_errors
    _quiet_depth += 1


def quiet_end(failed: bool) -> None:
    """Ends a :func:`quiet_start`. The held logs are dropped if ``failed`` (the caller
    raised the failure as one :class:`~jackpot_jax.io.checkpoint.CheckpointError`), else logged as they came."""
    global _quiet_depth
    if failed:
        _held_logs.clear()
    _quiet_depth -= 1
    if _quiet_depth:
        return
    std_logging.getLogger('absl').removeFilter(_hold_orbax_errors)
    if sys.unraisablehook is _drop_closed_loop_errors:
        sys.unraisablehook = _previous_unraisablehook or sys.__unraisablehook__
    held = list(_held_logs)
    _held_logs.clear()
    for record in held:
        std_logging.getLogger(record.name).handle(record)


def reason(error: Exception) -> str | None:
    """Why the file system refused a write (e.g. 'No space left on device'), or None
    when ``error`` is no write failure."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    text = str(error)
    if not _WRITE_FAILURE.search(text):
        return None
    code = re.search(r"os_error_code='?(\d+)", text)
    return os.strerror(int(code.group(1))) if code else text.strip().splitlines()[0][:300]


def remove_partial(pattern: str, patience: float = 5.0) -> None:
    """Deletes what a failed save left (it only takes space) on process 0. Writer threads
    of the failed save may still be finishing, so it waits (up to ``patience`` seconds)
    until two looks 0.1 s apart find nothing."""
    if jax.process_index() != 0:
        return
    deadline, clean_looks = time.monotonic() + patience, 0
    while clean_looks < 2 and time.monotonic() < deadline:
        partials = glob.glob(pattern)
        for partial in partials:
            shutil.rmtree(partial, ignore_errors=True)
        clean_looks = 0 if partials else clean_looks + 1
        time.sleep(0.1)
