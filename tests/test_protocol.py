"""The search protocols: the validation split, re-estimated statistics, the mask freeze, and
the paper switch that reproduces the published protocol exactly."""

import copy
import hashlib

import jax
import numpy as np
import pytest

import tiny_model  # tests/tiny_model.py
from jackpot_jax import checkpoint, config_checks, data, launcher, search, search_run, sparsity
from jackpot_jax import config as config_lib
from test_checkpoint import _assert_same_search, _Interrupt, _interrupt_after

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
    return data.ArrayDataset(images, np.arange(n) % 3, images[:4], np.arange(4) % 3, 3)


def test_validation_split_is_disjoint_from_every_training_batch_and_deterministic():
    split = data.split_validation(_labelled_dataset(), 0.2)
    again = data.split_validation(_labelled_dataset(), 0.2)
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
    assert data.split_validation(_labelled_dataset(), 0.0).validation_images is None


@pytest.mark.parametrize('fraction', [-0.1, 1.0, 1.5])
def test_validation_fraction_outside_unit_interval_is_a_config_error(fraction):
    config = config_lib.get_config()
    config.data.validation_fraction = fraction
    with pytest.raises(ValueError, match=r'data.validation_fraction must be in \[0, 1\)'):
        launcher.validate(config)


def test_validation_fraction_that_leaves_no_training_batch_is_refused(weights, tmp_path):
    config = _config(weights)
    config.data.validation_fraction = 0.99  # 1,437 digits -> 14 training images < batch 16
    with pytest.raises(ValueError, match='validation_fraction=0.99'):
        search_run.run_search(config, str(tmp_path))


def test_protocols_fill_only_the_fields_left_to_them():
    config = config_lib.get_config()
    stable = config_checks.resolve_protocol(config)
    assert stable.data.validation_fraction == 0.1 and stable.search.bn_recalibration_steps == 50
    assert stable.search.mask_freeze_fraction == 0.25
    config.protocol = 'paper'
    config.search.bn_recalibration_steps = 7
    paper = config_checks.resolve_protocol(config)
    assert paper.data.validation_fraction == 0.0 and paper.search.mask_freeze_fraction == 0.0
    assert paper.search.bn_recalibration_steps == 7  # set explicitly: kept
    assert config_checks.resolve_protocol(paper).to_dict() == paper.to_dict()
    config.protocol = 'published'
    with pytest.raises(ValueError, match="unknown protocol 'published'"):
        launcher.validate(config)


def test_paper_protocol_reproduces_the_published_search_exactly(weights, tmp_path):
    result = search_run.run_search(_config(weights, 'paper'), str(tmp_path))
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
    config.search.compare_bn_statistics = True
    return workdir, config, search_run.run_search(config, workdir)


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
    assert search.mask_freeze_step(0.25, 30, 10) == 230 and search.mask_freeze_step(0.0, 30, 10) is None


def test_every_epoch_reports_validation_and_both_statistics(stable_run):
    _, _, result = stable_run
    record = result['history'][-1]
    for key in ('validation_top1', 'test_top1', 'validation_top1_running', 'test_top1_running'):
        assert 0.0 <= record[key] <= 1.0
    assert record['test_top1_recalibrated'] == record['test_top1']
    assert result['best_selected_on'] == 'validation'
    best = max(result['history'], key=lambda r: r['validation_top1'])
    assert result['best_epoch'] == best['epoch'] and result['best_top1'] == best['test_top1']


def test_frozen_phase_resumes_bit_identically(weights, stable_run, tmp_path, monkeypatch):
    _, config, result = stable_run
    workdir = str(tmp_path)
    config = copy.deepcopy(config)
    config.checkpoint.every_steps = 2
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 15)  # in epoch 3, the first frozen one
        with pytest.raises(_Interrupt):
            search_run.run_search(config, workdir)
    resumed = search_run.run_search(config, workdir)
    _assert_same_search(resumed['state'], jax.device_get(result['state']))
    assert resumed['history'] == result['history']
