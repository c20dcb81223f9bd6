"""Tests for jackpot_jax.core.sparsity (docs/method.md §2-4).

Golden values are computed by hand and written literally; the random tests compare
against a sort-based numpy reference written straight from docs/method.md.
"""

import math
import re
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jackpot_jax.core import sparsity as sp

T, F = True, False

# Jitted once at module level so that cases with the same shapes share a compilation.
update_jit = jax.jit(sp.short_restriction_update, static_argnums=(2,))
select_jit = jax.jit(sp.select_smallest)
kth_jit = jax.jit(sp.kth_smallest_key)


def _np(x):
    return np.asarray(x)


def _update(scores, mask, k, rate=None):
    """Run the jitted update on numpy inputs; rate is passed traced (float32)."""
    rate = None if rate is None else jnp.float32(rate)
    return _np(update_jit(jnp.asarray(scores, jnp.float32), jnp.asarray(mask, bool), k, rate))


# ----------------------------------------------------------------------------
# 1. prunable_paths
# ----------------------------------------------------------------------------
def _toy_params():
    z = np.zeros
    return {
        'conv1': {'kernel': z((3, 3, 1, 2))},
        'bn1': {'scale': z((2,)), 'bias': z((2,))},
        'layer1_0': {
            'conv1': {'kernel': z((3, 3, 2, 2))},
            'bn1': {'scale': z((2,)), 'bias': z((2,))},
        },
        'dense': {'kernel': z((8, 4)), 'bias': z((4,))},
        'fcx': {'kernel': z((4, 4))},  # not the classifier: only ^fc/ and ^classifier/ are.
        'odd': {'kernel': z((5,))},  # rank 1: never prunable.
        'fc': {'kernel': z((4, 10)), 'bias': z((10,))},
        'classifier': {'kernel': z((1, 1, 4, 10)), 'bias': z((10,))},
    }


def test_prunable_paths_default_picks_conv_and_dense_kernels_only():
    """Default: every rank>=2 kernel except fc/classifier; no biases, no BN."""
    assert sp.prunable_paths(_toy_params()) == (
        'conv1/kernel',
        'dense/kernel',
        'fcx/kernel',
        'layer1_0/conv1/kernel',
    )


def test_prunable_paths_custom_regexes():
    """include / exclude are regexes over '/'-joined paths; exclude=None drops the filter."""
    params = _toy_params()
    assert sp.prunable_paths(params, include=r'conv1/kernel$', exclude=r'^layer') == (
        'conv1/kernel',
    )
    assert sp.prunable_paths(params, include=r'^(fc|classifier)/kernel$', exclude=None) == (
        'classifier/kernel',
        'fc/kernel',
    )
    assert 'fc/kernel' in sp.prunable_paths(params, exclude=None)
    # A custom exclude replaces the default one, so the classifier is back in.
    assert sp.prunable_paths(params, exclude=r'conv') == (
        'classifier/kernel',
        'dense/kernel',
        'fc/kernel',
        'fcx/kernel',
    )


def test_prunable_paths_nothing_matches_raises():
    """An empty selection is an error that names the regexes."""
    with pytest.raises(ValueError, match=r"no prunable kernels match include='nomatch'"):
        sp.prunable_paths(_toy_params(), include='nomatch')
    with pytest.raises(ValueError, match='no prunable kernels'):
        sp.prunable_paths({'bn': {'scale': np.zeros(3)}, 'b': {'kernel': np.zeros(4)}})


# ----------------------------------------------------------------------------
# 2. Allocations
# ----------------------------------------------------------------------------
_GM_KERNELS = {
    'a': np.array([[0.5, -0.1], [0.3, 0.2]], np.float32),
    'b': np.array([[0.4, -0.3, 0.05], [0.6, 0.3, -0.9]], np.float32),
}


def test_global_magnitude_allocation_tie_at_threshold_is_kept():
    """N=10, keep 5: thr = 0.3 (5th largest), three |w| == 0.3 all kept (strict <)."""
    counts = sp.global_magnitude_allocation(_GM_KERNELS, 0.5)
    assert counts == {'a': 2, 'b': 1}  # a: 0.1, 0.2; b: 0.05.


def test_global_magnitude_allocation_no_tie():
    """keep 4: thr = 0.4; sparsity 0 prunes nothing."""
    assert sp.global_magnitude_allocation(_GM_KERNELS, 0.6) == {'a': 3, 'b': 3}
    assert sp.global_magnitude_allocation(_GM_KERNELS, 0.0) == {'a': 0, 'b': 0}
    assert sp.pruned_counts(_GM_KERNELS, 0.6) == {'a': 3, 'b': 3}  # default allocation.


def test_global_magnitude_allocation_exact_keep():
    """N=100 at 0.9 keeps exactly 10 (int(100 * (1 - 0.9)) would be 9)."""
    w = np.arange(1, 101, dtype=np.float32)
    kernels = {'a': w[:40].reshape(10, 4), 'b': -w[40:].reshape(6, 10)}
    assert sp.global_magnitude_allocation(kernels, 0.9) == {'a': 40, 'b': 50}
    assert sp.kept_total(100, 0.9) == 10


def test_global_magnitude_allocation_keeping_nothing_raises():
    with pytest.raises(ValueError, match='keeps no weight'):
        sp.global_magnitude_allocation({'a': np.ones((2, 2))}, 0.9)


def test_uniform_allocation_exact():
    """k_l = floor(s * n_l) in exact decimal arithmetic."""
    shapes = {'a': (3, 3, 4, 8), 'b': (10, 10), 'c': (7,)}
    assert sp.uniform_allocation(shapes, 0.9) == {'a': 259, 'b': 90, 'c': 6}
    # 0.7 * 90 = 62.99999999999999 in floats; the exact answer is 63.
    assert sp.uniform_allocation({'d': (9, 10)}, 0.7) == {'d': 63}
    assert sp.uniform_allocation(shapes, 0.0) == {'a': 0, 'b': 0, 'c': 0}
    kernels = {'a': np.zeros((9, 10)), 'b': np.zeros((3, 4))}
    assert sp.pruned_counts(kernels, 0.7, 'uniform') == {'a': 63, 'b': 8}


def test_erk_allocation_caps_dense_and_rescales():
    """small (density 62/33 > 1) stays dense; the rest rescaled by 58/29 = 2."""
    shapes = {'small': (2, 2), 'mid': (4, 5), 'big': (10, 10)}  # n = 4, 20, 100; N = 124.
    counts = sp.erk_allocation(shapes, 0.5)  # keep 62 = 4 + 0.9*20 + 0.4*100.
    assert counts == {'small': 0, 'mid': 2, 'big': 60}
    assert sum(math.prod(s) - counts[p] for p, s in shapes.items()) == 62


def test_erk_allocation_largest_remainder():
    """keep 12, scale 12/33: kept 1.45, 3.27, 7.27 -> floors 1, 3, 7; +1 to small."""
    shapes = {'small': (2, 2), 'mid': (4, 5), 'big': (10, 10)}
    counts = sp.erk_allocation(shapes, 0.9)
    assert counts == {'small': 2, 'mid': 17, 'big': 93}
    assert sum(math.prod(s) - counts[p] for p, s in shapes.items()) == 12


def test_erk_allocation_exact_totals():
    """Total kept is exactly floor(N (1 - s)), also with float-unfriendly values."""
    assert sp.erk_allocation({'only': (10, 10)}, 0.9) == {'only': 90}
    shapes = {'a': (3, 3, 3, 16), 'b': (3, 3, 16, 32), 'c': (32, 10), 'd': (5, 7)}
    n = sum(math.prod(s) for s in shapes.values())
    for s in (0.0, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99):
        counts = sp.erk_allocation(shapes, s)
        kept = n - sum(counts.values())
        assert kept == math.floor(n * (1 - Fraction(str(s)))), s
        assert all(0 <= counts[p] <= math.prod(shapes[p]) for p in shapes)
    assert sp.erk_allocation(shapes, 0.0) == {'a': 0, 'b': 0, 'c': 0, 'd': 0}
    kernels = {'x': np.zeros((2, 2)), 'y': np.zeros((10, 10))}
    assert sp.pruned_counts(kernels, 0.5, 'erk') == {'x': 0, 'y': 52}


@pytest.mark.parametrize('bad', [-0.1, 1.0, 1.5])
def test_allocations_reject_sparsity_outside_unit_interval(bad):
    """sparsity must be in [0, 1); the error names the value."""
    kernels = {'a': np.ones((4, 4))}
    for allocation in sp.ALLOCATIONS:
        with pytest.raises(ValueError, match=re.escape(f'got {bad!r}')):
            sp.pruned_counts(kernels, bad, allocation)


def test_pruned_counts_unknown_allocation():
    with pytest.raises(ValueError, match="unknown allocation 'l2'"):
        sp.pruned_counts({'a': np.ones((4, 4))}, 0.5, 'l2')


# ----------------------------------------------------------------------------
# 3. Ranking helpers
# ----------------------------------------------------------------------------
def test_sortable_key_golden_bits():
    """IEEE bits: positives get the top bit set, negatives are inverted; -0.0 == +0.0."""
    x = jnp.array([0.0, -0.0, 1.0, -1.0, 2.0, -2.0], jnp.float32)
    expected = np.array(
        [0x80000000, 0x80000000, 0xBF800000, 0x407FFFFF, 0xC0000000, 0x3FFFFFFF], np.uint32
    )
    np.testing.assert_array_equal(_np(sp.sortable_key(x)), expected)


def test_sortable_key_preserves_order():
    """key order == float order on every pair (negatives, +-0, tiny, huge, inf)."""
    rng = np.random.default_rng(0)
    special = np.array(
        [
            0.0, -0.0, 1.1754944e-38, -1.1754944e-38, 1e-37, -1e-37, 3.4028235e38,
            -3.4028235e38, np.inf, -np.inf, 1.0, -1.0, 1.0000001, 0.99999994,
        ],
        np.float32,
    )  # fmt: skip
    rand = rng.standard_normal(150) * 10.0 ** rng.integers(-30, 30, 150)
    x = np.concatenate([special, rand.astype(np.float32), rand[:20].astype(np.float32)])
    keys = _np(sp.sortable_key(jnp.asarray(x))).astype(np.int64)
    cmp_keys = np.sign(keys[:, None] - keys[None, :])
    cmp_x = (x[:, None] > x[None, :]).astype(int) - (x[:, None] < x[None, :])
    np.testing.assert_array_equal(cmp_keys, cmp_x)
    order = np.argsort(keys, kind='stable')
    np.testing.assert_array_equal(x[order], np.sort(x))


def test_kth_smallest_key_with_and_without_valid():
    """kth (1-based) smallest equals numpy's sort, restricted to valid entries."""
    rng = np.random.default_rng(1)
    x = np.round(rng.standard_normal(64), 1).astype(np.float32)  # ties included.
    keys = sp.sortable_key(jnp.asarray(x))
    valid = rng.random(64) < 0.5
    sorted_all = np.sort(_np(keys))
    sorted_valid = np.sort(_np(keys)[valid])
    for k in (1, 2, 17, 40, 64):
        assert kth_jit(keys, jnp.int32(k)) == sorted_all[k - 1]
    for k in (1, 5, int(valid.sum())):
        assert kth_jit(keys, jnp.int32(k), jnp.asarray(valid)) == sorted_valid[k - 1]


def test_select_smallest_golden_ties_lower_index_first():
    """Exactly count picked; among equal keys the lower index goes first."""
    keys = jnp.array([3, 1, 2, 1, 3, 1], jnp.uint32)
    cases = {
        0: [F, F, F, F, F, F],
        1: [F, T, F, F, F, F],
        2: [F, T, F, T, F, F],
        4: [F, T, T, T, F, T],
        5: [T, T, T, T, F, T],
        6: [T, T, T, T, T, T],
    }
    for count, expected in cases.items():  # count traced: one compilation.
        np.testing.assert_array_equal(_np(select_jit(keys, jnp.int32(count))), expected)
    valid = jnp.array([T, F, T, T, T, T])
    cases_valid = {1: [F, F, F, T, F, F], 2: [F, F, F, T, F, T], 4: [T, F, T, T, F, T]}
    for count, expected in cases_valid.items():
        np.testing.assert_array_equal(_np(select_jit(keys, jnp.int32(count), valid)), expected)


def test_select_smallest_random_matches_stable_argsort():
    """Random float keys with ties: the pick is the first `count` of a stable argsort."""
    rng = np.random.default_rng(2)
    for _ in range(20):
        x = rng.choice(np.float32([-1.0, -0.0, 0.0, 0.5, 2.0, 3.0]), 24)
        count = int(rng.integers(0, 25))
        expected = np.zeros(24, bool)
        expected[np.argsort(x, kind='stable')[:count]] = True
        got = _np(select_jit(sp.sortable_key(jnp.asarray(x)), jnp.int32(count)))
        np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------
# 4. Magnitude masks and score init
# ----------------------------------------------------------------------------
_W_TIE = np.array([[0.3, -0.1, 0.2], [0.1, -0.5, -0.2]], np.float32)  # |w| ties at 0.1, 0.2.


def test_magnitude_mask_golden_with_ties():
    """Prune the k smallest |w|; the lower flat index of a tie is pruned first."""
    m = lambda k: _np(sp.magnitude_mask(jnp.asarray(_W_TIE), k))  # noqa: E731
    np.testing.assert_array_equal(m(0), [[T, T, T], [T, T, T]])
    np.testing.assert_array_equal(m(1), [[T, F, T], [T, T, T]])
    np.testing.assert_array_equal(m(2), [[T, F, T], [F, T, T]])
    np.testing.assert_array_equal(m(3), [[T, F, F], [F, T, T]])
    np.testing.assert_array_equal(m(4), [[T, F, F], [F, T, F]])
    np.testing.assert_array_equal(m(6), [[F, F, F], [F, F, F]])


def test_magnitude_masks_counts_and_init_scores():
    """Exact counts per layer; scores 1.0 kept / pruned_score pruned."""
    kernels = {'a': jnp.asarray(_W_TIE), 'b': jnp.arange(-12.0, 12.0).reshape(2, 3, 4)}
    counts = {'a': 3, 'b': 10}
    masks = sp.magnitude_masks(kernels, counts)
    assert {p: int(m.sum()) for p, m in masks.items()} == {'a': 3, 'b': 14}
    # |b| smallest: 0 (idx 12), 1 (11, 13), 2 (10, 14), ..., 5 (7, 17): ties lower first.
    expected_b = np.ones(24, bool)
    expected_b[[7, 8, 9, 10, 11, 12, 13, 14, 15, 16]] = False
    np.testing.assert_array_equal(_np(masks['b']).ravel(), expected_b)
    scores = sp.init_scores(masks)
    np.testing.assert_array_equal(
        _np(scores['a']), np.float32([[1.0, 0.99, 0.99], [0.99, 1.0, 1.0]])
    )
    assert scores['a'].dtype == jnp.float32
    scores95 = sp.init_scores(masks, pruned_score=0.95)
    np.testing.assert_array_equal(
        _np(scores95['a']), np.float32([[1.0, 0.95, 0.95], [0.95, 1.0, 1.0]])
    )


def test_initial_mask_is_the_magnitude_mask():
    """With init scores, both mask updates reproduce the magnitude mask unchanged."""
    kernels = {'a': jnp.asarray(_W_TIE), 'b': jnp.arange(-12.0, 12.0).reshape(2, 3, 4)}
    counts = {'a': 3, 'b': 10}
    masks = sp.magnitude_masks(kernels, counts)
    scores = sp.init_scores(masks)
    for mode in sp.MASK_UPDATES:
        new, changes = sp.update_masks(scores, masks, counts, mode=mode)
        for p in masks:
            np.testing.assert_array_equal(_np(new[p]), _np(masks[p]))
            assert int(changes[p]) == 0
    new, _ = sp.update_masks(scores, masks, counts, rate=0.5)
    for p in masks:
        np.testing.assert_array_equal(_np(new[p]), _np(masks[p]))


# ----------------------------------------------------------------------------
# 5. masked_params: forward value and straight-through gradient
# ----------------------------------------------------------------------------
_W = np.array([[0.5, -2.0], [1.5, 0.25]], np.float32)
_B = np.array([[T, F], [F, T]])
_C = np.array([[2.0, 3.0], [-1.0, 4.0]], np.float32)


def _tree(w):
    return {'layer': {'kernel': w, 'bias': np.float32([7.0, 8.0])}, 'fc': {'kernel': _C}}


def test_masked_params_forward_is_exactly_w_times_b():
    """Value is W * B bit for bit, whatever the scores (also large / odd ones)."""
    w = np.float32([[3.0, -1.7, 0.1, 2.0, 5.0, -3.3]])
    b = np.array([[T, F, T, T, T, F]])
    s = np.float32([[1.3000001, 0.99, 3e-8, 1e8, -5e8, 1.7]])
    expected = np.float32([[3.0, 0.0, 0.1, 2.0, 5.0, 0.0]])
    tree = {'l': {'kernel': w}}
    for scores in (None, {'l/kernel': jnp.asarray(s)}):
        out = sp.masked_params(tree, {'l/kernel': jnp.asarray(b)}, scores)
        np.testing.assert_array_equal(_np(out['l']['kernel']), expected)
        out = jax.jit(sp.masked_params)(tree, {'l/kernel': jnp.asarray(b)}, scores)
        np.testing.assert_array_equal(_np(out['l']['kernel']), expected)


def test_masked_params_leaves_other_leaves_untouched():
    scores = {'layer/kernel': jnp.float32([[1.0, 0.99], [0.99, 1.0]])}
    out = sp.masked_params(_tree(_W), {'layer/kernel': jnp.asarray(_B)}, scores)
    np.testing.assert_array_equal(_np(out['layer']['kernel']), [[0.5, 0.0], [0.0, 0.25]])
    np.testing.assert_array_equal(_np(out['layer']['bias']), [7.0, 8.0])
    np.testing.assert_array_equal(_np(out['fc']['kernel']), _C)
    assert set(out) == {'layer', 'fc'} and set(out['layer']) == {'kernel', 'bias'}


def test_masked_params_straight_through_gradient_golden():
    """L = sum(C * W_eff): dL/ds = C * W, at pruned positions too."""
    masks = {'layer/kernel': jnp.asarray(_B)}

    def loss(scores):
        eff = sp.masked_params(_tree(_W), masks, scores)['layer']['kernel']
        return jnp.sum(_C * eff)

    scores = {'layer/kernel': jnp.float32([[1.0, 0.99], [0.99, 1.0]])}
    grad = jax.grad(loss)(scores)['layer/kernel']
    np.testing.assert_array_equal(_np(grad), np.float32([[1.0, -6.0], [-1.5, 1.0]]))
    assert float(loss(scores)) == 2.0  # 2 * 0.5 + 4 * 0.25.


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, (2, 2), name='conv')(x)
        x = jnp.tanh(x).reshape(x.shape[0], -1)
        x = nn.Dense(4, name='dense')(x)
        return nn.Dense(2, name='fc')(jnp.tanh(x))


def test_masked_params_straight_through_through_flax_model():
    """Through Conv + Dense: dL/ds == dL/dW_eff * W everywhere; bias / fc get no scores."""
    model = _Tiny()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 4, 1)).astype(np.float32)
    shapes = {'conv': ((2, 2, 1, 3), (3,)), 'dense': ((48, 4), (4,)), 'fc': ((4, 2), (2,))}
    params = {  # hand-built instead of model.init (saves seconds of compilation).
        name: {
            'kernel': rng.standard_normal(k).astype(np.float32),
            'bias': rng.standard_normal(b).astype(np.float32),
        }
        for name, (k, b) in shapes.items()
    }
    paths = sp.prunable_paths(params)
    assert paths == ('conv/kernel', 'dense/kernel')
    flat = sp.flatten(params)
    kernels = {p: flat[p] for p in paths}
    counts = sp.pruned_counts(kernels, 0.5, 'uniform')
    masks = sp.magnitude_masks(kernels, counts)
    scores = sp.init_scores(masks)
    target = rng.standard_normal((2, 2)).astype(np.float32)

    def loss_of(p):
        return jnp.sum((model.apply({'params': p}, x) - target) ** 2)

    g_scores = jax.grad(lambda s: loss_of(sp.masked_params(params, masks, s)))(scores)
    g_eff = sp.flatten(jax.grad(loss_of)(sp.masked_params(params, masks)))
    for p in paths:
        expected = _np(g_eff[p]) * _np(flat[p])
        np.testing.assert_allclose(_np(g_scores[p]), expected, rtol=1e-5, atol=1e-7)
        pruned = ~_np(masks[p])
        # Pruned positions get gradient (zero only where dL/dW_eff itself is zero).
        assert np.count_nonzero(_np(g_scores[p])[pruned]) > pruned.sum() // 2
    eff = sp.flatten(sp.masked_params(params, masks, scores))
    for p, leaf in flat.items():
        if p in paths:
            np.testing.assert_array_equal(_np(eff[p]), _np(leaf) * _np(masks[p]))
        else:
            np.testing.assert_array_equal(_np(eff[p]), _np(leaf))


# ----------------------------------------------------------------------------
# 6. short_restriction_update: golden cases
# ----------------------------------------------------------------------------
# n=10, k=4. Pruned: 1, 3, 5, 7 (all above t); kept low: 0, 2, 4, 6 (t = 0.4).
_S10 = np.float32([0.2, 0.6, 0.1, 0.9, 0.4, 0.7, 0.3, 0.8, 0.95, 0.85])
_M10 = np.array([T, F, T, F, T, F, T, F, T, T])


def test_short_restriction_k_zero_changes_nothing():
    mask = np.array([T, F, T, T])
    scores = np.float32([0.1, 0.9, 0.2, 0.3])
    np.testing.assert_array_equal(_np(sp.short_restriction_update(scores, mask, 0)), mask)
    np.testing.assert_array_equal(_np(sp.short_restriction_update(scores, mask, 0, 0.5)), mask)


def test_short_restriction_plain_swap():
    """n=6, k=2, t=0.2: R={2}, D={0} -> swapped; a tiny rate still swaps p=1."""
    s = np.float32([0.1, 0.9, 0.95, 0.8, 0.7, 0.2])
    b = np.array([T, T, F, T, T, F])
    expected = [F, T, T, T, T, F]
    for rate in (None, 1.0, 0.5, 1e-6):
        np.testing.assert_array_equal(_update(s, b, 2, rate), expected)


def test_short_restriction_ties_straddling_threshold_change_nothing():
    """t = 0.5 with three 0.5s: |R| = 2 != |D| = 4 -> gate closed."""
    s = np.float32([0.3, 0.5, 0.5, 0.9, 0.8, 0.5])
    b = np.array([T, T, T, F, F, T])
    for rate in (None, 1.0, 0.5):
        np.testing.assert_array_equal(_update(s, b, 2, rate), b)


def test_short_restriction_empty_revival_set_changes_nothing():
    """|R| = 0: mask already the top-(n-k), or ties at t leave R empty with |D| = 1."""
    s = np.float32([0.1, 0.9, 0.2, 0.8, 0.7, 0.6])
    b = np.array([F, T, F, T, T, T])
    for rate in (None, 1.0, 0.3):
        np.testing.assert_array_equal(_update(s, b, 2, rate), b)
    s = np.float32([0.5, 0.5, 0.5, 0.9, 0.9, 0.9])
    b = np.array([F, F, T, T, T, T])
    for rate in (None, 1.0, 0.3):
        np.testing.assert_array_equal(_update(s, b, 2, rate), b)


def test_short_restriction_partial_rates():
    """c = 4 candidates: p = ceil(4 rate); best of R revived, worst of D dropped."""
    cases = {
        1.0: [F, T, F, T, F, T, F, T, T, T],  # all four swapped.
        0.99: [F, T, F, T, F, T, F, T, T, T],  # ceil(3.96) = 4.
        0.7: [F, F, F, T, T, T, F, T, T, T],  # p=3: revive 3, 7, 5; drop 2, 0, 6.
        0.5: [F, F, F, T, T, F, T, T, T, T],  # p=2: revive 3, 7; drop 2, 0.
        0.01: [T, F, F, T, T, F, T, F, T, T],  # p=1: revive 3; drop 2.
    }
    for rate, expected in cases.items():
        np.testing.assert_array_equal(_update(_S10, _M10, 4, rate), expected, err_msg=str(rate))
    np.testing.assert_array_equal(_update(_S10, _M10, 4), cases[1.0])
    # Same case as a 2x5 kernel: flat (row-major) indices are what count.
    got = sp.short_restriction_update(_S10.reshape(2, 5), _M10.reshape(2, 5), 4, 0.5)
    np.testing.assert_array_equal(_np(got), np.reshape(cases[0.5], (2, 5)))


def test_short_restriction_ties_inside_r_and_d_lower_index_first():
    """R = {1, 4, 6} all 0.7, D = {0, 3, 5} all 0.2: lower indices move first."""
    s = np.float32([0.2, 0.7, 0.9, 0.2, 0.7, 0.2, 0.7, 0.8])
    b = np.array([T, F, T, T, F, T, F, T])
    cases = {
        0.5: [F, T, T, F, T, T, F, T],  # p=2: revive 1, 4; drop 0, 3.
        0.3: [F, T, T, T, F, T, F, T],  # p=ceil(0.9)=1: revive 1; drop 0.
        1.0: [F, T, T, F, T, F, T, T],
    }
    for rate, expected in cases.items():
        np.testing.assert_array_equal(_update(s, b, 3, rate), expected, err_msg=str(rate))


# ----------------------------------------------------------------------------
# 7. Numpy reference of docs/method.md §4, random comparison, invariant
# ----------------------------------------------------------------------------
def reference_update(scores, mask, k, rate):
    """docs/method.md §4, sort-based; rate None means 1."""
    s = np.asarray(scores, np.float32).ravel()
    b = np.asarray(mask, bool).ravel()
    if k == 0:
        return b.reshape(np.shape(mask))
    t = s[np.argsort(s, kind='stable')[k - 1]]
    revive_cand = ~b & (s > t)
    drop_cand = b & (s <= t)
    c, d = int(revive_cand.sum()), int(drop_cand.sum())
    if c == 0 or d == 0 or c != d:
        return b.reshape(np.shape(mask))
    p = c if rate is None else max(1, math.ceil(c * Fraction(str(rate))))
    idx = np.arange(s.size)
    by_high = np.argsort(-s, kind='stable')  # highest first, lower index among ties.
    by_low = np.argsort(s, kind='stable')  # lowest first, lower index among ties.
    revive = by_high[revive_cand[by_high]][:p]
    drop = by_low[drop_cand[by_low]][:p]
    new = b.copy()
    new[revive] = True
    new[drop] = False
    assert set(revive) <= set(idx[revive_cand]) and set(drop) <= set(idx[drop_cand])
    return new.reshape(np.shape(mask))


def _random_scores(rng, n):
    kind = rng.integers(3)
    tied = rng.choice(np.float32([-1.0, -0.0, 0.0, 0.5, 0.99, 1.0, 2.0]), n)
    if kind == 0:
        return tied
    smooth = rng.standard_normal(n).astype(np.float32)
    if kind == 1:
        return smooth
    return np.where(rng.random(n) < 0.5, tied, smooth)


def _random_mask(rng, shape, k):
    n = math.prod(shape)
    flat = np.ones(n, bool)
    flat[rng.permutation(n)[:k]] = False
    return flat.reshape(shape)


# (shape, k) combos: a fixed set so that only a few compilations happen.
_COMBOS = [((1,), 0), ((1,), 1), ((5,), 1), ((5,), 2), ((5,), 4), ((3, 4), 3), ((3, 4), 6),
           ((3, 4), 11), ((40,), 10), ((40,), 36), ((40,), 40)]  # fmt: skip


def test_short_restriction_matches_reference_on_random_cases():
    """300 random cases (ties, -0.0/+0.0, partial rates) vs the numpy reference."""
    rng = np.random.default_rng(3)
    rates = (None, 1.0, 0.7, 0.3, 0.05)
    changed = gated = 0
    for _ in range(300):
        shape, k = _COMBOS[rng.integers(len(_COMBOS))]
        n = math.prod(shape)
        s = _random_scores(rng, n).reshape(shape)
        b = _random_mask(rng, shape, k)
        rate = rates[rng.integers(len(rates))]
        got = _update(s, b, k, rate)
        expected = reference_update(s, b, k, rate)
        np.testing.assert_array_equal(got, expected, err_msg=f'{s} {b} {k} {rate}')
        assert got.sum() == n - k
        # The fast path (rate None) equals the general path at rate 1.
        np.testing.assert_array_equal(_update(s, b, k, None), _update(s, b, k, 1.0))
        changed += int(np.any(got != b))
        if k:  # count cases closed by the |R| == |D| gate although R is non-empty.
            t = np.sort(s.ravel())[k - 1]
            num_r, num_d = np.sum(~b & (s > t)), np.sum(b & (s <= t))
            gated += int(num_r > 0 and num_r != num_d)
    assert changed > 60 and gated > 20  # both branches are exercised.


def test_short_restriction_invariant_over_many_updates():
    """200 successive updates (mixed rates, jitted, rate traced): always n - k kept."""
    shapes = {'a': (3, 3, 2, 4), 'b': (10,), 'c': (5, 6)}
    counts = {'a': 60, 'b': 3, 'c': 15}
    rng = np.random.default_rng(4)
    masks = {p: jnp.asarray(_random_mask(rng, s, counts[p])) for p, s in shapes.items()}
    scores = {p: jnp.asarray(rng.standard_normal(s), jnp.float32) for p, s in shapes.items()}

    step_rate = jax.jit(lambda s, m, r: sp.update_masks(s, m, counts, rate=r))
    step_all = jax.jit(lambda s, m: sp.update_masks(s, m, counts))
    total_changes = 0
    for i in range(200):
        noise = {p: rng.standard_normal(s).astype(np.float32) * 0.3 for p, s in shapes.items()}
        scores = {p: scores[p] + noise[p] for p in shapes}
        if i % 7 == 0:  # create ties now and then.
            scores = {p: jnp.round(v, 0) for p, v in scores.items()}
        rate = [None, 1.0, 0.7, 0.3, 0.05][i % 5]
        if rate is None:
            new, changes = step_all(scores, masks)
        else:
            new, changes = step_rate(scores, masks, jnp.float32(rate))
        for p, s in shapes.items():
            expected = reference_update(_np(scores[p]), _np(masks[p]), counts[p], rate)
            np.testing.assert_array_equal(_np(new[p]), expected)
            assert int(_np(new[p]).sum()) == math.prod(s) - counts[p]
            assert int(changes[p]) == int(np.sum(_np(new[p]) != _np(masks[p])))
            total_changes += int(changes[p])
        masks = new
    assert total_changes > 100


def test_swap_margin_golden():
    """n=6, k=3, kept {0, 3, 5}: 0.52 displaces 0.30 (+0.01) but 0.505 not 0.50 (+0.01)."""
    scores = {'a': jnp.float32([0.50, 0.52, 0.10, 0.90, 0.505, 0.30])}
    mask = {'a': jnp.array([T, F, F, T, F, T])}
    cases = {  # margin: (masks at rate 1, masks at rate 0.5)
        0.0: ([F, T, F, T, T, F], [T, T, F, T, F, F]),  # the short restriction itself.
        0.01: ([T, T, F, T, F, F], [T, T, F, T, F, F]),  # one candidate pair left.
        0.3: ([T, F, F, T, F, T], [T, F, F, T, F, T]),  # nothing clears 0.3.
    }
    for margin, expected in cases.items():
        ranking = sp.with_swap_margin(scores, mask, margin)
        for rate, want in zip((None, 0.5), expected):
            got = sp.short_restriction_updates(ranking, mask, {'a': 3}, rate)['a']
            np.testing.assert_array_equal(_np(got), want, err_msg=f'{margin} {rate}')
    np.testing.assert_array_equal(_np(sp.with_swap_margin(scores, mask, 0.0)['a']), scores['a'])


def test_swap_margin_keeps_counts_and_every_swap_clears_the_margin():
    """300 random updates with a margin: exact counts, and every revived weight's score
    beats every dropped weight's by more than the margin (in the ranking's float32)."""
    rng = np.random.default_rng(5)
    update = jax.jit(lambda s, m, margin: sp.short_restriction_updates(
        sp.with_swap_margin(s, m, margin), m, {'a': 30}))
    swaps = 0
    for _ in range(300):
        s = {'a': jnp.asarray(rng.standard_normal(40).astype(np.float32))}
        b = {'a': jnp.asarray(_random_mask(rng, (40,), 30))}
        margin = np.float32(rng.choice([0.0, 0.05, 0.5]))
        new = _np(update(s, b, margin)['a'])
        old, score = _np(b['a']), _np(s['a'])
        assert new.sum() == 10
        revived, dropped = score[new & ~old], score[old & ~new]
        if revived.size:
            swaps += 1
            assert revived.min() > dropped.max() + margin
        # Unchanged when no pruned score beats a kept one by the margin.
        if score[~old].max() <= score[old].min() + margin:
            np.testing.assert_array_equal(new, old)
    assert swaps > 100


# ----------------------------------------------------------------------------
# 8. edge_popup_mask and update_masks
# ----------------------------------------------------------------------------
def test_edge_popup_mask_golden():
    """Keep top n-k of |s|; among |s| ties the lower index is kept."""
    s = jnp.float32([[0.5, -0.9, 0.5], [0.1, -0.5, 0.2]])
    np.testing.assert_array_equal(_np(sp.edge_popup_mask(s, 3)), [[T, T, T], [F, F, F]])
    np.testing.assert_array_equal(_np(sp.edge_popup_mask(s, 4)), [[T, T, F], [F, F, F]])
    np.testing.assert_array_equal(_np(sp.edge_popup_mask(s, 1)), [[T, T, T], [F, T, T]])
    np.testing.assert_array_equal(_np(sp.edge_popup_mask(s, 0)), [[T, T, T], [T, T, T]])


def test_update_masks_change_counts_and_modes():
    """changes[p] = number of flipped positions; unknown mode raises."""
    scores = {
        'x': jnp.asarray(_S10),
        'y': jnp.float32([0.1, 0.9, 0.95, 0.8, 0.7, 0.2]),
    }
    masks = {'x': jnp.asarray(_M10), 'y': jnp.array([T, T, F, T, T, F])}
    counts = {'x': 4, 'y': 2}
    new, changes = sp.update_masks(scores, masks, counts, rate=0.5)
    np.testing.assert_array_equal(_np(new['x']), [F, F, F, T, T, F, T, T, T, T])
    np.testing.assert_array_equal(_np(new['y']), [F, T, T, T, T, F])
    assert {p: int(c) for p, c in changes.items()} == {'x': 4, 'y': 2}
    new, changes = sp.update_masks(scores, masks, counts, mode='edge_popup')
    np.testing.assert_array_equal(_np(new['x']), [F, T, F, T, F, T, F, T, T, T])
    np.testing.assert_array_equal(_np(new['y']), [F, T, T, T, T, F])
    assert {p: int(c) for p, c in changes.items()} == {'x': 8, 'y': 2}
    with pytest.raises(ValueError, match="unknown mask update 'popup'"):
        sp.update_masks(scores, masks, counts, mode='popup')


# ----------------------------------------------------------------------------
# 9. swap_rate
# ----------------------------------------------------------------------------
def test_swap_rate_schedules():
    cases = [
        ('constant', 0, 10, 1.0),
        ('constant', 9, 10, 1.0),
        ('poly4', 0, 10, 1.0),
        ('poly4', 5, 10, 0.0625),
        ('poly4', 9, 10, 1e-4),
        ('poly4', 3, 4, 0.00390625),
        ('cosine', 0, 4, 1.0),
        ('cosine', 1, 4, 0.8535533906),
        ('cosine', 2, 4, 0.5),
        ('cosine', 3, 4, 0.1464466094),
        ('cosine', 5, 10, 0.5),
    ]
    for schedule, e, total, expected in cases:
        got = float(sp.swap_rate(schedule, e, total))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), (schedule, e, total)
    traced = jax.jit(lambda e: sp.swap_rate('cosine', e, 4))(jnp.int32(1))
    assert float(traced) == pytest.approx(0.8535533906, rel=1e-6)
    with pytest.raises(ValueError, match="unknown rate schedule 'linear'"):
        sp.swap_rate('linear', 0, 10)


# ----------------------------------------------------------------------------
# 10. random_masks
# ----------------------------------------------------------------------------
def test_random_masks_counts_and_determinism():
    kernels = {'a': jnp.zeros((4, 5)), 'b': jnp.zeros((3, 3, 2, 2))}
    counts = {'a': 7, 'b': 30}
    m1 = sp.random_masks(jax.random.key(0), kernels, counts)
    m2 = sp.random_masks(jax.random.key(0), kernels, counts)
    m3 = sp.random_masks(jax.random.key(1), kernels, counts)
    assert {p: int(m.sum()) for p, m in m1.items()} == {'a': 13, 'b': 6}
    assert {p: int(m.sum()) for p, m in m3.items()} == {'a': 13, 'b': 6}
    assert {p: m.shape for p, m in m1.items()} == {'a': (4, 5), 'b': (3, 3, 2, 2)}
    for p in kernels:
        np.testing.assert_array_equal(_np(m1[p]), _np(m2[p]))
    assert any(np.any(_np(m1[p]) != _np(m3[p])) for p in kernels)


# ----------------------------------------------------------------------------
# 11. Sparsity report
# ----------------------------------------------------------------------------
def test_sparsity_report_numbers_and_text():
    """Prunable sparsity 12/20 beside whole-model 12/31 (classifier and biases count)."""
    params = {
        'conv': {'kernel': np.zeros((2, 2, 1, 2))},  # 8
        'dense': {'kernel': np.zeros((4, 3)), 'bias': np.zeros(3)},  # 12 + 3
        'fc': {'kernel': np.zeros((3, 2)), 'bias': np.zeros(2)},  # 6 + 2
    }
    conv_mask = np.zeros((2, 2, 1, 2), bool)
    conv_mask[0, 0, 0, :] = True  # keep 2 of 8.
    dense_mask = np.array([[T, F, T], [F, T, F], [T, T, F], [F, F, T]])  # keep 6 of 12.
    report = sp.sparsity_report(params, {'dense/kernel': dense_mask, 'conv/kernel': conv_mask})
    assert report['layers'] == [
        {'layer': 'conv/kernel', 'size': 8, 'kept': 2, 'sparsity': 0.75},
        {'layer': 'dense/kernel', 'size': 12, 'kept': 6, 'sparsity': 0.5},
    ]
    assert report['prunable_weights'] == 20
    assert report['prunable_removed'] == 12
    assert report['sparsity'] == pytest.approx(0.6)
    assert report['model_params'] == 31
    assert report['model_sparsity'] == pytest.approx(12 / 31)
    text = sp.format_sparsity_report(report)
    lines = text.splitlines()
    assert lines[1].split() == ['conv/kernel', '8', '2', '75.00%']
    assert lines[2].split() == ['dense/kernel', '12', '6', '50.00%']
    assert 'sparsity over prunable weights: 60.00% (12 of 20 removed)' in text
    assert 'whole model' in text and '38.71% of 31 params' in text
