"""The search state split over the devices (the mesh's 'fsdp' axis) finds what 1 device finds.

Large leaves of the state (frozen params, scores, masks, optimizer state, flip history)
are split along their largest dimension that divides over the 'fsdp' axis; the batch is
split over every device. Only the order of float additions changes with the mesh, hence
scores within ``rtol=1e-5, atol=1e-6`` while masks are exactly equal. The test models are
tiny, so the size below which leaves stay replicated is lowered to make their kernels split.
"""

import functools
import os
import shutil

import jax
import numpy as np
import pytest
import tiny_model  # tests/tiny_model.py
from jax.sharding import PartitionSpec as P

import jackpot_jax
from jackpot_jax.core import parallel
from jackpot_jax.engine import loop
from jackpot_jax.launch import config as config_lib, modes, run_context as rc, search_mode
from jackpot_jax.launch.config_checks import resolved
from jackpot_jax.models import zoo

RTOL, ATOL = 1e-5, 1e-6
BATCH, STEPS = 16, 3
SETTINGS = dict(sparsity=0.8, epochs=2, learning_rate=0.5, protocol='paper', progress=False)


@pytest.fixture(autouse=True)
def small_leaves_split(monkeypatch):
    """Kernels of a few hundred weights are split too (the default keeps them whole)."""
    monkeypatch.setattr(parallel, 'MIN_SHARDED_SIZE', 64)


@pytest.fixture
def last_state(monkeypatch):
    """The final SearchState of every engine run, in order."""
    states = []
    run = loop.run

    def recording(*args, **kwargs):
        outcome = run(*args, **kwargs)
        states.append(outcome.state)
        return outcome

    monkeypatch.setattr(loop, 'run', recording)
    return states


def _batches(image_shape, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.normal(size=(BATCH, *image_shape)).astype(np.float32),
            rng.integers(0, classes, BATCH).astype(np.int32),
        )
        for _ in range(STEPS)
    ]


@functools.lru_cache(maxsize=None)
def _cnn():
    """small_cnn (BatchNorm) at width 4 on 8x8x1 images."""
    model = zoo.get_model('small_cnn', tiny_model.NUM_CLASSES, width=4)
    return model, tiny_model.variables(width=4), _batches(tiny_model.IMAGE_SHAPE)


@functools.lru_cache(maxsize=None)
def _vit():
    """A one-block ViT on 8x8x1 images (dropout 0: the same path on every mesh)."""
    model = zoo.get_model('vit_tiny', 10, num_layers=1, hidden_dim=32, mlp_dim=64)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), np.zeros((1, *tiny_model.IMAGE_SHAPE), np.float32)
    )
    variables = jax.device_get(variables)
    head = variables['params']['heads']['head']  # zeros, as torchvision's: no gradient at all
    head['kernel'] = np.random.default_rng(1).normal(size=head['kernel'].shape).astype(np.float32)
    return model, variables, _batches(tiny_model.IMAGE_SHAPE)


def _search(which, fsdp, num_devices, last_state, **options):
    model, variables, batches = which()
    jackpot = jackpot_jax.find_jackpot(
        model, variables, batches, num_devices=num_devices, fsdp=fsdp, **{**SETTINGS, **options}
    )
    return jackpot, last_state[-1]


def _same(found, expected):
    assert found.masks.keys() == expected.masks.keys()
    for path in expected.masks:
        np.testing.assert_array_equal(found.masks[path], expected.masks[path], err_msg=path)
        np.testing.assert_allclose(
            found.scores[path], expected.scores[path], rtol=RTOL, atol=ATOL, err_msg=path
        )
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=RTOL, atol=ATOL),
        found.statistics, expected.statistics,
    )


def _assert_split(state, fsdp):
    """Every kernel with a dimension divisible by fsdp is split over the 'fsdp' axis."""
    split = 0
    for path, score in state.scores.items():
        spec = parallel.leaf_spec(score.shape, fsdp)
        for tree in (state.scores, state.masks, state.ever_flipped):
            assert tree[path].sharding.spec == spec, path
        if spec != P():
            split += 1
            shard = score.addressable_shards[0].data.shape
            assert np.prod(shard) * fsdp == score.size, path
    flat = jackpot_jax.core.sparsity.flatten(state.frozen_params)
    for path in state.scores:
        assert flat[path].sharding.spec == state.scores[path].sharding.spec, path
    momenta = [
        leaf for leaf in jax.tree.leaves(state.opt_state) if np.ndim(leaf) and leaf.size >= 64
    ]
    assert momenta and any(m.sharding.spec != P() for m in momenta)
    assert split >= 2


def _matches_one_device(which, fsdps, last_state, devices=8, **options):
    one, _ = _search(which, 1, 1, last_state, **options)
    assert sum(r['mask_changes'] for r in one.report['epochs']) > 0  # the masks did move
    for fsdp in fsdps:
        found, state = _search(which, fsdp, devices or fsdp, last_state, **options)
        _assert_split(state, fsdp)
        _same(found, one)


def test_cnn_search_split_over_2_4_8_devices_matches_1_device(last_state):
    """data=4 x fsdp=2, data=2 x fsdp=4, fsdp=8 against one device (BatchNorm included)."""
    _matches_one_device(_cnn, (2, 4, 8), last_state)


@pytest.mark.parametrize(
    'options',
    [{'pattern': '2:4', 'sparsity': 0.5}, {'mask_update': 'edge_popup'}],
    ids=['n_m_2_4', 'edge_popup'],
)
def test_n_m_and_edge_popup_searches_split_over_4_devices_match_1_device(options, last_state):
    _matches_one_device(_cnn, (4,), last_state, **options)


def test_vit_search_split_over_2_4_8_devices_matches_1_device(last_state):
    """fsdp=2, 4, 8 with no data axis (data=1) against one device, over one epoch."""
    _matches_one_device(_vit, (2, 4, 8), last_state, devices=None, epochs=1)


class _Interrupt:
    """The batches of every epoch, with Ctrl-C instead of batch ``at`` of epoch 1."""

    def __init__(self, batches, at):
        self.batches, self.at = batches, at

    def __call__(self, epoch):
        for i, batch in enumerate(self.batches):
            if epoch == 1 and i == self.at:
                raise KeyboardInterrupt
            yield batch


def test_resume_of_an_fsdp_4_checkpoint_on_fsdp_2_and_on_1_device(tmp_path, last_state):
    model, variables, batches = _cnn()
    kwargs = dict(steps_per_epoch=STEPS, checkpoint_every=2, **SETTINGS)
    straight = jackpot_jax.find_jackpot(
        model, variables, batches, workdir=str(tmp_path / 'straight'), num_devices=8, fsdp=4,
        **kwargs,
    )
    cut = str(tmp_path / 'cut')
    with pytest.raises(loop.SearchInterrupted, match='last checkpoint is step 4'):
        jackpot_jax.find_jackpot(
            model, variables, _Interrupt(batches, at=1), workdir=cut, num_devices=8, fsdp=4,
            **kwargs,
        )
    _assert_split(last_state[-1], 4)  # the uninterrupted run's state
    shutil.copytree(cut, str(tmp_path / 'cut_one_device'))
    resumed = {
        'fsdp=2': jackpot_jax.find_jackpot(
            model, variables, batches, workdir=cut, num_devices=8, fsdp=2, **kwargs
        ),
        '1 device': jackpot_jax.find_jackpot(
            model, variables, batches, workdir=str(tmp_path / 'cut_one_device'), num_devices=1,
            **kwargs,
        ),
    }
    _assert_split(last_state[-2], 2)
    for name, found in resumed.items():
        assert [r['step'] for r in found.report['epochs']] == [3, 6], name
        assert [r['mask_changes'] for r in found.report['epochs']] == [
            r['mask_changes'] for r in straight.report['epochs']
        ], name
        _same(found, straight)


def test_sharding_rule_on_handmade_shapes():
    limit = parallel.MIN_SHARDED_SIZE  # 64 here
    assert parallel.leaf_spec((3, 3, 16, 32), 4) == P(None, None, None, 'fsdp')  # largest
    assert parallel.leaf_spec((64, 12, 8), 8) == P('fsdp')
    assert parallel.leaf_spec((6, 96), 8) == P(None, 'fsdp')
    assert parallel.leaf_spec((96, 6), 4) == P('fsdp')
    assert parallel.leaf_spec((90, 12), 8) == P()  # no dimension divides over 8 ...
    assert parallel.leaf_spec((90, 12), 4) == P(None, 'fsdp')  # ... the largest that does
    assert parallel.leaf_spec((32, 32), 4) == P('fsdp')  # a tie: the first
    assert parallel.leaf_spec((limit - 1,), 1) == P()
    assert parallel.leaf_spec((8, 7), 8) == P()  # small: replicated
    assert parallel.leaf_spec((), 8) == P()
    assert parallel.leaf_spec((64, 64), 1) == P()  # fsdp 1: replicated

    mesh = parallel.make_mesh(8, fsdp=4)
    assert mesh.shape == {'data': 2, 'fsdp': 4}
    tree = {
        'kernel': np.zeros((3, 3, 8, 16), np.float32),
        'bias': np.zeros((16,), np.float32),
        'odd': np.zeros((7, 9, 5), np.float32),
        'step': np.int32(3),
    }
    placed = parallel.shard_state(tree, mesh)
    assert placed['kernel'].sharding.spec == P(None, None, None, 'fsdp')
    assert placed['kernel'].addressable_shards[0].data.shape == (3, 3, 8, 4)
    assert len(placed['kernel'].sharding.device_set) == 8  # replicated over 'data'
    for name in ('bias', 'odd', 'step'):
        assert placed[name].sharding.is_fully_replicated, name
    np.testing.assert_array_equal(np.asarray(placed['kernel']), tree['kernel'])
    abstract = jax.ShapeDtypeStruct((3, 3, 8, 16), np.float32)
    assert parallel.state_sharding(abstract, mesh).spec == P(None, None, None, 'fsdp')
    # the state's bytes per device: the split kernel's quarter, the other leaves whole
    assert parallel.bytes_per_device(placed) == 4 * (3 * 3 * 8 * 4 + 16 + 7 * 9 * 5 + 1)
    # a data-only mesh (e.g. one given to find_jackpot) keeps the state replicated
    data_only = jax.make_mesh((8,), ('data',), devices=jax.devices()[:8])
    assert parallel.state_sharding(abstract, data_only).spec == P()
    assert parallel.batch_sharding(data_only).spec == P(('data',))
    # the batch is split over every device of both axes
    assert parallel.batch_sharding(mesh).spec == P(('data', 'fsdp'))
    (images,) = parallel.shard_batch(mesh, np.zeros((16, 2), np.float32))
    assert {s.data.shape for s in images.addressable_shards} == {(2, 2)}


def test_step_memory_is_reported_per_device():
    mesh = parallel.make_mesh(8, fsdp=8)
    state = parallel.shard_state({'w': np.ones((64, 256), np.float32)}, mesh)
    step = jax.jit(
        lambda t: jax.tree.map(lambda x: 2 * x, t), donate_argnums=0,
        out_shardings=parallel.state_sharding(state, mesh),
    )
    sizes = parallel.step_memory(step, state, state=state)
    assert sizes['state'] == 64 * 256 * 4 // 8
    assert sizes['argument'] == sizes['state']  # one device's shard, not the whole array
    assert sizes['peak'] >= sizes['argument']
    assert 'state 0.0 MiB' in parallel.format_memory(sizes)


def test_bad_fsdp_values_are_named(tmp_path):
    with pytest.raises(ValueError, match=r'fsdp=3 does not divide the 8 devices .* 1, 2, 4, 8'):
        parallel.make_mesh(8, fsdp=3)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=rf'fsdp={bad!r} must be an integer >= 1'):
            parallel.make_mesh(8, fsdp=bad)
    model, variables, batches = _cnn()
    with pytest.raises(ValueError, match='fsdp=16 does not divide the 8 devices'):
        jackpot_jax.find_jackpot(model, variables, batches, num_devices=8, fsdp=16, **SETTINGS)
    with pytest.raises(ValueError, match=r'batch size 12 does not divide over 8 devices '
                       r'\(data=2 x fsdp=4\); use a multiple of 8'):
        jackpot_jax.find_jackpot(
            model, variables, [(x[:12], y[:12]) for x, y in batches], num_devices=8, fsdp=4,
            **SETTINGS,
        )
    config = config_lib.get_config()
    config.num_devices = 8
    config.fsdp = 3
    with pytest.raises(ValueError, match=r'fsdp=3 does not divide num_devices=8; choose fsdp '
                       r'among 1, 2, 4, 8'):
        modes.validate(config)
    for bad in (0, -1):
        config = config_lib.get_config()
        config.fsdp = bad
        with pytest.raises(ValueError, match=rf'fsdp={bad!r} must be an integer >= 1.*--config'):
            modes.validate(config)
    config = config_lib.get_config()
    config.fsdp = 5  # num_devices 0: all 8, which 5 does not divide
    modes.validate(config)
    with pytest.raises(ValueError, match='fsdp=5 does not divide the 8 devices'):
        rc.Setup(resolved(config))
    assert config_lib.is_resumable('fsdp')


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('weights') / 'tiny')
    tiny_model.save_weights(path, width=4)
    return path


def test_launcher_search_with_fsdp_matches_1_device(weights, tmp_path):
    def config(num_devices, fsdp):
        c = config_lib.get_config()
        c.protocol = 'paper'
        c.model.width = 4
        c.pretrained = weights
        c.num_devices, c.fsdp = num_devices, fsdp
        c.steps_per_epoch = STEPS
        c.search.epochs = 1
        c.search.batch_size = BATCH
        c.search.sparsity = 0.8
        c.search.learning_rate = 0.5
        c.data.eval_batch_size = 360
        return c

    assert rc.Setup(resolved(config(8, 4))).mesh.shape == {'data': 2, 'fsdp': 4}
    found = {
        n: search_mode.run_search(resolved(config(n, f)), str(tmp_path / f'fsdp{f}'))
        for n, f in ((1, 1), (8, 4))
    }
    one, split = found[1]['state'], found[8]['state']
    _assert_split(split, 4)
    jax.tree.map(np.testing.assert_array_equal, parallel.to_host(split.masks),
                 parallel.to_host(one.masks))
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=RTOL, atol=ATOL),
        parallel.to_host(split.scores), parallel.to_host(one.scores),
    )
    assert found[8]['jackpot_top1'] == found[1]['jackpot_top1']
    assert os.path.isdir(tmp_path / 'fsdp4' / 'jackpot')


def test_memory_benchmark_reports_fsdp_1_2_4_8(capsys):
    from benchmarks import search_step  # pylint: disable=g-import-not-at-top

    result = search_step.main(['--models=small_cnn:16', '--memory', '--no-compare'])
    table = result['memory']['small_cnn:16']
    assert [row['fsdp'] for row in table['rows']] == [1, 2, 4, 8]
    assert table['devices'] == 8 and table['min_sharded_size'] == 64
    full = table['rows'][0]['state_bytes']
    for row in table['rows']:
        assert full / row['fsdp'] <= row['state_bytes'] <= 1.2 * full / row['fsdp']
        assert row['argument_bytes'] >= row['state_bytes'] and row['temp_bytes'] > 0
    assert 'vs 1/fsdp' in capsys.readouterr().err  # the table goes to stderr
