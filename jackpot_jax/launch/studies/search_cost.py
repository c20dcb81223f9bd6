"""Study 'search_cost': one search per score initialisation (magnitude, edge-popup's
Kaiming uniform, random) at the same per-layer counts: test top-1 per epoch and the
epochs each needs to reach a target. Writes ``search_cost.json`` / ``.png``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from jackpot_jax.launch import config as config_lib, plots
from jackpot_jax.launch.studies import common

SEARCH_COST_BASELINE = 'kaiming'


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
            'loss': [[r['epoch'], r['train_loss']] for r in run['history']],
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
    inits = config_lib.parse_list('search_cost.inits', config.search_cost.inits)
    overrides = {init: {'search.score_init': init} for init in inits}
    runs = common.run_variants(config, workdir, 'search_cost', overrides)
    result = {**common.header(config), **search_cost_summary(runs, config.search_cost.target)}

    def plot(path: str) -> None:
        plots.plot_curves(
            {name: row['test_top1'] for name, row in result['runs'].items()},
            path,
            xlabel='search epoch',
            ylabel='test top-1 (no weight trained)',
            title=f"Score initialisation: {result['model']} on {result['data']}, "
            f"sparsity {result['sparsity']:.0%}",
            hline=(result['target_top1'], 'target'),
        )

    common.save_result(workdir, 'search_cost', result, plot, format_search_cost(result))
    return result
