"""Flax Linen model zoo: small CNN, CIFAR ResNets, VGG-19 (CIFAR), torchvision ResNets, VGG-BNs,
Vision Transformers (:mod:`jackpot_jax.models.vit`) and a GPT-style language model (:mod:`jackpot_jax.models.gpt`).

Every image model is called as ``model(x, train=...)`` on NHWC float32 input and returns
float32 logits ``[B, num_classes]``; the language model ``gpt`` takes tokens ``[B, T]`` and
returns logits ``[B, T, vocab]`` (``num_classes`` is the vocabulary). ``dtype`` is the computation dtype of the body
(see :data:`DTYPES`); parameters and BatchNorm statistics are always float32, and the
classifier computes the logits in float32.

Module names mirror PyTorch state-dict names with '.' replaced by '_' (e.g. torch
``layer1.0.downsample.0.weight`` -> flax ``layer1_0/downsample_0/kernel``), so weight
conversion is a plain name table. All convs are bias-free (the torchvision VGGs' excepted)
with explicit symmetric padding (never 'SAME', which pads asymmetrically on strided convs
and breaks parity).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jackpot_jax.models import conv, gpt, llama, user_models, vit

Dtype = Any

CLASSIFIER_NAMES = ('fc', 'classifier')
# Computation dtypes by config name (``model.dtype``).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# torchvision's conv init (kaiming_normal_, mode='fan_out', nonlinearity='relu').
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(
    features: int, kernel: int, stride: int, dtype: Dtype, name: str, use_bias: bool = False
) -> conv.Conv:
    """Square conv (bias-free unless asked) with PyTorch-style symmetric padding ``kernel // 2``.

    ``conv.Conv`` is ``nn.Conv``'s parameters and values, with gradients fast on XLA:CPU.
    """
    pad = kernel // 2
    return conv.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        kernel_init=_CONV_INIT,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _bn(train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
    """BatchNorm matching PyTorch defaults (torch momentum 0.1 == flax momentum 0.9)."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _classifier(num_classes: int, name: str) -> nn.Dense:
    """The last layer: its logits feed the loss, so it computes in float32 in every mode
    (a bfloat16 body's features are promoted; the layer is a tiny part of the step)."""
    return nn.Dense(num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


def _global_avg_pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2))


def option_a_shortcut(x: jax.Array, features: int, stride: int) -> jax.Array:
    """Parameter-free CIFAR ResNet shortcut ("option A" of He et al. 2015).

    Subsamples spatially by ``stride`` and zero-pads channels up to ``features``:
    ``(features - in) // 2`` zero channels before the input channels, the rest after.
    """
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    extra = features - x.shape[-1]
    if extra:
        before = extra // 2
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (before, extra - before)))
    return x


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs; the stride sits on ``conv1``.

    The shortcut is the parameter-free option A (CIFAR ResNets) or, by default,
    a 1x1 conv + BN projection (``downsample_0``/``downsample_1``, torchvision).
    """

    features: int
    stride: int = 1
    option_a: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = _conv(self.features, 3, self.stride, self.dtype, 'conv1')(x)
        y = nn.relu(_bn(train, self.dtype, 'bn1')(y))
        y = _conv(self.features, 3, 1, self.dtype, 'conv2')(y)
        y = _bn(train, self.dtype, 'bn2')(y)
        if self.stride == 1 and x.shape[-1] == self.features:
            shortcut = x
        elif self.option_a:
            shortcut = option_a_shortcut(x, self.features, self.stride)
        else:
            shortcut = _conv(self.features, 1, self.stride, self.dtype, 'downsample_0')(x)
            shortcut = _bn(train, self.dtype, 'downsample_1')(shortcut)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """torchvision Bottleneck v1.5: 1x1 -> 3x3 (strided) -> 1x1 with expansion 4."""

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out_features = self.features * self.expansion
        y = _conv(self.features, 1, 1, self.dtype, 'conv1')(x)
        y = nn.relu(_bn(train, self.dtype, 'bn1')(y))
        y = _conv(self.features, 3, self.stride, self.dtype, 'conv2')(y)
        y = nn.relu(_bn(train, self.dtype, 'bn2')(y))
        y = _conv(out_features, 1, 1, self.dtype, 'conv3')(y)
        y = _bn(train, self.dtype, 'bn3')(y)
        if self.stride == 1 and x.shape[-1] == out_features:
            shortcut = x
        else:
            shortcut = _conv(out_features, 1, self.stride, self.dtype, 'downsample_0')(x)
            shortcut = _bn(train, self.dtype, 'downsample_1')(shortcut)
        return nn.relu(y + shortcut)


class SmallCNN(nn.Module):
    """Three-conv CNN for small grayscale images (8x8 digits, 28x28 MNIST)."""

    num_classes: int
    width: int = 64
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        w, dt = self.width, self.dtype
        x = x.astype(dt)
        x = nn.relu(_bn(train, dt, 'bn1')(_conv(w, 3, 1, dt, 'conv1')(x)))
        x = nn.relu(_bn(train, dt, 'bn2')(_conv(2 * w, 3, 1, dt, 'conv2')(x)))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(_bn(train, dt, 'bn3')(_conv(4 * w, 3, 1, dt, 'conv3')(x)))
        x = _classifier(self.num_classes, 'fc')(_global_avg_pool(x))
        return x.astype(jnp.float32)


class CifarResNet(nn.Module):
    """CIFAR ResNet (He et al. 2015): 3 stages of (depth-2)/6 basic blocks, option-A shortcuts."""

    num_classes: int
    depth: int = 20
    width: int = 16
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if (self.depth - 2) % 6:
            raise ValueError(f'CIFAR ResNet depth must be 6n+2, got {self.depth}')
        blocks_per_stage = (self.depth - 2) // 6
        dt = self.dtype
        x = x.astype(dt)
        x = nn.relu(_bn(train, dt, 'bn1')(_conv(self.width, 3, 1, dt, 'conv1')(x)))
        for stage in range(3):
            for index in range(blocks_per_stage):
                x = BasicBlock(
                    self.width * 2**stage,
                    stride=2 if stage > 0 and index == 0 else 1,
                    option_a=True,
                    dtype=dt,
                    name=f'layer{stage + 1}_{index}',
                )(x, train)
        x = _classifier(self.num_classes, 'fc')(_global_avg_pool(x))
        return x.astype(jnp.float32)


class ResNet(nn.Module):
    """torchvision ImageNet ResNet: 7x7/2 stem, 3x3/2 max-pool, 4 stages, global pool, ``fc``."""

    num_classes: int
    block: type[BasicBlock] | type[Bottleneck] = BasicBlock
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = self.dtype
        x = x.astype(dt)
        x = nn.relu(_bn(train, dt, 'bn1')(_conv(64, 7, 2, dt, 'conv1')(x)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                x = self.block(
                    64 * 2**stage,
                    stride=2 if stage > 0 and index == 0 else 1,
                    dtype=dt,
                    name=f'layer{stage + 1}_{index}',
                )(x, train)
        x = _classifier(self.num_classes, 'fc')(_global_avg_pool(x))
        return x.astype(jnp.float32)


# fmt: off
VGG19_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M',
             512, 512, 512, 512, 'M', 512, 512, 512, 512, 'M')
# fmt: on


def vgg_features(
    x: jax.Array, cfg: Sequence[int | str], train: bool, dtype: Dtype, conv_bias: bool
) -> jax.Array:
    """VGG's conv-BN-ReLU stacks and 2x2 max-pools, named by the flat PyTorch ``features``
    sequence: a conv entry takes three indices (conv ``features_i``, BN ``features_{i+1}``,
    ReLU), a max-pool one. Called from a compact ``__call__``."""
    index = 0
    for item in cfg:
        if item == 'M':
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            index += 1
        else:
            x = _conv(item, 3, 1, dtype, f'features_{index}', use_bias=conv_bias)(x)
            x = nn.relu(_bn(train, dtype, f'features_{index + 1}')(x))
            index += 3
    return x


class VGG(nn.Module):
    """CIFAR VGG with BatchNorm: conv-BN-ReLU stacks and 2x2 max-pools, single ``classifier``.

    Module names follow the flat PyTorch ``features`` sequence: a conv entry uses three
    indices (conv ``features_i``, BN ``features_{i+1}``, ReLU), a max-pool one.
    """

    num_classes: int
    cfg: Sequence[int | str] = VGG19_CFG
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = self.dtype
        x = vgg_features(x.astype(dt), self.cfg, train, dt, conv_bias=False)
        x = _classifier(self.num_classes, 'classifier')(_global_avg_pool(x))
        return x.astype(jnp.float32)


def _adaptive_bounds(size: int, out: int) -> list[tuple[int, int]]:
    """torch AdaptiveAvgPool bins: bin i spans [floor(i n / o), ceil((i + 1) n / o))."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """``torch.nn.AdaptiveAvgPool2d`` on NHWC input (bins may overlap or repeat).

    Exact reshape-mean when the input divides evenly, else separable static slices.
    """
    b, h, w, c = x.shape
    oh, ow = output_size
    if h % oh == 0 and w % ow == 0:
        return x.reshape(b, oh, h // oh, ow, w // ow, c).mean(axis=(2, 4))
    rows = [x[:, s:e].mean(axis=1) for s, e in _adaptive_bounds(h, oh)]
    x = jnp.stack(rows, axis=1)
    cols = [x[:, :, s:e].mean(axis=2) for s, e in _adaptive_bounds(w, ow)]
    return jnp.stack(cols, axis=2)


# fmt: off
VGG_BN_CFGS = {
    'vgg11_bn': (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'),
    'vgg13_bn': (64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'),
    'vgg16_bn': (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M',
                 512, 512, 512, 'M', 512, 512, 512, 'M'),
    'vgg19_bn': VGG19_CFG,
}
# fmt: on


class TorchvisionVGG(nn.Module):
    """torchvision ``vgg*_bn``: conv(bias)-BN-ReLU features, adaptive 7x7 pool, 3-layer classifier.

    Names follow torchvision's flat sequences: ``features_i`` (conv with bias) and
    ``features_{i+1}`` (BN) per conv entry, and ``classifier_0``/``classifier_3``/
    ``classifier_6`` Dense layers (ReLU and Dropout between them). The pooled map is
    flattened in PyTorch's (C, H, W) order so the Dense kernels are plain transposes.
    Dropout acts only when ``train`` and a ``'dropout'`` rng is supplied.
    """

    num_classes: int
    cfg: Sequence[int | str] = VGG19_CFG
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = self.dtype
        x = vgg_features(x.astype(dt), self.cfg, train, dt, conv_bias=True)
        x = adaptive_avg_pool(x, (7, 7))
        self.sow('intermediates', 'avgpool', x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        deterministic = not (train and self.has_rng('dropout'))
        for i, features in enumerate((4096, 4096)):
            x = nn.Dense(
                features,
                kernel_init=nn.initializers.normal(0.01),
                dtype=dt,
                param_dtype=jnp.float32,
                name=f'classifier_{3 * i}',
            )(x)
            x = nn.Dropout(self.dropout_rate, deterministic=deterministic)(nn.relu(x))
        x = nn.Dense(
            self.num_classes,
            kernel_init=nn.initializers.normal(0.01),
            dtype=jnp.float32,  # float32 logits, as _classifier
            param_dtype=jnp.float32,
            name='classifier_6',
        )(x)
        return x.astype(jnp.float32)


MODELS: dict[str, Callable[..., nn.Module]] = {
    'small_cnn': SmallCNN,
    'resnet20': functools.partial(CifarResNet, depth=20, width=16),
    'resnet32': functools.partial(CifarResNet, depth=32, width=32),
    'resnet56': functools.partial(CifarResNet, depth=56, width=16),
    'vgg19_cifar': VGG,
    'resnet18': functools.partial(ResNet, block=BasicBlock, stage_sizes=(2, 2, 2, 2)),
    'resnet34': functools.partial(ResNet, block=BasicBlock, stage_sizes=(3, 4, 6, 3)),
    'resnet50': functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 6, 3)),
    'resnet101': functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 23, 3)),
    'resnet152': functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 8, 36, 3)),
    'vgg11_bn': functools.partial(TorchvisionVGG, cfg=VGG_BN_CFGS['vgg11_bn']),
    'vgg13_bn': functools.partial(TorchvisionVGG, cfg=VGG_BN_CFGS['vgg13_bn']),
    'vgg16_bn': functools.partial(TorchvisionVGG, cfg=VGG_BN_CFGS['vgg16_bn']),
    'vgg19_bn': functools.partial(TorchvisionVGG, cfg=VGG_BN_CFGS['vgg19_bn']),
    **{
        name: functools.partial(vit.VisionTransformer, **hyperparameters)
        for name, hyperparameters in vit.CONFIGS.items()
    },
    # A causal language model over the data's vocabulary (:mod:`jackpot_jax.models.gpt`).
    'gpt': gpt.gpt,
    # The LLaMA family (:mod:`jackpot_jax.models.llama`); defaults: SmolLM2-135M.
    'llama': llama.llama,
}


def compute_dtype(name: str) -> Dtype:
    """The computation dtype named by ``model.dtype``."""
    if name not in DTYPES:
        raise ValueError(
            f"unknown model.dtype {name!r}; choose one of: {', '.join(DTYPES)} "
            '(e.g. --config.model.dtype=bfloat16)'
        )
    return DTYPES[name]


def get_model(name: str, num_classes: int, dtype: Dtype = jnp.float32, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` (e.g. ``width``) override its defaults.

    A name 'package.module:Factory' builds the user's own model (see ``user_models``).
    """
    if user_models.is_import_path(name):
        return user_models.build_model(name, num_classes, **kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, dtype=dtype, **kwargs)
