"""Search studies: score inits, flip-back telemetry, and the three study modes end to end."""

import json
import os
import warnings

import jax
import numpy as np
import pytest
from test_studies import assert_valid_png
from tiny_model import config_plan, tiny_config  # tests/tiny_model.py

from jackpot_jax.core import sparsity, structured
from jackpot_jax.io import checkpoint, workdir as workdir_lib
from jackpot_jax.launch import (
    config as config_lib,
    modes,
    plots,
    run_context as rc,
    search_mode,
    weight_training,
)
from jackpot_jax.launch.config_checks import resolved
from jackpot_jax.launch.studies import search_cost, stability


def study_base():
    # The paper's protocol: these tests are about the studies, not the protocols (the
    # stability study sets the protocol of each of its variants).
    fields = {'protocol': 'paper', 'pretrain.epochs': 2, 'search.epochs': 2}
    return tiny_config(**fields, steps_per_epoch=6)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('pretrained'))
    weight_training.run_pretrain(resolved(study_base()), workdir)
    return os.path.join(workdir, workdir_lib.PRETRAINED_DIR)


def study_config(pretrained, mode):
    config = study_base()
    config.mode = mode
    config.pretrained = pretrained
    return config


# ----------------------------------------------------------------------------
# Score initialisations.
# ----------------------------------------------------------------------------
def test_kaiming_scores_follow_edge_popups_bound_and_random_scores_are_unit_uniform():
    kernels = {'conv/kernel': np.zeros((3, 3, 16, 32)), 'dense/kernel': np.zeros((400, 10))}
    kaiming = sparsity.kaiming_scores(jax.random.key(0), kernels)
    for path, fan_in in [('conv/kernel', 3 * 3 * 16), ('dense/kernel', 400)]:
        s = np.asarray(kaiming[path])
        bound = 1 / np.sqrt(fan_in)
        assert s.shape == kernels[path].shape and np.abs(s).max() <= bound
        assert np.abs(s).max() > 0.95 * bound and abs(s.mean()) < 0.05 * bound
    uniform = sparsity.uniform_scores(jax.random.key(0), kernels)
    assert all(0 <= np.asarray(s).min() and np.asarray(s).max() < 1 for s in uniform.values())


def test_masks_from_scores_are_what_the_mask_update_keeps():
    scores = {'a': jax.numpy.asarray([[0.3, -0.9], [0.1, 0.5], [-0.2, 0.8]])}
    short = sparsity.masks_from_scores(scores, {'a': 4})
    popup = sparsity.masks_from_scores(scores, {'a': 4}, mode='edge_popup')
    np.testing.assert_array_equal(short['a'], [[0, 0], [0, 1], [0, 1]])  # top-2 of s
    np.testing.assert_array_equal(popup['a'], [[0, 1], [0, 0], [0, 1]])  # top-2 of |s|
    with pytest.raises(ValueError, match="'lottery'"):
        sparsity.masks_from_scores(scores, {'a': 4}, mode='lottery')


@pytest.mark.parametrize('init', ['kaiming', 'random'])
def test_non_magnitude_inits_start_from_their_own_top_scores_at_the_same_counts(pretrained, init):
    config = study_config(pretrained, 'search')
    config.search.score_init = init
    params = checkpoint.load_weights(pretrained)[0]
    plan = config_plan(config, params)
    counts = plan.counts
    masks, scores = plan.initial_masks_and_scores(params, init, rng=search_mode.score_init_key(config))
    magnitude = plan.magnitude_masks(params)
    for path, mask in masks.items():
        assert mask.size - int(np.count_nonzero(mask)) == counts[path]
        kept = np.asarray(scores[path])[np.asarray(mask)]
        pruned = np.asarray(scores[path])[~np.asarray(mask)]
        assert kept.min() >= pruned.max()
    assert not all(np.array_equal(masks[p], magnitude[p]) for p in masks)


# ----------------------------------------------------------------------------
# Summaries on hand-made histories.
# ----------------------------------------------------------------------------
def history(*top1):
    return [{'epoch': e, 'test_top1': t, 'train_loss': 1.0 / e} for e, t in enumerate(top1, 1)]


def test_epochs_to_target_and_the_speedup_over_edge_popups_init():
    runs = {
        'magnitude': {
            'history': history(0.8, 0.9, 0.91, 0.92),
            'search_seconds': 1,
            'workdir': 'm',
        },
        'kaiming': {'history': history(0.3, 0.6, 0.85, 0.9), 'search_seconds': 1, 'workdir': 'k'},
        'random': {'history': history(0.1, 0.2, 0.3, 0.4), 'search_seconds': 1, 'workdir': 'r'},
    }
    assert search_cost.epochs_to_target(runs['kaiming']['history'], 0.85) == 3
    assert search_cost.epochs_to_target(runs['random']['history'], 0.85) is None
    noisy = history(0.9, 0.7, 0.95, 0.96)  # a lucky first epoch, then a dip
    assert search_cost.epochs_to_target(noisy, 0.9) == 1
    assert search_cost.epochs_to_stay(noisy, 0.9) == 3
    assert search_cost.epochs_to_stay(history(0.95, 0.97), 0.9) == 1
    assert search_cost.epochs_to_stay(history(0.95, 0.8), 0.9) is None
    got = search_cost.search_cost_summary(runs)
    assert got['target_top1'] == 0.9 and got['baseline'] == 'kaiming'  # kaiming's final
    rows = got['runs']
    assert [rows[n]['epochs_to_target'] for n in runs] == [2, 4, None]
    assert rows['magnitude']['speedup'] == 2.0 and rows['kaiming']['speedup'] == 1.0
    assert rows['random']['speedup'] is None
    assert rows['magnitude']['best_top1'] == 0.92 and rows['kaiming']['test_top1'][0] == [1, 0.3]
    assert rows['magnitude']['mean_top1'] == pytest.approx((0.8 + 0.9 + 0.91 + 0.92) / 4)
    assert [rows[n]['epochs_to_stay'] for n in runs] == [2, 4, None]
    assert rows['magnitude']['speedup_to_stay'] == 2.0 and rows['random']['speedup_to_stay'] is None
    explicit = search_cost.search_cost_summary(runs, target=0.8)
    assert [explicit['runs'][n]['epochs_to_target'] for n in runs] == [1, 3, None]
    assert explicit['runs']['magnitude']['speedup'] == 3.0


# ----------------------------------------------------------------------------
# The modes end to end (tiny budget).
# ----------------------------------------------------------------------------
def test_search_cost_mode_writes_curves_summary_and_plot(pretrained, tmp_path):
    config = study_config(pretrained, 'search_cost')
    config.search_cost.inits = 'magnitude,kaiming'
    result = modes.MODES['search_cost'](resolved(config), str(tmp_path))
    with open(tmp_path / 'search_cost.json') as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert_valid_png(tmp_path / 'search_cost.png')
    assert list(result['runs']) == ['magnitude', 'kaiming'] and result['baseline'] == 'kaiming'
    for name, row in result['runs'].items():
        assert [e for e, _ in row['test_top1']] == [1, 2]
        assert os.path.isdir(os.path.join(row['workdir'], workdir_lib.JACKPOT_DIR))
        assert row['workdir'] == str(tmp_path / 'search_cost' / name)
    # A rerun resumes every finished search instead of searching again.
    metrics = tmp_path / 'search_cost' / 'kaiming' / workdir_lib.METRICS_FILE
    records = metrics.read_text()
    again = modes.MODES['search_cost'](resolved(config), str(tmp_path))
    assert metrics.read_text() == records
    for name, row in result['runs'].items():
        assert {**again['runs'][name], 'search_seconds': 0} == {**row, 'search_seconds': 0}
        # The search time of the finished search, as of its last checkpoint, not the rerun's.
        assert 0.1 < again['runs'][name]['search_seconds'] <= row['search_seconds']


def test_restriction_mode_telemetry_adds_up(pretrained, tmp_path):
    config = study_config(pretrained, 'restriction')
    config.restriction.variants = 'constant,poly4,edge_popup'
    result = modes.MODES['restriction'](resolved(config), str(tmp_path))
    assert_valid_png(tmp_path / 'restriction.png')
    assert list(result['runs']) == ['constant', 'poly4', 'edge_popup']
    for row in result['runs'].values():
        steps = row['steps']
        assert steps['step'] == list(range(1, 13))  # 2 epochs x 6 steps, every step
        assert len(steps['loss']) == len(steps['mask_changes']) == len(steps['flip_backs']) == 12
        assert sum(steps['mask_changes']) == row['mask_changes']
        assert sum(steps['flip_backs']) == row['flip_backs']
        assert sum(row['mask_changes_per_layer'].values()) == row['mask_changes']
        assert sum(row['flip_backs_per_layer'].values()) == row['flip_backs']
        # A weight's first flip is not a flip-back, every later one is.
        assert row['weights_ever_flipped'] == row['mask_changes'] - row['flip_backs']
        assert row['mask_changes'] > 0
    with open(tmp_path / 'restriction' / 'poly4' / workdir_lib.METRICS_FILE) as f:
        records = [json.loads(line) for line in f]
    assert {r['swap_rate'] for r in records if r['mode'] == 'search'} == {1.0, 1 / 16}
    # The per-step trace also reaches TensorBoard, one scalar per step.
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(
        str(tmp_path / 'restriction' / 'poly4' / 'tensorboard')
    )
    events.Reload()
    changes = events.Scalars('search_step/mask_changes')
    assert [e.step for e in changes] == list(range(1, 13))
    poly4 = result['runs']['poly4']['steps']
    assert [e.value for e in changes] == poly4['mask_changes']
    assert [e.value for e in events.Scalars('search_step/flip_backs')] == poly4['flip_backs']


def test_stability_mode_separates_statistics_and_oscillation(pretrained, tmp_path):
    config = study_config(pretrained, 'stability')
    config.search.epochs = 4  # the stable protocol freezes the masks for the last one
    config.stability.variants = 'paper,stable'
    result = modes.MODES['stability'](resolved(config), str(tmp_path))
    assert_valid_png(tmp_path / 'stability.png')
    paper, stable = result['runs']['paper'], result['runs']['stable']
    for row in (paper, stable):
        assert [e for e, _ in row['curves']['test_top1_running']] == [1, 2, 3, 4]
        assert [e for e, _ in row['curves']['test_top1_reestimated']] == [1, 2, 3, 4]
        assert len(row['steps']['mask_changes']) == 24
    # The paper saves its running statistics, the stable protocol re-estimated ones.
    assert paper['curves']['test_top1'] == paper['curves']['test_top1_running']
    assert stable['curves']['test_top1'] == stable['curves']['test_top1_reestimated']
    assert 'validation_top1_running' in stable['curves']
    assert 'validation_top1_running' not in paper['curves']
    assert stable['mask_changes'][-1][1] == 0 and sum(stable['steps']['mask_changes'][18:]) == 0
    assert paper['mask_changes'][-1][1] > 0
    # Twelve pre-training steps: the dense network is well above chance (10 %), not good.
    assert 0.0 <= result['magnitude_top1'] <= 1.0 and result['dense_top1'] > 0.25
    assert 'paper' in stability.format_stability(result)


def test_sweep_mode_compares_jackpot_magnitude_and_random(pretrained, tmp_path):
    config = study_config(pretrained, 'sweep')
    config.sweep.sparsities = '0.5, 0.9'
    result = modes.MODES['sweep'](resolved(config), str(tmp_path))
    assert_valid_png(tmp_path / 'accuracy_vs_sparsity.png')
    assert [round(r['sparsity'], 4) for r in result['rows']] == [0.5, 0.9]
    setup = rc.Setup(resolved(config))
    params, statistics, _ = setup.load_weights(pretrained)
    config.search.sparsity = 0.9
    expected = search_mode.baseline_accuracies(resolved(config), setup, params, statistics)
    row = result['rows'][1]
    assert row['magnitude_top1'] == expected['magnitude_top1']
    assert row['random_top1'] == expected['random_top1']
    assert result['dense_top1'] == expected['dense_top1']
    for row in result['rows']:
        assert_valid_png(os.path.join(row['workdir'], workdir_lib.LAYER_SPARSITY_PNG))
        assert_valid_png(os.path.join(row['workdir'], workdir_lib.MASK_CHANGES_PNG))


def test_study_lists_are_validated_with_the_field_named():
    config = config_lib.get_config()
    config.search_cost.inits = 'magnitude,xavier'
    with pytest.raises(ValueError, match="search_cost.inits.*'xavier'"):
        modes.validate(config)
    config = config_lib.get_config()
    config.sweep.sparsities = '0.5,1.0'
    with pytest.raises(ValueError, match=r'sweep.sparsities.*1\.0'):
        modes.validate(config)
    config.sweep.sparsities = '0.5,high'
    with pytest.raises(ValueError, match='sweep.sparsities'):
        modes.validate(config)
    config = config_lib.get_config()
    config.restriction.variants = ''
    with pytest.raises(ValueError, match='restriction.variants is empty'):
        modes.validate(config)


def test_plot_curves_draws_a_reference_line(tmp_path):
    path = plots.plot_curves(
        {'a': [(1, 0.5), (2, 0.7)]}, str(tmp_path / 'c.png'), 'epoch', 'top-1', hline=(0.6, 'dense')
    )
    assert_valid_png(path)


# ----------------------------------------------------------------------------
# N:M structured jackpots through the launcher.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('init', ['magnitude', 'kaiming'])
def test_nm_search_keeps_n_of_every_m_and_reports_the_pattern(pretrained, tmp_path, init):
    config = study_config(pretrained, 'search')
    config.search.pattern = '2:4'
    config.search.sparsity = 0.5
    config.search.score_init = init
    modes.validate(config)
    found = search_mode.run_search(resolved(config), str(tmp_path))
    assert sum(r['mask_changes'] for r in found['history']) > 0
    _, masks, _, _ = checkpoint.read_jackpot_bundle(os.path.join(tmp_path, workdir_lib.JACKPOT_DIR))
    assert np.all(masks['conv1/kernel'])  # 1 input channel: not a multiple of 4, left dense
    for path in ('conv2/kernel', 'conv3/kernel'):
        assert structured.group_violations(masks[path], 2, 4) == 0
        assert np.count_nonzero(masks[path]) * 2 == masks[path].size
    report = config_plan(config, checkpoint.load_weights(pretrained)[0]).report(
        checkpoint.load_weights(pretrained)[0], masks
    )
    assert report['pattern'] == '2:4 along input channels' and report['group_violations'] == 0
    assert report['dense_layers'] == ['conv1/kernel']
    assert 'pattern 2:4 along input channels: 0 groups break it' in (
        sparsity.format_sparsity_report(report)
    )


def test_nm_baselines_are_n_m_masks_too(pretrained):
    config = study_config(pretrained, 'demo')
    config.search.pattern = '1:4'
    config.search.sparsity = 0.75
    params = checkpoint.load_weights(pretrained)[0]
    plan = config_plan(config, params)
    magnitude, random = plan.magnitude_masks(params), plan.random_masks(params, jax.random.key(1))
    for masks in (magnitude, random):
        for path in ('conv2/kernel', 'conv3/kernel'):
            assert structured.group_violations(masks[path], 1, 4) == 0
    assert not np.array_equal(magnitude['conv3/kernel'], random['conv3/kernel'])


def test_pattern_must_agree_with_the_sparsity():
    config = config_lib.get_config()
    config.search.pattern = '2:4'
    with pytest.raises(ValueError, match=r"'2:4' removes 2/4.*search.sparsity=0.5"):
        modes.validate(config)
    config.search.pattern = '4:2'
    with pytest.raises(ValueError, match="'4:2'"):
        modes.validate(config)
    config.search.pattern = '1:3'
    config.search.sparsity = 2 / 3
    modes.validate(config)


def test_plots_of_models_with_dozens_of_layers_keep_their_layout(tmp_path):
    """ResNet-50 has 53 prunable kernels: no legend or label may squeeze the axes away."""
    layers = [
        f'layer{i}_{j}/conv{k}/kernel' for i in range(1, 5) for j in range(5) for k in (1, 2, 3)
    ]
    records = [
        {
            'mode': 'search',
            'epoch': e,
            'mask_changes': 9,
            'mask_changes_per_layer': dict.fromkeys(layers, e),
        }
        for e in (1, 2)
    ]
    run = {
        'steps': {'step': [1, 2], 'loss': [1.0, 0.9], 'mask_changes': [0, 4]},
        'test_top1': [[1, 0.5], [2, 0.6]],
        'mask_changes_per_layer': dict.fromkeys(layers, 4),
        'flip_backs_per_layer': dict.fromkeys(layers, 1),
    }
    study = {
        'model': 'resnet50', 'data': 'imagenet2012', 'sparsity': 0.9, 'runs': {'constant': run}
    }
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # e.g. "constrained_layout not applied"
        assert_valid_png(plots.plot_mask_changes(records, str(tmp_path / 'changes.png')))
        assert_valid_png(plots.plot_restriction(study, str(tmp_path / 'restriction.png')))


# ----------------------------------------------------------------------------
# BatchNorm statistics re-estimated at evaluation.
# ----------------------------------------------------------------------------
def test_reestimation_evaluates_and_saves_reestimated_statistics(pretrained, tmp_path):
    config = study_config(pretrained, 'search')
    config.search.reestimation_steps = 0
    plain = search_mode.run_search(resolved(config), str(tmp_path / 'plain'))
    config.search.reestimation_steps = 3
    found = search_mode.run_search(resolved(config), str(tmp_path / 'reestimated'))
    # The search itself is unchanged: same masks and running statistics as without it.
    jax.tree.map(np.testing.assert_array_equal, plain['state'].masks, found['state'].masks)
    jax.tree.map(
        np.testing.assert_array_equal, plain['state'].statistics, found['state'].statistics
    )
    # The jackpot carries the statistics re-estimated over 3 batches under its mask.
    setup = rc.Setup(resolved(config))
    masked = sparsity.masked_params(found['state'].frozen_params, found['state'].masks)
    expected = rc.reestimate_statistics(setup, masked, found['state'].statistics, 3, 64)
    _, masks, saved, _ = checkpoint.read_jackpot_bundle(str(tmp_path / 'reestimated' / 'jackpot'))
    jax.tree.map(np.testing.assert_allclose, jax.device_get(expected), saved)
    assert not np.allclose(
        saved['bn1']['mean'], jax.device_get(found['state'].statistics)['bn1']['mean']
    )
    assert found['history'][-1]['test_top1'] == setup.split_metrics(masked, expected)['top1']
    config.search.reestimation_steps = -2
    with pytest.raises(ValueError, match='search.reestimation_steps must be >= 0'):
        modes.validate(config)
