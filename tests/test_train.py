"""End to end: the launcher's modes on the digits demo with a tiny budget."""

import contextlib
import json
import os
import subprocess
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import tiny_config  # tests/tiny_model.py

from jackpot_jax.core import sparsity
from jackpot_jax.engine import metrics
from jackpot_jax.engine.metrics import read_jsonl
from jackpot_jax.io import checkpoint, workdir as workdir_lib
from jackpot_jax.launch import modes, search_mode, weight_training
from jackpot_jax.launch.config_checks import resolved

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config():
    return tiny_config(**{'pretrain.epochs': 2, 'search.epochs': 2})


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('demo'))
    summary = modes.run_demo(resolved(demo_config()), workdir)
    return workdir, summary


def test_demo_writes_summary_metrics_weights_and_jackpot(demo_run):
    workdir, summary = demo_run
    with open(os.path.join(workdir, 'summary.json')) as f:
        saved = json.load(f)
    for key in (
        'dense_top1',
        'magnitude_top1',
        'random_top1',
        'jackpot_top1',
        'sparsity',
        'search_seconds',
    ):
        assert key in saved
    for key in ('dense_top1', 'magnitude_top1', 'random_top1', 'jackpot_top1'):
        assert 0.0 <= saved[key] <= 1.0
    assert saved['sparsity'] == pytest.approx(0.9, abs=1e-4)
    # At this size (width 8, two epochs each) the dense network reaches about 80 %, the
    # magnitude and random masks collapse to chance, and the jackpot recovers to within a
    # few points of dense without training a weight (about 75 %).
    assert saved['dense_top1'] > 0.7
    assert max(saved['magnitude_top1'], saved['random_top1']) < 0.2
    assert saved['jackpot_top1'] >= saved['dense_top1'] - 0.10
    records = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
    search_records = [r for r in records if r['mode'] == 'search']
    assert [r['epoch'] for r in search_records] == [1, 2]
    assert all('mask_changes_per_layer' in r and 'test_top1' in r for r in search_records)


def test_search_never_changes_the_saved_weights_and_saves_exact_masks(demo_run, tmp_path):
    workdir, _ = demo_run
    params, _, _ = checkpoint.load_weights(os.path.join(workdir, workdir_lib.PRETRAINED_DIR))
    config = demo_config()
    config.pretrained = os.path.join(workdir, workdir_lib.PRETRAINED_DIR)
    found = search_mode.run_search(resolved(config), str(tmp_path))
    jax.tree.map(
        np.testing.assert_array_equal, params, jax.device_get(found['state'].frozen_params)
    )
    scores, masks, _, meta = checkpoint.read_jackpot_bundle(os.path.join(tmp_path, workdir_lib.JACKPOT_DIR))
    assert meta['counts'] == found['counts']
    for path, k in found['counts'].items():
        assert masks[path].dtype == bool and masks[path].size - masks[path].sum() == k
        np.testing.assert_array_equal(masks[path], jax.device_get(found['state'].masks[path]))


def test_evaluate_mode_reproduces_the_selection_rule_accuracy(demo_run, capsys):
    workdir, summary = demo_run
    result = modes.run_evaluate(resolved(demo_config()), workdir)
    assert result['top1'] == pytest.approx(summary['jackpot_top1'])
    assert 'sparsity over prunable weights: 90.00%' in capsys.readouterr().out


def test_weights_of_another_model_are_rejected_with_the_mismatch(demo_run, tmp_path):
    workdir, _ = demo_run
    config = demo_config()
    config.model.width = 16
    config.pretrained = os.path.join(workdir, workdir_lib.PRETRAINED_DIR)
    with pytest.raises(ValueError, match=r'conv1/kernel: expected shape \(3, 3, 1, 16\)'):
        search_mode.run_search(resolved(config), str(tmp_path))
    config.model.name = 'resnet20'
    with pytest.raises(ValueError, match="model 'small_cnn'"):
        search_mode.run_search(resolved(config), str(tmp_path))


def test_missing_pretrained_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="mode 'pretrain'"):
        search_mode.run_search(resolved(demo_config()), str(tmp_path))


def test_command_line_runs_search_from_a_config_file_with_overrides(demo_run, tmp_path):
    workdir, _ = demo_run
    cmd = [
        sys.executable,
        '-m',
        'jackpot_jax.main',
        '--config=configs/default.py',
        f'--workdir={tmp_path}',
        '--mode=search',
        '--config.model.width=8',
        '--config.search.epochs=1',
        '--config.search.sparsity=0.95',
        f'--config.pretrained={os.path.join(workdir, workdir_lib.PRETRAINED_DIR)}',
    ]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
    _, masks, _, meta = checkpoint.read_jackpot_bundle(os.path.join(tmp_path, workdir_lib.JACKPOT_DIR))
    assert meta['summary']['sparsity'] == pytest.approx(0.95, abs=1e-3)
    assert sum(meta['counts'].values()) == 5832 - 291  # keep floor(5832 * 0.05) of width 8


def test_command_line_rejects_unknown_keys_and_bad_values(tmp_path):
    def run(*flags):
        cmd = [sys.executable, '-m', 'jackpot_jax.main', f'--workdir={tmp_path}', *flags]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)

    bad_key = run('--config.search.sparsty=0.5')
    assert bad_key.returncode != 0 and 'sparsty' in bad_key.stderr
    bad_value = run('--config.search.sparsity=1.2')
    assert bad_value.returncode != 0 and 'must be in [0, 1), got 1.2' in bad_value.stderr


def test_tensorboard_has_the_search_scalars(demo_run):
    from tensorboard.backend.event_processing import event_accumulator

    workdir, _ = demo_run
    events = event_accumulator.EventAccumulator(os.path.join(workdir, 'tensorboard'))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    for tag in (
        'search/train_loss',
        'search/train_top1',
        'search/test_top1',
        'search/learning_rate',
        'search/swap_rate',
        'search/mask_changes',
        'search/mask_changes_per_layer/conv2/kernel',
        'search/flip_backs',
        'search/flip_backs_per_layer/conv2/kernel',
        'pretrain/train_loss',
    ):
        assert tag in tags, tag
    lrs = [e.value for e in events.Scalars('search/learning_rate')]
    assert lrs == pytest.approx([0.1, 0.05])  # per-epoch cosine over 2 epochs


def test_tuning_under_a_fixed_mask_keeps_pruned_weights_exactly_zero(demo_run, tmp_path):
    workdir, _ = demo_run
    config = demo_config()
    config.tune.epochs = 1
    result = weight_training.run_tune(resolved(config), workdir)
    assert 0.0 <= result['top1'] <= 1.0
    tuned, _, _ = checkpoint.load_weights(os.path.join(workdir, workdir_lib.TUNED_DIR))
    original, _, _ = checkpoint.load_weights(os.path.join(workdir, workdir_lib.PRETRAINED_DIR))
    _, masks, _, _ = checkpoint.read_jackpot_bundle(os.path.join(workdir, workdir_lib.JACKPOT_DIR))
    flat_tuned, flat_original = sparsity.flatten(tuned), sparsity.flatten(original)
    for path, mask in masks.items():
        w = np.asarray(flat_tuned[path])
        assert np.all(w[~mask] == 0), path
        assert not np.array_equal(
            w[mask], np.asarray(flat_original[path])[mask]
        )  # kept ones trained


def test_bfloat16_search_lands_within_two_points_of_float32(demo_run, tmp_path):
    """Same frozen weights and settings as the demo's float32 search, computed in bfloat16:
    the jackpot's test top-1 is within 2 points (7 of the 360 test images; bfloat16 rounding
    flips near-tied scores, and the CPU's kernels decide which: 1.39 points on one x86
    machine), and everything carried stays float32."""
    workdir, summary = demo_run
    config = demo_config()
    config.mode = 'search'
    config.model.dtype = 'bfloat16'
    config.pretrained = os.path.join(workdir, workdir_lib.PRETRAINED_DIR)
    found = search_mode.run_search(resolved(config), str(tmp_path))
    assert abs(found['jackpot_top1'] - summary['jackpot_top1']) <= 0.02
    state = found['state']
    floats = [state.frozen_params, state.scores, state.opt_state, state.statistics]
    dtypes = {x.dtype for x in jax.tree.leaves(floats)}
    assert np.dtype(np.float32) in dtypes  # optimizer step counts are integers
    assert all(d == np.float32 for d in dtypes if jnp.issubdtype(d, jnp.floating))
    config.mode = 'evaluate'
    assert modes.run_evaluate(resolved(config), str(tmp_path))['top1'] == found['jackpot_top1']


def _watch_host_reads(monkeypatch):
    """(guards entered, host reads of device values made while transfers were disallowed).

    On an accelerator ``jax.transfer_guard_device_to_host('disallow')`` itself raises at
    such a read; on CPU arrays already live on the host and it lets them through, so this
    records the reads that go through the array's Python conversions (float, int, bool,
    item, tolist, device_get) instead.
    """
    levels, entered, reads = [], [], []
    real_guard = jax.transfer_guard_device_to_host

    @contextlib.contextmanager
    def guard(level):
        levels.append(level)
        entered.append(level)
        try:
            with real_guard(level):
                yield
        finally:
            levels.pop()

    array_type = type(jnp.zeros(()))

    def watched(original):
        def read(self, *args, **kwargs):
            if levels and levels[-1] == 'disallow':
                reads.append(''.join(traceback.format_stack(limit=8)))
            if isinstance(original, property):
                return original.fget(self)
            return original(self, *args, **kwargs)

        return property(read) if isinstance(original, property) else read

    monkeypatch.setattr(jax, 'transfer_guard_device_to_host', guard)
    for name in ('_value', 'item', '__array__'):
        monkeypatch.setattr(array_type, name, watched(array_type.__dict__[name]))
    return entered, reads


def test_search_steps_never_wait_on_the_host(demo_run, tmp_path, monkeypatch):
    """The step loop (with a mid-epoch checkpoint) runs under the device-to-host guard and
    reads nothing back; a float() of a metric in the loop is caught."""
    workdir, _ = demo_run
    config = demo_config()
    config.mode, config.protocol = 'search', 'paper'
    config.search.epochs, config.steps_per_epoch, config.checkpoint.every_steps = 1, 4, 2
    config.pretrained = os.path.join(workdir, workdir_lib.PRETRAINED_DIR)
    entered, reads = _watch_host_reads(monkeypatch)
    search_mode.run_search(resolved(config), str(tmp_path / 'clean'))
    assert entered.count('disallow') == 1 and entered.count('allow') == 1  # the checkpoint
    assert not reads, reads[0]

    add = metrics.EpochMetrics.add

    def leaky_add(self, step, metrics):
        float(metrics['loss'])  # a per-step host sync
        add(self, step, metrics)

    monkeypatch.setattr(metrics.EpochMetrics, 'add', leaky_add)
    search_mode.run_search(resolved(config), str(tmp_path / 'leaky'))
    assert len(reads) == 4 and 'leaky_add' in reads[0]
