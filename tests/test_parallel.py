"""Data parallel on one host: 8 simulated CPU devices give the results of 1 device.

The batch is split over the mesh's 'data' axis and the state replicated, so XLA
reduces gradients and BatchNorm statistics over the global batch. Only the order
of float additions changes with the device count, hence the tolerances:
scores, optimizer state, BN statistics and losses ``rtol=1e-5, atol=1e-6``;
masks and mask-change counts exactly equal; frozen weights bit for bit.
"""

import functools
import os

import jax
import numpy as np
import pytest
import tiny_model  # tests/tiny_model.py

from jackpot_jax.core import parallel, sparsity, step
from jackpot_jax.io import checkpoint, workdir as workdir_lib
from jackpot_jax.launch import config as config_lib, modes, run_context as rc, search_mode
from jackpot_jax.launch.config_checks import resolved
from jackpot_jax.models import zoo

RTOL, ATOL = 1e-5, 1e-6
GLOBAL_BATCH = 16
STEPS = 3


def _close(actual, expected):
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=RTOL, atol=ATOL), actual, expected
    )


@functools.lru_cache(maxsize=None)
def _tiny():
    """small_cnn width 4 on 8x8x1 inputs, 80% sparse; STEPS global batches of 16."""
    model = zoo.get_model('small_cnn', tiny_model.NUM_CLASSES, width=4)
    variables = tiny_model.variables(width=4)
    flat = sparsity.flatten(variables['params'])
    kernels = {p: flat[p] for p in sparsity.prunable_paths(variables['params'])}
    counts = sparsity.pruned_counts(kernels, 0.8)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(STEPS, GLOBAL_BATCH, *tiny_model.IMAGE_SHAPE)).astype(np.float32)
    labels = rng.integers(0, 10, size=(STEPS, GLOBAL_BATCH)).astype(np.int32)
    return model, variables, kernels, counts, images, labels


def _search_steps(num_devices: int):
    """STEPS search steps on a mesh of ``num_devices``; host copies of the state and metrics."""
    model, variables, kernels, counts, images, labels = _tiny()
    mesh = parallel.make_mesh(num_devices)
    optimizer = step.sgd_optimizer(0.5, 5e-4, 0.9, 1, STEPS)
    masks = jax.jit(functools.partial(sparsity.magnitude_masks, counts=counts))(kernels)
    state = step.init_search_state(
        variables['params'],
        variables['batch_stats'],
        masks,
        sparsity.init_scores(masks),
        optimizer,
    )
    state = parallel.replicate(state, mesh)
    step_fn = step.make_search_step(
        model=model,
        optimizer=optimizer,
        counts=counts,
        steps_per_epoch=STEPS,
        epochs=1,
    )
    metrics = []
    for x, y in zip(images, labels):
        batch = parallel.shard_batch(mesh, x, y)
        assert [s.data.shape[0] for s in batch[0].addressable_shards] == [
            GLOBAL_BATCH // num_devices
        ] * num_devices
        state, m = step_fn(state, *batch)
        metrics.append(m)
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == num_devices
    return parallel.to_host(state), parallel.to_host(metrics)


def test_search_steps_on_8_devices_match_1_device():
    one, one_metrics = _search_steps(1)
    eight, eight_metrics = _search_steps(8)
    assert sum(int(m['mask_changes']) for m in one_metrics) > 0  # the masks did move
    for a, b in zip(eight_metrics, one_metrics):
        assert a['mask_changes_per_layer'] == b['mask_changes_per_layer']
        _close(a['loss'], b['loss'])
        _close(a['top1'], b['top1'])
    jax.tree.map(np.testing.assert_array_equal, eight.masks, one.masks)
    jax.tree.map(np.testing.assert_array_equal, eight.frozen_params, _tiny()[1]['params'])
    _close(eight.scores, one.scores)
    _close(eight.opt_state, one.opt_state)
    _close(eight.statistics, one.statistics)
    assert not np.allclose(  # BN statistics were updated from the (global) batch
        eight.statistics['bn1']['mean'], _tiny()[1]['batch_stats']['bn1']['mean']
    )


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """The tiny model's weights, saved as a search's frozen starting point."""
    path = str(tmp_path_factory.mktemp('weights') / 'tiny')
    tiny_model.save_weights(path, width=4)
    return path


def _search_config(weights: str, num_devices: int):
    config = config_lib.get_config()
    config.protocol = 'paper'  # the jackpot then keeps the search's own statistics, compared below
    config.model.width = 4
    config.pretrained = weights
    config.num_devices = num_devices
    config.steps_per_epoch = STEPS
    config.search.epochs = 1
    config.search.batch_size = GLOBAL_BATCH
    config.search.sparsity = 0.8
    config.search.learning_rate = 0.5
    config.data.eval_batch_size = 360  # the whole test split
    return config


def test_run_search_on_8_devices_matches_1_device(weights, tmp_path):
    found = {
        n: search_mode.run_search(resolved(_search_config(weights, n)), str(tmp_path / f'devices{n}'))
        for n in (1, 8)
    }
    one, eight = (parallel.to_host(found[n]['state']) for n in (1, 8))
    assert len(found[8]['state'].scores['conv1/kernel'].sharding.device_set) == 8
    jax.tree.map(np.testing.assert_array_equal, eight.masks, one.masks)
    _close(eight.scores, one.scores)
    _close(eight.statistics, one.statistics)
    assert found[8]['jackpot_top1'] == found[1]['jackpot_top1']
    _, saved_masks, saved_stats, _ = checkpoint.read_jackpot_bundle(
        os.path.join(tmp_path, 'devices8', workdir_lib.JACKPOT_DIR)
    )
    jax.tree.map(np.testing.assert_array_equal, saved_masks, one.masks)
    _close(saved_stats, one.statistics)


def test_batch_size_that_does_not_divide_over_the_devices_is_rejected(weights):
    mesh = parallel.make_mesh(8)
    parallel.check_batch_size(16, mesh)
    with pytest.raises(ValueError, match='batch size 12 does not divide over 8 devices'):
        parallel.check_batch_size(12, mesh)
    setup = rc.Setup(resolved(_search_config(weights, 8)))
    with pytest.raises(ValueError, match='use a multiple of 8'):
        setup.steps_per_epoch(12)
    config = _search_config(weights, 8)
    config.data.eval_batch_size = 100
    with pytest.raises(ValueError, match='batch size 100 does not divide over 8 devices'):
        rc.Setup(resolved(config)).split_metrics(None, None)


def test_mesh_size_is_checked():
    assert parallel.make_mesh(0).devices.size == len(jax.devices())
    with pytest.raises(ValueError, match='num_devices=9, but 8 devices are available'):
        parallel.make_mesh(9)


def test_distributed_config_is_validated():
    config = config_lib.get_config()
    config.distributed.cpu_collectives = 'nccl'
    with pytest.raises(ValueError, match="unknown distributed.cpu_collectives 'nccl'"):
        modes.validate(config)
    config = config_lib.get_config()
    config.distributed.num_processes = 2
    config.distributed.process_id = 2
    with pytest.raises(ValueError, match='process_id=2 is out of range'):
        modes.validate(config)


def test_prefetch_keeps_two_batches_in_flight_in_order():
    mesh = parallel.make_mesh(2)
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield np.full((4, 3), i, np.float32), np.arange(4, dtype=np.int32) + i

    batches = parallel.prefetch_to_mesh(source(), mesh)
    images, labels = next(batches)
    assert pulled == [0, 1]  # the next batch is on its way while batch 0 is used
    assert images.sharding == parallel.batch_sharding(mesh)
    rest = list(batches)
    assert pulled == [0, 1, 2, 3, 4] and len(rest) == 4
    for i, (x, y) in enumerate([(images, labels)] + rest):
        np.testing.assert_array_equal(np.asarray(x), np.full((4, 3), i))
        np.testing.assert_array_equal(np.asarray(y), np.arange(4) + i)
    with pytest.raises(ValueError, match='size=0'):
        next(parallel.prefetch_to_mesh(source(), mesh, size=0))
