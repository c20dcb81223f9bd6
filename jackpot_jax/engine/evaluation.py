"""Evaluation and statistics re-estimation over batches, for any model and any task.

:func:`evaluate_metrics` runs a forward in eval mode over batches (each example once)
and averages the task's metrics; :func:`reestimate_statistics` re-estimates a model's
statistics (BatchNorm running averages) under fixed masked params. A batch is a tuple
``(inputs, labels[, valid])`` or a dict (see :func:`jackpot_jax.core.step.batch_inputs`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jackpot_jax.core import adapters, step

Batch = Any


@functools.partial(jax.jit, static_argnames='forward')
def train_mode_statistics(forward, params, statistics, inputs, rng):
    return forward(params, statistics, inputs, train=True, rng=rng)[1]


def reestimate_statistics(
    forward: adapters.Forward,
    params: Any,
    statistics: Any,
    batches: Iterable[Batch] | Callable[[int], Iterable[Batch]],
    steps: int,
    *,
    steps_per_epoch: int | None = None,
    rng: jax.Array | int = 0,
    inputs_fn: Callable[[Batch], Any] = step.batch_inputs,
) -> Any:
    """The model's statistics (BatchNorm running averages) re-estimated under fixed params.

    ``steps`` train-mode forward passes over the first training batches (epoch 0, then
    1, ...; ``steps_per_epoch`` of each), starting from ``statistics`` with the model's
    own running-average update; no gradient, params unchanged. Statistics measured while
    the masks were still moving describe none of them; these describe the final masks.
    """
    if not steps or not jax.tree.leaves(statistics):  # nothing to re-estimate
        return statistics
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    stream = itertools.islice(epochs_of(batches, steps_per_epoch), steps)
    for i, batch in enumerate(stream):
        inputs = jax.tree.map(jnp.asarray, inputs_fn(batch))
        statistics = train_mode_statistics(
            forward, params, statistics, inputs, jax.random.fold_in(key, i)
        )
    return statistics


def batches_of_epoch(batches: Any, epoch: int) -> Iterator[Batch]:
    """The batches of one epoch: ``batches(epoch)`` for a callable, else ``batches``."""
    return iter(batches(epoch) if callable(batches) else batches)


def epochs_of(batches: Any, steps_per_epoch: int | None) -> Iterator[Batch]:
    """The training batches of epoch 0, 1, 2, ... one after the other."""
    for epoch in itertools.count():
        count = 0
        for count, batch in enumerate(
            itertools.islice(batches_of_epoch(batches, epoch), steps_per_epoch), 1
        ):
            yield batch
        if not count:
            raise ValueError(
                f'the training batches of epoch {epoch} are empty; pass a re-iterable (a list) or '
                'a callable epoch -> batches'
            )


@functools.partial(jax.jit, static_argnames='forward')
def eval_outputs(forward, params, statistics, inputs):
    return forward(params, statistics, inputs, train=False)[0]


@jax.jit
def _classification_sums(logits, labels, valid):
    hits = (jnp.argmax(logits, -1) == labels) & valid
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(hits), jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid)


def _batch_valid(batch: Batch, size: int) -> np.ndarray:
    """The batch's example mask: a tuple's third item or a dict's 'valid' (default: all)."""
    if isinstance(batch, Mapping):
        valid = batch.get('valid')
    else:
        valid = batch[2] if len(batch) > 2 else None
    return np.ones(size, bool) if valid is None else np.asarray(valid, bool)


def evaluate_metrics(
    forward: adapters.Forward,
    params: Any,
    statistics: Any,
    batches: Iterable[Batch],
    *,
    loss_fn: step.LossFn | None = None,
    inputs_fn: Callable[[Batch], Any] = step.batch_inputs,
) -> dict[str, float]:
    """Metrics in eval mode over the batches, each example once, and their ``examples``.

    Default (classification): ``top1`` and the mean cross-entropy ``loss`` over the valid
    examples (a tuple's third item or a dict's ``'valid'`` marks padding). With
    ``loss_fn``: its loss and named metrics, averaged over the examples (batches weighted
    by their size). Non-finite model outputs raise FloatingPointError.
    """
    sums: dict[str, float] = {}
    total = 0
    for index, batch in enumerate(batches):
        inputs = inputs_fn(batch)
        outputs = eval_outputs(forward, params, statistics, inputs)
        if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(outputs)):
            raise FloatingPointError(
                f'the model gave inf or NaN outputs on evaluation batch {index}; check that '
                'batch for inf or NaN inputs (or the weights for non-finite values)'
            )
        if loss_fn is None:
            labels = np.asarray(step.batch_labels(batch))
            valid = _batch_valid(batch, len(labels))
            correct, loss, count = jax.device_get(_classification_sums(outputs, labels, valid))
            values, size = {'top1': float(correct), 'loss': float(loss)}, int(count)
        else:
            loss, named = jax.device_get(loss_fn(outputs, batch))
            size = int(np.shape(jax.tree.leaves(inputs)[0])[0])
            values = {k: float(v) * size for k, v in {'loss': loss, **named}.items()}
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
        total += size
    if not total:
        raise ValueError('evaluate got no examples; pass a non-empty iterable of batches')
    return {**{k: v / total for k, v in sums.items()}, 'examples': total}


def evaluate(
    forward: adapters.Forward,
    params: Any,
    statistics: Any,
    batches: Iterable[Batch],
    *,
    metric: str = 'top1',
    loss_fn: step.LossFn | None = None,
    inputs_fn: Callable[[Batch], Any] = step.batch_inputs,
) -> float:
    """One metric of :func:`evaluate_metrics` (default: top-1 accuracy)."""
    result = evaluate_metrics(
        forward, params, statistics, batches, loss_fn=loss_fn, inputs_fn=inputs_fn
    )
    if metric not in result:
        raise ValueError(f'unknown metric {metric!r}; the evaluation gives {sorted(result)}')
    return result[metric]
