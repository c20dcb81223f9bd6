"""Mode ``search``: the search engine (:mod:`jackpot_jax.engine.loop`) over a config's data,
model and weights.

:func:`run_search` builds the engine's settings from ``config.search`` and its task from
the run context, runs (or resumes) the search in WORKDIR/checkpoints, refusing a
checkpoint written under other settings or other weights, and saves the chosen epoch's
jackpot (chosen on the validation split by ``search.selection_rule``) with a summary.
:func:`baseline_accuracies` gives the dense, magnitude and random-mask accuracies it is
compared with.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jackpot_jax.core import parallel, sparsity
from jackpot_jax.core.settings import SearchSettings
from jackpot_jax.engine import loop, persistence as persistence_lib
from jackpot_jax.io import checkpoint
from jackpot_jax.io.workdir import CHECKPOINTS_DIR, LAYER_SPARSITY_PNG, MASK_CHANGES_PNG
from jackpot_jax.launch import config as config_lib, config_checks, plots, run_context as rc
from jackpot_jax.launch.weight_training import run_tune
from jackpot_jax.models import output_layer


def _search_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields a resumed search must share with the one that wrote the checkpoint
    (every field not marked resumable in :mod:`jackpot_jax.launch.config`), '/'-joined as stored."""
    return {k.replace('.', '/'): v for k, v in config_lib.search_identity(config).items()}


def _check_resumable(
    saved: dict[str, Any], expected: dict[str, Any], directory: str, after_nan_stop: bool = False
) -> None:
    """Raises unless the checkpoint's weights and settings are this search's; after a
    search stopped on a non-finite loss, its learning rate may change."""
    if saved['weights_fingerprint'] != expected['weights_fingerprint']:
        raise ValueError(
            f"the weights at {expected['weights_path']} differ from those the search in "
            f"{directory} started from (saved from {saved['weights_path']}, fingerprint "
            f"{saved['weights_fingerprint'][:12]} != {expected['weights_fingerprint'][:12]}); "
            'point config.pretrained at the original weights, or use a new --workdir'
        )

    def dotted(identity):
        return {k.replace('/', '.'): v for k, v in identity.items()}

    diffs = persistence_lib.resume_differences(
        dotted(saved['config']),
        dotted(expected['config']),
        relaxed=('search.learning_rate',) if after_nan_stop else (),
    )
    if saved.get('initial_masks') != expected.get('initial_masks'):
        diffs.append('initial_masks: other masks started the search in the checkpoints')
    if diffs or saved['counts'] != expected['counts']:
        raise ValueError(
            f'the search checkpoints in {directory} come from a different configuration:\n  '
            + '\n  '.join(diffs or ['per-layer pruned counts differ'])
            + '\nrestore those settings to resume, or use a new --workdir'
        )


def search_settings(config: ml_collections.ConfigDict, has_validation: bool) -> SearchSettings:
    """The engine's settings of a resolved config's ``search`` group."""
    s = config.search
    fields = {f.name for f in dataclasses.fields(SearchSettings)} - {'protocol'}
    return SearchSettings(
        protocol=config.protocol, **{name: s[name] for name in fields if name in s}
    ).resolved(has_validation)


def search_task(
    config: ml_collections.ConfigDict, setup: rc.Setup, params: Any, statistics: Any
) -> loop.SearchTask:
    """The engine's task of a launcher run: its data source, model and mesh."""
    s = config.search
    splits = ('validation', 'test') if setup.source.has_validation else ('test',)
    output_paths = ()
    if s.dense_output_layer:
        dtype = getattr(setup.source, 'input_dtype', jnp.float32)  # token models: integers
        sample = jnp.zeros((1, *setup.source.image_shape), dtype)
        output_paths = output_layer.output_kernels(
            setup.forward, params, statistics, sample, s.prune_include
        )
    return loop.SearchTask(
        forward=setup.forward,
        params=params,
        statistics=statistics,
        mesh=setup.mesh,
        train_epoch=functools.partial(setup.train_epoch, s.batch_size),
        steps_per_epoch=setup.steps_per_epoch(s.batch_size),
        evaluate=setup.evaluate,
        splits=splits,
        rng=jax.random.key(config.seed + 3),
        score_init_rng=rc.score_init_key(config),
        batch_size=s.batch_size,
        step_trace=s.step_trace,
        compare_statistics=s.compare_statistics,
        model_name=f'model {config.model.name!r}',
        excluded_output_paths=output_paths,
    )


@rc.resolved
def run_search(
    config: ml_collections.ConfigDict, workdir: str, initial_masks: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Searches a jackpot in the frozen weights; resumes from WORKDIR/checkpoints if present.

    ``initial_masks`` (flat path -> bool mask at the plan's per-layer counts, e.g. Wanda's)
    start the search instead of the magnitude masks; a resume must be given the same ones.
    """
    config_checks.check_selection_rule(config)  # before the search, not after it
    setup = rc.Setup(config)
    weights_path = rc.pretrained_path(config, workdir)
    params, statistics, fingerprint = setup.load_weights(weights_path)
    task = search_task(config, setup, params, statistics)
    settings = search_settings(config, setup.source.has_validation)
    planned = loop.plan(task, settings)
    counts = planned.counts
    identity = {
        'config': _search_identity(config),
        'counts': counts,
        'weights_fingerprint': fingerprint,
        'weights_path': os.path.abspath(weights_path),
    }
    if initial_masks is not None:
        host_masks = {p: np.asarray(parallel.to_host(m), bool) for p, m in initial_masks.items()}
        task.initial_masks = host_masks
        identity['initial_masks'] = checkpoint.weights_fingerprint(host_masks)
    persistence = persistence_lib.Persistence(
        directory=workdir,
        identity=identity,
        check_resumable=lambda saved, after_nan: _check_resumable(
            saved, identity, os.path.join(workdir, CHECKPOINTS_DIR), after_nan
        ),
        every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep,
    )
    outcome = loop.run(task, settings, persistence, planned)
    history, chosen = outcome.history, outcome.chosen
    report = outcome.plan.report(params, outcome.chosen_masks)
    # The best epoch (the latest on ties) is chosen on the validation split when there is
    # one; only the paper's protocol (no validation split) chooses it on the test split, as
    # published.
    selection_split = task.splits[0]
    best = _best_epoch(history, selection_split)
    last = [r['test_top1'] for r in history[-5:]]
    summary = {
        'jackpot_top1': chosen['test_top1'],
        'jackpot_top5': chosen['test_top5'],
        'jackpot_epoch': chosen['epoch'],
        'selection_rule': settings.selection_rule,
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
        chosen['test_top1'],
        history[-1]['test_top1'],
    )
    logging.info('jackpot sparsity report:\n%s', sparsity.format_sparsity_report(report))
    if jax.process_index() == 0:
        plots.plot_layer_sparsity(report, os.path.join(workdir, LAYER_SPARSITY_PNG))
        plots.plot_mask_changes(history, os.path.join(workdir, MASK_CHANGES_PNG))
    if config.tune.epochs:
        summary['tuned_top1'] = run_tune(config, workdir)['top1']
    return {**summary, 'state': outcome.state, 'counts': counts, 'history': history}


def _best_epoch(records: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """The record with the best top-1 on ``split``, the latest on ties."""
    return max(reversed(records), key=lambda r: r[f'{split}_top1'])


@rc.resolved
def mask_baselines(
    config: ml_collections.ConfigDict, setup: rc.Setup, params: Any, statistics: Any
) -> dict[str, float]:
    """Test top-1, without retraining, of the magnitude mask and of a random mask
    (``jax.random.key(seed + 1)``) at the search's per-layer counts."""
    plan = rc.plan_masks(config, params)
    masks = {
        'magnitude_top1': plan.magnitude_masks(params),
        'random_top1': plan.random_masks(params, jax.random.key(config.seed + 1)),
    }
    return {
        key: setup.evaluate(sparsity.masked_params(params, m), statistics)['top1']
        for key, m in masks.items()
    }


def baseline_accuracies(
    config: ml_collections.ConfigDict, setup: rc.Setup, params: Any, statistics: Any
) -> dict[str, float]:
    """Test top-1 of the dense weights, then :func:`mask_baselines`."""
    dense = setup.evaluate(params, statistics)['top1']
    return {'dense_top1': dense, **mask_baselines(config, setup, params, statistics)}
