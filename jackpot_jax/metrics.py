"""Metrics written as JSON lines (one object per record) in the workdir."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax

from jackpot_jax import parallel


def to_python(tree: Any) -> Any:
    """Device arrays and numpy scalars -> plain Python numbers (JSON-ready)."""
    return jax.tree.map(lambda x: x.item() if x.ndim == 0 else x.tolist(), parallel.to_host(tree))


class JsonlWriter:
    """Appends records to ``WORKDIR/metrics.jsonl``; only process 0 writes."""

    def __init__(self, workdir: str, filename: str = 'metrics.jsonl'):
        self.path = os.path.join(workdir, filename)
        self._enabled = jax.process_index() == 0
        if self._enabled:
            os.makedirs(workdir, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        if self._enabled:
            with open(self.path, 'a') as f:
                f.write(json.dumps(to_python(dict(record))) + '\n')


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """All records of a JSON-lines file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
