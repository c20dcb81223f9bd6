"""The library checks what it is given before the first step, and says what is wrong."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import fault_at_step  # tests/tiny_model.py

import jackpot_jax
from jackpot_jax.core import errors, step
from jackpot_jax.engine import loop

CLASSES = 4


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16, name='hidden')(x.reshape(len(x), -1)))
        return nn.Dense(CLASSES, name='head')(x)


class FixedNorm(nn.Module):
    """A BatchNorm whose mode is fixed in setup, whatever the train flag says."""

    running: bool

    def setup(self):
        self.hidden = nn.Dense(16)
        self.norm = nn.BatchNorm(use_running_average=self.running)
        self.head = nn.Dense(CLASSES)

    def __call__(self, x, train: bool = False):
        return self.head(nn.relu(self.norm(self.hidden(x))))


def _batches(labels=None, n=32, size=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = rng.integers(0, CLASSES, n).astype(np.int32) if labels is None else labels
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def _search(batches, model=None, **options):
    model = model or Mlp()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8)))
    return jackpot_jax.find_jackpot(
        model, variables, batches, **{'sparsity': 0.5, 'epochs': 1, 'progress': False, **options}
    )


@pytest.mark.parametrize(
    'labels, message',
    [
        (np.full(32, 57, np.int32), r'label 57 is outside \[0, 4\)'),
        (np.full(32, -1, np.int32), r'label -1 is outside \[0, 4\)'),
        (np.full(32, 1.5, np.float32), 'labels must be integer class indices, got dtype float32'),
        (np.zeros(30, np.int32), '14 labels for 16 inputs'),
    ],
)
def test_bad_labels_are_refused_before_any_step(labels, message):
    with pytest.raises(ValueError, match=message):
        _search(_batches(labels))


def test_a_batch_of_the_wrong_shape_names_the_shape():
    batches = [(np.zeros((16, 5), np.float32), np.zeros(16, np.int32))]
    with pytest.raises(ValueError, match=r'does not fit the model: inputs of shape \(16, 5\)'):
        _search(batches)


def test_dict_batches_work_and_unknown_keys_are_named():
    dicts = [{'image': x, 'label': y} for x, y in _batches()]
    assert _search(dicts).report['chosen_epoch'] == 1
    with pytest.raises(KeyError, match=r"one of \('inputs', 'image', 'images', 'x'\)"):
        _search([{'pixels': x, 'label': y} for x, y in _batches()])


@pytest.mark.parametrize(
    'call, message',
    [
        (lambda: _search([]), 'batches is empty'),
        (lambda: _search([(np.zeros((0, 8), np.float32), np.zeros(0, np.int32))]), 'no examples'),
        (lambda: _search(_batches(), validation_batches=[]), 'validation_batches is empty'),
        (lambda: _search(_batches(), validation_batches=iter(_batches())), 'is an iterator'),
        (lambda: _search(_batches(), sparsity='0.9'), "sparsity must be a number .*'0.9'"),
        (lambda: _search(_batches(), steps_per_epoch=2.5), 'steps_per_epoch must be an integer'),
        (lambda: _search(_batches(), prune_include='('), 'not a valid regular expression'),
    ],
)
def test_arguments_are_checked_before_the_first_step(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_evaluating_nan_inputs_is_an_error():
    jackpot = _search(_batches())
    x, y = _batches()[0]
    with pytest.raises(FloatingPointError, match='inf or NaN outputs on evaluation batch 0'):
        jackpot.evaluate([(x * np.nan, y)])


def test_a_batchnorm_fixed_to_running_averages_is_named():
    with pytest.raises(ValueError, match='statistics did not change in a train-mode pass'):
        _search(_batches(), model=FixedNorm(running=True))
    # Keeping the statistics as they are is the way to search such a model.
    _search(_batches(), model=FixedNorm(running=True), bn_mode='frozen', reestimation_steps=0)


def test_a_batchnorm_fixed_to_batch_statistics_is_named():
    with pytest.raises(ValueError, match='updates its statistics in eval mode'):
        _search(_batches(), model=FixedNorm(running=False))


def test_ctrl_c_ends_in_one_line_saying_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupt(state, metrics):
        raise KeyboardInterrupt

    original = fault_at_step(monkeypatch, 3, interrupt)
    workdir = str(tmp_path / 'w')
    with pytest.raises(
        loop.SearchInterrupted, match='interrupted at step 2: the last checkpoint is step 2'
    ):
        _search(_batches(), workdir=workdir, checkpoint_every=1, epochs=2)

    def interrupted():
        _search(_batches(), workdir=str(tmp_path / 'v'), checkpoint_every=1, epochs=2)

    assert errors.report_user_errors(interrupted) == errors.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: search interrupted at step 2')
    monkeypatch.setattr(step, 'make_search_step', original)  # the rerun resumes
    assert _search(_batches(), workdir=workdir, checkpoint_every=1, epochs=2).report['chosen_epoch']
