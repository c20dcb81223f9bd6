"""The library entry point: a jackpot search over any Flax model in one call.

:func:`find_jackpot` takes a Linen module (with its variables), an NNX module, or a
forward function (see :mod:`jackpot_jax.adapters`), an iterable of batches, and the
search's settings, and returns a :class:`Jackpot`: masks, scores, the masked params, the
model's statistics after the search and a report. It drives the same engine as the
launcher (:mod:`jackpot_jax.engine`): with ``workdir=`` it checkpoints, resumes, writes
metrics and saves the jackpot; with ``num_devices=`` or ``mesh=`` it runs data-parallel;
with ``loss_fn=`` it searches any task. :func:`load_jackpot` reads a saved jackpot back.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jackpot_jax import adapters, checkpoint, engine, parallel, search
from jackpot_jax import sparsity as sparsity_lib
from jackpot_jax import workdir as workdir_lib
from jackpot_jax.engine import recalibrate_statistics  # noqa: F401  (exported)
from jackpot_jax.settings import SearchSettings

Batch = Any
Batches = Iterable[Batch] | Callable[[int], Iterable[Batch]]
JACKPOT_DIR = 'jackpot'


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames='forward')
def _eval_outputs(forward, params, statistics, inputs):
    return forward(params, statistics, inputs, train=False)[0]


@jax.jit
def _classification_sums(logits, labels, valid):
    hits = (jnp.argmax(logits, -1) == labels) & valid
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(hits), jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid)


def _batch_valid(batch: Batch, size: int) -> np.ndarray:
    """The batch's example mask: a tuple's third item or a dict's 'valid' (default: all)."""
    if isinstance(batch, Mapping):
        valid = batch.get('valid')
    else:
        valid = batch[2] if len(batch) > 2 else None
    return np.ones(size, bool) if valid is None else np.asarray(valid, bool)


def evaluate_metrics(
    forward: adapters.Forward,
    params: Any,
    statistics: Any,
    batches: Iterable[Batch],
    *,
    loss_fn: search.LossFn | None = None,
    inputs_fn: Callable[[Batch], Any] = search.batch_inputs,
) -> dict[str, float]:
    """Metrics in eval mode over the batches, each example once, and their ``examples``.

    Default (classification): ``top1`` and the mean cross-entropy ``loss`` over the valid
    examples (a tuple's third item or a dict's ``'valid'`` marks padding). With
    ``loss_fn``: its loss and named metrics, averaged over the examples (batches weighted
    by their size). Non-finite model outputs raise FloatingPointError.
    """
    sums: dict[str, float] = {}
    total = 0
    for index, batch in enumerate(batches):
        inputs = inputs_fn(batch)
        outputs = _eval_outputs(forward, params, statistics, inputs)
        if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(outputs)):
            raise FloatingPointError(
                f'the model gave inf or NaN outputs on evaluation batch {index}; check that '
                'batch for inf or NaN inputs (or the weights for non-finite values)'
            )
        if loss_fn is None:
            labels = np.asarray(search.batch_labels(batch))
            valid = _batch_valid(batch, len(labels))
            correct, loss, count = jax.device_get(_classification_sums(outputs, labels, valid))
            values, size = {'top1': float(correct), 'loss': float(loss)}, int(count)
        else:
            loss, named = jax.device_get(loss_fn(outputs, batch))
            size = int(np.shape(jax.tree.leaves(inputs)[0])[0])
            values = {k: float(v) * size for k, v in {'loss': loss, **named}.items()}
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
        total += size
    if not total:
        raise ValueError('evaluate got no examples; pass a non-empty iterable of batches')
    return {**{k: v / total for k, v in sums.items()}, 'examples': total}


def evaluate(
    forward: adapters.Forward,
    params: Any,
    statistics: Any,
    batches: Iterable[Batch],
    *,
    metric: str = 'top1',
    loss_fn: search.LossFn | None = None,
    inputs_fn: Callable[[Batch], Any] = search.batch_inputs,
) -> float:
    """One metric of :func:`evaluate_metrics` (default: top-1 accuracy)."""
    result = evaluate_metrics(
        forward, params, statistics, batches, loss_fn=loss_fn, inputs_fn=inputs_fn
    )
    if metric not in result:
        raise ValueError(f'unknown metric {metric!r}; the evaluation gives {sorted(result)}')
    return result[metric]


# ----------------------------------------------------------------------------
# The result, saved and loaded.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Jackpot:
    """What :func:`find_jackpot` found (or :func:`load_jackpot` read).

    ``masks`` and ``scores`` are flat ``{path: array}`` dicts (True = kept); ``params`` are
    the frozen params with every prunable kernel multiplied by its mask; ``statistics``
    the model's other state after the search (Linen: a dict of collections such as
    ``{'batch_stats': ...}``; NNX: its non-param state). ``report`` holds ``'sparsity'``
    (per layer and in total), ``'epochs'`` (loss, training metrics, mask changes and
    flip-backs per epoch, and the metrics of each evaluated split), the kept epoch and how
    it was chosen.
    """

    masks: dict[str, jax.Array]
    scores: dict[str, jax.Array] | None
    counts: dict[str, int]
    params: Any
    statistics: Any
    report: dict[str, Any]
    forward: adapters.Forward
    nnx_split: adapters.NnxSplit | None = None
    loss_fn: search.LossFn | None = None
    inputs_fn: Callable[[Batch], Any] = search.batch_inputs
    weights_fingerprint: str = ''

    @property
    def variables(self) -> dict[str, Any]:
        """Linen variables of the jackpot: ``model.apply(jackpot.variables, x, train=False)``."""
        return {'params': self.params, **self.statistics}

    def module(self) -> Any:
        """An NNX module holding the jackpot (for an NNX model only)."""
        if self.nnx_split is None:
            raise ValueError('module() is for NNX models; use jackpot.variables with Linen')
        return self.nnx_split.merge(self.params, self.statistics)

    def predict(self, inputs: Any) -> jax.Array:
        """The jackpot's outputs (logits) in eval mode."""
        return _eval_outputs(self.forward, self.params, self.statistics, inputs)

    def evaluate(self, batches: Iterable[Batch], metric: str = 'top1') -> float:
        """One metric of the jackpot in eval mode over the batches (default: top-1)."""
        return evaluate(
            self.forward, self.params, self.statistics, batches, metric=metric,
            loss_fn=self.loss_fn, inputs_fn=self.inputs_fn,
        )

    def summary(self) -> str:
        """The per-layer sparsity table, one line per epoch, and the kept epoch."""
        lines = [sparsity_lib.format_sparsity_report(self.report['sparsity'])]
        if self.report.get('output_layer'):
            lines.append(self.report['output_layer'])
        for r in self.report.get('epochs', []):
            named = ', '.join(
                f'{k} {v:.4f}' for k, v in r.items()
                if isinstance(v, float) and k not in ('loss', 'learning_rate', 'swap_rate')
            )
            lines.append(
                f"epoch {r['epoch']}: loss {r['loss']:.4f}, {named}, mask changes "
                f"{r['mask_changes']}"
            )
        if 'kept_epoch' in self.report:
            lines.append(f"jackpot kept: {self.report['choice']}")
        return '\n'.join(lines)

    def save(self, path: str, *, overwrite: bool = False) -> None:
        """Writes the jackpot (bit-packed masks, scores, statistics, report, the weights'
        fingerprint) to the folder ``path``, apart from the weights; an existing folder is
        replaced only with ``overwrite=True``."""
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(
                f'{path} exists; pass overwrite=True to replace it, or save to another path'
            )
        meta = {
            'weights_fingerprint': self.weights_fingerprint,
            'counts': self.counts,
            'report': _jsonable(self.report),
        }
        checkpoint.save_jackpot(path, self.scores, self.masks, self.statistics, meta)


def _jsonable(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_jsonable(v) for v in tree]
    if isinstance(tree, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(tree).tolist()
    return tree


def load_jackpot(
    path: str,
    model: Any,
    variables: Mapping | None = None,
    *,
    loss_fn: search.LossFn | None = None,
    inputs_fn: Callable[[Batch], Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
) -> Jackpot:
    """The jackpot saved at ``path`` (by :meth:`Jackpot.save` or a ``workdir``) over the
    frozen weights of ``model`` / ``variables``, which must be the ones it was found in."""
    forward, params, statistics, split = as_forward(
        model, variables, train_kwargs=train_kwargs, eval_kwargs=eval_kwargs
    )
    scores, masks, saved_statistics, meta = checkpoint.load_jackpot(path)
    fingerprint = checkpoint.weights_fingerprint(params)
    if meta.get('weights_fingerprint') not in (None, '', fingerprint):
        raise ValueError(
            f'the jackpot at {path} was found in other weights (fingerprint '
            f"{meta['weights_fingerprint'][:12]} != {fingerprint[:12]} of the params given); "
            'pass the pre-trained variables it was searched in'
        )
    from jackpot_jax import trees  # pylint: disable=g-import-not-at-top

    trees.check_tree_matches(statistics, saved_statistics, f'the statistics saved at {path}')
    flat = sparsity_lib.flatten(params)
    trees.check_tree_matches(
        {p: flat.get(p) for p in masks if p in flat}, masks, f'the masks saved at {path}'
    )
    return Jackpot(
        masks=masks,
        scores=scores,
        counts=dict(meta.get('counts', {})),
        params=sparsity_lib.masked_params(params, masks),
        statistics=saved_statistics,
        report=meta.get('report', {}),
        forward=forward,
        nnx_split=split,
        loss_fn=loss_fn,
        inputs_fn=inputs_fn or search.batch_inputs,
        weights_fingerprint=fingerprint,
    )


def as_forward(
    model: Any,
    variables: Mapping | None = None,
    *,
    train_kwargs: Mapping[str, Any] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
) -> tuple[adapters.Forward, Any, Any, adapters.NnxSplit | None]:
    """``(forward, params, statistics, nnx_split)`` of a Linen module (or its ``apply``) with
    its variables, an NNX module, or a forward function with ``{'params', ...}`` variables."""
    from flax import nnx  # pylint: disable=g-import-not-at-top

    if isinstance(model, nnx.Module):
        if variables is not None:
            raise ValueError(
                'an NNX module holds its own variables; call find_jackpot(model, None, batches)'
            )
        split = adapters.split_nnx(model, train_kwargs=train_kwargs, eval_kwargs=eval_kwargs)
        return split.forward, split.params, split.statistics, split
    owner = getattr(model, '__self__', None)
    if isinstance(owner, nn.Module) and getattr(model, '__name__', '') == 'apply':
        model = owner  # model.apply: the module itself
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(
            f'model is a {type(model).__name__}; pass a flax.linen.Module with its variables, '
            'a flax.nnx.Module, or a forward(params, statistics, images, *, train, rng)'
        )
    if not isinstance(variables, Mapping) or 'params' not in variables:
        raise ValueError(
            "variables must be a mapping with 'params' (what model.init returns), got "
            f'{type(variables).__name__}'
        )
    statistics = {k: v for k, v in variables.items() if k != 'params'}
    if isinstance(model, nn.Module):
        forward = adapters.linen_forward(
            model, tuple(statistics), train_kwargs=train_kwargs, eval_kwargs=eval_kwargs
        )
    else:
        forward = model
    return forward, variables['params'], statistics, None


# ----------------------------------------------------------------------------
# The one-call search.
# ----------------------------------------------------------------------------
def find_jackpot(
    model: Any,
    variables: Mapping | None,
    batches: Batches,
    *,
    validation_batches: Iterable[Batch] | None = None,
    eval_batches: Iterable[Batch] | None = None,
    steps_per_epoch: int | None = None,
    loss_fn: search.LossFn | None = None,
    inputs_fn: Callable[[Batch], Any] | None = None,
    workdir: str | None = None,
    checkpoint_every: int = 0,
    num_devices: int = 1,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    rng: jax.Array | int = 0,
    train_kwargs: Mapping[str, Any] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
    settings: SearchSettings | None = None,
    **options: Any,
) -> Jackpot:
    """Searches a jackpot: masks over the frozen params of ``model``, no weight trained.

    ``batches``: an iterable walked once per epoch (an ``epoch -> iterable`` callable gets
    the epoch), ``steps_per_epoch`` of them per epoch (default: ``len(batches)``); each a
    tuple ``(inputs, labels)`` or a dict (``inputs``/``image`` and ``label``/``labels``).
    ``options`` are the fields of :class:`~jackpot_jax.settings.SearchSettings`
    (``sparsity=0.9, epochs=10, learning_rate=0.1, optimizer='sgd', protocol='stable'``, ...;
    or pass ``settings=``); ``optimizer`` may also be any optax transformation of the scores.

    ``validation_batches`` (held-out *training* examples, never the test set) are what the
    kept epoch is chosen on (``selection_metric``, default top-1); ``eval_batches`` are
    only reported on. ``loss_fn(outputs, batch) -> (loss, {name: value})`` searches any
    task (default: softmax cross-entropy on integer labels, with top-1), ``inputs_fn(batch)``
    gives the model's input. ``workdir``: checkpoints (every ``checkpoint_every`` steps and
    each epoch), exact resume when called again, ``metrics.jsonl``, TensorBoard scalars, and
    the jackpot in ``workdir/jackpot``. ``num_devices`` (0 = all) or ``mesh``: data-parallel
    over the devices (the batch size must divide over them). ``rng`` (a key or a seed)
    feeds drawn score inits and dropout. ``train_kwargs`` / ``eval_kwargs``: the model's
    train/eval-mode keywords (default: read from its signature).
    """
    custom_optimizer = options.pop('optimizer', None)
    if custom_optimizer is not None and not isinstance(custom_optimizer, str):
        options['optimizer'] = 'sgd'  # replaced by the transformation given
    elif custom_optimizer is not None:
        options['optimizer'], custom_optimizer = custom_optimizer, None
    settings = _settings(settings, options).resolved(validation_batches is not None)
    forward, params, statistics, split = as_forward(
        model, variables, train_kwargs=train_kwargs, eval_kwargs=eval_kwargs
    )
    inputs_fn = inputs_fn or search.batch_inputs
    mesh = mesh or parallel.make_mesh(num_devices or None)
    steps_per_epoch = _steps_per_epoch(batches, steps_per_epoch)
    held_out = {'validation': validation_batches, 'eval': eval_batches}
    for name, given in held_out.items():
        _check_reiterable(f'{name}_batches', given)
    checker = _BatchChecker(forward, params, statistics, loss_fn, inputs_fn, settings)
    checker.check_first(next(iter(engine.batches_of_epoch(batches, 0)), None), 'batches')
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    splits = tuple(name for name, given in held_out.items() if given is not None)

    def train_epoch(epoch: int, first: int):
        stream = itertools.islice(engine.batches_of_epoch(batches, epoch), first, steps_per_epoch)
        count = first
        for count, batch in enumerate(stream, first + 1):
            checker.check(batch, f'batch {count - 1} of epoch {epoch}')
            yield _place(batch, mesh)
        if count < steps_per_epoch:
            raise ValueError(
                f'epoch {epoch + 1} got {count} batches, fewer than steps_per_epoch='
                f'{steps_per_epoch}; pass a re-iterable (a list) or a callable epoch -> batches, '
                'or lower steps_per_epoch'
            )

    def evaluate_split(masked, stats, split_name):
        return evaluate_metrics(
            forward, masked, stats, held_out[split_name], loss_fn=loss_fn, inputs_fn=inputs_fn
        )

    replicated = parallel.replicate((params, statistics), mesh)
    output_paths = ()
    if settings.dense_output_layer:
        output_paths = checker.output_kernels()
    task = engine.SearchTask(
        forward=forward,
        params=replicated[0],
        statistics=replicated[1],
        mesh=mesh,
        train_epoch=train_epoch,
        steps_per_epoch=steps_per_epoch,
        evaluate=evaluate_split,
        splits=splits,
        rng=key,
        loss_fn=loss_fn,
        optimizer=custom_optimizer,
        inputs_fn=inputs_fn,
        progress=progress,
        excluded_output_paths=output_paths,
    )
    fingerprint = checkpoint.weights_fingerprint(params)
    persistence = None
    if workdir is not None:
        persistence = _persistence(
            workdir, checkpoint_every, settings, task, fingerprint, steps_per_epoch,
            custom_optimizer,
        )
        workdir_lib.prepare(workdir)
        workdir_lib.lock(workdir)
    try:
        outcome = engine.run(task, settings, persistence)
    finally:
        if workdir is not None:
            workdir_lib.unlock(workdir)
    jackpot = Jackpot(
        masks=outcome.kept_masks,
        scores=outcome.kept_scores,
        counts=outcome.plan.counts,
        params=sparsity_lib.masked_params(params, outcome.kept_masks),
        statistics=outcome.kept_statistics,
        report={
            'sparsity': outcome.plan.report(params, outcome.kept_masks),
            'epochs': outcome.history,
            'kept_epoch': outcome.kept['epoch'],
            'final_jackpot': settings.final_jackpot,
            'choice': outcome.choice,
            'output_layer': _output_layer_note(output_paths, outcome.plan),
            'search_seconds': outcome.search_seconds,
        },
        forward=forward,
        nnx_split=split,
        loss_fn=loss_fn,
        inputs_fn=inputs_fn,
        weights_fingerprint=fingerprint,
    )
    if workdir is not None and jax.process_index() == 0:
        jackpot.save(os.path.join(workdir, JACKPOT_DIR), overwrite=True)
    return jackpot


def _settings(settings: SearchSettings | None, options: dict[str, Any]) -> SearchSettings:
    """``settings`` with ``options`` applied; unknown option names are refused."""
    names = [f.name for f in dataclasses.fields(SearchSettings)]
    unknown = [k for k in options if k not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f' (did you mean {close[0]!r}?)' if close else ''
        raise TypeError(
            f'find_jackpot got an unknown option {unknown[0]!r}{hint}; the options are the '
            f'fields of SearchSettings: {", ".join(names)}'
        )
    return dataclasses.replace(settings or SearchSettings(), **options)


def _steps_per_epoch(batches: Batches, steps_per_epoch: int | None) -> int:
    if steps_per_epoch is None:
        if callable(batches) or not hasattr(batches, '__len__'):
            raise ValueError('batches has no len(); pass steps_per_epoch=N')
        steps_per_epoch = len(batches)
        if not steps_per_epoch:
            raise ValueError('batches is empty; pass at least one batch per epoch')
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int):
        raise ValueError(f'steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}')
    if steps_per_epoch < 1:
        raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch!r}')
    return steps_per_epoch


def _check_reiterable(name: str, batches: Any) -> None:
    """Held-out batches are walked every epoch: a list (or any re-iterable), never empty."""
    if batches is None:
        return
    if iter(batches) is batches:
        raise ValueError(
            f'{name} is an iterator, which the first evaluation would use up; pass a list of '
            'batches (or another re-iterable)'
        )
    if next(iter(batches), None) is None:
        raise ValueError(f'{name} is empty; pass at least one batch, or leave {name}=None')


def _place(batch: Batch, mesh: jax.sharding.Mesh) -> Batch:
    """The host batch split over the mesh's data axis."""
    sharding = parallel.batch_sharding(mesh)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), batch
    )


def _persistence(workdir, every, settings, task, fingerprint, steps_per_epoch, custom_optimizer):
    identity = {
        'settings': {
            **settings.to_dict(),
            'steps_per_epoch': steps_per_epoch,
            'optimizer': 'custom optax transformation' if custom_optimizer else settings.optimizer,
        },
        'counts': engine.plan(task, settings).counts,
        'weights_fingerprint': fingerprint,
    }

    def check(saved: dict[str, Any], after_nan_stop: bool) -> None:
        if saved.get('weights_fingerprint') != fingerprint:
            raise ValueError(
                f'the checkpoints in {workdir} were written by a search over other weights '
                f"(fingerprint {str(saved.get('weights_fingerprint'))[:12]} != {fingerprint[:12]}); "
                'pass the variables that search started from, or use a new workdir'
            )
        relaxed = {'learning_rate'} if after_nan_stop else set()
        diffs = [
            d for d in engine.resume_differences(saved.get('settings', {}), identity['settings'])
            if d.split(':')[0] not in relaxed
        ]
        if diffs or saved.get('counts') != identity['counts']:
            raise ValueError(
                f'the checkpoints in {workdir} come from a search with other settings:\n  '
                + '\n  '.join(diffs or ['per-layer pruned counts differ'])
                + '\nrestore those settings to resume, or use a new workdir'
            )

    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f'checkpoint_every must be an integer >= 0 (0: each epoch), got {every!r}')
    return engine.Persistence(
        directory=workdir, identity=identity, check_resumable=check, every_steps=every
    )


def _output_layer_note(paths: tuple[str, ...], plan: Any) -> str:
    if not paths:
        return ''
    return (
        f'left dense as the output layer (its output is the model\'s output): {", ".join(paths)}; '
        'dense_output_layer=False prunes it'
    )


class _BatchChecker:
    """Checks the batches a search is given, before they reach the model: the first one
    against the model (shapes, train-mode statistics), every one for empty batches and,
    with the default loss, labels that are integers in ``[0, classes)``."""

    def __init__(self, forward, params, statistics, loss_fn, inputs_fn, settings):
        self.forward, self.params, self.statistics = forward, params, statistics
        self.loss_fn, self.inputs_fn, self.settings = loss_fn, inputs_fn, settings
        self.classes: int | None = None
        self.inputs = None

    def check_first(self, batch: Batch, name: str) -> None:
        if batch is None:
            raise ValueError(f'{name} is empty; pass at least one batch per epoch')
        self._check_structure(batch, f'the first batch of {name}')
        inputs = self.inputs_fn(batch)
        try:
            outputs = jax.eval_shape(
                lambda p, s, x: self.forward(p, s, x, train=False)[0],
                self.params, self.statistics, inputs,
            )
        except Exception as e:  # flax and jax raise many types for a misfit input
            shapes = jax.tree.map(lambda a: tuple(np.shape(a)), inputs)
            if type(e).__name__ == 'ModifyScopeVariableError':
                raise ValueError(
                    'the model updates its statistics in eval mode (a BatchNorm with '
                    'use_running_average=False fixed in setup?); make its BatchNorm follow the '
                    'train flag, or pass eval_kwargs= that switch it to running averages'
                ) from e
            raise ValueError(
                f'the first batch of {name} does not fit the model: inputs of shape {shapes} '
                f'gave {type(e).__name__}: {e}. Check the batch layout (inputs first, or '
                "inputs_fn=) and the input shape the model was initialised with"
            ) from None
        self.inputs = inputs
        if self.loss_fn is None:
            self.classes = int(jax.tree.leaves(outputs)[0].shape[-1])
            self.check(batch, f'the first batch of {name}')
        self._check_statistics_update(inputs)

    def check(self, batch: Batch, where: str) -> None:
        self._check_structure(batch, where)
        if self.loss_fn is not None:
            return
        labels = np.asarray(search.batch_labels(batch))
        inputs = jax.tree.leaves(self.inputs_fn(batch))[0]
        if labels.shape[:1] != np.shape(inputs)[:1]:
            raise ValueError(
                f'{where}: {len(labels)} labels for {np.shape(inputs)[0]} inputs; each '
                'example needs one label'
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f'{where}: labels must be integer class indices, got dtype {labels.dtype}; '
                'convert them (e.g. labels.astype(np.int32)), or pass a loss_fn for other targets'
            )
        bad = labels[(labels < 0) | (labels >= self.classes)]
        if bad.size:
            raise ValueError(
                f'{where}: label {int(bad[0])} is outside [0, {self.classes}) (the model has '
                f'{self.classes} outputs); check the labels or the model\'s number of classes'
            )

    def _check_structure(self, batch: Batch, where: str) -> None:
        if not isinstance(batch, (tuple, list, Mapping)):
            raise ValueError(
                f'{where} is a {type(batch).__name__}; a batch is a tuple (inputs, labels) or '
                'a dict'
            )
        sizes = {np.shape(a)[0] if np.ndim(a) else None for a in jax.tree.leaves(batch)}
        if 0 in sizes:
            raise ValueError(f'{where} holds no examples (an array of length 0); drop it')

    def _check_statistics_update(self, inputs) -> None:
        """Refuses a model whose statistics a train-mode pass leaves as they are, when the
        search would rely on them changing (BatchNorm training or re-estimation)."""
        s = self.settings
        floats = [x for x in jax.tree.leaves(self.statistics) if jnp.issubdtype(x.dtype, jnp.floating)]
        if not floats or (s.bn_mode != 'train' and not s.bn_recalibration_steps):
            return
        updated = engine._train_statistics(  # pylint: disable=protected-access
            self.forward, self.params, self.statistics, inputs, jax.random.key(0)
        )
        after = [x for x in jax.tree.leaves(updated) if jnp.issubdtype(x.dtype, jnp.floating)]
        if all(bool(jnp.array_equal(a, b)) for a, b in zip(floats, after)):
            raise ValueError(
                "the model's statistics did not change in a train-mode pass (a BatchNorm with "
                'use_running_average=True fixed in setup, or a train flag the model ignores?), '
                "so the search's BatchNorm training and re-estimation would do nothing; make its "
                "BatchNorm follow the train flag (train_kwargs=), or pass bn_mode='frozen' and "
                'bn_recalibration_steps=0 to keep the statistics as they are'
            )

    def output_kernels(self) -> tuple[str, ...]:
        """The prunable kernels whose output is the model's output (left dense)."""
        return engine.output_kernels(
            self.forward, self.params, self.statistics, self.inputs, self.settings.prune_include
        )
