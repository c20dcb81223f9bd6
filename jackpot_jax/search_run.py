"""The jackpot search as a run: a resumable loop over the jitted search step.

:func:`run_search` plans the masks once, restores the workdir's latest checkpoint if
there is one (refusing one written under other settings or other weights), evaluates
every epoch, picks the best epoch on the validation split when there is one, and saves
the jackpot: the last epoch's, or (``search.final_jackpot='best_validation'``) the one of
the epoch best on the validation split, restored from its checkpoint.
:func:`baseline_accuracies` gives the dense, magnitude and random-mask accuracies it is
compared with.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jackpot_jax import checkpoint, config_checks, parallel, plots, search, sparsity
from jackpot_jax import config as config_lib
from jackpot_jax import run_context as rc
from jackpot_jax.metrics import EpochMetrics, MetricWriter, read_jsonl
from jackpot_jax.weight_training import run_tune
from jackpot_jax.workdir import (
    CHECKPOINTS_DIR,
    LAYER_SPARSITY_PNG,
    MASK_CHANGES_PNG,
    METRICS_FILE,
)

# Config fields that may change between a search and its resumption.
# fmt: off
_RESUMABLE_CHANGES = ('mode', 'pretrained', 'jackpot', 'num_devices', 'distributed', 'checkpoint',
                      'data.data_dir', 'data.eval_batch_size', 'tune', 'pretrain', 'overlap',
                      'search.step_trace', 'search.compare_bn_statistics', 'search_cost',
                      'restriction', 'sweep', 'stability', 'data.threads',
                      'search.final_jackpot')
# fmt: on
# BatchNorm re-estimation steps of search.compare_bn_statistics when the search itself
# does not re-estimate (search.bn_recalibration_steps = 0).
DIAGNOSTIC_RECALIBRATION_STEPS = 50


def _search_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields a resumed search must share with the one that wrote the checkpoint."""
    flat = sparsity.flatten(config.to_dict())
    return {
        k: v
        for k, v in flat.items()
        if not any(
            k == c or k.startswith(c + '/')
            for c in (c.replace('.', '/') for c in _RESUMABLE_CHANGES)
        )
    }


def _legacy_identity() -> dict[str, Any]:
    """The identity of a search with every field at the value that reproduces the code from
    before the field existed: its default, and the paper's protocol (once the only one)."""
    config = config_lib.get_config()
    config.protocol = 'paper'
    return _search_identity(config_checks.resolve_protocol(config))


def _check_resumable(saved: dict[str, Any], expected: dict[str, Any], directory: str) -> None:
    if saved['weights_fingerprint'] != expected['weights_fingerprint']:
        raise ValueError(
            f"the weights at {expected['weights_path']} differ from those the search in "
            f"{directory} started from (saved from {saved['weights_path']}, fingerprint "
            f"{saved['weights_fingerprint'][:12]} != {expected['weights_fingerprint'][:12]}); "
            'point config.pretrained at the original weights, or use a new --workdir'
        )
    legacy = _legacy_identity()
    diffs = sorted(
        f"{k.replace('/', '.')}: checkpoint {saved['config'][k]!r}, now {v!r}"
        for k, v in expected['config'].items()
        if k in saved['config'] and saved['config'][k] != v
    )
    # A field the checkpoint lacks was added after it was written; the search it holds
    # ran as the field's legacy value says, so only that value resumes it.
    diffs += sorted(
        f"{k.replace('/', '.')}: not in the checkpoint (written before the field existed: "
        f'it ran as {legacy.get(k)!r}), now {v!r}'
        for k, v in expected['config'].items()
        if k not in saved['config'] and (k not in legacy or legacy[k] != v)
    )
    diffs += [
        f"{k.replace('/', '.')}: only in the checkpoint"
        for k in saved['config']
        if k not in expected['config']
    ]
    if diffs or saved['counts'] != expected['counts']:
        raise ValueError(
            f'the search checkpoints in {directory} come from a different configuration:\n  '
            + '\n  '.join(diffs or ['per-layer pruned counts differ'])
            + '\nrestore those settings to resume, or use a new --workdir'
        )


def _truncate_metrics(path: str, mode: str, after_step: int) -> None:
    """Drops `mode` records written after `after_step` (by a run that then died)."""
    if jax.process_index() or not os.path.exists(path):
        return
    records = read_jsonl(path)
    kept = [r for r in records if r.get('mode') != mode or r.get('step', 0) <= after_step]
    if len(kept) != len(records):
        with open(path + '.tmp', 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in kept)
        os.replace(path + '.tmp', path)


@rc.resolved
def run_search(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Searches a jackpot in the frozen weights; resumes from WORKDIR/checkpoints if present."""
    s = config.search
    config_checks.check_final_jackpot(config)  # before the search, not after it
    setup = rc.Setup(config)
    weights_path = rc.pretrained_path(config, workdir)
    params, batch_stats, fingerprint = setup.load_weights(weights_path)
    plan = rc.plan_masks(config, params)
    counts = plan.counts
    masks, scores = plan.initial_masks_and_scores(
        params,
        s.score_init,
        mask_update=s.mask_update,
        pruned_score=s.pruned_score,
        rng=rc.score_init_key(config),
    )
    steps = setup.steps_per_epoch(s.batch_size)
    optimizer = search.sgd_optimizer(s.learning_rate, s.weight_decay, s.momentum, s.epochs, steps)
    state = parallel.replicate(
        search.init_search_state(params, batch_stats, masks, scores, optimizer), setup.mesh
    )
    step_fn = search.make_search_step(
        forward=setup.forward,
        optimizer=optimizer,
        counts=counts,
        steps_per_epoch=steps,
        epochs=s.epochs,
        mask_update=s.mask_update,
        rate_schedule=s.rate_schedule,
        bn_mode=s.bn_mode,
        label_smoothing=s.label_smoothing,
        pattern=plan.pattern,
        mask_frozen_from=search.mask_freeze_step(s.mask_freeze_fraction, s.epochs, steps),
        swap_margin=s.swap_margin,
    )

    # Restore: the workdir's own latest checkpoint, else start from the initial masks.
    ckpts = checkpoint.SearchCheckpoints(
        os.path.join(workdir, CHECKPOINTS_DIR), config.checkpoint.keep
    )
    identity = {
        'config': _search_identity(config),
        'counts': counts,
        'weights_fingerprint': fingerprint,
        'weights_path': os.path.abspath(weights_path),
    }
    history: list[dict[str, Any]] = []
    epoch_metrics = EpochMetrics(trace=s.step_trace)
    earlier_seconds = 0.0  # search time before the latest checkpoint, over all earlier runs
    latest = ckpts.latest_step()
    if latest is not None:
        _check_resumable(ckpts.read_meta(latest), identity, ckpts.directory)
        state, meta = ckpts.restore(latest, like=state)
        history = meta['history']
        epoch_metrics = EpochMetrics(meta['epoch_sums'], trace=s.step_trace)
        earlier_seconds = meta.get('search_seconds', 0.0)
        logging.info('resuming the search from step %d of %s', latest, ckpts.directory)
    start = int(parallel.to_host(state.step))
    metrics_path = os.path.join(workdir, METRICS_FILE)
    _truncate_metrics(metrics_path, 'search', start)
    writer = MetricWriter(workdir)

    def jackpot_variables(state):
        """Masked params and the BatchNorm statistics the jackpot is evaluated and saved with."""
        masked = sparsity.masked_params(state.frozen_params, state.masks)
        if not s.bn_recalibration_steps:
            return masked, state.batch_stats
        return masked, rc.adapt_batch_stats(
            setup, masked, state.batch_stats, s.bn_recalibration_steps, s.batch_size
        )

    eval_splits = ('validation', 'test') if setup.source.has_validation else ('test',)

    def evaluate_jackpot(state, record):
        """Adds each split's top-1/top-5 to ``record``; returns the jackpot's statistics.

        With ``search.compare_bn_statistics`` also top-1 under the search's running
        statistics and under ones re-estimated under the mask (``*_running``,
        ``*_recalibrated``), whichever of them the jackpot uses.
        """
        masked, stats = jackpot_variables(state)
        for split in eval_splits:
            result = setup.evaluate(masked, stats, split)
            record.update({f'{split}_top1': result['top1'], f'{split}_top5': result['top5']})
        if s.compare_bn_statistics:
            used = 'recalibrated' if s.bn_recalibration_steps else 'running'
            other = (
                state.batch_stats
                if used == 'recalibrated'
                else rc.adapt_batch_stats(
                    setup, masked, state.batch_stats, DIAGNOSTIC_RECALIBRATION_STEPS, s.batch_size
                )
            )
            for split in eval_splits:
                record[f'{split}_top1_{used}'] = record[f'{split}_top1']
                record[f'{split}_top1_{"running" if used == "recalibrated" else "recalibrated"}'] = (
                    setup.evaluate(masked, other, split)['top1']
                )
        return stats

    selection_split = eval_splits[0]  # validation when there is one, else (the paper) test

    def search_seconds():
        return earlier_seconds + time.perf_counter() - clock

    def save(metrics=None):
        epoch_metrics.flush()
        meta = {'history': history, 'epoch_sums': epoch_metrics.sums}
        ckpts.save(state, {**identity, **meta, 'search_seconds': search_seconds()}, metrics)

    every = config.checkpoint.every_steps
    jackpot_stats = None  # those of the last epoch evaluated here
    clock = time.perf_counter()
    try:
        with rc.progress(s.epochs * steps, s.batch_size, 'search', initial=start) as bar:
            for epoch in range(start // steps, s.epochs):
                first = start - epoch * steps if epoch == start // steps else 0
                # The steps never wait on the host; only checkpoints and the epoch's end may.
                with jax.transfer_guard_device_to_host('disallow'):
                    batches = setup.train_epoch(s.batch_size, epoch, first)
                    for i, batch in enumerate(batches, first + 1):
                        state, metrics = step_fn(state, *batch)
                        global_step = epoch * steps + i
                        epoch_metrics.add(global_step, metrics)
                        bar.update()
                        if every and global_step % every == 0 and i < steps:
                            with jax.transfer_guard_device_to_host('allow'):
                                save()
                record = {
                    'mode': 'search',
                    'epoch': epoch + 1,
                    'step': (epoch + 1) * steps,
                    'learning_rate': rc.epoch_learning_rate(s, epoch),
                    **epoch_metrics.result(),
                }
                jackpot_stats = evaluate_jackpot(state, record)
                history.append(record)
                writer.write(record)
                epoch_metrics = EpochMetrics(trace=s.step_trace)
                save({'selection_top1': record[f'{selection_split}_top1']})
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    test_top1=f"{record['test_top1']:.4f}",
                    changes=record['mask_changes'],
                )
                logging.info(
                    'search epoch %d/%d: loss %.4f, train top-1 %.4f, %s, mask changes %d',
                    epoch + 1,
                    s.epochs,
                    record['loss'],
                    record['top1'],
                    ', '.join(f"{k} top-1 {record[k + '_top1']:.4f}" for k in eval_splits),
                    record['mask_changes'],
                )
        ckpts.wait()
        kept, jackpot = history[-1], state
        if s.final_jackpot == 'best_validation':
            kept, jackpot = _best_on_validation(history, ckpts, state)
    except FloatingPointError as e:
        ckpts.wait()
        raise FloatingPointError(
            f'{e}: the search stopped; the last good checkpoint is step {ckpts.latest_step()} in '
            f'{ckpts.directory}. Lower search.learning_rate (or check the data), then rerun: '
            'the search resumes from that checkpoint'
        ) from e
    finally:
        ckpts.wait()
        ckpts.close()
    seconds = search_seconds() if start < s.epochs * steps else earlier_seconds

    host_masks = parallel.to_host(jackpot.masks)
    report = plan.report(params, host_masks)
    # The best epoch (the latest on ties) is chosen on the validation split when there is
    # one; only the paper's protocol (no validation split) chooses it on the test split, as
    # published.
    best = _best_epoch(history, selection_split)
    last = [r['test_top1'] for r in history[-5:]]
    summary = {
        'jackpot_top1': kept['test_top1'],
        'jackpot_top5': kept['test_top5'],
        'jackpot_epoch': kept['epoch'],
        'final_jackpot': s.final_jackpot,
        'last_epoch_top1': history[-1]['test_top1'],
        'best_top1': best['test_top1'],
        'best_epoch': best['epoch'],
        'best_selected_on': selection_split,
        'last5_test_top1_range': [min(last), max(last)],
        'sparsity': report['sparsity'],
        'model_sparsity': report['model_sparsity'],
        'search_seconds': seconds,
        'weights_ever_flipped': int(
            sum(np.count_nonzero(v) for v in parallel.to_host(state.ever_flipped).values())
        ),
    }
    if 'validation_top1' in kept:
        summary['jackpot_validation_top1'] = kept['validation_top1']
    # The last epoch's statistics were computed when this run evaluated it.
    reuse = jackpot is state and jackpot_stats is not None
    stats = jackpot_stats if reuse else jackpot_variables(jackpot)[1]
    checkpoint.save_jackpot(
        rc.jackpot_path(config, workdir),
        None,
        host_masks,
        stats,
        {**identity, 'model': config.model.to_dict(), 'summary': summary},
    )
    logging.info(
        'the jackpot is epoch %d\'s (search.final_jackpot=%s): test top-1 %.4f; last epoch %.4f',
        kept['epoch'],
        s.final_jackpot,
        kept['test_top1'],
        history[-1]['test_top1'],
    )
    logging.info('jackpot sparsity report:\n%s', sparsity.format_sparsity_report(report))
    if jax.process_index() == 0:
        plots.plot_layer_sparsity(report, os.path.join(workdir, LAYER_SPARSITY_PNG))
        plots.plot_mask_changes(history, os.path.join(workdir, MASK_CHANGES_PNG))
    if config.tune.epochs:
        summary['tuned_top1'] = run_tune(config, workdir)['top1']
    return {**summary, 'state': state, 'counts': counts, 'history': history}


def _best_epoch(records: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """The record with the best top-1 on ``split``, the latest on ties."""
    return max(reversed(records), key=lambda r: r[f'{split}_top1'])


def _best_on_validation(
    history: list[dict[str, Any]], ckpts: checkpoint.SearchCheckpoints, state: Any
) -> tuple[dict[str, Any], Any]:
    """The record and search state of the epoch with the best validation top-1 (the
    latest on ties); its state is ``state`` when it is the last epoch, else restored
    from its checkpoint, which the checkpoint policy keeps."""
    saved = set(ckpts.steps())
    candidates = [r for r in history if r['step'] in saved or r is history[-1]]
    best = _best_epoch(candidates, 'validation')
    overall = _best_epoch(history, 'validation')
    if best['validation_top1'] < overall['validation_top1']:
        logging.warning(
            'the checkpoint of epoch %d (best on validation) is gone from %s; keeping epoch %d, '
            'the best one still saved',
            overall['epoch'],
            ckpts.directory,
            best['epoch'],
        )
    if best is history[-1]:
        return best, state
    restored, _ = ckpts.restore(best['step'], like=state)
    return best, restored


@rc.resolved
def mask_baselines(
    config: ml_collections.ConfigDict, setup: rc.Setup, params: Any, batch_stats: Any
) -> dict[str, float]:
    """Test top-1, without retraining, of the magnitude mask and of a random mask
    (``jax.random.key(seed + 1)``) at the search's per-layer counts."""
    plan = rc.plan_masks(config, params)
    masks = {
        'magnitude_top1': plan.magnitude_masks(params),
        'random_top1': plan.random_masks(params, jax.random.key(config.seed + 1)),
    }
    return {
        key: setup.evaluate(sparsity.masked_params(params, m), batch_stats)['top1']
        for key, m in masks.items()
    }


def baseline_accuracies(
    config: ml_collections.ConfigDict, setup: rc.Setup, params: Any, batch_stats: Any
) -> dict[str, float]:
    """Test top-1 of the dense weights, then :func:`mask_baselines`."""
    dense = setup.evaluate(params, batch_stats)['top1']
    return {'dense_top1': dense, **mask_baselines(config, setup, params, batch_stats)}
