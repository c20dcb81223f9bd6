"""A LLaMA-architecture causal language model (Flax Linen) for jackpots in pre-trained LLMs.

Token embedding, ``depth`` pre-RMSNorm blocks of grouped-query causal self-attention with
rotary position embeddings (Hugging Face's rotate-half convention) and a SwiGLU MLP, a
final RMSNorm, and an output head: tied to the token embedding (logits = h @ E^T) or a
separate ``lm_head``. Linear layers have no bias. Parameter paths map one to one to the
names of Hugging Face's ``LlamaForCausalLM`` (see :func:`name_table`)::

    embed_tokens/embedding                         [vocab, width]
    layers_{i}/input_layernorm/scale               [width]
    layers_{i}/self_attn/q_proj/kernel             [width, heads * head_dim]
    layers_{i}/self_attn/{k_proj,v_proj}/kernel    [width, kv_heads * head_dim]
    layers_{i}/self_attn/o_proj/kernel             [heads * head_dim, width]
    layers_{i}/post_attention_layernorm/scale      [width]
    layers_{i}/mlp/{gate_proj,up_proj}/kernel      [width, mlp_width]
    layers_{i}/mlp/down_proj/kernel                [mlp_width, width]
    norm/scale                                     [width]
    lm_head/kernel                                 [width, vocab], only when untied

Kernels are in Flax ``(in, out)`` layout (the transpose of PyTorch's ``weight``).
Called as ``model.apply({'params': p}, tokens)`` on integer tokens ``[B, T]`` (float arrays
holding integers are accepted, as in :mod:`jackpot_jax.models.gpt`) with
``T <= config.context``; returns float32 logits ``[B, T, vocab]`` whose position t depends
on tokens ``0..t`` only.

Attention over more than ``attention_chunk`` positions runs over blocks of that many
queries and recomputes a block's probabilities in the backward pass: memory grows as
``T * attention_chunk`` per layer, not ``T**2``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jackpot_jax.core.errors import UserError

Dtype = Any

INIT_STD = 0.02  # Hugging Face's initializer_range for LLaMA
ATTENTION_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The hyper-parameters of a LLaMA model (names as in this package; Hugging Face's in
    brackets): ``vocab_size`` [vocab_size], ``width`` [hidden_size], ``depth``
    [num_hidden_layers], ``heads`` [num_attention_heads], ``kv_heads``
    [num_key_value_heads], ``mlp_width`` [intermediate_size], ``norm_eps``
    [rms_norm_eps], ``rope_base`` [rope_theta], ``context`` [max_position_embeddings],
    ``tie_embeddings`` [tie_word_embeddings]."""

    vocab_size: int
    width: int
    depth: int
    heads: int
    kv_heads: int
    mlp_width: int
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    context: int = 2048
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def check(self) -> None:
        """Raises a UserError naming the first field that cannot make a model."""
        for name in ('vocab_size', 'width', 'depth', 'heads', 'kv_heads', 'mlp_width', 'context'):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise UserError(f'llama: {name} must be a positive integer, got {value!r}')
        if self.width % self.heads:
            raise UserError(
                f'llama: width {self.width} is not divisible by heads {self.heads}; pick a '
                'width that is a multiple of heads'
            )
        if self.head_dim % 2:
            raise UserError(
                f'llama: head_dim {self.head_dim} (width / heads) is odd; rotary embeddings '
                'rotate pairs of channels, so pick an even head_dim'
            )
        if self.heads % self.kv_heads:
            raise UserError(
                f'llama: heads {self.heads} is not a multiple of kv_heads {self.kv_heads}; '
                'each key/value head serves a whole group of query heads'
            )
        if not (self.norm_eps > 0 and self.rope_base > 0):
            raise UserError(
                f'llama: norm_eps {self.norm_eps!r} and rope_base {self.rope_base!r} must be '
                'positive'
            )


def smollm2_135m() -> LlamaConfig:
    """SmolLM2-135M (and -Instruct): 30 blocks of width 576, 9 query heads over 3
    key/value heads, SwiGLU 1536, RoPE base 100000, tied 49,152-token embedding."""
    return LlamaConfig(
        vocab_size=49152,
        width=576,
        depth=30,
        heads=9,
        kv_heads=3,
        mlp_width=1536,
        norm_eps=1e-5,
        rope_base=100000.0,
        context=8192,
        tie_embeddings=True,
    )


# ----------------------------------------------------------------------------
# Names: Flax path <-> Hugging Face name <-> GGUF name.
# ----------------------------------------------------------------------------
class TensorName(NamedTuple):
    """One parameter under its three names. ``kind``: ``'embedding'`` (same layout
    everywhere), ``'kernel'`` (Flax (in, out); Hugging Face and GGUF (out, in)) or
    ``'scale'`` (a vector). ``rope_heads``: for q/k projections, the number of heads
    that GGUF's interleaved-RoPE row permutation acts on (0 for every other tensor)."""

    flax: tuple[str, ...]
    hf: str
    gguf: str
    kind: str
    rope_heads: int = 0


# Inside block i: (Flax path under layers_{i}, Hugging Face name under model.layers.{i},
# GGUF name under blk.{i}, kind).
_BLOCK = (
    (('input_layernorm', 'scale'), 'input_layernorm', 'attn_norm', 'scale'),
    (('self_attn', 'q_proj', 'kernel'), 'self_attn.q_proj', 'attn_q', 'kernel'),
    (('self_attn', 'k_proj', 'kernel'), 'self_attn.k_proj', 'attn_k', 'kernel'),
    (('self_attn', 'v_proj', 'kernel'), 'self_attn.v_proj', 'attn_v', 'kernel'),
    (('self_attn', 'o_proj', 'kernel'), 'self_attn.o_proj', 'attn_output', 'kernel'),
    (('post_attention_layernorm', 'scale'), 'post_attention_layernorm', 'ffn_norm', 'scale'),
    (('mlp', 'gate_proj', 'kernel'), 'mlp.gate_proj', 'ffn_gate', 'kernel'),
    (('mlp', 'up_proj', 'kernel'), 'mlp.up_proj', 'ffn_up', 'kernel'),
    (('mlp', 'down_proj', 'kernel'), 'mlp.down_proj', 'ffn_down', 'kernel'),
)


def name_table(config: LlamaConfig) -> list[TensorName]:
    """Every parameter of ``Llama(config)`` with its Hugging Face ``LlamaForCausalLM`` and
    GGUF (llama.cpp) tensor names, in the order of the model."""
    rope_heads = {'q_proj': config.heads, 'k_proj': config.kv_heads}
    embed = ('embed_tokens', 'embedding')
    rows = [TensorName(embed, 'model.embed_tokens.weight', 'token_embd.weight', 'embedding')]
    for i in range(config.depth):
        for path, hf, gguf, kind in _BLOCK:
            rows.append(
                TensorName(
                    (f'layers_{i}',) + path,
                    f'model.layers.{i}.{hf}.weight',
                    f'blk.{i}.{gguf}.weight',
                    kind,
                    rope_heads.get(path[-2], 0) if kind == 'kernel' else 0,
                )
            )
    rows.append(TensorName(('norm', 'scale'), 'model.norm.weight', 'output_norm.weight', 'scale'))
    if not config.tie_embeddings:
        rows.append(TensorName(('lm_head', 'kernel'), 'lm_head.weight', 'output.weight', 'kernel'))
    return rows


def shape_of(config: LlamaConfig, row: TensorName) -> tuple[int, ...]:
    """The Flax shape of the parameter ``row`` names."""
    c, hd = config, config.head_dim
    name = row.flax[-2]
    if row.kind == 'scale':
        return (c.width,)
    return {
        'embed_tokens': (c.vocab_size, c.width),
        'q_proj': (c.width, c.heads * hd),
        'k_proj': (c.width, c.kv_heads * hd),
        'v_proj': (c.width, c.kv_heads * hd),
        'o_proj': (c.heads * hd, c.width),
        'gate_proj': (c.width, c.mlp_width),
        'up_proj': (c.width, c.mlp_width),
        'down_proj': (c.mlp_width, c.width),
        'lm_head': (c.width, c.vocab_size),
    }[name]


# ----------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------
def rope_tables(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` of shape ``[T, head_dim]`` for rotate-half RoPE: channel ``j`` and
    ``j + head_dim/2`` share the angle ``position * base**(-2j / head_dim)``."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (base**exponents)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding of ``x`` ``[B, T, H, D]`` at ``positions`` ``[T]``, as
    Hugging Face's LLaMA: ``x * cos + rotate_half(x) * sin`` with
    ``rotate_half([a, b]) = [-b, a]`` over the two halves of the head dimension. Computed
    in float32, returned in ``x``'s dtype."""
    cos, sin = rope_tables(positions, x.shape[-1], base)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    xf = x.astype(jnp.float32)
    first, second = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def _attention_block(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array | int) -> jax.Array:
    """Causal attention of queries ``q`` ``[B, C, K, G, D]`` at positions ``start..`` over
    keys/values ``[B, S, K, D]`` at positions ``0..S-1``; softmax in float32."""
    logits = jnp.einsum('bckgd,bskd->bkgcs', q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(q.shape[-1])
    rows = start + jnp.arange(q.shape[1])[:, None]
    allowed = jnp.arange(k.shape[1])[None, :] <= rows
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum('bkgcs,bskd->bckgd', probs, v)


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, chunk: int = ATTENTION_CHUNK
) -> jax.Array:
    """Grouped-query causal attention: ``q`` ``[B, T, H, D]`` over ``k``, ``v``
    ``[B, T, K, D]`` (query head ``h`` reads key/value head ``h // (H / K)``).

    Longer inputs than ``chunk`` go through a ``lax.scan`` over blocks of ``chunk``
    queries whose probabilities are recomputed in the backward pass instead of stored:
    memory grows as ``T * chunk`` per layer, not ``T**2`` (a Python loop of checkpointed
    blocks lets XLA:CPU schedule every recomputation at once and keeps them all)."""
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, group, dim)
    if length <= chunk:
        return _attention_block(q, k, v, 0).reshape(batch, length, heads, dim)
    blocks = -(-length // chunk)
    q = jnp.pad(q, [(0, 0), (0, blocks * chunk - length), (0, 0), (0, 0), (0, 0)])
    q = q.reshape(batch, blocks, chunk, kv_heads, group, dim).swapaxes(0, 1)

    @jax.checkpoint
    def step(carry: None, block: tuple[jax.Array, jax.Array]) -> tuple[None, jax.Array]:
        q_block, start = block
        return carry, _attention_block(q_block, k, v, start)

    _, out = jax.lax.scan(step, None, (q, jnp.arange(blocks) * chunk))
    out = out.swapaxes(0, 1).reshape(batch, blocks * chunk, heads, dim)
    return out[:, :length]


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        kernel_init=nn.initializers.normal(INIT_STD),
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x**2) + eps) * scale``, computed in float32 (as Hugging Face's
    LlamaRMSNorm), returned in ``dtype``."""

    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * scale).astype(self.dtype)


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings; no biases."""

    config: LlamaConfig
    attention_chunk: int = ATTENTION_CHUNK
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        c, dt = self.config, self.dtype
        batch, length, _ = x.shape
        hd = c.head_dim

        def project(name, heads):
            return _dense(heads * hd, dt, name)(x).reshape(batch, length, heads, hd)

        q = apply_rope(project('q_proj', c.heads), positions, c.rope_base)
        k = apply_rope(project('k_proj', c.kv_heads), positions, c.rope_base)
        v = project('v_proj', c.kv_heads)
        y = causal_attention(q, k, v, self.attention_chunk)
        return _dense(c.width, dt, 'o_proj')(y.reshape(batch, length, c.heads * hd))


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dt = self.config, self.dtype
        gate = _dense(c.mlp_width, dt, 'gate_proj')(x)
        up = _dense(c.mlp_width, dt, 'up_proj')(x)
        return _dense(c.width, dt, 'down_proj')(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    """Pre-norm block: ``x + attn(input_layernorm(x))``, then
    ``+ mlp(post_attention_layernorm(.))``."""

    config: LlamaConfig
    attention_chunk: int = ATTENTION_CHUNK
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        c, dt = self.config, self.dtype
        y = RMSNorm(c.norm_eps, dt, name='input_layernorm')(x)
        x = x + LlamaAttention(c, self.attention_chunk, dt, name='self_attn')(y, positions)
        y = RMSNorm(c.norm_eps, dt, name='post_attention_layernorm')(x)
        return x + LlamaMLP(c, dt, name='mlp')(y)


class Llama(nn.Module):
    """Decoder-only LLaMA over ``config.vocab_size`` tokens (see the module docstring).

    ``dtype`` is the compute dtype of the blocks (parameters stay float32; norms, RoPE
    and softmax compute in float32); the head computes in float32 in every mode.
    ``train`` is accepted for the launcher's calling convention and changes nothing (no
    dropout, no statistics).
    """

    config: LlamaConfig
    attention_chunk: int = ATTENTION_CHUNK
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        del train
        c = self.config
        c.check()
        if tokens.ndim != 2:
            raise UserError(
                f'llama: input of shape {tokens.shape} is not [batch, length] tokens; give a '
                '2-D array of token ids'
            )
        length = tokens.shape[1]
        if length > c.context:
            raise UserError(
                f'llama: input length {length} exceeds the context {c.context}; feed shorter '
                'windows'
            )
        if not (isinstance(self.attention_chunk, int) and self.attention_chunk > 0):
            raise UserError(
                f'llama: attention_chunk must be a positive integer, got {self.attention_chunk!r}'
            )
        embed = nn.Embed(
            c.vocab_size,
            c.width,
            embedding_init=nn.initializers.normal(INIT_STD),
            param_dtype=jnp.float32,
            name='embed_tokens',
        )
        x = embed(tokens.astype(jnp.int32)).astype(self.dtype)
        positions = jnp.arange(length)
        for i in range(c.depth):
            x = LlamaBlock(c, self.attention_chunk, self.dtype, name=f'layers_{i}')(x, positions)
        x = RMSNorm(c.norm_eps, jnp.float32, name='norm')(x)
        if c.tie_embeddings:
            return embed.attend(x)
        return nn.Dense(
            c.vocab_size,
            use_bias=False,
            kernel_init=nn.initializers.normal(INIT_STD),
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            name='lm_head',
        )(x)


def init_params(config: LlamaConfig, seed: int = 0) -> dict[str, Any]:
    """Random parameters of ``Llama(config)`` (normal(0.02) kernels and embedding, unit
    norms), as a nested dict of float32 arrays."""
    variables = jax.jit(Llama(config).init)(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))
    return flax.core.unfreeze(variables['params'])


def llama(num_classes: int, dtype: Dtype = jnp.float32, **fields: Any) -> Llama:
    """The zoo's ``llama``: :class:`Llama` over ``num_classes`` tokens, its other
    :class:`LlamaConfig` fields from ``fields`` (default: SmolLM2-135M's)."""
    base = dataclasses.asdict(smollm2_135m())
    unknown = sorted(set(fields) - set(base) - {'attention_chunk'})
    if unknown:
        raise UserError(f'llama: unknown model field(s) {unknown}; the fields are {sorted(base)}')
    chunk = fields.pop('attention_chunk', ATTENTION_CHUNK)
    config = LlamaConfig(**{**base, **fields, 'vocab_size': num_classes})
    return Llama(config, attention_chunk=chunk, dtype=dtype)
