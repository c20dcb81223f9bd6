"""Training of weights: dense pre-training, and tuning the kept weights under a fixed mask.

Only used where weights are meant to change. The jackpot search itself never
trains a weight (see :mod:`jackpot_jax.search`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import optax

from jackpot_jax import adapters, search, sparsity


@flax.struct.dataclass
class TrainState:
    """Weight-training state as plain pytrees; ``masks`` (flat, bool) fix a sparse pattern."""

    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    masks: Mapping[str, jax.Array] | None = None


def init_train_state(
    params: Any,
    batch_stats: Any,
    optimizer: optax.GradientTransformation,
    masks: Mapping[str, jax.Array] | None = None,
) -> TrainState:
    """A fresh state; with masks, the params start masked (pruned weights exactly zero)."""
    if masks is not None:
        params = sparsity.masked_params(params, masks)
    return TrainState(params, batch_stats, optimizer.init(params), masks)


def train_step(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    label_smoothing: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on the weights. With ``state.masks``, pruned weights stay exactly zero."""
    masks = state.masks

    def loss_fn(params):
        if masks is not None:
            params = sparsity.masked_params(params, masks)
        forward = adapters.linen_forward(model, 'batch_stats')
        logits, batch_stats = forward(params, state.batch_stats, images, train=True)
        return search.cross_entropy(logits, labels, label_smoothing), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if masks is not None:
        params = sparsity.masked_params(params, masks)
    metrics = {'loss': loss, 'top1': (logits.argmax(-1) == labels).mean()}
    return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state), metrics


def make_train_step(**settings):
    """The jitted train step with the state donated. ``settings`` are train_step's keywords."""
    return jax.jit(functools.partial(train_step, **settings), donate_argnums=0)
