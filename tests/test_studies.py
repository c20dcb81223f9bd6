"""Studies: mask overlap golden numbers, the 'overlap' mode end to end, the plots."""

import json
import os

import ml_collections
import numpy as np
import pytest
import tiny_model  # tests/tiny_model.py
from PIL import Image
from tiny_model import tiny_config  # tests/tiny_model.py

from jackpot_jax.baselines import criteria
from jackpot_jax.core import sparsity
from jackpot_jax.engine.metrics import read_jsonl
from jackpot_jax.io import checkpoint, workdir as workdir_lib
from jackpot_jax.launch import modes, plots
from jackpot_jax.launch.config_checks import resolved
from jackpot_jax.launch.studies import overlap

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def assert_valid_png(path):
    with open(path, 'rb') as f:
        assert f.read(8) == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == 'PNG' and min(image.size) > 100


# ----------------------------------------------------------------------------
# mask_overlap on hand-made masks.
# ----------------------------------------------------------------------------
def test_mask_overlap_golden_numbers():
    a = {'l1': np.array([1, 1, 0, 0], bool), 'l2': np.array([[1, 0], [0, 0]], bool)}
    b = {'l1': np.array([1, 0, 1, 0], bool), 'l2': np.array([[1, 0], [0, 0]], bool)}
    got = overlap.mask_overlap(a, b)
    l1, l2, overall = got['per_layer']['l1'], got['per_layer']['l2'], got['overall']
    assert (l1['size'], l1['kept_a'], l1['kept_b'], l1['shared']) == (4, 2, 2, 1)
    assert l1['shared_kept_fraction'] == 0.5 and l1['iou'] == pytest.approx(1 / 3)
    assert l1['chance'] == 0.5  # a random 2 of 4 keeps half of a's 2, on average
    assert l2['shared_kept_fraction'] == 1.0 and l2['iou'] == 1.0 and l2['chance'] == 0.25
    assert (overall['size'], overall['kept_a'], overall['kept_b'], overall['shared']) == (
        8,
        3,
        3,
        2,
    )
    assert overall['shared_kept_fraction'] == pytest.approx(2 / 3)
    assert overall['iou'] == 0.5  # 2 shared of 4 kept by either
    assert overall['chance'] == pytest.approx((2 * 2 / 4 + 1 * 1 / 4) / 3)
    json.dumps(got)  # plain Python numbers only


def test_mask_overlap_is_relative_to_the_first_mask_and_handles_empty_layers():
    a = {'l': np.array([1, 1, 1, 0], bool)}
    b = {'l': np.array([1, 0, 0, 0], bool)}
    assert overlap.mask_overlap(a, b)['overall']['shared_kept_fraction'] == pytest.approx(1 / 3)
    assert overlap.mask_overlap(b, a)['overall']['shared_kept_fraction'] == 1.0
    assert overlap.mask_overlap(a, b)['overall']['iou'] == pytest.approx(1 / 3)
    empty = {'l': np.zeros(4, bool)}
    both_empty = overlap.mask_overlap(empty, empty)['overall']
    assert both_empty['shared_kept_fraction'] == 1.0 and both_empty['iou'] == 1.0
    assert overlap.mask_overlap(a, empty)['overall']['shared_kept_fraction'] == 0.0


def test_mask_overlap_rejects_masks_of_different_layers_or_shapes():
    with pytest.raises(ValueError, match=r"only in a \['x'\]"):
        overlap.mask_overlap({'x': np.ones(2, bool)}, {'y': np.ones(2, bool)})
    with pytest.raises(ValueError, match='shapes differ'):
        overlap.mask_overlap({'x': np.ones(2, bool)}, {'x': np.ones(3, bool)})


# ----------------------------------------------------------------------------
# The 'overlap' mode on a tiny digits workdir.
# ----------------------------------------------------------------------------
def overlap_config():
    fields = {'model.width': 4, 'search.epochs': 1, 'search.batch_size': 32}
    return tiny_config(**fields, steps_per_epoch=2)


@pytest.fixture(scope='module')
def overlap_run(tmp_path_factory):
    """A demo workdir (weights drawn in numpy instead of pre-trained: it is faster), then overlap."""
    workdir = str(tmp_path_factory.mktemp('overlap'))
    tiny_model.save_weights(os.path.join(workdir, workdir_lib.PRETRAINED_DIR), width=4)
    summary = modes.run_demo(resolved(overlap_config()), workdir)
    result = overlap.run_overlap(resolved(overlap_config()), workdir)
    return workdir, summary, result


def test_overlap_writes_every_criterion_to_json_and_png(overlap_run):
    workdir, _, result = overlap_run
    with open(os.path.join(workdir, overlap.OVERLAP_JSON)) as f:
        saved = json.load(f)
    assert set(saved['criteria']) == set(criteria.CRITERIA)
    _, jackpot, _, meta = checkpoint.read_jackpot_bundle(os.path.join(workdir, workdir_lib.JACKPOT_DIR))
    assert saved['counts'] == meta['counts']
    for name, row in saved['criteria'].items():
        assert 0.0 <= row['top1'] <= 1.0, name
        layers = row['overlap']['per_layer']
        assert set(layers) == set(meta['counts']), name
        for path, layer in layers.items():  # the same per-layer counts as the jackpot
            assert layer['kept_a'] == layer['kept_b'] == layer['size'] - meta['counts'][path]
            assert 0.0 <= layer['shared_kept_fraction'] <= 1.0
    assert saved == json.loads(json.dumps(result))
    assert_valid_png(os.path.join(workdir, overlap.OVERLAP_PNG))


def test_overlap_accuracies_match_the_demo(overlap_run):
    _, summary, result = overlap_run
    assert result['dense']['top1'] == pytest.approx(summary['dense_top1'])
    assert result['jackpot']['top1'] == pytest.approx(summary['jackpot_top1'])
    # The demo's magnitude and random masks are these criteria at the same counts and key.
    assert result['criteria']['magnitude']['top1'] == pytest.approx(summary['magnitude_top1'])
    assert result['criteria']['random']['top1'] == pytest.approx(summary['random_top1'])
    assert result['sparsity'] == pytest.approx(summary['sparsity'])
    assert 'top1_reestimated' not in result['criteria']['snip']  # reestimation_steps defaults to 0
    assert 0.0 <= result['jackpot_pretrained_bn']['top1'] <= 1.0


def test_overlap_settings_come_from_the_optional_config_group_and_a_table_is_printed(
    overlap_run, capsys
):
    workdir, _, _ = overlap_run
    config = overlap_config()
    config.overlap = ml_collections.ConfigDict(
        {'criteria': 'magnitude, random', 'batch_size': 16, 'reestimation_steps': 3}
    )
    result = overlap.run_overlap(resolved(config), workdir)
    assert list(result['criteria']) == ['magnitude', 'random'] and result['batch_size'] == 16
    for row in [result['jackpot_pretrained_bn'], *result['criteria'].values()]:
        assert 0.0 <= row['top1_reestimated'] <= 1.0
    out = capsys.readouterr().out
    for text in ('magnitude', 'jackpot, pre-trained BN', 're-estimated', 'shared kept by chance'):
        assert text in out
    assert_valid_png(os.path.join(workdir, overlap.OVERLAP_PNG))
    assert set(overlap.run_overlap(resolved(config), workdir, names=('magnitude',))['criteria']) == {
        'magnitude'
    }
    with pytest.raises(ValueError, match='unknown criteria'):
        overlap.run_overlap(resolved(config), workdir, names=('obd',))
    config.overlap.reestimation_steps = -1
    with pytest.raises(ValueError, match='reestimation_steps must be >= 0'):
        overlap.run_overlap(resolved(config), workdir)


# ----------------------------------------------------------------------------
# Plots.
# ----------------------------------------------------------------------------
def test_plots_write_valid_pngs(overlap_run, tmp_path):
    workdir, _, _ = overlap_run
    params, _, _ = checkpoint.load_weights(os.path.join(workdir, workdir_lib.PRETRAINED_DIR))
    _, masks, _, _ = checkpoint.read_jackpot_bundle(os.path.join(workdir, workdir_lib.JACKPOT_DIR))
    records = read_jsonl(os.path.join(workdir, workdir_lib.METRICS_FILE))
    search = [r for r in records if r['mode'] == 'search']
    paths = [
        plots.plot_layer_sparsity(
            sparsity.sparsity_report(params, masks), str(tmp_path / 'sparsity.png')
        ),
        plots.plot_mask_changes(records, str(tmp_path / 'changes.png')),
        plots.plot_curves(
            {
                'jackpot': [(r['epoch'], r['test_top1']) for r in search],
                'train': [(r['epoch'], r['train_top1']) for r in search],
            },
            str(tmp_path / 'sub' / 'curves.png'),
            'epoch',
            'top-1',
            'accuracy per epoch',
        ),
    ]
    for path in paths:
        assert_valid_png(path)
    with pytest.raises(ValueError, match='no search records'):
        plots.plot_mask_changes([r for r in records if r['mode'] != 'search'], paths[1])
