"""The all-layer mask update equals the per-layer one, mask for mask.

``benchmarks/per_layer_reference.py`` holds the per-layer update the library ran
before (one bisection loop per layer; per-layer argsorts for N:M groups), which the
search-step benchmark also times. Here both run on
hundreds of random multi-layer cases: ties, -0.0 / +0.0, infinities, layers of one
weight, k = 0, k = n, partial rates, chained updates, both mask rules. Counts are
passed traced so that each layout compiles once.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import per_layer_reference as ref
from jackpot_jax.core import sparsity as sp, structured as st

# Layouts (layer shapes) with degenerate members: one weight, a layer larger than one
# chunk of the packed layout, conv and dense kernels.
LAYOUTS = [
    {'a': (1,), 'b': (5,), 'c': (3, 4)},
    {'conv': (3, 3, 2, 4), 'one': (1, 1), 'dense': (40,), 'x': (7,)},
    {'big': (9, 31), 'small': (2,)},
]
RATES = (None, 1.0, 0.7, 0.3, 0.05)
VALUES = np.float32([-1.0, -0.0, 0.0, 0.5, 0.99, 1.0, 2.0, np.inf, -np.inf])


def _scores(rng, shape):
    """Heavily tied, smooth, or mixed float32 scores."""
    tied = rng.choice(VALUES, shape)
    smooth = rng.standard_normal(shape).astype(np.float32)
    return [tied, smooth, np.where(rng.random(shape) < 0.5, tied, smooth)][rng.integers(3)]


def _count(rng, n):
    """k in 0..n, the ends often."""
    return int(rng.choice([0, 1, n - 1, n, rng.integers(0, n + 1)]).clip(0, n))


def _mask(rng, shape, k):
    flat = np.ones(math.prod(shape), bool)
    flat[rng.permutation(flat.size)[:k]] = False
    return flat.reshape(shape)


def _compiled(layout):
    """(new, reference) jitted for one layout, counts and rate traced."""

    def new(s, m, c, r, mode):
        return sp.update_masks(s, m, c, mode=mode, rate=r)[0]

    def old(s, m, c, r, mode):
        return ref.update_masks(s, m, c, mode=mode, rate=r)[0]

    def jit(fn, with_rate, mode):
        if with_rate:
            return jax.jit(lambda s, m, c, r: fn(s, m, c, r, mode))
        return jax.jit(lambda s, m, c: fn(s, m, c, None, mode))

    return {
        (mode, with_rate): (jit(new, with_rate, mode), jit(old, with_rate, mode))
        for mode, with_rate in (('short_restriction', False), ('short_restriction', True),
                                ('edge_popup', False))
    }  # fmt: skip


def _as_jax(tree, dtype=None):
    return {p: jnp.asarray(v, dtype) for p, v in tree.items()}


def _assert_same(got, want, info):
    for p in want:
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p]), err_msg=f'{p} {info}')


def test_all_layer_update_equals_per_layer_on_random_cases():
    """300 random cases over three layouts, both rules, every rate."""
    rng = np.random.default_rng(0)
    fns = [_compiled(layout) for layout in LAYOUTS]
    changed = 0
    for case in range(300):
        i = case % len(LAYOUTS)
        layout = LAYOUTS[i]
        counts = {p: _count(rng, math.prod(s)) for p, s in layout.items()}
        scores = _as_jax({p: _scores(rng, s) for p, s in layout.items()}, jnp.float32)
        masks = _as_jax({p: _mask(rng, s, counts[p]) for p, s in layout.items()})
        traced = _as_jax(counts, jnp.int32)
        mode = 'edge_popup' if case % 5 == 4 else 'short_restriction'
        rate = None if mode == 'edge_popup' else RATES[rng.integers(len(RATES))]
        new, old = fns[i][(mode, rate is not None)]
        args = (scores, masks, traced) + (() if rate is None else (jnp.float32(rate),))
        got, want = new(*args), old(*args)
        _assert_same(got, want, f'case {case} {mode} rate={rate} counts={counts}')
        changed += sum(int(np.any(np.asarray(got[p]) != np.asarray(masks[p]))) for p in layout)
    assert changed > 150  # the updates really move the masks


def test_static_counts_and_single_layer_wrappers_equal_reference():
    """The library's own call (static counts, k = 0 layers skipped) and the one-layer
    functions give the reference's masks."""
    rng = np.random.default_rng(1)
    layout = LAYOUTS[1]
    counts = {'conv': 30, 'one': 0, 'dense': 40, 'x': 3}
    scores = _as_jax({p: _scores(rng, s) for p, s in layout.items()}, jnp.float32)
    masks = _as_jax({p: _mask(rng, s, counts[p]) for p, s in layout.items()})
    reference = jax.jit(ref.update_masks, static_argnames='mode')  # counts traced there
    for rate in (None, 0.5):
        got, changes = sp.update_masks(scores, masks, counts, rate=rate)
        want, want_changes = reference(scores, masks, counts, rate=rate)
        _assert_same(got, want, f'rate={rate}')
        assert {p: int(c) for p, c in changes.items()} == {
            p: int(c) for p, c in want_changes.items()
        }
        for p in layout:
            one = sp.short_restriction_update(scores[p], masks[p], counts[p], rate)
            np.testing.assert_array_equal(np.asarray(one), np.asarray(want[p]))
    got, _ = sp.update_masks(scores, masks, counts, mode='edge_popup')
    _assert_same(got, reference(scores, masks, counts, mode='edge_popup')[0], 'popup')


def test_chained_all_layer_updates_track_the_reference():
    """60 chained steps (noise, rounding to create ties, mixed rates): the two paths
    never diverge, and every layer keeps exactly n - k."""
    rng = np.random.default_rng(2)
    layout = LAYOUTS[0]
    counts = {'a': 0, 'b': 2, 'c': 6}
    new_fn = jax.jit(lambda s, m, r: sp.update_masks(s, m, counts, rate=r)[0])
    old_fn = jax.jit(lambda s, m, r: ref.update_masks(s, m, counts, rate=r)[0])
    scores = {p: rng.standard_normal(s).astype(np.float32) for p, s in layout.items()}
    masks = _as_jax({p: _mask(rng, s, counts[p]) for p, s in layout.items()})
    moves = 0
    for step in range(60):
        scores = {p: v + 0.3 * rng.standard_normal(v.shape).astype(np.float32) for p, v in scores.items()}
        if step % 7 == 0:
            scores = {p: np.round(v) for p, v in scores.items()}
        rate = jnp.float32([1.0, 0.7, 0.3][step % 3])
        got = new_fn(_as_jax(scores, jnp.float32), masks, rate)
        _assert_same(got, old_fn(_as_jax(scores, jnp.float32), masks, rate), f'step {step}')
        for p, s in layout.items():
            assert int(np.sum(got[p])) == math.prod(s) - counts[p]
            moves += int(np.sum(np.asarray(got[p]) != np.asarray(masks[p])))
        masks = got
    assert moves > 20


@pytest.mark.parametrize('chunk', [8, 24, 64, 2048])
def test_counts_per_chunk_are_exact(chunk):
    """Counted in uint8 blocks, then summed: equal to a plain count, full columns too."""
    rng = np.random.default_rng(chunk)
    segments = sp.Segments([3 * chunk + 5, chunk], chunk)
    flags = rng.random((chunk, 2 * segments.num_chunks)) < 0.6  # a repeated(2) layout
    flags[:, 0] = True
    got = segments.count_per_chunk(jnp.asarray(flags))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), flags.sum(axis=0))


@pytest.mark.parametrize('chunk', [8, 32])  # one block per column; two blocks of 16
def test_select_and_kth_over_segments_equal_per_layer(chunk):
    """The segment searches themselves, with valid masks and counts past the valid size."""
    rng = np.random.default_rng(3)
    sizes = [1, 6, 13, 40, 3]
    segments = sp.Segments(sizes, chunk=chunk)  # several chunks per segment at 8
    select = jax.jit(lambda k, c, v: sp.select_smallest_keys(k, c, segments, v))
    kth = jax.jit(lambda k, c, v: sp.kth_smallest_keys(k, c, segments, v))
    ref_select, ref_kth = jax.jit(ref.select_smallest), jax.jit(ref.kth_smallest_key)
    for _ in range(20):
        keys = [jnp.asarray(rng.integers(0, 6, n).astype(np.uint32)) for n in sizes]
        valid = [jnp.asarray(rng.random(n) < 0.7) for n in sizes]
        counts = [int(rng.integers(0, n + 2)) for n in sizes]
        packed_keys = segments.pack(keys, sp.MAX_KEY)
        packed_valid = segments.pack(valid, False)
        c = jnp.asarray(counts, jnp.int32)
        picked = segments.unpack(select(packed_keys, c, packed_valid), [(n,) for n in sizes])
        thresholds = kth(packed_keys, c, packed_valid)
        for i, n in enumerate(sizes):
            want = ref_select(keys[i], counts[i], valid[i])
            np.testing.assert_array_equal(np.asarray(picked[i]), np.asarray(want))
            assert int(thresholds[i]) == int(ref_kth(keys[i], counts[i], valid[i]))


@pytest.mark.parametrize('n, m', [(2, 4), (1, 4), (3, 8)])
def test_n_m_all_layer_update_equals_per_layer(n, m):
    """N:M: every group of every layer at once == the per-layer argsort reference,
    ineligible (dense) layers included, over chained steps and every rate."""
    rng = np.random.default_rng(4 + m + n)
    layout = {'conv': (3, 3, m, 2), 'dense': (2 * m, 3), 'stem': (3, 3, 3, 2)}
    counts = st.nm_counts(layout, n, m)
    assert counts['stem'] == 0  # 3 input channels: stays dense
    masks = {p: st.magnitude_masks({p: jnp.asarray(_scores(rng, s))}, counts, n, m)[p]
             for p, s in layout.items()}  # fmt: skip
    fns = {
        rate is None: (
            jax.jit(lambda s, b, r: st.update_masks(s, b, counts, n, m, rate=r)[0]),
            jax.jit(lambda s, b, r: ref.nm_update_masks(s, b, counts, n, m, mode='sr', rate=r)[0]),
        )
        for rate in (None, 0.5)
    }
    for step in range(40):
        scores = _as_jax({p: _scores(rng, s) for p, s in layout.items()}, jnp.float32)
        rate = RATES[step % len(RATES)]
        new, old = fns[rate is None]
        r = None if rate is None else jnp.float32(rate)
        got = new(scores, masks, r)
        _assert_same(got, old(scores, masks, r), f'{n}:{m} step {step} rate={rate}')
        popup = st.update_masks(scores, masks, counts, n, m, mode='edge_popup')[0]
        _assert_same(popup, ref.nm_update_masks(scores, masks, counts, n, m, mode='edge_popup')[0], 'popup')
        masks = got
