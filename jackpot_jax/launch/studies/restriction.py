"""Study 'restriction': the short restriction at rates ``constant`` / ``poly4`` / ``cosine``
and the 2021 ``edge_popup`` rule: loss per step, accuracy per epoch, mask changes per
step and per layer, and flip-backs (changes of weights that had flipped before: the
mask oscillating). Telemetry is the search step's own metrics. Writes
``restriction.json`` / ``.png``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from jackpot_jax.core import sparsity
from jackpot_jax.launch import config as config_lib, plots
from jackpot_jax.launch.studies import common

# Config overrides of each variant of the 'restriction' study.
RESTRICTION_OVERRIDES = {
    **{
        rate: {'search.mask_update': 'short_restriction', 'search.rate_schedule': rate}
        for rate in sparsity.RATE_SCHEDULES
    },
    'edge_popup': {'search.mask_update': 'edge_popup', 'search.rate_schedule': 'constant'},
}


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
    variants = config_lib.parse_list('restriction.variants', config.restriction.variants)
    overrides = {n: {**RESTRICTION_OVERRIDES[n], 'search.step_trace': True} for n in variants}
    runs = common.run_variants(config, workdir, 'restriction', overrides)
    result = {**common.header(config), 'runs': {n: restriction_summary(r) for n, r in runs.items()}}
    common.save_result(
        workdir,
        'restriction',
        result,
        lambda path: plots.plot_restriction(result, path),
        format_restriction(result),
    )
    return result
