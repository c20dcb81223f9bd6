"""Metrics: per-epoch sums of step metrics (:class:`EpochMetrics`), written as JSON lines
(``WORKDIR/metrics.jsonl``) and TensorBoard scalars (``WORKDIR/tensorboard``); the one
progress bar of the steps (:func:`progress_bar`).

Only process 0 writes. Each record is one epoch of one mode; numbers nested in
dicts (e.g. mask changes per layer) become TensorBoard tags joined by '/'. A record's
``trace`` (``search.step_trace``) becomes per-step scalars tagged ``<mode>_step/<name>``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import auto as tqdm

from jackpot_jax.core import parallel
from jackpot_jax.io import workdir as workdir_lib
from jackpot_jax.io.workdir import METRICS_FILE, TENSORBOARD_DIR



def to_python(tree: Any) -> Any:
    """Device arrays and numpy scalars -> plain Python numbers (JSON-ready)."""
    return jax.tree.map(lambda x: x.item() if x.ndim == 0 else x.tolist(), parallel.to_host(tree))


def progress_bar(
    total: int, desc: str, batch_size: int = 0, initial: int = 0, enabled: bool = True
) -> tqdm.tqdm:
    """A progress bar of ``total`` steps from ``initial``, on process 0 only, counting
    images per second when the ``batch_size`` is known (0: steps per second)."""
    return tqdm.tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit='img' if batch_size else 'step',
        unit_scale=batch_size or 1,
        leave=False,
        disable=not enabled or jax.process_index() != 0,
    )


def count_examples(bar: tqdm.tqdm, inputs: Any) -> None:
    """Sets ``bar`` (counting steps) to count what a step's model ``inputs`` hold: tokens
    for a language model's integer ``[batch, positions]`` ids, else images (a batch of
    images) or examples."""
    leaves = jax.tree.leaves(inputs)
    if len(leaves) != 1 or not getattr(leaves[0], 'ndim', 0):
        return  # several inputs: steps
    x = leaves[0]
    tokens = np.issubdtype(x.dtype, np.integer) and x.ndim == 2
    if tokens:
        bar.unit, bar.unit_scale = 'tok', x.size
    else:
        bar.unit, bar.unit_scale = 'img' if x.ndim >= 3 else 'ex', x.shape[0]


def _scalars(record: Mapping[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            out.update(_scalars(value, f'{prefix}{key}/'))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = float(value)
    return out


class MetricWriter:
    """Appends records to ``WORKDIR/metrics.jsonl`` and to TensorBoard event files."""

    def __init__(self, workdir: str, filename: str = METRICS_FILE):
        self.path = workdir_lib.path(workdir, filename)
        self._enabled = jax.process_index() == 0
        self._events = None
        if self._enabled:
            os.makedirs(workdir, exist_ok=True)
            self._events = _EventFile(workdir_lib.path(workdir, TENSORBOARD_DIR))

    def write(self, record: Mapping[str, Any]) -> None:
        """Writes one record; its 'step' (else 'epoch') is the TensorBoard step."""
        if not self._enabled:
            return
        record = to_python(dict(record))
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        mode = record.get('mode', 'metrics')
        trace = record.get('trace') or {}
        for i, step in enumerate(trace.get('step', [])):  # per-step values, at their own steps
            per_step = {f'{mode}_step/{k}': float(v[i]) for k, v in trace.items() if k != 'step'}
            self._events.write_scalars(int(step), per_step)
        values = _scalars(
            {k: v for k, v in record.items() if k not in ('mode', 'epoch', 'step')}, f'{mode}/'
        )
        self._events.write_scalars(int(record.get('step', record.get('epoch', 0))), values)


class _EventFile:
    """A TensorBoard event file written with tensorboard's record writer and plain file I/O.

    (tensorboard's EventFileWriter opens files through TensorFlow, which is slow to
    import and cannot share a process with PyTorch.)
    """

    def __init__(self, logdir: str):
        from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
        from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top

        os.makedirs(logdir, exist_ok=True)
        name = f'events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}'
        self._file = open(os.path.join(logdir, name), 'wb')
        self._records = record_writer.RecordWriter(self._file)
        self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())
        self._file.flush()

    def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import (  # pylint: disable=g-import-not-at-top
            event_pb2,
            summary_pb2,
        )

        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in values.items()]
        )
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """All records of a JSON-lines file, such as ``WORKDIR/metrics.jsonl``.

    A run that dies while it writes a record leaves the file's last line cut short: that
    line is skipped with a warning naming the file. Records appended after such a line
    (a resumed run) start on the same line; the cut record is dropped there too, with a
    warning. Any other line that is not a JSON record raises ValueError naming the file
    and the line.
    """
    with open(path) as f:
        lines = f.read().split('\n')
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
            continue
        except json.JSONDecodeError as e:
            error = e
        record = _record_after_cut_one(line)
        if record is not None:
            logging.warning(
                '%s, line %d: dropped a record cut short (a run stopped while writing it) '
                'before the complete one appended to it',
                path,
                i + 1,
            )
        elif i == last:
            logging.warning(
                '%s: skipped its last line, a record cut short (a run stopped while writing '
                'it): %.80r',
                path,
                line,
            )
            continue
        else:
            raise ValueError(
                f'{path}, line {i + 1}: not a JSON record ({error}): {line[:80]!r}; delete '
                'that line (the file only holds metrics) and rerun'
            ) from None
        records.append(record)
    return records


def _record_after_cut_one(line: str) -> dict[str, Any] | None:
    """The complete record at the end of ``line`` when a record cut short precedes it
    (``{"mode": "sea{"mode": "search", ...}``), else None."""
    start = line.find('{', 1)
    while start > 0:
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            start = line.find('{', start + 1)
            continue
        return record if isinstance(record, dict) else None
    return None


class EpochMetrics:
    """Per-epoch sums of the step metrics, folded in step order (so a resumed run adds
    the same floats in the same order as an uninterrupted one). Device values are
    fetched lazily, at :meth:`flush`, to keep the steps asynchronous. The loss and every
    named task metric (e.g. ``top1``) are averaged over the steps; mask changes and
    flip-backs are summed. With ``trace=True`` the result also lists every step's loss,
    mask changes and flip-backs."""

    COUNTS = ('mask_changes', 'flip_backs')
    TRACED = ('loss', 'mask_changes', 'flip_backs')
    # Step metrics that are neither averaged nor summed.
    _NOT_AVERAGED = ('swap_rate', 'scores_finite')

    def __init__(self, sums: dict[str, Any] | None = None, trace: bool = False):
        self.sums = dict(sums or {})
        if 'loss' in self.sums:  # sums saved before the task metrics were grouped
            self.sums['means'] = {k: self.sums.pop(k) for k in ('loss', 'top1') if k in self.sums}
        self.trace = trace
        self._pending: list[tuple[int, Any]] = []

    def add(self, step: int, metrics: Any) -> None:
        self._pending.append((step, metrics))

    def flush(self) -> None:
        """Folds pending metrics in; raises FloatingPointError at the first non-finite loss
        or (in a search) the first step that leaves a score non-finite."""
        for step, metrics in zip(
            [s for s, _ in self._pending], to_python([m for _, m in self._pending])
        ):
            if not np.isfinite(metrics['loss']):
                raise FloatingPointError(f'the loss is {metrics["loss"]} at step {step}')
            if not metrics.get('scores_finite', True):
                raise FloatingPointError(f'scores became inf or NaN at step {step}')
            self.sums['steps'] = self.sums.get('steps', 0) + 1
            means = self.sums.setdefault('means', {})
            for key, value in metrics.items():
                if key in self.COUNTS:
                    self.sums[key] = self.sums.get(key, 0) + value
                    per_layer = self.sums.setdefault(key + '_per_layer', {})
                    for path, n in metrics[key + '_per_layer'].items():
                        per_layer[path] = per_layer.get(path, 0) + n
                elif key == 'swap_rate':
                    self.sums['swap_rate'] = value
                elif key not in self._NOT_AVERAGED and not key.endswith('_per_layer'):
                    means[key] = means.get(key, 0.0) + value
            if self.trace:
                trace = self.sums.setdefault('trace', {'step': [], **{k: [] for k in self.TRACED}})
                trace['step'].append(step)
                for key in self.TRACED:
                    trace[key].append(metrics[key])
        self._pending = []

    def result(self) -> dict[str, Any]:
        """The epoch's record: means of the loss and task metrics over the training
        batches (``train_loss``, ``train_top1``, ...), and the summed counts."""
        self.flush()
        out = {k: v for k, v in self.sums.items() if k not in ('steps', 'means')}
        out.update({f'train_{k}': v / self.sums['steps'] for k, v in self.sums['means'].items()})
        return out
