"""Wanda (Sun et al. 2024): a weight's keep score is |w_ij| * ||X_j||_2, X_j the j-th input
feature of the layer over every calibration position (all examples, all tokens or pixels),
from the dense model in eval mode.

Compared within each OUTPUT ROW: every output neuron keeps the same share of its inputs
(:func:`row_masks`; a layer count that does not divide by the rows gives the first rows
one weight more to prune). With an N:M pattern the groups of M consecutive inputs of
each output are ranked instead (:func:`wanda_masks`). Unlike gradient criteria it needs
one forward per calibration batch only (:func:`activation_norms`).

The activation norms are gathered by :mod:`jackpot_jax.baselines.calibration`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jackpot_jax.baselines import calibration
from jackpot_jax.core import sparsity, structured, trees
from jackpot_jax.core.sparsity import prunable_paths  # wanda_masks has a `sparsity` argument

Array = jax.Array
FlatTree = dict[str, Array]
Batch = tuple[Array, Array]


@functools.partial(jax.jit, static_argnames=('model', 'paths'))
def _square_sums(model, params, statistics, inputs, *, paths):
    variables = {'params': params, 'batch_stats': statistics}
    sums = calibration.layer_inputs(model, variables, inputs, calibration.square_sums)
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
    kernels = trees.kernels_at(params, paths)
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
    if batch is None:
        raise ValueError("criterion 'wanda' needs a data batch (inputs, labels); pass batch=")
    inputs = batch[0]
    variables = {'params': params, 'batch_stats': statistics}
    sums = calibration.layer_inputs(model, variables, inputs, calibration.square_sums)
    kernels = trees.kernels_at(params, paths)
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
        paths = tuple(counts) if counts is not None else prunable_paths(params)
    paths = tuple(sorted(paths))
    shapes = {p: tuple(w.shape) for p, w in trees.kernels_at(params, paths).items()}
    nm = structured.parse_pattern(pattern)
    given = [name for name, v in (('sparsity', sparsity), ('counts', counts)) if v is not None]
    if len(given) + bool(nm) != 1:
        raise ValueError(
            f'wanda_masks: give exactly one of sparsity=, counts= or pattern= (got '
            f"{given + (['pattern'] if nm else []) or 'none'})"
        )
    norms = activation_norms(model, params, statistics, paths, batches)
    scores = wanda_keep_scores(trees.kernels_at(params, paths), norms)
    if nm:
        return structured.masks_from_scores(scores, structured.nm_counts(shapes, *nm), *nm)
    if counts is None:
        counts = row_counts(shapes, sparsity)
    return row_masks(scores, {p: counts[p] for p in paths})
