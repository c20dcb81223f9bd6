"""Sparsity math for the lottery-jackpot search: pure functions over flat pytrees.

Vocabulary used throughout jackpot_jax:
  * sparsity: the fraction of weights REMOVED;
  * pruned counts ``k``: per prunable layer, the exact number of weights removed;
  * scores: one float per prunable weight, the only thing the search learns;
  * masks: one bool per prunable weight, True = kept;
  * frozen params: the pre-trained weights, never changed.

Scores, masks and counts are flat dicts keyed by the parameter path of the kernel
they belong to (``'layer1_0/conv1/kernel'``). Counts are static Python ints, so
every array shape below is static and each function is ``jax.jit``-compatible.
Ranking never sorts: an exact k-th value is found by bisection over the bit
pattern of the float32 keys (32 counting passes, O(32 n)), and ties are broken
by the lower flat index, so every result is deterministic.
"""

from __future__ import annotations

import fractions
import math
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Array = jax.Array
FlatTree = dict[str, Array]

ALLOCATIONS = ('global_magnitude', 'uniform', 'erk')
RATE_SCHEDULES = ('all', 'poly4', 'cosine')
MASK_UPDATES = ('short_restriction', 'edge_popup')
SCORE_INITS = ('magnitude', 'kaiming', 'random')  # 'random': U(0, 1) scores
DEFAULT_INCLUDE = r'(^|/)kernel$'
# Classifiers (incl. torchvision VGG's three and the ViT's ``heads``) and the ViT's patch
# embedding ``conv_proj``; the ViT's class token and position embedding are no kernels.
DEFAULT_EXCLUDE = r'^((fc|classifier)(_\d+)?|heads|conv_proj)/'


# ----------------------------------------------------------------------------
# Paths and prunable leaves.
# ----------------------------------------------------------------------------
def flatten(tree: Mapping) -> dict:
    """Nested dict -> flat dict keyed by '/'-joined paths."""
    return traverse_util.flatten_dict(dict(tree), sep='/')


def unflatten(flat: Mapping) -> dict:
    """Flat dict keyed by '/'-joined paths -> nested dict."""
    return traverse_util.unflatten_dict(dict(flat), sep='/')


def prunable_paths(
    params: Mapping, include: str = DEFAULT_INCLUDE, exclude: str | None = DEFAULT_EXCLUDE
) -> tuple[str, ...]:
    """Paths of the kernels to prune: rank >= 2, matching ``include``, not ``exclude``.

    The defaults select every conv and dense kernel except the classifier's
    (top-level ``fc``, ``classifier`` or ``classifier_<i>``), as in the paper; in a
    ViT, the attention (query, key, value, out_proj) and MLP kernels, not the patch
    embedding ``conv_proj`` or the ``heads``.
    """
    paths = tuple(
        path
        for path, leaf in sorted(flatten(params).items())
        if np.ndim(leaf) >= 2
        and re.search(include, path)
        and not (exclude and re.search(exclude, path))
    )
    if not paths:
        raise ValueError(
            f'no prunable kernels match include={include!r} exclude={exclude!r}; '
            f'parameter paths are: {sorted(flatten(params))}'
        )
    return paths


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f'sparsity must be in [0, 1), got {sparsity!r}; it is the '
            'fraction of prunable weights removed (0.9 keeps 10%)'
        )


def exact_fraction(value: float) -> fractions.Fraction:
    """The decimal a user typed (0.9), as an exact rational, not 0.9000000000000000222."""
    return fractions.Fraction(repr(float(value)))


def kept_total(num_weights: int, sparsity: float) -> int:
    """``floor(N * (1 - sparsity))`` in exact arithmetic (never off by one)."""
    _check_sparsity(sparsity)
    return math.floor(num_weights * (1 - exact_fraction(sparsity)))


# ----------------------------------------------------------------------------
# Allocations: per-layer pruned counts k_l (static Python ints).
# ----------------------------------------------------------------------------
def global_magnitude_allocation(kernels: Mapping[str, Array], sparsity: float) -> dict[str, int]:
    """The authors' 'l1' rule: one global |w| threshold over all prunable layers.

    keep = floor(N (1 - sparsity)); thr = the keep-th largest |w|;
    k_l = #{|w| < thr} in layer l (ties at thr are kept).
    """
    magnitudes = {p: np.abs(np.asarray(w, np.float32)).ravel() for p, w in kernels.items()}
    all_magnitudes = np.concatenate(list(magnitudes.values()))
    keep = kept_total(all_magnitudes.size, sparsity)
    if keep == 0:
        raise ValueError(
            f'sparsity={sparsity} keeps no weight of {all_magnitudes.size}; ' 'lower the sparsity'
        )
    thr = np.partition(all_magnitudes, all_magnitudes.size - keep)[all_magnitudes.size - keep]
    return {p: int(np.count_nonzero(m < thr)) for p, m in magnitudes.items()}


def uniform_allocation(shapes: Mapping[str, Sequence[int]], sparsity: float) -> dict[str, int]:
    """Every layer loses the same fraction: k_l = floor(sparsity * n_l), exactly."""
    _check_sparsity(sparsity)
    return {p: math.floor(exact_fraction(sparsity) * math.prod(s)) for p, s in shapes.items()}


def erk_allocation(shapes: Mapping[str, Sequence[int]], sparsity: float) -> dict[str, int]:
    """Erdos-Renyi-Kernel: density of layer l proportional to sum(shape) / prod(shape).

    Layers whose density would exceed 1 stay dense and the rest is rescaled. The
    float budget is turned into integers by largest remainder, so the total kept
    is exactly floor(N (1 - sparsity)).
    """
    sizes = {p: math.prod(s) for p, s in shapes.items()}
    keep = kept_total(sum(sizes.values()), sparsity)
    raw = {p: sum(s) / math.prod(s) for p, s in shapes.items()}
    dense: set[str] = set()
    while len(dense) < len(shapes):  # all dense (sparsity 0): nothing left to scale
        budget = keep - sum(sizes[p] for p in dense)
        scale = budget / sum(raw[p] * sizes[p] for p in shapes if p not in dense)
        too_dense = {p for p in shapes if p not in dense and scale * raw[p] >= 1}
        if not too_dense:
            break
        dense |= too_dense
    kept = {p: sizes[p] if p in dense else scale * raw[p] * sizes[p] for p in shapes}
    floors = {p: math.floor(v) for p, v in kept.items()}
    leftover = keep - sum(floors.values())
    by_remainder = sorted(shapes, key=lambda p: (-(kept[p] - floors[p]), p))
    for p in by_remainder[:leftover]:
        floors[p] += 1
    return {p: sizes[p] - floors[p] for p in shapes}


def pruned_counts(
    kernels: Mapping[str, Array], sparsity: float, allocation: str = 'global_magnitude'
) -> dict[str, int]:
    """Per-layer pruned counts k_l for the named allocation."""
    if allocation == 'global_magnitude':
        return global_magnitude_allocation(kernels, sparsity)
    shapes = {p: tuple(np.shape(w)) for p, w in kernels.items()}
    if allocation == 'uniform':
        return uniform_allocation(shapes, sparsity)
    if allocation == 'erk':
        return erk_allocation(shapes, sparsity)
    raise ValueError(f'unknown allocation {allocation!r}; choose one of {ALLOCATIONS}')


# ----------------------------------------------------------------------------
# Exact ranking without sorting.
# ----------------------------------------------------------------------------
def sortable_key(x: Array) -> Array:
    """Map float32 values to uint32 keys with the same order (-0.0 folded to +0.0)."""
    x = jnp.where(x == 0, jnp.float32(0), x.astype(jnp.float32))
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def kth_smallest_key(keys: Array, k: Array | int, valid: Array | None = None) -> Array:
    """The k-th smallest (1-based) of ``keys[valid]``, found bit by bit from the top.

    32 counting passes over the keys; static shapes; k may be traced.
    """

    def set_bit(i, prefix):
        bit = jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        below_or_equal = keys <= (prefix | (bit - jnp.uint32(1)))
        if valid is not None:
            below_or_equal &= valid
        enough = jnp.sum(below_or_equal, dtype=jnp.int32) >= k
        return jnp.where(enough, prefix, prefix | bit)

    return jax.lax.fori_loop(0, 32, set_bit, jnp.uint32(0))


def select_smallest(keys: Array, count: Array | int, valid: Array | None = None) -> Array:
    """Bool mask of exactly ``count`` entries of ``keys[valid]`` with the smallest keys.

    Ties are broken by the lower flat index. ``keys`` is 1-D.
    """
    thr = kth_smallest_key(keys, count, valid)
    below = keys < thr
    equal = keys == thr
    if valid is not None:
        below &= valid
        equal &= valid
    needed = count - jnp.sum(below, dtype=jnp.int32)
    return below | (equal & (jnp.cumsum(equal, dtype=jnp.int32) <= needed))


# ----------------------------------------------------------------------------
# Initialisation.
# ----------------------------------------------------------------------------
def magnitude_mask(kernel: Array, k: int) -> Array:
    """Keep all but the k smallest |w| (ties: the lower flat index is pruned first)."""
    pruned = select_smallest(sortable_key(jnp.abs(kernel).ravel()), k)
    return (~pruned).reshape(kernel.shape)


def magnitude_masks(kernels: Mapping[str, Array], counts: Mapping[str, int]) -> FlatTree:
    """The magnitude-pruning masks at the given per-layer counts."""
    return {p: magnitude_mask(w, counts[p]) for p, w in kernels.items()}


def random_masks(rng: Array, kernels: Mapping[str, Array], counts: Mapping[str, int]) -> FlatTree:
    """Uniformly random masks with exactly the given per-layer counts."""
    rngs = jax.random.split(rng, len(kernels))
    return {
        p: ~select_smallest(sortable_key(jax.random.uniform(r, (w.size,))), counts[p]).reshape(
            w.shape
        )
        for r, (p, w) in zip(rngs, sorted(kernels.items()))
    }


def init_scores(masks: Mapping[str, Array], pruned_score: float = 0.99) -> FlatTree:
    """Magnitude score init: 1.0 where the mask keeps, ``pruned_score`` where it prunes.

    The first mask of the search is then the magnitude mask itself.
    """
    return {p: jnp.where(m, jnp.float32(1.0), jnp.float32(pruned_score)) for p, m in masks.items()}


def kaiming_scores(rng: Array, kernels: Mapping[str, Array]) -> FlatTree:
    """Edge-popup's score init: Kaiming uniform with a = sqrt(5), i.e. U(-b, b), b = 1/sqrt(fan_in).

    fan_in = prod(shape[:-1]) for Flax kernels (H*W*I for a conv, I for a dense layer),
    as PyTorch's ``kaiming_uniform_(scores, a=math.sqrt(5))`` on OIHW scores.
    """
    rngs = jax.random.split(rng, len(kernels))
    out = {}
    for r, (p, w) in zip(rngs, sorted(kernels.items())):
        bound = 1.0 / math.sqrt(math.prod(w.shape[:-1]))
        out[p] = jax.random.uniform(r, w.shape, jnp.float32, -bound, bound)
    return out


def uniform_scores(rng: Array, kernels: Mapping[str, Array]) -> FlatTree:
    """Scores drawn from U(0, 1): an initial mask uninformed by the weights."""
    rngs = jax.random.split(rng, len(kernels))
    return {
        p: jax.random.uniform(r, w.shape, jnp.float32)
        for r, (p, w) in zip(rngs, sorted(kernels.items()))
    }


def masks_from_scores(
    scores: Mapping[str, Array], counts: Mapping[str, int], mode: str = 'short_restriction'
) -> FlatTree:
    """The masks the mask update itself would pick from fresh scores.

    Short restriction: prune the k lowest scores (ties: lower index pruned first);
    edge-popup: prune the k lowest |s|.
    """
    if mode == 'edge_popup':
        return {p: edge_popup_mask(s, counts[p]) for p, s in scores.items()}
    if mode != 'short_restriction':
        raise ValueError(f'unknown mask update {mode!r}; choose one of {MASK_UPDATES}')
    return {
        p: ~select_smallest(sortable_key(s.ravel()), counts[p]).reshape(s.shape)
        for p, s in scores.items()
    }


# ----------------------------------------------------------------------------
# Forward pass.
# ----------------------------------------------------------------------------
def masked_params(
    frozen_params: Mapping, masks: Mapping[str, Array], scores: Mapping[str, Array] | None = None
) -> dict:
    """Frozen params with each prunable kernel W replaced by its masked value.

    Without scores: ``W * B``. With scores: ``W * (B + s - stop_gradient(s))``, whose
    value is ``W * B`` and whose gradient to the scores is ``dL/d(W B) * W``
    (straight-through, at pruned positions too).
    """
    flat = flatten(frozen_params)
    for path, mask in masks.items():
        w = flat[path]
        gate = mask.astype(w.dtype)
        if scores is not None:
            s = scores[path].astype(w.dtype)
            # s - sg(s) is exactly 0, so the value is W * B bit for bit ((B + s) - s is not).
            gate = gate + (s - jax.lax.stop_gradient(s))
        flat[path] = w * gate
    return unflatten(flat)


# ----------------------------------------------------------------------------
# Mask updates.
# ----------------------------------------------------------------------------
def swap_rate(schedule: str, epoch: Array | int, total_epochs: int) -> Array:
    """The short restriction's rate for an epoch e in 0..E-1."""
    e = jnp.asarray(epoch, jnp.float32) / total_epochs
    if schedule == 'all':
        return jnp.float32(1.0)
    if schedule == 'poly4':
        return (1.0 - e) ** 4
    if schedule == 'cosine':
        return 0.5 * (1.0 + jnp.cos(jnp.pi * e))
    raise ValueError(f'unknown rate schedule {schedule!r}; choose one of {RATE_SCHEDULES}')


def restricted_update(
    keys: Array,
    kept: Array,
    t: Array,
    k: int,
    rate: Array | float | None,
    select: Callable[[Array, Array, Array], Array],
    axis: int | None = None,
) -> Array:
    """Steps 3-5 of METHOD section 4 given the threshold key ``t``, counted over ``axis``.

    ``axis=None`` treats all of ``keys`` as one layer; ``axis=-1`` treats every row as
    one (N:M groups). ``select(keys, count, valid)`` picks the ``count`` entries of
    ``keys[valid]`` with the smallest keys, ties to the lower index.
    """
    above = keys > t
    keepdims = axis is not None
    if rate is None:  # rate 1: every candidate swaps, so the mask is simply s > t
        at_or_below = jnp.sum(~above, axis=axis, keepdims=keepdims, dtype=jnp.int32)
        return jnp.where(at_or_below == k, above, kept)
    revive_candidates = ~kept & above
    drop_candidates = kept & ~above
    num_revive = jnp.sum(revive_candidates, axis=axis, keepdims=keepdims, dtype=jnp.int32)
    num_drop = jnp.sum(drop_candidates, axis=axis, keepdims=keepdims, dtype=jnp.int32)
    gate = (num_revive > 0) & (num_drop > 0) & (num_revive == num_drop)
    rate = jnp.asarray(rate, jnp.float32)
    p = jnp.clip(jnp.ceil(num_revive.astype(jnp.float32) * rate).astype(jnp.int32), 1, num_revive)
    revive = select(~keys, p, revive_candidates)  # ~keys: highest scores first
    drop = select(keys, p, drop_candidates)
    return jnp.where(gate, (kept & ~drop) | revive, kept)


def short_restriction_update(
    scores: Array, mask: Array, k: int, rate: Array | float | None = None
) -> Array:
    """One short-restriction step for one layer (METHOD section 4).

    t is the k-th smallest score; revival candidates R = pruned with s > t, drop
    candidates D = kept with s <= t. Nothing changes unless |R| = |D| > 0. Then the
    ceil(|R| rate) best of R are revived and as many worst of D dropped (ties: lower
    index first). ``rate=None`` means rate 1 on a fast path. The mask keeps exactly
    n - k weights afterwards whenever it did before.
    """
    if k == 0:
        return mask
    keys = sortable_key(scores.ravel())
    t = kth_smallest_key(keys, k)
    return restricted_update(keys, mask.ravel(), t, k, rate, select_smallest).reshape(mask.shape)


def edge_popup_mask(scores: Array, k: int) -> Array:
    """The 2021 rule: keep the top n - k of |s| (ties: lower index kept)."""
    if k == 0:
        return jnp.ones(scores.shape, bool)
    keys = ~sortable_key(jnp.abs(scores).ravel())
    return select_smallest(keys, scores.size - k).reshape(scores.shape)


def update_masks(
    scores: Mapping[str, Array],
    masks: Mapping[str, Array],
    counts: Mapping[str, int],
    *,
    mode: str = 'short_restriction',
    rate: Array | float | None = None,
) -> tuple[FlatTree, FlatTree]:
    """Apply the mask update to every layer; returns (new masks, changes per layer).

    A change is one weight whose kept/pruned state flipped.
    """
    if mode == 'short_restriction':
        new = {p: short_restriction_update(scores[p], m, counts[p], rate) for p, m in masks.items()}
    elif mode == 'edge_popup':
        new = {p: edge_popup_mask(scores[p], counts[p]) for p in masks}
    else:
        raise ValueError(f'unknown mask update {mode!r}; choose one of {MASK_UPDATES}')
    changes = {p: jnp.sum(new[p] != masks[p], dtype=jnp.int32) for p in masks}
    return new, changes


# ----------------------------------------------------------------------------
# Reporting.
# ----------------------------------------------------------------------------
def sparsity_report(params: Mapping, masks: Mapping[str, Array]) -> dict:
    """Per-layer and total sparsity, over prunable weights and over the whole model."""
    layers = []
    for path, mask in sorted(masks.items()):
        size = int(np.size(mask))
        kept = int(np.count_nonzero(np.asarray(mask)))
        layers.append({'layer': path, 'size': size, 'kept': kept, 'sparsity': 1 - kept / size})
    prunable = sum(row['size'] for row in layers)
    removed = sum(row['size'] - row['kept'] for row in layers)
    total = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
    return {
        'layers': layers,
        'prunable_weights': prunable,
        'prunable_removed': removed,
        'sparsity': removed / prunable,
        'model_params': total,
        'model_sparsity': removed / total,
    }


def format_sparsity_report(report: Mapping) -> str:
    """A plain-text table of a :func:`sparsity_report`."""
    width = max([len('layer')] + [len(r['layer']) for r in report['layers']])
    lines = [f"{'layer':<{width}}  {'weights':>10}  {'kept':>10}  {'sparsity':>8}"]
    for r in report['layers']:
        lines.append(
            f"{r['layer']:<{width}}  {r['size']:>10,}  {r['kept']:>10,}  " f"{r['sparsity']:>8.2%}"
        )
    lines.append(
        f"sparsity over prunable weights: {report['sparsity']:.2%} "
        f"({report['prunable_removed']:,} of {report['prunable_weights']:,} removed)"
    )
    lines.append(
        f"sparsity over the whole model (classifier, biases, BN included): "
        f"{report['model_sparsity']:.2%} of {report['model_params']:,} params"
    )
    if 'pattern' in report:  # added by structured.pattern_report
        dense = ', '.join(report['dense_layers']) or 'none'
        lines.append(
            f"pattern {report['pattern']}: {report['group_violations']} groups break it; "
            f"left dense (input channels not a multiple of M): {dense}"
        )
    return '\n'.join(lines)
