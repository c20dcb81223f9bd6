"""Flax Linen Vision Transformer with torchvision's parameter names (``vit_b_16`` and kin).

Paths read like torchvision's state-dict keys, '/' for '.', with a Sequential's numeric
index joined by '_' as in :mod:`jackpot_jax.models.zoo` (torch ``mlp.0`` -> flax ``mlp_0``)::

    conv_proj/{kernel,bias}                       conv_proj.{weight,bias}
    class_token                                   class_token
    encoder/pos_embedding                         encoder.pos_embedding
    encoder/layers/encoder_layer_{i}/ln_1         encoder.layers.encoder_layer_{i}.ln_1
        .../self_attention/{query,key,value}      .../self_attention.in_proj_{weight,bias}
        .../self_attention/out_proj               .../self_attention.out_proj
        .../ln_2, .../mlp_0, .../mlp_3            .../ln_2, .../mlp.0, .../mlp.3
    encoder/ln                                    encoder.ln
    heads/head                                    heads.head

torch packs q, k and v into one ``in_proj_weight``; here they are three Dense layers, so
each is a prunable kernel of its own (Flax ``(in, out)`` layout, input channels on axis
-2 as N:M patterns expect). The model has no BatchNorm and so no statistics; the
number of patches follows the input (torchvision's ``image_size`` is the size its
position embedding was made for: 224 for the registered models).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

LAYER_NORM_EPSILON = 1e-6
_XAVIER = nn.initializers.xavier_uniform()


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    """torch ``LayerNorm(eps=1e-6)``: two-pass variance, float32 parameters."""
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPSILON,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _linear(features: int, dtype: Dtype, name: str, **init: Any) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name, **init)


def dropout_acts(rate: float, train: bool, module: nn.Module) -> bool:
    """Whether dropout in ``module`` acts: a rate, training, and a ``'dropout'`` rng (as
    the VGGs); the transformers' dropout layers and attention dropout all ask this."""
    return bool(rate and train and module.has_rng('dropout'))


def dropout(rate: float, train: bool, module: nn.Module) -> nn.Dropout:
    """Dropout that acts only as :func:`dropout_acts` says."""
    return nn.Dropout(rate, deterministic=not dropout_acts(rate, train, module))


class SelfAttention(nn.Module):
    """Multi-head self-attention: separate ``query``, ``key``, ``value``, ``out_proj`` Dense layers.

    Computes what torch's ``nn.MultiheadAttention(x, x, x)`` computes: heads split the
    projected channels head-major, logits scaled by ``1 / sqrt(head_dim)``.
    """

    num_heads: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        batch, length, features = x.shape
        if features % self.num_heads:
            raise ValueError(
                f'hidden_dim {features} is not divisible by num_heads {self.num_heads}; '
                'pick a hidden_dim that is a multiple of num_heads'
            )
        head_dim = features // self.num_heads

        def project(name):
            y = _linear(features, self.dtype, name, kernel_init=_XAVIER)(x)
            return y.reshape(batch, length, self.num_heads, head_dim)

        deterministic = not dropout_acts(self.dropout_rate, train, self)
        y = nn.dot_product_attention(
            project('query'),
            project('key'),
            project('value'),
            dropout_rng=self.make_rng('dropout') if not deterministic else None,
            dropout_rate=self.dropout_rate,
            deterministic=deterministic,
            dtype=self.dtype,
        )
        y = y.reshape(batch, length, features)
        return _linear(features, self.dtype, 'out_proj', kernel_init=_XAVIER)(y)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``+ mlp(ln_2(.))`` (exact GELU)."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = self.dtype
        y = _layer_norm(dt, 'ln_1')(x)
        y = SelfAttention(self.num_heads, self.attention_dropout_rate, dt, name='self_attention')(
            y, train
        )
        x = x + dropout(self.dropout_rate, train, self)(y)
        y = _layer_norm(dt, 'ln_2')(x)
        mlp_init = {'kernel_init': _XAVIER, 'bias_init': nn.initializers.normal(1e-6)}
        y = nn.gelu(_linear(self.mlp_dim, dt, 'mlp_0', **mlp_init)(y), approximate=False)
        y = dropout(self.dropout_rate, train, self)(y)
        y = _linear(x.shape[-1], dt, 'mlp_3', **mlp_init)(y)
        return x + dropout(self.dropout_rate, train, self)(y)


class EncoderLayers(nn.Module):
    """torchvision's ``encoder.layers``: blocks named ``encoder_layer_{i}``."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in range(self.num_layers):
            x = EncoderBlock(
                self.num_heads,
                self.mlp_dim,
                self.dropout_rate,
                self.attention_dropout_rate,
                self.dtype,
                name=f'encoder_layer_{i}',
            )(x, train)
        return x


class Encoder(nn.Module):
    """Adds ``pos_embedding``, runs the blocks, then the final LayerNorm ``ln``."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        pos_embedding = self.param(
            'pos_embedding', nn.initializers.normal(0.02), (1, *x.shape[1:]), jnp.float32
        )
        x = x + pos_embedding.astype(self.dtype)
        x = dropout(self.dropout_rate, train, self)(x)
        x = EncoderLayers(
            self.num_layers,
            self.num_heads,
            self.mlp_dim,
            self.dropout_rate,
            self.attention_dropout_rate,
            self.dtype,
            name='layers',
        )(x, train)
        return _layer_norm(self.dtype, 'ln')(x)


class Heads(nn.Module):
    """torchvision's ``heads``: one Linear ``head`` (zero-initialised, as torchvision's)."""

    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        zeros = nn.initializers.zeros
        return _linear(self.num_classes, self.dtype, 'head', kernel_init=zeros)(x)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021) as torchvision builds it: patch conv, class token,
    learned position embedding, pre-norm encoder, classifier on the class token.

    Called as ``model(x, train=...)`` on NHWC images whose sides are multiples of
    ``patch_size``; returns float32 logits.
    """

    num_classes: int
    patch_size: int = 16
    hidden_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt, p = self.dtype, self.patch_size
        if x.ndim != 4 or x.shape[1] % p or x.shape[2] % p:
            raise ValueError(
                f'input of shape {x.shape} does not split into {p}x{p} patches; give NHWC '
                f'images whose height and width are multiples of patch_size={p}'
            )
        x = nn.Conv(
            self.hidden_dim,
            (p, p),
            strides=(p, p),
            padding='VALID',
            kernel_init=nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal'),
            dtype=dt,
            param_dtype=jnp.float32,
            name='conv_proj',
        )(x.astype(dt))
        batch = x.shape[0]
        x = x.reshape(batch, -1, self.hidden_dim)  # patches in row-major order, as torch.
        class_token = self.param(
            'class_token', nn.initializers.zeros, (1, 1, self.hidden_dim), jnp.float32
        )
        class_tokens = jnp.broadcast_to(class_token.astype(dt), (batch, 1, self.hidden_dim))
        x = jnp.concatenate([class_tokens, x], axis=1)
        x = Encoder(
            self.num_layers,
            self.num_heads,
            self.mlp_dim,
            self.dropout_rate,
            self.attention_dropout_rate,
            dt,
            name='encoder',
        )(x, train)
        x = Heads(self.num_classes, dt, name='heads')(x[:, 0])
        return x.astype(jnp.float32)


# torchvision's hyperparameters (image size 224 for all three).
VIT_B_16 = dict(patch_size=16, hidden_dim=768, num_layers=12, num_heads=12, mlp_dim=3072)
VIT_B_32 = {**VIT_B_16, 'patch_size': 32}
VIT_L_16 = dict(patch_size=16, hidden_dim=1024, num_layers=24, num_heads=16, mlp_dim=4096)
# A small ViT for 8x8 digits and 28x28 Fashion-MNIST; every field may be overridden.
VIT_TINY = dict(patch_size=2, hidden_dim=64, num_layers=4, num_heads=4, mlp_dim=128)

CONFIGS = {'vit_b_16': VIT_B_16, 'vit_b_32': VIT_B_32, 'vit_l_16': VIT_L_16, 'vit_tiny': VIT_TINY}
