"""Where a search keeps its work: the workdir's checkpoints, its metrics file, and what a
resume must match (:class:`Persistence`); the stop after a non-finite loss.

After such a stop the checkpoints folder holds ``nan_stop.json``: the rerun may change
the learning rate (the one setting it may change), and resumes from the last good
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax

from jackpot_jax.engine import metrics
from jackpot_jax.io.workdir import CHECKPOINTS_DIR, METRICS_FILE

NAN_STOP_FILE = 'nan_stop.json'


@dataclasses.dataclass
class Persistence:
    """A workdir: checkpoints every ``every_steps`` and each epoch, resume, metrics file.

    ``identity`` is stored with every checkpoint; ``check_resumable(saved_meta,
    after_nan_stop)`` raises unless a checkpoint's meta matches this search's.
    """

    directory: str
    identity: dict[str, Any]
    check_resumable: Callable[[dict[str, Any], bool], None]
    every_steps: int = 0
    keep: int = 3
    mode: str = 'search'

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.directory, CHECKPOINTS_DIR)

    @property
    def metrics_file(self) -> str:
        return os.path.join(self.directory, METRICS_FILE)

    @property
    def nan_stop_file(self) -> str:
        return os.path.join(self.checkpoints, NAN_STOP_FILE)


def resume_differences(
    saved: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    relaxed: tuple[str, ...] = (),
) -> list[str]:
    """``'name: checkpoint X, now Y'`` for every setting that differs, but those in
    ``relaxed``; a setting only one side has is a difference too."""
    diffs = [
        f'{k}: checkpoint {saved[k]!r}, now {v!r}'
        for k, v in expected.items()
        if k in saved and saved[k] != v and k not in relaxed
    ]
    diffs += [f'{k}: not in the checkpoint, now {v!r}' for k, v in expected.items() if k not in saved]
    diffs += [f'{k}: only in the checkpoint' for k in saved if k not in expected]
    return sorted(diffs)


def nan_stop_error(error: FloatingPointError, ckpts, persistence) -> FloatingPointError:
    """The error of a diverged search, naming the checkpoint a rerun resumes from."""
    if ckpts is None:
        return FloatingPointError(
            f'{error}: the search stopped; lower learning_rate (or check the data) and run it again'
        )
    ckpts.wait()
    latest = ckpts.latest_step()
    if jax.process_index() == 0:
        os.makedirs(persistence.checkpoints, exist_ok=True)
        with open(persistence.nan_stop_file, 'w') as f:
            json.dump({'stopped_after_step': latest}, f)
    if latest is None:
        return FloatingPointError(
            f'{error}: the search stopped before its first checkpoint. Lower the learning rate '
            '(or check the data) and run it again: it starts over'
        )
    return FloatingPointError(
        f'{error}: the search stopped; the last good checkpoint is step {latest} in '
        f'{ckpts.directory}. Lower the learning rate (or check the data) and run the same '
        'search again with it: it resumes from that checkpoint, and the learning rate is the '
        'one setting that may change there'
    )


def truncate_records(path: str, mode: str, after_step: int) -> None:
    """Drops ``mode`` records written after ``after_step`` (by a run that then died)."""
    if jax.process_index() or not os.path.exists(path):
        return
    records = metrics.read_jsonl(path)
    kept = [r for r in records if r.get('mode') != mode or r.get('step', 0) <= after_step]
    if len(kept) != len(records):
        with open(path + '.tmp', 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in kept)
        os.replace(path + '.tmp', path)


def check_same_search(
    saved: Mapping[str, Any], after_nan_stop: bool, *, expected: Mapping[str, Any], directory: str
) -> None:
    """Raises unless a library search's checkpoint meta matches ``expected`` (its settings,
    counts, weights and first masks), naming what differs; after a non-finite stop the
    learning rate may change."""
    fingerprint = expected['weights_fingerprint']
    if saved.get('weights_fingerprint') != fingerprint:
        raise ValueError(
            f'the checkpoints in {directory} were written by a search over other weights '
            f"(fingerprint {str(saved.get('weights_fingerprint'))[:12]} != {fingerprint[:12]}); "
            'pass the variables that search started from, or use a new workdir'
        )
    relaxed = ('learning_rate',) if after_nan_stop else ()
    diffs = resume_differences(saved.get('settings', {}), expected['settings'], relaxed=relaxed)
    if saved.get('initial_masks') != expected['initial_masks']:
        diffs.append('initial_masks: other masks started the search in the checkpoints')
    if diffs or saved.get('counts') != expected['counts']:
        raise ValueError(
            f'the checkpoints in {directory} come from a search with other settings:\n  '
            + '\n  '.join(diffs or ['per-layer pruned counts differ'])
            + '\nrestore those settings to resume, or use a new workdir'
        )
