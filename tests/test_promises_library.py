"""The library keeps its promises (docs/troubleshooting.md, "What the library promises"):
nothing of the caller's is overwritten, consumed or ignored, a resume matches everything
that decides the result, a metric's direction is stated, and a custom loss is checked
before the first step. One test per known way each promise was once broken."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jackpot_jax
from jackpot_jax.core import step as step_lib
from jackpot_jax.core.settings import SearchSettings
from jackpot_jax.io import checkpoint, workdir as workdir_lib
from tiny_model import fault_at_step  # tests/tiny_model.py

CLASSES = 4


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(32, name='hidden')(x.reshape(len(x), -1)))
        return nn.Dense(CLASSES, name='head')(x)


class TanhMlp(nn.Module):
    """Another model class over the same params as :class:`Mlp`."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnp.tanh(nn.Dense(32, name='hidden')(x.reshape(len(x), -1)))
        return nn.Dense(CLASSES, name='head')(x)


def _batches(n=64, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = (x[:, :CLASSES].argmax(-1)).astype(np.int32)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def _variables(model=None):
    model = model or Mlp()
    return model, model.init(jax.random.key(0), jnp.zeros((1, 8)))


SETTINGS = {'sparsity': 0.75, 'epochs': 2, 'progress': False}


def _search(batches=None, model=None, **options):
    model, variables = _variables(model)
    return jackpot_jax.find_jackpot(
        model, variables, _batches() if batches is None else batches, **{**SETTINGS, **options}
    )


def _loss(outputs, batch):
    """A custom loss: cross-entropy and its own metrics (no top1)."""
    x, y = batch
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs, y).mean()
    return loss, {'hits': jnp.mean(jnp.argmax(outputs, -1) == y)}


def _other_loss(outputs, batch):
    """Another objective: the negated cross-entropy."""
    x, y = batch
    return -optax.softmax_cross_entropy_with_integer_labels(outputs, y).mean(), {}


def _no_step(monkeypatch):
    """Makes any search step fail: what is checked before step 1 must fail first."""

    def fail(state, metrics):
        raise AssertionError('a search step ran before the check')

    return fault_at_step(monkeypatch, 1, fail)


def _interrupt_at(monkeypatch, step):
    def interrupt(state, metrics):
        raise KeyboardInterrupt

    return fault_at_step(monkeypatch, step, interrupt)


# ----------------------------------------------------------------------------
# 1. Nothing of the caller's is overwritten or deleted without being asked.
# ----------------------------------------------------------------------------
def test_a_jackpot_saved_in_the_workdir_is_not_replaced_without_overwrite(tmp_path):
    saved = _search()
    workdir = str(tmp_path / 'W')
    saved.save(workdir_lib.jackpot_path(workdir))
    with pytest.raises(FileExistsError, match='overwrite=True'):
        _search(workdir=workdir, sparsity=0.3)
    _, masks, _, _ = checkpoint.read_jackpot_bundle(workdir_lib.jackpot_path(workdir))
    for path, mask in saved.masks.items():
        np.testing.assert_array_equal(masks[path], mask)
    # Asked to: the new search's jackpot replaces it.
    found = _search(workdir=workdir, sparsity=0.3, overwrite=True)
    _, masks, _, _ = checkpoint.read_jackpot_bundle(workdir_lib.jackpot_path(workdir))
    for path, mask in found.masks.items():
        np.testing.assert_array_equal(masks[path], mask)


def test_the_non_finite_stop_marker_stays_until_a_checkpoint_replaces_it(tmp_path, monkeypatch):
    workdir = str(tmp_path / 'w')
    original = fault_at_step(
        monkeypatch,
        3,
        lambda state, metrics: (state, {**metrics, 'loss': metrics['loss'] * np.nan}),
    )
    with pytest.raises(FloatingPointError, match='last good checkpoint is step 2'):
        _search(workdir=workdir, checkpoint_every=2)
    monkeypatch.setattr(step_lib, 'make_search_step', original)
    # The advised rerun (a lower learning rate), interrupted before its first checkpoint...
    _interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _search(workdir=workdir, checkpoint_every=2, learning_rate=0.05)
    assert os.path.exists(workdir_lib.nan_stop_path(workdir))
    # ...and run once more: still the advised command, still accepted.
    monkeypatch.setattr(step_lib, 'make_search_step', original)
    found = _search(workdir=workdir, checkpoint_every=2, learning_rate=0.05)
    assert [r['epoch'] for r in found.report['epochs']] == [1, 2]
    assert not os.path.exists(workdir_lib.nan_stop_path(workdir))


# ----------------------------------------------------------------------------
# 2. The caller's objects are neither consumed nor mutated.
# ----------------------------------------------------------------------------
def test_initial_masks_stay_usable_after_the_search():
    start = _search(epochs=1)
    masks = {p: jnp.asarray(m) for p, m in start.masks.items()}
    _search(epochs=1, initial_masks=masks)
    for path, mask in masks.items():  # not donated to the step
        np.testing.assert_array_equal(np.asarray(mask), start.masks[path])


def test_a_generator_of_exactly_steps_per_epoch_batches_gives_that_many_steps():
    batches = _batches()
    listed = _search(batches, epochs=1)
    generated = _search((b for b in batches), epochs=1, steps_per_epoch=len(batches))
    assert generated.report['epochs'][0]['step'] == len(batches)
    for path in listed.scores:  # the batch peeked at for the checks is trained on
        np.testing.assert_array_equal(generated.scores[path], listed.scores[path])


# ----------------------------------------------------------------------------
# 3. A resume, or a finished workdir reused, matches everything that decides the result.
# ----------------------------------------------------------------------------
def test_a_finished_workdir_refuses_another_loss_fn(tmp_path):
    workdir = str(tmp_path / 'w')
    _search(workdir=workdir, loss_fn=_loss, selection_metric='loss')
    with pytest.raises(ValueError, match='loss_fn'):
        _search(workdir=workdir, loss_fn=_other_loss, selection_metric='loss')


def test_a_finished_workdir_refuses_another_model_class(tmp_path):
    workdir = str(tmp_path / 'w')
    _search(workdir=workdir)
    model, variables = _variables()
    with pytest.raises(ValueError, match='model'):
        jackpot_jax.find_jackpot(TanhMlp(), variables, _batches(), workdir=workdir, **SETTINGS)


def test_a_finished_workdir_refuses_other_data(tmp_path):
    workdir = str(tmp_path / 'w')
    _search(workdir=workdir)
    with pytest.raises(ValueError, match='batches'):
        _search(_batches(seed=1), workdir=workdir)


def test_an_interrupted_search_refuses_to_resume_with_another_loss_fn(tmp_path, monkeypatch):
    workdir = str(tmp_path / 'w')
    original = _interrupt_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        _search(workdir=workdir, loss_fn=_loss, selection_metric='loss', checkpoint_every=1)
    monkeypatch.setattr(step_lib, 'make_search_step', original)
    with pytest.raises(ValueError, match='loss_fn'):
        _search(workdir=workdir, loss_fn=_other_loss, selection_metric='loss', checkpoint_every=1)


def test_a_custom_optimizer_resumes_only_with_its_own_hyper_parameters(tmp_path, monkeypatch):
    workdir = str(tmp_path / 'w')
    original = _interrupt_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        _search(workdir=workdir, optimizer=optax.adam(1e-2), checkpoint_every=1)
    monkeypatch.setattr(step_lib, 'make_search_step', original)
    with pytest.raises(ValueError, match='optimizer'):
        _search(workdir=workdir, optimizer=optax.adam(5.0), checkpoint_every=1)
    found = _search(workdir=workdir, optimizer=optax.adam(1e-2), checkpoint_every=1)
    assert [r['epoch'] for r in found.report['epochs']] == [1, 2]


def test_another_optimizer_is_a_settings_mismatch_never_corruption(tmp_path, monkeypatch):
    workdir = str(tmp_path / 'w')
    original = _interrupt_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        _search(workdir=workdir, optimizer=optax.adam(1e-2), checkpoint_every=1)
    monkeypatch.setattr(step_lib, 'make_search_step', original)
    with pytest.raises(ValueError, match='optimizer') as refused:
        _search(workdir=workdir, optimizer=optax.sgd(0.1), checkpoint_every=1)
    assert 'corrupt' not in str(refused.value) and 'Delete' not in str(refused.value)
    assert os.listdir(workdir_lib.path(workdir, workdir_lib.CHECKPOINTS_DIR))


def test_a_checkpoint_of_another_state_structure_is_a_settings_mismatch(tmp_path):
    """The rule under the resume check: arrays of another number or shape than the
    search's state mean another search's checkpoint, never a damaged one."""
    workdir = str(tmp_path / 'w')
    found = _search(workdir=workdir, optimizer=optax.adam(1e-2), epochs=1)
    ckpts = checkpoint.SearchCheckpoints(workdir_lib.path(workdir, workdir_lib.CHECKPOINTS_DIR))
    model, variables = _variables()
    momentum = optax.sgd(0.1, momentum=0.9)
    like = step_lib.init_search_state(
        variables['params'], {}, dict(found.masks), dict(found.scores), momentum
    )
    with pytest.raises(ValueError, match='another structure.*opt_state') as refused:
        ckpts.restore(ckpts.latest_step(), like=like)
    assert 'corrupt' not in str(refused.value) and 'Delete' not in str(refused.value)
    ckpts.close()


# ----------------------------------------------------------------------------
# 4. Every argument takes effect or is refused.
# ----------------------------------------------------------------------------
def test_a_pattern_and_a_sparsity_that_disagree_are_refused():
    with pytest.raises(ValueError, match="pattern '2:4'.*sparsity"):
        _search(pattern='2:4', sparsity=0.9, epochs=1)


def test_initial_masks_with_a_drawn_score_init_are_refused():
    start = _search(epochs=1)
    with pytest.raises(ValueError, match="score_init='kaiming'.*initial_masks"):
        _search(epochs=1, initial_masks=start.masks, score_init='kaiming')


def test_a_custom_optimizer_refuses_the_options_it_would_ignore():
    for option in ({'learning_rate': 1e3}, {'weight_decay': 0.5}, {'momentum': 0.5}):
        with pytest.raises(ValueError, match=f'{next(iter(option))}.*optax'):
            _search(epochs=1, optimizer=optax.adam(1e-2), **option)


def test_training_batches_that_mark_padding_are_not_trained_on_silently():
    padded = []
    for x, y in _batches():
        valid = np.ones(len(x), bool)
        valid[-4:] = False
        padded.append({'inputs': x, 'label': y, 'valid': valid})
    with pytest.raises(ValueError, match="'valid'"):
        _search(padded, epochs=1)


# ----------------------------------------------------------------------------
# 5. A metric's direction is stated, not guessed.
# ----------------------------------------------------------------------------
def _mse_loss(outputs, batch):
    x, y = batch
    mse = jnp.mean((jax.nn.softmax(outputs) - jax.nn.one_hot(y, CLASSES)) ** 2)
    return optax.softmax_cross_entropy_with_integer_labels(outputs, y).mean(), {'mse': mse}


def test_a_metric_of_unknown_direction_is_refused_until_stated(monkeypatch):
    _no_step(monkeypatch)
    with pytest.raises(ValueError, match="selection_metric 'hits'.*selection_mode='min'"):
        _search(
            loss_fn=_loss, validation_batches=_batches(seed=2), selection_metric='hits',
            selection_rule='best',
        )  # fmt: skip
    with pytest.raises(ValueError, match='selection_mode'):
        SearchSettings(selection_mode='lowest').resolved(True)


def test_a_stated_direction_chooses_the_best_epoch_and_says_so():
    found = _search(
        loss_fn=_mse_loss, validation_batches=_batches(seed=2), selection_metric='mse',
        selection_rule='best', selection_mode='min', epochs=3, learning_rate=0.5,
    )  # fmt: skip
    values = {r['epoch']: r['validation_mse'] for r in found.report['epochs']}
    assert found.report['chosen_epoch'] == min(values, key=lambda e: (values[e], -e))
    assert 'lower is better' in found.report['choice']


@pytest.mark.parametrize(
    'metric,lower', [('ppl', True), ('cross_entropy', True), ('wer', True), ('loss_total', True),
                     ('loss', True), ('top1', False), ('accuracy', False)]
)  # fmt: skip
def test_metric_names_of_a_known_direction(metric, lower):
    settings = SearchSettings(selection_metric=metric, selection_rule='best').resolved(True)
    assert settings.lower_is_better is lower
    flipped = SearchSettings(
        selection_metric=metric, selection_rule='best', selection_mode='max' if lower else 'min'
    ).resolved(True)
    assert flipped.lower_is_better is not lower


# ----------------------------------------------------------------------------
# 6. A custom loss_fn and the batches are checked before the first step.
# ----------------------------------------------------------------------------
def _per_example(outputs, batch):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, batch[1]), {}


def _bare_scalar(outputs, batch):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, batch[1]).mean()


def _none_metrics(outputs, batch):
    return _bare_scalar(outputs, batch), None


def _per_example_metric(outputs, batch):
    return _bare_scalar(outputs, batch), {'hits': jnp.argmax(outputs, -1) == batch[1]}


@pytest.mark.parametrize(
    'loss_fn,match',
    [
        (_per_example, r'loss_fn returned a loss of shape \(16,\).*scalar'),
        (_bare_scalar, r'loss_fn must return \(loss, \{name: value\}\)'),
        (_none_metrics, r'loss_fn returned None as its metrics.*\{\}'),
        (_per_example_metric, r"loss_fn's metric 'hits' has shape \(16,\).*scalar"),
    ],
    ids=['per-example loss', 'bare scalar', 'None metrics', 'per-example metric'],
)
def test_a_misshapen_loss_fn_is_named_before_step_one(loss_fn, match, monkeypatch):
    _no_step(monkeypatch)
    with pytest.raises(ValueError, match=match):
        _search(loss_fn=loss_fn, selection_metric='loss', epochs=1)


def test_a_selection_metric_the_loss_fn_does_not_give_is_named_before_step_one(monkeypatch):
    _no_step(monkeypatch)
    with pytest.raises(ValueError, match=r"selection_metric 'top1'.*'hits'.*'loss'"):
        _search(loss_fn=_loss, validation_batches=_batches(seed=2))


def test_a_selection_metric_the_default_loss_does_not_give_is_named_before_step_one(monkeypatch):
    _no_step(monkeypatch)
    with pytest.raises(ValueError, match=r"selection_metric 'accuracy'.*'top1'"):
        _search(validation_batches=_batches(seed=2), selection_metric='accuracy')


def test_labels_of_another_shape_are_named_before_step_one(monkeypatch):
    _no_step(monkeypatch)
    column = [(x, y[:, None]) for x, y in _batches()]
    with pytest.raises(ValueError, match=r'labels of shape \(16, 1\).*\(16,\)'):
        _search(column, epochs=1)
    one_hot = [(x, np.eye(CLASSES, dtype=np.int32)[y]) for x, y in _batches()]
    with pytest.raises(ValueError, match=r'one-hot.*argmax'):
        _search(one_hot, epochs=1)


def test_initial_masks_of_another_type_are_named(monkeypatch):
    start = _search(epochs=1)
    _no_step(monkeypatch)
    with pytest.raises(ValueError, match=r'initial_masks must be a dict'):
        _search(epochs=1, initial_masks=list(start.masks.values()))


def test_fingerprints_tell_apart_what_decides_a_search():
    """What a resume must match beyond the settings: the same code and values give the same
    fingerprint (in any process), other hyper-parameters, code or data another."""
    from jackpot_jax.engine import fingerprints as fp

    adam = fp.fingerprint(optax.adam(1e-2))
    assert adam is not None and adam == fp.fingerprint(optax.adam(1e-2))
    assert adam != fp.fingerprint(optax.adam(5.0)) and adam != fp.fingerprint(optax.sgd(1e-2))
    assert fp.fingerprint(Mlp()) == fp.fingerprint(Mlp()) != fp.fingerprint(TanhMlp())
    assert fp.fingerprint(_loss) != fp.fingerprint(_other_loss)
    assert fp.named(_loss).startswith('test_promises_library._loss (')

    class Opaque:
        def __call__(self, outputs, batch):
            return _loss(outputs, batch)

    assert fp.fingerprint(Opaque()) is None
    assert fp.named(Opaque()).endswith('(not fingerprintable)')
    first = fp.batches_fingerprint(_batches()[:2])
    assert first == fp.batches_fingerprint(_batches()[:2])
    assert first != fp.batches_fingerprint(_batches(seed=1)[:2])


def test_a_metric_direction_is_read_from_its_words_or_unknown():
    from jackpot_jax.core.selection import metric_direction

    for name in ('loss', 'loss_total', 'ppl', 'cross_entropy', 'wer', 'mse', 'error_rate'):
        assert metric_direction(name) == 'min', name
    for name in ('top1', 'top5', 'accuracy', 'f1'):
        assert metric_direction(name) == 'max', name
    for name in ('hits', 'score', 'loss_accuracy'):
        assert metric_direction(name) is None, name
