"""Every orbax call of jackpot_jax lives here.

Two kinds of checkpoint, stored separately so the weights are written once:
  * weights: frozen params + batch statistics + JSON meta (what model, which data);
  * jackpots: scores + masks + the searched batch statistics + JSON meta.
Orbax writes into a temporary folder and renames it when complete, so a crash
mid-save never leaves a checkpoint that looks whole.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from jackpot_jax import sparsity


def _save(path: str, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    items = {name: ocp.args.StandardSave(dict(tree)) for name, tree in arrays.items()}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            os.path.abspath(path),
            force=True,
            args=ocp.args.Composite(meta=ocp.args.JsonSave(dict(meta)), **items),
        )


def _restore(
    path: str, names: tuple[str, ...], what: str, sharding: jax.sharding.Sharding | None = None
) -> dict[str, Any]:
    """Restores the named array items and ``meta`` onto ``sharding`` (default: one local device).

    Restoring against a target built from the saved shapes makes checkpoints
    independent of the device layout that wrote them.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f'no {what} checkpoint at {path}; check the path, or create it first '
            "(mode 'pretrain' writes weights, mode 'search' writes a jackpot)"
        )
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    handlers = {name: ocp.StandardCheckpointHandler() for name in names}
    with ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(meta=ocp.JsonCheckpointHandler(), **handlers)
    ) as checkpointer:
        saved = checkpointer.metadata(path).item_metadata
        items = {}
        for name in names:
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved[name]
            )
            items[name] = ocp.args.StandardRestore(target)
        return checkpointer.restore(
            path, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items)
        )


def save_weights(path: str, params: Mapping, batch_stats: Mapping, meta: Mapping[str, Any]) -> None:
    """Writes dense weights (the frozen starting point of a search)."""
    _save(path, {'params': params, 'batch_stats': batch_stats}, meta)


def load_weights(path: str) -> tuple[dict, dict, dict[str, Any]]:
    """Reads ``(params, batch_stats, meta)`` written by :func:`save_weights`."""
    restored = _restore(path, ('params', 'batch_stats'), 'weights')
    return restored['params'], restored['batch_stats'], restored['meta']


def save_jackpot(
    path: str, scores: Mapping, masks: Mapping, batch_stats: Mapping, meta: Mapping[str, Any]
) -> None:
    """Writes a found jackpot: flat scores and masks, and the searched batch statistics."""
    _save(
        path,
        {
            'scores': sparsity.unflatten(scores),
            'masks': sparsity.unflatten(masks),
            'batch_stats': batch_stats,
        },
        meta,
    )


def load_jackpot(path: str) -> tuple[dict, dict, dict, dict[str, Any]]:
    """Reads ``(scores, masks, batch_stats, meta)`` written by :func:`save_jackpot`."""
    restored = _restore(path, ('scores', 'masks', 'batch_stats'), 'jackpot')
    return (
        sparsity.flatten(restored['scores']),
        sparsity.flatten(restored['masks']),
        restored['batch_stats'],
        restored['meta'],
    )
