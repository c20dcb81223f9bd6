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
pattern of the float32 keys (32 counting passes, O(32 n)), for all layers in one
loop (:class:`Segments`), and ties are broken by the lower flat index, so every
result is deterministic.
"""

from __future__ import annotations

import fractions
import functools
import math
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# The names of the rules below (one table with SearchSettings, which checks them).
from jackpot_jax.core.choices import (  # noqa: F401
    ALLOCATIONS,
    DEFAULT_EXCLUDE,
    DEFAULT_INCLUDE,
    MASK_UPDATES,
    RATE_SCHEDULES,
    SCORE_INITS,
)

Array = jax.Array
FlatTree = dict[str, Array]


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
# Exact ranking without sorting, every layer in one search.
# ----------------------------------------------------------------------------
MAX_KEY = 0xFFFFFFFF  # padding and invalid entries: never counted (see kth_smallest_keys)


def sortable_key(x: Array) -> Array:
    """Map float32 values to uint32 keys with the same order (-0.0 folded to +0.0)."""
    x = jnp.where(x == 0, jnp.float32(0), x.astype(jnp.float32))
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


class Segments:
    """Flat arrays (segments: one per layer) packed side by side into one 2-D array.

    Each segment is cut into chunks of ``chunk`` consecutive entries (the last one
    padded); chunk j is column j of the packed ``[chunk, num_chunks]`` array, so flat
    order within a segment is column after column, top to bottom. A count down the
    columns followed by a sum over each segment's columns ranks every segment in the
    same pass (one loop serves all layers), and the columns are what XLA vectorises
    across. Sizes are static.
    """

    def __init__(self, sizes: Sequence[int], chunk: int | None = None):
        self.sizes = tuple(int(n) for n in sizes)
        self.num = len(self.sizes)
        # About square (num_chunks ~ chunk): little padding, few per-chunk partial counts.
        total = max(2, sum(self.sizes))
        self.chunk = chunk or 1 << min(14, max(3, math.ceil(math.log2(total) / 2)))
        self.chunks = np.array([max(1, -(-n // self.chunk)) for n in self.sizes], np.int64)
        self.chunk_segment = np.repeat(np.arange(self.num, dtype=np.int32), self.chunks)
        self.first_chunk = (np.cumsum(self.chunks) - self.chunks).astype(np.int32)
        self.last_chunk = (self.first_chunk + self.chunks - 1).astype(np.int32)
        self.chunk_length = np.full(self.num_chunks, self.chunk, np.int32)
        self.chunk_length[self.last_chunk] = np.asarray(self.sizes) - (self.chunks - 1) * self.chunk

    @property
    def num_chunks(self) -> int:
        return self.chunk_segment.size

    def __eq__(self, other: object) -> bool:  # hashable: a static argument of the searches
        return isinstance(other, Segments) and (self.sizes, self.chunk) == (
            other.sizes,
            other.chunk,
        )

    def __hash__(self) -> int:
        return hash((self.sizes, self.chunk))

    def repeated(self, times: int) -> Segments:
        """The layout of ``times`` packed arrays of this layout side by side."""
        return Segments(self.sizes * times, self.chunk)

    def pack(self, arrays: Sequence[Array], fill: Array | int | bool) -> Array:
        """Arrays (any shapes, these sizes) -> ``[chunk, num_chunks]``, padded with ``fill``."""
        parts = []
        for x, chunks in zip(arrays, self.chunks):
            flat = jnp.ravel(x)
            padding = jnp.full(int(chunks) * self.chunk - flat.size, fill, flat.dtype)
            parts.append(jnp.concatenate([flat, padding]).reshape(-1, self.chunk).T)
        return jnp.concatenate(parts, axis=1)

    def unpack(self, packed: Array, shapes: Sequence[Sequence[int]]) -> list[Array]:
        """Inverse of :meth:`pack`: one array per segment, in the given shapes."""
        return [
            packed[:, first : first + chunks].T.reshape(-1)[:n].reshape(shape)
            for first, chunks, n, shape in zip(self.first_chunk, self.chunks, self.sizes, shapes)
        ]

    def in_use(self) -> Array:
        """Bool ``[chunk, num_chunks]``: True on real entries, False on padding."""
        return jnp.arange(self.chunk, dtype=jnp.int32)[:, None] < self.chunk_length[None, :]

    def per_chunk(self, values: Array) -> Array:
        """``[num]`` values per segment -> ``[num_chunks]``, each chunk its segment's."""
        return jnp.asarray(values)[self.chunk_segment]

    def count_per_chunk(self, flags: Array) -> Array:
        """Int32 ``[columns]``: the set flags down each column of a packed bool array.

        Summed in blocks of 16 rows into uint8 first, then over the blocks: exact (a
        block counts at most 16, a column at most 2**14), and on XLA:CPU 2-3x faster
        than one int16 reduction down the column for a million keys and more.
        """
        block = math.gcd(16, self.chunk)
        blocks = flags.reshape(self.chunk // block, block, flags.shape[1])
        per_block = jnp.sum(blocks, axis=1, dtype=jnp.uint8)
        return jnp.sum(per_block, axis=0, dtype=jnp.int16).astype(jnp.int32)

    def totals(self, chunk_values: Array) -> Array:
        """``[num_chunks]`` partial sums -> ``[num]`` sums per segment."""
        return jax.ops.segment_sum(
            chunk_values, self.chunk_segment, self.num, indices_are_sorted=True
        )

    def first_in_order(self, flags: Array, counts: Array) -> Array:
        """The first ``counts`` set flags of every segment in flat order (all if fewer).

        Only one chunk per segment needs a running count: the chunks before it give
        all their flags, the chunks after it none.
        """
        per_chunk = self.count_per_chunk(flags)
        through = jnp.cumsum(per_chunk, dtype=jnp.int32)
        before = through - per_chunk - (through - per_chunk)[self.first_chunk][self.chunk_segment]
        whole = before + per_chunk <= self.per_chunk(counts)  # a prefix of each segment
        cut = jnp.minimum(self.first_chunk + self.totals(whole.astype(jnp.int32)), self.last_chunk)
        ranks = jnp.cumsum(flags[:, cut], axis=0, dtype=jnp.int32)  # [chunk, num]
        in_cut = ranks <= (counts - before[cut])[None, :]
        is_cut = jnp.arange(self.num_chunks) == self.per_chunk(cut)
        return flags & (whole[None, :] | (is_cut[None, :] & in_cut[:, self.chunk_segment]))


@functools.partial(jax.jit, static_argnames='segments')
def kth_smallest_keys(
    keys: Array, k: Array | int, segments: Segments, valid: Array | None = None
) -> Array:
    """The k-th smallest (1-based) of every segment's ``keys[valid]``: ``[num]`` uint32.

    ONE loop of 32 counting passes serves all segments: bit by bit from the top, a
    segment's bit stays 0 when at least k of its keys lie at or below the prefix with
    all lower bits set (counted per chunk, summed per segment). ``keys`` is packed;
    ``k`` (one per segment, or one for all) may be traced. A candidate never has all
    bits set, so MAX_KEY entries (padding, and ``~valid`` ones) are never counted.
    """
    if valid is not None:
        keys = jnp.where(valid, keys, jnp.uint32(MAX_KEY))
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (segments.num,))

    def set_bit(i, prefix):
        bit = jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        candidate = segments.per_chunk(prefix | (bit - jnp.uint32(1)))
        enough = segments.totals(segments.count_per_chunk(keys <= candidate[None, :])) >= k
        return jnp.where(enough, prefix, prefix | bit)

    return jax.lax.fori_loop(0, 32, set_bit, jnp.zeros(segments.num, jnp.uint32))


@functools.partial(jax.jit, static_argnames='segments')
def select_smallest_keys(
    keys: Array, counts: Array | int, segments: Segments, valid: Array | None = None
) -> Array:
    """Packed bool: per segment exactly ``counts`` entries of ``keys[valid]`` with the
    smallest keys; ties broken by the lower flat index. One search for all segments."""
    counts = jnp.broadcast_to(jnp.asarray(counts, jnp.int32), (segments.num,))
    usable = segments.in_use() if valid is None else valid & segments.in_use()
    thr = segments.per_chunk(kth_smallest_keys(keys, counts, segments, usable))[None, :]
    below = (keys < thr) & usable
    needed = counts - segments.totals(segments.count_per_chunk(below))
    return below | segments.first_in_order((keys == thr) & usable, needed)


def kth_smallest_key(keys: Array, k: Array | int, valid: Array | None = None) -> Array:
    """The k-th smallest (1-based) of 1-D ``keys[valid]`` (32 counting passes, no sort)."""
    segments = Segments([keys.size])
    packed_valid = None if valid is None else segments.pack([valid], False)
    return kth_smallest_keys(segments.pack([keys], MAX_KEY), k, segments, packed_valid)[0]


def select_smallest(keys: Array, count: Array | int, valid: Array | None = None) -> Array:
    """Bool mask of exactly ``count`` entries of 1-D ``keys[valid]`` with the smallest keys.

    Ties are broken by the lower flat index.
    """
    return select_smallest_in_layers({'': keys}, {'': count}, {'': valid})['']


def select_smallest_in_layers(
    keys: Mapping[str, Array],
    counts: Mapping[str, Array | int],
    valid: Mapping[str, Array | None] | None = None,
) -> FlatTree:
    """Per layer, bool masks of the ``counts[p]`` smallest of ``keys[p][valid[p]]`` (ties:
    the lower flat index first), all layers in one search."""
    paths = list(keys)
    if not paths:
        return {}
    segments = Segments([keys[p].size for p in paths])
    packed_valid = None
    if valid is not None and any(valid.get(p) is not None for p in paths):
        packed_valid = segments.pack(
            [jnp.ones(keys[p].shape, bool) if valid.get(p) is None else valid[p] for p in paths],
            False,
        )
    picked = select_smallest_keys(
        segments.pack([keys[p] for p in paths], MAX_KEY),
        jnp.stack([jnp.asarray(counts[p], jnp.int32) for p in paths]),
        segments,
        packed_valid,
    )
    return dict(zip(paths, segments.unpack(picked, [keys[p].shape for p in paths])))


# ----------------------------------------------------------------------------
# Initialisation.
# ----------------------------------------------------------------------------
def magnitude_mask(kernel: Array, k: int) -> Array:
    """Keep all but the k smallest |w| (ties: the lower flat index is pruned first)."""
    return magnitude_masks({'': kernel}, {'': k})['']


def magnitude_masks(kernels: Mapping[str, Array], counts: Mapping[str, int]) -> FlatTree:
    """The magnitude-pruning masks at the given per-layer counts."""
    keys = {p: sortable_key(jnp.abs(w)) for p, w in kernels.items()}
    return {p: ~pruned for p, pruned in select_smallest_in_layers(keys, counts).items()}


def random_masks(rng: Array, kernels: Mapping[str, Array], counts: Mapping[str, int]) -> FlatTree:
    """Uniformly random masks with exactly the given per-layer counts."""
    rngs = jax.random.split(rng, len(kernels))
    keys = {
        p: sortable_key(jax.random.uniform(r, (w.size,))).reshape(w.shape)
        for r, (p, w) in zip(rngs, sorted(kernels.items()))
    }
    pruned = select_smallest_in_layers(keys, counts)
    return {p: ~pruned[p] for p in sorted(kernels)}


def init_scores(masks: Mapping[str, Array], pruned_score: float = 0.99) -> FlatTree:
    """Magnitude score init: 1.0 where the mask keeps, ``pruned_score`` where it prunes.

    The first mask of the search is then the magnitude mask itself.
    """
    return {p: jnp.where(m, jnp.float32(1.0), jnp.float32(pruned_score)) for p, m in masks.items()}


def ranked_scores(
    masks: Mapping[str, Array],
    criterion: Mapping[str, Array],
    pruned_score: float = 0.99,
    spread: float = 0.01,
) -> FlatTree:
    """First scores that keep ``masks`` and order each layer's kept weights, and its pruned
    ones, by ``criterion`` (higher = more important, e.g. Wanda's |w| * ||X_j||).

    A kept weight of rank q in [0, 1) among its layer's kept weights scores 1 + spread * q;
    a pruned one, pruned_score - spread * (1 - q) among the pruned. Under
    :func:`init_scores` every kept weight starts at 1.0, so the first drops are whichever
    weights the gradient pushes down 1 - pruned_score, often the criterion's best; here the
    best have ``spread`` more to lose. Every kept score stays above every pruned one, so the
    first masks are ``masks``.
    """
    if spread <= 0 or pruned_score - spread >= 1.0:
        raise ValueError(f'spread={spread!r} must be > 0 (pruned_score={pruned_score!r} < 1)')
    out = {}
    for path, mask in masks.items():
        mask = jnp.asarray(mask, bool).reshape(-1)
        order = jnp.argsort(jnp.asarray(criterion[path], jnp.float32).reshape(-1), stable=True)
        kept_sorted = mask[order]
        kept_rank = jnp.cumsum(kept_sorted) - 1  # rank among the kept, in sorted order
        pruned_rank = jnp.cumsum(~kept_sorted) - 1
        kept_n, pruned_n = jnp.maximum(jnp.sum(mask), 1), jnp.maximum(jnp.sum(~mask), 1)
        sorted_scores = jnp.where(
            kept_sorted,
            1.0 + spread * kept_rank / kept_n,
            pruned_score - spread * (1.0 - pruned_rank / pruned_n),
        )
        scores = jnp.zeros(mask.shape, jnp.float32).at[order].set(sorted_scores)
        out[path] = scores.reshape(jnp.shape(masks[path]))
    return out


def scaled_scores(masks: Mapping[str, Array], criterion: Mapping[str, Array]) -> FlatTree:
    """First scores proportional to ``criterion`` (>= 0, e.g. |w| or Wanda's |w| * ||X_j||):
    each output column's values (the kernel's last axis) divided by the midpoint between
    its smallest kept and largest pruned value (the layer's, for a column with none of one).

    Kept weights then score above 1 and pruned ones below wherever the masks separate
    the criterion within a column (row-wise masks like Wanda's included), so the first
    masks are ``masks``; and a weight's score is its criterion in units of its column's
    boundary, so a gradient step moves each weight by a fraction of its own importance:
    the criterion's outliers (an LLM's largest weights) are never the first to go.
    """
    out = {}
    for path, mask in masks.items():
        mask = jnp.asarray(mask, bool)
        c = jnp.asarray(criterion[path], jnp.float32)
        lowest_kept = jnp.min(jnp.where(mask, c, jnp.inf), axis=tuple(range(c.ndim - 1)))
        highest_pruned = jnp.max(jnp.where(mask, -jnp.inf, c), axis=tuple(range(c.ndim - 1)))
        layer = (jnp.min(jnp.where(mask, c, jnp.inf)) + jnp.max(jnp.where(mask, -jnp.inf, c))) / 2
        both = jnp.isfinite(lowest_kept) & jnp.isfinite(highest_pruned)
        boundary = jnp.where(both, (lowest_kept + highest_pruned) / 2, layer)
        if not bool(jnp.all(jnp.isfinite(boundary) & (boundary > 0))):
            raise ValueError(
                f'scaled_scores: the criterion of {path!r} has no positive boundary between '
                'its kept and pruned weights; pass a criterion >= 0 that keeps what the masks keep'
            )
        out[path] = c / boundary
    return out


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
        return edge_popup_masks(scores, counts)
    if mode != 'short_restriction':
        raise ValueError(f'unknown mask update {mode!r}; choose one of {MASK_UPDATES}')
    keys = {p: sortable_key(s) for p, s in scores.items()}
    return {p: ~pruned for p, pruned in select_smallest_in_layers(keys, counts).items()}


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
    if schedule == 'constant':
        return jnp.float32(1.0)
    if schedule == 'poly4':
        return (1.0 - e) ** 4
    if schedule == 'cosine':
        return 0.5 * (1.0 + jnp.cos(jnp.pi * e))
    raise ValueError(f'unknown rate schedule {schedule!r}; choose one of {RATE_SCHEDULES}')


def with_swap_margin(
    scores: Mapping[str, Array], masks: Mapping[str, Array], margin: float
) -> FlatTree:
    """The scores the mask update ranks by: ``s + margin`` where the mask keeps, ``s`` elsewhere.

    A hysteresis on the threshold: a pruned weight displaces a kept one only when its
    score beats the kept one's by more than ``margin``, so near-tied weights stop trading
    places step after step. Ranking these scores keeps every count exact (it is still a
    k-th selection); ``margin = 0`` is the short restriction itself. The scores the
    optimizer learns are not changed.
    """
    return {p: scores[p] + jnp.where(masks[p], jnp.float32(margin), 0) for p in scores}


def _active(counts: Mapping[str, Array | int], paths) -> list[str]:
    """The paths whose pruned count is not a static 0 (those layers are left alone)."""
    return [p for p in paths if not (isinstance(counts[p], (int, np.integer)) and counts[p] == 0)]


@functools.partial(jax.jit, static_argnames='segments')
def restricted_update(
    keys: Array,
    kept: Array,
    t: Array,
    k: Array,
    rate: Array | float,
    segments: Segments,
) -> Array:
    """Steps 3-5 of docs/method.md §4 on packed keys, given every segment's threshold key t.

    R = pruned with key > t, D = kept with key <= t; a segment changes only if
    |R| = |D| > 0 and k > 0. Then the p = ceil(|R| rate) best of R are revived and the
    p worst of D dropped (ties: lower index first): both selections, in every segment,
    are ONE search over the revival and drop problems packed side by side.
    (Rate 1 needs no selection: :func:`short_restriction_updates` does it per layer.)
    """
    usable = segments.in_use()
    above = keys > segments.per_chunk(t)[None, :]
    revive_candidates = ~kept & above & usable
    drop_candidates = kept & ~above & usable
    num_revive = segments.totals(segments.count_per_chunk(revive_candidates))
    num_drop = segments.totals(segments.count_per_chunk(drop_candidates))
    gate = (num_revive > 0) & (num_drop > 0) & (num_revive == num_drop) & (k > 0)
    rate = jnp.asarray(rate, jnp.float32)
    p = jnp.clip(jnp.ceil(num_revive.astype(jnp.float32) * rate).astype(jnp.int32), 1, num_revive)
    picked = select_smallest_keys(
        jnp.concatenate([~keys, keys], axis=1),  # ~keys: highest scores first
        jnp.concatenate([p, p]),
        segments.repeated(2),
        jnp.concatenate([revive_candidates, drop_candidates], axis=1),
    )
    revive, drop = picked[:, : segments.num_chunks], picked[:, segments.num_chunks :]
    return jnp.where(segments.per_chunk(gate)[None, :], (kept & ~drop) | revive, kept)


def short_restriction_updates(
    scores: Mapping[str, Array],
    masks: Mapping[str, Array],
    counts: Mapping[str, Array | int],
    rate: Array | float | None = None,
) -> FlatTree:
    """One short-restriction step (docs/method.md §4) for every layer, in one search.

    Per layer, t is the k-th smallest score; revival candidates R = pruned with s > t,
    drop candidates D = kept with s <= t. Nothing changes unless |R| = |D| > 0. Then the
    ceil(|R| rate) best of R are revived and as many worst of D dropped (ties: lower
    index first). ``rate=None`` means rate 1 on a fast path: the whole update is one
    32-pass loop; a rate < 1 adds one more for the selections. A layer with k = 0 is
    left unchanged; every mask keeps exactly n - k weights afterwards whenever it did
    before. Counts may be traced.
    """
    paths = _active(counts, masks)
    new = dict(masks)
    if not paths:
        return new
    segments = Segments([masks[p].size for p in paths])
    layer_keys = [sortable_key(scores[p]) for p in paths]
    keys = segments.pack(layer_keys, MAX_KEY)
    k = jnp.stack([jnp.asarray(counts[p], jnp.int32) for p in paths])
    t = kth_smallest_keys(keys, k, segments)
    if rate is None:
        # Rate 1: every candidate swaps, so a layer's mask becomes simply key > t. One
        # elementwise pass per layer; no packed masks (packing costs copies on a CPU).
        for j, p in enumerate(paths):
            above = layer_keys[j] > t[j]
            at_or_below = masks[p].size - jnp.sum(above, dtype=jnp.int32)
            new[p] = jnp.where((at_or_below == k[j]) & (k[j] > 0), above, masks[p])
        return new
    kept = segments.pack([masks[p] for p in paths], False)
    updated = restricted_update(keys, kept, t, k, rate, segments)
    new.update(zip(paths, segments.unpack(updated, [masks[p].shape for p in paths])))
    return new


def short_restriction_update(
    scores: Array, mask: Array, k: Array | int, rate: Array | float | None = None
) -> Array:
    """:func:`short_restriction_updates` for a single layer."""
    return short_restriction_updates({'': scores}, {'': mask}, {'': k}, rate)['']


def edge_popup_masks(scores: Mapping[str, Array], counts: Mapping[str, Array | int]) -> FlatTree:
    """The 2021 rule for every layer in one search: keep the top n - k of |s| (ties: lower
    index kept); a layer with k = 0 keeps everything."""
    paths = _active(counts, scores)
    keys = {p: ~sortable_key(jnp.abs(scores[p])) for p in paths}
    kept = select_smallest_in_layers(keys, {p: scores[p].size - counts[p] for p in paths})
    return {p: kept[p] if p in kept else jnp.ones(s.shape, bool) for p, s in scores.items()}


def edge_popup_mask(scores: Array, k: Array | int) -> Array:
    """:func:`edge_popup_masks` for a single layer."""
    return edge_popup_masks({'': scores}, {'': k})['']


def update_masks(
    scores: Mapping[str, Array],
    masks: Mapping[str, Array],
    counts: Mapping[str, Array | int],
    *,
    mode: str = 'short_restriction',
    rate: Array | float | None = None,
) -> tuple[FlatTree, FlatTree]:
    """Apply the mask update to every layer at once; returns (new masks, changes per layer).

    A change is one weight whose kept/pruned state flipped.
    """
    if mode == 'short_restriction':
        new = short_restriction_updates(scores, masks, counts, rate)
    elif mode == 'edge_popup':
        new = edge_popup_masks({p: scores[p] for p in masks}, counts)
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
