"""Checks of the batches a library search is given, before any step: their count, their
structure, and the first one against the model (shapes, labels, train-mode statistics).

One traced call (:func:`jax.eval_shape`: shapes only, no step) of the model and of the loss
on the first batch checks what a custom ``loss_fn`` returns, and so which metrics the
search measures: every metric the selection uses is known before step 1.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jackpot_jax.core import step
from jackpot_jax.engine import evaluation
from jackpot_jax.models import output_layer

Batch = Any
# What the evaluation reports with the default loss (softmax cross-entropy on labels).
DEFAULT_METRICS = ('loss', 'perplexity', 'top1', 'top5')


def steps_per_epoch(batches: Any, steps_per_epoch: int | None) -> int:
    """The steps of an epoch: ``steps_per_epoch``, or ``len(batches)``, checked."""
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


def peek(batches: Any, count: int) -> tuple[list[Batch], Any]:
    """The first ``count`` batches of epoch 0 (for the checks and the resume's fingerprint),
    and batches that still give them: a one-shot iterator (a generator) is chained back
    behind what was taken from it, so every batch the caller passed is trained on."""
    if callable(batches) or iter(batches) is not batches:
        return list(itertools.islice(evaluation.batches_of_epoch(batches, 0), count)), batches
    first = list(itertools.islice(batches, count))
    return first, itertools.chain(first, batches)


def check_selection_metric(settings: Any, metrics: tuple[str, ...], prefix: str = '') -> None:
    """The metric the epoch is chosen by is one of ``metrics`` (what each split's evaluation
    gives), or ValueError naming them, before step 1 (``prefix``: 'search.' in the
    launcher)."""
    s = settings
    if s.selection_rule in (None, 'last') or s.selection_metric in metrics:
        return
    raise ValueError(
        f'{prefix}selection_metric {s.selection_metric!r} is not a metric of this search: each '
        f'split is evaluated as {", ".join(map(repr, metrics))}; choose one of them (a '
        f"loss_fn adds its own metrics by name), or {prefix}selection_rule='last'"
    )


def check_reiterable(name: str, batches: Any) -> None:
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


class BatchChecker:
    """Checks the batches a search is given, before they reach the model: the first one
    against the model (shapes, train-mode statistics), every one for empty batches and,
    with the default loss, labels that are integers in ``[0, classes)``."""

    def __init__(self, forward, params, statistics, loss_fn, inputs_fn, settings):
        self.forward, self.params, self.statistics = forward, params, statistics
        self.loss_fn, self.inputs_fn, self.settings = loss_fn, inputs_fn, settings
        self.classes: int | None = None
        self.output_shape: tuple[int, ...] | None = None
        self.inputs = None
        self.metrics: tuple[str, ...] = DEFAULT_METRICS  # what each split's evaluation gives

    def check_first(self, batch: Batch, name: str) -> None:
        if batch is None:
            raise ValueError(f'{name} is empty; pass at least one batch per epoch')
        self._check_structure(batch, f'the first batch of {name}')
        inputs = self.inputs_fn(batch)
        try:
            outputs = jax.eval_shape(
                lambda p, s, x: self.forward(p, s, x, train=False)[0],
                self.params,
                self.statistics,
                inputs,
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
            self.output_shape = tuple(jax.tree.leaves(outputs)[0].shape)
            self.classes = int(self.output_shape[-1])
            self.check(batch, f'the first batch of {name}')
        else:
            self._check_structure(batch, f'the first batch of {name}')
            self.metrics = tuple(sorted({'loss', *self._check_loss_fn(batch)}))
        self._check_selection_metric()
        self._check_statistics_update(inputs)

    def _check_loss_fn(self, batch: Batch) -> tuple[str, ...]:
        """Traces ``loss_fn`` on the first batch (shapes only): a scalar float loss and a dict
        of scalar metrics, or ValueError naming what it returned; its metric names."""

        def loss(params, statistics):
            outputs = self.forward(params, statistics, self.inputs_fn(batch), train=False)[0]
            return self.loss_fn(outputs, batch)

        try:
            returned = jax.eval_shape(loss, self.params, self.statistics)
        except Exception as e:  # the caller's code: any error, named as theirs
            raise ValueError(
                f'loss_fn failed on the first batch ({type(e).__name__}: {e}); it is called as '
                'loss_fn(outputs, batch) with the model\'s outputs and the batch as given'
            ) from None
        if not isinstance(returned, (tuple, list)) or len(returned) != 2:
            raise ValueError(
                f'loss_fn must return (loss, {{name: value}}), got {_described(returned)}; '
                'return (loss, {}) when there are no metrics'
            )
        value, named = returned
        if named is None:
            raise ValueError(
                'loss_fn returned None as its metrics; return an empty dict for none: (loss, {})'
            )
        if not isinstance(named, Mapping):
            raise ValueError(
                f'loss_fn must return its metrics as a dict {{name: scalar}}, got '
                f'{_described(named)}'
            )
        if not _is_scalar(value) or not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(
                f'loss_fn returned a loss of shape {_shape(value)} ({_described(value)}); the '
                'search minimises one scalar float: average it over the batch (e.g. '
                'losses.mean())'
            )
        for key, metric in named.items():
            if not isinstance(key, str):
                raise ValueError(f"loss_fn's metric names must be strings, got {key!r}")
            if not _is_scalar(metric):
                raise ValueError(
                    f"loss_fn's metric {key!r} has shape {_shape(metric)}; metrics are "
                    'scalars (averaged over the steps of an epoch): average it over the batch '
                    '(e.g. jnp.mean(...))'
                )
        return tuple(named)

    def _check_selection_metric(self) -> None:
        check_selection_metric(self.settings, self.metrics)

    def check(self, batch: Batch, where: str) -> None:
        self._check_structure(batch, where)
        if self.loss_fn is not None:
            return
        labels = np.asarray(step.batch_labels(batch))
        inputs = jax.tree.leaves(self.inputs_fn(batch))[0]
        if labels.shape[:1] != np.shape(inputs)[:1]:
            raise ValueError(
                f'{where}: {len(labels)} labels for {np.shape(inputs)[0]} inputs; each '
                'example needs one label'
            )
        self._check_label_shape(labels, where)
        self._check_no_padding(batch, len(labels), where)
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

    def _check_label_shape(self, labels: np.ndarray, where: str) -> None:
        """The default loss takes one integer class index per output row."""
        if self.output_shape is None:
            return
        size = labels.shape[0]
        expected = (size, *self.output_shape[1:-1])
        if labels.shape == expected:
            return
        if labels.shape == (size, *self.output_shape[1:]):
            raise ValueError(
                f'{where}: labels of shape {labels.shape} look one-hot (one column per class); '
                'the default loss takes class indices: pass labels.argmax(-1), or a loss_fn '
                'for soft targets'
            )
        raise ValueError(
            f'{where}: labels of shape {labels.shape} for outputs of shape '
            f'{(size, *self.output_shape[1:])}; the default loss takes one integer class index '
            f'per output row, labels of shape {expected}: reshape them (e.g. '
            'labels.reshape(len(labels))), or pass a loss_fn'
        )

    def _check_no_padding(self, batch: Batch, size: int, where: str) -> None:
        """A batch whose 'valid' marks padding rows: the default loss would train on them."""
        if isinstance(batch, Mapping):
            valid, name = batch.get('valid'), "its 'valid'"
        else:
            valid, name = (batch[2] if len(batch) > 2 else None), "its third item ('valid')"
        if valid is None:
            return
        valid = np.asarray(valid)
        if valid.shape != (size,) or valid.dtype != bool:
            raise ValueError(
                f"{where}: {name} must be a bool array of shape ({size},) (True: a real "
                f'example), got {valid.dtype} of shape {valid.shape}'
            )
        if not valid.all():
            raise ValueError(
                f'{where}: {name} marks {int(size - valid.sum())} of {size} examples as padding, '
                "but the default loss trains on every example of a training batch; drop the "
                "padded rows from the training batches, or pass a loss_fn that weighs the "
                "examples by batch['valid']"
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
        floats = [
            x for x in jax.tree.leaves(self.statistics) if jnp.issubdtype(x.dtype, jnp.floating)
        ]
        if not floats or (s.bn_mode != 'train' and not s.reestimation_steps):
            return
        updated = evaluation.train_mode_statistics(
            self.forward, self.params, self.statistics, inputs, jax.random.key(0)
        )
        after = [x for x in jax.tree.leaves(updated) if jnp.issubdtype(x.dtype, jnp.floating)]
        if all(bool(jnp.array_equal(a, b)) for a, b in zip(floats, after)):
            raise ValueError(
                "the model's statistics did not change in a train-mode pass (a BatchNorm with "
                'use_running_average=True fixed in setup, or a train flag the model ignores?), '
                "so the search's BatchNorm training and re-estimation would do nothing; make its "
                "BatchNorm follow the train flag (train_kwargs=), or pass bn_mode='frozen' and "
                'reestimation_steps=0 to keep the statistics as they are'
            )

    def output_kernels(self) -> tuple[str, ...]:
        """The prunable kernels whose output is the model's output (left dense)."""
        return output_layer.output_kernels(
            self.forward, self.params, self.statistics, self.inputs, self.settings.prune_include
        )


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if hasattr(value, 'shape') else None


def _is_scalar(value: Any) -> bool:
    return _shape(value) == () and hasattr(value, 'dtype')


def _described(value: Any) -> str:
    """What a traced ``loss_fn`` returned, in words: 'a float32 array of shape (16,)'."""
    if hasattr(value, 'shape') and hasattr(value, 'dtype'):
        return f'a {value.dtype} array of shape {tuple(value.shape)}'
    return f'a {type(value).__name__}'
