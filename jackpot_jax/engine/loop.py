"""The jackpot search loop: the one engine under :func:`jackpot_jax.find_jackpot` and the
launcher's ``--mode=search``.

:func:`run` builds the search state and the jitted step once from the caller's mask
plan (:func:`plan`), and runs the epochs: steps, an epoch record
(:class:`~jackpot_jax.engine.metrics.EpochMetrics`, which stops the search at the first
non-finite loss or score), the jackpot evaluated under statistics re-estimated for its
mask, and at the end the epoch chosen on validation. What differs between its two
callers comes in as values: a :class:`SearchTask` (model, frozen params, batches,
evaluation, devices), and where the work is kept between epochs, a store
(:mod:`jackpot_jax.engine.store`: a workdir's checkpoints, or memory).

Vocabulary: *frozen params* are the pre-trained weights, never changed; *scores* are
learned, one per prunable weight; *masks* keep the top-scoring weights (True = kept);
*statistics* are the model's non-param state (BatchNorm running averages);
*re-estimation* recomputes the statistics under fixed masked params.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jackpot_jax.core import adapters, mask_plan, parallel, sparsity, step
from jackpot_jax.core.errors import UserError
from jackpot_jax.core.settings import SearchSettings
from jackpot_jax.engine import epoch_choice, evaluation, metrics, store as store_lib
from jackpot_jax.engine.persistence import Persistence

Batch = Any
# (params, statistics, split) -> {metric: value, 'examples': count} on that split.
SplitMetrics = Callable[[Any, Any, str], dict[str, float]]
# BatchNorm re-estimation steps of the statistics comparison when the search itself does
# not re-estimate (reestimation_steps = 0).
DIAGNOSTIC_REESTIMATION_STEPS = 50


class SearchInterrupted(UserError, KeyboardInterrupt):
    """Ctrl-C during a search; the message says where it stopped and how to resume."""


@dataclasses.dataclass
class SearchTask:
    """The model, the frozen weights, the data and the devices of one search.

    ``train_epoch(epoch, first_step)`` yields the epoch's training batches from step
    ``first_step`` on, placed on ``mesh``; ``split_metrics(params, statistics, split)``
    gives the metrics of each split in ``splits`` (the first one, 'validation' when there
    is one, is what the epoch is chosen on; a split named 'test' is never chosen on
    unless it is the only one, as in the paper's protocol).
    """

    forward: adapters.Forward
    params: Any
    statistics: Any
    mesh: jax.sharding.Mesh
    train_epoch: Callable[[int, int], Iterator[Batch]]
    steps_per_epoch: int
    split_metrics: SplitMetrics
    splits: tuple[str, ...]
    rng: jax.Array  # dropout in the steps and the re-estimation
    score_init_rng: jax.Array | None = None  # drawn score inits; None: split from rng
    loss_fn: step.LossFn | None = None
    optimizer: Any = None  # an optax transformation of the scores instead of settings.optimizer
    inputs_fn: Callable[[Batch], Any] = step.batch_inputs
    step_trace: bool = False
    compare_statistics: bool = False  # also evaluate under the other statistics (diagnostic)
    progress: bool = True
    # The search's first masks (e.g. another criterion's, such as Wanda's) instead of the
    # magnitude masks: scores 1.0 where kept, settings.pruned_score where pruned.
    initial_masks: dict[str, Any] | None = None
    initial_scores: dict[str, Any] | None = None  # with initial_masks: their first scores

    def set_start(
        self,
        planned: mask_plan.MaskPlan,
        params: Any,
        masks: Mapping[str, Any] | None,
        scores: Mapping[str, Any] | None,
        mask_update: str,
    ) -> None:
        """The first masks and scores, checked against the plan (host copies): ``masks``
        at its per-layer counts, and ``scores`` picking them (or, alone, the first masks)."""
        if masks is not None:
            self.initial_masks = jax.tree.map(np.asarray, planned.checked_masks(masks, params))
        if scores is not None:
            picked = planned.checked_scores(scores, params, self.initial_masks, mask_update)
            self.initial_masks, self.initial_scores = jax.tree.map(np.asarray, picked)


@dataclasses.dataclass
class SearchOutcome:
    """The search's last state, its epoch records, and the chosen epoch's jackpot."""

    state: step.SearchState
    history: list[dict[str, Any]]
    plan: mask_plan.MaskPlan
    chosen: dict[str, Any]  # the chosen epoch's record
    chosen_masks: dict[str, np.ndarray]
    chosen_scores: dict[str, np.ndarray]
    chosen_statistics: Any
    choice: str  # how the chosen epoch was chosen, in words
    search_seconds: float


def plan(
    params: Any,
    settings: SearchSettings,
    output_paths: tuple[str, ...] = (),
    model_name: str = 'the model',
) -> mask_plan.MaskPlan:
    """The one mask plan of a search (and of the baselines compared with it): the
    settings' prunable kernels of ``params`` but those of ``output_paths`` (the model's
    output layer, left dense), and the weights each loses."""
    exclude = settings.prune_exclude
    if output_paths:
        extra = '|'.join(f'^{p}$' for p in map(re.escape, output_paths))
        exclude = f'{exclude}|{extra}' if exclude else extra
    return mask_plan.plan_masks(
        params,
        settings.sparsity,
        settings.allocation,
        settings.pattern,
        settings.prune_include,
        exclude,
        model_name=model_name,
    )


def run(
    task: SearchTask,
    settings: SearchSettings,
    planned: mask_plan.MaskPlan,
    persistence: Persistence | None = None,
) -> SearchOutcome:
    """Runs (or, from a workdir, resumes) the search; returns its outcome. ``settings``
    must be resolved; ``planned`` is :func:`plan` of the task's params and settings."""
    s, steps = settings, task.steps_per_epoch
    state, step_fn = _state_and_step(task, s, planned)
    jackpots = _JackpotMetrics(task, s)
    split = task.splits[0] if task.splits else None
    store = store_lib.open_store(persistence, s, split)
    global_step = 0
    try:
        state, resumed = store.resume(state, task.step_trace)
        history, epoch_metrics = resumed.history, resumed.epoch_metrics
        start = global_step = int(parallel.to_host(state.step))
        clock = time.perf_counter()

        def seconds() -> float:  # search time over all runs
            return resumed.seconds + time.perf_counter() - clock

        bar = metrics.progress_bar(
            s.epochs * steps, 'search', initial=start, enabled=task.progress
        )
        with bar:
            for epoch in range(start // steps, s.epochs):
                first = start - epoch * steps if epoch == start // steps else 0
                # The steps never wait on the host; only checkpoints and the epoch's end may.
                with jax.transfer_guard_device_to_host('disallow'):
                    for i, batch in enumerate(task.train_epoch(epoch, first), first + 1):
                        if global_step == start:  # compiles the step (kept for the calls)
                            _log_step_memory(step_fn, state, batch, task.mesh)
                            metrics.count_examples(bar, task.inputs_fn(batch))
                        state, step_metrics = step_fn(state, batch)
                        global_step = epoch * steps + i
                        epoch_metrics.add(global_step, step_metrics)
                        bar.update()
                        if i < steps and store.checkpoint_due(global_step):
                            with jax.transfer_guard_device_to_host('allow'):
                                store.save(state, history, epoch_metrics, seconds())
                record = _epoch_record(epoch, steps, s, epoch_metrics)
                statistics = jackpots.add_metrics(record, state, epoch == s.epochs - 1)
                history.append(record)
                store.write(record)
                epoch_metrics = metrics.EpochMetrics(trace=task.step_trace)
                store.end_epoch(state, history, epoch_metrics, seconds(), statistics)
                _report(bar, record, s, task.splits)
        chosen, choice = epoch_choice.choose(history, s, split, store.available(history))
        masks, scores, statistics = store.jackpot(history[chosen - 1], state, jackpots.statistics)
    except FloatingPointError as e:
        raise store.stop_error(e) from e
    except KeyboardInterrupt as e:
        where = store.where_to_resume()
        raise SearchInterrupted(f'search interrupted at step {global_step}: {where}') from e
    finally:
        store.close()
    return SearchOutcome(
        state=state,
        history=history,
        plan=planned,
        chosen=history[chosen - 1],
        chosen_masks=store_lib.host_copies(masks),
        chosen_scores=store_lib.host_copies(scores),
        chosen_statistics=statistics,
        choice=choice,
        search_seconds=seconds() if start < s.epochs * steps else resumed.seconds,
    )


def _state_and_step(
    task: SearchTask, s: SearchSettings, planned: mask_plan.MaskPlan
) -> tuple[step.SearchState, Callable]:
    """The first search state (placed on the mesh) and the jitted step."""
    steps = task.steps_per_epoch
    init_key, step_key = jax.random.split(task.rng)
    if task.score_init_rng is not None:
        init_key = task.score_init_rng
    if task.initial_scores is not None:  # checked against initial_masks by find_jackpot
        masks, scores = task.initial_masks, task.initial_scores
    elif task.initial_masks is None:
        masks, scores = planned.initial_masks_and_scores(
            task.params, s.score_init, mask_update=s.mask_update, pruned_score=s.pruned_score,
            rng=init_key,
        )  # fmt: skip
    else:
        masks = planned.checked_masks(task.initial_masks, task.params)
        scores = sparsity.init_scores(masks, s.pruned_score)
    optimizer = task.optimizer or step.score_optimizer(s, steps)
    fresh = functools.partial(jax.tree.map, jnp.array)  # the step donates its state
    # Large leaves split over the mesh's 'fsdp' axis, the rest replicated (parallel.py).
    state = parallel.shard_state(
        step.init_search_state(
            fresh(task.params), fresh(task.statistics), masks, scores, optimizer
        ),
        task.mesh,
    )
    step_fn = step.make_search_step(
        state_sharding=parallel.state_sharding(state, task.mesh),
        forward=task.forward,
        optimizer=optimizer,
        counts=planned.counts,
        steps_per_epoch=steps,
        epochs=s.epochs,
        mask_update=s.mask_update,
        rate_schedule=s.rate_schedule,
        bn_mode=s.bn_mode,
        label_smoothing=s.label_smoothing,
        pattern=planned.pattern,
        mask_frozen_from=step.mask_freeze_step(s.mask_freeze_fraction, s.epochs, steps),
        swap_margin=s.swap_margin,
        rng=step_key,
        loss_fn=task.loss_fn,
        inputs_fn=task.inputs_fn,
    )
    return state, step_fn


class _JackpotMetrics:
    """Each evaluated epoch's jackpot: its statistics re-estimated under its masks over
    the first training batches, and the metrics of every split under them."""

    def __init__(self, task: SearchTask, settings: SearchSettings):
        self._task, self._s = task, settings
        self._key = jax.random.fold_in(task.rng, 1)  # dropout while re-estimating
        self._last: tuple[Any, Any] = (None, None)  # (state, its statistics), host copies

    def _reestimated(self, masked: Any, statistics: Any, count: int) -> Any:
        task = self._task
        return evaluation.reestimate_statistics(
            task.forward, masked, statistics, lambda epoch: task.train_epoch(epoch, 0), count,
            steps_per_epoch=task.steps_per_epoch, rng=self._key, inputs_fn=task.inputs_fn,
        )  # fmt: skip

    def _masked(self, state: step.SearchState) -> tuple[Any, Any]:
        masked = sparsity.masked_params(state.frozen_params, state.masks)
        return masked, self._reestimated(masked, state.statistics, self._s.reestimation_steps)

    def statistics(self, state: step.SearchState) -> Any:
        """The jackpot statistics of a search state (kept from its evaluation, if any)."""
        last_state, last_statistics = self._last
        if state is last_state and last_statistics is not None:
            return last_statistics
        return self._masked(state)[1]

    def add_metrics(self, record: dict[str, Any], state: step.SearchState, last: bool) -> Any:
        """Adds every split's metrics to ``record``; returns the jackpot's statistics (None
        when there is nothing to evaluate and the jackpot is not this epoch's)."""
        task = self._task
        if not task.splits and not last:
            return None
        masked, stats = self._masked(state)
        for split in task.splits:
            for name, value in task.split_metrics(masked, stats, split).items():
                record[f'{split}_{name}'] = value
        if task.compare_statistics:
            reestimated = bool(self._s.reestimation_steps)
            other = (
                state.statistics
                if reestimated
                else self._reestimated(masked, state.statistics, DIAGNOSTIC_REESTIMATION_STEPS)
            )
            used, unused = ('reestimated', 'running')[:: 1 if reestimated else -1]
            for split in task.splits:
                record[f'{split}_top1_{used}'] = record[f'{split}_top1']
                record[f'{split}_top1_{unused}'] = task.split_metrics(masked, other, split)['top1']
        # A host copy: the next step donates (overwrites) the state's buffers.
        self._last = (state, store_lib.host_copies(stats))
        return self._last[1]


def _epoch_record(
    epoch: int, steps: int, s: SearchSettings, epoch_metrics: metrics.EpochMetrics
) -> dict[str, Any]:
    return {
        'mode': 'search',
        'epoch': epoch + 1,
        'step': (epoch + 1) * steps,
        'learning_rate': float(step.epoch_cosine(s.learning_rate, s.epochs, 1)(epoch)),
        **epoch_metrics.result(),
    }


def _report(bar: Any, record: dict[str, Any], s: SearchSettings, splits: tuple[str, ...]) -> None:
    """The epoch on the progress bar and in the log."""
    bar.set_postfix(loss=f"{record['train_loss']:.3f}", changes=record['mask_changes'])
    metric = s.selection_metric
    logging.info(
        'search epoch %d/%d: training loss %.4f, %s, mask changes %d',
        record['epoch'],
        s.epochs,
        record['train_loss'],
        ', '.join(
            f'{k} {metric} {record[f"{k}_{metric}"]:.4f}'
            for k in splits
            if f'{k}_{metric}' in record
        ),
        record['mask_changes'],
    )


def _log_step_memory(step_fn, state, batch, mesh) -> None:
    """Logs, once per search, what one device holds for the compiled step."""
    sizes = parallel.step_memory(step_fn, state, batch, state=state)
    logging.info(
        'search step on %d device(s) (%s), per device: %s',
        mesh.devices.size,
        parallel.describe(mesh),
        parallel.format_memory(sizes),
    )
