"""Study 'sweep': accuracy vs sparsity for the jackpot, the magnitude mask and a random
mask (no weight trained). Writes ``sweep.json`` and ``accuracy_vs_sparsity.png``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from jackpot_jax.launch import config as config_lib, plots, run_context as rc
from jackpot_jax.launch.search_mode import mask_baselines
from jackpot_jax.launch.studies import common
from jackpot_jax.launch.weight_training import ensure_pretrained


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
    ensure_pretrained(config, workdir)
    setup = rc.Setup(config)
    params, statistics, _ = setup.load_pretrained(workdir)
    dense = setup.split_metrics(params, statistics)['top1']
    rows = []
    for value in config_lib.parse_list('sweep.sparsities', config.sweep.sparsities, float):
        overrides = {'search.sparsity': value}
        baselines = mask_baselines(
            common.variant_config(config, workdir, overrides), setup, params, statistics
        )
        run = common.run_variant(config, workdir, 'sweep', f'{value:g}', overrides)
        rows.append(
            {
                'sparsity': run['sparsity'],
                'jackpot_top1': run['jackpot_top1'],
                'best_top1': run['best_top1'],
                **baselines,
                'workdir': run['workdir'],
            }
        )
    result = {**common.header(config), 'dense_top1': dense, 'rows': rows}
    del result['sparsity']

    def plot(path: str) -> None:
        plots.plot_curves(
            {
                name: [(r['sparsity'], r[key]) for r in rows]
                for name, key in [
                    ('jackpot (search only)', 'jackpot_top1'),
                    ('magnitude, no retraining', 'magnitude_top1'),
                    ('random mask', 'random_top1'),
                ]
            },
            path,
            xlabel='sparsity (fraction of prunable weights removed)',
            ylabel='test top-1',
            title=f"{result['model']} on {result['data']}: no weight trained",
            hline=(dense, 'dense'),
        )

    common.save_result(
        workdir, 'sweep', result, plot, format_sweep(result), figure='accuracy_vs_sparsity.png'
    )
    return result
