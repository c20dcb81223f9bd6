"""Mode ``search``: the search engine (:mod:`jackpot_jax.engine.loop`) over a config's data,
model and weights.

:func:`run_search` builds the engine's task from the run context and its plan with
:func:`search_plan`, runs (or resumes) the search in WORKDIR/checkpoints, refusing a
checkpoint written under other settings or other weights, and saves the chosen epoch's
jackpot (chosen on the validation split by ``search.selection_rule``) with a summary.
:func:`baseline_accuracies` gives the dense, magnitude and random-mask accuracies it is
compared with, at the counts of the same plan.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jackpot_jax.core import mask_plan, parallel, sparsity
from jackpot_jax.engine import batch_checks, loop, persistence as persistence_lib
from jackpot_jax.io import checkpoint, workdir as workdir_lib
from jackpot_jax.core.errors import UserError
from jackpot_jax.launch import (
    config as config_lib,
    config_checks,
    plots,
    run_context as rc,
    weight_training,
)
from jackpot_jax.launch.weight_training import run_tune
from jackpot_jax.models import output_layer


def search_plan(
    config: ml_collections.ConfigDict, setup: rc.Setup, params: Any, statistics: Any
) -> mask_plan.MaskPlan:
    """The search's mask plan (:func:`jackpot_jax.engine.loop.plan`), its output layer left
    dense when ``search.dense_output_layer``: the one plan of the search and of the masks
    it is compared with."""
    s = config.search
    output_paths = ()
    if s.dense_output_layer:
        dtype = getattr(setup.source, 'input_dtype', jnp.float32)  # token models: integers
        sample = jnp.zeros((1, *setup.source.image_shape), dtype)
        output_paths = output_layer.output_kernels(
            setup.forward, params, statistics, sample, s.prune_include
        )
    settings = config_checks.search_settings(config)
    return loop.plan(params, settings, output_paths, model_name=f'model {config.model.name!r}')


def search_task(
    config: ml_collections.ConfigDict, setup: rc.Setup, params: Any, statistics: Any
) -> loop.SearchTask:
    """The engine's task of a launcher run: its data source, model and mesh."""
    s = config.search
    return loop.SearchTask(
        forward=setup.forward,
        params=params,
        statistics=statistics,
        mesh=setup.mesh,
        train_epoch=functools.partial(setup.train_epoch, s.batch_size),
        steps_per_epoch=setup.steps_per_epoch(s.batch_size),
        split_metrics=setup.split_metrics,
        splits=('validation', 'test') if setup.source.has_validation else ('test',),
        rng=jax.random.key(config.seed + 3),
        score_init_rng=score_init_key(config),
        step_trace=s.step_trace,
        compare_statistics=s.compare_statistics,
    )


def score_init_key(config: ml_collections.ConfigDict) -> jax.Array:
    """The key of drawn score inits ('kaiming', 'random'): ``jax.random.key(seed + 2)``."""
    return jax.random.key(config.seed + 2)


def run_search(
    config: ml_collections.ConfigDict,
    workdir: str,
    initial_masks: dict[str, Any] | None = None,
    initial_scores: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Searches a jackpot in the frozen weights; resumes from WORKDIR/checkpoints if present.

    ``initial_masks`` (flat path -> bool mask at the plan's per-layer counts, e.g. Wanda's)
    start the search instead of the magnitude masks, ``initial_scores`` (which must pick
    them) instead of 1.0 / ``search.pruned_score``; a resume must be given the same ones.
    """
    setup = rc.Setup(config)
    weights_path = workdir_lib.pretrained_path(workdir, config.pretrained)
    params, statistics, fingerprint = setup.load_weights(weights_path)
    task = search_task(config, setup, params, statistics)
    planned = search_plan(config, setup, params, statistics)
    host = None if initial_masks is None else parallel.to_host(dict(initial_masks))
    task.set_start(planned, params, host, initial_scores, config.search.mask_update)
    identity = persistence_lib.search_identity(
        # The config fields a resumed search must share with the one that wrote the
        # checkpoint (every field not marked resumable in jackpot_jax.launch.config),
        # '/'-joined as stored.
        {k.replace('.', '/'): v for k, v in config_lib.search_identity(config).items()},
        planned.counts,
        fingerprint,
        persistence_lib.start_fingerprint(task.initial_masks, task.initial_scores),
        weights_path=os.path.abspath(weights_path),
    )
    persistence = persistence_lib.Persistence(
        directory=workdir,
        identity=identity,
        every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep,
        weights_fix='point config.pretrained at the original weights',
        elsewhere='a new --workdir',
    )
    settings = config_checks.search_settings(config)
    metrics = batch_checks.DEFAULT_METRICS  # the launcher's task: the default loss
    batch_checks.check_selection_metric(settings, metrics, prefix='search.')
    outcome = loop.run(task, settings, planned, persistence)
    summary = _summary(outcome, params, task.splits[0], settings.selection_rule)
    checkpoint.save_jackpot(
        rc.jackpot_path(config, workdir),
        None,
        outcome.chosen_masks,
        outcome.chosen_statistics,
        {**identity, 'model': config.model.to_dict(), 'summary': summary},
    )
    logging.info(
        'the chosen epoch: %s; test top-1 %.4f; last epoch %.4f',
        outcome.choice,
        outcome.chosen['test_top1'],
        outcome.history[-1]['test_top1'],
    )
    report = outcome.plan.report(params, outcome.chosen_masks)
    logging.info('jackpot sparsity report:\n%s', sparsity.format_sparsity_report(report))
    if jax.process_index() == 0:
        plots.plot_layer_sparsity(report, workdir_lib.path(workdir, workdir_lib.LAYER_SPARSITY_PNG))
        plots.plot_mask_changes(
            outcome.history, workdir_lib.path(workdir, workdir_lib.MASK_CHANGES_PNG)
        )
    if config.tune.epochs:
        summary['tuned_top1'] = _tuned_top1(config, workdir, outcome.chosen_masks)
    return {
        **summary,
        'state': outcome.state,
        'counts': planned.counts,
        'history': outcome.history,
    }


def _tuned_top1(config: ml_collections.ConfigDict, workdir: str, masks: Any) -> float:
    """Tunes the jackpot's kept weights into WORKDIR/tuned: its test top-1. Tuned weights
    already there that this jackpot and these tune settings made (a finished search run
    again) are kept as they are; any others are refused unless ``config.overwrite``."""
    tuned = workdir_lib.path(workdir, workdir_lib.TUNED_DIR)
    if os.path.isdir(tuned) and not config.overwrite:
        meta = checkpoint.load_weights(tuned)[2]
        if meta.get('tuned_by') == weight_training.tuned_by(config, masks):
            logging.info('%s holds this jackpot tuned as configured: kept as it is', tuned)
            return meta['test_top1']
        raise UserError(
            f'{tuned} holds weights tuned under another jackpot or other tune settings; move '
            'it elsewhere first, or pass --config.overwrite=true to replace it'
        )
    return run_tune(config, workdir)['top1']


def _summary(
    outcome: loop.SearchOutcome, params: Any, selection_split: str, rule: str
) -> dict[str, Any]:
    """The search's result in the jackpot's meta and the demo's table. The best epoch (the
    latest on ties) is the one on the validation split when there is one; only the paper's
    protocol (no validation split) chooses it on the test split, as published."""
    history, chosen = outcome.history, outcome.chosen
    best = max(reversed(history), key=lambda r: r[f'{selection_split}_top1'])
    last = [r['test_top1'] for r in history[-5:]]
    report = outcome.plan.report(params, outcome.chosen_masks)
    summary = {
        'jackpot_top1': chosen['test_top1'],
        'jackpot_top5': chosen['test_top5'],
        'jackpot_epoch': chosen['epoch'],
        'selection_rule': rule,
        'jackpot_choice': outcome.choice,
        'last_epoch_top1': history[-1]['test_top1'],
        'best_top1': best['test_top1'],
        'best_epoch': best['epoch'],
        'best_selected_on': selection_split,
        'last5_test_top1_range': [min(last), max(last)],
        'sparsity': report['sparsity'],
        'model_sparsity': report['model_sparsity'],
        'search_seconds': outcome.search_seconds,
        'weights_ever_flipped': int(
            sum(np.count_nonzero(v) for v in parallel.to_host(outcome.state.ever_flipped).values())
        ),
    }
    if 'validation_top1' in chosen:
        summary['jackpot_validation_top1'] = chosen['validation_top1']
    return summary


def mask_baselines(
    config: ml_collections.ConfigDict, setup: rc.Setup, params: Any, statistics: Any
) -> dict[str, float]:
    """Test top-1, without retraining, of the magnitude mask and of a random mask
    (``jax.random.key(seed + 1)``) at the search's per-layer counts (its own plan)."""
    plan = search_plan(config, setup, params, statistics)
    masks = {
        'magnitude_top1': plan.magnitude_masks(params),
        'random_top1': plan.random_masks(params, jax.random.key(config.seed + 1)),
    }
    return {
        key: setup.split_metrics(sparsity.masked_params(params, m), statistics)['top1']
        for key, m in masks.items()
    }


def baseline_accuracies(
    config: ml_collections.ConfigDict, setup: rc.Setup, params: Any, statistics: Any
) -> dict[str, float]:
    """Test top-1 of the dense weights, then :func:`mask_baselines`."""
    dense = setup.split_metrics(params, statistics)['top1']
    return {'dense_top1': dense, **mask_baselines(config, setup, params, statistics)}
