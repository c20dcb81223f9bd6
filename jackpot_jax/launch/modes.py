"""The launcher: one function per mode, each a thin layer over library calls, and the
table of modes (:data:`MODES`) that ``jackpot-jax --mode=NAME`` dispatches on.

Workdir layout (names in :mod:`jackpot_jax.io.workdir`):
  pretrained/        dense weights made by 'pretrain' (unless config.pretrained points elsewhere)
  checkpoints/<step> search checkpoints (scores, bit-packed masks, optimizer state, BN stats)
  jackpot/           the found jackpot: bit-packed masks + batch statistics + meta
  tuned/             weights tuned under the jackpot's mask ('tune', or search with tune.epochs)
  masked_weights/    export: the masked dense params, loadable as ordinary weights
  metrics.jsonl      one JSON record per epoch; summary.json: the demo's table
  layer_sparsity.png, mask_changes.png   the search's per-layer sparsity and mask changes
Nothing there is replaced unless config.overwrite (checked before any work): see
workdir.check_search_outputs, check_pretrain_output and check_new_output. Every mode
takes the config :func:`validate` resolved at the launcher's entry.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from jackpot_jax.core import mask_plan, parallel, sparsity
from jackpot_jax.io import checkpoint, workdir as workdir_lib
from jackpot_jax.io.workdir import MASKED_WEIGHTS_DIR, SUMMARY_FILE, TUNED_DIR
from jackpot_jax.launch import config as config_lib, config_checks, run_context as rc, text_eval
from jackpot_jax.launch.search_mode import baseline_accuracies, run_search
from jackpot_jax.launch.studies import (
    lm_pruning,
    overlap,
    restriction,
    search_cost,
    stability,
    sweep,
)
from jackpot_jax.launch.weight_training import ensure_pretrained, run_pretrain, run_tune


def run_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluates the jackpot (masks + its batch statistics) over the weights.

    With ``config.jackpot='none'`` the weights are evaluated as they are, e.g. the
    masked weights written by 'export'. With ``config.data.text_file``, a language
    model's perplexity of that text (:mod:`jackpot_jax.launch.text_eval`).
    """
    if config.data.get('text_file'):
        return text_eval.run_text_perplexity(config, workdir)
    setup = rc.Setup(config)
    params, statistics, fingerprint = setup.load_pretrained(workdir)
    if not config_lib.is_no_jackpot(config.jackpot):
        path = rc.jackpot_path(config, workdir)
        masks, statistics, meta = setup.read_jackpot(path)
        rc.check_jackpot_weights(config, workdir, meta, fingerprint)
        masks, statistics = parallel.replicate((masks, statistics), setup.mesh)
        params = sparsity.masked_params(params, masks)
        what = f'jackpot {path}'
    else:
        s = config.search
        kernels = mask_plan.prunable_kernels(params, s.prune_include, s.prune_exclude)
        masks = {p: w != 0 for p, w in kernels.items()}
        what = f'weights {workdir_lib.pretrained_path(workdir, config.pretrained)}'
    result = setup.split_metrics(params, statistics)
    report = mask_plan.mask_report(params, parallel.to_host(masks), config.search.pattern)
    rc.print_main(sparsity.format_sparsity_report(report))
    rc.print_main(f"{what}: test top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}")
    tuned = workdir_lib.path(workdir, TUNED_DIR)
    if os.path.isdir(tuned) and not config.pretrained:
        tuned_params, tuned_stats, _ = setup.load_weights(tuned)
        result['tuned_top1'] = setup.split_metrics(tuned_params, tuned_stats)['top1']
        rc.print_main(f"tuned weights {tuned}: test top-1 {result['tuned_top1']:.4f}")
    return {**result, 'sparsity': report['sparsity']}


def run_export(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Writes the jackpot's masked dense params as ordinary weights (WORKDIR/masked_weights).

    Refuses to replace masked weights already there unless ``config.overwrite``.
    """
    out = workdir_lib.path(workdir, MASKED_WEIGHTS_DIR)
    workdir_lib.check_new_output(out, 'masked weights', config.overwrite)
    setup = rc.Setup(config)
    params, _, fingerprint = setup.load_pretrained(workdir)
    masks, statistics, meta = setup.read_jackpot(rc.jackpot_path(config, workdir))
    rc.check_jackpot_weights(config, workdir, meta, fingerprint)
    masked = parallel.to_host(sparsity.masked_params(params, parallel.replicate(masks, setup.mesh)))
    checkpoint.save_weights(
        out,
        masked,
        statistics,
        {
            'model': config.model.to_dict(),
            'num_classes': setup.source.num_classes,
            'source': f'masked by {rc.jackpot_path(config, workdir)}',
        },
    )
    rc.print_main(
        f'masked weights written to {out}; evaluate them with '
        f'--mode=evaluate --config.pretrained={out} --config.jackpot=none'
    )
    return {'masked_weights': out}


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Pretrain -> search -> compare with magnitude and random masks; writes summary.json.

    Reuses the pre-trained weights already there; refuses, before any training, a search
    that :func:`workdir.check_search_outputs` refuses.
    """
    total_start = time.perf_counter()
    _check_search_outputs(config, workdir)
    ensure_pretrained(config, workdir)
    setup = rc.Setup(config)
    params, statistics, _ = setup.load_pretrained(workdir)
    summary = baseline_accuracies(config, setup, params, statistics)
    found = run_search(config, workdir)
    for key in (
        'jackpot_top1',
        'jackpot_epoch',
        'jackpot_choice',
        'selection_rule',
        'last_epoch_top1',
        'best_top1',
        'best_epoch',
        'best_selected_on',
        'last5_test_top1_range',
        'sparsity',
        'model_sparsity',
        'search_seconds',
    ):
        summary[key] = found[key]
    summary['total_seconds'] = time.perf_counter() - total_start
    if jax.process_index() == 0:
        with open(workdir_lib.path(workdir, SUMMARY_FILE), 'w') as f:
            json.dump(summary, f, indent=2)
    rc.print_main(format_summary(config, summary))
    return summary


def run_search_mode(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Searches a jackpot in the frozen weights; resumes from WORKDIR/checkpoints if present.

    :func:`search_mode.run_search` once :func:`workdir.check_search_outputs` allows
    its outputs: never a jackpot outside the workdir, nor over one it would not resume,
    unless ``config.overwrite``.
    """
    _check_search_outputs(config, workdir)
    return run_search(config, workdir)


def _check_search_outputs(config: ml_collections.ConfigDict, workdir: str) -> None:
    workdir_lib.check_search_outputs(
        workdir, config.jackpot, tunes=bool(config.tune.epochs), overwrite=config.overwrite
    )


def run_tune_mode(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains the kept weights of the workdir's jackpot (pruned weights stay exactly zero).

    :func:`weight_training.run_tune`, refused if WORKDIR/tuned exists, unless
    ``config.overwrite``.
    """
    workdir_lib.check_new_output(
        workdir_lib.path(workdir, TUNED_DIR), 'tuned weights', config.overwrite
    )
    return run_tune(config, workdir)


def format_summary(config: ml_collections.ConfigDict, summary: dict[str, Any]) -> str:
    rows = [
        ('dense (pre-trained, all weights)', summary['dense_top1']),
        ('magnitude-pruned, no retraining', summary['magnitude_top1']),
        ('random mask, same per-layer counts', summary['random_top1']),
        ('lottery jackpot, no weight trained', summary['jackpot_top1']),
    ]
    lines = [
        f"{config.model.name} on {config.data.name}, "
        f"sparsity {summary['sparsity']:.2%} of prunable weights "
        f"({summary['model_sparsity']:.2%} of the whole model)",
        f"{'':36}  test top-1",
    ]
    lines += [f'{name:<36}  {value:>9.2%}' for name, value in rows]
    lines.append(f"the chosen epoch: {summary['jackpot_choice']}")
    lines.append(f"the last epoch's jackpot: test top-1 {summary['last_epoch_top1']:.2%}")
    lines.append(
        f"search time {summary['search_seconds']:.1f} s, total {summary['total_seconds']:.1f} s"
    )
    return '\n'.join(lines)


MODES: dict[str, Callable[[ml_collections.ConfigDict, str], dict[str, Any]]] = {
    'demo': run_demo,
    'pretrain': run_pretrain,
    'search': run_search_mode,
    'tune': run_tune_mode,
    'evaluate': run_evaluate,
    'export': run_export,
    'overlap': overlap.run_overlap,
    'search_cost': search_cost.run_search_cost,
    'restriction': restriction.run_restriction,
    'sweep': sweep.run_sweep,
    'stability': stability.run_stability,
    'lm_pruning': lm_pruning.run_lm_pruning,
}


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config resolved (every field left unset filled by its protocol), once, at the
    launcher's entry; raises ValueError naming the first bad field (the mode included) and
    how to fix it."""
    return config_checks.resolved(config, tuple(MODES))
