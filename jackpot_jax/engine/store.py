"""Where a search keeps its work between epochs: in memory, or in a workdir.

The loop (:mod:`jackpot_jax.engine.loop`) talks to one small interface and never asks
whether there is a workdir. :class:`MemoryStore` holds, as host copies, the jackpots the
selection rule may still choose; :class:`WorkdirStore` writes resumable checkpoints
(every ``every_steps`` steps and each epoch), resumes from the latest one after checking
it belongs to this search, appends the epoch records to ``metrics.jsonl`` and, after a
non-finite stop, leaves the marker that lets the rerun change its learning rate.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from jackpot_jax.core import parallel, step
from jackpot_jax.core.settings import SearchSettings
from jackpot_jax.engine import epoch_choice, metrics, persistence as persistence_lib
from jackpot_jax.engine.persistence import Persistence
from jackpot_jax.io import checkpoint, workdir as workdir_lib

# (masks, scores, statistics) of one epoch's jackpot.
Jackpot = tuple[Any, Any, Any]


@dataclasses.dataclass
class Resumed:
    """What a search continues from: its epoch records, the running epoch's metric sums,
    and the search time of the runs before."""

    history: list[dict[str, Any]]
    epoch_metrics: metrics.EpochMetrics
    seconds: float


def host_copies(tree: Any) -> Any:
    """Host copies of a tree's arrays (the next step donates the state's buffers); PRNG
    keys (NNX RNG state) stay device copies."""

    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jnp.array(x)
        return parallel.to_host(x)

    return jax.tree.map(one, tree)


class MemoryStore:
    """No workdir: nothing is written; the jackpots of the epochs the rule may still keep
    are held as host copies until the search ends."""

    def __init__(self, settings: SearchSettings, split: str | None):
        self._settings, self._split = settings, split
        self._snapshots: dict[int, Jackpot] = {}

    def resume(self, state: step.SearchState, trace: bool) -> tuple[step.SearchState, Resumed]:
        return state, Resumed([], metrics.EpochMetrics(trace=trace), 0.0)

    def write(self, record: dict[str, Any]) -> None:
        """No metrics file."""

    def checkpoint_due(self, global_step: int) -> bool:
        return False

    def save(self, state: step.SearchState, history: list, epoch_metrics, seconds: float) -> None:
        """Nothing to write mid-epoch."""

    def end_epoch(self, state, history, epoch_metrics, seconds, statistics) -> None:
        """Keeps this epoch's jackpot if the rule may choose it; forgets those it no longer
        can."""
        s, epoch = self._settings, history[-1]['epoch']
        if s.selection_rule == 'last' and epoch != s.epochs:
            return
        self._snapshots[epoch] = host_copies((state.masks, state.scores, statistics))
        keep = epoch_choice.candidates(history, self._split, s)
        self._snapshots = {e: j for e, j in self._snapshots.items() if e in keep}

    def available(self, history: list) -> set[int]:
        return set(self._snapshots)

    def jackpot(self, record, state, statistics_of: Callable[[Any], Any]) -> Jackpot:
        return self._snapshots[record['epoch']]

    def where_to_resume(self) -> str:
        return 'nothing was saved (pass a workdir to make a search resumable)'

    def stop_error(self, error: FloatingPointError) -> FloatingPointError:
        return FloatingPointError(
            f'{error}: the search stopped; lower learning_rate (or check the data) and run it again'
        )

    def close(self) -> None:
        """Nothing to close."""


class WorkdirStore:
    """A workdir: resumable checkpoints, the metrics file, the non-finite stop's marker."""

    def __init__(self, persistence: Persistence, settings: SearchSettings, split: str | None):
        self._p, self._settings, self._split = persistence, settings, split
        self._ckpts = checkpoint.SearchCheckpoints(
            workdir_lib.path(persistence.directory, workdir_lib.CHECKPOINTS_DIR), persistence.keep
        )
        self._writer: metrics.MetricWriter | None = None
        self._nan_marker: str | None = None  # the non-finite stop's, until a checkpoint

    def resume(self, state: step.SearchState, trace: bool) -> tuple[step.SearchState, Resumed]:
        """The workdir's latest checkpoint, checked to be this search's, else ``state``."""
        resumed = Resumed([], metrics.EpochMetrics(trace=trace), 0.0)
        latest = self._ckpts.latest_step()
        marker = workdir_lib.nan_stop_path(self._p.directory)
        after_nan = os.path.exists(marker)
        if latest is not None:
            self._p.check_resumable(self._ckpts.read_meta(latest), after_nan)
            state, meta = self._ckpts.restore(latest, like=state)
            resumed = Resumed(
                meta['history'],
                metrics.EpochMetrics(meta['epoch_sums'], trace=trace),
                meta.get('search_seconds', 0.0),
            )
            logging.info('resuming the search from step %d of %s', latest, self._ckpts.directory)
        # The marker goes once a checkpoint of this run (at its learning rate) is on disk
        # (save): until then the advised rerun must still be accepted.
        self._nan_marker = marker if after_nan else None
        start = int(parallel.to_host(state.step))
        metrics_file = workdir_lib.path(self._p.directory, workdir_lib.METRICS_FILE)
        persistence_lib.truncate_records(metrics_file, self._p.mode, start)
        self._writer = metrics.MetricWriter(self._p.directory)
        return state, resumed

    def write(self, record: dict[str, Any]) -> None:
        self._writer.write(record)

    def checkpoint_due(self, global_step: int) -> bool:
        every = self._p.every_steps
        return bool(every) and global_step % every == 0

    def save(self, state, history, epoch_metrics, seconds: float) -> None:
        """Writes a checkpoint of ``state`` with the records so far, keeping those of the
        epochs the rule may still choose."""
        epoch_metrics.flush()
        # Copies: orbax writes the meta in the background while the loop adds to these.
        meta = copy.deepcopy({'history': history, 'epoch_sums': epoch_metrics.sums})
        meta['search_seconds'] = seconds
        epochs = epoch_choice.candidates(history, self._split, self._settings)
        preserve = [r['step'] for r in history if r['epoch'] in epochs]
        self._ckpts.save(state, {**self._p.identity, **meta}, preserve)
        if self._nan_marker is not None:
            self._ckpts.wait()  # safely on disk before the marker it replaces goes
            if jax.process_index() == 0 and os.path.exists(self._nan_marker):
                os.remove(self._nan_marker)
            self._nan_marker = None

    def end_epoch(self, state, history, epoch_metrics, seconds, statistics) -> None:
        self.save(state, history, epoch_metrics, seconds)

    def available(self, history: list) -> set[int]:
        self._ckpts.wait()
        saved = set(self._ckpts.steps())
        return {r['epoch'] for r in history if r['step'] in saved}

    def jackpot(self, record, state, statistics_of: Callable[[Any], Any]) -> Jackpot:
        """The epoch's jackpot: the last state's, or restored from its checkpoint."""
        if record['step'] != int(parallel.to_host(state.step)):
            state, _ = self._ckpts.restore(record['step'], like=state)
        return state.masks, state.scores, statistics_of(state)

    def where_to_resume(self) -> str:
        self._ckpts.wait()
        latest = self._ckpts.latest_step()
        if latest is None:
            return (
                f'no checkpoint was written yet in {self._ckpts.directory}; running the same '
                'search again starts it over'
            )
        return (
            f'the last checkpoint is step {latest} in {self._ckpts.directory}; run the same '
            'search again to resume from it'
        )

    def stop_error(self, error: FloatingPointError) -> FloatingPointError:
        return persistence_lib.nan_stop_error(error, self._ckpts, self._p.directory)

    def close(self) -> None:
        self._ckpts.wait()
        self._ckpts.close()


def open_store(
    persistence: Persistence | None, settings: SearchSettings, split: str | None
) -> MemoryStore | WorkdirStore:
    """The store of a search: its workdir's, or memory when there is none."""
    if persistence is None:
        return MemoryStore(settings, split)
    return WorkdirStore(persistence, settings, split)
