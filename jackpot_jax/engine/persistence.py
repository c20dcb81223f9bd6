"""What a search keeps in a workdir and what a resume must match (:class:`Persistence`);
the stop after a non-finite loss; which jackpot a search may write over.

A search's *identity* (:func:`search_identity`: its settings, per-layer counts, weights
and first masks) is stored with every checkpoint; a resume goes on only when the
checkpoint's identity is this search's (:meth:`Persistence.check_resumable`, the one check
for the library and the launcher). After a non-finite stop the checkpoints folder holds
``nan_stop.json``: the rerun may change the learning rate (the one setting it may
change), and resumes from the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jackpot_jax.engine import metrics
from jackpot_jax.io import checkpoint, workdir as workdir_lib


def search_identity(
    settings: Mapping[str, Any],
    counts: Mapping[str, int],
    weights_fingerprint: str,
    initial_masks: str | None = None,
    weights_path: str | None = None,
) -> dict[str, Any]:
    """What a resumed search must share with the one that wrote its checkpoints: the
    settings that decide the result (by name), the per-layer pruned counts, the weights'
    fingerprint and the first masks' (None: the plan's own); where the weights were read
    from is kept for the message only."""
    identity = {
        'settings': dict(settings),
        'counts': dict(counts),
        'weights_fingerprint': weights_fingerprint,
        'initial_masks': initial_masks,
    }
    if weights_path is not None:
        identity['weights_path'] = weights_path
    return identity


def start_fingerprint(masks: Any, scores: Any = None) -> str | None:
    """The first masks' fingerprint (None: the plan's own), and their first scores'."""
    prints = [checkpoint.weights_fingerprint(t) for t in (masks, scores) if t is not None]
    return ':'.join(prints) or None


@dataclasses.dataclass
class Persistence:
    """A workdir: checkpoints every ``every_steps`` and each epoch, resume, metrics file.

    ``identity`` (:func:`search_identity`) is stored with every checkpoint.
    ``weights_fix`` and ``elsewhere`` are the caller's words for the two ways out of a
    refused resume (other weights; another folder).
    """

    directory: str
    identity: dict[str, Any]
    every_steps: int = 0
    keep: int = 3
    mode: str = 'search'
    weights_fix: str = 'pass the variables that search started from'
    elsewhere: str = 'a new workdir'

    def check_resumable(self, saved: Mapping[str, Any], after_nan_stop: bool) -> None:
        """Raises ValueError unless a checkpoint's meta holds this search's identity,
        naming what differs; after a non-finite stop the learning rate may change."""
        expected = self.identity
        directory = workdir_lib.path(self.directory, workdir_lib.CHECKPOINTS_DIR)
        fingerprint = expected['weights_fingerprint']
        if saved.get('weights_fingerprint') != fingerprint:
            at = f" at {expected['weights_path']}" if 'weights_path' in expected else ''
            source = f"saved from {saved['weights_path']}, " if 'weights_path' in saved else ''
            raise ValueError(
                f'the weights{at} differ from those the search in {directory} started from: '
                f"other weights ({source}fingerprint {str(saved.get('weights_fingerprint'))[:12]}"
                f' != {fingerprint[:12]}); {self.weights_fix}, or use {self.elsewhere}'
            )
        saved_settings = saved.get('settings', {})
        relaxed = tuple(k for k in saved_settings if _is_learning_rate(k)) if after_nan_stop else ()
        diffs = resume_differences(saved_settings, expected['settings'], relaxed=relaxed)
        if saved.get('initial_masks') != expected['initial_masks']:
            diffs.append('initial_masks: other masks started the search in the checkpoints')
        if diffs or saved.get('counts') != expected['counts']:
            raise ValueError(
                f'the checkpoints in {directory} come from a search with other settings:\n  '
                + '\n  '.join(diffs or ['per-layer pruned counts differ'])
                + f'\nrestore those settings to resume, or use {self.elsewhere}'
            )


def _is_learning_rate(name: str) -> bool:
    """The score optimizer's learning rate, by its name in the library or the config."""
    return name.replace('/', '.').rsplit('.', 1)[-1] == 'learning_rate'


def resume_differences(
    saved: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    relaxed: tuple[str, ...] = (),
) -> list[str]:
    """``'name: checkpoint X, now Y'`` for every setting that differs, but those in
    ``relaxed``; a setting only one side has is a difference too. Names are shown dotted
    (the launcher stores ``search/sparsity`` for ``search.sparsity``)."""

    def shown(name: str) -> str:
        return name.replace('/', '.')

    diffs = [
        f'{shown(k)}: checkpoint {saved[k]!r}, now {v!r}'
        for k, v in expected.items()
        if k in saved and saved[k] != v and k not in relaxed
    ]
    diffs += [
        f'{shown(k)}: not in the checkpoint, now {v!r}'
        for k, v in expected.items()
        if k not in saved
    ]
    diffs += [f'{shown(k)}: only in the checkpoint' for k in saved if k not in expected]
    return sorted(diffs)


def nan_stop_error(error: FloatingPointError, ckpts: Any, directory: str) -> FloatingPointError:
    """The error of a diverged search in the workdir ``directory``, naming the checkpoint
    a rerun resumes from; leaves the marker that lets that rerun change its learning rate."""
    ckpts.wait()
    latest = ckpts.latest_step()
    if jax.process_index() == 0:
        marker = workdir_lib.nan_stop_path(directory)
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, 'w') as f:
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


def check_replaceable(path: str, masks: Mapping[str, Any] | None, overwrite: bool) -> None:
    """Refuses to replace a jackpot at ``path`` that holds other masks (``masks``; None: any
    jackpot) unless ``overwrite``: only the search's own result may be written again."""
    if overwrite or not os.path.exists(path):
        return
    if masks is not None:
        try:
            saved = checkpoint.read_jackpot_bundle(path)[1]
        except Exception:  # unreadable: not this search's
            saved = None
        if saved is not None and set(saved) == set(masks):
            if all(np.array_equal(np.asarray(saved[p]), np.asarray(masks[p])) for p in masks):
                return
    raise FileExistsError(
        f'{path} holds a jackpot this search did not find; pass overwrite=True to replace '
        'it, or use another workdir'
    )
