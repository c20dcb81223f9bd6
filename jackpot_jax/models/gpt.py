"""A small GPT-style causal language model (Flax Linen) for jackpots in language models.

Token and position embeddings, ``depth`` pre-LayerNorm blocks of causal self-attention
and a GELU MLP, a final LayerNorm, and an output head over the vocabulary: by default
tied to the token embedding (logits = h @ wte^T, no head kernel at all); with
``tie_embeddings=False`` a separate Dense named ``classifier``. Parameter paths::

    wte/embedding                      token embedding    [vocab, width]
    wpe/embedding                      position embedding [context, width]
    h_{i}/ln_1, h_{i}/ln_2             LayerNorms (scale, bias)
    h_{i}/attn/{query,key,value}       attention projections  [width, width]
    h_{i}/attn/out_proj                attention output       [width, width]
    h_{i}/mlp/c_fc                     MLP in                 [width, mlp_ratio * width]
    h_{i}/mlp/c_proj                   MLP out                [mlp_ratio * width, width]
    ln_f                               final LayerNorm
    classifier                         only with tie_embeddings=False

so the default prune rule (every ``kernel`` but the top-level ``fc``/``classifier``,
``heads`` and ``conv_proj``) selects exactly the attention and MLP kernels, and leaves
the embeddings, LayerNorms and the head dense. Kernels are in Flax ``(in, out)`` layout:
N:M patterns and per-output-row criteria group along the input axis.

Called as ``model.apply(variables, tokens, train=...)`` on integer tokens ``[B, T]``
(float arrays holding integers are accepted, as the launcher initialises every model on
a float32 sample) with ``T <= context``; returns float32 logits ``[B, T, vocab]`` whose
position t depends on tokens ``0..t`` only. Dropout acts only when training with a
``'dropout'`` rng. There is no BatchNorm, so no statistics.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jackpot_jax.models.vit import dropout, dropout_acts

Dtype = Any

LAYER_NORM_EPSILON = 1e-5
INIT_STD = 0.02  # GPT-2's init: normal(0.02) for embeddings and kernels


def _dense(features: int, dtype: Dtype, name: str, std: float = INIT_STD) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=nn.initializers.normal(std),
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, param_dtype=jnp.float32, name=name)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends to positions <= t only.

    Separate ``query``, ``key``, ``value`` and ``out_proj`` Dense layers (each its own
    prunable kernel); logits scaled by ``1 / sqrt(head_dim)``.
    """

    heads: int
    residual_std: float = INIT_STD
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        batch, length, width = x.shape
        head_dim = width // self.heads

        def project(name):
            y = _dense(width, self.dtype, name)(x)
            return y.reshape(batch, length, self.heads, head_dim)

        causal = nn.make_causal_mask(jnp.ones((batch, length), bool))  # [B, 1, T, T]
        deterministic = not dropout_acts(self.dropout_rate, train, self)
        y = nn.dot_product_attention(
            project('query'),
            project('key'),
            project('value'),
            mask=causal,
            dropout_rng=None if deterministic else self.make_rng('dropout'),
            dropout_rate=self.dropout_rate,
            deterministic=deterministic,
            dtype=self.dtype,
        )
        y = y.reshape(batch, length, width)
        return _dense(width, self.dtype, 'out_proj', self.residual_std)(y)


class MLP(nn.Module):
    """``c_fc`` (width -> hidden), exact GELU, ``c_proj`` (hidden -> width)."""

    hidden: int
    residual_std: float = INIT_STD
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.gelu(_dense(self.hidden, self.dtype, 'c_fc')(x), approximate=False)
        return _dense(x.shape[-1], self.dtype, 'c_proj', self.residual_std)(y)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))``, then ``+ mlp(ln_2(.))``."""

    heads: int
    hidden: int
    residual_std: float = INIT_STD
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = self.dtype
        y = _layer_norm(dt, 'ln_1')(x)
        y = CausalSelfAttention(self.heads, self.residual_std, self.dropout_rate, dt, name='attn')(
            y, train
        )
        x = x + dropout(self.dropout_rate, train, self)(y)
        y = MLP(self.hidden, self.residual_std, dt, name='mlp')(_layer_norm(dt, 'ln_2')(x))
        return x + dropout(self.dropout_rate, train, self)(y)


class GPT(nn.Module):
    """Decoder-only causal language model; ``num_classes`` is the vocabulary size.

    ``width`` channels, ``depth`` blocks, ``heads`` attention heads (``width`` must be a
    multiple of it), ``context`` positions (the longest input), MLP hidden size
    ``mlp_ratio * width``. The projections into the residual stream (``out_proj``,
    ``c_proj``) start with std ``0.02 / sqrt(2 depth)``, as GPT-2's.
    """

    num_classes: int
    width: int = 256
    depth: int = 4
    heads: int = 4
    context: int = 128
    mlp_ratio: int = 4
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    def _check(self) -> None:
        for name in ('num_classes', 'width', 'depth', 'heads', 'context', 'mlp_ratio'):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f'gpt: {name} must be a positive integer, got {value!r}')
        if self.width % self.heads:
            raise ValueError(
                f'gpt: width {self.width} is not divisible by heads {self.heads}; pick a width '
                'that is a multiple of heads (e.g. --config.model.heads=4)'
            )

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        self._check()
        if tokens.ndim != 2:
            raise ValueError(
                f'gpt: input of shape {tokens.shape} is not [batch, length] tokens; give a '
                '2-D array of token ids'
            )
        length = tokens.shape[1]
        if length > self.context:
            raise ValueError(
                f'gpt: input length {length} exceeds context={self.context}; raise '
                '--config.model.context or feed shorter windows (data.context)'
            )
        dt = self.dtype
        tokens = tokens.astype(jnp.int32)
        embed_init = nn.initializers.normal(INIT_STD)
        wte = nn.Embed(
            self.num_classes,
            self.width,
            embedding_init=embed_init,
            param_dtype=jnp.float32,
            name='wte',
        )
        wpe = nn.Embed(
            self.context,
            self.width,
            embedding_init=embed_init,
            param_dtype=jnp.float32,
            name='wpe',
        )
        x = wte(tokens) + wpe(jnp.arange(length))[None]
        x = dropout(self.dropout_rate, train, self)(x.astype(dt))
        residual_std = INIT_STD / math.sqrt(2 * self.depth)
        for i in range(self.depth):
            x = Block(
                self.heads,
                self.mlp_ratio * self.width,
                residual_std,
                self.dropout_rate,
                dt,
                name=f'h_{i}',
            )(x, train)
        # The head computes in float32 in every mode, as the image models' classifiers.
        x = _layer_norm(dt, 'ln_f')(x).astype(jnp.float32)
        if self.tie_embeddings:
            return wte.attend(x)
        return nn.Dense(
            self.num_classes,
            kernel_init=embed_init,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            name='classifier',
        )(x)


def gpt(num_classes: int, vocab_size: int = 0, **kwargs: Any) -> GPT:
    """:class:`GPT` over the data's ``num_classes`` tokens; ``vocab_size`` (0 = the data's)
    must agree with it when given."""
    if vocab_size and vocab_size != num_classes:
        raise ValueError(
            f'gpt: model.vocab_size={vocab_size!r} but the data has {num_classes} tokens; '
            f'set --config.model.vocab_size={num_classes} (or 0: the data\'s vocabulary)'
        )
    return GPT(num_classes=num_classes, **kwargs)
