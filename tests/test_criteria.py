"""Pruning criteria at fixed per-layer counts: exact counts, hand-checked rankings."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_model  # tests/tiny_model.py

from jackpot_jax.baselines import criteria, wanda
from jackpot_jax.core import parallel, sparsity
from jackpot_jax.models import zoo


class OneDense(nn.Module):
    """logits = flatten(x) @ W, no bias, no BatchNorm: every criterion is hand-computable."""

    features: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.features, use_bias=False, name='dense')(x)


W = np.array([[0.5, -1.0, 0.25], [2.0, 0.1, -0.3], [-0.7, 0.6, 1.5], [0.05, -1.2, 0.8]], np.float32)


def dense_batch(seed=0, size=8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, 4)).astype(np.float32)
    y = rng.integers(0, 3, size).astype(np.int32)
    return x, y


def masks(scores, counts):
    """sparsity.masks_from_scores (criteria rank with it), jitted (eager is slow)."""
    return jax.jit(functools.partial(sparsity.masks_from_scores, counts=counts))(scores)


def pruned_by_stable_rank(score, k):
    """Expected mask: prune the k lowest scores, ties by the lower flat index."""
    order = np.argsort(score.ravel(), kind='stable')
    keep = np.ones(score.size, bool)
    keep[order[:k]] = False
    return keep.reshape(score.shape)


@pytest.fixture(scope='module')
def small_cnn():
    """Every criterion on small_cnn(width 4) at 90%, placed as the 'overlap' mode places it.

    Same weights (tests/tiny_model.py), counts, batch shape and shardings as
    tests/test_studies.py, so in one pytest run the compiled criteria are shared.
    """
    v = tiny_model.variables(width=4)
    model = zoo.get_model('small_cnn', 10, width=4)
    flat = sparsity.flatten(v['params'])
    kernels = {p: flat[p] for p in sparsity.prunable_paths(v['params'])}
    counts = sparsity.pruned_counts(kernels, 0.9)
    mesh = parallel.make_mesh()
    params, statistics = parallel.replicate((v['params'], v['batch_stats']), mesh)
    rng = np.random.default_rng(1)
    batch = parallel.shard_batch(
        mesh,
        rng.normal(size=(32, 8, 8, 1)).astype(np.float32),
        rng.integers(0, 10, 32).astype(np.int32),
    )
    found = {
        name: criteria.criterion_masks(
            name, model, params, statistics, counts, batch=batch, rng=jax.random.key(1)
        )
        for name in criteria.CRITERIA
    }
    return model, {'params': params, 'batch_stats': statistics}, kernels, counts, batch, found


def test_every_criterion_keeps_exactly_n_minus_k_per_layer(small_cnn):
    _, _, kernels, counts, _, masks = small_cnn
    assert set(masks) == {'magnitude', 'random', 'snip', 'grasp', 'synflow', 'wanda'}
    for name, found in masks.items():
        assert set(found) == set(counts), name
        for path, k in counts.items():
            m = np.asarray(found[path])
            assert m.dtype == bool and m.shape == kernels[path].shape, (name, path)
            assert m.size - m.sum() == k, (name, path)


def test_magnitude_and_random_equal_the_sparsity_module_masks(small_cnn):
    _, _, kernels, counts, _, masks = small_cnn
    random = jax.jit(functools.partial(sparsity.random_masks, counts=counts))
    want_random = random(jax.random.key(1), kernels)
    for path, k in counts.items():
        want = pruned_by_stable_rank(np.abs(kernels[path]), k)
        np.testing.assert_array_equal(masks['magnitude'][path], want, err_msg=path)
        np.testing.assert_array_equal(masks['random'][path], want_random[path], err_msg=path)


def test_snip_ranks_by_abs_gradient_times_weight_on_a_dense_layer():
    x, y = dense_batch()
    logits = x @ W
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = x.T @ (p - np.eye(3)[y]) / len(x)  # d mean-CE / dW
    score = np.abs(grad * W)
    params = {'dense': {'kernel': jnp.asarray(W)}}
    snip = jax.jit(functools.partial(criteria.snip_scores, OneDense(), paths=('dense/kernel',)))
    got = snip(params=params, statistics={}, batch=(x, y))
    np.testing.assert_allclose(got['dense/kernel'], score, rtol=1e-5, atol=1e-7)
    for k in (1, 5, 11):
        masks = criteria.criterion_masks(
            'snip', OneDense(), params, {}, {'dense/kernel': k}, batch=(x, y)
        )
        np.testing.assert_array_equal(masks['dense/kernel'], pruned_by_stable_rank(score, k))


def test_grasp_prunes_the_highest_minus_w_hg_on_a_quadratic():
    # L(w) = w^T A w / 2: g = A w = (1, -2, 2, 2), H g = A g = (0, -5, 2, 4),
    # GraSP's S = -w * Hg = (0, -5, -4, -4); GraSP removes the highest S first.
    a = jnp.array([[2.0, 1, 0, 0], [1, 3, 0, 0], [0, 0, 1, 0], [0, 0, 0, 2]])
    w = {'w': jnp.array([1.0, -1.0, 2.0, 1.0])}
    quadratic = functools.partial(
        criteria.gradient_flow_keep_scores, lambda k: 0.5 * k['w'] @ a @ k['w']
    )
    keep = jax.jit(quadratic)(w)
    np.testing.assert_allclose(keep['w'], [0.0, 5.0, 4.0, 4.0])
    np.testing.assert_array_equal(masks(keep, {'w': 1})['w'], [0, 1, 1, 1])  # S = 0 goes first
    np.testing.assert_array_equal(masks(keep, {'w': 2})['w'], [0, 1, 0, 1])  # tie: lower index
    # Magnitude would prune indices 0 and 1 instead (|w| = 1, 1, 2, 1).
    np.testing.assert_array_equal(pruned_by_stable_rank(np.abs(w['w']), 2), [0, 0, 1, 1])


def test_grasp_scores_equal_w_times_the_explicit_hessian_gradient_product():
    x, y = dense_batch(seed=3)
    params = {'dense': {'kernel': jnp.asarray(W)}}

    def loss(flat_w):
        logits = x @ flat_w.reshape(W.shape)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    @jax.jit
    def both(params):
        w = params['dense']['kernel'].ravel()
        expected = w * (jax.hessian(loss)(w) @ jax.grad(loss)(w))
        got = criteria.grasp_scores(OneDense(), params, {}, ('dense/kernel',), (x, y))
        return expected.reshape(W.shape), got['dense/kernel']

    expected, got = both(params)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-8)


def test_synflow_is_data_free_and_deterministic(small_cnn):
    model, v, _, counts, batch, masks = small_cnn
    for _ in range(2):
        free = criteria.criterion_masks(
            'synflow', model, v['params'], v['batch_stats'], counts, input_shape=(8, 8, 1)
        )
        other = (np.full((4, 8, 8, 1), 5.0, np.float32), np.zeros(4, np.int32))
        with_other_data = criteria.criterion_masks(
            'synflow', model, v['params'], v['batch_stats'], counts, batch=other
        )
        for path in counts:
            np.testing.assert_array_equal(free[path], masks['synflow'][path])
            np.testing.assert_array_equal(with_other_data[path], masks['synflow'][path])
    # One linear layer on an all-ones input: dR/dw = 1, so SynFlow is |w|, i.e. magnitude.
    params = {'dense': {'kernel': jnp.asarray(W)}}
    for k in (2, 7):
        got = criteria.criterion_masks(
            'synflow', OneDense(), params, {}, {'dense/kernel': k}, input_shape=(4,)
        )
        np.testing.assert_array_equal(got['dense/kernel'], pruned_by_stable_rank(np.abs(W), k))


def test_ties_prune_the_lower_flat_index_first():
    got = masks({'a': jnp.array([[1.0, 1.0], [1.0, 0.0]])}, {'a': 2})
    np.testing.assert_array_equal(got['a'], [[False, True], [True, False]])


def test_missing_inputs_and_unknown_names_are_explained():
    params = {'dense': {'kernel': jnp.asarray(W)}}
    counts = {'dense/kernel': 3}
    with pytest.raises(ValueError, match='unknown criterion'):
        criteria.criterion_masks('obd', OneDense(), params, {}, counts)
    for name in ('snip', 'grasp'):
        with pytest.raises(ValueError, match='needs a data batch'):
            criteria.criterion_masks(name, OneDense(), params, {}, counts)
    with pytest.raises(ValueError, match='needs rng'):
        criteria.criterion_masks('random', OneDense(), params, {}, counts)
    with pytest.raises(ValueError, match='needs input_shape'):
        criteria.criterion_masks('synflow', OneDense(), params, {}, counts)


# ----------------------------------------------------------------------------
# Wanda: |w| ||X_j||, compared within each output row.
# ----------------------------------------------------------------------------
class TwoDense(nn.Module):
    """relu(x W1 + b1) W2 + b2: the second layer's input is the first one's activation."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(8, name='hidden')(x))
        return nn.Dense(4, name='out')(x)


def _two_dense(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        'hidden': {
            'kernel': rng.normal(size=(6, 8)).astype(np.float32),
            'bias': rng.normal(size=8).astype(np.float32),
        },
        'out': {
            'kernel': rng.normal(size=(8, 4)).astype(np.float32),
            'bias': rng.normal(size=4).astype(np.float32),
        },
    }
    batches = [rng.normal(size=(5, 3, 6)).astype(np.float32) for _ in range(2)]  # [B, T, in]
    return params, batches


def _numpy_wanda_scores(params, batches):
    """The reference: input norms over every example and position of every batch."""
    x = np.concatenate([b.reshape(-1, 6) for b in batches]).astype(np.float64)
    h = np.maximum(x @ params['hidden']['kernel'] + params['hidden']['bias'], 0.0)
    return {
        'hidden/kernel': np.abs(params['hidden']['kernel']) * np.linalg.norm(x, axis=0)[:, None],
        'out/kernel': np.abs(params['out']['kernel']) * np.linalg.norm(h, axis=0)[:, None],
    }


def _numpy_row_mask(score, pruned_per_row):
    """Each output (column of the (in, out) kernel) prunes its lowest scores."""
    keep = np.ones(score.shape, bool)
    for j in range(score.shape[1]):
        keep[np.argsort(score[:, j], kind='stable')[: pruned_per_row[j]], j] = False
    return keep


def test_wanda_norms_and_scores_match_a_numpy_reference_over_two_batches():
    params, batches = _two_dense()
    paths = ('hidden/kernel', 'out/kernel')
    norms = wanda.activation_norms(TwoDense(), params, {}, paths, batches)
    want = _numpy_wanda_scores(params, batches)
    for p in paths:
        got = wanda.wanda_keep_scores({p: params[p.split('/')[0]]['kernel']}, norms)[p]
        np.testing.assert_allclose(got, want[p], rtol=1e-5, err_msg=p)


def test_wanda_keeps_the_same_share_of_every_output_row():
    params, batches = _two_dense()
    found = wanda.wanda_masks(
        TwoDense(), params, {}, batches, sparsity=0.5, paths=('hidden/kernel', 'out/kernel')
    )
    want = _numpy_wanda_scores(params, batches)
    for p, k_row in (('hidden/kernel', 3), ('out/kernel', 4)):
        m = np.asarray(found[p])
        np.testing.assert_array_equal(m, _numpy_row_mask(want[p], [k_row] * m.shape[1]))
        assert (m.sum(axis=0) == m.shape[0] - k_row).all(), p
    # A layer count that does not divide by the rows: the first rows prune one more.
    got = wanda.wanda_masks(TwoDense(), params, {}, batches, counts={'out/kernel': 14})
    np.testing.assert_array_equal(
        got['out/kernel'], _numpy_row_mask(want['out/kernel'], [4, 4, 3, 3])
    )


def test_wanda_two_four_prunes_two_of_every_four_inputs_of_each_output():
    params, batches = _two_dense()
    found = wanda.wanda_masks(
        TwoDense(), params, {}, batches, pattern='2:4', paths=('hidden/kernel', 'out/kernel')
    )
    want = _numpy_wanda_scores(params, batches)
    # hidden has 6 inputs (not a multiple of 4): it stays dense.
    assert np.asarray(found['hidden/kernel']).all()
    score, m = want['out/kernel'], np.asarray(found['out/kernel'])
    for j in range(4):
        for g in range(2):
            group = score[4 * g : 4 * g + 4, j]
            kept = np.zeros(4, bool)
            kept[np.argsort(group, kind='stable')[2:]] = True
            np.testing.assert_array_equal(m[4 * g : 4 * g + 4, j], kept)


def test_wanda_as_a_criterion_uses_its_batch_and_ranks_per_row():
    params, batches = _two_dense()
    counts = {'hidden/kernel': 24, 'out/kernel': 16}
    found = criteria.criterion_masks('wanda', TwoDense(), params, {}, counts, batch=(batches[0],))
    want = _numpy_wanda_scores(params, batches[:1])
    for p, k_row in (('hidden/kernel', 3), ('out/kernel', 4)):
        want_mask = _numpy_row_mask(want[p], [k_row] * want[p].shape[1])
        np.testing.assert_array_equal(found[p], want_mask, err_msg=p)
    with pytest.raises(ValueError, match='needs a data batch'):
        criteria.criterion_masks('wanda', TwoDense(), params, {}, counts)
    with pytest.raises(ValueError, match='exactly one of sparsity=, counts= or pattern='):
        wanda.wanda_masks(TwoDense(), params, {}, batches, sparsity=0.5, pattern='2:4')
    with pytest.raises(ValueError, match='no calibration batch'):
        wanda.wanda_masks(TwoDense(), params, {}, [], sparsity=0.5)
