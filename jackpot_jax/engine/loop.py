"""The jackpot search loop: the one engine under :func:`jackpot_jax.find_jackpot` and the
launcher's ``--mode=search``.

:func:`run` plans the masks, builds the search state and the jitted step once, and
runs the epochs: steps, checkpoints, an epoch record (:class:`~jackpot_jax.engine.metrics.
EpochMetrics`, which stops the search at the first non-finite loss or score), the
jackpot evaluated under statistics re-estimated for its mask, and at the end the
epoch chosen on validation. What differs between its two callers comes in as values:
a :class:`SearchTask` (model, frozen params, batches, evaluation, devices) and an
optional :class:`Persistence` (a workdir: checkpoints, resume, metrics file).

Vocabulary: *frozen params* are the pre-trained weights, never changed; *scores* are
learned, one per prunable weight; *masks* keep the top-scoring weights (True = kept);
*statistics* are the model's non-param state (BatchNorm running averages);
*re-estimation* recomputes the statistics under fixed masked params.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import auto as tqdm

from jackpot_jax.core import adapters, mask_plan, parallel, sparsity, step
from jackpot_jax.core.errors import UserError
from jackpot_jax.core.settings import SearchSettings
from jackpot_jax.engine import epoch_choice, evaluation, metrics, persistence as persistence_lib
from jackpot_jax.engine.persistence import Persistence
from jackpot_jax.io import checkpoint

Batch = Any
# (params, statistics, split) -> {metric: value, 'examples': count} on that split.
Evaluator = Callable[[Any, Any, str], dict[str, float]]


class SearchInterrupted(UserError, KeyboardInterrupt):
    """Ctrl-C during a search; the message says where it stopped and how to resume."""


# ----------------------------------------------------------------------------
# What a search runs on, and where it keeps its work.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class SearchTask:
    """The model, the frozen weights, the data and the devices of one search.

    ``train_epoch(epoch, first_step)`` yields the epoch's training batches from step
    ``first_step`` on, placed on ``mesh``; ``evaluate(params, statistics, split)`` gives
    the metrics of each split in ``splits`` (the first one, 'validation' when there is
    one, is what the epoch is chosen on; a split named 'test' is never chosen on
    unless it is the only one, as in the paper's protocol).
    """

    forward: adapters.Forward
    params: Any
    statistics: Any
    mesh: jax.sharding.Mesh
    train_epoch: Callable[[int, int], Iterator[Batch]]
    steps_per_epoch: int
    evaluate: Evaluator
    splits: tuple[str, ...]
    rng: jax.Array  # dropout in the steps and the re-estimation
    score_init_rng: jax.Array | None = None  # drawn score inits; None: split from rng
    batch_size: int = 0  # for the progress bar's images per second (0: count steps)
    loss_fn: step.LossFn | None = None
    optimizer: Any = None  # an optax transformation of the scores instead of settings.optimizer
    inputs_fn: Callable[[Batch], Any] = step.batch_inputs
    step_trace: bool = False
    compare_statistics: bool = False  # also evaluate under the other statistics (diagnostic)
    progress: bool = True
    model_name: str = 'the model'
    excluded_output_paths: tuple[str, ...] = ()  # left dense: the model's output layer
    # The search's first masks (e.g. another criterion's, such as Wanda's) instead of the
    # magnitude masks: scores 1.0 where kept, settings.pruned_score where pruned.
    initial_masks: dict[str, Any] | None = None


# ----------------------------------------------------------------------------
# The outcome.
# ----------------------------------------------------------------------------
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


def plan(task: SearchTask, settings: SearchSettings) -> mask_plan.MaskPlan:
    """The mask plan of the settings over the task's frozen params."""
    for name, choices in (
        ('allocation', sparsity.ALLOCATIONS),
        ('mask_update', sparsity.MASK_UPDATES),
        ('rate_schedule', sparsity.RATE_SCHEDULES),
        ('score_init', sparsity.SCORE_INITS),
    ):
        if getattr(settings, name) not in choices:
            raise ValueError(
                f'unknown {name} {getattr(settings, name)!r}; choose one of {", ".join(choices)}'
            )
    exclude = settings.prune_exclude
    if task.excluded_output_paths:
        extra = '|'.join(f'^{p}$' for p in map(re.escape, task.excluded_output_paths))
        exclude = f'{exclude}|{extra}' if exclude else extra
    return mask_plan.plan_masks(
        task.params,
        settings.sparsity,
        settings.allocation,
        settings.pattern,
        settings.prune_include,
        exclude,
        model_name=task.model_name,
    )


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------
def run(
    task: SearchTask,
    settings: SearchSettings,
    persistence: Persistence | None = None,
    planned: mask_plan.MaskPlan | None = None,
) -> SearchOutcome:
    """Runs (or resumes) the search; returns its outcome. ``settings`` must be resolved;
    ``planned`` is :func:`plan` of the task and settings, when the caller has made it."""
    s = settings
    steps = task.steps_per_epoch
    init_key, step_key = jax.random.split(task.rng)
    if task.score_init_rng is not None:
        init_key = task.score_init_rng
    reestimation_key = jax.random.fold_in(task.rng, 1)  # dropout while re-estimating
    mask_plan_ = planned or plan(task, s)
    if task.initial_masks is None:
        masks, scores = mask_plan_.initial_masks_and_scores(
            task.params,
            s.score_init,
            mask_update=s.mask_update,
            pruned_score=s.pruned_score,
            rng=init_key,
        )
    else:
        masks = mask_plan_.checked_masks(task.initial_masks, task.params)
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
        counts=mask_plan_.counts,
        steps_per_epoch=steps,
        epochs=s.epochs,
        mask_update=s.mask_update,
        rate_schedule=s.rate_schedule,
        bn_mode=s.bn_mode,
        label_smoothing=s.label_smoothing,
        pattern=mask_plan_.pattern,
        mask_frozen_from=step.mask_freeze_step(s.mask_freeze_fraction, s.epochs, steps),
        swap_margin=s.swap_margin,
        rng=step_key,
        loss_fn=task.loss_fn,
        inputs_fn=task.inputs_fn,
    )
    selection_split = task.splits[0] if task.splits else None

    def reestimated(masked, statistics, count):
        """The statistics re-estimated over the first ``count`` training batches."""
        return evaluation.reestimate_statistics(
            task.forward, masked, statistics, lambda epoch: task.train_epoch(epoch, 0), count,
            steps_per_epoch=steps, rng=reestimation_key, inputs_fn=task.inputs_fn,
        )  # fmt: skip

    def jackpot_statistics(state):
        masked = sparsity.masked_params(state.frozen_params, state.masks)
        return masked, reestimated(masked, state.statistics, s.reestimation_steps)

    def evaluate(state, record, last):
        """Adds every split's metrics to ``record``; returns the jackpot's statistics (None
        when there is nothing to evaluate and the jackpot is not this epoch's)."""
        if not task.splits and not last:
            return None
        masked, stats = jackpot_statistics(state)
        for split in task.splits:
            for name, value in task.evaluate(masked, stats, split).items():
                record[f'{split}_{name}'] = value
        if task.compare_statistics:
            used = 'reestimated' if s.reestimation_steps else 'running'
            other = (
                state.statistics
                if used == 'reestimated'
                else reestimated(masked, state.statistics, DIAGNOSTIC_REESTIMATION_STEPS)
            )
            unused = 'running' if used == 'reestimated' else 'reestimated'
            for split in task.splits:
                record[f'{split}_top1_{used}'] = record[f'{split}_top1']
                record[f'{split}_top1_{unused}'] = task.evaluate(masked, other, split)['top1']
        return stats

    # Restore: the workdir's own latest checkpoint, else start from the initial masks.
    history: list[dict[str, Any]] = []
    epoch_metrics = metrics.EpochMetrics(trace=task.step_trace)
    earlier_seconds = 0.0  # search time before the latest checkpoint, over all earlier runs
    ckpts = writer = None
    snapshots: dict[int, tuple] = {}  # epoch -> (masks, scores, statistics), without a workdir
    if persistence is not None:
        ckpts = checkpoint.SearchCheckpoints(persistence.checkpoints, persistence.keep)
        latest = ckpts.latest_step()
        after_nan = os.path.exists(persistence.nan_stop_file)
        if latest is not None:
            persistence.check_resumable(ckpts.read_meta(latest), after_nan)
            state, meta = ckpts.restore(latest, like=state)
            history = meta['history']
            epoch_metrics = metrics.EpochMetrics(meta['epoch_sums'], trace=task.step_trace)
            earlier_seconds = meta.get('search_seconds', 0.0)
            logging.info('resuming the search from step %d of %s', latest, ckpts.directory)
        if after_nan and jax.process_index() == 0:
            os.remove(persistence.nan_stop_file)
    start = int(parallel.to_host(state.step))
    if persistence is not None:
        persistence_lib.truncate_records(persistence.metrics_file, persistence.mode, start)
        writer = metrics.MetricWriter(persistence.directory)
    clock = time.perf_counter()

    def search_seconds():
        return earlier_seconds + time.perf_counter() - clock

    def save(state, epoch_metrics):
        epoch_metrics.flush()
        # Copies: orbax writes the meta in the background while the loop adds to these.
        meta = copy.deepcopy({'history': history, 'epoch_sums': epoch_metrics.sums})
        meta['search_seconds'] = search_seconds()
        epochs = epoch_choice.candidates(history, selection_split, s)
        preserve = [r['step'] for r in history if r['epoch'] in epochs]
        ckpts.save(state, {**persistence.identity, **meta}, preserve)

    global_step = start
    last_statistics = None  # the last epoch's jackpot statistics, when this run evaluated it
    try:
        with _progress(task, s.epochs * steps, start) as bar:
            for epoch in range(start // steps, s.epochs):
                first = start - epoch * steps if epoch == start // steps else 0
                # The steps never wait on the host; only checkpoints and the epoch's end may.
                with jax.transfer_guard_device_to_host('disallow'):
                    for i, batch in enumerate(task.train_epoch(epoch, first), first + 1):
                        if global_step == start:  # compiles the step (kept for the calls)
                            _log_step_memory(step_fn, state, batch, task.mesh)
                        state, step_metrics = step_fn(state, batch)
                        global_step = epoch * steps + i
                        epoch_metrics.add(global_step, step_metrics)
                        bar.update()
                        every = persistence.every_steps if persistence else 0
                        if every and global_step % every == 0 and i < steps:
                            with jax.transfer_guard_device_to_host('allow'):
                                save(state, epoch_metrics)
                record = {
                    'mode': 'search',
                    'epoch': epoch + 1,
                    'step': (epoch + 1) * steps,
                    'learning_rate': float(
                        step.epoch_cosine(s.learning_rate, s.epochs, 1)(epoch)
                    ),
                    **epoch_metrics.result(),
                }
                stats = last_statistics = evaluate(state, record, epoch == s.epochs - 1)
                history.append(record)
                if writer:
                    writer.write(record)
                epoch_metrics = metrics.EpochMetrics(trace=task.step_trace)
                if ckpts:
                    save(state, epoch_metrics)
                elif s.selection_rule != 'last' or epoch == s.epochs - 1:
                    snapshots[epoch + 1] = (state.masks, state.scores, stats)
                    if s.selection_rule != 'last':
                        epoch_choice.drop_dominated(snapshots, history, selection_split, s)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", changes=record['mask_changes'])
                logging.info(
                    'search epoch %d/%d: training loss %.4f, %s, mask changes %d',
                    epoch + 1,
                    s.epochs,
                    record['train_loss'],
                    ', '.join(
                        f'{k} {s.selection_metric} {record[f"{k}_{s.selection_metric}"]:.4f}'
                        for k in task.splits
                        if f'{k}_{s.selection_metric}' in record
                    ),
                    record['mask_changes'],
                )
                # Copies: the next step donates (overwrites) the state's buffers.
                snapshots, last_statistics = _copies((snapshots, last_statistics))
        if ckpts:
            ckpts.wait()
        chosen, masks, scores, stats, choice = epoch_choice.chosen_epoch(
            history,
            s,
            selection_split,
            ckpts,
            snapshots,
            state,
            lambda st: (
                last_statistics
                if st is state and last_statistics is not None
                else jackpot_statistics(st)[1]
            ),
        )
    except FloatingPointError as e:
        raise persistence_lib.nan_stop_error(e, ckpts, persistence) from e
    except KeyboardInterrupt as e:
        if ckpts:
            ckpts.wait()
        where = (
            f'the last checkpoint is step {ckpts.latest_step()} in {ckpts.directory}; run the '
            'same search again to resume from it'
            if ckpts and ckpts.latest_step() is not None
            else 'nothing was saved (pass a workdir to make a search resumable)'
        )
        raise SearchInterrupted(f'search interrupted at step {global_step}: {where}') from e
    finally:
        if ckpts:
            ckpts.wait()
            ckpts.close()
    seconds = search_seconds() if start < s.epochs * steps else earlier_seconds
    return SearchOutcome(
        state=state,
        history=history,
        plan=mask_plan_,
        chosen=chosen,
        chosen_masks=_copies(masks),
        chosen_scores=_copies(scores),
        chosen_statistics=stats,
        choice=choice,
        search_seconds=seconds,
    )


# BatchNorm re-estimation steps of the statistics comparison when the search itself does
# not re-estimate (reestimation_steps = 0).
DIAGNOSTIC_REESTIMATION_STEPS = 50


def _log_step_memory(step_fn, state, batch, mesh) -> None:
    """Logs, once per search, what one device holds for the compiled step."""
    sizes = parallel.step_memory(step_fn, state, batch, state=state)
    logging.info(
        'search step on %d device(s) (%s), per device: %s',
        mesh.devices.size,
        parallel.describe(mesh),
        parallel.format_memory(sizes),
    )


def _copies(tree: Any) -> Any:
    """Host copies of a tree's arrays; PRNG keys (NNX RNG state) stay device copies."""

    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jnp.array(x)
        return parallel.to_host(x)

    return jax.tree.map(one, tree)


def _progress(task: SearchTask, total: int, initial: int):
    return tqdm.tqdm(
        total=total,
        initial=initial,
        desc='search',
        unit='img' if task.batch_size else 'step',
        unit_scale=task.batch_size or 1,
        leave=False,
        disable=not task.progress or jax.process_index() != 0,
    )
