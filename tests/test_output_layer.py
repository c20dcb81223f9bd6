"""The output layer found by structure: whatever its name, through any head-side ops."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jackpot_jax.core import adapters, sparsity
from jackpot_jax.models import zoo
from jackpot_jax.models.output_layer import output_kernel_paths

KEY = jax.random.key(0)
X = jnp.ones((2, 8, 8, 3))


def _detect(model, x=X, **kwargs):
    variables = model.init(KEY, x, **kwargs)
    stats = {k: v for k, v in variables.items() if k != 'params'}
    return output_kernel_paths(
        lambda p: model.apply({'params': p, **stats}, x, **kwargs), variables['params']
    )


class MLP(nn.Module):
    head: str | None = None  # None: Flax names the last Dense 'Dense_2'
    log_probs: bool = False

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(16)(x))
        x = nn.Dense(5, name=self.head)(x)
        return nn.log_softmax(x) if self.log_probs else x


def test_last_dense_named_head():
    assert _detect(MLP(head='head')) == ('head/kernel',)


def test_last_dense_auto_named():
    assert _detect(MLP()) == ('Dense_2/kernel',)


def test_through_log_softmax():
    assert _detect(MLP(head='logits', log_probs=True)) == ('logits/kernel',)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(4, name='out')(x.mean(axis=(1, 2)))


def test_cnn_with_batch_norm_and_pooling():
    assert _detect(CNN(), train=False) == ('out/kernel',)


class ConvClassifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name='body')(x))
        x = nn.Conv(4, (1, 1), name='score')(x)  # per-position class scores
        return x.mean(axis=(1, 2))


def test_one_by_one_conv_classifier_then_mean():
    assert _detect(ConvClassifier()) == ('score/kernel',)


class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(11, 8, name='tok')
        h = nn.relu(nn.Dense(8, name='mix')(embed(tokens)))
        return embed.attend(nn.LayerNorm()(h))


def test_tied_embedding_reports_the_table():
    tokens = jnp.zeros((2, 5), jnp.int32)
    assert _detect(TiedLM(), tokens) == ('tok/embedding',)


class TwoHeads(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16, name='trunk')(x.reshape(x.shape[0], -1)))
        return nn.Dense(3, name='species')(h), {'box': nn.Dense(4, name='box')(h)}


def test_every_output_leaf_has_its_head():
    assert _detect(TwoHeads()) == ('box/kernel', 'species/kernel')


class Attention(nn.Module):
    """Output = softmax(q k^T) v: no output projection, the last dots are activation x
    activation, so the walk goes on through both operands to the q, k, v kernels."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name='embed')(x.reshape(2, 4, -1))
        q, k, v = (nn.Dense(8, name=n)(x) for n in ('query', 'key', 'value'))
        return nn.softmax(q @ k.swapaxes(-1, -2)) @ v


def test_activation_products_are_walked_through():
    assert _detect(Attention()) == ('key/kernel', 'query/kernel', 'value/kernel')


class ConstantProjection(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Dense(6, name='last')(x.reshape(x.shape[0], -1))
        return y @ jnp.eye(6)  # a constant, not a parameter: walked through


def test_constant_weights_are_not_parameters():
    assert _detect(ConstantProjection()) == ('last/kernel',)


class Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
        return nn.remat(nn.Dense)(5, name='classify')(x)


class Jitted(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
        w = self.param('w', nn.initializers.lecun_normal(), (5, 16))
        w_t = jax.jit(lambda w: w.T)(w)  # a re-laid-out weight, inside a call
        return jax.jit(lambda h, w: jnp.tanh(h @ w))(x, w_t)


@pytest.mark.parametrize('model, expected', [(Remat(), 'classify/kernel'), (Jitted(), 'w')])
def test_inside_remat_and_jit(model, expected):
    assert _detect(model) == (expected,)


class Block(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return nn.relu(nn.Dense(12)(c)), None


class Scanned(nn.Module):
    """The output is the carry of two blocks stacked under nn.scan."""

    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(Block, variable_axes={'params': 0}, split_rngs={'params': True}, length=2)
        h, _ = blocks(name='blocks')(nn.Dense(12, name='stem')(x.reshape(x.shape[0], -1)), None)
        return h


def test_scanned_layers_report_the_stacked_kernel():
    assert _detect(Scanned()) == ('blocks/Dense_0/kernel',)


def test_loop_carries_are_followed_round():
    """(a, b) -> (b, a @ w): after one step the output a is x @ v, after two x @ w."""
    params = {'v': jnp.ones((3, 3)), 'w': jnp.ones((3, 3))}
    x = jnp.ones((2, 3))

    def apply(p, loop):
        return loop(lambda c: (c[1], c[0] @ p['w']), (x, x @ p['v']))[0]

    scan = lambda step, c: jax.lax.scan(lambda c, _: (step(c), None), c, length=2)[0]
    fori = lambda step, c: jax.lax.fori_loop(0, jnp.int32(2), lambda i, c: step(c), c)
    for loop in (scan, fori):
        assert output_kernel_paths(lambda p: apply(p, loop), params) == ('v', 'w')


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Linear(192, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, rngs=rngs)
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.body(x.reshape(x.shape[0], -1)))))


def test_nnx_model():
    split = adapters.split_nnx(NnxNet(nnx.Rngs(0)))
    paths = output_kernel_paths(
        lambda p: split.forward(p, split.statistics, X, train=False)[0], split.params
    )
    assert paths == ('out/kernel',)
    assert set(paths) <= set(sparsity.flatten(split.params))


def _package_model(name, x, **kwargs):
    model = zoo.get_model(name, 10, **kwargs)
    shapes = jax.eval_shape(lambda: model.init(KEY, x, train=False))
    stats = jax.tree.map(  # concrete, closed over; the params stay abstract
        lambda s: jnp.zeros(s.shape, s.dtype), {k: v for k, v in shapes.items() if k != 'params'}
    )
    apply = lambda p: model.apply({'params': p, **stats}, x, train=False)
    return output_kernel_paths(apply, shapes['params']), sparsity.flatten(shapes['params'])


@pytest.mark.parametrize(
    'name, kwargs', [('resnet20', {}), ('small_cnn', {}), ('vgg19_cifar', {}),
                     ('vit_tiny', {}), ('resnet18', {})]
)
def test_package_models_match_the_name_rule(name, kwargs):
    """The classifier kernels that the name rule excludes, less the ViT's patch embedding."""
    found, flat = _package_model(name, jnp.ones((1, 32, 32, 3)), **kwargs)
    named = tuple(
        sorted(
            p for p in flat
            if re.search(sparsity.DEFAULT_INCLUDE, p)
            and re.search(sparsity.DEFAULT_EXCLUDE, p)
            and not p.startswith('conv_proj/')
        )
    )
    assert found == named and len(found) == 1


def test_torchvision_vgg_reports_only_the_last_classifier_layer():
    """The name rule keeps all three classifier layers dense; structure finds the last."""
    found, _ = _package_model('vgg11_bn', jnp.ones((1, 32, 32, 3)))
    assert found == ('classifier_6/kernel',)


@pytest.mark.parametrize('tie, expected', [(True, 'wte/embedding'), (False, 'classifier/kernel')])
def test_gpt_head(tie, expected):
    if 'gpt' not in zoo.MODELS:
        pytest.skip('no gpt model registered')
    found, _ = _package_model('gpt', jnp.ones((1, 8), jnp.int32), tie_embeddings=tie, depth=2)
    assert found == (expected,)
