"""Evaluation and statistics re-estimation over batches, for any model and any task.

:func:`evaluate_metrics` runs a forward in eval mode over batches (each example once)
and averages the task's metrics: the one evaluation loop, under the library, the search
and every mode of the launcher; :func:`evaluate` is one of those metrics, as a number.
:func:`reestimate_statistics` re-estimates a model's
statistics (BatchNorm running averages) under fixed masked params. A batch is a tuple
``(inputs, labels[, valid])`` or a dict (see :func:`jackpot_jax.core.step.batch_inputs`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jackpot_jax.core import adapters, parallel, step

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


@functools.partial(jax.jit, static_argnames='forward')
def _classification_sums(forward, params, statistics, inputs, labels, valid):
    """Correct top-1 / top-5 predictions, the summed cross-entropy and the count over the
    valid examples of a batch (labels ``[B, T]`` count tokens, ``valid [B]`` covering every
    token of its example), and whether every output is finite."""
    logits = forward(params, statistics, inputs, train=False)[0]
    valid = jnp.broadcast_to(valid.reshape(valid.shape + (1,) * (labels.ndim - 1)), labels.shape)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hit1 = (top5[..., 0] == labels) & valid
    hit5 = jnp.any(top5 == labels[..., None], axis=-1) & valid
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    sums = {
        'top1': jnp.sum(hit1),
        'top5': jnp.sum(hit5),
        'loss': jnp.sum(jnp.where(valid, losses, 0.0)),
    }
    return sums, jnp.sum(valid), jnp.all(jnp.isfinite(logits))


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _batch_valid(batch: Batch, size: int) -> np.ndarray:
    """The batch's example mask: a tuple's third item or a dict's 'valid' (default: all)."""
    if isinstance(batch, Mapping):
        valid = batch.get('valid')
    else:
        valid = batch[2] if len(batch) > 2 else None
    return np.ones(size, bool) if valid is None else np.asarray(valid, bool)


def _batch_sums(forward, params, statistics, batch, loss_fn, inputs_fn, mesh):
    """``(values, count, finite)`` of one batch, on the devices (nothing waits for them):
    sums over its valid examples, or a ``loss_fn``'s means over its ``count`` examples."""
    if loss_fn is None:
        labels = np.asarray(step.batch_labels(batch))
        arrays = (inputs_fn(batch), labels, _batch_valid(batch, len(labels)))
        if mesh is not None:
            arrays = parallel.place_batch(arrays, mesh)
        return _classification_sums(forward, params, statistics, *arrays)
    if mesh is not None:
        batch = parallel.place_batch(batch, mesh)
    inputs = inputs_fn(batch)
    outputs = eval_outputs(forward, params, statistics, inputs)
    loss, named = loss_fn(outputs, batch)
    return {'loss': loss, **named}, np.shape(jax.tree.leaves(inputs)[0])[0], _all_finite(outputs)


def evaluate_metrics(
    forward: adapters.Forward,
    params: Any,
    statistics: Any,
    batches: Iterable[Batch],
    *,
    loss_fn: step.LossFn | None = None,
    inputs_fn: Callable[[Batch], Any] = step.batch_inputs,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, float]:
    """Metrics in eval mode over the batches, each example once, and their ``examples``:
    the one evaluation of the library and the launcher.

    Default (classification, integer labels): ``top1`` and ``top5`` (fractions), the mean
    cross-entropy ``loss`` (nats) and ``perplexity`` = exp(loss), over the valid examples
    (a tuple's third item or a dict's ``'valid'`` marks padding); labels ``[B, T]`` (a
    language model's next tokens) count tokens. With ``loss_fn``: its loss and named
    metrics, averaged over the examples (batches weighted by their size). ``mesh``: each
    batch (this process's share of it) is split over the mesh's devices first. Non-finite
    model outputs raise FloatingPointError naming the batch.
    """
    per_batch = [
        _batch_sums(forward, params, statistics, batch, loss_fn, inputs_fn, mesh)
        for batch in batches
    ]
    per_batch = parallel.to_host(per_batch)  # one wait, after every batch is dispatched
    sums: dict[str, float] = {}
    total = 0
    for index, (values, count, finite) in enumerate(per_batch):
        if not finite:
            raise FloatingPointError(
                f'the model gave inf or NaN outputs on evaluation batch {index}; check that '
                'batch for inf or NaN inputs (or the weights for non-finite values)'
            )
        weight = 1 if loss_fn is None else int(count)  # a loss_fn gives means per batch
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + float(value) * weight
        total += int(count)
    if not total:
        raise ValueError('evaluate got no examples; pass a non-empty iterable of batches')
    result = {**{k: v / total for k, v in sums.items()}, 'examples': total}
    if loss_fn is None:
        result['perplexity'] = math.exp(min(result['loss'], 700.0))  # no overflow
    return result


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
