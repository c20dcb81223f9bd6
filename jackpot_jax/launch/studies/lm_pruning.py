"""Study 'lm_pruning': a language model's held-out perplexity under one-shot pruning
criteria and under jackpots searched from two of them, at the same per-layer counts.

For every entry of ``config.lm_pruning.sparsities`` (a fraction such as ``0.5``, or an
N:M pattern such as ``2:4``) the frozen pre-trained weights are masked by:

* ``magnitude``: the largest |w| of each layer kept;
* ``random``: a uniformly random mask (``jax.random.key(seed + 1)``);
* ``wanda``: |w| * ||X_j|| ranked within each output row, the input norms ||X_j|| gathered
  over ``config.lm_pruning.calibration_batches`` calibration batches (the dataset's
  calibration part where it has one, else the first batches of the training split);
* ``sparsegpt_mask``, ``sparsegpt_update``: SparseGPT's masks (the layer-wise OBS solver,
  block by block, on the same calibration batches) on the original weights, and with its
  weight update: the one row here that changes weights;
* ``jackpot_magnitude``: the jackpot searched from the magnitude masks (the paper's start);
* ``jackpot_wanda``: the jackpot searched from Wanda's masks.

``lm_pruning.start_scores`` lists each search's first scores: 'flat' (1.0 for every kept
weight and ``search.pruned_score`` for every pruned one), 'ranked:SPREAD'
(:func:`jackpot_jax.core.sparsity.ranked_scores`: the first masks in the order of their
criterion, |w| or Wanda's) or 'scaled' (:func:`jackpot_jax.core.sparsity.scaled_scores`:
the criterion's values). With more than one, each start is searched with each, and the
jackpot is the one of lowest validation perplexity (all are recorded as candidates); if
no search beats its first masks on validation, the jackpot is those masks (epoch 0).

Every mask prunes the same count k_l of each layer (allocation 'uniform', or the N:M
pattern's counts). Both searches keep the epoch with the lowest VALIDATION perplexity
(``search.selection_metric='perplexity'``); the test split is only reported. No weight
is trained. Each search is resumable, in ``WORKDIR/lm_pruning/<sparsity>_<start>``.
Writes ``WORKDIR/lm_pruning.json`` and ``WORKDIR/lm_pruning.png`` (test perplexity per
method per sparsity) and prints a markdown table.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from jackpot_jax.baselines import sparsegpt, wanda
from jackpot_jax.core import parallel, sparsity, structured
from jackpot_jax.launch import config_checks, run_context as rc
from jackpot_jax.launch.search_mode import run_search, search_plan
from jackpot_jax.launch.studies import common
from jackpot_jax.launch.studies.overlap import mask_overlap
from jackpot_jax.launch.weight_training import ensure_pretrained

STUDY = 'lm_pruning'
FIGURE = 'lm_pruning.png'
SELECTION_METRIC = 'perplexity'
# Row order of the table and the figure.
BASELINES = ('magnitude', 'random', 'wanda', 'sparsegpt_mask', 'sparsegpt_update')
STARTS = ('magnitude', 'wanda')
METHODS = ('dense', *BASELINES, *(f'jackpot_{s}' for s in STARTS))
LABELS = {
    'dense': 'dense',
    'magnitude': 'magnitude',
    'random': 'random',
    'wanda': 'Wanda',
    'sparsegpt_mask': 'SparseGPT mask only',
    'sparsegpt_update': 'SparseGPT with update',
    'jackpot_magnitude': 'jackpot from magnitude',
    'jackpot_wanda': 'jackpot from Wanda',
}


def _variant_overrides(value: float, pattern: str) -> dict[str, Any]:
    return {
        'search.sparsity': value,
        'search.pattern': pattern,
        'search.allocation': 'uniform',
        'search.score_init': 'magnitude',
        'search.selection_metric': SELECTION_METRIC,
    }


def _folder_name(label: str, start: str) -> str:
    return f"{label.replace(':', 'of')}_{start}"


def _pruned(masks: Mapping[str, Any]) -> dict[str, int]:
    host = parallel.to_host(dict(masks))
    return {p: int(np.size(m) - np.count_nonzero(m)) for p, m in sorted(host.items())}


def _check_counts(name: str, masks: Mapping[str, Any], counts: Mapping[str, int]) -> None:
    pruned = _pruned(masks)
    if pruned != dict(sorted(counts.items())):
        wrong = sorted(p for p in counts if pruned.get(p) != counts[p])
        raise ValueError(
            f'{name} masks do not prune the plan\'s per-layer counts in {wrong or sorted(pruned)}'
        )


def _wanda_masks(scores, counts, pattern):
    nm = structured.parse_pattern(pattern)
    if nm:
        return structured.masks_from_scores(scores, dict(counts), *nm)
    return wanda.row_masks(scores, counts)


def _calibration_batches(config: ml_collections.ConfigDict, setup: rc.Setup) -> list:
    """``lm_pruning.calibration_batches`` batches (``search.batch_size``) on the host: the
    first of the dataset's calibration part if it has one (disjoint from the search's
    batches), else of the training split's first epoch."""
    wanted, size = config.lm_pruning.calibration_batches, config.search.batch_size
    part = getattr(setup.source, 'calibration_images', None)
    if part is not None:
        labels = setup.source.calibration_labels
        starts = range(0, len(part) - size + 1, size)
        stream = ((part[i : i + size], labels[i : i + size]) for i in starts)
        where = 'calibration part'
    else:
        stream = setup.source.train_epoch(size, config.seed, 0, 0)
        where = 'training split'
    batches = list(itertools.islice(stream, wanted))
    if len(batches) < wanted:
        raise ValueError(
            f'lm_pruning.calibration_batches={wanted} but the {where} gives only '
            f'{len(batches)} batches of {size}; lower it'
        )
    return batches


_CANDIDATE_KEYS = ('validation_perplexity', 'test_perplexity', 'chosen_epoch', 'workdir')


def _first_scores(config, masks, criterion, start_scores):
    """The first scores ``start_scores`` names from the start's criterion; None for 'flat'
    (1.0 where kept, ``search.pruned_score`` where pruned)."""
    kind, spread = config_checks.start_scores(start_scores)
    if kind == 'flat':
        return None
    magnitude = jax.tree.map(abs, parallel.to_host(dict(criterion)))
    if kind == 'scaled':
        return sparsity.scaled_scores(masks, magnitude)
    return sparsity.ranked_scores(masks, magnitude, config.search.pruned_score, spread)


def _search_from(config, sub, setup, workdir, label, start, start_scores, masks, criterion,
                 counts) -> dict[str, Any]:  # fmt: skip
    """One resumable search from ``masks[start]`` with the first scores ``start_scores``,
    and its record: the epoch chosen on validation perplexity, its test perplexity."""
    suffix = '' if start_scores == 'flat' else '_' + start_scores.replace(':', '')
    folder = common.variant_folder(workdir, STUDY, _folder_name(label, start) + suffix)
    rc.print_main(f'{STUDY}: searching {label} from {start} ({start_scores}) in {folder}')
    paper_start = start == 'magnitude' and start_scores == 'flat'
    found = run_search(
        sub, folder, initial_masks=None if paper_start else masks[start],
        initial_scores=_first_scores(config, masks[start], criterion, start_scores),
    )  # fmt: skip
    jackpot, _, _ = setup.read_jackpot(rc.jackpot_path(sub, folder))
    _check_counts(f'jackpot from {start}', jackpot, counts)
    history = found['history']
    chosen = history[found['jackpot_epoch'] - 1]
    return {
        'test_perplexity': chosen['test_perplexity'],
        'test_top1': chosen['test_top1'],
        'validation_perplexity': chosen['validation_perplexity'],
        'chosen_epoch': found['jackpot_epoch'],
        'choice': found['jackpot_choice'],
        'selection_metric': f"validation_{sub.search.selection_metric}",
        'epochs': len(history),
        'steps': history[-1]['step'],
        'search_seconds': found['search_seconds'],
        'pruned': _pruned(jackpot),
        'overlap_wanda': mask_overlap(jackpot, masks['wanda'])['overall'],
        'overlap_magnitude': mask_overlap(jackpot, masks['magnitude'])['overall'],
        'history': _history(history),
        'workdir': folder,
    }


def _history(records) -> list[dict[str, Any]]:
    keys = ('epoch', 'step', 'validation_perplexity', 'test_perplexity', 'masks_frozen')
    return [{k: r[k] for k in keys if k in r} for r in records]


def run_lm_pruning(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Mode 'lm_pruning': test perplexity of dense, magnitude, random, Wanda and the two
    jackpots (from magnitude, from Wanda) per ``lm_pruning.sparsities``; see the module."""
    ensure_pretrained(config, workdir)
    if not config.data.validation_fraction:
        raise ValueError(
            'lm_pruning keeps each jackpot on validation perplexity, but '
            'data.validation_fraction is 0; set --config.data.validation_fraction=0.1'
        )
    specs = config_checks.lm_pruning_sparsities(config.lm_pruning.sparsities)
    setup = rc.Setup(config)
    params, statistics, _ = setup.load_pretrained(workdir)
    dense = setup.split_metrics(params, statistics)
    first = next(iter(setup.source.eval_batches(config.data.eval_batch_size, 'test')))
    if np.ndim(first[1]) < 2:  # labels [B, T]: next tokens
        raise ValueError(
            f'lm_pruning compares perplexities, but model {config.model.name!r} on '
            f'{config.data.name!r} has no token labels; use a language model, e.g. '
            '--config=configs/gpt_text.py'
        )
    calibration = _calibration_batches(config, setup)
    result: dict[str, Any] = {
        'model': config.model.name,
        'data': config.data.name,
        'protocol': config.protocol,
        'selection_metric': f'validation_{SELECTION_METRIC}',
        'calibration_batches': len(calibration),
        'calibration_tokens': int(sum(np.size(b[1]) for b in calibration)),
        'dense': {
            'test_perplexity': dense['perplexity'],
            'test_top1': dense['top1'],
        },
        'rows': [],
    }
    norms = None
    for label, value, pattern in specs:
        overrides = _variant_overrides(value, pattern)
        sub = common.variant_config(config, workdir, overrides)
        plan = search_plan(sub, setup, params, statistics)
        counts = {p: int(k) for p, k in plan.counts.items()}
        paths = tuple(sorted(counts))
        if norms is None:
            norms = wanda.activation_norms(setup.model, params, statistics, paths, calibration)
        wanda_scores = wanda.wanda_keep_scores(plan.kernels(params), norms)
        sparsegpt_masks, updated = sparsegpt.prune_model(
            setup.model, parallel.to_host(params), calibration, counts=counts,
            pattern=pattern or None, statistics=parallel.to_host(statistics),
        )  # fmt: skip
        masks = {
            'magnitude': plan.magnitude_masks(params),
            'random': plan.random_masks(params, jax.random.key(config.seed + 1)),
            'wanda': _wanda_masks(wanda_scores, counts, pattern),
            'sparsegpt_mask': sparsegpt_masks,
            'sparsegpt_update': sparsegpt_masks,
        }
        weights = {'sparsegpt_update': updated}  # the others mask the original weights
        row: dict[str, Any] = {
            'sparsity': label,
            'search_sparsity': value,
            'pattern': pattern,
            'counts': counts,
            'pruned': sum(counts.values()),
            'prunable': int(sum(np.size(w) for w in plan.kernels(params).values())),
            'methods': {},
        }
        for name, m in masks.items():
            _check_counts(name, m, counts)
            evaluated = setup.split_metrics(
                sparsity.masked_params(weights.get(name, params), m), statistics
            )
            row['methods'][name] = {
                'test_perplexity': evaluated['perplexity'],
                'test_top1': evaluated['top1'],
                'pruned': _pruned(m),
            }
            if name in STARTS:  # what each search must beat on validation
                masked = sparsity.masked_params(params, m)
                validation = setup.split_metrics(masked, statistics, 'validation')
                row['methods'][name]['validation_perplexity'] = validation['perplexity']
            rc.print_main(
                f"lm_pruning {label}: {name} test perplexity {evaluated['perplexity']:.3f}"
            )
        criteria = {'magnitude': plan.kernels(params), 'wanda': wanda_scores}
        for start in STARTS:
            candidates = {
                kind: _search_from(config, sub, setup, workdir, label, start, kind, masks,
                                   criteria[start], counts)  # fmt: skip
                for kind in config_checks.start_scores_list(config.lm_pruning.start_scores)
            }
            kind = min(candidates, key=lambda c: candidates[c]['validation_perplexity'])
            best = candidates[kind]
            origin = row['methods'][start]
            if origin['validation_perplexity'] <= best['validation_perplexity']:
                # No search beat its first masks on validation: the jackpot is its start.
                kind = 'none (the start masks)'
                best = {**best, 'chosen_epoch': 0, 'pruned': origin['pruned'],
                        **{k: origin[k] for k in ('test_perplexity', 'test_top1',
                                                  'validation_perplexity')}}  # fmt: skip
            row['methods'][f'jackpot_{start}'] = {
                **best,
                'start_scores': kind,
                'candidates': {
                    c: {k: v for k, v in r.items() if k in _CANDIDATE_KEYS}
                    for c, r in candidates.items()
                },
            }
            rc.print_main(
                f"lm_pruning {label}: jackpot from {start} test perplexity "
                f"{best['test_perplexity']:.3f} (epoch {best['chosen_epoch']}, first scores "
                f"{kind}, chosen on validation perplexity {best['validation_perplexity']:.3f})"
            )
        result['rows'].append(row)
        # Written after every sparsity, so a stopped run leaves the rows it finished.
        common.save_result(
            workdir,
            STUDY,
            result,
            lambda path: plot_lm_pruning(result, path),
            format_table(result),
            figure=FIGURE,
        )
    return result


def _ppl(value: float) -> str:
    return f'{value:.3f}' if value < 1e4 else f'{value:.3g}'


def format_table(result: Mapping[str, Any]) -> str:
    """Markdown: test perplexity per method per sparsity, then each jackpot's search."""
    dense = result['dense']['test_perplexity']
    lines = [
        f"{result['model']} on {result['data']}: held-out TEST perplexity, every mask at the "
        "same per-layer counts, no weight trained; each jackpot's epoch chosen on "
        f"{result['selection_metric']}",
        '',
        '| sparsity | ' + ' | '.join(LABELS[m] for m in METHODS) + ' |',
        '|---' * (len(METHODS) + 1) + '|',
    ]
    for row in result['rows']:
        cells = [_ppl(dense)] + [_ppl(row['methods'][m]['test_perplexity']) for m in METHODS[1:]]
        lines.append(f"| {row['sparsity']} | " + ' | '.join(cells) + ' |')
    lines += [
        '',
        '| sparsity | start | first scores | chosen epoch / epochs | validation ppl (chosen) '
        '| test ppl | steps | search s | shared kept with Wanda | shared kept with magnitude |',
        '|---' * 10 + '|',
    ]
    for row in result['rows']:
        for start in STARTS:
            j = row['methods'][f'jackpot_{start}']
            lines.append(
                f"| {row['sparsity']} | {start} | {j.get('start_scores', 'flat')} | "
                f"{j['chosen_epoch']} / {j['epochs']} | "
                f"{_ppl(j['validation_perplexity'])} | {_ppl(j['test_perplexity'])} | "
                f"{j['steps']} | {j['search_seconds']:.0f} | "
                f"{j['overlap_wanda']['shared_kept_fraction']:.2%} | "
                f"{j['overlap_magnitude']['shared_kept_fraction']:.2%} |"
            )
    return '\n'.join(lines)


def plot_lm_pruning(result: Mapping[str, Any], path: str) -> str:
    """Grouped bars: test perplexity (log scale) per method, one group per sparsity."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result['rows']
    methods = METHODS[1:]
    fig = Figure(figsize=(max(6.0, 2.0 + 1.8 * len(rows)), 4.5), layout='constrained')
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(methods)
    x = np.arange(len(rows))
    for i, method in enumerate(methods):
        values = [row['methods'][method]['test_perplexity'] for row in rows]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, values, width, label=LABELS[method])
    dense = result['dense']['test_perplexity']
    ax.axhline(dense, color='black', linestyle='--', linewidth=1, label=f'dense ({dense:.2f})')
    ax.set_yscale('log')
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['sparsity']}" for r in rows])
    ax.set_xlabel('sparsity of the attention and MLP kernels (fraction pruned, or N:M)')
    ax.set_ylabel('test perplexity (log scale)')
    ax.set_title(
        f"{result['model']} on {result['data']}: same per-layer counts, no weight trained",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis='y')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, format='png')
    return path
