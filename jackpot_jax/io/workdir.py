"""The launcher's workdir: what it holds, checked before any work, and locked while a run
writes into it.

The lock is ``fcntl.flock`` on ``WORKDIR/.lock``, held until the process ends. The
operating system drops it when the process dies, however it dies, so a crashed run never
blocks the next one; the file keeps the holder's pid and host for the error message.
In a multi-host run only process 0 locks (all processes share one workdir).
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from typing import IO

import jax

from jackpot_jax.core.errors import UserError

# What a workdir holds.
PRETRAINED_DIR = 'pretrained'  # dense weights made by 'pretrain' (unless config.pretrained)
CHECKPOINTS_DIR = 'checkpoints'  # search checkpoints, one folder per step
JACKPOT_DIR = 'jackpot'  # the found jackpot: bit-packed masks, batch statistics, meta
TUNED_DIR = 'tuned'  # weights tuned under the jackpot's mask
MASKED_WEIGHTS_DIR = 'masked_weights'  # 'export': the masked params as ordinary weights
METRICS_FILE = 'metrics.jsonl'  # one JSON record per epoch
LAYER_SPARSITY_PNG = 'layer_sparsity.png'
MASK_CHANGES_PNG = 'mask_changes.png'
LOCK_FILE = '.lock'
_held: dict[str, IO[str]] = {}  # real path of a workdir -> its open, locked lock file


class WorkdirLocked(UserError):
    """Another process holds the workdir's lock."""


def prepare(workdir: str, writes: bool = True) -> None:
    """Checks ``workdir`` up front: a folder (created if missing) that is writable if ``writes``.

    Raises UserError naming the folder and the fix.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(
            f'--workdir={workdir} is a file, not a folder; pass a folder path '
            '(it is created if missing)'
        )
    if not writes:
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir, prefix='.writable-'):
            pass
    except OSError as e:
        raise UserError(
            f'--workdir={workdir} is not writable ({e.strerror or e}); fix its permissions '
            'or pass another --workdir'
        ) from e


def holder(workdir: str) -> str:
    """Who holds (or last held) the lock: 'pid N on HOST', or 'unknown'."""
    try:
        with open(os.path.join(workdir, LOCK_FILE)) as f:
            return f.read().strip() or 'unknown'
    except OSError:
        return 'unknown'


def lock(workdir: str) -> None:
    """Takes the exclusive lock on ``workdir`` for the rest of this process (idempotent).

    Only process 0 of a multi-host run locks. Raises WorkdirLocked, naming the holder,
    if another process has it.
    """
    if _multi_process() and jax.process_index() != 0:
        return
    key = os.path.realpath(workdir)
    if key in _held:
        return
    path = os.path.join(workdir, LOCK_FILE)
    f = open(path, 'a+')  # pylint: disable=consider-using-with  (held until exit)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise WorkdirLocked(
            f'workdir {workdir} is in use by {holder(workdir)} (lock {path}); wait for that '
            'run to finish, or use another --workdir'
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    f.flush()
    _held[key] = f


def _multi_process() -> bool:
    """Whether jax.distributed is up (asked without starting a backend when it is not)."""
    is_initialized = getattr(jax.distributed, 'is_initialized', None)
    return is_initialized() if is_initialized else jax.process_count() > 1


def unlock(workdir: str) -> None:
    """Releases this process's lock on ``workdir``, if held (the process's end does it too)."""
    f = _held.pop(os.path.realpath(workdir), None)
    if f is not None:
        f.close()
