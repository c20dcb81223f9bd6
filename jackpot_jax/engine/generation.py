"""Greedy continuations of a prompt by a causal language model, to read what a pruned
model still says (no sampling: the same text on every run of the same weights)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jackpot_jax.engine.perplexity import ApplyFn


@functools.partial(jax.jit, static_argnums=0)
def _next_token(apply_fn: ApplyFn, params: Any, tokens: jax.Array, length: jax.Array) -> jax.Array:
    logits = apply_fn(params, tokens[None])[0]
    return jnp.argmax(logits[length - 1]).astype(jnp.int32)


def greedy_continuation(
    apply_fn: ApplyFn, params: Any, prompt: Sequence[int], new_tokens: int, stop: int | None = None
) -> list[int]:
    """The ``new_tokens`` most likely next tokens after ``prompt``, one at a time (each
    step re-reads the whole text: no cache, so one compile serves every step); stops
    early at ``stop`` (e.g. the end-of-sequence id), which is not returned."""
    if not prompt:
        raise ValueError('greedy_continuation needs a prompt of at least one token')
    total = len(prompt) + new_tokens
    tokens = np.zeros(total, np.int32)
    tokens[: len(prompt)] = prompt
    for length in range(len(prompt), total):
        token = int(_next_token(apply_fn, params, jnp.asarray(tokens), jnp.int32(length)))
        if stop is not None and token == stop:
            return tokens[len(prompt) : length].tolist()
        tokens[length] = token
    return tokens[len(prompt) :].tolist()
