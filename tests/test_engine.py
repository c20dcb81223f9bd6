"""The one search engine: the library and the launcher run the same loop, and the library
gets the launcher's checkpoints, resume, devices and any loss."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_model  # tests/tiny_model.py

import jackpot_jax
from jackpot_jax.core import sparsity
from jackpot_jax.engine import loop, metrics
from jackpot_jax.io import checkpoint
from jackpot_jax.launch import (
    config as config_lib,
    config_checks,
    modes,
    run_context as rc,
    search_mode,
    weight_training,
)
from jackpot_jax.launch.config_checks import resolved

REPO = pathlib.Path(__file__).resolve().parent.parent
CLASSES = 4


class Mlp(nn.Module):
    """A classifier whose output layer has a name the name rule does not know."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(32, name='hidden')(x.reshape(len(x), -1)))
        return nn.Dense(CLASSES, name='head')(x)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = (x[:, :CLASSES].argmax(-1)).astype(np.int32)
    return x, y


def _batches(n=64, size=16, seed=0):
    x, y = _data(n, seed)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def _variables(model=None):
    model = model or Mlp()
    return model, model.init(jax.random.key(0), jnp.zeros((1, 8)))


SETTINGS = {'sparsity': 0.75, 'epochs': 2, 'progress': False}


def test_the_package_has_one_search_loop():
    """Only the engine builds and runs the search step."""
    callers = []
    for path in (REPO / 'jackpot_jax').rglob('*.py'):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, 'attr', None) == 'make_search_step'
            ):
                callers.append(path.name)
    assert callers == ['loop.py']


def test_the_progress_bar_counts_images_or_tokens(capsys):
    bar = metrics.progress_bar(4, 'search')
    metrics.count_examples(bar, np.zeros((2, 255), np.int32))  # a language model's ids
    assert (bar.unit, bar.unit_scale) == ('tok', 510)
    metrics.count_examples(bar, np.zeros((8, 32, 32, 3), np.float32))
    assert (bar.unit, bar.unit_scale) == ('img', 8)
    metrics.count_examples(bar, (np.zeros((8, 4)), np.zeros((8, 4))))  # several: unchanged
    assert (bar.unit, bar.unit_scale) == ('img', 8)
    jackpot_jax.find_jackpot(*_variables(), _batches(n=32), sparsity=0.5, epochs=1)
    assert 'ex/s' in capsys.readouterr().err  # the search's own bar, from its first batch


def test_a_classifier_named_head_stays_dense_by_default():
    model, variables = _variables()
    jackpot = jackpot_jax.find_jackpot(model, variables, _batches(), **SETTINGS)
    assert set(jackpot.masks) == {'hidden/kernel'}
    assert 'head/kernel' in jackpot.summary()  # the summary says which layer and why
    pruned = jackpot_jax.find_jackpot(
        model, variables, _batches(), dense_output_layer=False, **SETTINGS
    )
    assert set(pruned.masks) == {'hidden/kernel', 'head/kernel'}


def test_unknown_options_are_named_with_a_suggestion():
    model, variables = _variables()
    with pytest.raises(TypeError, match="'sparsty' .*did you mean 'sparsity'"):
        jackpot_jax.find_jackpot(model, variables, _batches(), sparsty=0.5)


def test_save_and_load_round_trip_refused_on_other_weights(tmp_path):
    model, variables = _variables()
    jackpot = jackpot_jax.find_jackpot(model, variables, _batches(), **SETTINGS)
    path = str(tmp_path / 'jackpot')
    jackpot.save(path)
    with pytest.raises(FileExistsError, match='overwrite=True'):
        jackpot.save(path)
    loaded = jackpot_jax.load_jackpot(path, model, variables)
    for p in jackpot.masks:
        np.testing.assert_array_equal(loaded.masks[p], jackpot.masks[p])
        np.testing.assert_array_equal(loaded.scores[p], jackpot.scores[p])
    assert loaded.evaluate(_batches(seed=1)) == jackpot.evaluate(_batches(seed=1))
    _, other = _variables()
    other = jax.tree.map(lambda w: w + 1.0, other)
    with pytest.raises(ValueError, match='found in other weights'):
        jackpot_jax.load_jackpot(path, model, other)


class Regressor(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(32, name='hidden')(x))
        return nn.Dense(1, name='out')(x)[:, 0]


def test_a_custom_loss_chooses_its_epoch_by_a_lower_is_better_metric():
    x, _ = _data(64)
    target = x[:, 0] * 2.0 - x[:, 1]
    batches = [{'inputs': x[i : i + 16], 'target': target[i : i + 16]} for i in range(0, 64, 16)]
    validation = [{'inputs': x[:16], 'target': target[:16]}]

    def loss_fn(prediction, batch):
        error = prediction - batch['target']
        return jnp.mean(error**2), {'mae': jnp.mean(jnp.abs(error))}

    model = Regressor()
    variables = model.init(jax.random.key(0), x[:1])
    jackpot = jackpot_jax.find_jackpot(
        model,
        variables,
        batches,
        validation_batches=validation,
        loss_fn=loss_fn,
        selection_metric='loss',
        selection_rule='best',
        sparsity=0.5,
        epochs=3,
        progress=False,
        learning_rate=0.5,
    )
    losses = [r['validation_loss'] for r in jackpot.report['epochs']]
    best = len(losses) - int(np.argmin(losses[::-1]))  # the latest of the lowest
    assert jackpot.report['chosen_epoch'] == best
    assert 'validation_mae' in jackpot.report['epochs'][0]
    assert jackpot.evaluate(validation, metric='loss') == pytest.approx(losses[best - 1])


def test_eight_devices_find_what_one_device_finds():
    model, variables = _variables()
    batches = _batches(n=64, size=16)
    one = jackpot_jax.find_jackpot(model, variables, batches, **SETTINGS)
    eight = jackpot_jax.find_jackpot(model, variables, batches, num_devices=8, **SETTINGS)
    for p in one.masks:
        np.testing.assert_array_equal(eight.masks[p], one.masks[p])
        np.testing.assert_allclose(eight.scores[p], one.scores[p], atol=1e-5)


def test_the_library_and_the_launcher_give_identical_searches(tmp_path):
    """Same weights, batches and settings: the same masks, scores and epoch records."""
    config = config_lib.get_config()
    config.pretrain.epochs = 1
    config.search.epochs = 2
    config.steps_per_epoch = 4
    config.model.width = 8
    config.num_devices = 1
    workdir = str(tmp_path / 'run')
    weight_training.run_pretrain(resolved(config), workdir)
    found = search_mode.run_search(resolved(config), workdir)

    config = resolved(config)
    setup = rc.Setup(config)
    params, statistics, _ = setup.load_pretrained(workdir)
    size = config.search.batch_size
    steps = setup.steps_per_epoch(size)
    jackpot = jackpot_jax.find_jackpot(
        setup.model,
        {'params': jax.device_get(params), 'batch_stats': jax.device_get(statistics)},
        lambda epoch: setup.source.train_epoch(size, config.seed, epoch, 0),
        steps_per_epoch=steps,
        validation_batches=list(
            setup.source.eval_batches(config.data.eval_batch_size, 'validation')
        ),
        settings=config_checks.search_settings(config),
        progress=False,
    )
    kept = found['jackpot_epoch']
    assert jackpot.report['chosen_epoch'] == kept
    _, saved_masks, saved_statistics, _ = checkpoint.read_jackpot_bundle(os.path.join(workdir, 'jackpot'))
    assert set(saved_masks) == set(jackpot.masks)
    for p, m in jackpot.masks.items():
        np.testing.assert_array_equal(m, saved_masks[p])
    jax.tree.map(np.testing.assert_array_equal, jackpot.statistics['batch_stats'], saved_statistics)
    if kept == len(found['history']):  # the launcher returns the last state's scores
        for p in jackpot.scores:
            np.testing.assert_array_equal(jackpot.scores[p], np.asarray(found['state'].scores[p]))
    for launcher, library in zip(found['history'], jackpot.report['epochs']):
        shared = set(launcher) & set(library) - {'validation_examples'}
        assert {'train_loss', 'train_top1', 'mask_changes', 'validation_top1'} <= shared
        assert {k: launcher[k] for k in shared} == {k: library[k] for k in shared}


_RESUMABLE_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    import jackpot_jax

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(32)(x)))
            return nn.Dense(4, name='head')(x)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype(np.float32)
    y = x[:, :4].argmax(-1).astype(np.int32)
    kill_at = os.environ.get('KILL_AT')

    def batches(epoch):
        for i in range(6):
            if kill_at == f'{epoch}:{i}':
                os.kill(os.getpid(), signal.SIGKILL)
            yield x[16 * i: 16 * i + 16], y[16 * i: 16 * i + 16]

    model = Mlp()
    variables = model.init(jax.random.key(0), x[:2])
    jackpot = jackpot_jax.find_jackpot(
        model, variables, batches, steps_per_epoch=6, validation_batches=[(x[:32], y[:32])],
        sparsity=0.8, epochs=3, workdir=sys.argv[1], checkpoint_every=2, progress=False,
        reestimation_steps=3,
    )
    np.savez(sys.argv[2], **{'m_' + k: v for k, v in jackpot.masks.items()},
             **{'s_' + k: np.asarray(v) for k, v in jackpot.scores.items()},
             kept=jackpot.report['chosen_epoch'],
             losses=[r['train_loss'] for r in jackpot.report['epochs']])
    """)


def _run(script, workdir, out, kill_at=None):
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    env.pop('KILL_AT', None)
    if kill_at:
        env['KILL_AT'] = kill_at
    return subprocess.run(
        [sys.executable, str(script), str(workdir), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_killed_library_search_resumes_to_the_uninterrupted_result(tmp_path):
    script = tmp_path / 'search.py'
    script.write_text(_RESUMABLE_SCRIPT)
    whole = _run(script, tmp_path / 'whole', tmp_path / 'whole.npz')
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _run(script, tmp_path / 'killed', tmp_path / 'killed.npz', kill_at='1:5')
    assert killed.returncode == -9  # SIGKILL, mid-epoch 2
    assert os.listdir(tmp_path / 'killed' / 'checkpoints')
    resumed = _run(script, tmp_path / 'killed', tmp_path / 'killed.npz')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = np.load(tmp_path / 'whole.npz'), np.load(tmp_path / 'killed.npz')
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # The jackpot was saved in the workdir, and loads over the same weights.
    assert os.path.isdir(tmp_path / 'killed' / 'jackpot')


def test_resume_refuses_other_settings_naming_them(tmp_path):
    model, variables = _variables()
    workdir = str(tmp_path / 'w')
    jackpot_jax.find_jackpot(model, variables, _batches(), workdir=workdir, **SETTINGS)
    with pytest.raises(ValueError, match=r'sparsity: checkpoint 0\.75, now 0\.5'):
        jackpot_jax.find_jackpot(
            model, variables, _batches(), workdir=workdir, **{**SETTINGS, 'sparsity': 0.5}
        )
    other = jax.tree.map(lambda w: w * 2.0, variables)
    with pytest.raises(ValueError, match='other weights'):
        jackpot_jax.find_jackpot(model, other, _batches(), workdir=workdir, **SETTINGS)


def test_an_interrupt_before_the_first_checkpoint_says_the_search_starts_over(
    tmp_path, monkeypatch
):
    def interrupt(*_):
        raise KeyboardInterrupt

    tiny_model.fault_at_step(monkeypatch, 1, interrupt)
    model, variables = _variables()
    with pytest.raises(loop.SearchInterrupted, match=(
        'interrupted at step 0: no checkpoint was written yet in .*checkpoints; running the '
        'same search again starts it over'
    )):  # fmt: skip
        jackpot_jax.find_jackpot(model, variables, _batches(), workdir=str(tmp_path), **SETTINGS)


def test_the_score_optimizer_is_a_setting():
    model, variables = _variables()
    sgd = jackpot_jax.find_jackpot(model, variables, _batches(), **SETTINGS)
    adam = jackpot_jax.find_jackpot(
        model, variables, _batches(), optimizer='adam', learning_rate=0.01, **SETTINGS
    )
    assert any(not np.array_equal(sgd.scores[p], adam.scores[p]) for p in sgd.scores)
    with pytest.raises(ValueError, match="unknown optimizer 'adagrad'"):
        jackpot_jax.find_jackpot(model, variables, _batches(), optimizer='adagrad', **SETTINGS)


def test_a_search_can_start_from_other_masks_at_the_plans_counts():
    model, variables = _variables()
    start = jackpot_jax.find_jackpot(model, variables, _batches(), **{**SETTINGS, 'epochs': 1})
    kernel = variables['params']['hidden']['kernel']
    flipped = {'hidden/kernel': np.asarray(~start.masks['hidden/kernel'])}  # 75 % kept: wrong
    with pytest.raises(ValueError, match="initial_masks\\['hidden/kernel'\\] .* prunes 64 weights"):
        jackpot_jax.find_jackpot(model, variables, _batches(), initial_masks=flipped, **SETTINGS)
    rng = np.random.default_rng(0)
    keep = np.zeros(kernel.size, bool)
    keep[rng.choice(kernel.size, kernel.size // 4, replace=False)] = True
    random_start = {'hidden/kernel': keep.reshape(kernel.shape)}
    jackpot = jackpot_jax.find_jackpot(
        model,
        variables,
        _batches(),
        initial_masks=random_start,
        mask_freeze_fraction=0.0,
        **{**SETTINGS, 'epochs': 1},
    )
    assert int(jackpot.masks['hidden/kernel'].sum()) == kernel.size // 4
    assert (jackpot.masks['hidden/kernel'] != start.masks['hidden/kernel']).any()


def test_ranked_scores_keep_the_masks_and_order_each_group_by_the_criterion():
    masks = {'w': np.array([[True, False, True], [False, True, False]])}
    criterion = {'w': np.array([[5.0, 9.0, 1.0], [0.5, 3.0, 2.0]])}
    scores = np.asarray(sparsity.ranked_scores(masks, criterion, 0.9, spread=0.03)['w'])
    # kept 5, 1, 3 -> ranks 2, 0, 1 of 3; pruned 9, 0.5, 2 -> ranks 2, 0, 1 of 3
    golden = np.array([[1.02, 0.89, 1.0], [0.87, 1.01, 0.88]], np.float32)
    np.testing.assert_allclose(scores, golden, atol=1e-6)
    picked = sparsity.masks_from_scores({'w': scores}, {'w': 3})
    np.testing.assert_array_equal(picked['w'], masks['w'])
    with pytest.raises(ValueError, match='spread=0'):
        sparsity.ranked_scores(masks, criterion, spread=0)


def test_scaled_scores_divide_each_column_by_its_boundary():
    masks = {'w': np.array([[True, False], [False, True], [True, True]])}
    criterion = {'w': np.array([[4.0, 1.0], [2.0, 5.0], [6.0, 3.0]])}
    scores = np.asarray(sparsity.scaled_scores(masks, criterion)['w'])
    # column 0: kept 4, 6, pruned 2 -> boundary 3; column 1: kept 5, 3, pruned 1 -> 2
    np.testing.assert_allclose(scores, [[4 / 3, 0.5], [2 / 3, 2.5], [2.0, 1.5]], rtol=1e-6)
    picked = sparsity.masks_from_scores({'w': scores}, {'w': 2})
    np.testing.assert_array_equal(picked['w'], masks['w'])
    with pytest.raises(ValueError, match="criterion of 'w' has no positive boundary"):
        sparsity.scaled_scores(masks, {'w': -criterion['w']})


def test_a_search_can_start_from_given_scores():
    model, variables = _variables()
    kernel = np.asarray(variables['params']['hidden']['kernel'])
    keep = np.abs(kernel) >= np.quantile(np.abs(kernel), 0.75)  # the 25 % largest
    masks = {'hidden/kernel': keep}
    ranked = sparsity.ranked_scores(masks, {'hidden/kernel': np.abs(kernel)})
    one_epoch = {**SETTINGS, 'epochs': 1}
    plain = jackpot_jax.find_jackpot(model, variables, _batches(), initial_masks=masks, **one_epoch)
    jackpot = jackpot_jax.find_jackpot(
        model, variables, _batches(), initial_masks=masks, initial_scores=ranked, **one_epoch
    )
    assert int(jackpot.masks['hidden/kernel'].sum()) == kernel.size // 4
    assert not np.array_equal(plain.scores['hidden/kernel'], jackpot.scores['hidden/kernel'])
    alone = jackpot_jax.find_jackpot(
        model, variables, _batches(), initial_scores=ranked, **one_epoch
    )
    np.testing.assert_array_equal(alone.scores['hidden/kernel'], jackpot.scores['hidden/kernel'])
    inverted = {'hidden/kernel': -np.asarray(ranked['hidden/kernel'])}
    moved = "initial_scores pick other masks than initial_masks in \\['hidden/kernel'\\]"
    with pytest.raises(ValueError, match=moved):
        jackpot_jax.find_jackpot(
            model, variables, _batches(), initial_masks=masks, initial_scores=inverted, **one_epoch
        )
    with pytest.raises(ValueError, match="initial_scores\\['hidden/kernel'\\] has shape \\(3,\\)"):
        jackpot_jax.find_jackpot(
            model, variables, _batches(), initial_scores={'hidden/kernel': np.ones(3)}, **one_epoch
        )


def test_a_resumed_search_still_has_the_epoch_its_rule_keeps(tmp_path):
    """An epoch the rule may still keep survives a restart and the saves after it (the
    checkpoints kept are worked out from the epoch records, not the process's memory)."""
    import interruptible_search as ls  # tests/interruptible_search.py

    def run(batches, workdir):
        model, variables = ls.model_and_variables()
        return jackpot_jax.find_jackpot(
            model, variables, batches, steps_per_epoch=ls.STEPS, workdir=workdir,
            validation_batches=ls.validation_batches(), sparsity=0.8, epochs=2,
            checkpoint_every=2, progress=False, selection_metric='loss', selection_rule='best',
        )  # fmt: skip

    whole = run(ls.batches(), str(tmp_path / 'whole'))
    losses = [r['validation_loss'] for r in whole.report['epochs']]
    assert whole.report['chosen_epoch'] == 1, losses  # older than the latest 3 checkpoints
    with pytest.raises(ls.Interrupted):  # mid-epoch 2, after the save at step 8
        run(ls.batches(interrupt=True), str(tmp_path / 'resumed'))
    resumed = run(ls.batches(), str(tmp_path / 'resumed'))
    assert resumed.report['chosen_epoch'] == 1
    for path, mask in whole.masks.items():
        np.testing.assert_array_equal(resumed.masks[path], mask)


# ----------------------------------------------------------------------------
# Every selection metric the docs offer, in both entry points.
# ----------------------------------------------------------------------------
METRIC_DOCS = ('launcher.md', 'library.md', 'selection.md')


def _offered_selection_metrics() -> list[str]:
    """The metric names each doc gives on its lines about ``selection_metric``."""
    offered = set()
    for name in METRIC_DOCS:
        lines = [
            line
            for line in (REPO / 'docs' / name).read_text().splitlines()
            if 'selection_metric' in line
        ]
        found = {m for line in lines for m in re.findall(r"`'?([a-z][a-z0-9_]*)'?`", line)}
        found -= {'selection_metric'}
        assert found, f'docs/{name} names no selection metric on its selection_metric lines'
        offered |= found
    return sorted(offered)


def _chosen_by(history, metric: str) -> int:
    """The epoch rule 'best' keeps on validation ``metric``: the latest of the best."""
    values = [r[f'validation_{metric}'] for r in history]
    lower = metric in ('loss', 'perplexity')
    best = min(values) if lower else max(values)
    return max(r['epoch'] for r, v in zip(history, values) if v == best)


@pytest.mark.parametrize('metric', _offered_selection_metrics())
def test_every_documented_selection_metric_chooses_the_epoch_in_the_library(metric):
    model, variables = _variables()
    jackpot = jackpot_jax.find_jackpot(
        model,
        variables,
        _batches(),
        validation_batches=_batches(n=32, seed=1),
        selection_metric=metric,
        selection_rule='best',
        **{**SETTINGS, 'epochs': 3},
    )
    history = jackpot.report['epochs']
    assert jackpot.report['chosen_epoch'] == _chosen_by(history, metric)


@pytest.fixture(scope='module')
def digits_weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('weights') / 'pretrained')
    tiny_model.save_weights(path, width=8)
    return path


@pytest.mark.parametrize('metric', _offered_selection_metrics())
def test_every_documented_selection_metric_chooses_the_epoch_in_the_launcher(
    metric, digits_weights, tmp_path
):
    """The launcher's digits search with ``--config.search.selection_metric``, which once
    ended in ``KeyError: 'validation_loss'`` after its first epoch."""
    config = tiny_model.tiny_config(
        mode='search',
        pretrained=digits_weights,
        steps_per_epoch=3,
        **{
            'search.epochs': 3,
            'search.batch_size': 16,
            'search.reestimation_steps': 2,
            'search.selection_rule': 'best',
            'search.selection_metric': metric,
        },
    )
    found = modes.MODES['search'](modes.validate(config), str(tmp_path))
    assert found['jackpot_epoch'] == _chosen_by(found['history'], metric)


# ----------------------------------------------------------------------------
# The launcher's mask baselines prune what its search prunes.
# ----------------------------------------------------------------------------
def test_the_mask_baselines_leave_a_classifier_named_head_dense_as_the_search_does(
    tmp_path, monkeypatch
):
    """The output layer, found by tracing the model whatever it is called, stays dense in
    the search and in the magnitude and random masks it is compared with: the same
    counts of the same kernels."""
    config = tiny_model.tiny_config(
        mode='search',
        steps_per_epoch=2,
        **{'search.epochs': 1, 'search.batch_size': 16, 'search.reestimation_steps': 2},
    )
    config.model = {'name': 'user_model:TinyNet', 'dtype': 'float32', 'head': 'head'}
    config = modes.validate(config)
    setup = rc.Setup(config)
    variables = jax.device_get(weight_training.initial_variables(setup, config.seed))
    weights = str(tmp_path / 'pretrained')
    meta = {'model': config.model.to_dict(), 'num_classes': setup.source.num_classes}
    checkpoint.save_weights(weights, variables['params'], {}, meta)
    config.pretrained = weights
    found = search_mode.run_search(config, str(tmp_path / 'run'))
    assert set(found['counts']) == {'conv/kernel', 'conv2/kernel'}  # 'head' left dense

    evaluated = []
    split_metrics = rc.Setup.split_metrics

    def recording(self, params, statistics, split='test'):
        evaluated.append(sparsity.flatten(jax.device_get(params)))
        return split_metrics(self, params, statistics, split)

    monkeypatch.setattr(rc.Setup, 'split_metrics', recording)
    params, statistics, _ = setup.load_weights(weights)
    baselines = search_mode.mask_baselines(config, setup, params, statistics)
    assert set(baselines) == {'magnitude_top1', 'random_top1'} and len(evaluated) == 2
    dense = sparsity.flatten(variables['params'])
    for masked in evaluated:
        pruned = {
            p: int(np.sum((masked[p] == 0) & (dense[p] != 0)))
            for p in masked
            if p.endswith('kernel') and int(np.sum((masked[p] == 0) & (dense[p] != 0)))
        }
        assert pruned == found['counts']
        np.testing.assert_array_equal(masked['head/kernel'], dense['head/kernel'])
