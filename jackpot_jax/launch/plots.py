"""PNG figures for studies: criteria overlap, per-layer sparsity, curves, mask changes.

Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend
switch, no display needed). Every function writes one PNG and returns its path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

MAX_LEGEND_LAYERS = 16  # per-layer line plots name at most this many layers in a legend

# Font fallbacks (a mathtext family not installed: DejaVu Sans is used) are not the
# run's news; without this, absl's log shows about ten such warnings per figure set.
logging.getLogger('matplotlib.font_manager').setLevel(logging.ERROR)


def _figure(
    num_groups: int, per_group: float = 0.45, height: float = 4.5, rows: int = 1
) -> tuple[Figure, Any]:
    """A figure wide enough for ``num_groups`` labelled x positions of ``per_group`` inches."""
    width = max(6.0, 2.5 + per_group * num_groups)
    fig = Figure(figsize=(width, height * rows), layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    return fig, axes


def _save(fig: Figure, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=100, format='png')
    return path


def _layer_ticks(ax, labels: Sequence[str]) -> None:
    ax.set_xticks(np.arange(len(labels)))
    if max(len(label) for label in labels) <= 8:
        ax.set_xticklabels(labels, fontsize=8)
    else:
        ax.set_xticklabels(labels, rotation=45, ha='right', rotation_mode='anchor', fontsize=8)


def plot_overlap(result: Mapping[str, Any], path: str) -> str:
    """Grouped bars: per layer (and overall), each criterion's share of the jackpot's kept weights.

    ``result`` is what ``studies.run_overlap`` returns. Black ticks mark the share a
    random mask at the same counts keeps in expectation.
    """
    rows = result['criteria']
    if not rows:
        raise ValueError('the overlap result has no criteria to plot')
    first = next(iter(rows.values()))['overlap']
    layers = sorted(first['per_layer'])
    groups = layers + ['overall']

    def values(overlap, key):
        return [overlap['per_layer'][p][key] for p in layers] + [overlap['overall'][key]]

    fig, (ax,) = _figure(len(groups), per_group=0.15 * (len(rows) + 1), height=5.5)
    x = np.arange(len(groups))
    width = 0.8 / len(rows)
    for i, (name, row) in enumerate(rows.items()):
        label = name
        if 'top1' in row:
            label += f" (test top-1 {row['top1']:.1%}"
            if 'top1_reestimated' in row:
                label += f", BN re-estimated {row['top1_reestimated']:.1%}"
            label += ')'
        ax.bar(
            x - 0.4 + (i + 0.5) * width,
            values(row['overlap'], 'shared_kept_fraction'),
            width,
            label=label,
        )
    ax.hlines(
        values(first, 'chance'),
        x - 0.4,
        x + 0.4,
        colors='black',
        linewidth=1.5,
        label='random mask at these counts, expected',
    )
    _layer_ticks(ax, groups)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of the jackpot's kept weights also kept")
    title = 'Overlap with the jackpot, masks at its per-layer counts'
    details = []
    if 'sparsity' in result:
        details.append(f"sparsity {result['sparsity']:.1%}")
    if 'jackpot' in result:
        details.append(f"jackpot test top-1 {result['jackpot']['top1']:.1%}")
    ax.set_title('\n'.join([title, ', '.join(details)]) if details else title, fontsize=10)
    fig.legend(fontsize=8, loc='outside lower center', ncol=2)
    ax.grid(axis='y', alpha=0.3)
    return _save(fig, path)


def plot_layer_sparsity(report: Mapping[str, Any], path: str) -> str:
    """Per-layer sparsity bars from ``sparsity.sparsity_report``."""
    layers = report['layers']
    fig, (ax,) = _figure(len(layers))
    x = np.arange(len(layers))
    ax.bar(x, [r['sparsity'] for r in layers], color='tab:red')
    ax.axhline(
        report['sparsity'],
        color='black',
        linestyle='--',
        linewidth=1,
        label=f"over prunable weights: {report['sparsity']:.2%}",
    )
    _layer_ticks(ax, [r['layer'] for r in layers])
    ax.set_ylim(0, 1.0)
    ax.set_ylabel('sparsity (fraction removed)')
    ax.set_title(
        f"Per-layer sparsity; whole model {report['model_sparsity']:.2%} of "
        f"{report['model_params']:,} params",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(axis='y', alpha=0.3)
    return _save(fig, path)


def _draw_curves(ax, curves: Mapping[str, Sequence[Sequence[float]]], **style) -> None:
    """Lines of (x, y) points; integer ticks when every x is an integer (epochs, steps)."""
    for name, points in curves.items():
        points = sorted(points, key=lambda p: p[0])
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, **style)
    if all(float(p[0]).is_integer() for points in curves.values() for p in points):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(
    curves: Mapping[str, Sequence[Sequence[float]]],
    path: str,
    xlabel: str,
    ylabel: str,
    title: str = '',
    hline: tuple[float, str] | None = None,
) -> str:
    """One line per named curve of (x, y) points, e.g. accuracy vs sparsity or per epoch.

    ``hline`` = (y, label) adds a dashed reference line (a target, the dense model).
    """
    if not curves:
        raise ValueError('no curves to plot')
    fig, (ax,) = _figure(0)
    _draw_curves(ax, curves, marker='o')
    if hline is not None:
        ax.axhline(hline[0], color='black', linestyle='--', linewidth=1, label=hline[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_restriction(result: Mapping[str, Any], path: str) -> str:
    """Four panels comparing mask-update rules (``studies.restriction.run_restriction``'s result):
    training loss per step, test top-1 per epoch, mask changes per step, and per layer the
    share of changes that were flip-backs."""
    runs = result['runs']
    if not runs:
        raise ValueError('the restriction result has no runs to plot')
    fig = Figure(figsize=(12, 8), layout='constrained')
    FigureCanvasAgg(fig)
    (loss, acc), (changes, share) = fig.subplots(2, 2)

    def per_step(key):
        return {n: list(zip(r['steps']['step'], r['steps'][key])) for n, r in runs.items()}

    _draw_curves(loss, per_step('loss'), linewidth=0.8)
    loss.set(xlabel='step', ylabel='training loss', title='Loss per step')
    _draw_curves(acc, {n: r['test_top1'] for n, r in runs.items()}, marker='o')
    acc.set(xlabel='epoch', ylabel='test top-1', title='Test top-1 per epoch')
    _draw_curves(changes, per_step('mask_changes'), linewidth=0.8)
    changes.set_yscale('symlog', linthresh=1)
    changes.set(xlabel='step', ylabel='mask changes', title='Mask changes per step')
    layers = sorted(next(iter(runs.values()))['mask_changes_per_layer'])
    width = 0.8 / len(runs)
    for i, (name, r) in enumerate(runs.items()):
        shares = [
            r['flip_backs_per_layer'][p] / max(r['mask_changes_per_layer'][p], 1) for p in layers
        ]
        share.bar(
            np.arange(len(layers)) + (i - (len(runs) - 1) / 2) * width, shares, width, label=name
        )
    if len(layers) <= MAX_LEGEND_LAYERS:
        _layer_ticks(share, layers)
    else:  # too many names for one panel: number the layers (restriction.json names them)
        share.xaxis.set_major_locator(MaxNLocator(integer=True))
        share.set_xlabel(f'layer index (0-{len(layers) - 1}, in sorted path order)')
    share.set(ylabel='flip-backs / changes', ylim=(0, 1), title='Oscillation per layer')
    for ax in (loss, acc, changes, share):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Mask-update rules: {result['model']} on {result['data']}, "
        f"sparsity {result['sparsity']:.0%}",
        fontsize=11,
    )
    return _save(fig, path)


def plot_stability(result: Mapping[str, Any], path: str) -> str:
    """Three panels (``studies.stability.run_stability``'s result): test top-1 per epoch under
    re-estimated (solid) and running (dashed) BatchNorm statistics; mask changes and
    flip-backs per step beside the learning rate; and the saved jackpot's test top-1."""
    runs = result['runs']
    if not runs:
        raise ValueError('the stability result has no runs to plot')
    fig = Figure(figsize=(15, 4.5), layout='constrained')
    FigureCanvasAgg(fig)
    stats, steps, saved = fig.subplots(1, 3)
    colors = {name: f'C{i}' for i, name in enumerate(runs)}
    for name, r in runs.items():
        for kind, style in (('reestimated', '-'), ('running', '--')):
            points = r['curves'][f'test_top1_{kind}']
            stats.plot(*zip(*points), style, color=colors[name], marker='.', label=f'{name}, {kind}')
        trace = r['steps']
        steps.plot(trace['step'], trace['mask_changes'], color=colors[name], linewidth=0.7,
                   label=f'{name}: changes')
        steps.plot(trace['step'], trace['flip_backs'], color=colors[name], linewidth=0.7,
                   linestyle=':', label=f'{name}: flip-backs')
        saved.plot(*zip(*r['curves']['test_top1']), color=colors[name], marker='o', label=name)
    stats.set(xlabel='epoch', ylabel='test top-1',
              title='Same masks, two BatchNorm statistics\n(solid: re-estimated, dashed: running)')
    steps.set_yscale('symlog', linthresh=1)
    steps.set(xlabel='step', ylabel='per step', title='Mask changes and flip-backs per step')
    first = next(iter(runs.values()))
    per_epoch = len(first['steps']['step']) // max(len(first['learning_rate']), 1)
    lr = steps.twinx()
    lr.step([(e - 1) * per_epoch for e, _ in first['learning_rate']],
            [v for _, v in first['learning_rate']], where='post', color='gray', linewidth=1)
    lr.set_ylabel('learning rate (gray)')
    saved.set(xlabel='epoch', ylabel='test top-1', title='The jackpot as each variant saves it')
    for ax in (stats, steps, saved):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(
        f"Stability: {result['model']} on {result['data']}, sparsity {result['sparsity']:.0%}",
        fontsize=11,
    )
    return _save(fig, path)


def plot_mask_changes(records: Sequence[Mapping[str, Any]], path: str) -> str:
    """Mask changes per search epoch: the total (top) and per layer (bottom, symlog).

    ``records`` are the lines of ``metrics.jsonl`` (``metrics.read_jsonl``); the
    search records carry ``mask_changes`` and ``mask_changes_per_layer``.
    """
    search = [r for r in records if r.get('mode', 'search') == 'search' and 'mask_changes' in r]
    if not search:
        raise ValueError('no search records with mask_changes among the records')
    epochs = [r['epoch'] for r in search]
    fig, (top, bottom) = _figure(0, height=3.5, rows=2)
    top.plot(epochs, [r['mask_changes'] for r in search], marker='o', color='black')
    top.set_ylabel('mask changes (all layers)')
    top.set_title('Mask changes per search epoch (weights whose kept state flipped)', fontsize=10)
    top.grid(alpha=0.3)
    layers = sorted({p for r in search for p in r.get('mask_changes_per_layer', {})})
    for layer in layers:
        bottom.plot(
            epochs,
            [r.get('mask_changes_per_layer', {}).get(layer, 0) for r in search],
            marker='.',
            label=layer,
        )
    bottom.set_yscale('symlog', linthresh=1)
    bottom.set_xlabel('epoch')
    bottom.set_ylabel('mask changes per layer')
    bottom.grid(alpha=0.3)
    if 0 < len(layers) <= MAX_LEGEND_LAYERS:
        bottom.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0))
    elif layers:  # a legend of dozens of layers would not fit; the JSON records name them
        bottom.set_title(f'{len(layers)} layers, one line each', fontsize=9)
    return _save(fig, path)
