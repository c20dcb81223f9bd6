"""The per-layer mask update the library ran before its all-layer search: the reference.

One exact k-th value search (32-pass bisection over the sortable keys) per layer for
the unstructured rules; per-layer stable argsorts within N:M groups. Kept here, unchanged
except that ``k`` may be traced (``k == 0`` is a ``jnp.where``, not an ``if``), so the
all-layer update in :mod:`jackpot_jax.core.sparsity` / :mod:`jackpot_jax.core.structured` can be
compared with it mask for mask (``tests/test_all_layer_update.py``).
``benchmarks/search_step.py`` times it beside the library's update.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from jackpot_jax.core.sparsity import MASK_UPDATES, sortable_key

Array = jax.Array


# ----------------------------------------------------------------------------
# Unstructured: one bisection per layer.
# ----------------------------------------------------------------------------
def kth_smallest_key(keys: Array, k, valid: Array | None = None) -> Array:
    """The k-th smallest (1-based) of ``keys[valid]``, found bit by bit from the top."""

    def set_bit(i, prefix):
        bit = jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        below_or_equal = keys <= (prefix | (bit - jnp.uint32(1)))
        if valid is not None:
            below_or_equal &= valid
        enough = jnp.sum(below_or_equal, dtype=jnp.int32) >= k
        return jnp.where(enough, prefix, prefix | bit)

    return jax.lax.fori_loop(0, 32, set_bit, jnp.uint32(0))


def select_smallest(keys: Array, count, valid: Array | None = None) -> Array:
    """Bool mask of exactly ``count`` entries of ``keys[valid]`` with the smallest keys."""
    thr = kth_smallest_key(keys, count, valid)
    below = keys < thr
    equal = keys == thr
    if valid is not None:
        below &= valid
        equal &= valid
    needed = count - jnp.sum(below, dtype=jnp.int32)
    return below | (equal & (jnp.cumsum(equal, dtype=jnp.int32) <= needed))


def restricted_update(
    keys: Array,
    kept: Array,
    t: Array,
    k,
    rate,
    select: Callable[[Array, Array, Array], Array],
    axis: int | None = None,
) -> Array:
    """Revival / drop given the threshold key ``t``, counted over ``axis``."""
    above = keys > t
    keepdims = axis is not None
    if rate is None:
        at_or_below = jnp.sum(~above, axis=axis, keepdims=keepdims, dtype=jnp.int32)
        return jnp.where(at_or_below == k, above, kept)
    revive_candidates = ~kept & above
    drop_candidates = kept & ~above
    num_revive = jnp.sum(revive_candidates, axis=axis, keepdims=keepdims, dtype=jnp.int32)
    num_drop = jnp.sum(drop_candidates, axis=axis, keepdims=keepdims, dtype=jnp.int32)
    gate = (num_revive > 0) & (num_drop > 0) & (num_revive == num_drop)
    rate = jnp.asarray(rate, jnp.float32)
    p = jnp.clip(jnp.ceil(num_revive.astype(jnp.float32) * rate).astype(jnp.int32), 1, num_revive)
    revive = select(~keys, p, revive_candidates)
    drop = select(keys, p, drop_candidates)
    return jnp.where(gate, (kept & ~drop) | revive, kept)


def short_restriction_update(scores: Array, mask: Array, k, rate=None) -> Array:
    """One short-restriction step for one layer; k == 0 leaves the mask unchanged."""
    keys = sortable_key(scores.ravel())
    t = kth_smallest_key(keys, k)
    new = restricted_update(keys, mask.ravel(), t, k, rate, select_smallest)
    return jnp.where(k == 0, mask, new.reshape(mask.shape))


def edge_popup_mask(scores: Array, k) -> Array:
    """Keep the top n - k of |s| (ties: lower index kept); k == 0 keeps everything."""
    keys = ~sortable_key(jnp.abs(scores).ravel())
    new = select_smallest(keys, scores.size - k).reshape(scores.shape)
    return jnp.where(k == 0, True, new)


def update_masks(scores, masks, counts, *, mode='short_restriction', rate=None):
    """One loop per layer; returns (new masks, changes per layer)."""
    if mode == 'short_restriction':
        new = {p: short_restriction_update(scores[p], m, counts[p], rate) for p, m in masks.items()}
    elif mode == 'edge_popup':
        new = {p: edge_popup_mask(scores[p], counts[p]) for p in masks}
    else:
        raise ValueError(f'unknown mask update {mode!r}; choose one of {MASK_UPDATES}')
    changes = {p: jnp.sum(new[p] != masks[p], dtype=jnp.int32) for p in masks}
    return new, changes


# ----------------------------------------------------------------------------
# N:M groups: per-layer stable argsorts.
# ----------------------------------------------------------------------------
def _to_groups(x: Array, m: int) -> Array:
    return jnp.moveaxis(x, -2, -1).reshape(-1, m)


def _from_groups(g: Array, shape) -> Array:
    moved = (*shape[:-2], shape[-1], shape[-2])
    return jnp.moveaxis(g.reshape(moved), -1, -2)


def _ranks(keys: Array, valid: Array | None = None) -> Array:
    order = jnp.argsort(keys, axis=-1, stable=True)
    inverse = jnp.argsort(order, axis=-1)
    if valid is None:
        return inverse + 1
    counts = jnp.cumsum(jnp.take_along_axis(valid, order, axis=-1), axis=-1, dtype=jnp.int32)
    return jnp.take_along_axis(counts, inverse, axis=-1)


def _select_smallest_in_groups(keys: Array, count, valid: Array | None = None) -> Array:
    picked = _ranks(keys, valid) <= count
    return picked if valid is None else picked & valid


def nm_short_restriction_update(scores: Array, mask: Array, n: int, m: int, rate=None) -> Array:
    """The short restriction in every group of one layer (k = M - N per group)."""
    k = m - n
    keys = _to_groups(sortable_key(scores), m)
    kept = _to_groups(mask.astype(bool), m)
    t = jnp.sort(keys, axis=-1)[:, k - 1 : k]
    new = restricted_update(keys, kept, t, k, rate, _select_smallest_in_groups, axis=-1)
    return _from_groups(new, mask.shape)


def nm_top_n(keys: Array, n: int, m: int) -> Array:
    """Keep the N largest keys of every group (ties: the lower index kept)."""
    return _from_groups(_select_smallest_in_groups(~_to_groups(keys, m), n), keys.shape)


def nm_update_masks(scores, masks, counts: Mapping[str, int], n, m, *, mode, rate=None):
    """One update per layer with N:M groups; layers with a count of 0 stay as they are
    (short restriction) or dense (edge-popup)."""
    if mode == 'edge_popup':
        new = {
            p: nm_top_n(sortable_key(jnp.abs(s)), n, m) if counts[p] else jnp.ones(s.shape, bool)
            for p, s in scores.items()
        }
    else:
        new = {
            p: nm_short_restriction_update(scores[p], b, n, m, rate) if counts[p] else b
            for p, b in masks.items()
        }
    changes = {p: jnp.sum(new[p] != masks[p], dtype=jnp.int32) for p in masks}
    return new, changes
