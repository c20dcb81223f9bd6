"""Tests for jackpot_jax.core.structured (N:M masks along input channels).

Golden values are worked by hand and written literally; the random tests compare
against a numpy reference that loops over the groups and applies docs/method.md §4 to
each one, and single groups are checked against jackpot_jax.core.sparsity.
"""

import math
import re
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jackpot_jax.core import sparsity as sp, structured as st

T, F = True, False

# Jitted once at module level so that cases with the same shapes share a compilation.
update_jit = jax.jit(st.short_restriction_update, static_argnums=(2, 3))
magnitude_jit = jax.jit(st.magnitude_mask, static_argnums=(1, 2))
edge_popup_jit = jax.jit(st.edge_popup_mask, static_argnums=(1, 2))
top_n_jit = jax.jit(st.top_n_in_groups, static_argnums=(1, 2))
sp_update_jit = jax.jit(sp.short_restriction_update, static_argnums=(2,))
sp_magnitude_jit = jax.jit(sp.magnitude_mask, static_argnums=(1,))
sp_edge_popup_jit = jax.jit(sp.edge_popup_mask, static_argnums=(1,))
abs_key_jit = jax.jit(lambda x: sp.sortable_key(jnp.abs(x)))

PATTERNS = [(1, 4), (2, 4), (2, 8), (3, 8), (1, 2)]


def _np(x):
    return np.asarray(x)


def _update(scores, mask, n, m, rate=None):
    """Run the jitted update on numpy inputs; rate is passed traced (float32)."""
    rate = None if rate is None else jnp.float32(rate)
    s, b = jnp.asarray(scores, jnp.float32), jnp.asarray(mask, bool)
    return _np(update_jit(s, b, n, m, rate))


# ----------------------------------------------------------------------------
# 1. Numpy reference: loop over groups, docs/method.md §4 on each.
# ----------------------------------------------------------------------------
def _group_slices(shape, m):
    """Index tuples of every group: M consecutive entries along axis -2."""
    outer = (*shape[:-2], shape[-1])
    for idx in np.ndindex(*outer):
        for g in range(shape[-2] // m):
            yield (*idx[:-1], slice(g * m, (g + 1) * m), idx[-1])


def _reference_group_update(s, b, k, rate):
    """docs/method.md §4 on one group (1-D), sort-based; rate None means 1."""
    t = np.sort(s)[k - 1]
    revive_cand = ~b & (s > t)
    drop_cand = b & (s <= t)
    c, d = int(revive_cand.sum()), int(drop_cand.sum())
    if c == 0 or d == 0 or c != d:
        return b.copy()
    p = c if rate is None else max(1, math.ceil(c * Fraction(str(rate))))
    by_high = np.argsort(-s, kind='stable')  # highest first, lower index among ties.
    by_low = np.argsort(s, kind='stable')  # lowest first, lower index among ties.
    new = b.copy()
    new[by_high[revive_cand[by_high]][:p]] = True
    new[by_low[drop_cand[by_low]][:p]] = False
    return new


def reference_update(scores, mask, n, m, rate):
    s = np.asarray(scores, np.float32)
    s = np.where(s == 0, np.float32(0), s)  # -0.0 == +0.0, as in sortable_key.
    b = np.asarray(mask, bool)
    new = b.copy()
    for sl in _group_slices(s.shape, m):
        new[sl] = _reference_group_update(s[sl], b[sl], m - n, rate)
    return new


def reference_magnitude_mask(kernel, n, m):
    """Per group: prune the M - N smallest |w|, lower index pruned first among ties."""
    w = np.abs(np.asarray(kernel, np.float32))
    mask = np.ones(w.shape, bool)
    for sl in _group_slices(w.shape, m):
        keep = np.ones(m, bool)
        keep[np.argsort(w[sl], kind='stable')[: m - n]] = False
        mask[sl] = keep
    return mask


def reference_top_n(keys, n, m):
    """Per group: keep the N largest keys, lower index kept first among ties."""
    keys = np.asarray(keys).astype(np.int64)
    mask = np.zeros(keys.shape, bool)
    for sl in _group_slices(keys.shape, m):
        keep = np.zeros(m, bool)
        keep[np.argsort(-keys[sl], kind='stable')[:n]] = True
        mask[sl] = keep
    return mask


def _random_scores(rng, shape):
    size = math.prod(shape)
    kind = rng.integers(3)
    tied = rng.choice(np.float32([-1.0, -0.0, 0.0, 0.5, 0.99, 1.0, 2.0]), size)
    smooth = rng.standard_normal(size).astype(np.float32)
    if kind == 0:
        out = tied
    elif kind == 1:
        out = smooth
    else:
        out = np.where(rng.random(size) < 0.5, tied, smooth)
    return out.reshape(shape)


def _random_nm_mask(rng, shape, n, m):
    """A uniformly random valid N:M mask."""
    mask = np.zeros(shape, bool)
    for sl in _group_slices(shape, m):
        keep = np.zeros(m, bool)
        keep[rng.permutation(m)[:n]] = True
        mask[sl] = keep
    return mask


def test_reference_group_slices_follow_input_channels():
    """Sanity of the reference itself: groups are consecutive along axis -2."""
    slices = list(_group_slices((1, 2, 4, 3), 2))
    assert len(slices) == 1 * 2 * 3 * 2
    assert slices[0] == (0, 0, slice(0, 2), 0) and slices[1] == (0, 0, slice(2, 4), 0)
    x = np.arange(24).reshape(1, 2, 4, 3)
    np.testing.assert_array_equal(x[slices[1]], [6, 9])


# ----------------------------------------------------------------------------
# 2. Patterns, eligibility, counts.
# ----------------------------------------------------------------------------
def test_parse_pattern_valid():
    assert st.parse_pattern('') is None
    assert st.parse_pattern('   ') is None
    assert st.parse_pattern('2:4') == (2, 4)
    assert st.parse_pattern(' 1:2\n') == (1, 2)
    assert st.parse_pattern('3:8') == (3, 8)
    assert st.parse_pattern('2 : 4') == (2, 4)


@pytest.mark.parametrize('bad', ['4:2', '2:2', '0:4', 'a:b', '2-4', '2:4:8', '-1:4', '2.0:4'])
def test_parse_pattern_errors_name_value_and_fix(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))) as info:
        st.parse_pattern(bad)
    assert '1 <= N < M' in str(info.value) and "'2:4'" in str(info.value)


def test_pattern_sparsity_exact_and_describe():
    assert st.pattern_sparsity(2, 4) == Fraction(1, 2)
    assert st.pattern_sparsity(1, 4) == Fraction(3, 4)
    assert st.pattern_sparsity(3, 8) == Fraction(5, 8)
    assert isinstance(st.pattern_sparsity(1, 2), Fraction)
    assert st.describe(2, 4) == '2:4 along input channels'
    assert st.describe(3, 8) == '3:8 along input channels'
    with pytest.raises(ValueError, match='1 <= N < M'):
        st.pattern_sparsity(4, 4)


def test_eligible_and_nm_counts():
    """Eligible: rank >= 2 and input channels (axis -2) divisible by M; others stay dense."""
    assert st.eligible((3, 3, 8, 16), 4)
    assert st.eligible((8, 3), 4)
    assert not st.eligible((3, 3, 3, 16), 4)  # RGB stem conv: I = 3.
    assert not st.eligible((16,), 4)  # rank 1.
    assert not st.eligible((6, 8), 4)  # O divisible, I not: the axis is -2.
    assert st.eligible((6, 8), 2)
    shapes = {
        'conv1/kernel': (3, 3, 3, 16),
        'layer1/kernel': (3, 3, 16, 16),
        'dense/kernel': (8, 10),
        'odd/kernel': (6, 8),
        'bias': (8,),
    }
    assert st.nm_counts(shapes, 2, 4) == {
        'conv1/kernel': 0,
        'layer1/kernel': 1152,
        'dense/kernel': 40,
        'odd/kernel': 0,
        'bias': 0,
    }
    assert st.nm_counts(shapes, 3, 8) == {
        'conv1/kernel': 0,
        'layer1/kernel': 1440,
        'dense/kernel': 50,
        'odd/kernel': 0,
        'bias': 0,
    }
    assert st.nm_counts({'a': [4, 4]}, 1, 4) == {'a': 12}
    with pytest.raises(ValueError, match='1 <= N < M'):
        st.nm_counts(shapes, 0, 4)


def test_ineligible_shapes_raise_naming_shape_and_m():
    keys = jnp.zeros((3, 3, 6, 4), jnp.uint32)
    with pytest.raises(ValueError, match=re.escape('(3, 3, 6, 4)')) as info:
        st.top_n_in_groups(keys, 2, 4)
    assert 'M=4' in str(info.value)
    with pytest.raises(ValueError, match=re.escape('(8,)')):
        st.magnitude_mask(jnp.ones(8), 2, 4)
    with pytest.raises(ValueError, match='M=8'):
        st.short_restriction_update(jnp.ones((4, 2)), jnp.ones((4, 2), bool), 2, 8)
    with pytest.raises(ValueError, match='M=4'):
        st.edge_popup_mask(jnp.ones((2, 2)), 1, 4)
    with pytest.raises(ValueError, match='M=4'):
        st.group_violations(np.ones((6, 2), bool), 2, 4)
    with pytest.raises(ValueError, match='1 <= N < M'):
        st.top_n_in_groups(jnp.zeros((4, 2), jnp.uint32), 4, 4)


# ----------------------------------------------------------------------------
# 3. Golden tensors: a (4, 3) dense kernel under 2:4, one group per column.
# ----------------------------------------------------------------------------
_W = np.float32(
    [
        [0.5, -0.1, 0.4],
        [-0.2, 0.3, -0.6],
        [0.2, -0.3, 0.1],
        [0.2, 0.05, 0.0],
    ]
)
# Column 0: |w| .5 .2 .2 .2: two of three tied 0.2 pruned, lower rows first.
# Column 1: |w| .1 .3 .3 .05: prune rows 3 and 0. Column 2: prune rows 3 and 2.
_W_MASK = np.array([[T, F, T], [F, T, T], [F, T, F], [T, F, F]])
_S = np.float32(
    [
        [0.1, 0.5, 0.3],
        [0.8, 0.5, 0.9],
        [0.7, 0.5, 0.2],
        [0.2, 0.9, -1.0],
    ]
)
# Column 0: t = 0.2, R = {1, 2}, D = {0, 3}: all swapped (rate 1); p = 1 at rate 0.5.
# Column 1: t = 0.5, R = {3}, D = {1, 2}: |R| != |D|, gate closed.
# Column 2: t = 0.2, R = {}: already the top-2, nothing changes.
_NEW_RATE_1 = np.array([[F, F, T], [T, T, T], [T, T, F], [F, F, F]])
_NEW_RATE_HALF = np.array([[F, F, T], [T, T, T], [F, T, F], [T, F, F]])


def test_magnitude_mask_golden():
    np.testing.assert_array_equal(_np(st.magnitude_mask(jnp.asarray(_W), 2, 4)), _W_MASK)
    assert st.group_violations(_W_MASK, 2, 4) == 0
    # 1:4 on the same kernel: keep the largest |w|; of equal ones the higher row (lower pruned).
    expected = np.array([[T, F, F], [F, F, T], [F, T, F], [F, F, F]])
    np.testing.assert_array_equal(_np(st.magnitude_mask(jnp.asarray(_W), 1, 4)), expected)


def test_short_restriction_update_golden():
    for rate in (None, 1.0):
        np.testing.assert_array_equal(_update(_S, _W_MASK, 2, 4, rate), _NEW_RATE_1)
    for rate in (0.5, 0.01):
        np.testing.assert_array_equal(_update(_S, _W_MASK, 2, 4, rate), _NEW_RATE_HALF)
    # Eager gives the same.
    np.testing.assert_array_equal(
        _np(st.short_restriction_update(_S, _W_MASK, 2, 4, 0.5)), _NEW_RATE_HALF
    )


def test_edge_popup_and_top_n_golden():
    """Keep the top N of |s| per group; among ties the lower index is kept."""
    expected = np.array([[F, T, F], [T, F, T], [T, F, F], [F, T, T]])
    np.testing.assert_array_equal(_np(st.edge_popup_mask(jnp.asarray(_S), 2, 4)), expected)
    keys = jnp.array([[3, 1], [1, 1], [3, 1], [3, 0]], jnp.uint32)
    np.testing.assert_array_equal(
        _np(st.top_n_in_groups(keys, 2, 4)), [[T, T], [F, T], [T, F], [F, F]]
    )
    np.testing.assert_array_equal(
        _np(st.top_n_in_groups(keys, 1, 2)), [[T, T], [F, F], [T, T], [F, F]]
    )


def test_conv_layout_groups_run_along_input_channels():
    """(H, W, I, O) = (1, 2, 4, 2): the kept entries per group follow axis -2 only."""
    w = np.zeros((1, 2, 4, 2), np.float32)
    w[0, 0, :, 0] = [1.0, 4.0, 3.0, 2.0]
    w[0, 0, :, 1] = [4.0, 3.0, 2.0, 1.0]
    w[0, 1, :, 0] = [2.0, 1.0, 4.0, 3.0]
    w[0, 1, :, 1] = [-1.0, 2.0, -3.0, 4.0]
    mask = _np(st.magnitude_mask(jnp.asarray(w), 2, 4))
    np.testing.assert_array_equal(mask[0, 0, :, 0], [F, T, T, F])
    np.testing.assert_array_equal(mask[0, 0, :, 1], [T, T, F, F])
    np.testing.assert_array_equal(mask[0, 1, :, 0], [F, F, T, T])
    np.testing.assert_array_equal(mask[0, 1, :, 1], [F, F, T, T])
    np.testing.assert_array_equal(mask, reference_magnitude_mask(w, 2, 4))
    # The same values under 2:2 groups: [1, 4] [3, 2] -> rows 1 and 2 of column (0, 0, 0).
    mask22 = _np(st.magnitude_mask(jnp.asarray(w), 1, 2))
    np.testing.assert_array_equal(mask22[0, 0, :, 0], [F, T, T, F])
    np.testing.assert_array_equal(mask22[0, 1, :, 1], [F, T, F, T])


def test_group_violations_counts_bad_groups_numpy_and_jax():
    bad = _W_MASK.copy()
    bad[0, 0] = False  # column 0 keeps 1.
    bad[3, 2] = True  # column 2 keeps 3.
    for mask in (bad, jnp.asarray(bad)):
        got = st.group_violations(mask, 2, 4)
        assert got == 2 and type(got) is int
    assert st.group_violations(jnp.asarray(_W_MASK), 2, 4) == 0
    assert st.group_violations(_W_MASK, 1, 2) == 2  # column 2 keeps 2 of 2, then 0 of 2.
    assert st.group_violations(np.ones((3, 3, 8, 2), bool), 2, 4) == 3 * 3 * 2 * 2


def test_init_scores_leave_magnitude_mask_unchanged():
    """With magnitude init scores (1.0 kept, 0.99 pruned) no group changes."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 4)), jnp.float32)
    for n, m in ((2, 4), (3, 8)):
        mask = st.magnitude_mask(w, n, m)
        scores = sp.init_scores({'w': mask})['w']
        for rate in (None, 0.5):
            np.testing.assert_array_equal(_update(scores, mask, n, m, rate), _np(mask))
        np.testing.assert_array_equal(_np(edge_popup_jit(scores, n, m)), _np(mask))


# ----------------------------------------------------------------------------
# 4. Random cases against the reference.
# ----------------------------------------------------------------------------
# (shape, n, m): a fixed set so that only a few compilations happen.
_COMBOS = [
    ((8, 3), 2, 4),
    ((4, 5), 1, 4),
    ((2, 2, 8, 2), 2, 8),
    ((1, 3, 8, 2), 3, 8),
    ((6, 4), 1, 2),
    ((2, 1, 4, 3), 2, 4),
]


def test_short_restriction_matches_reference_on_random_cases():
    """200 random cases (ties, -0.0/+0.0, partial rates) vs the per-group reference."""
    rng = np.random.default_rng(1)
    rates = (None, 1.0, 0.5, 0.3)
    changed = gated = 0
    for _ in range(200):
        shape, n, m = _COMBOS[rng.integers(len(_COMBOS))]
        s = _random_scores(rng, shape)
        b = _random_nm_mask(rng, shape, n, m)
        rate = rates[rng.integers(len(rates))]
        got = _update(s, b, n, m, rate)
        expected = reference_update(s, b, n, m, rate)
        np.testing.assert_array_equal(got, expected, err_msg=f'{shape} {n}:{m} {rate}\n{s}\n{b}')
        assert st.group_violations(got, n, m) == 0
        changed += int(np.any(got != b))
        for sl in _group_slices(shape, m):  # groups closed by |R| != |D| although R is non-empty.
            t = np.sort(s[sl])[m - n - 1]
            num_r, num_d = np.sum(~b[sl] & (s[sl] > t)), np.sum(b[sl] & (s[sl] <= t))
            gated += int(num_r > 0 and num_r != num_d)
    assert changed > 100 and gated > 50  # both branches are exercised.


def test_masks_match_reference_on_random_cases():
    """magnitude_mask, edge_popup_mask and top_n_in_groups vs the per-group reference."""
    rng = np.random.default_rng(2)
    for i in range(60):
        shape, n, m = _COMBOS[i % len(_COMBOS)]
        w = _random_scores(rng, shape)
        np.testing.assert_array_equal(
            _np(magnitude_jit(jnp.asarray(w), n, m)), reference_magnitude_mask(w, n, m)
        )
        keys = _np(abs_key_jit(jnp.asarray(w)))
        np.testing.assert_array_equal(
            _np(edge_popup_jit(jnp.asarray(w), n, m)), reference_top_n(keys, n, m)
        )
        raw = rng.integers(0, 4, shape).astype(np.uint32)  # heavy ties.
        np.testing.assert_array_equal(
            _np(top_n_jit(jnp.asarray(raw), n, m)), reference_top_n(raw, n, m)
        )


def test_chained_updates_keep_every_group_at_n():
    """50 successive updates with perturbed scores and mixed rates: 0 violations."""
    shapes = {'conv': ((3, 3, 8, 4), 2, 4), 'dense': ((16, 6), 3, 8)}
    rng = np.random.default_rng(3)
    masks = {p: _random_nm_mask(rng, s, n, m) for p, (s, n, m) in shapes.items()}
    scores = {p: rng.standard_normal(s).astype(np.float32) for p, (s, _, _) in shapes.items()}
    total_changes = 0
    for i in range(50):
        rate = [None, 1.0, 0.5, 0.3][i % 4]
        for p, (shape, n, m) in shapes.items():
            scores[p] = scores[p] + 0.3 * rng.standard_normal(shape).astype(np.float32)
            if i % 7 == 0:  # create ties now and then.
                scores[p] = np.round(scores[p], 0)
            new = _update(scores[p], masks[p], n, m, rate)
            np.testing.assert_array_equal(new, reference_update(scores[p], masks[p], n, m, rate))
            assert st.group_violations(new, n, m) == 0
            assert new.sum() == new.size * n // m
            total_changes += int(np.sum(new != masks[p]))
            masks[p] = new
    assert total_changes > 200


# ----------------------------------------------------------------------------
# 5. One group == one layer of jackpot_jax.core.sparsity.
# ----------------------------------------------------------------------------
def test_single_group_equals_sparsity_module():
    """A (M, 1) kernel is one group: every rule equals its sparsity counterpart with k = M - N."""
    rng = np.random.default_rng(4)
    rates = (None, 1.0, 0.7, 0.5, 0.3, 0.05)
    changed = 0
    for i in range(150):
        n, m = PATTERNS[i % len(PATTERNS)]
        s = _random_scores(rng, (m, 1))
        if i % 3 == 0:  # few distinct values: ties everywhere.
            s = rng.choice(np.float32([0.5, -0.5, 1.0]), (m, 1))
        b = _random_nm_mask(rng, (m, 1), n, m)
        rate = rates[rng.integers(len(rates))]
        traced = None if rate is None else jnp.float32(rate)
        got = _update(s, b, n, m, rate)
        expected = _np(sp_update_jit(jnp.asarray(s), jnp.asarray(b), m - n, traced))
        np.testing.assert_array_equal(got, expected, err_msg=f'{n}:{m} {rate}\n{s}\n{b}')
        changed += int(np.any(got != b))
        w = jnp.asarray(s)
        np.testing.assert_array_equal(
            _np(magnitude_jit(w, n, m)), _np(sp_magnitude_jit(w, m - n)), err_msg=f'{s}'
        )
        np.testing.assert_array_equal(
            _np(edge_popup_jit(w, n, m)), _np(sp_edge_popup_jit(w, m - n)), err_msg=f'{s}'
        )
    assert changed > 20


def test_single_group_ties_match_sparsity_golden():
    """Tied |w| on one group: both modules prune the lower index first (magnitude)
    and keep the lower index first (edge popup)."""
    w = jnp.float32([[0.5], [-0.5], [0.5], [0.5]])
    np.testing.assert_array_equal(_np(st.magnitude_mask(w, 1, 4)), [[F], [F], [F], [T]])
    np.testing.assert_array_equal(_np(sp.magnitude_mask(w, 3)), [[F], [F], [F], [T]])
    np.testing.assert_array_equal(_np(st.edge_popup_mask(w, 1, 4)), [[T], [F], [F], [F]])
    np.testing.assert_array_equal(_np(sp.edge_popup_mask(w, 3)), [[T], [F], [F], [F]])


# ----------------------------------------------------------------------------
# 6. jit == eager.
# ----------------------------------------------------------------------------
def test_jit_with_traced_rate_equals_eager():
    rng = np.random.default_rng(5)
    shape, n, m = (8, 3), 2, 4  # the jitted functions were compiled for it above.
    for rate in (None, 1.0, 0.5, 0.3):
        s = jnp.asarray(_random_scores(rng, shape))
        b = jnp.asarray(_random_nm_mask(rng, shape, n, m))
        eager = _np(st.short_restriction_update(s, b, n, m, rate))
        np.testing.assert_array_equal(_update(s, b, n, m, rate), eager)
        np.testing.assert_array_equal(eager, reference_update(s, b, n, m, rate))
    np.testing.assert_array_equal(_np(magnitude_jit(s, n, m)), _np(st.magnitude_mask(s, n, m)))
    np.testing.assert_array_equal(_np(edge_popup_jit(s, n, m)), _np(st.edge_popup_mask(s, n, m)))
    keys = sp.sortable_key(s)
    np.testing.assert_array_equal(_np(top_n_jit(keys, n, m)), _np(st.top_n_in_groups(keys, n, m)))


def test_masks_from_scores_break_ties_like_the_unstructured_rule_on_one_group():
    scores = {'k': jnp.asarray([[0.5], [0.2], [0.5], [0.5]])}  # one group of 4, three tied
    for n in (1, 2, 3):
        got = st.masks_from_scores(scores, {'k': 4 - n}, n, 4)['k']
        want = sp.masks_from_scores(scores, {'k': 4 - n})['k']
        np.testing.assert_array_equal(got, want)
