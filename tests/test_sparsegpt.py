"""Tests for jackpot_jax.baselines.sparsegpt (SparseGPT on one Dense kernel).

The math is checked against a float64 numpy reference written here from the paper,
input by input with plain loops and every error spread at once (no lazy batch update);
the rest checks exact counts, the identity-Hessian case (magnitude pruning), the
reconstruction error against other masks at the same count, and bad input.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jackpot_jax.baselines import sparsegpt as sg
from jackpot_jax.core import sparsity, structured
from jackpot_jax.core.errors import UserError


def _pattern(text):
    return None if text is None else tuple(int(v) for v in text.split(':'))


def reference(kernel, hessian, count=None, nm=None, blocksize=128, percdamp=0.01):
    """SparseGPT in float64, straight from the paper, in its (out, in) layout.

    Returns (mask, updated kernel) in the Flax (in, out) layout, and the smallest relative
    gap between the last pruned and the first kept saliency of any selection (a margin
    far above float32 rounding means the float32 solver must pick the same mask).
    """
    w = np.array(kernel, np.float64).T.copy()
    h = np.array(hessian, np.float64).copy()
    rows, cols = w.shape
    for c in range(cols):
        if h[c, c] == 0:
            h[c, c] = 1.0
            w[:, c] = 0.0
    h += percdamp * np.mean(np.diag(h)) * np.eye(cols)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, u^T u = h^-1
    keep = np.ones_like(w, bool)
    gaps = []

    def prune_lowest(entries, k):
        entries = sorted(entries)  # (saliency, tie order, position)
        for *_, position in entries[:k]:
            keep[position] = False
        if 0 < k < len(entries):
            gaps.append((entries[k][0] - entries[k - 1][0]) / entries[k][0])

    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        if nm is None:
            k = count * end // cols - count * start // cols
            saliency = [
                (w[r, c] ** 2 / u[c, c] ** 2, c * rows + r, (r, c))  # flat (in, out) index
                for c in range(start, end)
                for r in range(rows)
            ]
            prune_lowest(saliency, k)
        for c in range(start, end):
            if nm is not None and (c - start) % nm[1] == 0:
                for r in range(rows):
                    group = range(c, c + nm[1])
                    prune_lowest(
                        [(w[r, g] ** 2 / u[g, g] ** 2, g, (r, g)) for g in group], nm[1] - nm[0]
                    )
            for r in range(rows):
                q = w[r, c] if keep[r, c] else 0.0
                err = (w[r, c] - q) / u[c, c]
                for later in range(c + 1, cols):
                    w[r, later] -= err * u[c, later]
                w[r, c] = q
    return keep.T, w.T, min(gaps, default=1.0)


def _layer(seed, size, outs, n=64, dead=()):
    """A kernel and the Hessian of n correlated inputs (some input features always 0)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(size, size)) + 2.0 * rng.normal(size=(1, size))  # shared factor
    x = rng.normal(size=(n, size)) @ mix * rng.uniform(0.2, 2.0, size)
    x[:, list(dead)] = 0.0
    kernel = rng.normal(size=(size, outs)).astype(np.float32)
    return kernel, x.astype(np.float32)


# ----------------------------------------------------------------------------
# (a) The float32 solver against the float64 reference.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    'size, dead, count, pattern',
    [
        (16, (), 40, None),
        (16, (), None, '2:4'),
        (16, (), None, '1:4'),
        (20, (3,), 50, None),  # a last block of 4, one dead input
        (20, (3,), 119, None),
        (20, (3,), None, '2:4'),
    ],
)
def test_matches_float64_reference(size, dead, count, pattern):
    kernel, x = _layer(size, size, 6, dead=dead)
    hessian, _ = sg.accumulate_hessian(x)
    mask, updated = sg.sparsegpt_layer(kernel, hessian, count=count, pattern=pattern, blocksize=8)
    want_mask, want, gap = reference(kernel, hessian, count, _pattern(pattern), blocksize=8)
    assert gap > 5e-5  # every selection has a margin far above float32 rounding
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    np.testing.assert_allclose(np.asarray(updated), want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.all(np.asarray(updated)[~want_mask] == 0)
    assert not np.allclose(want[want_mask], kernel[want_mask])  # the update did act


# ----------------------------------------------------------------------------
# (b) Exact counts.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('count', [0, 1, 19, 37, 119, 120])
def test_exact_count(count):
    kernel, x = _layer(1, 20, 6, dead=(3,))
    hessian, _ = sg.accumulate_hessian(x)
    mask, updated = map(np.asarray, sg.sparsegpt_layer(kernel, hessian, count=count, blocksize=8))
    assert np.count_nonzero(~mask) == count
    per_block = [np.count_nonzero(~mask[s : s + 8]) for s in range(0, 20, 8)]
    assert per_block == sg.block_counts(20, count, 8)
    assert sum(sg.block_counts(20, count, 8)) == count
    assert np.all(updated[~mask] == 0)
    if count == 0:  # nothing pruned, nothing spread: the kernel, its dead input zeroed
        np.testing.assert_array_equal(updated, np.where(np.arange(20)[:, None] == 3, 0, kernel))
    if count == 120:
        assert not np.any(updated)


def test_block_counts_shares():
    assert sg.block_counts(20, 50, 8) == [20, 20, 10]
    assert sg.block_counts(20, 7, 8) == [2, 3, 2]  # floor(7*8/20)=2, floor(7*16/20)=5, 7
    assert sg.block_counts(300, 1000, 128) == [426, 427, 147]
    assert sg.block_counts(16, 96, 16) == [96]


@pytest.mark.parametrize('pattern', ['2:4', '1:4'])
def test_nm_groups_exact(pattern):
    n, m = _pattern(pattern)
    kernel, x = _layer(2, 16, 6)
    mask, updated = sg.sparsegpt_layer(
        kernel, sg.accumulate_hessian(x)[0], pattern=pattern, blocksize=8
    )
    mask = np.asarray(mask)
    assert structured.group_violations(mask, n, m) == 0
    assert np.count_nonzero(~mask) == 16 * 6 * (m - n) // m
    assert np.all(np.asarray(updated)[~mask] == 0)


# ----------------------------------------------------------------------------
# (c) Reconstruction error at the same count.
# ----------------------------------------------------------------------------
def _wanda_mask(kernel, x, count=None, nm=None):
    """Wanda's rule: prune the lowest |w_ij| ||X_j|| per output (the first outputs take
    the remainder of the count), or per N:M group."""
    score = np.abs(kernel) * np.linalg.norm(x, axis=0)[:, None]
    size, outs = kernel.shape
    if nm is not None:
        groups = score.T.reshape(outs, size // nm[1], nm[1])
        ranks = np.argsort(np.argsort(groups, axis=-1, kind='stable'), axis=-1, kind='stable')
        return (ranks >= nm[1] - nm[0]).reshape(outs, size).T
    per_output = count // outs + (np.arange(outs) < count % outs)
    ranks = np.argsort(np.argsort(score, axis=0, kind='stable'), axis=0, kind='stable')
    return ranks >= per_output[None, :]


@pytest.mark.parametrize('count, pattern', [(16 * 6 // 2, None), (None, '2:4')])
def test_reconstruction_beats_other_masks(count, pattern):
    kernel, x = _layer(3, 16, 6, n=512)
    x64 = x.astype(np.float64)

    def error(w):
        return float(np.sum((x64 @ kernel - x64 @ np.asarray(w, np.float64)) ** 2))

    mask, updated = sg.sparsegpt_layer(
        kernel, sg.accumulate_hessian(x)[0], count=count, pattern=pattern, blocksize=8
    )
    mask = np.asarray(mask)
    nm = _pattern(pattern)
    if nm is None:
        magnitude = np.asarray(sparsity.magnitude_mask(jnp.asarray(kernel), count))
    else:
        magnitude = np.asarray(structured.magnitude_mask(jnp.asarray(kernel), *nm))
    wanda = _wanda_mask(kernel, x, count, nm)
    pruned = np.count_nonzero(~mask)
    assert np.count_nonzero(~magnitude) == np.count_nonzero(~wanda) == pruned
    with_update = error(updated)
    others = {
        'mask only': error(kernel * mask),
        'wanda': error(kernel * wanda),
        'magnitude': error(kernel * magnitude),
    }
    for name, value in others.items():
        assert with_update < 0.9 * value, (name, with_update, others)


# ----------------------------------------------------------------------------
# (d) Identity Hessian: the saliency is w^2 times one constant, so the mask is magnitude's.
# ----------------------------------------------------------------------------
def _tied_kernel(size, outs):
    """Magnitudes j / 16 (exact squares in float32, far apart), many equal, random signs."""
    rng = np.random.default_rng(4)
    magnitude = rng.integers(1, 9, size=(size, outs)) / 16
    return (magnitude * rng.choice([-1.0, 1.0], size=(size, outs))).astype(np.float32)


@pytest.mark.parametrize('count', [37, 95])
def test_identity_hessian_is_magnitude_pruning(count):
    # H = I + damp I: U is a constant diagonal, so w^2 / U_jj^2 orders as |w| (ties too,
    # the lower flat index pruned first in both), and U has no off-diagonal to spread errors.
    kernel = _tied_kernel(16, 6)
    eye = np.eye(16, dtype=np.float32)
    mask, updated = map(np.asarray, sg.sparsegpt_layer(kernel, eye, count=count, blocksize=16))
    np.testing.assert_array_equal(mask, np.asarray(sparsity.magnitude_mask(kernel, count)))
    np.testing.assert_array_equal(updated, kernel * mask)
    # Several blocks: magnitude pruning within each block, at the block's share.
    mask, updated = map(np.asarray, sg.sparsegpt_layer(kernel, eye, count=count, blocksize=8))
    for start, k in zip((0, 8), sg.block_counts(16, count, 8)):
        block = kernel[start : start + 8]
        np.testing.assert_array_equal(
            mask[start : start + 8], np.asarray(sparsity.magnitude_mask(block, k))
        )
    np.testing.assert_array_equal(updated, kernel * mask)


def test_identity_hessian_nm_is_magnitude_pruning():
    kernel = _tied_kernel(16, 6)
    mask, updated = sg.sparsegpt_layer(kernel, np.eye(16), pattern='2:4', blocksize=8)
    want = np.asarray(structured.magnitude_mask(jnp.asarray(kernel), 2, 4))
    np.testing.assert_array_equal(np.asarray(mask), want)
    np.testing.assert_array_equal(np.asarray(updated), kernel * want)


# ----------------------------------------------------------------------------
# The Hessian helpers, scale invariance, tracing, non-finite solves.
# ----------------------------------------------------------------------------
def test_accumulate_hessian_is_the_running_mean():
    rng = np.random.default_rng(5)
    first, second = rng.normal(size=(3, 5, 16)), rng.normal(size=(2, 7, 16))
    hessian, n = sg.accumulate_hessian(first.astype(np.float32))
    hessian, n = sg.accumulate_hessian(second.astype(np.float32), hessian, n)
    rows = np.concatenate([first.reshape(-1, 16), second.reshape(-1, 16)])
    assert n == 29
    np.testing.assert_allclose(np.asarray(hessian), 2 / 29 * rows.T @ rows, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(sg.input_gram(rows.astype(np.float32))), rows.T @ rows, rtol=1e-5, atol=1e-4
    )


def test_scale_of_the_hessian_changes_nothing_and_traces():
    kernel, x = _layer(6, 16, 6)
    mask, updated = sg.sparsegpt_layer(kernel, sg.accumulate_hessian(x)[0], count=40, blocksize=8)
    jitted = jax.jit(lambda k, h: sg.sparsegpt_layer(k, h, count=40, blocksize=8))
    mask2, updated2 = jitted(kernel, sg.input_gram(x))
    np.testing.assert_array_equal(np.asarray(mask2), np.asarray(mask))
    scale = np.abs(np.asarray(updated)).max()
    np.testing.assert_allclose(np.asarray(updated2), np.asarray(updated), atol=1e-5 * scale)


def test_non_finite_hessian_raises():
    kernel, x = _layer(7, 16, 6)
    hessian = np.asarray(sg.accumulate_hessian(x)[0]).copy()
    hessian[2, 5] = hessian[5, 2] = np.nan
    with pytest.raises(FloatingPointError, match='percdamp=0.01'):
        sg.sparsegpt_layer(kernel, hessian, count=40, blocksize=8)


# ----------------------------------------------------------------------------
# (e) Bad input.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    'changes, message',
    [
        ({'count': -1}, 'count=-1'),
        ({'count': 97}, 'count=97'),
        ({'count': 2.5}, 'count=2.5'),
        ({'count': True}, 'count=True'),
        ({'count': None, 'pattern': '2:3'}, "pattern '2:3' needs the inputs in groups of 3"),
        ({'count': None, 'pattern': '4:2'}, "pattern='4:2' is not N:M"),
        ({'count': None, 'pattern': '2:4', 'blocksize': 6}, 'blocksize=6'),
        ({'pattern': '2:4'}, "count=10, pattern='2:4'"),
        ({'count': None}, 'give exactly one of count= or pattern='),
        ({'blocksize': 0}, 'blocksize=0'),
        ({'percdamp': -0.1}, 'percdamp=-0.1'),
        ({'hessian': np.eye(16)[:, :15]}, 'Hessian has shape (16, 15)'),
        ({'hessian': np.eye(15)}, 'Hessian has shape (15, 15)'),
        ({'kernel': np.ones((2, 8, 6))}, 'kernel has shape (2, 8, 6)'),
    ],
)
def test_bad_input(changes, message):
    args = {'kernel': np.ones((16, 6), np.float32), 'hessian': np.eye(16), 'count': 10}
    args.update(changes)
    with pytest.raises(UserError, match=re.escape(message)):
        sg.sparsegpt_layer(args.pop('kernel'), args.pop('hessian'), **args)


def test_accumulate_hessian_bad_input():
    hessian, n = sg.accumulate_hessian(np.ones((4, 16), np.float32))
    with pytest.raises(UserError, match=re.escape('inputs of shape (4, 12)')):
        sg.accumulate_hessian(np.ones((4, 12), np.float32), hessian, n)
    with pytest.raises(UserError, match=re.escape('positions=4 with hessian=None')):
        sg.accumulate_hessian(np.ones((4, 16), np.float32), None, n)


# ----------------------------------------------------------------------------
# A whole model, block by block.
# ----------------------------------------------------------------------------
import flax.linen as nn  # noqa: E402


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(8, name='proj')(nn.relu(nn.Dense(8, name='fc')(x)))


class _TwoBlocks(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _Block(name='block_0')(x)
        return nn.Dense(3, name='head')(_Block(name='block_1')(x))


def _two_blocks():
    model = _TwoBlocks()
    params = model.init(jax.random.key(0), jnp.zeros((1, 8)))['params']
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(8, 8))
    batches = [(jnp.asarray(rng.normal(size=(32, 8)) @ mix, jnp.float32),) for _ in range(3)]
    return model, params, batches


def test_a_model_is_pruned_block_by_block_on_the_inputs_of_the_pruned_blocks_before():
    model, params, batches = _two_blocks()
    paths = ['block_0/fc/kernel', 'block_0/proj/kernel', 'block_1/fc/kernel', 'block_1/proj/kernel']
    counts = {p: 32 for p in paths}
    masks, updated = sg.prune_model(model, params, batches, counts=counts, blocksize=4)
    flat, new = sparsity.flatten(params), sparsity.flatten(updated)
    np.testing.assert_array_equal(new['head/kernel'], flat['head/kernel'])  # not in counts
    for p in paths:
        assert int(np.sum(~np.asarray(masks[p]))) == 32

    def inputs_of(tree, path):
        from jackpot_jax.baselines import calibration

        grams = [
            calibration.layer_inputs(model, {'params': tree}, x[0], calibration.gram, {path})[path]
            for x in batches
        ]
        return sum(grams)

    # Block 1's fc was solved on the Gram of its inputs through block 0 already updated
    # (block 1 itself still dense), not through the dense block 0.
    half = sparsity.flatten(params)
    half.update({p: new[p] for p in paths[:2]})
    half = sparsity.unflatten(half)
    expect_mask, expect_kernel = sg.sparsegpt_layer(
        flat['block_1/fc/kernel'], inputs_of(half, 'block_1/fc/kernel'), count=32, blocksize=4
    )
    np.testing.assert_array_equal(masks['block_1/fc/kernel'], expect_mask)
    np.testing.assert_allclose(new['block_1/fc/kernel'], expect_kernel, rtol=1e-5, atol=1e-6)
    _, from_dense_inputs = sg.sparsegpt_layer(
        flat['block_1/fc/kernel'], inputs_of(params, 'block_1/fc/kernel'), count=32, blocksize=4
    )
    assert not np.allclose(from_dense_inputs, expect_kernel, atol=1e-3)  # the order matters


def test_a_model_with_an_unused_kernel_is_refused_by_name():
    model, params, batches = _two_blocks()
    with pytest.raises(UserError, match='nowhere/kernel'):
        sg.prune_model(model, params, batches, counts={'nowhere/kernel': 1})
