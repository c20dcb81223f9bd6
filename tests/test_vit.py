"""The Vision Transformer: torchvision's names and sizes, what is prunable, and the search on it.

A ViT has no BatchNorm, so these tests also pin that a model without batch statistics
runs through the search and the launcher (pretrain, search, evaluate, export).
"""

import functools
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tiny_model import config_plan  # tests/tiny_model.py

from jackpot_jax.core import sparsity, step as step_lib
from jackpot_jax.io import checkpoint, workdir as workdir_lib
from jackpot_jax.launch import (
    config as config_lib,
    modes,
    run_context as rc,
    search_mode,
    weight_training,
)
from jackpot_jax.launch.config_checks import resolved
from jackpot_jax.models import zoo

KEY = jax.random.key(0)
TINY = dict(patch_size=4, hidden_dim=16, num_layers=1, num_heads=2, mlp_dim=32)
PRUNABLE = re.compile(
    r'^encoder/layers/encoder_layer_\d+/'
    r'(self_attention/(query|key|value|out_proj)|mlp_[03])/kernel$'
)


def _abstract_params(name, image_size=224, **kwargs):
    model = zoo.get_model(name, 1000, **kwargs)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)


@pytest.mark.parametrize(
    'name, total, layers, width',
    [
        ('vit_b_16', 86_567_656, 12, 768),
        ('vit_b_32', 88_224_232, 12, 768),
        ('vit_l_16', 304_326_632, 24, 1024),
    ],
)
def test_torchvision_sizes_and_names(name, total, layers, width):
    """torchvision's parameter totals; paths read like its state-dict keys."""
    variables = _abstract_params(name)
    assert set(variables) == {'params'}  # no BatchNorm, no batch_stats
    params = sparsity.flatten(variables['params'])
    assert sum(math.prod(v.shape) for v in params.values()) == total
    patch = zoo.vit.CONFIGS[name]['patch_size']
    last = f'encoder/layers/encoder_layer_{layers - 1}'
    assert params['conv_proj/kernel'].shape == (patch, patch, 3, width)
    assert params['class_token'].shape == (1, 1, width)
    assert params['encoder/pos_embedding'].shape == (1, (224 // patch) ** 2 + 1, width)
    assert params[f'{last}/self_attention/query/kernel'].shape == (width, width)
    assert params[f'{last}/self_attention/out_proj/kernel'].shape == (width, width)
    assert params[f'{last}/mlp_0/kernel'].shape == (width, 4 * width)
    assert params[f'{last}/ln_2/scale'].shape == (width,)
    assert params['encoder/ln/bias'].shape == (width,)
    assert params['heads/head/kernel'].shape == (width, 1000)
    # Prunable by default: exactly the attention and MLP kernels, six per block.
    paths = sparsity.prunable_paths(variables['params'])
    assert len(paths) == 6 * layers and all(PRUNABLE.match(p) for p in paths)


def _tiny_vit(**overrides):
    """A tiny ViT on 8x8x1 inputs, weights drawn in numpy (no XLA compile for the init)."""
    model = zoo.get_model('vit_tiny', 10, **{**TINY, **overrides})
    x = np.random.RandomState(0).randn(16, 8, 8, 1).astype(np.float32)
    shapes = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)['params']
    rng = np.random.RandomState(1)

    def draw(path, leaf):
        scale = 1.0 if jax.tree_util.keystr(path[-1:], simple=True) == 'scale' else 0.0
        return (scale + 0.3 * rng.randn(*leaf.shape)).astype(np.float32)

    return model, {'params': jax.tree_util.tree_map_with_path(draw, shapes)}, x


def test_dropout_acts_only_in_training_with_an_rng():
    model, variables, x = _tiny_vit(dropout_rate=0.5, attention_dropout_rate=0.5)

    @jax.jit
    def forward(rng):
        plain = model.apply(variables, x, train=False)
        return plain, model.apply(variables, x, train=True, rngs={'dropout': rng})

    plain, dropped = forward(jax.random.key(1))
    assert plain.shape == (16, 10) and plain.dtype == jnp.float32
    assert not np.allclose(plain, dropped)
    # Without a 'dropout' rng, training mode is deterministic (the launcher passes none).
    without_rng = jax.jit(functools.partial(model.apply, train=True))(variables, x)
    np.testing.assert_allclose(without_rng, plain, rtol=1e-4, atol=1e-4)


def test_patches_that_do_not_fit_raise_a_clear_error():
    model = zoo.get_model('vit_tiny', 10, patch_size=3)
    with pytest.raises(ValueError, match=r'multiples of patch_size=3'):
        model.init(KEY, jnp.zeros((1, 8, 8, 1)), train=False)


def _search_config(**search):
    config = config_lib.get_config()
    config.search.update(search)
    return config


def test_allocations_on_a_vit():
    """Counts over the attention and MLP kernels: one exact budget (uniform: per layer)."""
    params = _tiny_vit()[1]['params']
    kernels = config_plan(config_lib.get_config(), params).kernels(params)
    assert set(kernels) == set(sparsity.prunable_paths(params))
    sizes = {p: int(np.size(w)) for p, w in kernels.items()}
    total = sum(sizes.values())
    for allocation in sparsity.ALLOCATIONS:
        counts = sparsity.pruned_counts(kernels, 0.9, allocation)
        assert set(counts) == set(kernels)
        assert all(0 <= counts[p] < sizes[p] for p in counts), allocation
        if allocation == 'uniform':
            assert all(counts[p] == int(0.9 * n) for p, n in sizes.items())
        else:
            assert total - sum(counts.values()) == sparsity.kept_total(total, 0.9), allocation


@pytest.mark.parametrize(
    'settings',
    [{'allocation': 'erk'}, {'pattern': '2:4', 'sparsity': 0.5}],
    ids=['erk', '2:4'],
)
def test_search_steps_on_a_vit_keep_counts_and_frozen_weights(settings):
    """A few search steps (unstructured, and N:M): exact counts, the pattern kept, only
    the scores learn, and the empty batch statistics stay empty. (The launcher test
    below runs the default global_magnitude allocation.)"""
    config = _search_config(**settings)
    model, variables, x = _tiny_vit()
    params = variables['params']
    frozen = jax.device_get(sparsity.flatten(params))  # the step donates its state
    plan = config_plan(config, params)
    counts = plan.counts
    masks, scores = plan.initial_masks_and_scores(params, config.search.score_init)
    optimizer = step_lib.sgd_optimizer(5.0, 0.0, 0.9, 1, 3)
    state = step_lib.init_search_state(params, {}, masks, scores, optimizer)
    step = step_lib.make_search_step(
        model=model,
        optimizer=optimizer,
        counts=counts,
        steps_per_epoch=3,
        epochs=1,
        pattern=plan.pattern,
    )
    labels = jnp.arange(16) % 10
    changes = 0
    for _ in range(3):
        state, metrics = step(state, x, labels)
        changes += int(metrics['mask_changes'])
    assert changes > 0  # the search moved the masks
    assert state.statistics == {}
    for path, mask in state.masks.items():
        assert int(np.size(mask) - np.count_nonzero(mask)) == counts[path], path
    if 'pattern' in settings:
        assert plan.report(params, state.masks)['group_violations'] == 0
    for path, leaf in sparsity.flatten(state.frozen_params).items():
        np.testing.assert_array_equal(leaf, frozen[path])


def test_launcher_pretrains_searches_evaluates_and_exports_a_vit(tmp_path, capsys):
    """The whole launcher on a model without BatchNorm: weights and jackpot saved with
    no batch statistics, evaluation reproduces the search's accuracy, export loads."""
    config = config_lib.get_config()
    config.model = ml_collections.ConfigDict({'name': 'vit_tiny', **TINY})
    config.steps_per_epoch = 2
    config.pretrain.epochs = 1
    config.search.epochs = 1
    modes.validate(config)
    workdir = str(tmp_path)
    weight_training.run_pretrain(resolved(config), workdir)
    params, stats, _ = checkpoint.load_weights(os.path.join(workdir, workdir_lib.PRETRAINED_DIR))
    assert stats == {}
    found = search_mode.run_search(resolved(config), workdir)
    _, masks, jackpot_stats, _ = checkpoint.read_jackpot_bundle(os.path.join(workdir, workdir_lib.JACKPOT_DIR))
    assert jackpot_stats == {}
    assert set(masks) == set(sparsity.prunable_paths(params))
    evaluated = modes.run_evaluate(resolved(config), workdir)
    assert evaluated['top1'] == pytest.approx(found['jackpot_top1'])
    exported = modes.run_export(resolved(config), workdir)['masked_weights']
    config.pretrained, config.jackpot, config.mode = exported, 'none', 'evaluate'
    assert modes.run_evaluate(resolved(config), workdir)['top1'] == pytest.approx(found['jackpot_top1'])
    # A second search run resumes from the checkpoint of the first (no batch stats in it).
    config.pretrained, config.jackpot, config.mode = '', '', 'search'
    assert search_mode.run_search(resolved(config), workdir)['jackpot_top1'] == found['jackpot_top1']
