"""The launcher's modes: pretrain dense weights, search a jackpot, evaluate, and the demo."""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import auto as tqdm

from jackpot_jax import checkpoint, data, dense, models, parallel, search, sparsity
from jackpot_jax.metrics import JsonlWriter, to_python

PRETRAINED_DIR = 'pretrained'
JACKPOT_DIR = 'jackpot'


# ----------------------------------------------------------------------------
# Shared pieces.
# ----------------------------------------------------------------------------
def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    kwargs = {k: v for k, v in config.model.items() if k != 'name'}
    return models.get_model(config.model.name, num_classes, **kwargs)


def _weights_meta(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    return {'model': config.model.to_dict(), 'num_classes': num_classes, 'source': 'pretrain'}


def pretrained_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.pretrained or os.path.join(workdir, PRETRAINED_DIR)


def check_tree_matches(expected: Any, actual: Any, what: str) -> None:
    """Raises ValueError listing every missing, unexpected or wrong-shaped leaf."""
    want = {p: tuple(np.shape(x)) for p, x in sparsity.flatten(expected).items()}
    got = {p: tuple(np.shape(x)) for p, x in sparsity.flatten(actual).items()}
    problems = [f'missing {p} {s}' for p, s in want.items() if p not in got]
    problems += [f'unexpected {p} {s}' for p, s in got.items() if p not in want]
    problems += [
        f'{p}: expected shape {s}, got {got[p]}'
        for p, s in want.items()
        if p in got and got[p] != s
    ]
    if problems:
        raise ValueError(f'{what} do not fit the configured model:\n  ' + '\n  '.join(problems))


def load_pretrained(
    config: ml_collections.ConfigDict, workdir: str, model: nn.Module, image_shape: tuple[int, ...]
) -> tuple[dict, dict]:
    """Frozen params and batch statistics, checked leaf by leaf against the configured model."""
    path = pretrained_path(config, workdir)
    params, batch_stats, meta = checkpoint.load_weights(path)
    saved_model = meta.get('model', {}).get('name')
    if saved_model != config.model.name:
        raise ValueError(
            f'the weights at {path} are for model {saved_model!r}, but config.model.name is '
            f'{config.model.name!r}; point config.pretrained at matching weights or use another '
            '--workdir'
        )
    sample = jnp.zeros((1, *image_shape), jnp.float32)
    expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), sample)
    check_tree_matches(expected['params'], params, f'the params at {path}')
    check_tree_matches(expected['batch_stats'], batch_stats, f'the batch statistics at {path}')
    return params, batch_stats


def evaluate(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    dataset: data.ArrayDataset,
    batch_size: int,
    mesh: jax.sharding.Mesh,
) -> dict[str, float]:
    """Test top-1 / top-5 accuracy (fractions), every test example counted exactly once."""
    parallel.check_batch_size(batch_size, mesh)
    totals = {'correct1': 0, 'correct5': 0, 'count': 0}
    for batch in data.eval_batches(dataset.test_images, dataset.test_labels, batch_size):
        counts = search.eval_step(
            params, batch_stats, *parallel.shard_batch(mesh, *batch), model=model
        )
        totals = {k: totals[k] + v for k, v in counts.items()}
    totals = to_python(totals)
    return {
        'top1': totals['correct1'] / totals['count'],
        'top5': totals['correct5'] / totals['count'],
    }


def _epoch_metrics(step_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of the per-step scalars and sums of the per-step mask changes."""
    host = to_python(step_metrics)
    out = {k: float(np.mean([m[k] for m in host])) for k in ('loss', 'top1') if k in host[0]}
    if 'mask_changes' in host[0]:
        out['mask_changes'] = int(sum(m['mask_changes'] for m in host))
        out['mask_changes_per_layer'] = {
            p: int(sum(m['mask_changes_per_layer'][p] for m in host))
            for p in host[0]['mask_changes_per_layer']
        }
        out['swap_rate'] = host[-1]['swap_rate']
    return out


def _progress(total: int, desc: str):
    return tqdm.tqdm(
        total=total, desc=desc, unit='step', leave=False, disable=jax.process_index() != 0
    )


# ----------------------------------------------------------------------------
# Dense pre-training.
# ----------------------------------------------------------------------------
def run_pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains the dense model and saves it as the frozen starting point of searches."""
    cfg = config.pretrain
    mesh = parallel.make_mesh(config.num_devices or None)
    parallel.check_batch_size(cfg.batch_size, mesh)
    dataset = data.load_dataset(config.data.name, config.data.data_dir or None)
    model = build_model(config, dataset.num_classes)
    variables = model.init(jax.random.key(config.seed), dataset.train_images[:1], train=False)
    steps = data.steps_per_epoch(len(dataset.train_images), cfg.batch_size)
    optimizer = search.sgd_optimizer(
        cfg.learning_rate, cfg.weight_decay, cfg.momentum, cfg.epochs, steps
    )
    state = parallel.replicate(
        dense.init_train_state(variables['params'], variables['batch_stats'], optimizer), mesh
    )
    step_fn = dense.make_train_step(
        model=model, optimizer=optimizer, label_smoothing=cfg.label_smoothing
    )
    writer = JsonlWriter(workdir)
    with _progress(cfg.epochs * steps, 'pretrain') as bar:
        for epoch in range(cfg.epochs):
            step_metrics = []
            for batch in data.train_batches(
                dataset.train_images, dataset.train_labels, cfg.batch_size, config.seed, epoch
            ):
                state, metrics = step_fn(state, *parallel.shard_batch(mesh, *batch))
                step_metrics.append(metrics)
                bar.update()
            record = {'mode': 'pretrain', 'epoch': epoch + 1, **_epoch_metrics(step_metrics)}
            writer.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
    result = evaluate(
        model, state.params, state.batch_stats, dataset, config.data.eval_batch_size, mesh
    )
    writer.write(
        {
            'mode': 'pretrain',
            'epoch': cfg.epochs,
            'test_top1': result['top1'],
            'test_top5': result['top5'],
        }
    )
    logging.info('dense model: test top-1 %.4f', result['top1'])
    checkpoint.save_weights(
        pretrained_path(config, workdir),
        state.params,
        state.batch_stats,
        _weights_meta(config, dataset.num_classes),
    )
    return result


# ----------------------------------------------------------------------------
# Jackpot search.
# ----------------------------------------------------------------------------
def initial_pruning(config: ml_collections.ConfigDict, params: dict) -> tuple[dict, dict]:
    """Per-layer pruned counts and the magnitude masks at those counts."""
    s = config.search
    flat = sparsity.flatten(params)
    kernels = {
        p: flat[p] for p in sparsity.prunable_paths(params, s.prune_include, s.prune_exclude)
    }
    counts = sparsity.pruned_counts(kernels, s.sparsity, s.allocation)
    masks = jax.jit(functools.partial(sparsity.magnitude_masks, counts=counts))(kernels)
    return counts, masks


def run_search(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Searches a jackpot in the frozen pre-trained weights and saves scores and masks."""
    s = config.search
    mesh = parallel.make_mesh(config.num_devices or None)
    parallel.check_batch_size(s.batch_size, mesh)
    dataset = data.load_dataset(config.data.name, config.data.data_dir or None)
    model = build_model(config, dataset.num_classes)
    params, batch_stats = load_pretrained(config, workdir, model, dataset.image_shape)
    counts, masks = initial_pruning(config, params)
    scores = sparsity.init_scores(masks, s.pruned_score)
    steps = data.steps_per_epoch(len(dataset.train_images), s.batch_size)
    optimizer = search.sgd_optimizer(s.learning_rate, s.weight_decay, s.momentum, s.epochs, steps)
    state = parallel.replicate(
        search.init_search_state(params, batch_stats, masks, scores, optimizer), mesh
    )
    step_fn = search.make_search_step(
        model=model,
        optimizer=optimizer,
        counts=counts,
        steps_per_epoch=steps,
        epochs=s.epochs,
        mask_update=s.mask_update,
        rate_schedule=s.rate_schedule,
        bn_mode=s.bn_mode,
        label_smoothing=s.label_smoothing,
    )
    writer = JsonlWriter(workdir)
    history = []
    start = time.perf_counter()
    with _progress(s.epochs * steps, 'search') as bar:
        for epoch in range(s.epochs):
            step_metrics = []
            for batch in data.train_batches(
                dataset.train_images, dataset.train_labels, s.batch_size, config.seed, epoch
            ):
                state, metrics = step_fn(state, *parallel.shard_batch(mesh, *batch))
                step_metrics.append(metrics)
                bar.update()
            record = {'mode': 'search', 'epoch': epoch + 1, **_epoch_metrics(step_metrics)}
            test = evaluate(
                model,
                sparsity.masked_params(state.frozen_params, state.masks),
                state.batch_stats,
                dataset,
                config.data.eval_batch_size,
                mesh,
            )
            record.update(test_top1=test['top1'], test_top5=test['top5'])
            history.append(record)
            writer.write(record)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                test_top1=f"{test['top1']:.4f}",
                changes=record['mask_changes'],
            )
            logging.info(
                'search epoch %d/%d: loss %.4f, train top-1 %.4f, test top-1 %.4f, '
                'mask changes %d',
                epoch + 1,
                s.epochs,
                record['loss'],
                record['top1'],
                test['top1'],
                record['mask_changes'],
            )
    seconds = time.perf_counter() - start
    report = sparsity.sparsity_report(state.frozen_params, state.masks)
    summary = {
        'jackpot_top1': history[-1]['test_top1'],
        'jackpot_top5': history[-1]['test_top5'],
        'best_top1': max(r['test_top1'] for r in history),
        'best_epoch': 1 + int(np.argmax([r['test_top1'] for r in history])),
        'sparsity': report['sparsity'],
        'model_sparsity': report['model_sparsity'],
        'search_seconds': seconds,
    }
    checkpoint.save_jackpot(
        os.path.join(workdir, JACKPOT_DIR),
        state.scores,
        state.masks,
        state.batch_stats,
        {'counts': counts, 'config': config.to_dict(), 'summary': summary},
    )
    logging.info('jackpot sparsity report:\n%s', sparsity.format_sparsity_report(report))
    return {**summary, 'state': state, 'counts': counts}


# ----------------------------------------------------------------------------
# Evaluation and the demo.
# ----------------------------------------------------------------------------
def run_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluates the jackpot saved in the workdir; prints its sparsity report."""
    mesh = parallel.make_mesh(config.num_devices or None)
    dataset = data.load_dataset(config.data.name, config.data.data_dir or None)
    model = build_model(config, dataset.num_classes)
    params, _ = load_pretrained(config, workdir, model, dataset.image_shape)
    _, masks, batch_stats, _ = checkpoint.load_jackpot(os.path.join(workdir, JACKPOT_DIR))
    params, masks, batch_stats = parallel.replicate((params, masks, batch_stats), mesh)
    result = evaluate(
        model,
        sparsity.masked_params(params, masks),
        batch_stats,
        dataset,
        config.data.eval_batch_size,
        mesh,
    )
    report = sparsity.sparsity_report(params, masks)
    print(sparsity.format_sparsity_report(report))
    print(f"jackpot: test top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}")
    return {**result, 'sparsity': report['sparsity']}


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Pretrain -> search -> compare with magnitude and random masks; writes summary.json."""
    total_start = time.perf_counter()
    mesh = parallel.make_mesh(config.num_devices or None)
    dataset = data.load_dataset(config.data.name, config.data.data_dir or None)
    model = build_model(config, dataset.num_classes)
    if os.path.isdir(pretrained_path(config, workdir)):
        logging.info('using the pre-trained weights at %s', pretrained_path(config, workdir))
    else:
        run_pretrain(config, workdir)
    params, batch_stats = parallel.replicate(
        load_pretrained(config, workdir, model, dataset.image_shape), mesh
    )
    counts, magnitude = initial_pruning(config, params)
    random = jax.jit(functools.partial(sparsity.random_masks, counts=counts))(
        jax.random.key(config.seed + 1), magnitude
    )

    def accuracy(masks):
        masked = params if masks is None else sparsity.masked_params(params, masks)
        return evaluate(model, masked, batch_stats, dataset, config.data.eval_batch_size, mesh)[
            'top1'
        ]

    summary = {
        'dense_top1': accuracy(None),
        'magnitude_top1': accuracy(magnitude),
        'random_top1': accuracy(random),
    }
    found = run_search(config, workdir)
    for key in ('jackpot_top1', 'best_top1', 'sparsity', 'model_sparsity', 'search_seconds'):
        summary[key] = found[key]
    summary['total_seconds'] = time.perf_counter() - total_start
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    print(format_summary(config, summary))
    return summary


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
    lines.append(
        f"best epoch of the search: {summary['best_top1']:.2%}; search time "
        f"{summary['search_seconds']:.1f} s, total {summary['total_seconds']:.1f} s"
    )
    return '\n'.join(lines)


MODES = {'pretrain': run_pretrain, 'search': run_search, 'evaluate': run_evaluate, 'demo': run_demo}
