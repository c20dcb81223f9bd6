"""A workdir: what it holds and where (every path inside it is made here), what may be
replaced, checked before any work, and the lock held while a run writes into it.

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
TENSORBOARD_DIR = 'tensorboard'  # the same records as TensorBoard scalars
NAN_STOP_FILE = 'nan_stop.json'  # in checkpoints/: the search stopped on a non-finite loss
SUMMARY_FILE = 'summary.json'  # the demo's table
LAYER_SPARSITY_PNG = 'layer_sparsity.png'
MASK_CHANGES_PNG = 'mask_changes.png'
LOCK_FILE = '.lock'
_held: dict[str, IO[str]] = {}  # real path of a workdir -> its open, locked lock file


class WorkdirLocked(UserError):
    """Another process holds the workdir's lock."""


def path(workdir: str, name: str) -> str:
    """``WORKDIR/name``: a file or folder a run writes at the workdir's top (one of the
    names above, or a study's own)."""
    return os.path.join(workdir, name)


def pretrained_path(workdir: str, given: str = '') -> str:
    """The dense weights a search starts from: ``given`` (config.pretrained), else
    WORKDIR/pretrained."""
    return given or path(workdir, PRETRAINED_DIR)


def jackpot_path(workdir: str, given: str = '') -> str:
    """The jackpot folder: ``given`` (config.jackpot), else WORKDIR/jackpot."""
    return given or path(workdir, JACKPOT_DIR)


def nan_stop_path(workdir: str) -> str:
    """The marker a search stopped on a non-finite loss leaves beside its checkpoints."""
    return os.path.join(path(workdir, CHECKPOINTS_DIR), NAN_STOP_FILE)


def has_search_checkpoints(workdir: str) -> bool:
    """Whether ``WORKDIR/checkpoints`` holds a complete search checkpoint (a step folder)."""
    folder = path(workdir, CHECKPOINTS_DIR)
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def check_search_outputs(
    workdir: str, jackpot: str = '', *, tunes: bool = False, overwrite: bool = False
) -> None:
    """Refuses, before a search starts, to write its jackpot (``jackpot``: config.jackpot)
    outside its workdir, or over a jackpot (or tuned weights, if it ``tunes``) of an
    earlier search it would not resume.

    A search in a workdir with search checkpoints resumes them, and its jackpot replaces
    the one they made. ``overwrite`` allows both. Raises UserError naming the path and
    the fix.
    """
    if overwrite:
        return
    given, own = jackpot_path(workdir, jackpot), path(workdir, JACKPOT_DIR)
    if os.path.realpath(given) != os.path.realpath(own):
        there = ', replacing the jackpot there' if os.path.exists(given) else ''
        raise UserError(
            f'config.jackpot={jackpot!r} lies outside --workdir={workdir}, and a search '
            f'writes its jackpot in its own workdir ({own}): leave config.jackpot empty, or '
            f'pass --config.overwrite=true to write it to {given}{there}'
        )
    if has_search_checkpoints(workdir):
        return
    outputs = [own] + ([path(workdir, TUNED_DIR)] if tunes else [])
    present = [p for p in outputs if os.path.exists(p)]
    if present:
        raise UserError(
            f'{" and ".join(present)} already exist{"s" if len(present) == 1 else ""}, and '
            f'{path(workdir, CHECKPOINTS_DIR)} holds no search to resume, so a new '
            'search would replace them: search into another --workdir, or pass '
            '--config.overwrite=true to replace them'
        )


def check_pretrain_output(workdir: str, pretrained: str = '', overwrite: bool = False) -> None:
    """Refuses, before any training, to replace pre-trained weights (``overwrite`` allows
    it), naming what the workdir made from them."""
    weights = pretrained_path(workdir, pretrained)
    if overwrite or not os.path.exists(weights):
        return
    made = [
        path(workdir, name)
        for name in (JACKPOT_DIR, CHECKPOINTS_DIR, TUNED_DIR, MASKED_WEIGHTS_DIR)
        if os.path.exists(path(workdir, name))
    ]
    orphaned = (
        f'; {", ".join(made)} {"was" if len(made) == 1 else "were"} made from them and '
        'would be orphaned'
        if made
        else ''
    )
    raise UserError(
        f'{weights} already holds pre-trained weights{orphaned}: pretrain into another '
        '--workdir (or --config.pretrained=NEW_FOLDER), or pass --config.overwrite=true to '
        'replace them'
    )


def check_new_output(target: str, what: str, overwrite: bool = False) -> None:
    """Refuses to replace ``what`` at ``target`` unless ``overwrite``."""
    if os.path.exists(target) and not overwrite:
        raise UserError(
            f'{target} already holds {what}: move it elsewhere first, or pass '
            '--config.overwrite=true to replace it'
        )


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
        with open(path(workdir, LOCK_FILE)) as f:
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
    lock_file = path(workdir, LOCK_FILE)
    f = open(lock_file, 'a+')  # pylint: disable=consider-using-with  (held until exit)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise WorkdirLocked(
            f'workdir {workdir} is in use by {holder(workdir)} (lock {lock_file}); wait for that '
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
