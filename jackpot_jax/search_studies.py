"""Studies that run several searches side by side over the same frozen weights.

* ``search_cost``: one search per score initialisation (magnitude, edge-popup's
  Kaiming uniform, random) at the same per-layer counts: test top-1 per epoch and
  the epochs each needs to reach a target. Writes ``search_cost.json`` / ``.png``.
* ``restriction``: the short restriction at rates ``all`` / ``poly4`` / ``cosine``
  and the 2021 ``edge_popup`` rule: loss per step, accuracy per epoch, mask changes
  per step and per layer, and flip-backs (changes of weights that had flipped
  before: the mask oscillating). Telemetry is the search step's own metrics.
  Writes ``restriction.json`` / ``.png``.
* ``sweep``: accuracy vs sparsity for the jackpot, the magnitude mask and a random
  mask (no weight trained). Writes ``sweep.json`` and ``accuracy_vs_sparsity.png``.
* ``stability``: why a jackpot's accuracy swings from epoch to epoch. The paper's
  protocol, each change of the stable protocol alone (BatchNorm statistics re-estimated
  under the mask; masks frozen for the last epochs) and the stable protocol; every epoch
  is evaluated with both the search's running statistics and re-estimated ones, and
  every step's mask changes and flip-backs are recorded beside the learning rate.
  Writes ``stability.json`` / ``.png``.

Each variant is an ordinary, resumable search in ``WORKDIR/<study>/<variant>``
(its own checkpoints, jackpot, metrics and plots) over ``WORKDIR/pretrained``,
which is trained first if missing; rerunning a study resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections

from jackpot_jax import config as config_lib
from jackpot_jax import plots, sparsity, train

SEARCH_COST_BASELINE = 'kaiming'
# Config overrides of each variant of the 'restriction' study.
RESTRICTION_OVERRIDES = {
    **{
        rate: {'search.mask_update': 'short_restriction', 'search.rate_schedule': rate}
        for rate in sparsity.RATE_SCHEDULES
    },
    'edge_popup': {'search.mask_update': 'edge_popup', 'search.rate_schedule': 'all'},
}
# Config overrides of each variant of the 'stability' study (the protocol fills the rest).
STABILITY_OVERRIDES = {
    'paper': {'protocol': 'paper'},
    'paper+recalibration': {
        'protocol': 'paper',
        'search.bn_recalibration_steps': config_lib.PROTOCOLS['stable'][
            'search.bn_recalibration_steps'
        ],
    },
    'paper+freeze': {
        'protocol': 'paper',
        'search.mask_freeze_fraction': config_lib.PROTOCOLS['stable']['search.mask_freeze_fraction'],
    },
    'stable': {'protocol': 'stable'},
}


# ----------------------------------------------------------------------------
# Running one variant.
# ----------------------------------------------------------------------------
def variant_config(
    config: ml_collections.ConfigDict, workdir: str, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """A search config over the study's frozen weights with dotted-key ``overrides``."""
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.mode = 'search'
    sub.pretrained = os.path.abspath(train.pretrained_path(config, workdir))
    sub.jackpot = ''
    sub.tune.epochs = 0
    for key, value in overrides.items():
        if '.' in key:
            group, field = key.split('.')
            sub[group][field] = value
        else:
            sub[key] = value
    config_lib.validate(sub)
    return sub


def run_variant(
    config: ml_collections.ConfigDict,
    workdir: str,
    study: str,
    name: str,
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    """One search of a study, in ``WORKDIR/<study>/<name>``; its summary and epoch history."""
    sub = variant_config(config, workdir, overrides)
    folder = os.path.join(workdir, study, name)
    train.print_main(f'{study}: searching {name} in {folder}')
    found = train.run_search(sub, folder)
    return {k: v for k, v in found.items() if k not in ('state', 'counts')} | {'workdir': folder}


def _write(workdir: str, name: str, result: Mapping[str, Any]) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, name), 'w') as f:
            json.dump(result, f, indent=2)


def _header(config: ml_collections.ConfigDict) -> dict[str, Any]:
    s = config.search
    return {
        'model': config.model.name,
        'data': config.data.name,
        'sparsity': s.sparsity,
        'allocation': s.allocation,
        'epochs': s.epochs,
    }


# ----------------------------------------------------------------------------
# Search cost: score initialisations.
# ----------------------------------------------------------------------------
def epochs_to_target(history: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """The first epoch whose test top-1 reaches ``target``; None if none does."""
    return next((r['epoch'] for r in history if r['test_top1'] >= target), None)


def epochs_to_stay(history: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """The first epoch from which the test top-1 stays at or above ``target`` to the end;
    None if the last epoch is below it. Sturdier than :func:`epochs_to_target` when the
    curve is noisy (a lucky early epoch does not count)."""
    below = [r['epoch'] for r in history if r['test_top1'] < target]
    if below and below[-1] == history[-1]['epoch']:
        return None
    return below[-1] + 1 if below else history[0]['epoch']


def _ratio(baseline: int | None, value: int | None) -> float | None:
    return baseline / value if baseline and value else None


def search_cost_summary(
    runs: Mapping[str, Mapping[str, Any]], target: float = 0.0
) -> dict[str, Any]:
    """Epochs to target per init and the speed-up over the baseline (edge-popup's init).

    ``target`` 0 means the baseline's final test top-1 (what edge-popup's init gets
    for the full search). speed-up = baseline epochs / this init's epochs, counted to
    the first epoch at the target and to the epoch from which it stays there;
    ``mean_top1`` (the test top-1 averaged over the epochs, the area under the curve)
    summarises a whole curve without a target.
    """
    baseline = SEARCH_COST_BASELINE if SEARCH_COST_BASELINE in runs else list(runs)[-1]
    if not target:
        target = runs[baseline]['history'][-1]['test_top1']
    first = {name: epochs_to_target(run['history'], target) for name, run in runs.items()}
    stay = {name: epochs_to_stay(run['history'], target) for name, run in runs.items()}
    rows = {}
    for name, run in runs.items():
        top1 = [r['test_top1'] for r in run['history']]
        rows[name] = {
            'test_top1': [[r['epoch'], r['test_top1']] for r in run['history']],
            'loss': [[r['epoch'], r['loss']] for r in run['history']],
            'final_top1': top1[-1],
            'best_top1': max(top1),
            'mean_top1': sum(top1) / len(top1),
            'epochs_to_target': first[name],
            'epochs_to_stay': stay[name],
            'speedup': _ratio(first[baseline], first[name]),
            'speedup_to_stay': _ratio(stay[baseline], stay[name]),
            'search_seconds': run['search_seconds'],
            'workdir': run['workdir'],
        }
    return {'target_top1': target, 'baseline': baseline, 'runs': rows}


def format_search_cost(result: Mapping[str, Any]) -> str:
    lines = [
        f"{result['model']} on {result['data']}, sparsity {result['sparsity']:.2%}, "
        f"{result['epochs']} epochs; target test top-1 {result['target_top1']:.2%}; "
        f"speed-up: {result['baseline']}'s epochs / these",
        f"{'score init':<12}  {'final':>7}  {'best':>7}  {'mean':>7}  "
        f"{'reaches target':>14}  {'speed-up':>8}  {'stays from':>10}  {'speed-up':>8}",
    ]

    def cell(value, fmt, width):
        return f"{format(value, fmt) if value else '-':>{width}}"

    def speed(value):
        return cell(value and f'{value:.2f}x', 's', 8)

    for name, row in result['runs'].items():
        lines.append(
            f"{name:<12}  {row['final_top1']:>7.2%}  {row['best_top1']:>7.2%}  "
            f"{row['mean_top1']:>7.2%}  {cell(row['epochs_to_target'], 'd', 14)}  "
            f"{speed(row['speedup'])}  {cell(row['epochs_to_stay'], 'd', 10)}  "
            f"{speed(row['speedup_to_stay'])}"
        )
    return '\n'.join(lines)


def run_search_cost(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Mode 'search_cost': one search per ``search_cost.inits``; curves and epochs to target."""
    train.ensure_pretrained(config, workdir)
    inits = config_lib.parse_list('search_cost.inits', config.search_cost.inits)
    runs = {
        init: run_variant(config, workdir, 'search_cost', init, {'search.score_init': init})
        for init in inits
    }
    result = {**_header(config), **search_cost_summary(runs, config.search_cost.target)}
    _write(workdir, 'search_cost.json', result)
    if jax.process_index() == 0:
        plots.plot_curves(
            {name: row['test_top1'] for name, row in result['runs'].items()},
            os.path.join(workdir, 'search_cost.png'),
            xlabel='search epoch',
            ylabel='test top-1 (no weight trained)',
            title=f"Score initialisation: {result['model']} on {result['data']}, "
            f"sparsity {result['sparsity']:.0%}",
            hline=(result['target_top1'], 'target'),
        )
    train.print_main(format_search_cost(result))
    return result


# ----------------------------------------------------------------------------
# Short-restriction study: mask-update rules and their telemetry.
# ----------------------------------------------------------------------------
def restriction_summary(run: Mapping[str, Any]) -> dict[str, Any]:
    """Curves and per-layer totals of one search with ``search.step_trace`` on."""
    history = run['history']
    trace = {key: [x for r in history for x in r['trace'][key]] for key in history[0]['trace']}
    layers = sorted(history[0]['mask_changes_per_layer'])
    per_layer = {
        key: {p: sum(r[key + '_per_layer'][p] for r in history) for p in layers}
        for key in ('mask_changes', 'flip_backs')
    }
    changes, flip_backs = (sum(r[key] for r in history) for key in ('mask_changes', 'flip_backs'))
    return {
        'final_top1': history[-1]['test_top1'],
        'best_top1': max(r['test_top1'] for r in history),
        'test_top1': [[r['epoch'], r['test_top1']] for r in history],
        'steps': trace,
        'mask_changes': changes,
        'flip_backs': flip_backs,
        'flip_back_share': flip_backs / changes if changes else 0.0,
        'weights_ever_flipped': run['weights_ever_flipped'],
        'mask_changes_per_layer': per_layer['mask_changes'],
        'flip_backs_per_layer': per_layer['flip_backs'],
        'search_seconds': run['search_seconds'],
        'workdir': run['workdir'],
    }


def format_restriction(result: Mapping[str, Any]) -> str:
    lines = [
        f"{result['model']} on {result['data']}, sparsity {result['sparsity']:.2%}, "
        f"{result['epochs']} epochs",
        f"{'mask update':<12}  {'final':>7}  {'best':>7}  {'changes':>9}  {'flip-backs':>10}  "
        f"{'share':>6}  {'ever flipped':>12}",
    ]
    for name, row in result['runs'].items():
        lines.append(
            f"{name:<12}  {row['final_top1']:>7.2%}  {row['best_top1']:>7.2%}  "
            f"{row['mask_changes']:>9,}  {row['flip_backs']:>10,}  {row['flip_back_share']:>6.1%}  "
            f"{row['weights_ever_flipped']:>12,}"
        )
    lines.append(
        'flip-backs: changes of weights that had flipped before; share = flip-backs / changes'
    )
    return '\n'.join(lines)


def run_restriction(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Mode 'restriction': one search per ``restriction.variants``, with per-step telemetry."""
    train.ensure_pretrained(config, workdir)
    variants = config_lib.parse_list('restriction.variants', config.restriction.variants)
    runs = {
        name: run_variant(
            config,
            workdir,
            'restriction',
            name,
            {**RESTRICTION_OVERRIDES[name], 'search.step_trace': True},
        )
        for name in variants
    }
    result = {**_header(config), 'runs': {n: restriction_summary(r) for n, r in runs.items()}}
    _write(workdir, 'restriction.json', result)
    if jax.process_index() == 0:
        plots.plot_restriction(result, os.path.join(workdir, 'restriction.png'))
    train.print_main(format_restriction(result))
    return result


# ----------------------------------------------------------------------------
# Accuracy vs sparsity.
# ----------------------------------------------------------------------------
def format_sweep(result: Mapping[str, Any]) -> str:
    lines = [
        f"{result['model']} on {result['data']}: test top-1, no weight trained "
        f"(dense {result['dense_top1']:.2%})",
        f"{'sparsity':>8}  {'jackpot':>8}  {'magnitude':>9}  {'random':>7}",
    ]
    for row in result['rows']:
        lines.append(
            f"{row['sparsity']:>8.2%}  {row['jackpot_top1']:>8.2%}  "
            f"{row['magnitude_top1']:>9.2%}  {row['random_top1']:>7.2%}"
        )
    return '\n'.join(lines)


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Mode 'sweep': a jackpot per ``sweep.sparsities``, against magnitude and random masks."""
    train.ensure_pretrained(config, workdir)
    setup = train.Setup(config)
    params, batch_stats, _ = setup.load_weights(train.pretrained_path(config, workdir))
    rows, dense = [], None
    for value in config_lib.parse_list('sweep.sparsities', config.sweep.sparsities, float):
        overrides = {'search.sparsity': value}
        baselines = train.baseline_accuracies(
            variant_config(config, workdir, overrides), setup, params, batch_stats
        )
        dense = baselines.pop('dense_top1')
        run = run_variant(config, workdir, 'sweep', f'{value:g}', overrides)
        rows.append(
            {
                'sparsity': run['sparsity'],
                'jackpot_top1': run['jackpot_top1'],
                'best_top1': run['best_top1'],
                **baselines,
                'workdir': run['workdir'],
            }
        )
    result = {**_header(config), 'dense_top1': dense, 'rows': rows}
    del result['sparsity']
    _write(workdir, 'sweep.json', result)
    if jax.process_index() == 0:
        plots.plot_curves(
            {
                name: [(r['sparsity'], r[key]) for r in rows]
                for name, key in [
                    ('jackpot (search only)', 'jackpot_top1'),
                    ('magnitude, no retraining', 'magnitude_top1'),
                    ('random mask', 'random_top1'),
                ]
            },
            os.path.join(workdir, 'accuracy_vs_sparsity.png'),
            xlabel='sparsity (fraction of prunable weights removed)',
            ylabel='test top-1',
            title=f"{result['model']} on {result['data']}: no weight trained",
            hline=(dense, 'dense'),
        )
    train.print_main(format_sweep(result))
    return result


# ----------------------------------------------------------------------------
# Stability: BatchNorm statistics, mask oscillation and the learning rate.
# ----------------------------------------------------------------------------
def stability_summary(run: Mapping[str, Any]) -> dict[str, Any]:
    """Per-epoch accuracies under both statistics, and per-step mask telemetry."""
    history = run['history']
    trace = {key: [x for r in history for x in r['trace'][key]] for key in history[0]['trace']}
    curves = {
        key: [[r['epoch'], r[key]] for r in history]
        for key in history[0]
        if key.endswith(('_top1_running', '_top1_recalibrated')) or key in ('test_top1',)
    }
    last = [r['test_top1'] for r in history[-5:]]
    return {
        'final_top1': history[-1]['test_top1'],
        'last5_test_top1_range': [min(last), max(last)],
        'curves': curves,
        'learning_rate': [[r['epoch'], r['learning_rate']] for r in history],
        'mask_changes': [[r['epoch'], r['mask_changes']] for r in history],
        'flip_backs': [[r['epoch'], r['flip_backs']] for r in history],
        'steps': trace,
        'search_seconds': run['search_seconds'],
        'workdir': run['workdir'],
    }


def format_stability(result: Mapping[str, Any]) -> str:
    lines = [
        f"{result['model']} on {result['data']}, sparsity {result['sparsity']:.2%}, "
        f"{result['epochs']} epochs; test top-1 of the jackpot as each variant saves it",
        f"{'variant':<20}  {'final':>7}  {'last 5 epochs':>17}  {'running stats':>13}  "
        f"{'re-estimated':>12}  {'last-epoch changes':>18}  {'flip-backs':>10}",
    ]
    for name, row in result['runs'].items():
        low, high = row['last5_test_top1_range']
        running = row['curves']['test_top1_running'][-1][1]
        recalibrated = row['curves']['test_top1_recalibrated'][-1][1]
        lines.append(
            f"{name:<20}  {row['final_top1']:>7.2%}  {low:>7.2%} - {high:>7.2%}  "
            f"{running:>13.2%}  {recalibrated:>12.2%}  {row['mask_changes'][-1][1]:>18,}  "
            f"{row['flip_backs'][-1][1]:>10,}"
        )
    lines.append('running / re-estimated: the final masks under each BatchNorm statistics')
    return '\n'.join(lines)


def run_stability(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Mode 'stability': one search per ``stability.variants``, both statistics per epoch."""
    train.ensure_pretrained(config, workdir)
    variants = config_lib.parse_list('stability.variants', config.stability.variants)
    runs = {
        name: run_variant(
            config,
            workdir,
            'stability',
            name,
            {
                **STABILITY_OVERRIDES[name],
                'search.step_trace': True,
                'search.compare_bn_statistics': True,
            },
        )
        for name in variants
    }
    result = {**_header(config), 'runs': {n: stability_summary(r) for n, r in runs.items()}}
    _write(workdir, 'stability.json', result)
    if jax.process_index() == 0:
        plots.plot_stability(result, os.path.join(workdir, 'stability.png'))
    train.print_main(format_stability(result))
    return result


STUDIES: dict[str, Callable[[ml_collections.ConfigDict, str], dict[str, Any]]] = {
    'search_cost': run_search_cost,
    'restriction': run_restriction,
    'sweep': run_sweep,
    'stability': run_stability,
}
