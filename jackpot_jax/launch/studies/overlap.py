"""Study 'overlap': how a found jackpot compares with other pruning criteria.

``run_overlap`` (launcher mode 'overlap') builds the masks of every criterion of
``criteria.CRITERIA`` at the jackpot's own per-layer counts k_l, evaluates each
one on the frozen params without any weight training (with the pre-trained
BatchNorm statistics and, optionally, with statistics re-estimated under the
mask, as the search's own are) and measures how many of the jackpot's kept
weights it keeps too. Writes ``WORKDIR/overlap.json`` and ``WORKDIR/overlap.png``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from jackpot_jax.baselines import criteria
from jackpot_jax.core import parallel, sparsity
from jackpot_jax.io import workdir as workdir_lib
from jackpot_jax.launch import config as config_lib, plots, run_context as rc

OVERLAP_JSON = 'overlap.json'
OVERLAP_PNG = 'overlap.png'


# ----------------------------------------------------------------------------
# Overlap of two masks.
# ----------------------------------------------------------------------------
def _overlap_numbers(
    size: int, kept_a: int, kept_b: int, shared: int, expected: float
) -> dict[str, Any]:
    union = kept_a + kept_b - shared
    return {
        'size': size,
        'kept_a': kept_a,
        'kept_b': kept_b,
        'shared': shared,
        # Empty sets: nothing of a is missing from b, and two empty sets are identical.
        'shared_kept_fraction': shared / kept_a if kept_a else 1.0,
        'iou': shared / union if union else 1.0,
        # shared_kept_fraction in expectation for a random b with the same per-layer counts.
        'chance': expected / kept_a if kept_a else 1.0,
    }


def mask_overlap(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """How much two masks (True = kept) agree, per layer and over all layers.

    ``shared_kept_fraction`` = |a & b| / |a| (the share of a's kept weights that b
    keeps too), ``iou`` = |a & b| / |a | b|; ``chance`` is the expected shared fraction
    were b random with the same per-layer counts (sum_l |a_l| |b_l| / n_l over |a|).
    With equal per-layer counts, both measures are symmetric in a and b.
    """
    if set(a) != set(b):
        raise ValueError(
            f'the masks cover different layers: only in a {sorted(set(a) - set(b))}, '
            f'only in b {sorted(set(b) - set(a))}'
        )
    per_layer = {}
    totals = [0, 0, 0, 0, 0.0]
    for path in sorted(a):
        ma = np.asarray(parallel.to_host(a[path]), bool)
        mb = np.asarray(parallel.to_host(b[path]), bool)
        if ma.shape != mb.shape:
            raise ValueError(f'{path}: mask shapes differ, {ma.shape} vs {mb.shape}')
        kept_a, kept_b = int(np.count_nonzero(ma)), int(np.count_nonzero(mb))
        row = (
            ma.size,
            kept_a,
            kept_b,
            int(np.count_nonzero(ma & mb)),
            kept_a * kept_b / max(ma.size, 1),
        )
        totals = [t + r for t, r in zip(totals, row)]
        per_layer[path] = _overlap_numbers(*row)
    return {'per_layer': per_layer, 'overall': _overlap_numbers(*totals)}


# ----------------------------------------------------------------------------
# The 'overlap' mode.
# ----------------------------------------------------------------------------
def _check_jackpot(masks: Mapping, counts: Mapping[str, int], path: str) -> None:
    if set(masks) != set(counts):
        raise ValueError(
            f'the jackpot at {path} has masks for {sorted(masks)} but counts for '
            f'{sorted(counts)}; it was written by an incompatible version'
        )
    wrong = [p for p, m in masks.items() if m.size - np.count_nonzero(m) != counts[p]]
    if wrong:
        raise ValueError(f'the jackpot at {path}: masks of {wrong} do not prune their counts k_l')


def format_overlap_table(result: Mapping[str, Any]) -> str:
    """Plain-text table of a :func:`run_overlap` result."""
    reestimated = result.get('reestimation_steps', 0) > 0
    rows = {
        'dense': result['dense'],
        'jackpot': result['jackpot'],
        'jackpot, pre-trained BN': result['jackpot_pretrained_bn'],
        **result['criteria'],
    }
    width = max(len(name) for name in rows)
    header = f"{'masks':<{width}}  {'test top-1':>10}"
    header += f"  {'re-estimated':>12}" if reestimated else ''
    lines = [
        f"{result['model']} on {result['data']}, sparsity {result['sparsity']:.2%} of prunable "
        "weights, every mask at the jackpot's per-layer counts; no weight trained",
        header + f"  {'shared kept':>11}  {'IoU':>7}",
    ]
    for name, row in rows.items():
        line = f"{name:<{width}}  {row['top1']:>10.2%}"
        if reestimated:
            line += f"  {row['top1_reestimated']:>12.2%}" if 'top1_reestimated' in row else ' ' * 14
        if name.startswith('jackpot'):
            line += f"  {1:>11.2%}  {1:>7.2%}"
        elif 'overlap' in row:
            overall = row['overlap']['overall']
            line += f"  {overall['shared_kept_fraction']:>11.2%}  {overall['iou']:>7.2%}"
        lines.append(line.rstrip())
    chance = next(iter(result['criteria'].values()))['overlap']['overall']['chance']
    lines.append(f'shared kept by chance (random masks at these counts, expected): {chance:.2%}')
    lines.append(
        "the jackpot row uses the search's own BatchNorm statistics; the others the "
        'pre-trained ones'
        + (
            f" ('re-estimated': BatchNorm statistics re-estimated over "
            f"{result['reestimation_steps']} training batches under the mask, weights unchanged)"
            if reestimated
            else ''
        )
    )
    return '\n'.join(lines)


def _overlap_settings(
    config: ml_collections.ConfigDict, names: Sequence[str] | None
) -> tuple[tuple[str, ...], int, int]:
    """Criteria, SNIP/GraSP batch size and BN steps: arguments, else ``config.overlap``."""
    group = config.get('overlap') or {}
    if names is None:
        listed = group.get('criteria', '')
        names = config_lib.parse_list('overlap.criteria', listed) if listed else criteria.CRITERIA
    unknown = [n for n in names if n not in criteria.CRITERIA]
    if unknown or not names:
        raise ValueError(
            f'unknown criteria {unknown or "(none given)"}; choose from {tuple(criteria.CRITERIA)}'
        )
    reestimation_steps = group.get('reestimation_steps', 0)
    if reestimation_steps < 0:
        raise ValueError(f'overlap.reestimation_steps must be >= 0, got {reestimation_steps!r}')
    return tuple(names), group.get('batch_size', 0) or config.search.batch_size, reestimation_steps


def run_overlap(
    config: ml_collections.ConfigDict, workdir: str, names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Each criterion's masks at the jackpot's counts: test accuracy and overlap with the jackpot.

    ``names`` defaults to ``config.overlap.criteria`` (comma-separated) if the config
    has that group, else every criterion. SNIP and GraSP score the first training
    batch of ``config.overlap.batch_size`` (0 or absent: ``config.search.batch_size``);
    'random' uses ``jax.random.key(config.seed + 1)`` (the demo's random mask).
    Criterion masks are evaluated with the pre-trained BatchNorm statistics ('top1')
    and, if ``config.overlap.reestimation_steps`` > 0, also after re-estimating them over that
    many training batches ('top1_reestimated'; the jackpot's own were trained by its
    search). Writes WORKDIR/overlap.json and WORKDIR/overlap.png; prints a table.
    """
    names, batch_size, reestimation_steps = _overlap_settings(config, names)
    setup = rc.Setup(config)
    weights = workdir_lib.pretrained_path(workdir, config.pretrained)
    params, statistics, fingerprint = setup.load_weights(weights)
    path = rc.jackpot_path(config, workdir)
    jackpot_masks, jackpot_stats, meta = setup.read_jackpot(path)
    if meta.get('weights_fingerprint') not in (None, fingerprint):
        raise ValueError(
            f'the jackpot at {path} was found in other weights than {weights}; '
            'point config.pretrained at the original weights'
        )
    counts = {p: int(k) for p, k in meta['counts'].items()}
    _check_jackpot(jackpot_masks, counts, path)

    batch = next(iter(setup.train_epoch(batch_size, 0)))
    rng = jax.random.key(config.seed + 1)
    found = {
        name: criteria.criterion_masks(
            name, setup.model, params, statistics, counts, batch=batch, rng=rng
        )
        for name in names
    }

    def accuracies(masks, adapt):
        masked = params if masks is None else sparsity.masked_params(params, masks)
        row = setup.split_metrics(masked, statistics)
        if adapt:
            stats = rc.reestimate_statistics(
                setup, masked, statistics, reestimation_steps, config.search.batch_size
            )
            evaluated = setup.split_metrics(masked, stats)
            row.update(top1_reestimated=evaluated['top1'], top5_reestimated=evaluated['top5'])
        return row

    masks, stats = parallel.replicate((jackpot_masks, jackpot_stats), setup.mesh)
    report = sparsity.sparsity_report(params, jackpot_masks)
    result = {
        'model': config.model.name,
        'data': config.data.name,
        'jackpot_path': os.path.abspath(path),
        'sparsity': report['sparsity'],
        'model_sparsity': report['model_sparsity'],
        'batch_size': batch_size,
        'reestimation_steps': reestimation_steps,
        'counts': counts,
        'dense': accuracies(None, False),
        'jackpot': setup.split_metrics(sparsity.masked_params(params, masks), stats),
        'jackpot_pretrained_bn': accuracies(masks, reestimation_steps > 0),
        'criteria': {},
    }
    for name, masks in found.items():
        result['criteria'][name] = {
            **accuracies(masks, reestimation_steps > 0),
            'description': criteria.CRITERIA[name].description,
            'overlap': mask_overlap(jackpot_masks, masks),
        }
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(workdir_lib.path(workdir, OVERLAP_JSON), 'w') as f:
            json.dump(result, f, indent=2)
        plots.plot_overlap(result, workdir_lib.path(workdir, OVERLAP_PNG))
        print(format_overlap_table(result))
    return result
