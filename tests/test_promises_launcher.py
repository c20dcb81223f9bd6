"""The launcher keeps the library's promises (docs/troubleshooting.md, "What the library
promises"): a rerun never replaces what it did not write, a workdir of the library is
named as such, a mistyped path is refused, and the selection metric is known (with its
direction) before step 1."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gpt import _tiny_config  # tests/ is on the path
from test_text_data import write_corpus
from tiny_model import fault_at_step, tiny_config  # tests/tiny_model.py

import jackpot_jax
from jackpot_jax.io import workdir as workdir_lib
from jackpot_jax.launch import modes, search_mode, weight_training
from jackpot_jax.launch.config_checks import resolved

STEPS = 4


def _config(weights, **fields):
    base = {'mode': 'search', 'pretrain.epochs': 1, 'search.epochs': 2, 'tune.epochs': 0}
    base.update({'steps_per_epoch': STEPS, 'pretrained': weights})
    return tiny_config(**{**base, **fields})


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('weights'))
    weight_training.run_pretrain(resolved(_config('')), workdir)
    return os.path.join(workdir, workdir_lib.PRETRAINED_DIR)


def _no_step(monkeypatch):
    def fail(state, metrics):
        raise AssertionError('a search step ran before the check')

    return fault_at_step(monkeypatch, 1, fail)


def _files(folder):
    """{relative path: bytes} of every file under ``folder``."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_a_finished_search_rerun_leaves_the_tuned_weights_as_they_are(weights, tmp_path):
    """1. A rerun of --mode=search over a finished workdir does not re-tune WORKDIR/tuned."""
    workdir = str(tmp_path / 'w')
    config = _config(weights, **{'tune.epochs': 1})
    first = search_mode.run_search(resolved(config), workdir)
    tuned = workdir_lib.path(workdir, workdir_lib.TUNED_DIR)
    before = _files(tuned)
    again = search_mode.run_search(resolved(config), workdir)
    assert _files(tuned) == before
    assert again['tuned_top1'] == first['tuned_top1']


def test_a_search_in_a_library_workdir_is_refused_naming_it(weights, tmp_path):
    """3. --mode=search in a folder a library search wrote: a clear refusal, no KeyError."""
    workdir = str(tmp_path / 'w')
    config = resolved(_config(weights))
    model = jackpot_jax.models.zoo.get_model('small_cnn', 10, width=config.model.width)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
    rng = np.random.default_rng(0)
    batches = [
        (rng.normal(size=(8, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, 8).astype(np.int32))
        for _ in range(2)
    ]
    jackpot_jax.find_jackpot(
        model, variables, batches, workdir=workdir, sparsity=0.5, epochs=1, progress=False
    )
    with pytest.raises(ValueError, match=r'search in .*checkpoints'):
        search_mode.run_search(config, workdir)


def test_lm_pruning_refuses_a_pretrained_path_that_is_not_there(tmp_path, monkeypatch):
    """4. A mistyped --config.pretrained is refused, never pre-trained into."""
    text_dir = str(tmp_path / 'text')
    write_corpus(text_dir, sizes=(900,) * 12)
    config = _tiny_config(text_dir)
    config.mode = 'lm_pruning'
    typo = str(tmp_path / 'pretrianed')
    config.pretrained = typo
    workdir = str(tmp_path / 'run')
    os.makedirs(workdir)

    def pretrain(*args, **kwargs):
        raise AssertionError('pre-trained new weights')

    monkeypatch.setattr(weight_training, 'run_pretrain', pretrain)
    with pytest.raises(ValueError, match=f'{typo}.*not'):
        modes.MODES['lm_pruning'](resolved(config), workdir)
    assert not os.path.exists(typo)


@pytest.mark.parametrize(
    'metric,match',
    [('top_1', "selection_metric 'top_1'.*selection_mode"), ('accuracy', "'accuracy'.*'top1'")],
)
def test_a_selection_metric_the_search_does_not_measure_is_refused_before_step_one(
    weights, tmp_path, monkeypatch, metric, match
):
    """6. An unknown selection metric fails before step 1, naming the fix (a typo: its
    direction is unknown too; a known name the search does not measure: those it does)."""
    _no_step(monkeypatch)
    config = _config(weights, **{'search.selection_metric': metric})
    with pytest.raises(ValueError, match=match):
        search_mode.run_search(resolved(config), str(tmp_path / 'w'))


def test_selection_on_the_loss_keeps_the_lowest_and_says_so(weights, tmp_path):
    """5 and 6. The documented selection_metric=loss works and is lower-is-better."""
    config = _config(
        weights, **{'search.selection_metric': 'loss', 'search.selection_rule': 'best'}
    )
    found = search_mode.run_search(resolved(config), str(tmp_path / 'w'))
    values = {r['epoch']: r['validation_loss'] for r in found['history']}
    assert found['jackpot_epoch'] == min(values, key=lambda e: (values[e], -e))
    assert 'lower is better' in found['jackpot_choice']


def test_the_launcher_states_a_metric_direction(weights, tmp_path, monkeypatch):
    """5. search.selection_mode states the direction; an unknown one is refused."""
    _no_step(monkeypatch)
    config = _config(weights, **{'search.selection_mode': 'lowest'})
    with pytest.raises(ValueError, match='selection_mode'):
        search_mode.run_search(resolved(config), str(tmp_path / 'w'))
