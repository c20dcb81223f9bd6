"""Pruning criteria at fixed per-layer counts: exact counts, hand-checked rankings."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jackpot_jax import criteria, models, parallel, sparsity

import tiny_model  # tests/tiny_model.py


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
    model = models.get_model('small_cnn', 10, width=4)
    flat = sparsity.flatten(v['params'])
    kernels = {p: flat[p] for p in sparsity.prunable_paths(v['params'])}
    counts = sparsity.pruned_counts(kernels, 0.9)
    mesh = parallel.make_mesh()
    params, batch_stats = parallel.replicate((v['params'], v['batch_stats']), mesh)
    rng = np.random.default_rng(1)
    batch = parallel.shard_batch(
        mesh,
        rng.normal(size=(32, 8, 8, 1)).astype(np.float32),
        rng.integers(0, 10, 32).astype(np.int32),
    )
    found = {
        name: criteria.criterion_masks(
            name, model, params, batch_stats, counts, batch=batch, rng=jax.random.key(1)
        )
        for name in criteria.CRITERIA
    }
    return model, {'params': params, 'batch_stats': batch_stats}, kernels, counts, batch, found


def test_every_criterion_keeps_exactly_n_minus_k_per_layer(small_cnn):
    _, _, kernels, counts, _, masks = small_cnn
    assert set(masks) == {'magnitude', 'random', 'snip', 'grasp', 'synflow'}
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
    got = snip(params=params, batch_stats={}, batch=(x, y))
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
