"""The library API: find_jackpot on Linen models without BatchNorm, with dropout, on NNX
modules, and the building blocks it is made of."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jackpot_jax
from jackpot_jax.core import adapters, sparsity, step as step_lib
from jackpot_jax.engine import api, evaluation

NUM_CLASSES = 4


def _batches(n=4, size=16, seed=0):
    """Learnable data: the class is the sign pattern of two pixel means."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=(size, 4, 4, 1)).astype(np.float32)
        y = (2 * (x[:, :2].mean((1, 2, 3)) > 0) + (x[:, 2:].mean((1, 2, 3)) > 0)).astype(np.int32)
        out.append((x, y))
    return out


class Mlp(nn.Module):
    """No BatchNorm and no train-mode keyword at all."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, name='hidden')(x.reshape(len(x), -1)))
        return nn.Dense(NUM_CLASSES, name='head')(x)


class DropoutMlp(nn.Module):
    """Dropout, switched by ``deterministic`` (Flax's own convention)."""

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = nn.relu(nn.Dense(32, name='hidden')(x.reshape(len(x), -1)))
        x = nn.Dropout(0.5)(x, deterministic=deterministic)
        return nn.Dense(NUM_CLASSES, name='head')(x)


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(16, 32, rngs=rngs)
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(32, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.hidden(x.reshape(len(x), -1))))
        return self.head(self.drop(x))


SEARCH = dict(sparsity=0.75, epochs=2, prune_exclude='^head/', learning_rate=0.5)


@functools.lru_cache(maxsize=None)
def _linen(cls):
    model = cls()
    return model, model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))


def _frozen_kernel_kept_exactly(jackpot, params):
    """The jackpot's params are W * mask, bit for bit; the mask keeps exactly the plan."""
    w = sparsity.flatten(params)['hidden/kernel']
    mask = np.asarray(jackpot.masks['hidden/kernel'])
    np.testing.assert_array_equal(
        sparsity.flatten(jackpot.params)['hidden/kernel'], np.where(mask, w, 0)
    )
    assert mask.size - mask.sum() == jackpot.counts['hidden/kernel'] == int(0.75 * mask.size)


def _reference_search(model, variables, batches, epochs, stop_after, optimizer=None):
    """The building blocks by hand: the search of ``epochs`` epochs (default optimizer: the
    paper's SGD) stopped after ``stop_after`` of them; its (masks, scores, statistics)."""
    kernels = jackpot_jax.prunable_kernels(variables['params'], exclude='^head/')
    counts = jackpot_jax.plan_counts(kernels, SEARCH['sparsity'])
    masks, scores = jackpot_jax.initial_masks_and_scores(kernels, counts)
    if optimizer is None:
        optimizer = step_lib.sgd_optimizer(SEARCH['learning_rate'], 5e-4, 0.9, epochs, len(batches))
    collections = tuple(name for name in variables if name != 'params')
    state = jackpot_jax.init_search_state(
        jax.tree.map(jnp.copy, variables['params']),
        jax.tree.map(jnp.copy, {name: variables[name] for name in collections}),
        masks,
        scores,
        optimizer,
    )
    step = jackpot_jax.make_search_step(
        forward=jackpot_jax.linen_forward(model, collections),
        optimizer=optimizer,
        counts=counts,
        steps_per_epoch=len(batches),
        epochs=epochs,
        rng=jax.random.split(jax.random.key(0))[1],
    )
    for _ in range(stop_after):
        for images, labels in batches:
            state, _ = step(state, images, labels)
    return state.masks, state.scores, state.statistics


def test_batchnorm_free_linen_model():
    model, variables = _linen(Mlp)
    batches = _batches()
    jackpot = jackpot_jax.find_jackpot(model, variables, batches, eval_batches=batches, **SEARCH)
    _frozen_kernel_kept_exactly(jackpot, variables['params'])
    assert jackpot.statistics == {}
    assert sparsity.flatten(jackpot.params)['head/kernel'] is not None
    np.testing.assert_array_equal(  # the head is excluded: left as it was
        sparsity.flatten(jackpot.params)['head/kernel'],
        sparsity.flatten(variables['params'])['head/kernel'],
    )
    epochs = jackpot.report['epochs']
    assert [r['epoch'] for r in epochs] == [1, 2]
    assert epochs[-1]['train_loss'] < epochs[0]['train_loss']
    assert epochs[0]['mask_changes'] > 0
    assert set(epochs[0]['mask_changes_per_layer']) == {'hidden/kernel'}
    assert jackpot.report['sparsity']['sparsity'] == pytest.approx(0.75)
    images = batches[0][0]
    np.testing.assert_allclose(
        jackpot.predict(images), model.apply(jackpot.variables, images), rtol=1e-6
    )
    assert jackpot.evaluate(batches) == epochs[-1]['eval_top1']
    assert 'hidden/kernel' in jackpot.summary()


def test_building_blocks_make_the_same_search_with_any_optax_optimizer():
    """A hand-written loop over the exported pieces equals find_jackpot, here with Adam."""
    model, variables = _linen(Mlp)
    batches = _batches()
    adam = optax.adam(0.05)  # its own learning rate: SEARCH's would be refused
    search = {k: v for k, v in SEARCH.items() if k != 'learning_rate'}
    found = jackpot_jax.find_jackpot(model, variables, batches, optimizer=adam, **search)
    masks, scores, _ = _reference_search(model, variables, batches, 2, stop_after=2, optimizer=adam)
    for path in masks:
        np.testing.assert_array_equal(masks[path], found.masks[path])
        np.testing.assert_array_equal(scores[path], found.scores[path])


def test_dropout_model_uses_the_rng_folded_with_the_step():
    model, variables = _linen(DropoutMlp)
    batches = _batches()
    search = functools.partial(
        jackpot_jax.find_jackpot, model, variables, batches, **{**SEARCH, 'epochs': 1}
    )
    a, b, c = search(rng=1), search(rng=1), search(rng=2)
    scores = lambda j: np.asarray(j.scores['hidden/kernel'])  # noqa: E731
    np.testing.assert_array_equal(scores(a), scores(b))  # deterministic given the key
    assert not np.array_equal(scores(a), scores(c))  # and the dropout masks do depend on it
    # Evaluation runs with deterministic=True: no dropout, same logits every call.
    np.testing.assert_array_equal(a.predict(batches[0][0]), a.predict(batches[0][0]))
    np.testing.assert_allclose(
        a.predict(batches[0][0]),
        model.apply(a.variables, batches[0][0], deterministic=True),
        rtol=1e-6,
    )


def test_nnx_module_with_batchnorm_and_dropout():
    net = NnxNet(nnx.Rngs(0))
    _, before, _ = nnx.split(net, nnx.Param, ...)
    batches = _batches()
    jackpot = jackpot_jax.find_jackpot(net, None, batches, eval_batches=batches, **SEARCH)
    _frozen_kernel_kept_exactly(jackpot, adapters._string_keys(nnx.to_pure_dict(before)))
    # BatchNorm statistics moved in train mode; the dropout stream advanced once per step
    # and once per batch of the re-estimation under the last masks (50, the stable protocol).
    stats = sparsity.flatten(jackpot.statistics)
    assert np.abs(stats['norm/mean']).sum() > 0
    assert int(stats['drop/rngs/count']) == 2 * len(batches) + 50
    epochs = jackpot.report['epochs']
    assert epochs[-1]['train_loss'] < epochs[0]['train_loss']
    assert epochs[-1]['eval_top1'] > 0.25  # chance
    module = jackpot.module()  # an NNX module holding the jackpot
    module.eval()
    np.testing.assert_allclose(module(batches[0][0]), jackpot.predict(batches[0][0]), rtol=1e-6)
    # The user's own module is untouched.
    _, after, _ = nnx.split(net, nnx.Param, ...)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(before), nnx.to_pure_dict(after))


# ----------------------------------------------------------------------------
# The protocol: mask freeze, re-estimated statistics, the epoch best on validation.
# ----------------------------------------------------------------------------
class BnMlp(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(32, name='hidden')(x.reshape(len(x), -1))
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5, name='norm')(x))
        return nn.Dense(NUM_CLASSES, name='head')(x)


@pytest.mark.parametrize(
    'validation_top1, kept', [((0.5, 0.9, 0.6), 2), ((0.9, 0.9, 0.6), 2), ((0.5, 0.6, 0.7), 3)]
)
def test_stable_protocol_returns_the_epoch_best_on_validation(monkeypatch, validation_top1, kept):
    """Scripted validation top-1 per epoch; the jackpot returned is the chosen epoch's masks
    and scores, with statistics re-estimated under its masks (latest epoch on ties)."""
    model, variables = _linen(BnMlp)
    batches, validation = _batches(), _batches(n=1, seed=1)
    script = iter(validation_top1)
    real_evaluate = api.evaluate
    real_metrics = evaluation.evaluate_metrics

    def scripted(fwd, p, s, b, **kwargs):
        if b is validation:
            return {'top1': next(script), 'examples': 1000}
        return real_metrics(fwd, p, s, b, **kwargs)

    monkeypatch.setattr(evaluation, 'evaluate_metrics', scripted)
    search_ = {**SEARCH, 'epochs': 3, 'selection_rule': 'best'}
    jackpot = jackpot_jax.find_jackpot(
        model, variables, batches, validation_batches=validation, eval_batches=batches, **search_
    )
    assert jackpot.report['chosen_epoch'] == kept
    assert jackpot.report['selection_rule'] == 'best'
    assert [r['validation_top1'] for r in jackpot.report['epochs']] == list(validation_top1)
    assert f'chosen epoch: epoch {kept} (the best' in jackpot.summary()

    masks, scores, running = _reference_search(model, variables, batches, 3, stop_after=kept)
    np.testing.assert_array_equal(jackpot.masks['hidden/kernel'], masks['hidden/kernel'])
    np.testing.assert_array_equal(jackpot.scores['hidden/kernel'], scores['hidden/kernel'])
    masked = sparsity.masked_params(variables['params'], masks)
    forward = jackpot_jax.linen_forward(model, ('batch_stats',))
    fresh = evaluation.reestimate_statistics(
        forward, masked, running, batches, 50, rng=jax.random.fold_in(jax.random.key(0), 1)
    )
    jax.tree.map(np.testing.assert_array_equal, jackpot.statistics, fresh)
    assert not np.allclose(  # re-estimated: not the running statistics of that epoch
        jackpot.statistics['batch_stats']['norm']['mean'], running['batch_stats']['norm']['mean']
    )
    # What the report says of the chosen epoch is what the jackpot scores.
    assert real_evaluate(forward, jackpot.params, jackpot.statistics, batches) == (
        jackpot.report['epochs'][kept - 1]['eval_top1']
    )


def test_paper_protocol_is_the_plain_search_and_keeps_the_last_epoch():
    model, variables = _linen(BnMlp)
    batches = _batches()
    jackpot = jackpot_jax.find_jackpot(
        model, variables, batches, protocol='paper', validation_batches=batches,
        **{**SEARCH, 'epochs': 3},
    )
    assert jackpot.report['chosen_epoch'] == 3 and jackpot.report['selection_rule'] == 'last'
    masks, scores, running = _reference_search(model, variables, batches, 3, stop_after=3)
    np.testing.assert_array_equal(jackpot.masks['hidden/kernel'], masks['hidden/kernel'])
    np.testing.assert_array_equal(jackpot.scores['hidden/kernel'], scores['hidden/kernel'])
    jax.tree.map(np.testing.assert_array_equal, jackpot.statistics, running)


@pytest.mark.parametrize('protocol, frozen', [('stable', True), ('paper', False)])
def test_stable_protocol_freezes_the_masks_for_the_last_quarter(protocol, frozen):
    model, variables = _linen(Mlp)
    jackpot = jackpot_jax.find_jackpot(
        model, variables, _batches(), protocol=protocol, **{**SEARCH, 'epochs': 4}
    )
    changes = [r['mask_changes'] for r in jackpot.report['epochs']]
    assert changes[2] > 0
    assert (changes[3] == 0) == frozen


@pytest.mark.parametrize('margin, moves', [(0.0, True), (1.0, False)])
def test_swap_margin_holds_the_masks_until_a_score_clears_it(margin, moves):
    """Scores start at 1.0 (kept) and 0.99 (pruned): a margin of 1 is never cleared."""
    model, variables = _linen(Mlp)
    jackpot = jackpot_jax.find_jackpot(
        model, variables, _batches(), protocol='paper', swap_margin=margin, **SEARCH
    )
    assert (sum(r['mask_changes'] for r in jackpot.report['epochs']) > 0) == moves


@pytest.mark.parametrize(
    'options, message',
    [
        ({'selection_rule': 'best'}, 'pass validation_batches='),
        ({'selection_rule': 'bestest'}, "unknown selection_rule 'bestest'"),
        ({'protocol': 'fast'}, "unknown protocol 'fast'; choose one of stable, paper"),
        ({'mask_freeze_fraction': 1.0}, r'mask_freeze_fraction must be in \[0, 1\)'),
        ({'reestimation_steps': -1}, 'reestimation_steps must be >= 0'),
        ({'swap_margin': -1.0}, r'swap_margin must be >= 0 \(0 = no margin\)'),
        ({'swap_margin': 0.1, 'mask_update': 'edge_popup'}, 'applies to the short restriction'),
    ],
)
def test_bad_protocol_options_are_named(options, message):
    model, variables = _linen(Mlp)
    with pytest.raises(ValueError, match=message):
        jackpot_jax.find_jackpot(model, variables, _batches(), **{**SEARCH, **options})


# ----------------------------------------------------------------------------
# Train-mode keywords and bad input.
# ----------------------------------------------------------------------------
def test_train_mode_keywords_are_read_from_the_signature():
    assert adapters.train_mode_kwargs(DropoutMlp().__call__) == {'deterministic': False}
    assert adapters.train_mode_kwargs(Mlp().__call__) == {}
    assert adapters.train_mode_kwargs(lambda x, training=False: x) == {'training': True}
    assert adapters.eval_mode_kwargs({'deterministic': False, 'mode': 'x'}) == {
        'deterministic': True,
        'mode': 'x',
    }


def test_a_train_keyword_the_model_does_not_take_is_named():
    model, variables = _linen(DropoutMlp)
    with pytest.raises(ValueError, match=r"takes no keyword 'train'.*train_kwargs"):
        jackpot_jax.find_jackpot(model, variables, _batches(), train_kwargs={'train': True})


@pytest.mark.parametrize(
    'model, variables, message',
    [
        ('not a model', {'params': {}}, 'pass a flax.linen.Module'),
        (Mlp(), {'batch_stats': {}}, "variables must be a mapping with 'params'"),
        (NnxNet(nnx.Rngs(0)), {'params': {}}, 'an NNX module holds its own variables'),
    ],
)
def test_bad_models_and_variables_say_what_to_pass(model, variables, message):
    with pytest.raises((TypeError, ValueError), match=message):
        jackpot_jax.find_jackpot(model, variables, _batches(), **SEARCH)


def test_batches_without_len_need_steps_per_epoch():
    model, variables = _linen(Mlp)
    with pytest.raises(ValueError, match='steps_per_epoch'):
        jackpot_jax.find_jackpot(model, variables, iter(_batches()), **SEARCH)
