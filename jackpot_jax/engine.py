"""The jackpot search loop: the one engine under :func:`jackpot_jax.find_jackpot` and the
launcher's ``--mode=search``.

:func:`run` plans the masks, builds the search state and the jitted step once, and
runs the epochs: steps, checkpoints, an epoch record (:class:`~jackpot_jax.metrics.
EpochMetrics`, which stops the search at the first non-finite loss or score), the
jackpot evaluated under statistics re-estimated for its mask, and at the end the kept
epoch chosen on validation. What differs between its two callers comes in as values:
a :class:`SearchTask` (model, frozen params, batches, evaluation, devices) and an
optional :class:`Persistence` (a workdir: checkpoints, resume, metrics file).

Vocabulary: *frozen params* are the pre-trained weights, never changed; *scores* are
learned, one per prunable weight; *masks* keep the top-scoring weights (True = kept);
*statistics* are the model's non-param state (BatchNorm running averages);
*re-estimation* recomputes the statistics under fixed masked params.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import auto as tqdm

from jackpot_jax import adapters, checkpoint, mask_plan, metrics, output_layer, parallel, search
from jackpot_jax import selection, sparsity
from jackpot_jax.errors import UserError
from jackpot_jax.settings import SearchSettings

Batch = Any
# (params, statistics, split) -> {metric: value, 'examples': count} on that split.
Evaluator = Callable[[Any, Any, str], dict[str, float]]
NAN_STOP_FILE = 'nan_stop.json'


class SearchInterrupted(UserError, KeyboardInterrupt):
    """Ctrl-C during a search; the message says where it stopped and how to resume."""


# ----------------------------------------------------------------------------
# Statistics re-estimation and evaluation over batches.
# ----------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames='forward')
def _train_statistics(forward, params, statistics, inputs, rng):
    return forward(params, statistics, inputs, train=True, rng=rng)[1]


def recalibrate_statistics(
    forward: adapters.Forward,
    params: Any,
    statistics: Any,
    batches: Iterable[Batch] | Callable[[int], Iterable[Batch]],
    steps: int,
    *,
    steps_per_epoch: int | None = None,
    rng: jax.Array | int = 0,
    inputs_fn: Callable[[Batch], Any] = search.batch_inputs,
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
        statistics = _train_statistics(
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


# ----------------------------------------------------------------------------
# What a search runs on, and where it keeps its work.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class SearchTask:
    """The model, the frozen weights, the data and the devices of one search.

    ``train_epoch(epoch, first_step)`` yields the epoch's training batches from step
    ``first_step`` on, placed on ``mesh``; ``evaluate(params, statistics, split)`` gives
    the metrics of each split in ``splits`` (the first one, 'validation' when there is
    one, is what the kept epoch is chosen on; a split named 'test' is never chosen on
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
    loss_fn: search.LossFn | None = None
    optimizer: Any = None  # an optax transformation of the scores instead of settings.optimizer
    inputs_fn: Callable[[Batch], Any] = search.batch_inputs
    step_trace: bool = False
    compare_statistics: bool = False  # also evaluate under the other statistics (diagnostic)
    progress: bool = True
    model_name: str = 'the model'
    excluded_output_paths: tuple[str, ...] = ()  # left dense: the model's output layer


@dataclasses.dataclass
class Persistence:
    """A workdir: checkpoints every ``every_steps`` and each epoch, resume, metrics file.

    ``identity`` is stored with every checkpoint; ``check_resumable(saved_meta,
    after_nan_stop)`` raises unless a checkpoint's meta matches this search's.
    """

    directory: str
    identity: dict[str, Any]
    check_resumable: Callable[[dict[str, Any], bool], None]
    every_steps: int = 0
    keep: int = 3
    mode: str = 'search'

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.directory, 'checkpoints')

    @property
    def metrics_file(self) -> str:
        return os.path.join(self.directory, 'metrics.jsonl')

    @property
    def nan_stop_file(self) -> str:
        return os.path.join(self.checkpoints, NAN_STOP_FILE)


def resume_differences(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """``'name: checkpoint X, now Y'`` for every setting that differs."""
    diffs = [
        f'{k}: checkpoint {saved[k]!r}, now {v!r}'
        for k, v in expected.items()
        if k in saved and saved[k] != v
    ]
    diffs += [f'{k}: not in the checkpoint, now {v!r}' for k, v in expected.items() if k not in saved]
    diffs += [f'{k}: only in the checkpoint' for k in saved if k not in expected]
    return sorted(diffs)


# ----------------------------------------------------------------------------
# The outcome.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class SearchOutcome:
    """The search's last state, its epoch records, and the kept epoch's jackpot."""

    state: search.SearchState
    history: list[dict[str, Any]]
    plan: mask_plan.MaskPlan
    kept: dict[str, Any]  # the kept epoch's record
    kept_masks: dict[str, np.ndarray]
    kept_scores: dict[str, np.ndarray]
    kept_statistics: Any
    choice: str  # how the kept epoch was chosen, in words
    search_seconds: float


def score_optimizer(settings: SearchSettings, steps_per_epoch: int):
    """The scores' optimizer: SGD (PyTorch-style, the paper's), Adam or AdamW, with the
    per-epoch cosine; weight decay is added to the gradient (AdamW: decoupled)."""
    import optax  # pylint: disable=g-import-not-at-top

    s = settings
    schedule = search.epoch_cosine(s.learning_rate, s.epochs, steps_per_epoch)
    if s.optimizer == 'sgd':
        return search.sgd_optimizer(s.learning_rate, s.weight_decay, s.momentum, s.epochs,
                                    steps_per_epoch)
    if s.optimizer == 'adamw':
        return optax.adamw(schedule, weight_decay=s.weight_decay)
    return optax.chain(optax.add_decayed_weights(s.weight_decay), optax.adam(schedule))


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
        extra = '|'.join(f'^{p}$' for p in map(_escape, task.excluded_output_paths))
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


def _escape(path: str) -> str:
    import re  # pylint: disable=g-import-not-at-top

    return re.escape(path)


def output_kernels(
    forward: adapters.Forward, params: Any, statistics: Any, inputs: Any, include: str
) -> tuple[str, ...]:
    """The kernels (paths matching ``include``) whose output is the model's output: its
    classifier, found by tracing the model on ``inputs``, whatever it is called."""
    paths = output_layer.output_kernel_paths(
        lambda p: forward(p, statistics, inputs, train=False)[0], params
    )
    prunable = sparsity.prunable_paths(params, include, None)
    return tuple(p for p in paths if p in prunable)


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------
def run(
    task: SearchTask, settings: SearchSettings, persistence: Persistence | None = None
) -> SearchOutcome:
    """Runs (or resumes) the search; returns its outcome. ``settings`` must be resolved."""
    s = settings
    steps = task.steps_per_epoch
    init_key, step_key = jax.random.split(task.rng)
    if task.score_init_rng is not None:
        init_key = task.score_init_rng
    recalibration_key = jax.random.fold_in(task.rng, 1)  # dropout while re-estimating
    mask_plan_ = plan(task, s)
    masks, scores = mask_plan_.initial_masks_and_scores(
        task.params, s.score_init, mask_update=s.mask_update, pruned_score=s.pruned_score,
        rng=init_key,
    )
    optimizer = task.optimizer or score_optimizer(s, steps)
    copy = functools.partial(jax.tree.map, jnp.array)  # the step donates its state
    state = parallel.replicate(
        search.init_search_state(copy(task.params), copy(task.statistics), masks, scores,
                                 optimizer),
        task.mesh,
    )
    step_fn = search.make_search_step(
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
        mask_frozen_from=search.mask_freeze_step(s.mask_freeze_fraction, s.epochs, steps),
        swap_margin=s.swap_margin,
        rng=step_key,
        loss_fn=task.loss_fn,
        inputs_fn=task.inputs_fn,
    )
    selection_split = task.splits[0] if task.splits else None

    def jackpot_statistics(state):
        masked = sparsity.masked_params(state.frozen_params, state.masks)
        stats = recalibrate_statistics(
            task.forward, masked, state.batch_stats,
            lambda epoch: task.train_epoch(epoch, 0), s.bn_recalibration_steps,
            steps_per_epoch=steps, rng=recalibration_key, inputs_fn=task.inputs_fn,
        )
        return masked, stats

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
            used = 'recalibrated' if s.bn_recalibration_steps else 'running'
            other = state.batch_stats if used == 'recalibrated' else recalibrate_statistics(
                task.forward, masked, state.batch_stats,
                lambda epoch: task.train_epoch(epoch, 0), DIAGNOSTIC_RECALIBRATION_STEPS,
                steps_per_epoch=steps, rng=recalibration_key, inputs_fn=task.inputs_fn,
            )
            unused = 'running' if used == 'recalibrated' else 'recalibrated'
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
        _truncate_records(persistence.metrics_file, persistence.mode, start)
        writer = metrics.MetricWriter(persistence.directory)
    clock = time.perf_counter()

    def search_seconds():
        return earlier_seconds + time.perf_counter() - clock

    def save(selection=None):
        epoch_metrics.flush()
        meta = {'history': history, 'epoch_sums': epoch_metrics.sums,
                'search_seconds': search_seconds()}
        ckpts.save(state, {**persistence.identity, **meta}, selection)

    global_step = start
    last_statistics = None  # the last epoch's jackpot statistics, when this run evaluated it
    try:
        with _progress(task, s.epochs * steps, start) as bar:
            for epoch in range(start // steps, s.epochs):
                first = start - epoch * steps if epoch == start // steps else 0
                # The steps never wait on the host; only checkpoints and the epoch's end may.
                with jax.transfer_guard_device_to_host('disallow'):
                    for i, batch in enumerate(task.train_epoch(epoch, first), first + 1):
                        state, step_metrics = step_fn(state, batch)
                        global_step = epoch * steps + i
                        epoch_metrics.add(global_step, step_metrics)
                        bar.update()
                        every = persistence.every_steps if persistence else 0
                        if every and global_step % every == 0 and i < steps:
                            with jax.transfer_guard_device_to_host('allow'):
                                save()
                record = {
                    'mode': 'search',
                    'epoch': epoch + 1,
                    'step': (epoch + 1) * steps,
                    'learning_rate': float(search.epoch_cosine(s.learning_rate, s.epochs, 1)(epoch)),
                    **epoch_metrics.result(),
                }
                stats = last_statistics = evaluate(state, record, epoch == s.epochs - 1)
                history.append(record)
                if writer:
                    writer.write(record)
                epoch_metrics = metrics.EpochMetrics(trace=task.step_trace)
                selection = _signed(record, selection_split, s) if task.splits else None
                if ckpts:
                    save(None if selection is None else {'selection_top1': selection})
                elif s.final_jackpot != 'last' or epoch == s.epochs - 1:
                    snapshots[epoch + 1] = (state.masks, state.scores, stats)
                    if s.final_jackpot != 'last':
                        _drop_dominated(snapshots, history, selection_split, s)
                bar.set_postfix(loss=f"{record['loss']:.3f}", changes=record['mask_changes'])
                logging.info(
                    'search epoch %d/%d: loss %.4f, %s, mask changes %d', epoch + 1, s.epochs,
                    record['loss'],
                    ', '.join(f'{k} {s.selection_metric} {record[f"{k}_{s.selection_metric}"]:.4f}'
                              for k in task.splits if f'{k}_{s.selection_metric}' in record),
                    record['mask_changes'],
                )
                # Copies: the next step donates (overwrites) the state's buffers.
                snapshots, last_statistics = _copies((snapshots, last_statistics))
        if ckpts:
            ckpts.wait()
        kept, masks, scores, stats, choice = _kept_epoch(
            history, s, selection_split, ckpts, snapshots, state,
            lambda st: last_statistics if st is state and last_statistics is not None
            else jackpot_statistics(st)[1],
        )
    except FloatingPointError as e:
        raise _nan_stop(e, ckpts, persistence) from e
    except KeyboardInterrupt as e:
        if ckpts:
            ckpts.wait()
        where = (
            f'the last checkpoint is step {ckpts.latest_step()} in {ckpts.directory}; run the '
            'same search again to resume from it' if ckpts and ckpts.latest_step() is not None
            else 'nothing was saved (pass a workdir to make a search resumable)'
        )
        raise SearchInterrupted(f'search interrupted at step {global_step}: {where}') from e
    finally:
        if ckpts:
            ckpts.wait()
            ckpts.close()
    seconds = search_seconds() if start < s.epochs * steps else earlier_seconds
    return SearchOutcome(
        state=state, history=history, plan=mask_plan_, kept=kept,
        kept_masks=_copies(masks), kept_scores=_copies(scores),
        kept_statistics=stats, choice=choice, search_seconds=seconds,
    )


# BatchNorm re-estimation steps of the statistics comparison when the search itself does
# not re-estimate (bn_recalibration_steps = 0).
DIAGNOSTIC_RECALIBRATION_STEPS = 50


def _copies(tree: Any) -> Any:
    """Host copies of a tree's arrays; PRNG keys (NNX RNG state) stay device copies."""

    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jnp.array(x)
        return parallel.to_host(x)

    return jax.tree.map(one, tree)


def _progress(task: SearchTask, total: int, initial: int):
    return tqdm.tqdm(
        total=total, initial=initial, desc='search', unit='img' if task.batch_size else 'step',
        unit_scale=task.batch_size or 1, leave=False,
        disable=not task.progress or jax.process_index() != 0,
    )


def _signed(record: Mapping[str, Any], split: str, s: SearchSettings) -> float:
    """The record's selection metric on ``split``, negated when lower is better."""
    value = record[f'{split}_{s.selection_metric}']
    return -value if s.lower_is_better else value


def _drop_dominated(snapshots: dict, history: list, split: str, s: SearchSettings) -> None:
    """Forgets the epochs a later epoch at least as good makes impossible to keep."""
    value = {r['epoch']: _signed(r, split, s) for r in history}
    for epoch in list(snapshots):
        if any(value[later] >= value[epoch] for later in snapshots if later > epoch):
            del snapshots[epoch]


def _kept_epoch(history, s, split, ckpts, snapshots, state, statistics_of):
    """``(record, masks, scores, statistics, choice)`` of the kept epoch; ``statistics_of(
    state)`` gives a search state's jackpot statistics."""
    last = history[-1]
    if s.final_jackpot == 'last':
        epoch, choice = last['epoch'], f"epoch {last['epoch']} (the last epoch)"
    else:
        available = set(snapshots) if ckpts is None else {
            r['epoch'] for r in history if r['step'] in set(ckpts.steps())
        }
        metric = f'{split}_{s.selection_metric}'
        rule = 'best' if s.final_jackpot == 'best_validation' else s.final_jackpot
        kwargs = dict(
            metric=metric, higher_is_better=not s.lower_is_better, rule=rule,
            num_examples=None if s.lower_is_better else last.get(f'{split}_examples'),
        )
        chosen = selection.choose_epoch(history, available=available, **kwargs)
        unrestricted = selection.choose_epoch(history, **kwargs)
        if chosen.epoch != unrestricted.epoch:
            logging.warning(
                'the checkpoint of epoch %d (the %s choice on %s) is gone; keeping epoch %d, '
                'the choice among those still saved', unrestricted.epoch, rule, split,
                chosen.epoch,
            )
        epoch, choice = chosen.epoch, chosen.describe()
    record = history[epoch - 1]
    if ckpts is None:
        return (record, *snapshots[epoch], choice)
    if epoch == last['epoch']:
        return record, state.masks, state.scores, statistics_of(state), choice
    restored, _ = ckpts.restore(record['step'], like=state)
    return record, restored.masks, restored.scores, statistics_of(restored), choice


def _nan_stop(error: FloatingPointError, ckpts, persistence) -> FloatingPointError:
    """The error of a diverged search, naming the checkpoint a rerun resumes from."""
    if ckpts is None:
        return FloatingPointError(
            f'{error}: the search stopped; lower learning_rate (or check the data) and run it again'
        )
    ckpts.wait()
    latest = ckpts.latest_step()
    if jax.process_index() == 0:
        os.makedirs(persistence.checkpoints, exist_ok=True)
        with open(persistence.nan_stop_file, 'w') as f:
            json.dump({'stopped_after_step': latest}, f)
    where = (
        f'the rerun resumes from step {latest} in {ckpts.directory}' if latest is not None
        else 'no checkpoint was written before it, so the rerun starts over'
    )
    return FloatingPointError(
        f'{error}: the search stopped. Lower the learning rate (or check the data) and run the '
        f'same search again with it: {where}, and the learning rate is the one setting it may '
        'change'
    )


def _truncate_records(path: str, mode: str, after_step: int) -> None:
    """Drops ``mode`` records written after ``after_step`` (by a run that then died)."""
    if jax.process_index() or not os.path.exists(path):
        return
    records = metrics.read_jsonl(path)
    kept = [r for r in records if r.get('mode') != mode or r.get('step', 0) <= after_step]
    if len(kept) != len(records):
        with open(path + '.tmp', 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in kept)
        os.replace(path + '.tmp', path)
