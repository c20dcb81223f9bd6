"""Masks from other pruning criteria at the SAME per-layer counts as a jackpot.

Every criterion gives one float per prunable weight, a *keep score* (higher =
more worth keeping); layer l then prunes exactly its k_l lowest keep scores, ties
broken by the lower flat index (``sparsity.masks_from_scores``: one search over
all layers, as for magnitude masks). So each criterion's masks keep
exactly ``n_l - k_l`` weights per layer and differ from the jackpot only in WHICH
weights they keep. All criteria score the dense frozen params (no mask applied).

  * ``magnitude``: |w| (equals ``sparsity.magnitude_masks``).
  * ``random``: uniform noise from ``rng`` (equals ``sparsity.random_masks``).
  * ``snip`` (Lee et al. 2019): |g * w|, g = dL/dw of the cross-entropy on one batch,
    BatchNorm in training mode (batch statistics).
  * ``grasp`` (Wang et al. 2020): the GraSP score is S = -w * (H g), with H g a
    Hessian-gradient product on one batch (BatchNorm in training mode). GraSP
    REMOVES the weights with the highest S (their removal reduces the gradient
    norm least), as the paper and its official code do; the keep score is
    therefore w * (H g). ``temperature`` divides the logits (GraSP's code uses 200;
    the default 1 is the plain loss).
  * ``synflow`` (Tanaka et al. 2020): data-free. Every param and BatchNorm
    statistic is replaced by its absolute value, BatchNorm runs in eval mode on
    those running statistics, an all-ones input (batch 1) goes forward and
    R = sum(logits); the score is |dR/dw * w|. Single shot at the given counts,
    NOT SynFlow's iterative 100-round schedule.
  * ``wanda`` (Sun et al. 2024): |w| times the norm of the layer's input feature,
    ranked within each output row (:mod:`jackpot_jax.baselines.wanda`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jackpot_jax.baselines import wanda
from jackpot_jax.core import parallel, sparsity, step, trees

Array = jax.Array
FlatTree = dict[str, Array]
Batch = tuple[Array, Array]


# ----------------------------------------------------------------------------
# Shared pieces.
# ----------------------------------------------------------------------------
def _train_mode_loss(
    model: nn.Module, params: Mapping, statistics: Mapping, batch: Batch, temperature: float = 1.0
) -> Callable[[FlatTree], Array]:
    """Kernels -> cross-entropy on ``batch`` with BatchNorm in training mode."""
    images, labels = batch

    def loss(kernels):
        variables = {'params': trees.with_kernels(params, kernels), 'batch_stats': statistics}
        logits, _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
        return step.cross_entropy(logits / temperature, labels)

    return loss


def _need_batch(name: str, batch: Batch | None) -> Batch:
    if batch is None:
        raise ValueError(f'criterion {name!r} needs a data batch (images, labels); pass batch=')
    return batch


# ----------------------------------------------------------------------------
# Keep scores (higher = keep), flat dicts keyed by kernel path.
# ----------------------------------------------------------------------------
def magnitude_scores(
    model: nn.Module,
    params: Mapping,
    statistics: Mapping,
    paths: Sequence[str],
    batch: Batch | None = None,
    rng: Array | None = None,
    **_: Any,
) -> FlatTree:
    """|w|."""
    return {p: jnp.abs(w) for p, w in trees.kernels_at(params, paths).items()}


def random_scores(
    model: nn.Module,
    params: Mapping,
    statistics: Mapping,
    paths: Sequence[str],
    batch: Batch | None = None,
    rng: Array | None = None,
    **_: Any,
) -> FlatTree:
    """Uniform noise; the same draws as ``sparsity.random_masks(rng, ...)``."""
    if rng is None:
        raise ValueError("criterion 'random' needs rng=jax.random.key(...)")
    kernels = trees.kernels_at(params, paths)
    rngs = jax.random.split(rng, len(kernels))
    return {
        p: jax.random.uniform(r, (w.size,)).reshape(w.shape)
        for r, (p, w) in zip(rngs, sorted(kernels.items()))
    }


def snip_scores(
    model: nn.Module,
    params: Mapping,
    statistics: Mapping,
    paths: Sequence[str],
    batch: Batch | None = None,
    rng: Array | None = None,
    **_: Any,
) -> FlatTree:
    """SNIP connection sensitivity |dL/dw * w| on one batch (BatchNorm in training mode)."""
    kernels = trees.kernels_at(params, paths)
    loss = _train_mode_loss(model, params, statistics, _need_batch('snip', batch))
    grads = jax.grad(loss)(kernels)
    return {p: jnp.abs(grads[p] * w) for p, w in kernels.items()}


def gradient_flow_keep_scores(
    loss: Callable[[FlatTree], Array], kernels: Mapping[str, Array]
) -> FlatTree:
    """GraSP's keep score ``w * (H g)`` for any scalar loss of the kernels.

    g = dL/dw and H g is a forward-over-reverse Hessian-vector product at v = g
    (held constant). GraSP's own score is S = -w * (H g), and GraSP prunes the
    highest S, i.e. the lowest keep score returned here.
    """
    kernels = dict(kernels)
    grad_fn = jax.grad(loss)
    g = jax.lax.stop_gradient(grad_fn(kernels))
    _, hg = jax.jvp(grad_fn, (kernels,), (g,))
    return {p: w * hg[p] for p, w in kernels.items()}


def grasp_scores(
    model: nn.Module,
    params: Mapping,
    statistics: Mapping,
    paths: Sequence[str],
    batch: Batch | None = None,
    rng: Array | None = None,
    temperature: float = 1.0,
    **_: Any,
) -> FlatTree:
    """GraSP keep score w * (H g) of the cross-entropy on one batch (BatchNorm in training mode)."""
    kernels = trees.kernels_at(params, paths)
    loss = _train_mode_loss(model, params, statistics, _need_batch('grasp', batch), temperature)
    return gradient_flow_keep_scores(loss, kernels)


def synflow_scores(
    model: nn.Module,
    params: Mapping,
    statistics: Mapping,
    paths: Sequence[str],
    batch: Batch | None = None,
    rng: Array | None = None,
    input_shape: Sequence[int] | None = None,
    **_: Any,
) -> FlatTree:
    """SynFlow |dR/dw * w| of the linearised (absolute-valued) network; data-free.

    The input shape (without batch) comes from ``input_shape`` or, if only a
    batch is given, from its images; their values are never used.
    """
    if input_shape is None:
        if batch is None:
            raise ValueError("criterion 'synflow' needs input_shape= (or a batch for its shape)")
        input_shape = batch[0].shape[1:]
    abs_params = jax.tree.map(jnp.abs, params)
    abs_stats = jax.tree.map(jnp.abs, statistics)
    kernels = trees.kernels_at(abs_params, paths)
    ones = jnp.ones((1, *input_shape), jnp.float32)

    def flow(k):
        variables = {'params': trees.with_kernels(abs_params, k), 'batch_stats': abs_stats}
        return jnp.sum(model.apply(variables, ones, train=False))

    grads = jax.grad(flow)(kernels)
    return {p: jnp.abs(grads[p] * w) for p, w in kernels.items()}


def _default_paths(params: Mapping) -> tuple[str, ...]:
    return sparsity.prunable_paths(params)


@dataclasses.dataclass(frozen=True)
class Criterion:
    """A pruning criterion: its keep-score function and what it needs.

    ``scores(model, params, statistics, paths, batch, rng, **options)`` returns
    keep scores (higher = keep) for the kernels at ``paths``; it is traceable.
    """

    scores: Callable[..., FlatTree]
    needs_batch: bool
    needs_rng: bool
    description: str
    # True: weights compete within each output row (Wanda), else within the layer.
    per_row: bool = False


CRITERIA: dict[str, Criterion] = {
    'magnitude': Criterion(magnitude_scores, False, False, '|w|'),
    'random': Criterion(random_scores, False, True, 'uniform random'),
    'snip': Criterion(snip_scores, True, False, 'SNIP |g w|, one batch, BN train mode'),
    'grasp': Criterion(
        grasp_scores, True, False, 'GraSP: prune the highest -w Hg, one batch, BN train mode'
    ),
    'synflow': Criterion(
        synflow_scores, False, False, 'SynFlow |dR/dw w|, data-free, single shot, BN eval mode'
    ),
    'wanda': Criterion(
        wanda.wanda_scores, True, False, 'Wanda |w| ||x||, one batch, eval mode, per output row', True
    ),
}


# ----------------------------------------------------------------------------
# Masks at fixed per-layer counts.
# ----------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('name', 'model', 'paths', 'options'))
def _scores(name, model, params, statistics, batch, rng, *, paths, options):
    scores = CRITERIA[name].scores(model, params, statistics, paths, batch, rng, **dict(options))
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(s)) for s in scores.values()]))
    return scores, finite


@functools.partial(jax.jit, static_argnames='counts')
def _masks(scores, *, counts):
    """Per layer, prune exactly the k_l lowest keep scores (ties: lower flat index pruned)."""
    return sparsity.masks_from_scores(scores, dict(counts))


def criterion_scores(
    name: str,
    model: nn.Module,
    params: Mapping,
    statistics: Mapping,
    paths: Sequence[str],
    batch: Batch | None = None,
    rng: Array | None = None,
    **options: Any,
) -> FlatTree:
    """Keep scores (higher = keep) of criterion ``name`` for the kernels at ``paths``.

    ``batch`` (images, labels) is needed by 'snip', 'grasp' and 'wanda'; ``rng`` by 'random'.
    ``options``: ``input_shape`` for 'synflow' without a batch, ``temperature`` for 'grasp'.
    Raises FloatingPointError if any score is not finite.
    """
    if name not in CRITERIA:
        raise ValueError(f'unknown criterion {name!r}; choose one of {tuple(CRITERIA)}')
    criterion = CRITERIA[name]
    if criterion.needs_batch:
        _need_batch(name, batch)
    if criterion.needs_rng and rng is None:
        raise ValueError(f'criterion {name!r} needs rng=jax.random.key(...)')
    if name == 'synflow' and batch is not None:
        options.setdefault('input_shape', tuple(batch[0].shape[1:]))
    if 'input_shape' in options:
        options['input_shape'] = tuple(int(d) for d in options['input_shape'])
    scores, finite = _scores(
        name,
        model,
        params,
        statistics,
        batch if criterion.needs_batch else None,  # synflow is data-free: shape only
        rng if criterion.needs_rng else None,
        paths=tuple(sorted(paths)),
        options=tuple(sorted(options.items())),
    )
    if not bool(parallel.to_host(finite)):
        raise FloatingPointError(
            f'criterion {name!r} produced non-finite scores (overflow in float32); '
            'its masks would be arbitrary'
        )
    return scores


def criterion_masks(
    name: str,
    model: nn.Module,
    params: Mapping,
    statistics: Mapping,
    counts: Mapping[str, int],
    batch: Batch | None = None,
    rng: Array | None = None,
    **options: Any,
) -> FlatTree:
    """Masks (True = kept) of criterion ``name`` keeping exactly n_l - k_l weights per layer.

    ``counts`` maps each prunable kernel path to its pruned count k_l; the other
    arguments are those of :func:`criterion_scores`. A per-row criterion ('wanda')
    spreads k_l over the layer's output rows (:func:`jackpot_jax.baselines.wanda.row_masks`).
    """
    scores = criterion_scores(name, model, params, statistics, tuple(counts), batch, rng, **options)
    if CRITERIA[name].per_row:
        return wanda.row_masks(scores, counts)
    return _masks(scores, counts=tuple(sorted((p, int(k)) for p, k in counts.items())))
