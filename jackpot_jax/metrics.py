"""Metrics: JSON lines (``WORKDIR/metrics.jsonl``) and TensorBoard scalars (``WORKDIR/tensorboard``).

Only process 0 writes. Each record is one epoch of one mode; numbers nested in
dicts (e.g. mask changes per layer) become TensorBoard tags joined by '/'.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax

from jackpot_jax import parallel

TENSORBOARD_DIR = 'tensorboard'


def to_python(tree: Any) -> Any:
    """Device arrays and numpy scalars -> plain Python numbers (JSON-ready)."""
    return jax.tree.map(lambda x: x.item() if x.ndim == 0 else x.tolist(), parallel.to_host(tree))


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

    def __init__(self, workdir: str, filename: str = 'metrics.jsonl'):
        self.path = os.path.join(workdir, filename)
        self._enabled = jax.process_index() == 0
        self._events = None
        if self._enabled:
            from tensorboard.summary.writer import (
                event_file_writer,
            )  # pylint: disable=g-import-not-at-top

            os.makedirs(workdir, exist_ok=True)
            self._events = event_file_writer.EventFileWriter(os.path.join(workdir, TENSORBOARD_DIR))

    def write(self, record: Mapping[str, Any]) -> None:
        """Writes one record; its 'step' (else 'epoch') is the TensorBoard step."""
        if not self._enabled:
            return
        from tensorboard.compat.proto import (
            event_pb2,
            summary_pb2,
        )  # pylint: disable=g-import-not-at-top

        record = to_python(dict(record))
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        values = _scalars(
            {k: v for k, v in record.items() if k not in ('mode', 'epoch', 'step')},
            f"{record.get('mode', 'metrics')}/",
        )
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in values.items()]
        )
        step = int(record.get('step', record.get('epoch', 0)))
        self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        self._events.flush()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """All records of a JSON-lines file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
