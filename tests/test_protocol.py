"""The search protocols: the validation split, re-estimated statistics, the mask freeze, and
the paper switch that reproduces the published protocol exactly."""

import copy
import hashlib

import jax
import numpy as np
import pytest
import tiny_model  # tests/tiny_model.py
from test_checkpoint import _assert_same_search, _Interrupt, _interrupt_after

from jackpot_jax.core import parallel, sparsity, step
from jackpot_jax.data import sources
from jackpot_jax.io import checkpoint
from jackpot_jax.launch import (
    config as config_lib,
    config_checks,
    modes,
    run_context as rc,
    search_mode,
)
from jackpot_jax.launch.config_checks import resolved

# A fixed paper-protocol search (tiny_model weights, 3 epochs of 6 steps of 16 digits),
# fingerprinted on the implementation before the protocols existed: sha256 of the packed
# masks (paths sorted), the sum of the scores and the sum of |score - 1|.
PAPER_GOLDEN = (
    '38c67a4061e77aaf72daad77ae83683a0f4bf9cc2c09540b383ae920ecad9a69',
    1458.2726037502289,
    20.12801718711853,
)


def _fingerprint(masks, scores):
    paths = sorted(masks)
    bits = np.concatenate([np.asarray(masks[p]).ravel() for p in paths])
    values = np.concatenate([np.asarray(scores[p], np.float64).ravel() for p in paths])
    digest = hashlib.sha256(np.packbits(bits).tobytes()).hexdigest()
    return digest, float(values.sum()), float(np.abs(values - 1).sum())


def _config(weights, protocol='stable', epochs=3, steps=6):
    config = config_lib.get_config()
    config.protocol = protocol
    config.mode = 'search'
    config.model.width = 4
    config.search.epochs = epochs
    config.search.batch_size = 16
    config.steps_per_epoch = steps
    config.pretrained = weights
    return config


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('weights') / 'pretrained')
    tiny_model.save_weights(path, width=4)
    return path


def _labelled_dataset(n=50):
    """Images that carry their own index, so any leak between splits is visible."""
    images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 1), np.float32)
    return sources.ArrayDataset(images, np.arange(n) % 3, images[:4], np.arange(4) % 3, 3)


def test_validation_split_is_disjoint_from_every_training_batch_and_deterministic():
    split = sources.split_validation(_labelled_dataset(), 0.2)
    again = sources.split_validation(_labelled_dataset(), 0.2)
    np.testing.assert_array_equal(split.validation_images, again.validation_images)
    held = set(split.validation_images[:, 0, 0, 0].tolist())
    assert len(held) == 10 and len(split.train_labels) == 40
    seen = set()
    for epoch in range(3):
        for images, _ in split.train_epoch(batch_size=8, seed=epoch, epoch=epoch):
            seen |= set(images[:, 0, 0, 0].tolist())
    assert seen == set(range(50)) - held
    eval_seen = [x for b in split.eval_batches(4, 'validation') for x in b[0][b[2], 0, 0, 0]]
    assert sorted(eval_seen) == sorted(held)
    assert sources.split_validation(_labelled_dataset(), 0.0).validation_images is None


@pytest.mark.parametrize('fraction', [-0.1, 1.0, 1.5])
def test_validation_fraction_outside_unit_interval_is_a_config_error(fraction):
    config = config_lib.get_config()
    config.data.validation_fraction = fraction
    with pytest.raises(ValueError, match=r'data.validation_fraction must be in \[0, 1\)'):
        modes.validate(config)


def test_validation_fraction_that_leaves_no_training_batch_is_refused(weights, tmp_path):
    config = _config(weights)
    config.data.validation_fraction = 0.99  # 1,437 digits -> 14 training images < batch 16
    with pytest.raises(ValueError, match='validation_fraction=0.99'):
        search_mode.run_search(resolved(config), str(tmp_path))


def test_protocols_fill_only_the_fields_left_to_them():
    config = config_lib.get_config()
    stable = resolved(config)
    assert stable.data.validation_fraction == 0.1 and stable.search.reestimation_steps == 50
    assert stable.search.mask_freeze_fraction == 0.25 and stable.search.swap_margin == 0.0
    config.protocol = 'paper'
    config.search.reestimation_steps = 7
    paper = resolved(config)
    assert paper.data.validation_fraction == 0.0 and paper.search.mask_freeze_fraction == 0.0
    assert paper.search.reestimation_steps == 7  # set explicitly: kept
    assert resolved(paper).to_dict() == paper.to_dict()
    config.protocol = 'published'
    with pytest.raises(ValueError, match="unknown protocol 'published'"):
        modes.validate(config)


def test_paper_protocol_reproduces_the_published_search_exactly(weights, tmp_path):
    result = search_mode.run_search(resolved(_config(weights, 'paper')), str(tmp_path))
    state = jax.device_get(result['state'])
    digest, total, distance = _fingerprint(state.masks, state.scores)
    assert digest == PAPER_GOLDEN[0]
    assert total == pytest.approx(PAPER_GOLDEN[1], rel=1e-7)
    assert distance == pytest.approx(PAPER_GOLDEN[2], rel=1e-6)
    assert result['history'][-1]['mask_changes'] == 36
    assert 'validation_top1' not in result['history'][-1]


@pytest.fixture(scope='module')
def stable_run(weights, tmp_path_factory):
    """Four epochs, the last two with frozen masks (mask_freeze_fraction 0.5)."""
    workdir = str(tmp_path_factory.mktemp('stable'))
    config = _config(weights, epochs=4)
    config.search.mask_freeze_fraction = 0.5
    config.search.compare_statistics = True
    return workdir, config, search_mode.run_search(resolved(config), workdir)


def test_frozen_masks_keep_exact_counts_and_stop_changing(weights, stable_run):
    _, _, result = stable_run
    changes = [r['mask_changes'] for r in result['history']]
    assert changes[0] > 0 and changes[2:] == [0, 0]
    assert [r['swap_rate'] for r in result['history']] == [1.0, 1.0, 0.0, 0.0]
    params, _, _ = checkpoint.load_weights(weights)
    masks = jax.device_get(result['state'].masks)
    flat = sparsity.flatten(params)
    for path, count in result['counts'].items():
        assert int(np.size(flat[path]) - masks[path].sum()) == count
    assert step.mask_freeze_step(0.25, 30, 10) == 230 and step.mask_freeze_step(0.0, 30, 10) is None


def test_every_epoch_reports_validation_and_both_statistics(stable_run):
    _, _, result = stable_run
    record = result['history'][-1]
    for key in ('validation_top1', 'test_top1', 'validation_top1_running', 'test_top1_running'):
        assert 0.0 <= record[key] <= 1.0
    assert record['test_top1_reestimated'] == record['test_top1']
    assert result['best_selected_on'] == 'validation'
    best = max(reversed(result['history']), key=lambda r: r['validation_top1'])  # latest on ties
    assert result['best_epoch'] == best['epoch'] and result['best_top1'] == best['test_top1']


def test_frozen_phase_resumes_bit_identically(weights, stable_run, tmp_path, monkeypatch):
    _, config, result = stable_run
    workdir = str(tmp_path)
    config = copy.deepcopy(config)
    config.checkpoint.every_steps = 2
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 15)  # in epoch 3, the first frozen one
        with pytest.raises(_Interrupt):
            search_mode.run_search(resolved(config), workdir)
    resumed = search_mode.run_search(resolved(config), workdir)
    _assert_same_search(resumed['state'], jax.device_get(result['state']))
    assert resumed['history'] == result['history']


def _scripted_validation(monkeypatch, top1s):
    """Makes each epoch's validation top-1 the next of ``top1s`` (test is measured as is),
    so which epoch is best on validation is known in advance."""
    original = rc.Setup.split_metrics
    calls = iter(top1s)

    def split_metrics(self, params, statistics, split='test'):
        result = original(self, params, statistics, split)
        return {**result, 'top1': next(calls)} if split == 'validation' else result

    monkeypatch.setattr(rc.Setup, 'split_metrics', split_metrics)


def _epoch_end_states(monkeypatch):
    """Host copies of the masks and running statistics saved at every checkpoint, by step."""
    states = {}
    original = checkpoint.SearchCheckpoints.save

    def save(self, state, meta, metrics):
        host = jax.device_get(state)
        states[int(host.step)] = (host.masks, host.statistics)
        return original(self, state, meta, metrics)

    monkeypatch.setattr(checkpoint.SearchCheckpoints, 'save', save)
    return states


@pytest.mark.parametrize(
    'validation, chosen_epoch',
    [((0.5, 0.9, 0.6, 0.7), 2), ((0.5, 0.9, 0.9, 0.7), 3)],
)
def test_jackpot_of_the_best_validation_epoch_is_the_one_saved(
    weights, tmp_path, monkeypatch, validation, chosen_epoch
):
    """The stable protocol keeps the epoch best on validation (the latest on ties): its masks,
    statistics re-estimated under them, and the test top-1 measured at that epoch."""
    _scripted_validation(monkeypatch, validation)
    states = _epoch_end_states(monkeypatch)
    config = _config(weights, epochs=4)
    config.search.mask_freeze_fraction = 0.0  # so every epoch ends with other masks
    config.search.selection_rule = 'best'
    result = search_mode.run_search(resolved(config), str(tmp_path))
    chosen = result['history'][chosen_epoch - 1]
    assert result['jackpot_epoch'] == chosen_epoch and result['selection_rule'] == 'best'
    assert result['jackpot_top1'] == chosen['test_top1']
    assert result['jackpot_validation_top1'] == validation[chosen_epoch - 1]
    assert result['last_epoch_top1'] == result['history'][-1]['test_top1']

    _, masks, saved_stats, meta = checkpoint.read_jackpot_bundle(str(tmp_path / 'jackpot'))
    epoch_masks, running_stats = states[chosen['step']]
    jax.tree.map(np.testing.assert_array_equal, dict(epoch_masks), masks)
    setup = rc.Setup(resolved(config))
    params, _, _ = checkpoint.load_weights(weights)
    masked = parallel.replicate(sparsity.masked_params(sparsity.flatten(params), masks), setup.mesh)
    expected = rc.reestimate_statistics(
        setup, masked, parallel.replicate(running_stats, setup.mesh), 50, 16
    )
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(expected), saved_stats)
    evaluated = setup.split_metrics(masked, parallel.replicate(saved_stats, setup.mesh))
    assert (evaluated['top1'], evaluated['top5']) == (chosen['test_top1'], chosen['test_top5'])
    assert meta['summary']['jackpot_epoch'] == chosen_epoch
    # a different jackpot from the last epoch's
    assert any((masks[p] != states[result['history'][-1]['step']][0][p]).any() for p in masks)


def test_last_epoch_jackpot_on_request_and_no_choice_without_validation(weights, tmp_path):
    config = _config(weights, epochs=2)
    config.search.selection_rule = 'last'
    result = search_mode.run_search(resolved(config), str(tmp_path))
    assert result['jackpot_epoch'] == 2 and result['jackpot_top1'] == result['last_epoch_top1']
    paper = _config(weights, 'paper')
    paper.search.selection_rule = 'best'
    with pytest.raises(ValueError, match=r"selection_rule='best'.*validation_fraction"):
        modes.validate(paper)
    with pytest.raises(ValueError, match=r"selection_rule='best'.*validation_fraction"):
        search_mode.run_search(resolved(paper), str(tmp_path / 'refused'))  # before any step
    assert not (tmp_path / 'refused').exists()
    paper.search.selection_rule = 'best_test'
    with pytest.raises(ValueError, match="unknown search.selection_rule 'best_test'"):
        modes.validate(paper)


def test_swap_margin_keeps_exact_counts_and_resumes_bit_identically(
    weights, tmp_path, monkeypatch
):
    """The paper's search (3 epochs of 6 steps) with a swap margin of 0.002."""
    config = _config(weights, 'paper')
    config.search.swap_margin = 0.002
    result = search_mode.run_search(resolved(config), str(tmp_path / 'whole'))
    state = jax.device_get(result['state'])
    assert _fingerprint(state.masks, state.scores)[0] != PAPER_GOLDEN[0]  # the margin acts
    assert sum(r['mask_changes'] for r in result['history']) > 0  # and masks still move
    flat = sparsity.flatten(checkpoint.load_weights(weights)[0])
    for path, count in result['counts'].items():
        assert int(np.size(flat[path]) - state.masks[path].sum()) == count
    config.checkpoint.every_steps = 4
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 10)  # in epoch 2
        with pytest.raises(_Interrupt):
            search_mode.run_search(resolved(config), str(tmp_path / 'resumed'))
    resumed = search_mode.run_search(resolved(config), str(tmp_path / 'resumed'))
    _assert_same_search(resumed['state'], state)
    assert resumed['history'] == result['history']


def test_swap_margin_no_score_can_clear_keeps_the_first_mask(weights, tmp_path):
    config = _config(weights, 'paper', epochs=1)
    config.search.swap_margin = 1.0  # scores start at 1.0 (kept) and 0.99 (pruned)
    result = search_mode.run_search(resolved(config), str(tmp_path))
    assert result['history'][0]['mask_changes'] == 0


@pytest.mark.parametrize(
    'margin, update, message',
    [
        (-0.1, 'short_restriction', r'search.swap_margin must be >= 0 \(0 = no margin\), got -0.1'),
        (0.01, 'edge_popup', r"search.swap_margin=0.01 applies to the short restriction only.*"
                             r"set search.swap_margin=0"),
    ],
)
def test_bad_swap_margin_is_a_config_error(margin, update, message):
    config = config_lib.get_config()
    config.search.swap_margin = margin
    config.search.mask_update = update
    with pytest.raises(ValueError, match=message):
        modes.validate(config)
