"""The library entry point: a jackpot search over any Flax model in one call.

:func:`find_jackpot` takes a Linen module (with its variables), an NNX module, or a
forward function (see :mod:`jackpot_jax.core.adapters`), an iterable of batches, and the
search's settings, and returns a :class:`Jackpot`: masks, scores, the masked params, the
model's statistics after the search and a report. It drives the same engine as the
launcher (:mod:`jackpot_jax.engine.loop`): with ``workdir=`` it checkpoints, resumes, writes
metrics and saves the jackpot; with ``num_devices=`` or ``mesh=`` it runs data-parallel
(``fsdp=`` splits the search state over the devices too);
with ``loss_fn=`` it searches any task. :func:`load_jackpot` reads a saved jackpot back.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from jackpot_jax.core import adapters, parallel, sparsity as sparsity_lib, step, trees
from jackpot_jax.core.settings import SearchSettings
from jackpot_jax.engine import (
    batch_checks,
    evaluation,
    fingerprints,
    loop,
    persistence as persistence_lib,
)
from jackpot_jax.engine.evaluation import evaluate
from jackpot_jax.io import checkpoint, workdir as workdir_lib

Batch = Any
Batches = Iterable[Batch] | Callable[[int], Iterable[Batch]]


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
    flip-backs per epoch, and the metrics of each evaluated split), the chosen epoch and how
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
    loss_fn: step.LossFn | None = None
    inputs_fn: Callable[[Batch], Any] = step.batch_inputs
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
        return evaluation.eval_outputs(self.forward, self.params, self.statistics, inputs)

    def evaluate(self, batches: Iterable[Batch], metric: str = 'top1') -> float:
        """One metric of the jackpot in eval mode over the batches (default: top-1)."""
        return evaluate(
            self.forward,
            self.params,
            self.statistics,
            batches,
            metric=metric,
            loss_fn=self.loss_fn,
            inputs_fn=self.inputs_fn,
        )

    def summary(self) -> str:
        """The per-layer sparsity table, one line per epoch, and the chosen epoch."""
        lines = [sparsity_lib.format_sparsity_report(self.report['sparsity'])]
        if self.report.get('output_layer'):
            lines.append(self.report['output_layer'])
        for r in self.report.get('epochs', []):
            named = ', '.join(
                f'{k} {v:.4f}'
                for k, v in r.items()
                if isinstance(v, float) and k not in ('train_loss', 'learning_rate', 'swap_rate')
            )
            lines.append(
                f"epoch {r['epoch']}: training loss {r['train_loss']:.4f}, {named}, mask changes "
                f"{r['mask_changes']}"
            )
        if 'chosen_epoch' in self.report:
            lines.append(f"chosen epoch: {self.report['choice']}")
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
    loss_fn: step.LossFn | None = None,
    inputs_fn: Callable[[Batch], Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
) -> Jackpot:
    """The jackpot saved at ``path`` (by :meth:`Jackpot.save` or a ``workdir``) over the
    frozen weights of ``model`` / ``variables``, which must be the ones it was found in."""
    forward, params, statistics, split = adapters.as_forward(
        model, variables, train_kwargs=train_kwargs, eval_kwargs=eval_kwargs
    )
    scores, masks, saved_statistics, meta = checkpoint.read_jackpot_bundle(path)
    fingerprint = checkpoint.weights_fingerprint(params)
    if meta.get('weights_fingerprint') not in (None, '', fingerprint):
        raise ValueError(
            f'the jackpot at {path} was found in other weights (fingerprint '
            f"{meta['weights_fingerprint'][:12]} != {fingerprint[:12]} of the params given); "
            'pass the pre-trained variables it was searched in'
        )
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
        inputs_fn=inputs_fn or step.batch_inputs,
        weights_fingerprint=fingerprint,
    )


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
    loss_fn: step.LossFn | None = None,
    inputs_fn: Callable[[Batch], Any] | None = None,
    workdir: str | None = None,
    checkpoint_every: int = 0,
    num_devices: int = 1,
    fsdp: int = 1,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    rng: jax.Array | int = 0,
    train_kwargs: Mapping[str, Any] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
    initial_masks: Mapping[str, Any] | None = None,
    initial_scores: Mapping[str, Any] | None = None,
    settings: SearchSettings | None = None,
    overwrite: bool = False,
    same_search: bool = False,
    **options: Any,
) -> Jackpot:
    """Searches a jackpot: masks over the frozen params of ``model``, no weight trained.

    ``batches``: an iterable walked once per epoch (an ``epoch -> iterable`` callable gets
    the epoch), ``steps_per_epoch`` of them per epoch (default: ``len(batches)``); each a
    tuple ``(inputs, labels)`` or a dict (``inputs``/``image`` and ``label``/``labels``).
    ``options`` are the fields of :class:`~jackpot_jax.core.settings.SearchSettings`
    (``sparsity=0.9, epochs=10, learning_rate=0.1, optimizer='sgd', protocol='stable'``, ...;
    or pass ``settings=``); ``optimizer`` may also be any optax transformation of the scores.

    ``validation_batches`` (held-out *training* examples, never the test set) are what the
    epoch is chosen on (``selection_metric``, default top-1); ``eval_batches`` are
    only reported on. ``loss_fn(outputs, batch) -> (loss, {name: value})`` searches any
    task (default: softmax cross-entropy on integer labels, with top-1), ``inputs_fn(batch)``
    gives the model's input. ``workdir``: checkpoints (every ``checkpoint_every`` steps and
    each epoch), exact resume when called again, ``metrics.jsonl``, TensorBoard scalars, and
    the jackpot in ``workdir/jackpot``. ``num_devices`` (0 = all) or ``mesh``: the devices
    (the batch is split over all of them, so its size must divide over them); ``fsdp``: how
    many of them share one copy of the search state (frozen weights, scores, masks,
    optimizer state), each holding a 1/fsdp slice of every large array, for models too big
    to copy onto every device (1: a full copy each; see :mod:`jackpot_jax.core.parallel`; a
    ``mesh`` given is used as it is, its ``fsdp`` axis if any). ``rng`` (a key or a seed)
    feeds drawn score inits and dropout. ``train_kwargs`` / ``eval_kwargs``: the model's
    train/eval-mode keywords (default: read from its signature). ``initial_masks`` (flat
    ``{path: bool array}`` at the plan's per-layer counts, e.g. another criterion's masks)
    start the search instead of the magnitude masks, scored 1.0 where kept and
    ``pruned_score`` where pruned; ``initial_scores`` (float arrays) replace those scores,
    e.g. :func:`~jackpot_jax.core.sparsity.ranked_scores` keeping the masks' criterion's
    order, and alone start from the masks the update rule picks from them.

    A resume (or a finished ``workdir`` called again) goes on only when everything that
    decides the result matches the search that wrote the checkpoints: the settings, the
    weights, the first masks, ``loss_fn``, the model, the optimizer (an optax
    transformation by its hyper-parameters) and the first batches; ``same_search=True``
    vouches for what cannot be fingerprinted (an object of no known form). A jackpot in
    ``workdir/jackpot`` that this search did not find is replaced only with
    ``overwrite=True``.
    """
    settings, custom_optimizer = _settings(
        settings, options, validation_batches is not None,
        initial_masks is not None or initial_scores is not None,
    )  # fmt: skip
    forward, params, statistics, split = adapters.as_forward(
        model, variables, train_kwargs=train_kwargs, eval_kwargs=eval_kwargs
    )
    inputs_fn = inputs_fn or step.batch_inputs
    mesh = mesh or parallel.make_mesh(num_devices or None, fsdp)
    steps_per_epoch = batch_checks.steps_per_epoch(batches, steps_per_epoch)
    held_out = {'validation': validation_batches, 'eval': eval_batches}
    for name, given in held_out.items():
        batch_checks.check_reiterable(f'{name}_batches', given)
    checker = batch_checks.BatchChecker(forward, params, statistics, loss_fn, inputs_fn, settings)
    first, batches = batch_checks.peek(batches, FINGERPRINTED_BATCHES)
    checker.check_first(first[0] if first else None, 'batches')
    placed = parallel.shard_state((params, statistics), mesh)  # split over 'fsdp' if > 1
    task = loop.SearchTask(
        forward=forward,
        params=placed[0],
        statistics=placed[1],
        mesh=mesh,
        train_epoch=functools.partial(_train_epoch, batches, steps_per_epoch, checker, mesh),
        steps_per_epoch=steps_per_epoch,
        split_metrics=lambda masked, stats, name: evaluation.evaluate_metrics(
            forward, masked, stats, held_out[name], loss_fn=loss_fn, inputs_fn=inputs_fn
        ),
        splits=tuple(name for name, given in held_out.items() if given is not None),
        rng=jax.random.key(rng) if isinstance(rng, int) else rng,
        loss_fn=loss_fn,
        optimizer=custom_optimizer,
        inputs_fn=inputs_fn,
        progress=progress,
    )
    output_paths = checker.output_kernels() if settings.dense_output_layer else ()
    planned = loop.plan(task.params, settings, output_paths)
    # Checked (and copied) before any work.
    task.set_start(planned, params, initial_masks, initial_scores, settings.mask_update)
    fingerprint = checkpoint.weights_fingerprint(params)
    outcome = _run(
        task, settings, planned, workdir, checkpoint_every, fingerprint, overwrite=overwrite,
        decisive=fingerprints.resume_fingerprints(loss_fn, model, first, custom_optimizer),
        same_search=same_search,
    )  # fmt: skip
    jackpot = Jackpot(
        masks=outcome.chosen_masks,
        scores=outcome.chosen_scores,
        counts=outcome.plan.counts,
        params=sparsity_lib.masked_params(params, outcome.chosen_masks),
        statistics=outcome.chosen_statistics,
        report=_report(outcome, settings, params, output_paths),
        forward=forward,
        nnx_split=split,
        loss_fn=loss_fn,
        inputs_fn=inputs_fn,
        weights_fingerprint=fingerprint,
    )
    if workdir is not None:  # every process takes part in the (orbax) write
        path = workdir_lib.jackpot_path(workdir)
        persistence_lib.check_replaceable(path, jackpot.masks, overwrite)
        jackpot.save(path, overwrite=True)
    return jackpot


# The batches of epoch 0 whose fingerprint a resume must match.
FINGERPRINTED_BATCHES = 2


def _train_epoch(
    batches: Batches, steps_per_epoch: int, checker: Any, mesh: Any, epoch: int, first: int
) -> Iterator[Batch]:
    """The epoch's batches from step ``first`` on, checked and split over the mesh."""
    stream = itertools.islice(evaluation.batches_of_epoch(batches, epoch), first, steps_per_epoch)
    count = first
    for count, batch in enumerate(stream, first + 1):
        checker.check(batch, f'batch {count - 1} of epoch {epoch}')
        yield parallel.place_batch(batch, mesh)
    if count < steps_per_epoch:
        raise ValueError(
            f'epoch {epoch + 1} got {count} batches, fewer than steps_per_epoch='
            f'{steps_per_epoch}; pass a re-iterable (a list) or a callable epoch -> batches, '
            'or lower steps_per_epoch'
        )


def _run(
    task, settings, planned, workdir, every, fingerprint, *, decisive, overwrite, same_search
) -> loop.SearchOutcome:
    """The search, in the workdir (locked while it runs) if one is given. ``decisive``:
    the fingerprints a resume must match besides the settings."""
    if workdir is None:
        return loop.run(task, settings, planned)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f'checkpoint_every must be an integer >= 0 (0: each epoch), got {every!r}')
    resuming = workdir_lib.has_search_checkpoints(workdir)
    if not resuming:  # a jackpot already there is not this search's: refused before any work
        persistence_lib.check_replaceable(workdir_lib.jackpot_path(workdir), None, overwrite)
    opaque = [f'{k} {v}' for k, v in decisive.items() if v.endswith('(not fingerprintable)')]
    if resuming and opaque and not same_search:
        raise ValueError(
            f'{workdir} holds the checkpoints of a search, and {", ".join(opaque)} cannot be '
            'fingerprinted (it holds an object of no known form), so this search cannot be '
            'checked to be the same one; pass same_search=True if it is, or use a new workdir'
        )

    # What a resume must match: the settings, the per-layer counts, the weights and the
    # first masks.
    identity = persistence_lib.search_identity(
        {
            **settings.to_dict(),
            'steps_per_epoch': task.steps_per_epoch,
            'optimizer': settings.optimizer,
            **decisive,
        },
        planned.counts,
        fingerprint,
        persistence_lib.start_fingerprint(task.initial_masks, task.initial_scores),
    )
    persistence = persistence_lib.Persistence(workdir, identity, every_steps=every)
    workdir_lib.prepare(workdir)
    workdir_lib.lock(workdir)
    try:
        return loop.run(task, settings, planned, persistence)
    finally:
        workdir_lib.unlock(workdir)


def _report(outcome, settings, params, output_paths) -> dict[str, Any]:
    return dict(
        sparsity=outcome.plan.report(params, outcome.chosen_masks),
        epochs=[dict(r) for r in outcome.history],
        chosen_epoch=outcome.chosen['epoch'],
        selection_rule=settings.selection_rule,
        choice=outcome.choice,
        output_layer=_output_layer_note(output_paths),
        search_seconds=outcome.search_seconds,
    )


def _settings(
    settings: SearchSettings | None,
    options: dict[str, Any],
    has_validation: bool,
    has_initial_masks: bool,
) -> tuple[SearchSettings, Any]:
    """``settings`` with ``options`` applied, resolved; and a custom optax optimizer given
    as ``optimizer`` (None for a name). Unknown option names are refused, and a drawn
    ``score_init`` beside initial masks, which set the first scores."""
    custom = options.pop('optimizer', None)
    if custom is not None and not isinstance(custom, str):
        ignored = [k for k in ('learning_rate', 'weight_decay', 'momentum') if k in options]
        if ignored:
            raise ValueError(
                f'{ignored[0]}={options[ignored[0]]!r} is an option of the named optimizers '
                "('sgd', 'adam', 'adamw'), but optimizer is an optax transformation, which "
                f'has its own (e.g. optax.adam(learning_rate)); set it there and drop '
                f'{ignored[0]}'
            )
        options['optimizer'] = 'sgd'  # replaced by the transformation given
    elif custom is not None:
        options['optimizer'], custom = custom, None
    names = [f.name for f in dataclasses.fields(SearchSettings)]
    unknown = [k for k in options if k not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f' (did you mean {close[0]!r}?)' if close else ''
        raise TypeError(
            f'find_jackpot got an unknown option {unknown[0]!r}{hint}; the options are the '
            f'fields of SearchSettings: {", ".join(names)}'
        )
    resolved = dataclasses.replace(settings or SearchSettings(), **options).resolved(has_validation)
    if has_initial_masks and resolved.score_init != 'magnitude':
        raise ValueError(
            f'score_init={resolved.score_init!r} draws the first scores, but initial_masks '
            'or initial_scores set them; drop score_init, or those'
        )
    return resolved, custom


def _output_layer_note(paths: tuple[str, ...]) -> str:
    if not paths:
        return ''
    return (
        f'left dense as the output layer (its output is the model\'s output): {", ".join(paths)}; '
        'dense_output_layer=False prunes it'
    )
