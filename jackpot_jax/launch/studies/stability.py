"""Study 'stability': why a jackpot's accuracy swings from epoch to epoch.

The paper's protocol, each change of the stable protocol alone (BatchNorm statistics
re-estimated under the mask; masks frozen for the last epochs) and the stable protocol;
every epoch is evaluated with both the search's running statistics and re-estimated
ones, and every step's mask changes and flip-backs are recorded beside the learning
rate. Writes ``stability.json`` / ``.png``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from jackpot_jax.launch import config as config_lib, plots, run_context as rc
from jackpot_jax.launch.search_mode import baseline_accuracies
from jackpot_jax.launch.studies import common


def _protocol(name: str, **changes: Any) -> dict[str, Any]:
    """Every field ``config.protocol`` sets, as protocol ``name`` sets it, with ``changes``."""
    return {'protocol': name, **config_lib.PROTOCOLS[name], **changes}


# Config overrides of each variant of the 'stability' study: the paper's protocol, each
# change of the stable one on its own, and the stable protocol, whatever the config's.
_STABLE = config_lib.PROTOCOLS['stable']
STABILITY_OVERRIDES = {
    'paper': _protocol('paper'),
    'paper+reestimation': _protocol(
        'paper', **{'search.reestimation_steps': _STABLE['search.reestimation_steps']}
    ),
    'paper+freeze': _protocol(
        'paper', **{'search.mask_freeze_fraction': _STABLE['search.mask_freeze_fraction']}
    ),
    'stable': _protocol('stable'),
}


def stability_summary(run: Mapping[str, Any]) -> dict[str, Any]:
    """Per-epoch accuracies under both statistics, and per-step mask telemetry."""
    history = run['history']
    trace = {key: [x for r in history for x in r['trace'][key]] for key in history[0]['trace']}
    curves = {
        key: [[r['epoch'], r[key]] for r in history]
        for key in history[0]
        if key.endswith(('_top1_running', '_top1_reestimated')) or key in ('test_top1',)
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
        f"(no weight trained; dense {result['dense_top1']:.2%}, magnitude mask "
        f"{result['magnitude_top1']:.2%}, random mask {result['random_top1']:.2%})",
        f"{'variant':<20}  {'final':>7}  {'last 5 epochs':>17}  {'running stats':>13}  "
        f"{'re-estimated':>12}  {'last-epoch changes':>18}  {'flip-backs':>10}",
    ]
    for name, row in result['runs'].items():
        low, high = row['last5_test_top1_range']
        running = row['curves']['test_top1_running'][-1][1]
        reestimated = row['curves']['test_top1_reestimated'][-1][1]
        lines.append(
            f"{name:<20}  {row['final_top1']:>7.2%}  {low:>7.2%} - {high:>7.2%}  "
            f"{running:>13.2%}  {reestimated:>12.2%}  {row['mask_changes'][-1][1]:>18,}  "
            f"{row['flip_backs'][-1][1]:>10,}"
        )
    lines.append('running / re-estimated: the final masks under each BatchNorm statistics')
    return '\n'.join(lines)


def run_stability(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Mode 'stability': one search per ``stability.variants``, both statistics per epoch."""
    variants = config_lib.parse_list('stability.variants', config.stability.variants)
    telemetry = {'search.step_trace': True, 'search.compare_statistics': True}
    overrides = {n: {**STABILITY_OVERRIDES[n], **telemetry} for n in variants}
    runs = common.run_variants(config, workdir, 'stability', overrides)
    setup = rc.Setup(config)
    params, statistics, _ = setup.load_pretrained(workdir)
    result = {
        **common.header(config),
        **baseline_accuracies(config, setup, params, statistics),
        'runs': {n: stability_summary(r) for n, r in runs.items()},
    }
    common.save_result(
        workdir,
        'stability',
        result,
        lambda path: plots.plot_stability(result, path),
        format_stability(result),
    )
    return result
