"""Checkpoints: exact resume, crash safety under SIGKILL, layouts, clear errors, export."""

import functools
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tiny_model import config_plan, fault_at_step, tiny_config  # tests/tiny_model.py

from jackpot_jax.core import sparsity, step as step_lib
from jackpot_jax.engine.metrics import read_jsonl
from jackpot_jax.io import checkpoint, workdir as workdir_lib
from jackpot_jax.launch import modes, run_context as rc, search_mode, weight_training
from jackpot_jax.launch.config_checks import resolved
from jackpot_jax.models import zoo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6  # steps per epoch


def search_config(weights):
    fields = {'mode': 'search', 'pretrain.epochs': 1, 'search.epochs': 2}
    fields.update({'steps_per_epoch': STEPS, 'checkpoint.every_steps': 2, 'pretrained': weights})
    return tiny_config(**fields)


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('weights'))
    config = search_config('')
    weight_training.run_pretrain(resolved(config), workdir)
    return os.path.join(workdir, workdir_lib.PRETRAINED_DIR)


@pytest.fixture(scope='module')
def reference(weights, tmp_path_factory):
    """An uninterrupted search."""
    workdir = str(tmp_path_factory.mktemp('reference'))
    result = search_mode.run_search(resolved(search_config(weights)), workdir)
    return workdir, jax.device_get(result['state'])


def _search_records(workdir):
    return [r for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if r['mode'] == 'search']


def _assert_same_search(state, reference_state):
    for field in ('scores', 'masks', 'ever_flipped', 'statistics'):
        jax.tree.map(
            np.testing.assert_array_equal,
            jax.device_get(getattr(reference_state, field)),
            jax.device_get(getattr(state, field)),
        )


class _Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, calls):
    """Makes the search step raise after `calls` steps, as a preemption would."""

    def interrupt(state, metrics):
        raise _Interrupt

    fault_at_step(monkeypatch, calls + 1, interrupt)


def test_masks_pack_to_one_bit_per_weight_and_back():
    rng = np.random.default_rng(0)
    masks = {'a/kernel': rng.random((3, 3, 2, 5)) < 0.3, 'b/kernel': rng.random((7, 3)) < 0.5}
    packed, shapes = checkpoint.pack_masks(masks)
    assert packed['a']['kernel'].dtype == np.uint8 and packed['a']['kernel'].size == 12  # 90 bits
    unpacked = checkpoint.unpack_masks(packed, shapes)
    for path, mask in masks.items():
        np.testing.assert_array_equal(unpacked[path], mask)


def test_fingerprint_sees_a_single_changed_bit():
    params = {'conv': {'kernel': np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}}
    changed = {'conv': {'kernel': params['conv']['kernel'].copy()}}
    changed['conv']['kernel'].view(np.uint32)[1, 2] ^= 1
    assert checkpoint.weights_fingerprint(params) == checkpoint.weights_fingerprint(
        {'conv': {'kernel': params['conv']['kernel'].copy()}}
    )
    assert checkpoint.weights_fingerprint(params) != checkpoint.weights_fingerprint(changed)


@pytest.mark.parametrize('interrupt_at', [3, 7])  # mid-epoch 1 (after a save), mid-epoch 2
def test_interrupted_search_resumes_bit_identically(
    weights, reference, tmp_path, monkeypatch, interrupt_at
):
    ref_dir, ref_state = reference
    workdir = str(tmp_path)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, interrupt_at)
        with pytest.raises(_Interrupt):
            search_mode.run_search(resolved(search_config(weights)), workdir)
    saved = checkpoint.SearchCheckpoints(os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR)).steps()
    assert saved and max(saved) < 2 * STEPS
    resumed = search_mode.run_search(resolved(search_config(weights)), workdir)
    _assert_same_search(resumed['state'], ref_state)
    assert _search_records(workdir) == _search_records(ref_dir)


def test_keeps_latest_n_and_every_epoch_the_rule_may_still_keep(reference):
    workdir, _ = reference
    steps = checkpoint.SearchCheckpoints(os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR)).steps()
    records = _search_records(workdir)
    # An epoch stays unless a later one is at least as good on validation (never test).
    candidates = {
        r['step']
        for i, r in enumerate(records)
        if all(later['validation_top1'] < r['validation_top1'] for later in records[i + 1 :])
    }
    latest = list(range(2, 2 * STEPS + 1, 2))[-3:]
    assert set(steps) == set(latest) | candidates


def test_sigkill_during_saves_never_leaves_a_bad_checkpoint(weights, reference, tmp_path):
    """Kill the real launcher while it saves a checkpoint every step; resume until done."""
    _, ref_state = reference
    workdir = str(tmp_path)
    cmd = [
        sys.executable,
        '-m',
        'jackpot_jax.main',
        f'--workdir={workdir}',
        '--mode=search',
        '--config.model.width=8',
        '--config.search.epochs=2',
        f'--config.steps_per_epoch={STEPS}',
        '--config.checkpoint.every_steps=1',
        f'--config.pretrained={weights}',
    ]
    ckpt_dir = os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR)
    kills = 0
    for _ in range(2):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if glob.glob(os.path.join(ckpt_dir, '*tmp*')):  # a save is in flight
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    assert kills >= 1
    ckpts = checkpoint.SearchCheckpoints(ckpt_dir)
    for step in ckpts.steps():  # every checkpoint that looks whole restores
        assert ckpts.read_meta(step)['step'] == step
    ckpts.close()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    masks = checkpoint.read_jackpot_bundle(os.path.join(workdir, workdir_lib.JACKPOT_DIR))[1]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(ref_state.masks), masks)


@pytest.mark.parametrize('devices_before, devices_after', [(8, 1), (1, 8)])
def test_restore_across_device_layouts(
    weights, tmp_path, monkeypatch, devices_before, devices_after
):
    config = search_config(weights)
    config.num_devices = devices_before
    with monkeypatch.context() as patch:
        _interrupt_after(patch, STEPS + 1)
        with pytest.raises(_Interrupt):
            search_mode.run_search(resolved(config), str(tmp_path))
    ckpt_dir = os.path.join(tmp_path, workdir_lib.CHECKPOINTS_DIR)
    ckpts = checkpoint.SearchCheckpoints(ckpt_dir)
    step = ckpts.latest_step()
    config.num_devices = devices_after
    setup = rc.Setup(resolved(config))
    params, statistics, _ = setup.load_weights(weights)
    plan = config_plan(config, params)
    counts, masks = plan.counts, plan.magnitude_masks(params)
    optimizer = step_lib.sgd_optimizer(0.1, 5e-4, 0.9, 2, STEPS)
    like = step_lib.init_search_state(
        params, statistics, masks, sparsity.init_scores(masks), optimizer
    )
    state, meta = ckpts.restore(step, like)
    ckpts.close()
    assert int(state.step) == step == meta['step']
    assert len(jax.tree.leaves(state.scores)[0].sharding.device_set) == devices_after
    for path, k in counts.items():
        assert np.asarray(state.masks[path]).size - np.asarray(state.masks[path]).sum() == k
    result = search_mode.run_search(resolved(config), str(tmp_path))  # and the search finishes there
    assert int(result['state'].step) == 2 * STEPS


def test_changed_weights_or_config_are_refused_with_the_difference(weights, tmp_path, monkeypatch):
    workdir = str(tmp_path / 'run')
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 3)
        with pytest.raises(_Interrupt):
            search_mode.run_search(resolved(search_config(weights)), workdir)
    config = search_config(weights)
    config.search.sparsity = 0.95
    with pytest.raises(ValueError, match=r'search.sparsity: checkpoint 0.9, now 0.95'):
        search_mode.run_search(resolved(config), workdir)
    other = str(tmp_path / 'other_weights')
    params, statistics, meta = checkpoint.load_weights(weights)
    params = jax.tree.map(lambda x: x * 1.5, params)
    checkpoint.save_weights(other, params, statistics, meta)
    with pytest.raises(ValueError, match='differ from those the search'):
        search_mode.run_search(resolved(search_config(other)), workdir)


def test_corrupted_checkpoint_names_the_folder_to_delete(weights, tmp_path, monkeypatch):
    workdir = str(tmp_path)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 5)
        with pytest.raises(_Interrupt):
            search_mode.run_search(resolved(search_config(weights)), workdir)
    ckpt_dir = os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR)
    latest = os.path.join(ckpt_dir, '4')
    for path in glob.glob(os.path.join(latest, 'scores', '**', '*'), recursive=True):
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            with open(path, 'r+b') as f:
                f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(checkpoint.CheckpointError, match=f'{latest}.*Delete that folder'):
        search_mode.run_search(resolved(search_config(weights)), workdir)
    shutil.rmtree(latest)
    result = search_mode.run_search(resolved(search_config(weights)), workdir)  # resumes from step 2
    assert int(result['state'].step) == 2 * STEPS


def test_truncated_weights_file_is_a_clear_error(weights, tmp_path):
    broken = str(tmp_path / 'broken')
    shutil.copytree(weights, broken)
    for path in glob.glob(os.path.join(broken, 'params', '**', '*'), recursive=True):
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            with open(path, 'r+b') as f:
                f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(checkpoint.CheckpointError, match='unreadable'):
        checkpoint.load_weights(broken)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(weights, tmp_path, monkeypatch):
    original = fault_at_step(
        monkeypatch, 4, lambda state, metrics: (state, {**metrics, 'loss': metrics['loss'] * np.nan})
    )
    with pytest.raises(FloatingPointError, match='at step 4.*last good checkpoint is step 2'):
        search_mode.run_search(resolved(search_config(weights)), str(tmp_path))
    steps = checkpoint.SearchCheckpoints(os.path.join(tmp_path, workdir_lib.CHECKPOINTS_DIR)).steps()
    assert steps == [2]
    # The advice works: the same search with a lower learning rate resumes from step 2.
    monkeypatch.setattr(step_lib, 'make_search_step', original)
    config = search_config(weights)
    config.search.learning_rate = 0.05
    result = search_mode.run_search(resolved(config), str(tmp_path))
    assert [r['step'] for r in result['history']] == [STEPS, 2 * STEPS]
    # Once resumed, the learning rate is part of the search again.
    config.search.learning_rate = 0.01
    config.search.epochs = 3
    with pytest.raises(ValueError, match='search.learning_rate: checkpoint 0.05'):
        search_mode.run_search(resolved(config), str(tmp_path))


def test_export_evaluates_like_the_jackpot(weights, reference, capsys):
    workdir, _ = reference
    config = search_config(weights)
    jackpot = modes.run_evaluate(resolved(config), workdir)
    out = modes.run_export(resolved(config), workdir)['masked_weights']
    config.pretrained, config.jackpot, config.mode = out, 'none', 'evaluate'
    exported = modes.run_evaluate(resolved(config), workdir)
    assert exported['top1'] == jackpot['top1']
    assert exported['sparsity'] == pytest.approx(jackpot['sparsity'])


def _folder_bytes(path):
    return sum(
        os.path.getsize(p)
        for p in glob.glob(os.path.join(path, '**'), recursive=True)
        if os.path.isfile(p)
    )


def test_resnet50_jackpot_bundle_is_under_a_25th_of_the_weights(tmp_path):
    model = zoo.get_model('resnet50', 1000)
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.numpy.zeros((1, 224, 224, 3)),
    )
    params = sparsity.flatten(shapes['params'])
    rng = np.random.default_rng(0)
    masks = {
        p: rng.random(params[p].shape) < 0.1 for p in sparsity.prunable_paths(shapes['params'])
    }
    statistics = jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes['batch_stats'])
    path = str(tmp_path / 'jackpot')
    checkpoint.save_jackpot(path, None, masks, statistics, {'model': {'name': 'resnet50'}})
    weights_bytes = 4 * sum(int(np.prod(s.shape)) for s in params.values())
    bundle = _folder_bytes(path)
    print(
        f'ResNet-50 jackpot bundle: {bundle:,} bytes; float32 weights: {weights_bytes:,} bytes; '
        f'ratio 1/{weights_bytes / bundle:.1f}'
    )
    assert bundle * 25 <= weights_bytes
    _, loaded, _, _ = checkpoint.read_jackpot_bundle(path)
    for p, m in masks.items():
        np.testing.assert_array_equal(loaded[p], m)
