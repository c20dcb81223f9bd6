"""Tests for jackpot_jax.models.zoo: exact parameter counts, names, shapes and the option-A shortcut."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jackpot_jax.models.zoo import CLASSIFIER_NAMES, MODELS, get_model, option_a_shortcut

KEY = jax.random.PRNGKey(0)


def _abstract_variables(name, num_classes, input_shape, **kwargs):
    """Variable shapes via jax.eval_shape (no real init; fast even for big models)."""
    model = get_model(name, num_classes, **kwargs)
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    return jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)


def _flat_params(variables):
    return {'/'.join(k): v for k, v in traverse_util.flatten_dict(variables['params']).items()}


def _count(leaves):
    return sum(math.prod(v.shape) for v in leaves)


def _conv_kernels(params):
    return [v for k, v in params.items() if k.endswith('kernel') and len(v.shape) == 4]


@pytest.mark.parametrize(
    'name, num_classes, input_shape, total, conv_weights, num_convs, classifier',
    [
        ('resnet32', 10, (1, 32, 32, 3), 1_849_898, 1_844_064, 31, 'fc'),
        ('vgg19_cifar', 10, (1, 32, 32, 3), 20_035_018, 20_018_880, 16, 'classifier'),
        ('resnet50', 1000, (1, 64, 64, 3), 25_557_032, 23_454_912, 53, 'fc'),
        ('resnet18', 1000, (1, 64, 64, 3), 11_689_512, None, 20, 'fc'),
    ],
)
def test_param_counts(name, num_classes, input_shape, total, conv_weights, num_convs, classifier):
    params = _flat_params(_abstract_variables(name, num_classes, input_shape))
    assert _count(params.values()) == total
    kernels = _conv_kernels(params)
    assert len(kernels) == num_convs
    if conv_weights is not None:
        assert _count(kernels) == conv_weights
    assert classifier in CLASSIFIER_NAMES
    top_level = {k.split('/')[0] for k in params}
    assert classifier in top_level
    assert not top_level & (set(CLASSIFIER_NAMES) - {classifier})
    assert params[f'{classifier}/kernel'].shape[-1] == num_classes
    assert params[f'{classifier}/bias'].shape == (num_classes,)


@pytest.mark.parametrize(
    'name, num_classes, input_shape, total',
    [
        ('resnet20', 10, (1, 32, 32, 3), 269_722),
        ('resnet56', 10, (1, 32, 32, 3), 853_018),
        ('resnet34', 1000, (1, 64, 64, 3), 21_797_672),
        ('resnet101', 1000, (1, 64, 64, 3), 44_549_160),
        ('resnet152', 1000, (1, 64, 64, 3), 60_192_808),
    ],
)
def test_other_param_counts(name, num_classes, input_shape, total):
    """Reference totals: torchvision for ImageNet ResNets, He et al. option-A for CIFAR."""
    params = _flat_params(_abstract_variables(name, num_classes, input_shape))
    assert _count(params.values()) == total


@pytest.mark.parametrize(
    'name, num_classes, input_shape, expected',
    [
        ('resnet32', 10, (1, 32, 32, 3), {
            'conv1/kernel': (3, 3, 3, 32),
            'bn1/scale': (32,),
            'layer1_4/conv2/kernel': (3, 3, 32, 32),
            'layer2_0/conv1/kernel': (3, 3, 32, 64),
            'layer3_4/bn2/bias': (128,),
            'fc/kernel': (128, 10),
        }),
        ('vgg19_cifar', 10, (1, 32, 32, 3), {
            'features_0/kernel': (3, 3, 3, 64),
            'features_1/scale': (64,),
            'features_7/kernel': (3, 3, 64, 128),
            'features_49/kernel': (3, 3, 512, 512),
            'features_50/bias': (512,),
            'classifier/kernel': (512, 10),
        }),
        ('resnet50', 1000, (1, 64, 64, 3), {
            'conv1/kernel': (7, 7, 3, 64),
            'layer1_0/conv1/kernel': (1, 1, 64, 64),
            'layer1_0/conv3/kernel': (1, 1, 64, 256),
            'layer1_0/downsample_0/kernel': (1, 1, 64, 256),
            'layer1_0/downsample_1/scale': (256,),
            'layer2_0/conv2/kernel': (3, 3, 128, 128),
            'layer4_2/bn3/bias': (2048,),
            'fc/kernel': (2048, 1000),
        }),
    ],
)
def test_param_paths(name, num_classes, input_shape, expected):
    params = _flat_params(_abstract_variables(name, num_classes, input_shape))
    for path, shape in expected.items():
        assert params[path].shape == shape, path


def test_resnet_stride_and_downsample_placement():
    params = _flat_params(_abstract_variables('resnet50', 1000, (1, 64, 64, 3)))
    # v1.5: the 3x3 conv2 is the strided one, so layer2_0 has a 1x1 downsample projection.
    assert 'layer2_0/downsample_0/kernel' in params
    assert not any(k.startswith('layer2_1/downsample') for k in params)
    # CIFAR ResNets use the parameter-free option-A shortcut.
    cifar = _flat_params(_abstract_variables('resnet20', 10, (1, 32, 32, 3)))
    assert not any('downsample' in k for k in cifar)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_every_model_builds_with_explicit_names(name):
    small = {'width': 16, 'depth': 1, 'heads': 2, 'kv_heads': 1, 'mlp_width': 32}
    model = get_model(name, 7, **(small if name == 'llama' else {}))
    if name in ('gpt', 'llama'):  # language models: token ids in, a logit vector per position
        x, out = jax.ShapeDtypeStruct((2, 16), jnp.int32), (2, 16, 7)
    else:
        shape = (2, 8, 8, 1) if name == 'small_cnn' else (2, 32, 32, 3)
        x, out = jax.ShapeDtypeStruct(shape, jnp.float32), (2, 7)
    logits, variables = jax.eval_shape(lambda x: model.init_with_output(KEY, x, train=False), x)
    assert logits.shape == out and logits.dtype == jnp.float32
    auto_name = re.compile(
        r'^(Conv|BatchNorm|Dense|LayerNorm|BasicBlock|Bottleneck|EncoderBlock|SelfAttention)_\d+$'
    )
    for path in traverse_util.flatten_dict(variables['params']):
        assert not any(auto_name.match(part) for part in path), path
    # Transformers have no BatchNorm, so no batch statistics.
    want = {'params'} if name.startswith(('vit', 'gpt', 'llama')) else {'params', 'batch_stats'}
    assert set(variables) == want


def _forward_both_modes(model, x):
    variables = model.init(KEY, x, train=False)
    params, stats = variables['params'], variables['batch_stats']
    logits, updates = model.apply(
        {'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
    changed = jax.tree_util.tree_map(
        lambda a, b: bool(jnp.any(a != b)), stats, updates['batch_stats'])
    assert all(jax.tree_util.tree_leaves(changed))
    eval_logits = model.apply({'params': params, 'batch_stats': stats}, x, train=False)
    return logits, eval_logits


@pytest.mark.parametrize(
    'name, shape, kwargs',
    [
        ('small_cnn', (2, 8, 8, 1), {'width': 8}),
        ('small_cnn', (2, 28, 28, 1), {'width': 8}),
        ('resnet20', (2, 32, 32, 3), {}),
    ],
)
def test_forward_train_and_eval(name, shape, kwargs):
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    logits, eval_logits = _forward_both_modes(get_model(name, 10, **kwargs), x)
    for out in (logits, eval_logits):
        assert out.shape == (2, 10) and out.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(out)))


def test_small_cnn_default_width():
    params = _flat_params(_abstract_variables('small_cnn', 10, (1, 8, 8, 1)))
    assert params['conv1/kernel'].shape == (3, 3, 1, 64)
    assert params['conv2/kernel'].shape == (3, 3, 64, 128)
    assert params['conv3/kernel'].shape == (3, 3, 128, 256)
    assert params['fc/kernel'].shape == (256, 10)


def test_width_kwarg_overrides_default():
    params = _flat_params(_abstract_variables('resnet32', 10, (1, 32, 32, 3), width=16))
    assert params['conv1/kernel'].shape == (3, 3, 3, 16)


def test_bfloat16_compute_gives_float32_logits_and_params():
    model = get_model('resnet20', 10, dtype=jnp.bfloat16)
    x = jax.random.normal(KEY, (2, 32, 32, 3))
    variables = model.init(KEY, x, train=False)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(variables))
    logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3) + 1.0
    y = option_a_shortcut(x, features=8, stride=2)
    assert y.shape == (2, 2, 2, 8)
    # (8 - 3) // 2 = 2 zero channels before, 3 after.
    np.testing.assert_array_equal(y[..., :2], 0.0)
    np.testing.assert_array_equal(y[..., 5:], 0.0)
    np.testing.assert_array_equal(y[..., 2:5], x[:, ::2, ::2, :])
    # Identity when neither stride nor width changes.
    np.testing.assert_array_equal(option_a_shortcut(x, features=3, stride=1), x)


def test_unknown_model_raises():
    with pytest.raises(ValueError) as err:
        get_model('nope', 10)
    message = str(err.value)
    assert "'nope'" in message
    for name in MODELS:
        assert name in message


@pytest.mark.parametrize(
    'name, total, num_convs',
    [
        ('vgg11_bn', 132_868_840, 8),
        ('vgg13_bn', 133_053_736, 10),
        ('vgg16_bn', 138_365_992, 13),
        ('vgg19_bn', 143_678_248, 16),
    ],
)
def test_torchvision_vgg_bn_param_counts(name, total, num_convs):
    """torchvision totals; convs carry biases; classifier 25088 -> 4096 -> 4096 -> C."""
    params = _flat_params(_abstract_variables(name, 1000, (1, 224, 224, 3)))
    assert _count(params.values()) == total
    assert len(_conv_kernels(params)) == num_convs
    assert params['features_0/kernel'].shape == (3, 3, 3, 64)
    assert params['features_0/bias'].shape == (64,)
    assert params['features_1/scale'].shape == (64,)
    assert params['classifier_0/kernel'].shape == (25088, 4096)
    assert params['classifier_3/kernel'].shape == (4096, 4096)
    assert params['classifier_6/kernel'].shape == (4096, 1000)
    assert params['classifier_6/bias'].shape == (1000,)


@pytest.mark.parametrize('size', [32, 64, 224])
def test_torchvision_vgg_bn_any_input_size(size):
    """Adaptive 7x7 pooling: the classifier fits every input size >= 32."""
    model = get_model('vgg11_bn', 5)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    logits, variables = jax.eval_shape(lambda x: model.init_with_output(KEY, x, train=False), x)
    assert logits.shape == (1, 5)
    assert variables['params']['classifier_0']['kernel'].shape == (25088, 4096)


def test_adaptive_avg_pool_bins():
    from jackpot_jax.models.zoo import adaptive_avg_pool

    # 2 -> 7 bins: [0,1) x3, [0,2), [1,2) x3 (PyTorch's floor/ceil rule).
    x = jnp.array([1.0, 3.0]).reshape(1, 2, 1, 1)
    y = adaptive_avg_pool(x, (7, 1))
    np.testing.assert_allclose(y[0, :, 0, 0], [1, 1, 1, 2, 3, 3, 3])
    # Even division is a plain block mean.
    x = jnp.arange(14 * 14, dtype=jnp.float32).reshape(1, 14, 14, 1)
    y = adaptive_avg_pool(x, (7, 7))
    np.testing.assert_allclose(y[0, 0, 0, 0], (0 + 1 + 14 + 15) / 4)


def test_torchvision_vgg_dropout_only_with_rng():
    model = get_model('vgg11_bn', 3, cfg=(8, 'M'))  # a small feature stack: fast init.
    x = jax.random.normal(KEY, (2, 32, 32, 3))
    variables = model.init(KEY, x, train=False)
    a, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    b, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    np.testing.assert_array_equal(a, b)  # no 'dropout' rng: deterministic.
    c, _ = model.apply(variables, x, train=True, mutable=['batch_stats'],
                       rngs={'dropout': jax.random.PRNGKey(1)})
    assert not np.allclose(a, c)
    e1 = model.apply(variables, x, train=False, rngs={'dropout': jax.random.PRNGKey(1)})
    e2 = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(e1, e2)  # eval: never dropout.
