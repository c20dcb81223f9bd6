"""The library entry point: a jackpot search over any Flax model in one call.

:func:`find_jackpot` takes a Linen module (with its variables), an NNX module, or a
forward function (see :mod:`jackpot_jax.adapters`), an iterable of ``(images, labels)``
batches, the sparsity and the schedule, and returns a :class:`Jackpot`: masks, scores,
the masked params, the model's statistics after the search and a report. Underneath it
are the same building blocks the launcher uses (:mod:`jackpot_jax.mask_plan`,
``sparsity.masked_params``, ``sparsity.update_masks``, ``search.make_search_step``), for
anyone writing their own loop.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jackpot_jax import adapters, config_checks, mask_plan, search
from jackpot_jax import sparsity as sparsity_lib
from jackpot_jax.config import PROTOCOLS

Batches = Iterable[tuple[Any, ...]] | Callable[[int], Iterable[tuple[Any, ...]]]


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------
def evaluate(
    forward: adapters.Forward, params: Any, statistics: Any, batches: Iterable[tuple[Any, ...]]
) -> float:
    """Top-1 accuracy in eval mode over ``(images, labels)`` or ``(images, labels, valid)``."""
    correct = total = 0
    for batch in batches:
        images, labels = batch[0], np.asarray(batch[1])
        valid = np.asarray(batch[2]) if len(batch) > 2 else np.ones(len(labels), bool)
        logits = _eval_logits(forward, params, statistics, images)
        correct += int(np.sum((np.argmax(logits, -1) == labels) & valid))
        total += int(np.sum(valid))
    if not total:
        raise ValueError('evaluate got no examples; pass a non-empty iterable of batches')
    return correct / total


@functools.partial(jax.jit, static_argnames='forward')
def _eval_logits(forward, params, statistics, images):
    return forward(params, statistics, images, train=False)[0]


@functools.partial(jax.jit, static_argnames='forward')
def _train_statistics(forward, params, statistics, images, rng):
    return forward(params, statistics, images, train=True, rng=rng)[1]


def recalibrate_statistics(
    forward: adapters.Forward,
    params: Any,
    statistics: Any,
    batches: Batches,
    steps: int,
    *,
    steps_per_epoch: int | None = None,
    rng: jax.Array | int = 0,
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
    for i, batch in enumerate(itertools.islice(_epochs_of(batches, steps_per_epoch), steps)):
        statistics = _train_statistics(
            forward, params, statistics, jnp.asarray(batch[0]), jax.random.fold_in(key, i)
        )
    return statistics


def _epochs_of(batches: Batches, steps_per_epoch: int | None) -> Iterator[tuple[Any, ...]]:
    """The training batches of epoch 0, 1, 2, ... one after the other."""
    for epoch in itertools.count():
        count = 0
        stream = itertools.islice(_batch_stream(batches, epoch), steps_per_epoch)
        for count, batch in enumerate(stream, 1):
            yield batch
        if not count:
            raise ValueError(
                f'the training batches of epoch {epoch} are empty; pass a re-iterable (a list) or '
                'a callable epoch -> batches'
            )


# ----------------------------------------------------------------------------
# The one-call search.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Jackpot:
    """What :func:`find_jackpot` found.

    ``masks`` and ``scores`` are flat ``{path: array}`` dicts (True = kept); ``params`` are
    the frozen params with every prunable kernel multiplied by its mask; ``statistics``
    the model's other state after the search (Linen: a dict of collections such as
    ``{'batch_stats': ...}``; NNX: its non-param state). ``report`` holds ``'sparsity'``
    (per layer and in total) and ``'epochs'`` (loss, training top-1, mask changes and
    flip-backs per epoch, and ``eval_top1`` when evaluation batches were given).
    """

    masks: dict[str, jax.Array]
    scores: dict[str, jax.Array]
    counts: dict[str, int]
    params: Any
    statistics: Any
    report: dict[str, Any]
    forward: adapters.Forward
    nnx_split: adapters.NnxSplit | None = None

    @property
    def variables(self) -> dict[str, Any]:
        """Linen variables of the jackpot: ``model.apply(jackpot.variables, x, train=False)``."""
        return {'params': self.params, **self.statistics}

    def module(self) -> Any:
        """An NNX module holding the jackpot (for an NNX model only)."""
        if self.nnx_split is None:
            raise ValueError('module() is for NNX models; use jackpot.variables with Linen')
        return self.nnx_split.merge(self.params, self.statistics)

    def predict(self, images: Any) -> jax.Array:
        """Logits of the jackpot in eval mode."""
        return _eval_logits(self.forward, self.params, self.statistics, images)

    def evaluate(self, batches: Iterable[tuple[Any, ...]]) -> float:
        """Top-1 accuracy of the jackpot in eval mode over the batches."""
        return evaluate(self.forward, self.params, self.statistics, batches)

    def summary(self) -> str:
        """The per-layer sparsity table and one line per epoch."""
        lines = [sparsity_lib.format_sparsity_report(self.report['sparsity'])]
        for r in self.report['epochs']:
            line = (
                f"epoch {r['epoch']}: loss {r['loss']:.4f}, train top-1 {r['top1']:.2%}, "
                f"mask changes {r['mask_changes']}"
            )
            for name in ('validation_top1', 'eval_top1'):
                if name in r:
                    line += f", {name.split('_')[0]} top-1 {r[name]:.2%}"
            lines.append(line)
        kept = self.report['kept_epoch']
        rule = 'best on validation' if self.report['final_jackpot'] == 'best_validation' else 'last'
        lines.append(f'jackpot kept: epoch {kept} ({rule})')
        return '\n'.join(lines)


def as_forward(
    model: Any,
    variables: Mapping | None = None,
    *,
    train_kwargs: Mapping[str, Any] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
) -> tuple[adapters.Forward, Any, Any, adapters.NnxSplit | None]:
    """``(forward, params, statistics, nnx_split)`` of a Linen module (or its ``apply``) with
    its variables, an NNX module, or a forward function with ``{'params', ...}`` variables."""
    from flax import nnx  # pylint: disable=g-import-not-at-top

    if isinstance(model, nnx.Module):
        if variables is not None:
            raise ValueError(
                'an NNX module holds its own variables; call find_jackpot(model, None, batches)'
            )
        split = adapters.split_nnx(model, train_kwargs=train_kwargs, eval_kwargs=eval_kwargs)
        return split.forward, split.params, split.statistics, split
    owner = getattr(model, '__self__', None)
    if isinstance(owner, nn.Module) and getattr(model, '__name__', '') == 'apply':
        model = owner  # model.apply: the module itself
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(
            f'model is a {type(model).__name__}; pass a flax.linen.Module with its variables, '
            'a flax.nnx.Module, or a forward(params, statistics, images, *, train, rng)'
        )
    if not isinstance(variables, Mapping) or 'params' not in variables:
        raise ValueError(
            "variables must be a mapping with 'params' (what model.init returns), got "
            f'{type(variables).__name__}'
        )
    statistics = {k: v for k, v in variables.items() if k != 'params'}
    if isinstance(model, nn.Module):
        forward = adapters.linen_forward(
            model, tuple(statistics), train_kwargs=train_kwargs, eval_kwargs=eval_kwargs
        )
    else:
        forward = model
    return forward, variables['params'], statistics, None


def _batch_stream(batches: Batches, epoch: int) -> Iterator[tuple[Any, ...]]:
    return iter(batches(epoch) if callable(batches) else batches)


def find_jackpot(
    model: Any,
    variables: Mapping | None,
    batches: Batches,
    *,
    sparsity: float = 0.9,
    epochs: int = 10,
    steps_per_epoch: int | None = None,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = 0.1,
    allocation: str = 'global_magnitude',
    pattern: str = '',
    score_init: str = 'magnitude',
    mask_update: str = 'short_restriction',
    rate_schedule: str = 'all',
    prune_include: str = sparsity_lib.DEFAULT_INCLUDE,
    prune_exclude: str | None = sparsity_lib.DEFAULT_EXCLUDE,
    protocol: str = 'stable',
    mask_freeze_fraction: float | None = None,
    bn_recalibration_steps: int | None = None,
    final_jackpot: str | None = None,
    swap_margin: float | None = None,
    validation_batches: Iterable[tuple[Any, ...]] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
    bn_mode: str = 'train',
    label_smoothing: float = 0.0,
    rng: jax.Array | int = 0,
    eval_batches: Iterable[tuple[Any, ...]] | None = None,
) -> Jackpot:
    """Searches a jackpot: masks over the frozen params of ``model``, no weight trained.

    ``batches``: ``(images, labels)`` pairs, an iterable walked once per epoch (``epoch ->
    iterable`` callables get the epoch), ``steps_per_epoch`` of them per epoch (default:
    ``len(batches)``). ``optimizer`` is any optax transformation of the scores (default:
    the paper's SGD, momentum 0.9, weight decay 5e-4, per-epoch cosine from
    ``learning_rate``). ``train_kwargs`` / ``eval_kwargs`` are the model's train/eval-mode
    keywords (default: read from its signature: ``train``, ``training``,
    ``is_training`` or ``deterministic``). ``rng`` (a key or a seed) feeds dropout, folded
    with the step.

    ``protocol`` fills the options left at None, as the launcher's
    ``config.protocol`` does: 'stable' freezes the masks for the last quarter of the
    epochs (``mask_freeze_fraction``), re-estimates the statistics over 50 training
    batches under every evaluated mask (``bn_recalibration_steps``) and, given
    ``validation_batches`` (held-out *training* examples, never the test set), returns
    the epoch best on them (``final_jackpot='best_validation'``, the latest on ties);
    'paper' is the authors' search: none of these, the last epoch. ``swap_margin`` is a
    hysteresis on the threshold: a pruned weight comes back only if its score beats the
    kept one it replaces by more than the margin (0 = none). ``eval_batches`` are
    only reported on, never chosen by. The remaining options are those of the launcher's
    ``search.*`` config.
    """
    if epochs < 1:
        raise ValueError(f'epochs must be >= 1, got {epochs!r}')
    freeze, recalibration_steps, final_jackpot, swap_margin = _protocol_options(
        protocol, mask_freeze_fraction, bn_recalibration_steps, final_jackpot, swap_margin,
        validation_batches is not None,
    )
    forward, params, statistics, split = as_forward(
        model, variables, train_kwargs=train_kwargs, eval_kwargs=eval_kwargs
    )
    if steps_per_epoch is None:
        if callable(batches) or not hasattr(batches, '__len__'):
            raise ValueError('batches has no len(); pass steps_per_epoch=N')
        steps_per_epoch = len(batches)
    if steps_per_epoch < 1:
        raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch!r}')
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    init_key, step_key = jax.random.split(key)
    recalibration_key = jax.random.fold_in(key, 1)  # dropout while re-estimating

    plan = mask_plan.plan_masks(params, sparsity, allocation, pattern, prune_include, prune_exclude)
    counts = plan.counts
    masks, scores = plan.initial_masks_and_scores(
        params, score_init, mask_update=mask_update, rng=init_key
    )
    if optimizer is None:
        optimizer = search.sgd_optimizer(learning_rate, 5e-4, 0.9, epochs, steps_per_epoch)
    copy = functools.partial(jax.tree.map, jnp.array)  # the step donates its state
    state = search.init_search_state(copy(params), copy(statistics), masks, scores, optimizer)
    step_fn = search.make_search_step(
        forward=forward,
        optimizer=optimizer,
        counts=counts,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        mask_update=mask_update,
        rate_schedule=rate_schedule,
        bn_mode=bn_mode,
        label_smoothing=label_smoothing,
        pattern=plan.pattern,
        mask_frozen_from=search.mask_freeze_step(freeze, epochs, steps_per_epoch),
        swap_margin=swap_margin,
        rng=step_key,
    )

    history = []
    kept = None  # (epoch, masks, scores, statistics) of the jackpot returned
    for epoch in range(epochs):
        step_metrics = []
        stream = _batch_stream(batches, epoch)
        for batch in itertools.islice(stream, steps_per_epoch):
            state, metrics = step_fn(state, jnp.asarray(batch[0]), jnp.asarray(batch[1]))
            step_metrics.append(metrics)
        if len(step_metrics) < steps_per_epoch:
            raise ValueError(
                f'epoch {epoch + 1} got {len(step_metrics)} batches, fewer than '
                f'steps_per_epoch={steps_per_epoch}; pass a re-iterable (a list) or a callable '
                'epoch -> batches, or lower steps_per_epoch'
            )
        record = {'epoch': epoch + 1, **_epoch_record(jax.device_get(step_metrics))}
        last = epoch == epochs - 1
        if last or validation_batches is not None or eval_batches is not None:
            masked = sparsity_lib.masked_params(state.frozen_params, state.masks)
            jackpot_statistics = recalibrate_statistics(
                forward, masked, state.batch_stats, batches, recalibration_steps,
                steps_per_epoch=steps_per_epoch, rng=recalibration_key,
            )
            for name, held_out in (
                ('validation_top1', validation_batches),
                ('eval_top1', eval_batches),
            ):
                if held_out is not None:
                    record[name] = evaluate(forward, masked, jackpot_statistics, held_out)
            best = final_jackpot == 'best_validation' and (
                kept is None or record['validation_top1'] >= history[kept[0] - 1]['validation_top1']
            )
            if best or (final_jackpot == 'last' and last):
                # Copies: the next step donates (overwrites) the state's buffers.
                kept = (epoch + 1, *copy((state.masks, state.scores, jackpot_statistics)))
        history.append(record)

    kept_epoch, kept_masks, kept_scores, kept_statistics = kept
    masks = jax.device_get(kept_masks)
    return Jackpot(
        masks=masks,
        scores=kept_scores,
        counts=counts,
        params=sparsity_lib.masked_params(state.frozen_params, kept_masks),
        statistics=kept_statistics,
        report={
            'sparsity': sparsity_lib.sparsity_report(params, masks),
            'epochs': history,
            'kept_epoch': kept_epoch,
            'final_jackpot': final_jackpot,
        },
        forward=forward,
        nnx_split=split,
    )


def _protocol_options(
    protocol: str,
    mask_freeze_fraction: float | None,
    bn_recalibration_steps: int | None,
    final_jackpot: str | None,
    swap_margin: float | None,
    has_validation: bool,
) -> tuple[float, int, str, float]:
    """``(mask_freeze_fraction, bn_recalibration_steps, final_jackpot, swap_margin)``, each
    one left at None set by ``protocol``; without validation batches the last epoch is kept."""
    config_checks.check_choice('protocol', protocol, tuple(PROTOCOLS))
    defaults = PROTOCOLS[protocol]
    if mask_freeze_fraction is None:
        mask_freeze_fraction = defaults['search.mask_freeze_fraction']
    if bn_recalibration_steps is None:
        bn_recalibration_steps = defaults['search.bn_recalibration_steps']
    if final_jackpot is None:
        final_jackpot = defaults['search.final_jackpot'] if has_validation else 'last'
    if swap_margin is None:
        swap_margin = defaults['search.swap_margin']
    if not 0 <= mask_freeze_fraction < 1:
        raise ValueError(
            f'mask_freeze_fraction must be in [0, 1) (the fraction of the epochs with the masks '
            f'frozen), got {mask_freeze_fraction!r}'
        )
    if bn_recalibration_steps < 0:
        raise ValueError(
            f'bn_recalibration_steps must be >= 0 (0: keep the running statistics), got '
            f'{bn_recalibration_steps!r}'
        )
    config_checks.check_choice('final_jackpot', final_jackpot, config_checks.FINAL_JACKPOTS)
    if final_jackpot == 'best_validation' and not has_validation:
        raise ValueError(
            "final_jackpot='best_validation' chooses on validation_batches, but none were given; "
            'pass validation_batches= (held-out training examples, not the test set), or '
            "final_jackpot='last'"
        )
    return mask_freeze_fraction, bn_recalibration_steps, final_jackpot, swap_margin


def _epoch_record(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of loss and top-1, sums of mask changes and flip-backs (total and per layer)."""
    losses = [float(m['loss']) for m in steps]
    bad = [loss for loss in losses if not np.isfinite(loss)]
    if bad:
        raise FloatingPointError(
            f'the search loss became {bad[0]}; lower learning_rate (or check the data)'
        )
    record = {'loss': float(np.mean(losses)), 'top1': float(np.mean([m['top1'] for m in steps]))}
    for key in ('mask_changes', 'flip_backs'):
        record[key] = int(sum(m[key] for m in steps))
        record[key + '_per_layer'] = {
            p: int(sum(m[key + '_per_layer'][p] for m in steps))
            for p in steps[0][key + '_per_layer']
        }
    return record
