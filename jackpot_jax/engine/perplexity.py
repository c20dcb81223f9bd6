"""A language model's perplexity of a text, defined as Wanda's and SparseGPT's evaluations do.

The text is tokenized whole (no BOS added) and cut into consecutive windows of
``context`` tokens; the last partial window is dropped, and a text shorter than one
window is one window of its own length. Each window is scored on its own: the mean
next-token cross-entropy over every position after the first of each window (position t
predicts token t + 1), and perplexity = exp(that mean). Windows never see each other, so
the figure depends on ``context``: compare models at one context.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jackpot_jax.core.errors import UserError

# (params, tokens [B, T]) -> logits [B, T, vocab]
ApplyFn = Callable[[Any, jax.Array], jax.Array]


def text_windows(ids: Sequence[int] | np.ndarray, context: int) -> np.ndarray:
    """``[n, context]`` int32 windows of consecutive tokens (the last partial one dropped);
    a text shorter than ``context`` is one window of its own length."""
    ids = np.asarray(ids, np.int32).reshape(-1)
    if context < 2:
        raise UserError(f'context={context} must be at least 2 tokens (one to predict from)')
    if len(ids) < 2:
        raise UserError(f'the text has {len(ids)} token(s); perplexity needs at least 2')
    if len(ids) < context:
        return ids[None, :]
    n = len(ids) // context
    return ids[: n * context].reshape(n, context)


@functools.partial(jax.jit, static_argnums=0)
def _window_losses(apply_fn: ApplyFn, params: Any, tokens: jax.Array) -> jax.Array:
    """Summed next-token cross-entropy of each window, over its positions 1..T-1."""
    logits = apply_fn(params, tokens[:, :-1]).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(picked, axis=-1)


def perplexity(
    apply_fn: ApplyFn,
    params: Any,
    ids: Sequence[int] | np.ndarray,
    context: int,
    *,
    batch_size: int = 4,
    max_windows: int = 0,
    model_context: int = 0,
) -> dict[str, float]:
    """``{'perplexity', 'loss', 'tokens', 'windows'}`` of the token ``ids`` (see the module
    docstring). ``max_windows`` > 0 scores only the first that many windows (a cap for
    evaluations inside a search); ``model_context`` > 0 refuses a longer ``context``.
    ``apply_fn`` must be hashable (a module-level function or a bound ``Module.apply``)."""
    if model_context and context > model_context:
        raise UserError(
            f'context={context} is longer than the model\'s {model_context} positions; pass '
            f'a context of at most {model_context}'
        )
    windows = text_windows(ids, context)
    if max_windows > 0:
        windows = windows[:max_windows]
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        losses = _window_losses(apply_fn, params, jnp.asarray(batch))
        total += float(jnp.sum(losses))
        count += batch.shape[0] * (batch.shape[1] - 1)
    loss = total / count
    return {
        'perplexity': math.exp(loss),
        'loss': loss,
        'tokens': count,
        'windows': int(len(windows)),
    }


def flax_apply(model: Any) -> ApplyFn:
    """``(params, tokens) -> logits`` of a Linen language model called as
    ``model.apply({'params': params}, tokens)`` (hashable: one per model)."""
    return _LinenApply(model)


class _LinenApply:
    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, params: Mapping, tokens: jax.Array) -> jax.Array:
        return self.model.apply({'params': params}, tokens)

    def __hash__(self) -> int:
        return hash(self.model)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _LinenApply) and other.model == self.model
