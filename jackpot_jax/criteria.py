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
  * ``wanda`` (Sun et al. 2024): |w_ij| * ||X_j||_2, X_j the j-th input feature of the
    layer over every calibration position (all examples, all tokens or pixels), from
    the dense model in eval mode. Compared within each OUTPUT ROW: every output neuron
    keeps the same share of its inputs (:func:`row_masks`; a layer count that does not
    divide by the rows gives the first rows one weight more to prune). With an N:M
    pattern the groups of M consecutive inputs of each output are ranked instead
    (:func:`wanda_masks`). Unlike the others it needs no gradient: one forward per
    calibration batch (:func:`activation_norms`).

How the activation norms are gathered: a Flax method interceptor
(``nn.intercept_methods``) sees every ``nn.Dense`` and ``nn.Conv`` call of the forward
and adds up the squares of its input per input feature (the kernel's axis -2), keyed by
the module's scope path + '/kernel', which is the kernel's parameter path. No model
change and no ``sow`` calls are needed; a layer called twice adds both inputs. A conv's
"input feature" is its input channel, summed over every spatial position (a per-channel
approximation of the im2col view, exact for 1x1 convs).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jackpot_jax import parallel, search, sparsity, structured

Array = jax.Array
FlatTree = dict[str, Array]
Batch = tuple[Array, Array]


# ----------------------------------------------------------------------------
# Shared pieces.
# ----------------------------------------------------------------------------
def _with_kernels(params: Mapping, kernels: Mapping[str, Array]) -> dict:
    """``params`` with the named kernels replaced."""
    flat = sparsity.flatten(params)
    flat.update(kernels)
    return sparsity.unflatten(flat)


def _kernels(params: Mapping, paths: Sequence[str]) -> FlatTree:
    flat = sparsity.flatten(params)
    missing = [p for p in paths if p not in flat]
    if missing:
        raise ValueError(f'the params have no kernels {missing}; they have {sorted(flat)}')
    return {p: flat[p] for p in paths}


def _train_mode_loss(
    model: nn.Module, params: Mapping, statistics: Mapping, batch: Batch, temperature: float = 1.0
) -> Callable[[FlatTree], Array]:
    """Kernels -> cross-entropy on ``batch`` with BatchNorm in training mode."""
    images, labels = batch

    def loss(kernels):
        variables = {'params': _with_kernels(params, kernels), 'batch_stats': statistics}
        logits, _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
        return search.cross_entropy(logits / temperature, labels)

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
    return {p: jnp.abs(w) for p, w in _kernels(params, paths).items()}


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
    kernels = _kernels(params, paths)
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
    kernels = _kernels(params, paths)
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
    kernels = _kernels(params, paths)
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
    kernels = _kernels(abs_params, paths)
    ones = jnp.ones((1, *input_shape), jnp.float32)

    def flow(k):
        variables = {'params': _with_kernels(abs_params, k), 'batch_stats': abs_stats}
        return jnp.sum(model.apply(variables, ones, train=False))

    grads = jax.grad(flow)(kernels)
    return {p: jnp.abs(grads[p] * w) for p, w in kernels.items()}


# ----------------------------------------------------------------------------
# Wanda: |w| times the norm of the layer's input feature, ranked per output row.
# ----------------------------------------------------------------------------
def _scope_kernel_path(module: nn.Module) -> str:
    return '/'.join(module.scope.path) + '/kernel'


def input_square_sums(model: nn.Module, variables: Mapping, inputs: Array) -> FlatTree:
    """Per ``nn.Dense`` / ``nn.Conv`` kernel path, the sum over every position of one batch
    of the squared layer input, per input feature (shape ``[kernel.shape[-2]]``).

    The model runs in eval mode (``train=False``); traceable.
    """
    sums: dict[str, Array] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == '__call__' and isinstance(module, (nn.Dense, nn.Conv)):
            x = jnp.asarray(args[0]).astype(jnp.float32)
            path = _scope_kernel_path(module)
            sq = jnp.sum(jnp.square(x), axis=tuple(range(x.ndim - 1)))
            sums[path] = sums[path] + sq if path in sums else sq
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, inputs, train=False)
    return sums


@functools.partial(jax.jit, static_argnames=('model', 'paths'))
def _square_sums(model, params, statistics, inputs, *, paths):
    sums = input_square_sums(model, {'params': params, 'batch_stats': statistics}, inputs)
    missing = [p for p in paths if p not in sums]
    if missing:
        raise ValueError(
            f'wanda: no nn.Dense or nn.Conv call of the forward uses the kernels {missing}; '
            f'the layers seen are {sorted(sums)}: prune those, or score these another way'
        )
    return {p: sums[p] for p in paths}


def activation_norms(
    model: nn.Module,
    params: Mapping,
    statistics: Mapping,
    paths: Sequence[str],
    batches: Any,
) -> FlatTree:
    """||X_j||_2 of every input feature j of the kernels at ``paths`` (``[kernel.shape[-2]]``
    each), over all positions of all calibration ``batches`` (the dense model, eval mode).

    A batch is ``(inputs, labels, ...)`` or the inputs themselves; one jitted forward each.
    """
    paths = tuple(sorted(paths))
    totals = None
    for batch in batches:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        sums = _square_sums(model, params, statistics, inputs, paths=paths)
        totals = sums if totals is None else {p: totals[p] + sums[p] for p in paths}
    if totals is None:
        raise ValueError('wanda: no calibration batch; pass at least one batch of inputs')
    kernels = _kernels(params, paths)
    for p in paths:
        if totals[p].shape != kernels[p].shape[-2:-1]:
            raise ValueError(
                f'wanda: the input of {p} has {totals[p].shape[0]} features, but the kernel '
                f'{tuple(kernels[p].shape)} takes {kernels[p].shape[-2]} on axis -2 (a grouped '
                'conv?); leave this layer out of the prunable paths'
            )
    return {p: jnp.sqrt(t) for p, t in totals.items()}


def wanda_keep_scores(kernels: Mapping[str, Array], norms: Mapping[str, Array]) -> FlatTree:
    """|w| * ||X_j||: the input-feature norm broadcast along the kernel's axis -2."""
    return {p: jnp.abs(w) * norms[p][:, None] for p, w in kernels.items()}


def wanda_scores(
    model: nn.Module,
    params: Mapping,
    statistics: Mapping,
    paths: Sequence[str],
    batch: Batch | None = None,
    rng: Array | None = None,
    **_: Any,
) -> FlatTree:
    """Wanda's |w| ||X_j|| with the norms of one calibration batch (traceable)."""
    inputs = _need_batch('wanda', batch)[0]
    sums = input_square_sums(model, {'params': params, 'batch_stats': statistics}, inputs)
    kernels = _kernels(params, paths)
    return wanda_keep_scores(kernels, {p: jnp.sqrt(sums[p]) for p in kernels})


def _rows(x: Array) -> Array:
    """(..., I, O) -> (O, everything else): one row per output."""
    return jnp.reshape(x, (-1, x.shape[-1])).T


def row_counts(shapes: Mapping[str, Sequence[int]], sparsity_: float) -> dict[str, int]:
    """Per-layer pruned counts when every output row loses the same share: each row of
    r inputs keeps ``floor(r (1 - sparsity))`` (exact arithmetic), times the rows."""
    counts = {}
    for p, shape in shapes.items():
        rows, size = int(shape[-1]), int(np.prod(shape))
        r = size // rows
        counts[p] = rows * (r - sparsity.kept_total(r, sparsity_))
    return counts


@functools.partial(jax.jit, static_argnames='counts')
def _row_masks(scores, *, counts):
    masks = {}
    for p, k in counts:
        s = scores[p]
        keys = _rows(sparsity.sortable_key(s))
        rows, r = keys.shape
        if not 0 <= k <= rows * r:
            raise ValueError(f'{p}: cannot prune {k} of its {rows * r} weights')
        per_row = k // rows + (np.arange(rows) < k % rows)  # the first rows take the rest
        # Stable sort: among equal keys the lower flat index ranks (and is pruned) first.
        ranks = jnp.argsort(jnp.argsort(keys, axis=-1, stable=True), axis=-1, stable=True)
        masks[p] = (ranks >= per_row[:, None]).T.reshape(s.shape)
    return masks


def row_masks(scores: Mapping[str, Array], counts: Mapping[str, int]) -> FlatTree:
    """Masks pruning the lowest keep scores WITHIN each output row (kernel axis -1): layer l
    prunes k_l, spread evenly over its rows (the first ``k_l mod rows`` rows prune one
    more); ties: the lower index pruned first."""
    return _row_masks(dict(scores), counts=tuple(sorted((p, int(k)) for p, k in counts.items())))


def wanda_masks(
    model: nn.Module,
    params: Mapping,
    statistics: Mapping,
    batches: Any,
    *,
    sparsity: float | None = None,
    counts: Mapping[str, int] | None = None,
    paths: Sequence[str] | None = None,
    pattern: str | Sequence[int] | None = None,
) -> FlatTree:
    """Wanda masks (True = kept) over several calibration batches.

    Give ``sparsity`` (every output row of every kernel at ``paths`` prunes that share,
    :func:`row_counts`), per-layer ``counts`` (e.g. a jackpot's, spread over the rows), or
    an N:M ``pattern`` ('2:4': the M - N lowest scores of every M consecutive inputs of
    each output pruned; kernels whose inputs do not divide by M stay dense). ``paths``
    default to the keys of ``counts``, else ``sparsity.prunable_paths(params)``.
    """
    if paths is None:
        paths = tuple(counts) if counts is not None else _default_paths(params)
    paths = tuple(sorted(paths))
    shapes = {p: tuple(w.shape) for p, w in _kernels(params, paths).items()}
    nm = structured.parse_pattern(pattern)
    given = [name for name, v in (('sparsity', sparsity), ('counts', counts)) if v is not None]
    if len(given) + bool(nm) != 1:
        raise ValueError(
            f'wanda_masks: give exactly one of sparsity=, counts= or pattern= (got '
            f"{given + (['pattern'] if nm else []) or 'none'})"
        )
    norms = activation_norms(model, params, statistics, paths, batches)
    scores = wanda_keep_scores(_kernels(params, paths), norms)
    if nm:
        return structured.masks_from_scores(scores, structured.nm_counts(shapes, *nm), *nm)
    if counts is None:
        counts = row_counts(shapes, sparsity)
    return row_masks(scores, {p: counts[p] for p in paths})


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
        wanda_scores, True, False, 'Wanda |w| ||x||, one batch, eval mode, per output row', True
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
    spreads k_l over the layer's output rows (:func:`row_masks`).
    """
    scores = criterion_scores(name, model, params, statistics, tuple(counts), batch, rng, **options)
    if CRITERIA[name].per_row:
        return row_masks(scores, counts)
    return _masks(scores, counts=tuple(sorted((p, int(k)) for p, k in counts.items())))
