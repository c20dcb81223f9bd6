"""The launcher's modes: pretrain, search (resumable), tune, evaluate, export, and the demo.

Workdir layout:
  pretrained/        dense weights made by 'pretrain' (unless config.pretrained points elsewhere)
  checkpoints/<step> search checkpoints (scores, bit-packed masks, optimizer state, BN stats)
  jackpot/           the found jackpot: bit-packed masks + batch statistics + meta
  tuned/             weights tuned under the jackpot's mask ('tune', or search with tune.epochs)
  masked_weights/    export: the masked dense params, loadable as ordinary weights
  metrics.jsonl      one JSON record per epoch; summary.json: the demo's table
  layer_sparsity.png, mask_changes.png   the search's per-layer sparsity and mask changes
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import auto as tqdm

from jackpot_jax import config as config_lib
from jackpot_jax import (
    adapters,
    checkpoint,
    data,
    dense,
    models,
    parallel,
    plots,
    search,
    sparsity,
    structured,
)
from jackpot_jax.metrics import MetricWriter, read_jsonl, to_python

PRETRAINED_DIR = 'pretrained'
CHECKPOINTS_DIR = 'checkpoints'
JACKPOT_DIR = 'jackpot'
TUNED_DIR = 'tuned'
MASKED_WEIGHTS_DIR = 'masked_weights'
METRICS_FILE = 'metrics.jsonl'
LAYER_SPARSITY_PNG = 'layer_sparsity.png'
MASK_CHANGES_PNG = 'mask_changes.png'
# Config fields that may change between a search and its resumption.
# fmt: off
_RESUMABLE_CHANGES = ('mode', 'pretrained', 'jackpot', 'num_devices', 'distributed', 'checkpoint',
                      'data.data_dir', 'data.eval_batch_size', 'tune', 'pretrain', 'overlap',
                      'search.step_trace', 'search.compare_bn_statistics', 'search_cost',
                      'restriction', 'sweep', 'stability', 'data.threads')
# fmt: on
# BatchNorm re-estimation steps of search.compare_bn_statistics when the search itself
# does not re-estimate (search.bn_recalibration_steps = 0).
DIAGNOSTIC_RECALIBRATION_STEPS = 50


def resolved(mode):
    """Runs a mode on the config with the fields left to config.protocol filled in."""

    @functools.wraps(mode)
    def run(config: ml_collections.ConfigDict, *args, **kwargs):
        return mode(config_lib.resolve_protocol(config), *args, **kwargs)

    return run


# ----------------------------------------------------------------------------
# Shared pieces.
# ----------------------------------------------------------------------------
class Setup:
    """What every mode needs: the device mesh, the data source and the model."""

    def __init__(self, config: ml_collections.ConfigDict):
        config = config_lib.resolve_protocol(config)
        self.config = config
        if config.num_devices and jax.process_count() > 1:
            raise ValueError(
                f'num_devices={config.num_devices} with {jax.process_count()} processes would '
                'leave hosts without devices; use num_devices=0 (all) on multi-host runs'
            )
        self.mesh = parallel.make_mesh(config.num_devices or None)
        self.source = data.load_source(
            config.data.name,
            config.data.data_dir or None,
            config.data,
            validation_fraction=config.data.validation_fraction,
            threads=config.data.threads,
        )
        kwargs = {k: v for k, v in config.model.items() if k not in ('name', 'dtype')}
        dtype = models.compute_dtype(config.model.get('dtype', 'float32'))
        self.model = models.get_model(
            config.model.name, self.source.num_classes, dtype=dtype, **kwargs
        )

    def steps_per_epoch(self, batch_size: int) -> int:
        parallel.check_batch_size(batch_size, self.mesh)
        try:
            steps = self.source.steps_per_epoch(batch_size)
        except ValueError as e:
            fraction = self.config.data.validation_fraction
            if not fraction:
                raise
            raise ValueError(
                f'{e}, after data.validation_fraction={fraction!r} held out the validation '
                'split; lower one of them'
            ) from None
        return min(steps, self.config.steps_per_epoch) if self.config.steps_per_epoch else steps

    def train_epoch(self, batch_size: int, epoch: int, start_step: int = 0) -> Iterator[tuple]:
        """Global training batches, sharded over the mesh (two in flight to the devices)."""
        batches = self.source.train_epoch(batch_size, self.config.seed, epoch, start_step)
        steps = self.steps_per_epoch(batch_size) - start_step
        yield from parallel.prefetch_to_mesh(itertools.islice(batches, steps), self.mesh)

    def evaluate(self, params: Any, batch_stats: Any, split: str = 'test') -> dict[str, float]:
        """Top-1 / top-5 accuracy (fractions) on 'test' or 'validation', each example once."""
        batch_size = self.config.data.eval_batch_size
        parallel.check_batch_size(batch_size, self.mesh)
        totals = {'correct1': 0, 'correct5': 0, 'count': 0}
        for batch in self.source.eval_batches(batch_size, split):
            counts = search.eval_step(
                params, batch_stats, *parallel.shard_batch(self.mesh, *batch), model=self.model
            )
            totals = {k: totals[k] + v for k, v in counts.items()}
        totals = to_python(totals)
        return {
            'top1': totals['correct1'] / totals['count'],
            'top5': totals['correct5'] / totals['count'],
        }

    def load_weights(self, path: str) -> tuple[dict, dict, str]:
        """Weights checked leaf by leaf against the model, replicated; and their fingerprint."""
        params, batch_stats, meta = checkpoint.load_weights(path)
        saved_model = meta.get('model', {}).get('name')
        if saved_model != self.config.model.name:
            raise ValueError(
                f'the weights at {path} are for model {saved_model!r}, but config.model.name is '
                f'{self.config.model.name!r}; point config.pretrained at matching weights or '
                'use another --workdir'
            )
        sample = jnp.zeros((1, *self.source.image_shape), jnp.float32)
        init = functools.partial(self.model.init, train=False)
        expected = jax.eval_shape(init, jax.random.key(0), sample)
        check_tree_matches(expected['params'], params, f'the params at {path}')
        check_tree_matches(
            expected.get('batch_stats', {}), batch_stats, f'the batch statistics at {path}'
        )
        fingerprint = checkpoint.weights_fingerprint(params)
        params, batch_stats = parallel.replicate((params, batch_stats), self.mesh)
        return params, batch_stats, fingerprint


@functools.partial(jax.jit, static_argnames='model')
def _bn_statistics_step(params: Any, batch_stats: Any, images: jax.Array, *, model) -> Any:
    variables = {'params': params, 'batch_stats': batch_stats}
    _, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
    return updates['batch_stats']


def adapt_batch_stats(
    setup: Setup, params: Any, batch_stats: Any, steps: int, batch_size: int
) -> Any:
    """BatchNorm running statistics updated over ``steps`` training batches; params unchanged.

    The model's own running-average update (Flax momentum 0.9 = PyTorch 0.1), as in
    the search's BatchNorm training mode, starting from ``batch_stats``; the batches are
    the first ``steps`` of the training stream (epoch 0 onwards), so it is deterministic.
    """
    if not jax.tree.leaves(batch_stats):  # no BatchNorm: nothing to re-estimate
        return batch_stats
    batches = (b for epoch in itertools.count() for b in setup.train_epoch(batch_size, epoch))
    for images, _ in itertools.islice(batches, steps):
        batch_stats = _bn_statistics_step(params, batch_stats, images, model=setup.model)
    return batch_stats


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Flat ``{path: shape}`` of a pytree of arrays (or shape/dtype structs)."""
    return {p: tuple(np.shape(x)) for p, x in sparsity.flatten(tree).items()}


def tree_mismatches(
    want: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]], label: str = ''
) -> list[str]:
    """Every missing, unexpected or wrong-shaped leaf, one line each."""
    problems = [f'missing {label}{p} {s}' for p, s in want.items() if p not in got]
    problems += [f'unexpected {label}{p} {s}' for p, s in got.items() if p not in want]
    problems += [
        f'{label}{p}: expected shape {s}, got {got[p]}'
        for p, s in want.items()
        if p in got and got[p] != s
    ]
    return problems


def check_tree_matches(expected: Any, actual: Any, what: str) -> None:
    """Raises ValueError listing every missing, unexpected or wrong-shaped leaf."""
    problems = tree_mismatches(leaf_shapes(expected), leaf_shapes(actual))
    if problems:
        raise ValueError(f'{what} do not fit the configured model:\n  ' + '\n  '.join(problems))


def print_main(*args) -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(*args)


def pretrained_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.pretrained or os.path.join(workdir, PRETRAINED_DIR)


def jackpot_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The jackpot folder; config.jackpot 'none' (no jackpot) is never a folder name."""
    if config_lib.is_no_jackpot(config.jackpot):
        raise ValueError(
            f'config.jackpot={config.jackpot!r} means no jackpot, but mode {config.mode!r} needs '
            "one: set config.jackpot to a jackpot folder ('' = WORKDIR/jackpot)"
        )
    return config.jackpot or os.path.join(workdir, JACKPOT_DIR)


def check_jackpot_weights(
    config: ml_collections.ConfigDict, workdir: str, jackpot_meta: Mapping, fingerprint: str
) -> None:
    """Raises ValueError unless the jackpot was found in the weights of this fingerprint."""
    if jackpot_meta.get('weights_fingerprint') not in (None, fingerprint):
        raise ValueError(
            f'the jackpot at {jackpot_path(config, workdir)} was found in other weights than '
            f'{pretrained_path(config, workdir)} (weights fingerprint '
            f"{jackpot_meta['weights_fingerprint'][:12]} != {fingerprint[:12]}); point "
            'config.pretrained at the original weights, or config.jackpot at a jackpot of these'
        )


def _progress(steps: int, batch_size: int, desc: str, initial: int = 0):
    """A progress bar counted in steps, showing throughput in images per second."""
    return tqdm.tqdm(
        total=steps,
        initial=initial,
        desc=desc,
        unit='img',
        unit_scale=batch_size,
        leave=False,
        disable=jax.process_index() != 0,
    )


class EpochMetrics:
    """Per-epoch sums of the step metrics, folded in step order (so a resumed run adds
    the same floats in the same order as an uninterrupted one). Device values are
    fetched lazily, at :meth:`flush`, to keep the steps asynchronous. With
    ``trace=True`` the result also lists every step's loss, mask changes and flip-backs."""

    COUNTS = ('mask_changes', 'flip_backs')
    TRACED = ('loss', 'mask_changes', 'flip_backs')

    def __init__(self, sums: dict[str, Any] | None = None, trace: bool = False):
        self.sums = sums or {}
        self.trace = trace
        self._pending: list[tuple[int, Any]] = []

    def add(self, step: int, metrics: Any) -> None:
        self._pending.append((step, metrics))

    def flush(self) -> None:
        """Folds pending metrics in; raises FloatingPointError at the first non-finite loss
        or (in a search) the first step that leaves a score non-finite."""
        for step, metrics in zip(
            [s for s, _ in self._pending], to_python([m for _, m in self._pending])
        ):
            if not np.isfinite(metrics['loss']):
                raise FloatingPointError(f'the loss is {metrics["loss"]} at step {step}')
            if not metrics.get('scores_finite', True):
                raise FloatingPointError(f'scores became inf or NaN at step {step}')
            self.sums['steps'] = self.sums.get('steps', 0) + 1
            for key in ('loss', 'top1'):
                self.sums[key] = self.sums.get(key, 0.0) + metrics[key]
            for key in self.COUNTS:
                if key in metrics:
                    self.sums[key] = self.sums.get(key, 0) + metrics[key]
                    per_layer = self.sums.setdefault(key + '_per_layer', {})
                    for path, n in metrics[key + '_per_layer'].items():
                        per_layer[path] = per_layer.get(path, 0) + n
            if 'swap_rate' in metrics:
                self.sums['swap_rate'] = metrics['swap_rate']
            if self.trace:
                trace = self.sums.setdefault('trace', {'step': [], **{k: [] for k in self.TRACED}})
                trace['step'].append(step)
                for key in self.TRACED:
                    trace[key].append(metrics[key])
        self._pending = []

    def result(self) -> dict[str, Any]:
        self.flush()
        out = {k: v for k, v in self.sums.items() if k not in ('steps', 'loss', 'top1')}
        out.update(
            loss=self.sums['loss'] / self.sums['steps'], top1=self.sums['top1'] / self.sums['steps']
        )
        return out


def _epoch_learning_rate(cfg: ml_collections.ConfigDict, epoch: int) -> float:
    """The learning rate of an epoch under the per-epoch cosine."""
    return float(search.epoch_cosine(cfg.learning_rate, cfg.epochs, 1)(epoch))


# ----------------------------------------------------------------------------
# Weight training: dense pre-training and tuning under a fixed mask.
# ----------------------------------------------------------------------------
def _train_weights(
    setup: Setup,
    cfg: ml_collections.ConfigDict,
    params: Any,
    batch_stats: Any,
    masks: dict | None,
    mode: str,
    writer: MetricWriter,
) -> tuple[dense.TrainState, dict[str, float]]:
    steps = setup.steps_per_epoch(cfg.batch_size)
    optimizer = search.sgd_optimizer(
        cfg.learning_rate, cfg.weight_decay, cfg.momentum, cfg.epochs, steps
    )
    state = parallel.replicate(
        dense.init_train_state(params, batch_stats, optimizer, masks), setup.mesh
    )
    step_fn = dense.make_train_step(
        model=setup.model, optimizer=optimizer, label_smoothing=cfg.label_smoothing
    )
    with _progress(cfg.epochs * steps, cfg.batch_size, mode) as bar:
        for epoch in range(cfg.epochs):
            epoch_metrics = EpochMetrics()
            # The steps never wait on the host: metrics are fetched at the epoch's end.
            with jax.transfer_guard_device_to_host('disallow'):
                for i, batch in enumerate(setup.train_epoch(cfg.batch_size, epoch)):
                    state, metrics = step_fn(state, *batch)
                    epoch_metrics.add(epoch * steps + i + 1, metrics)
                    bar.update()
            record = {
                'mode': mode,
                'epoch': epoch + 1,
                'step': (epoch + 1) * steps,
                'learning_rate': _epoch_learning_rate(cfg, epoch),
                **epoch_metrics.result(),
            }
            writer.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
    result = setup.evaluate(state.params, state.batch_stats)
    writer.write(
        {
            'mode': mode,
            'epoch': cfg.epochs,
            'test_top1': result['top1'],
            'test_top5': result['top5'],
        }
    )
    logging.info('%s: test top-1 %.4f', mode, result['top1'])
    return state, result


@resolved
def run_pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains the dense model and saves it as the frozen starting point of searches."""
    setup = Setup(config)
    sample = jnp.zeros((1, *setup.source.image_shape), jnp.float32)
    init = jax.jit(functools.partial(setup.model.init, train=False))
    variables = init(jax.random.key(config.seed), sample)
    state, result = _train_weights(
        setup,
        config.pretrain,
        variables['params'],
        variables.get('batch_stats', {}),  # {} for a model without BatchNorm
        None,
        'pretrain',
        MetricWriter(workdir),
    )
    meta = {
        'model': config.model.to_dict(),
        'num_classes': setup.source.num_classes,
        'source': f'pretrain on {config.data.name}',
        'test_top1': result['top1'],
    }
    checkpoint.save_weights(pretrained_path(config, workdir), state.params, state.batch_stats, meta)
    return result


@resolved
def run_tune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains the kept weights of the workdir's jackpot (pruned weights stay exactly zero)."""
    if not config.tune.epochs:
        raise ValueError('tune.epochs is 0; set --config.tune.epochs=N (the paper uses 10)')
    setup = Setup(config)
    params, _, fingerprint = setup.load_weights(pretrained_path(config, workdir))
    _, masks, batch_stats, meta = checkpoint.load_jackpot(jackpot_path(config, workdir))
    check_jackpot_weights(config, workdir, meta, fingerprint)
    masks, batch_stats = parallel.replicate((masks, batch_stats), setup.mesh)
    state, result = _train_weights(
        setup, config.tune, params, batch_stats, masks, 'tune', MetricWriter(workdir)
    )
    meta = {
        'model': config.model.to_dict(),
        'num_classes': setup.source.num_classes,
        'source': f'tuned under the mask of {jackpot_path(config, workdir)}',
        'test_top1': result['top1'],
    }
    checkpoint.save_weights(os.path.join(workdir, TUNED_DIR), state.params, state.batch_stats, meta)
    return result


# ----------------------------------------------------------------------------
# Jackpot search.
# ----------------------------------------------------------------------------
def prunable_kernels(config: ml_collections.ConfigDict, params: dict) -> dict[str, jax.Array]:
    """The kernels the search prunes, keyed by path."""
    s = config.search
    flat = sparsity.flatten(params)
    return {p: flat[p] for p in sparsity.prunable_paths(params, s.prune_include, s.prune_exclude)}


def initial_pruning(config: ml_collections.ConfigDict, params: dict) -> tuple[dict, dict]:
    """Per-layer pruned counts and the magnitude masks at those counts.

    With ``search.pattern`` N:M, every eligible layer loses (M - N) / M of its weights,
    N of every M kept by magnitude; the others stay dense.
    """
    s = config.search
    kernels = prunable_kernels(config, params)
    pattern = structured.parse_pattern(s.pattern)
    if pattern:
        counts = structured.nm_counts({p: w.shape for p, w in kernels.items()}, *pattern)
        if not any(counts.values()):
            channels = {p: int(w.shape[-2]) for p, w in kernels.items() if w.ndim >= 2}
            raise ValueError(
                f'search.pattern {s.pattern!r} prunes nothing on model {config.model.name!r}: no '
                f'prunable layer has input channels divisible by {pattern[1]} (input channels: '
                f'{channels}); pick an M that divides some of them, or search.pattern=\'\''
            )
    else:
        counts = sparsity.pruned_counts(parallel.to_host(kernels), s.sparsity, s.allocation)
    magnitude = _mask_rule(
        config, sparsity.magnitude_masks, structured.magnitude_masks, counts=counts
    )
    return counts, jax.jit(magnitude)(kernels)


def _mask_rule(config: ml_collections.ConfigDict, unstructured, nm, **bound):
    """``nm`` with the N and M of ``search.pattern``, else ``unstructured``; ``bound`` kwargs."""
    pattern = structured.parse_pattern(config.search.pattern)
    if pattern:
        return functools.partial(nm, n=pattern[0], m=pattern[1], **bound)
    return functools.partial(unstructured, **bound)


def random_masks(
    config: ml_collections.ConfigDict, params: dict, counts: dict[str, int], rng: jax.Array
) -> dict[str, jax.Array]:
    """Uniformly random masks at the given counts (N:M ones under ``search.pattern``)."""
    fn = _mask_rule(config, sparsity.random_masks, structured.random_masks, counts=counts)
    return jax.jit(fn)(rng, prunable_kernels(config, params))


def initial_search(config: ml_collections.ConfigDict, params: dict) -> tuple[dict, dict, dict]:
    """Counts, first masks and scores of a search, per ``config.search.score_init``.

    'magnitude' (the paper): scores 1 / ``pruned_score`` so the first mask is the
    magnitude mask. 'kaiming' (edge-popup's init) and 'random' (U(0, 1)) draw the
    scores from ``jax.random.key(seed + 2)`` and start from the mask the update rule
    picks from them. The per-layer counts are the same in all three.
    """
    s = config.search
    counts, magnitude = initial_pruning(config, params)
    if s.score_init == 'magnitude':
        return counts, magnitude, sparsity.init_scores(magnitude, s.pruned_score)
    init = {'kaiming': sparsity.kaiming_scores, 'random': sparsity.uniform_scores}[s.score_init]
    scores = jax.jit(init)(jax.random.key(config.seed + 2), prunable_kernels(config, params))
    pick = _mask_rule(
        config,
        sparsity.masks_from_scores,
        structured.masks_from_scores,
        counts=counts,
        mode=s.mask_update,
    )
    return counts, jax.jit(pick)(scores), scores


def mask_report(config: ml_collections.ConfigDict, params: Any, masks: Mapping) -> dict[str, Any]:
    """``sparsity.sparsity_report``, plus the N:M check under ``search.pattern``."""
    report = sparsity.sparsity_report(params, masks)
    pattern = structured.parse_pattern(config.search.pattern)
    if pattern:
        report.update(structured.pattern_report(masks, *pattern))
    return report


def _search_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields a resumed search must share with the one that wrote the checkpoint."""
    flat = sparsity.flatten(config.to_dict())
    return {
        k: v
        for k, v in flat.items()
        if not any(
            k == c or k.startswith(c + '/')
            for c in (c.replace('.', '/') for c in _RESUMABLE_CHANGES)
        )
    }


def _check_resumable(saved: dict[str, Any], expected: dict[str, Any], directory: str) -> None:
    if saved['weights_fingerprint'] != expected['weights_fingerprint']:
        raise ValueError(
            f"the weights at {expected['weights_path']} differ from those the search in "
            f"{directory} started from (saved from {saved['weights_path']}, fingerprint "
            f"{saved['weights_fingerprint'][:12]} != {expected['weights_fingerprint'][:12]}); "
            'point config.pretrained at the original weights, or use a new --workdir'
        )
    diffs = sorted(
        f"{k.replace('/', '.')}: checkpoint {saved['config'].get(k)!r}, now {v!r}"
        for k, v in expected['config'].items()
        if saved['config'].get(k) != v
    )
    diffs += [
        f"{k.replace('/', '.')}: only in the checkpoint"
        for k in saved['config']
        if k not in expected['config']
    ]
    if diffs or saved['counts'] != expected['counts']:
        raise ValueError(
            f'the search checkpoints in {directory} come from a different configuration:\n  '
            + '\n  '.join(diffs or ['per-layer pruned counts differ'])
            + '\nrestore those settings to resume, or use a new --workdir'
        )


def _truncate_metrics(path: str, mode: str, after_step: int) -> None:
    """Drops `mode` records written after `after_step` (by a run that then died)."""
    if jax.process_index() or not os.path.exists(path):
        return
    records = read_jsonl(path)
    kept = [r for r in records if r.get('mode') != mode or r.get('step', 0) <= after_step]
    if len(kept) != len(records):
        with open(path + '.tmp', 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in kept)
        os.replace(path + '.tmp', path)


@resolved
def run_search(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Searches a jackpot in the frozen weights; resumes from WORKDIR/checkpoints if present."""
    s = config.search
    setup = Setup(config)
    weights_path = pretrained_path(config, workdir)
    params, batch_stats, fingerprint = setup.load_weights(weights_path)
    counts, masks, scores = initial_search(config, params)
    steps = setup.steps_per_epoch(s.batch_size)
    optimizer = search.sgd_optimizer(s.learning_rate, s.weight_decay, s.momentum, s.epochs, steps)
    state = parallel.replicate(
        search.init_search_state(params, batch_stats, masks, scores, optimizer), setup.mesh
    )
    step_fn = search.make_search_step(
        forward=adapters.linen_forward(setup.model, 'batch_stats'),
        optimizer=optimizer,
        counts=counts,
        steps_per_epoch=steps,
        epochs=s.epochs,
        mask_update=s.mask_update,
        rate_schedule=s.rate_schedule,
        bn_mode=s.bn_mode,
        label_smoothing=s.label_smoothing,
        pattern=structured.parse_pattern(s.pattern),
        mask_frozen_from=search.mask_freeze_step(s.mask_freeze_fraction, s.epochs, steps),
    )

    # Restore: the workdir's own latest checkpoint, else start from the initial masks.
    ckpts = checkpoint.SearchCheckpoints(
        os.path.join(workdir, CHECKPOINTS_DIR), config.checkpoint.keep
    )
    identity = {
        'config': _search_identity(config),
        'counts': counts,
        'weights_fingerprint': fingerprint,
        'weights_path': os.path.abspath(weights_path),
    }
    history: list[dict[str, Any]] = []
    epoch_metrics = EpochMetrics(trace=s.step_trace)
    earlier_seconds = 0.0  # search time before the latest checkpoint, over all earlier runs
    latest = ckpts.latest_step()
    if latest is not None:
        _check_resumable(ckpts.read_meta(latest), identity, ckpts.directory)
        state, meta = ckpts.restore(latest, like=state)
        history = meta['history']
        epoch_metrics = EpochMetrics(meta['epoch_sums'], trace=s.step_trace)
        earlier_seconds = meta.get('search_seconds', 0.0)
        logging.info('resuming the search from step %d of %s', latest, ckpts.directory)
    start = int(parallel.to_host(state.step))
    metrics_path = os.path.join(workdir, METRICS_FILE)
    _truncate_metrics(metrics_path, 'search', start)
    writer = MetricWriter(workdir)

    def jackpot_variables(state):
        """Masked params and the BatchNorm statistics the jackpot is evaluated and saved with."""
        masked = sparsity.masked_params(state.frozen_params, state.masks)
        if not s.bn_recalibration_steps:
            return masked, state.batch_stats
        return masked, adapt_batch_stats(
            setup, masked, state.batch_stats, s.bn_recalibration_steps, s.batch_size
        )

    eval_splits = ('validation', 'test') if setup.source.has_validation else ('test',)

    def evaluate_jackpot(state, record):
        """Adds each split's top-1/top-5 to ``record``; returns the jackpot's statistics.

        With ``search.compare_bn_statistics`` also top-1 under the search's running
        statistics and under ones re-estimated under the mask (``*_running``,
        ``*_recalibrated``), whichever of them the jackpot uses.
        """
        masked, stats = jackpot_variables(state)
        for split in eval_splits:
            result = setup.evaluate(masked, stats, split)
            record.update({f'{split}_top1': result['top1'], f'{split}_top5': result['top5']})
        if s.compare_bn_statistics:
            used = 'recalibrated' if s.bn_recalibration_steps else 'running'
            other = (
                state.batch_stats
                if used == 'recalibrated'
                else adapt_batch_stats(
                    setup, masked, state.batch_stats, DIAGNOSTIC_RECALIBRATION_STEPS, s.batch_size
                )
            )
            for split in eval_splits:
                record[f'{split}_top1_{used}'] = record[f'{split}_top1']
                record[f'{split}_top1_{"running" if used == "recalibrated" else "recalibrated"}'] = (
                    setup.evaluate(masked, other, split)['top1']
                )
        return stats

    selection_split = eval_splits[0]  # validation when there is one, else (the paper) test

    def search_seconds():
        return earlier_seconds + time.perf_counter() - clock

    def save(metrics=None):
        epoch_metrics.flush()
        meta = {'history': history, 'epoch_sums': epoch_metrics.sums}
        ckpts.save(state, {**identity, **meta, 'search_seconds': search_seconds()}, metrics)

    every = config.checkpoint.every_steps
    jackpot_stats = None  # those of the last epoch evaluated here
    clock = time.perf_counter()
    try:
        with _progress(s.epochs * steps, s.batch_size, 'search', initial=start) as bar:
            for epoch in range(start // steps, s.epochs):
                first = start - epoch * steps if epoch == start // steps else 0
                # The steps never wait on the host; only checkpoints and the epoch's end may.
                with jax.transfer_guard_device_to_host('disallow'):
                    batches = setup.train_epoch(s.batch_size, epoch, first)
                    for i, batch in enumerate(batches, first + 1):
                        state, metrics = step_fn(state, *batch)
                        global_step = epoch * steps + i
                        epoch_metrics.add(global_step, metrics)
                        bar.update()
                        if every and global_step % every == 0 and i < steps:
                            with jax.transfer_guard_device_to_host('allow'):
                                save()
                record = {
                    'mode': 'search',
                    'epoch': epoch + 1,
                    'step': (epoch + 1) * steps,
                    'learning_rate': _epoch_learning_rate(s, epoch),
                    **epoch_metrics.result(),
                }
                jackpot_stats = evaluate_jackpot(state, record)
                history.append(record)
                writer.write(record)
                epoch_metrics = EpochMetrics(trace=s.step_trace)
                save({'selection_top1': record[f'{selection_split}_top1']})
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    test_top1=f"{record['test_top1']:.4f}",
                    changes=record['mask_changes'],
                )
                logging.info(
                    'search epoch %d/%d: loss %.4f, train top-1 %.4f, %s, mask changes %d',
                    epoch + 1,
                    s.epochs,
                    record['loss'],
                    record['top1'],
                    ', '.join(f"{k} top-1 {record[k + '_top1']:.4f}" for k in eval_splits),
                    record['mask_changes'],
                )
    except FloatingPointError as e:
        ckpts.wait()
        raise FloatingPointError(
            f'{e}: the search stopped; the last good checkpoint is step {ckpts.latest_step()} in '
            f'{ckpts.directory}. Lower search.learning_rate (or check the data), then rerun: '
            'the search resumes from that checkpoint'
        ) from e
    finally:
        ckpts.wait()
        ckpts.close()
    seconds = search_seconds() if start < s.epochs * steps else earlier_seconds

    host_masks = parallel.to_host(state.masks)
    report = mask_report(config, params, host_masks)
    # The best epoch is chosen on the validation split when there is one; only the
    # paper's protocol (no validation split) chooses it on the test split, as published.
    best = max(history, key=lambda r: r[f'{selection_split}_top1'])
    last = [r['test_top1'] for r in history[-5:]]
    summary = {
        'jackpot_top1': history[-1]['test_top1'],
        'jackpot_top5': history[-1]['test_top5'],
        'best_top1': best['test_top1'],
        'best_epoch': best['epoch'],
        'best_selected_on': selection_split,
        'last5_test_top1_range': [min(last), max(last)],
        'sparsity': report['sparsity'],
        'model_sparsity': report['model_sparsity'],
        'search_seconds': seconds,
        'weights_ever_flipped': int(
            sum(np.count_nonzero(v) for v in parallel.to_host(state.ever_flipped).values())
        ),
    }
    if 'validation_top1' in history[-1]:
        summary['jackpot_validation_top1'] = history[-1]['validation_top1']
    checkpoint.save_jackpot(
        jackpot_path(config, workdir),
        None,
        host_masks,
        jackpot_variables(state)[1] if jackpot_stats is None else jackpot_stats,
        {**identity, 'model': config.model.to_dict(), 'summary': summary},
    )
    logging.info('jackpot sparsity report:\n%s', sparsity.format_sparsity_report(report))
    if jax.process_index() == 0:
        plots.plot_layer_sparsity(report, os.path.join(workdir, LAYER_SPARSITY_PNG))
        plots.plot_mask_changes(history, os.path.join(workdir, MASK_CHANGES_PNG))
    if config.tune.epochs:
        summary['tuned_top1'] = run_tune(config, workdir)['top1']
    return {**summary, 'state': state, 'counts': counts, 'history': history}


# ----------------------------------------------------------------------------
# Evaluation, export and the demo.
# ----------------------------------------------------------------------------
@resolved
def run_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluates the jackpot (masks + its batch statistics) over the weights.

    With ``config.jackpot='none'`` the weights are evaluated as they are, e.g. the
    masked weights written by 'export'.
    """
    setup = Setup(config)
    params, batch_stats, fingerprint = setup.load_weights(pretrained_path(config, workdir))
    if not config_lib.is_no_jackpot(config.jackpot):
        path = jackpot_path(config, workdir)
        _, masks, batch_stats, meta = checkpoint.load_jackpot(path)
        check_jackpot_weights(config, workdir, meta, fingerprint)
        masks, batch_stats = parallel.replicate((masks, batch_stats), setup.mesh)
        params = sparsity.masked_params(params, masks)
        what = f'jackpot {path}'
    else:
        flat = sparsity.flatten(params)
        s = config.search
        masks = {
            p: flat[p] != 0
            for p in sparsity.prunable_paths(params, s.prune_include, s.prune_exclude)
        }
        what = f'weights {pretrained_path(config, workdir)}'
    result = setup.evaluate(params, batch_stats)
    report = mask_report(config, params, parallel.to_host(masks))
    print_main(sparsity.format_sparsity_report(report))
    print_main(f"{what}: test top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}")
    tuned = os.path.join(workdir, TUNED_DIR)
    if os.path.isdir(tuned) and not config.pretrained:
        tuned_params, tuned_stats, _ = setup.load_weights(tuned)
        result['tuned_top1'] = setup.evaluate(tuned_params, tuned_stats)['top1']
        print_main(f"tuned weights {tuned}: test top-1 {result['tuned_top1']:.4f}")
    return {**result, 'sparsity': report['sparsity']}


@resolved
def run_export(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Writes the jackpot's masked dense params as ordinary weights (WORKDIR/masked_weights)."""
    setup = Setup(config)
    params, _, fingerprint = setup.load_weights(pretrained_path(config, workdir))
    _, masks, batch_stats, meta = checkpoint.load_jackpot(jackpot_path(config, workdir))
    check_jackpot_weights(config, workdir, meta, fingerprint)
    masked = parallel.to_host(sparsity.masked_params(params, parallel.replicate(masks, setup.mesh)))
    out = os.path.join(workdir, MASKED_WEIGHTS_DIR)
    checkpoint.save_weights(
        out,
        masked,
        batch_stats,
        {
            'model': config.model.to_dict(),
            'num_classes': setup.source.num_classes,
            'source': f'masked by {jackpot_path(config, workdir)}',
        },
    )
    print_main(
        f'masked weights written to {out}; evaluate them with '
        f'--mode=evaluate --config.pretrained={out} --config.jackpot=none'
    )
    return {'masked_weights': out}


@resolved
def ensure_pretrained(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Pre-trains the dense model unless its weights are already there."""
    if os.path.isdir(pretrained_path(config, workdir)):
        logging.info('using the pre-trained weights at %s', pretrained_path(config, workdir))
    else:
        run_pretrain(config, workdir)


@resolved
def baseline_accuracies(
    config: ml_collections.ConfigDict, setup: Setup, params: Any, batch_stats: Any
) -> dict[str, float]:
    """Test top-1 of the dense weights and, without retraining, of the magnitude mask and of
    a random mask (``jax.random.key(seed + 1)``) at the search's per-layer counts."""
    counts, magnitude = initial_pruning(config, params)
    random = random_masks(config, params, counts, jax.random.key(config.seed + 1))

    def accuracy(masks):
        masked = params if masks is None else sparsity.masked_params(params, masks)
        return setup.evaluate(masked, batch_stats)['top1']

    return {
        'dense_top1': accuracy(None),
        'magnitude_top1': accuracy(magnitude),
        'random_top1': accuracy(random),
    }


@resolved
def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Pretrain -> search -> compare with magnitude and random masks; writes summary.json."""
    total_start = time.perf_counter()
    ensure_pretrained(config, workdir)
    setup = Setup(config)
    params, batch_stats, _ = setup.load_weights(pretrained_path(config, workdir))
    summary = baseline_accuracies(config, setup, params, batch_stats)
    found = run_search(config, workdir)
    for key in (
        'jackpot_top1',
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
        with open(os.path.join(workdir, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=2)
    print_main(format_summary(config, summary))
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
        f"best epoch of the search (chosen on the {summary['best_selected_on']} split): epoch "
        f"{summary['best_epoch']}, test top-1 {summary['best_top1']:.2%}; search time "
        f"{summary['search_seconds']:.1f} s, total {summary['total_seconds']:.1f} s"
    )
    return '\n'.join(lines)


def run_overlap(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Other criteria's masks at the jackpot's per-layer counts: accuracy, overlap (studies.py)."""
    from jackpot_jax import studies  # pylint: disable=g-import-not-at-top  (studies imports train)

    return studies.run_overlap(config, workdir)


def _search_study(name: str):
    def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
        from jackpot_jax import search_studies  # pylint: disable=g-import-not-at-top

        return search_studies.STUDIES[name](config, workdir)

    run.__doc__ = f'The {name!r} study of search_studies.py.'
    return run


MODES = {
    'overlap': run_overlap,
    'search_cost': _search_study('search_cost'),
    'restriction': _search_study('restriction'),
    'sweep': _search_study('sweep'),
    'stability': _search_study('stability'),
    'pretrain': run_pretrain,
    'search': run_search,
    'tune': run_tune,
    'evaluate': run_evaluate,
    'export': run_export,
    'demo': run_demo,
}
