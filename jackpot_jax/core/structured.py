"""N:M structured masks: every group of M consecutive input-channel weights keeps exactly N.

Kernels are in Flax layout, conv ``(H, W, I, O)`` and dense ``(I, O)``, so the input
channels are always axis -2. A group is M consecutive entries along that axis at
fixed other indices (``[0..M-1], [M..2M-1], ...``); 2:4 is the pattern sparse tensor
cores run. A kernel is eligible iff it has rank >= 2 and ``I % M == 0``; the others
stay dense.

Each group is treated as a layer of M weights with ``k = M - N`` pruned, and the
rules of :mod:`jackpot_jax.core.sparsity` apply to every group independently: on a
single group (a kernel of shape ``(M, 1)``) every function here returns exactly what
its :mod:`~jackpot_jax.core.sparsity` counterpart returns, tie rules included:

  * :func:`top_n_in_groups` and :func:`edge_popup_mask`: among tied keys the lower
    index in the group is KEPT first (as ``sparsity.edge_popup_mask``);
  * :func:`magnitude_mask`: among tied |w| the lower index is PRUNED first (as
    ``sparsity.magnitude_mask``);
  * :func:`short_restriction_update`: revive the best of R and drop the worst of D,
    lower index first among ties (as ``sparsity.short_restriction_update``).

N and M are static Python ints; ``rate`` may be traced. The groups of all layers are
stacked into one ``(G, M)`` array and ranked together by comparing every entry with
the other M - 1 of its group (M is small): no sort and no loop, every shape static and
every array function ``jax.jit``-compatible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The pattern syntax lives with the other names of choices; its names are kept here too.
from jackpot_jax.core.choices import (  # noqa: F401
    NByM,
    check_pattern,
    parse_pattern,
    pattern_sparsity,
)
from jackpot_jax.core.sparsity import sortable_key

Array = jax.Array


# ----------------------------------------------------------------------------
# Patterns and eligibility.
# ----------------------------------------------------------------------------
def eligible(shape: Sequence[int], m: int) -> bool:
    """Whether a kernel of this shape splits into groups of M input channels."""
    return len(shape) >= 2 and shape[-2] % m == 0


def nm_counts(shapes: Mapping[str, Sequence[int]], n: int, m: int) -> dict[str, int]:
    """Per-layer pruned counts under N:M: size (M - N) / M, or 0 (dense) if ineligible."""
    check_pattern(n, m)
    return {
        p: math.prod(s) * (m - n) // m if eligible(tuple(s), m) else 0 for p, s in shapes.items()
    }


def describe(n: int, m: int) -> str:
    """A short human-readable name of the pattern, e.g. ``'2:4 along input channels'``."""
    return f'{n}:{m} along input channels'


# ----------------------------------------------------------------------------
# Groups.
# ----------------------------------------------------------------------------
def _check_eligible(shape: Sequence[int], n: int, m: int) -> None:
    check_pattern(n, m)
    if not eligible(shape, m):
        raise ValueError(
            f'kernel shape {tuple(shape)} is not eligible for {n}:{m}: it needs rank >= 2 and '
            f'input channels (axis -2) divisible by M={m}; leave such kernels dense'
        )


def _to_groups(x: Array, m: int) -> Array:
    """(..., I, O) -> (G, M): M consecutive input channels per row."""
    return jnp.moveaxis(x, -2, -1).reshape(-1, m)


def _from_groups(g: Array, shape: Sequence[int]) -> Array:
    """Inverse of :func:`_to_groups` for a kernel of the given shape."""
    moved = (*shape[:-2], shape[-1], shape[-2])
    return jnp.moveaxis(g.reshape(moved), -1, -2)


def _ranks(keys: Array, valid: Array | None = None) -> Array:
    """1-based rank of each entry among the valid entries of its row, smallest key first.

    Ties: the lower index ranks first. Entries outside ``valid`` get meaningless ranks.
    One comparison of every entry with every other of its row: O(M) per entry.
    """
    m = keys.shape[-1]
    index = np.arange(m)
    this, other = keys[:, :, None], keys[:, None, :]
    other_first = (other < this) | ((other == this) & (index[None, :] < index[:, None]))
    if valid is not None:
        other_first &= valid[:, None, :]
    return jnp.sum(other_first, axis=-1, dtype=jnp.int32) + 1


def _select_smallest(keys: Array, count: Array | int, valid: Array | None = None) -> Array:
    """Per row of (G, M) keys, the ``count`` valid entries with the smallest keys.

    Ties: the lower index first. ``count`` is an int or a (G, 1) array.
    """
    picked = _ranks(keys, valid) <= count
    return picked if valid is None else picked & valid


def _restricted_update(keys: Array, kept: Array, k: int, rate: Array | float | None) -> Array:
    """Steps 3-5 of docs/method.md §4 in every row of (G, M) keys, k pruned per row."""
    t = jnp.max(jnp.where(_ranks(keys) == k, keys, jnp.uint32(0)), axis=-1, keepdims=True)
    above = keys > t
    if rate is None:  # rate 1: every candidate swaps, so the mask is simply s > t
        at_or_below = jnp.sum(~above, axis=-1, keepdims=True, dtype=jnp.int32)
        return jnp.where(at_or_below == k, above, kept)
    revive_candidates = ~kept & above
    drop_candidates = kept & ~above
    num_revive = jnp.sum(revive_candidates, axis=-1, keepdims=True, dtype=jnp.int32)
    num_drop = jnp.sum(drop_candidates, axis=-1, keepdims=True, dtype=jnp.int32)
    gate = (num_revive > 0) & (num_drop > 0) & (num_revive == num_drop)
    rate = jnp.asarray(rate, jnp.float32)
    p = jnp.clip(jnp.ceil(num_revive.astype(jnp.float32) * rate).astype(jnp.int32), 1, num_revive)
    revive = _select_smallest(~keys, p, revive_candidates)  # ~keys: highest scores first
    drop = _select_smallest(keys, p, drop_candidates)
    return jnp.where(gate, (kept & ~drop) | revive, kept)


def _in_all_groups(rule, arrays: Mapping[str, Array], counts: Mapping[str, int], n: int, m: int):
    """Apply ``rule`` ((G, M) groups -> (G, M) bool) to the groups of every layer with a
    nonzero count at once (one stacked array); the other layers come back all True."""
    paths = [p for p in arrays if counts[p]]
    for p in paths:
        _check_eligible(np.shape(arrays[p]), n, m)
    out = {p: jnp.ones(np.shape(a), bool) for p, a in arrays.items() if not counts[p]}
    if paths:
        stacked = rule(jnp.concatenate([_to_groups(jnp.asarray(arrays[p]), m) for p in paths]))
        sizes = [math.prod(np.shape(arrays[p])) // m for p in paths]
        parts = jnp.split(stacked, np.cumsum(sizes)[:-1])
        out.update({p: _from_groups(g, np.shape(arrays[p])) for p, g in zip(paths, parts)})
    return {p: out[p] for p in arrays}


# ----------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------
def top_n_in_groups(keys: Array, n: int, m: int) -> Array:
    """Keep the N largest uint32 keys of every group (ties: the lower index kept)."""
    _check_eligible(keys.shape, n, m)
    return _from_groups(_select_smallest(~_to_groups(keys, m), n), keys.shape)


def prune_smallest_in_groups(keys: Array, n: int, m: int) -> Array:
    """Prune the M - N smallest keys of every group (ties: the lower index pruned first)."""
    _check_eligible(keys.shape, n, m)
    return _from_groups(~_select_smallest(_to_groups(keys, m), m - n), keys.shape)


def magnitude_mask(kernel: Array, n: int, m: int) -> Array:
    """Prune the M - N smallest |w| of every group (ties: the lower index pruned first)."""
    return prune_smallest_in_groups(sortable_key(jnp.abs(kernel)), n, m)


def edge_popup_mask(scores: Array, n: int, m: int) -> Array:
    """The 2021 rule per group: keep the top N of |s| (ties: the lower index kept)."""
    return top_n_in_groups(sortable_key(jnp.abs(scores)), n, m)


def short_restriction_update(
    scores: Array, mask: Array, n: int, m: int, rate: Array | float | None = None
) -> Array:
    """One short-restriction step (docs/method.md §4) in every group independently.

    Each group is a layer of M weights with k = M - N pruned: t is its k-th smallest
    score, R = pruned with s > t, D = kept with s <= t; the group changes only if
    |R| = |D| > 0, and then the ceil(|R| rate) best of R are revived and as many worst
    of D dropped (ties: lower index first). ``rate=None`` means rate 1 on a fast path.
    Every group keeps exactly N afterwards whenever it did before.
    """
    _check_eligible(scores.shape, n, m)
    keys = _to_groups(sortable_key(scores), m)
    kept = _to_groups(mask.astype(bool), m)
    return _from_groups(_restricted_update(keys, kept, m - n, rate), mask.shape)


# ----------------------------------------------------------------------------
# Whole models: flat dicts keyed by kernel path; layers with k = 0 stay dense. The
# groups of all layers are handled together, in one stacked (G, M) array.
# ----------------------------------------------------------------------------
def magnitude_masks(
    kernels: Mapping[str, Array], counts: Mapping[str, int], n: int, m: int
) -> dict[str, Array]:
    """N:M magnitude masks of every eligible layer (``counts`` from :func:`nm_counts`)."""
    keys = {p: sortable_key(jnp.abs(w)) for p, w in kernels.items()}
    return _in_all_groups(lambda g: ~_select_smallest(g, m - n), keys, counts, n, m)


def random_masks(
    rng: Array, kernels: Mapping[str, Array], counts: Mapping[str, int], n: int, m: int
) -> dict[str, Array]:
    """Uniformly random N:M masks of every eligible layer."""
    rngs = dict(zip(sorted(kernels), jax.random.split(rng, len(kernels))))
    keys = {p: sortable_key(jax.random.uniform(rngs[p], np.shape(w))) for p, w in kernels.items()}
    return _in_all_groups(lambda g: _select_smallest(~g, n), keys, counts, n, m)


def masks_from_scores(
    scores: Mapping[str, Array],
    counts: Mapping[str, int],
    n: int,
    m: int,
    mode: str = 'short_restriction',
) -> dict[str, Array]:
    """The N:M masks the mask update picks from fresh scores: the M - N lowest s of every
    group pruned (ties: lower index first, as ``sparsity.masks_from_scores``), or for
    edge-popup the top N of |s|."""
    if mode == 'edge_popup':
        keys = {p: sortable_key(jnp.abs(s)) for p, s in scores.items()}
        return _in_all_groups(lambda g: _select_smallest(~g, n), keys, counts, n, m)
    keys = {p: sortable_key(s) for p, s in scores.items()}
    return _in_all_groups(lambda g: ~_select_smallest(g, m - n), keys, counts, n, m)


def update_masks(
    scores: Mapping[str, Array],
    masks: Mapping[str, Array],
    counts: Mapping[str, int],
    n: int,
    m: int,
    *,
    mode: str = 'short_restriction',
    rate: Array | float | None = None,
) -> tuple[dict[str, Array], dict[str, Array]]:
    """``sparsity.update_masks`` within N:M groups, every group of every layer at once;
    returns (new masks, changes per layer)."""
    if mode == 'edge_popup':
        new = masks_from_scores(scores, counts, n, m, mode)
    else:
        paths = [p for p in masks if counts[p]]
        for p in paths:
            _check_eligible(np.shape(masks[p]), n, m)
        new = dict(masks)
        if paths:
            keys = jnp.concatenate([_to_groups(sortable_key(scores[p]), m) for p in paths])
            kept = jnp.concatenate([_to_groups(masks[p].astype(bool), m) for p in paths])
            updated = _restricted_update(keys, kept, m - n, rate)
            parts = jnp.split(updated, np.cumsum([masks[p].size // m for p in paths])[:-1])
            new.update({p: _from_groups(g, masks[p].shape) for p, g in zip(paths, parts)})
    changes = {p: jnp.sum(new[p] != masks[p], dtype=jnp.int32) for p in masks}
    return new, changes


def pattern_report(masks: Mapping[str, Array], n: int, m: int) -> dict[str, object]:
    """The pattern, its dense (ineligible) layers and the groups breaking it (0 when exact)."""
    shapes = {p: np.shape(b) for p, b in masks.items()}
    return {
        'pattern': describe(n, m),
        'dense_layers': sorted(p for p, shape in shapes.items() if not eligible(shape, m)),
        'group_violations': sum(
            group_violations(b, n, m) for p, b in masks.items() if eligible(shapes[p], m)
        ),
    }


# ----------------------------------------------------------------------------
# Checks.
# ----------------------------------------------------------------------------
def group_violations(mask: Array | np.ndarray, n: int, m: int) -> int:
    """The number of groups that do not keep exactly N (0 for a valid N:M mask)."""
    mask = np.asarray(mask)
    _check_eligible(mask.shape, n, m)
    kept = np.count_nonzero(np.moveaxis(mask, -2, -1).reshape(-1, m), axis=-1)
    return int(np.count_nonzero(kept != n))
