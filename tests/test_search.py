"""The search step: what changes (scores, masks, BN statistics) and what never does."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jackpot_jax.core import adapters, sparsity, step as step_lib, structured
from jackpot_jax.core.settings import SearchSettings
from jackpot_jax.engine import evaluation
from jackpot_jax.models import zoo

STEPS_PER_EPOCH = 3
EPOCHS = 2


@functools.lru_cache(maxsize=None)
def _setup(sparsity_level=0.8):
    model = zoo.get_model('small_cnn', 10, width=4)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
    params = variables['params']
    flat = sparsity.flatten(params)
    kernels = {p: flat[p] for p in sparsity.prunable_paths(params)}
    counts = sparsity.pruned_counts(kernels, sparsity_level)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, size=8).astype(np.int32)
    return model, variables, kernels, counts, images, labels


def _state(optimizer, **kw):
    model, variables, kernels, counts, _, _ = _setup()
    masks = sparsity.magnitude_masks(kernels, counts)
    scores = sparsity.init_scores(masks)
    fresh = jax.tree.map(jnp.copy, variables)  # the step donates its state
    return step_lib.init_search_state(fresh['params'], fresh['batch_stats'], masks, scores, optimizer)


def _step_fn(optimizer, **settings):
    model, _, _, counts, _, _ = _setup()
    return step_lib.make_search_step(
        model=model,
        optimizer=optimizer,
        counts=counts,
        steps_per_epoch=STEPS_PER_EPOCH,
        epochs=EPOCHS,
        **settings,
    )


def _optimizer():
    return step_lib.sgd_optimizer(0.5, 5e-4, 0.9, EPOCHS, STEPS_PER_EPOCH)


def _run(steps, **settings):
    _, _, _, _, images, labels = _setup()
    optimizer = _optimizer()
    state = _state(optimizer)
    step_fn = _step_fn(optimizer, **settings)
    history = []
    for _ in range(steps):
        state, metrics = step_fn(state, images, labels)
        history.append(jax.device_get(metrics))
    return state, history


def test_first_mask_is_the_magnitude_mask_and_scores_start_at_one_and_pruned_score():
    _, _, kernels, counts, _, _ = _setup()
    state = _state(_optimizer())
    for path, w in kernels.items():
        order = np.argsort(np.abs(np.asarray(w)).ravel(), kind='stable')
        expected = np.ones(w.size, bool)
        expected[order[: counts[path]]] = False
        np.testing.assert_array_equal(np.asarray(state.masks[path]).ravel(), expected)
        np.testing.assert_array_equal(
            np.asarray(state.scores[path]).ravel(), np.where(expected, 1.0, 0.99).astype(np.float32)
        )


@pytest.mark.parametrize(
    'settings',
    [
        {},
        {'rate_schedule': 'poly4'},
        {'rate_schedule': 'cosine'},
        {'mask_update': 'edge_popup'},
        {'bn_mode': 'frozen'},
    ],
)
def test_search_keeps_frozen_params_bit_identical_and_counts_exact(settings):
    _, variables, _, counts, _, _ = _setup()
    before = jax.tree.map(np.array, variables['params'])
    state, history = _run(2 * STEPS_PER_EPOCH, **settings)
    after = jax.tree.map(np.asarray, state.frozen_params)
    jax.tree.map(np.testing.assert_array_equal, before, after)
    for path, k in counts.items():
        mask = np.asarray(state.masks[path])
        assert mask.size - mask.sum() == k, path
    assert int(state.step) == 2 * STEPS_PER_EPOCH
    assert all(np.isfinite(m['loss']) for m in history)
    assert sum(m['mask_changes'] for m in history) > 0  # the search moved the masks
    for m in history:
        assert m['mask_changes'] == sum(m['mask_changes_per_layer'].values())


def test_bn_modes_update_or_keep_running_statistics():
    _, variables, _, _, _, _ = _setup()
    trained, _ = _run(1)
    frozen, _ = _run(1, bn_mode='frozen')
    jax.tree.map(np.testing.assert_array_equal, variables['batch_stats'], frozen.statistics)
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), variables['batch_stats'], trained.statistics
    )
    assert all(jax.tree.leaves(changed))


def test_edge_popup_masks_are_top_scores_after_each_step():
    _, _, _, counts, _, _ = _setup()
    state, _ = _run(2, mask_update='edge_popup')
    for path, k in counts.items():
        magnitude = np.abs(np.asarray(state.scores[path])).ravel()
        kept = np.asarray(state.masks[path]).ravel()
        if k:
            assert magnitude[kept].min() >= magnitude[~kept].max()


def test_gradient_reaches_scores_of_pruned_weights_straight_through():
    """dL/ds = dL/d(W B) * W, so pruned weights get gradient too (nonzero W)."""
    model, variables, _, counts, images, labels = _setup()
    state = _state(_optimizer())

    def loss(scores):
        params = sparsity.masked_params(state.frozen_params, state.masks, scores)
        logits, _ = model.apply(
            {'params': params, 'batch_stats': state.statistics},
            images,
            train=True,
            mutable=['batch_stats'],
        )
        return step_lib.cross_entropy(logits, labels)

    grads = jax.grad(loss)(state.scores)
    for path in counts:
        g = np.asarray(grads[path])
        pruned = ~np.asarray(state.masks[path])
        assert np.abs(g[pruned]).sum() > 0, path


def test_sgd_matches_pytorch_update_rule_with_decay_before_momentum():
    lr, wd, mom = 0.1, 0.01, 0.9
    optimizer = step_lib.sgd_optimizer(lr, wd, mom, epochs=4, steps_per_epoch=100)
    p = jnp.array([1.0, -2.0])
    g = jnp.array([0.5, 0.25])
    state = optimizer.init(p)
    buf = np.zeros(2)
    expected = np.array([1.0, -2.0])
    for _ in range(3):
        updates, state = optimizer.update(g, state, p)
        p = optax.apply_updates(p, updates)
        d = np.array([0.5, 0.25]) + wd * expected  # PyTorch: d_p = g + wd * p
        buf = mom * buf + d  # buf = momentum * buf + d_p (dampening 0)
        expected = expected - lr * buf  # epoch 0: cosine factor 1
    np.testing.assert_allclose(np.asarray(p), expected, rtol=1e-6)


def test_learning_rate_is_a_per_epoch_cosine():
    schedule = step_lib.epoch_cosine(0.1, epochs=4, steps_per_epoch=10)
    expected = [0.05 * (1 + np.cos(np.pi * e / 4)) for e in range(4)]
    got = [float(schedule(step)) for step in (0, 9, 10, 19, 20, 30, 39)]
    np.testing.assert_allclose(
        got,
        [expected[0], expected[0], expected[1], expected[1], expected[2], expected[3], expected[3]],
        rtol=1e-6,
    )


def test_label_smoothing_changes_the_loss():
    logits = jnp.array([[4.0, 0.0, -1.0]])
    labels = jnp.array([0])
    plain = float(step_lib.cross_entropy(logits, labels))
    smooth = float(step_lib.cross_entropy(logits, labels, 0.1))
    log_p = jax.nn.log_softmax(logits)[0]
    expected = -(0.9 + 0.1 / 3) * log_p[0] - (0.1 / 3) * (log_p[1] + log_p[2])
    assert smooth == pytest.approx(float(expected), rel=1e-6)
    assert smooth > plain


def test_evaluation_counts_only_valid_examples():
    model, variables, _, _, images, labels = _setup()
    logits = model.apply(variables, images, train=False)
    top1 = np.asarray(jnp.argmax(logits, -1))
    valid = np.array([True] * 5 + [False] * 3)
    forward = adapters.linen_forward(model, 'batch_stats')
    out = evaluation.evaluate_metrics(
        forward, variables['params'], variables['batch_stats'], [(images, labels, valid)]
    )
    assert out['examples'] == 5
    assert out['top1'] == np.sum((top1 == labels) & valid) / 5
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    assert out['top5'] == np.sum((top5 == labels[:, None]).any(-1) & valid) / 5
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    assert out['loss'] == pytest.approx(float(np.sum(np.where(valid, losses, 0.0))) / 5, rel=1e-6)
    assert out['perplexity'] == pytest.approx(np.exp(out['loss']))


def test_unknown_bn_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown bn_mode 'nope'; choose one of train, frozen"):
        SearchSettings(bn_mode='nope').check()


# ----------------------------------------------------------------------------
# The mask update is one loop for all layers, not one per layer.
# ----------------------------------------------------------------------------
def _while_loops(jaxpr) -> int:
    """Loops (while, and scan: a fori_loop with static bounds) in a jaxpr and every
    jaxpr nested in it (each call counted)."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name in ('while', 'scan')
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, 'jaxpr', sub)  # a closed jaxpr holds its jaxpr
                if hasattr(sub, 'eqns'):
                    count += _while_loops(sub)
    return count


def _traced_step(model, image_size, counts_of, **settings):
    """The search step traced on shapes only (nothing is allocated or run)."""
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    )
    flat = sparsity.flatten(variables['params'])
    paths = sparsity.prunable_paths(variables['params'])
    counts = counts_of({p: flat[p].shape for p in paths})
    masks = {p: jax.ShapeDtypeStruct(flat[p].shape, jnp.bool_) for p in paths}
    scores = {p: jax.ShapeDtypeStruct(flat[p].shape, jnp.float32) for p in paths}
    optimizer = _optimizer()
    state = jax.eval_shape(
        lambda p, b, m, s: step_lib.init_search_state(p, b, m, s, optimizer),
        variables['params'],
        variables['batch_stats'],
        masks,
        scores,
    )
    step = step_lib.make_search_step(
        model=model,
        optimizer=optimizer,
        counts=counts,
        steps_per_epoch=STEPS_PER_EPOCH,
        epochs=EPOCHS,
        **settings,
    )
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)
    return step.trace(state, images, labels), len(paths)


def test_resnet50_search_step_has_one_mask_update_loop_for_its_53_layers():
    """Lowered ResNet-50 search step: the mask update is ONE while loop (32 passes over
    every layer at once), where a loop per layer would give 53."""
    model = zoo.get_model('resnet50', 1000)
    traced, layers = _traced_step(
        model, 64, lambda shapes: sparsity.uniform_allocation(shapes, 0.9)
    )
    assert layers == 53
    lowered = traced.lower().as_text()
    assert lowered.count('stablehlo.while') == 1
    assert _while_loops(traced.jaxpr.jaxpr) == 1  # also when a nested function is reused


def test_mask_update_loops_per_rule():
    """Rate 1: one loop; rate < 1: one more, for the revival and drop selections of all
    layers together; edge-popup: one; N:M groups: none; no layer to prune: none."""
    model = zoo.get_model('small_cnn', 10, width=4)
    uniform = lambda shapes: sparsity.uniform_allocation(shapes, 0.9)  # noqa: E731
    cases = [
        ({}, uniform, 1),
        ({'rate_schedule': 'cosine'}, uniform, 2),
        ({'mask_update': 'edge_popup'}, uniform, 1),
        ({'pattern': (2, 4)}, lambda shapes: structured.nm_counts(shapes, 2, 4), 0),
        ({}, lambda shapes: {p: 0 for p in shapes}, 0),
    ]
    for settings, counts_of, loops in cases:
        traced, _ = _traced_step(model, 8, counts_of, **settings)
        assert _while_loops(traced.jaxpr.jaxpr) == loops, settings
