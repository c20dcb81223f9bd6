"""Training of weights: dense pre-training, and tuning the kept weights under a fixed mask.

The only place where weights change; the jackpot search never trains a weight (see
:mod:`jackpot_jax.core.step`). :func:`train_step` is the jitted step, :func:`train_weights`
the epoch loop, and :func:`run_pretrain` / :func:`run_tune` the launcher's modes.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from jackpot_jax.core import adapters, parallel, sparsity, step
from jackpot_jax.engine.metrics import EpochMetrics, MetricWriter, progress_bar
from jackpot_jax.io import checkpoint, workdir as workdir_lib
from jackpot_jax.io.workdir import TUNED_DIR
from jackpot_jax.core.errors import UserError
from jackpot_jax.launch import run_context as rc


@flax.struct.dataclass
class TrainState:
    """Weight-training state as plain pytrees; ``masks`` (flat, bool) fix a sparse pattern."""

    params: Any
    statistics: Any
    opt_state: optax.OptState
    masks: Mapping[str, jax.Array] | None = None


def init_train_state(
    params: Any,
    statistics: Any,
    optimizer: optax.GradientTransformation,
    masks: Mapping[str, jax.Array] | None = None,
) -> TrainState:
    """A fresh state; with masks, the params start masked (pruned weights exactly zero)."""
    if masks is not None:
        params = sparsity.masked_params(params, masks)
    return TrainState(params, statistics, optimizer.init(params), masks)


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
        logits, statistics = forward(params, state.statistics, images, train=True)
        return step.cross_entropy(logits, labels, label_smoothing), (logits, statistics)

    (loss, (logits, statistics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if masks is not None:
        params = sparsity.masked_params(params, masks)
    metrics = {'loss': loss, 'top1': (logits.argmax(-1) == labels).mean()}
    return state.replace(params=params, statistics=statistics, opt_state=opt_state), metrics


def make_train_step(**settings):
    """The jitted train step with the state donated. ``settings`` are train_step's keywords."""
    return jax.jit(functools.partial(train_step, **settings), donate_argnums=0)


# ----------------------------------------------------------------------------
# The epoch loop and the modes.
# ----------------------------------------------------------------------------
def train_weights(
    setup: rc.Setup,
    cfg: ml_collections.ConfigDict,
    params: Any,
    statistics: Any,
    masks: dict | None,
    mode: str,
    writer: MetricWriter,
) -> tuple[TrainState, dict[str, float]]:
    """``cfg.epochs`` epochs of SGD on the weights (under ``masks`` if given); test accuracy."""
    steps = setup.steps_per_epoch(cfg.batch_size)
    optimizer = step.sgd_optimizer(
        cfg.learning_rate, cfg.weight_decay, cfg.momentum, cfg.epochs, steps
    )
    state = parallel.replicate(init_train_state(params, statistics, optimizer, masks), setup.mesh)
    step_fn = make_train_step(
        model=setup.model, optimizer=optimizer, label_smoothing=cfg.label_smoothing
    )
    with progress_bar(cfg.epochs * steps, mode, cfg.batch_size) as bar:
        for epoch in range(cfg.epochs):
            epoch_metrics = EpochMetrics()
            # The steps never wait on the host: metrics are fetched at the epoch's end.
            with jax.transfer_guard_device_to_host('disallow'):
                for i, batch in enumerate(setup.train_epoch(cfg.batch_size, epoch)):
                    state, metrics = step_fn(state, *batch)
                    epoch_metrics.add(epoch * steps + i + 1, metrics)
                    bar.update()
            record = {
                'mode': mode,
                'epoch': epoch + 1,
                'step': (epoch + 1) * steps,
                'learning_rate': float(step.epoch_cosine(cfg.learning_rate, cfg.epochs, 1)(epoch)),
                **epoch_metrics.result(),
            }
            writer.write(record)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}")
    result = setup.split_metrics(state.params, state.statistics)
    writer.write(
        {
            'mode': mode,
            'epoch': cfg.epochs,
            # test_top1, test_top5; a language model's also test_loss, test_perplexity.
            **{f'test_{name}': value for name, value in result.items()},
        }
    )
    logging.info('%s: test %s', mode, ', '.join(f'{k} {v:.4f}' for k, v in result.items()))
    return state, result


def initial_variables(setup: rc.Setup, seed: int) -> dict:
    """The config's model at initialisation: ``{'params': ..., 'batch_stats': ...}``."""
    sample = jnp.zeros((1, *setup.source.image_shape), jnp.float32)
    return jax.jit(functools.partial(setup.model.init, train=False))(jax.random.key(seed), sample)


def run_pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains the dense model and saves it as the frozen starting point of searches.

    Refuses, before any training, to replace weights already there unless
    ``config.overwrite`` (:func:`jackpot_jax.io.workdir.check_pretrain_output`).
    """
    workdir_lib.check_pretrain_output(workdir, config.pretrained, config.overwrite)
    setup = rc.Setup(config)
    variables = initial_variables(setup, config.seed)
    state, result = train_weights(
        setup,
        config.pretrain,
        variables['params'],
        variables.get('batch_stats', {}),  # {} for a model without BatchNorm
        None,
        'pretrain',
        MetricWriter(workdir),
    )
    meta = {
        'model': config.model.to_dict(),
        'num_classes': setup.source.num_classes,
        'source': f'pretrain on {config.data.name}',
        'test_top1': result['top1'],
    }
    checkpoint.save_weights(
        workdir_lib.pretrained_path(workdir, config.pretrained),
        state.params,
        state.statistics,
        meta,
    )
    return result


def run_tune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains the kept weights of the workdir's jackpot (pruned weights stay exactly zero)."""
    if not config.tune.epochs:
        raise ValueError('tune.epochs is 0; set --config.tune.epochs=N (the paper uses 10)')
    setup = rc.Setup(config)
    params, _, fingerprint = setup.load_pretrained(workdir)
    masks, statistics, meta = setup.read_jackpot(rc.jackpot_path(config, workdir))
    rc.check_jackpot_weights(config, workdir, meta, fingerprint)
    by = tuned_by(config, masks)
    masks, statistics = parallel.replicate((masks, statistics), setup.mesh)
    state, result = train_weights(
        setup, config.tune, params, statistics, masks, 'tune', MetricWriter(workdir)
    )
    meta = {
        'model': config.model.to_dict(),
        'num_classes': setup.source.num_classes,
        'source': f'tuned under the mask of {rc.jackpot_path(config, workdir)}',
        'test_top1': result['top1'],
        # What made these weights: a rerun with the same two reuses them (tuned_by).
        'tuned_by': by,
    }
    tuned = workdir_lib.path(workdir, TUNED_DIR)
    checkpoint.save_weights(tuned, state.params, state.statistics, meta)
    return result


def tuned_by(config: ml_collections.ConfigDict, masks: Any) -> dict[str, Any]:
    """What decides tuned weights besides the frozen ones: the jackpot's masks (their
    fingerprint) and the ``tune`` settings."""
    by = {
        'jackpot_fingerprint': checkpoint.weights_fingerprint(parallel.to_host(masks)),
        'tune': config.tune.to_dict(),
    }
    return json.loads(json.dumps(by, default=str))  # as the meta file gives it back


def ensure_pretrained(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Pre-trains the dense model unless its weights are already there (then reused). A
    ``config.pretrained`` given is read, never written: a path that is not there is an
    error (a typo would otherwise be pre-trained into)."""
    weights = workdir_lib.pretrained_path(workdir, config.pretrained)
    if os.path.exists(weights):  # a folder, or a LLaMA's GGUF file
        logging.info('using the pre-trained weights at %s', weights)
    elif config.pretrained:
        raise UserError(
            f'config.pretrained={config.pretrained!r} does not exist; fix the path, or leave '
            f'config.pretrained unset to pre-train into {workdir_lib.pretrained_path(workdir)}'
        )
    else:
        run_pretrain(config, workdir)
